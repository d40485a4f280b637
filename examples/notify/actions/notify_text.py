"""One line for a person, from a hadaemon event (docs/notify.md): what the three
notify_* examples put in a chat message, a mail's subject and a syslog line.

read_event() reads the event hadaemon gives a notify command: one JSON object
on stdin (HA_EVENT holds its kind).
"""

import json
import sys


def read_event(stream=None):
    """The event on stdin, a dict; exits 2 (a usage error) when it is not one."""
    text = (stream or sys.stdin).read()
    try:
        event = json.loads(text)
    except ValueError as exc:
        sys.exit("not a hadaemon event on stdin (%s): %.200r" % (exc, text))
    if not isinstance(event, dict) or "kind" not in event:
        sys.exit("not a hadaemon event on stdin: %.200r" % (text,))
    return event


def _transition(e):
    text = "%s: %s -> %s (by %s)" % (e.get("host"), e.get("from"), e.get("to"), e.get("check"))
    if e.get("switchover") is not None:
        text += ", switchover run %s" % e["switchover"]
    elif e.get("run") is not None:
        text += ", run %s" % e["run"]
    return text


def _run(e):
    text = "run %s [%s] for %s: %s" % (e.get("run"), e.get("section"), e.get("host"), e.get("result"))
    return text + (" (%s)" % e["reason"] if e.get("reason") else "")


def _daemon(e):
    hosts = e.get("hosts")
    return "daemon %s%s" % (e.get("event"), " (hosts %s)" % ", ".join(hosts) if hosts else "")


def _switchover(e):
    return "switchover %s: %s -> %s%s" % (e.get("event"), e.get("from"), e.get("to"),
                                         " at %s" % e["at"] if e.get("at") else "")


KINDS = {
    "transition": _transition,
    "run": _run,
    "check": lambda e: "check %s: %s" % (e.get("check"), e.get("message")),
    "daemon": _daemon,
    "switchover": _switchover,
    "leader": lambda e: "%s leads now (epoch %s)" % (e.get("leader"), e.get("epoch")),
    "test": lambda e: "test: %s" % e.get("message", "a test event"),
}

def event_text(event):
    """``hadaemon NODE #SEQ: what happened``, one line."""
    kind = event.get("kind")
    what = KINDS.get(kind, lambda e: "%s event" % kind)(event)
    return "hadaemon %s #%s: %s" % (event.get("node"), event.get("seq"), what)


def troubling(event):
    """Whether ``event`` tells of something going wrong (a failed run, a check in trouble)."""
    kind = event.get("kind")
    return kind == "check" or (kind == "run" and event.get("result") in ("failed", "interrupted"))
