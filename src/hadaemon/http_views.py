"""The HTTP answers: pure functions of the status document (JSON, the page, metrics).

Owns the routing table of docs/http.md, the status page's HTML and its CSS (with
the hash its Content-Security-Policy names), and the Prometheus text format.
Nothing here reads a socket or the clock: a test hands in the document.

Uses: base, wire, http_proto.
"""

import collections
import operator
import os
import re
import time
import typing

from .base import format_ago, format_duration, format_time
from .wire import _shorten
from .http_proto import HTTP_READ_METHODS, HttpAnswer, error_answer, json_answer


# -- the answers: pure functions of the status document ------------------------------

def http_route(request, app, writable):
    """The answer to one authorised request, as docs/http.md's table says.

    ``app`` is an HttpApp: the --status --json document, one host of it, the history,
    the pause; ``writable``: a token is configured, so POST may change something.
    """
    path = request.path
    if path in (("pause",), ("resume",)):
        if request.method != "POST":
            return error_answer(405, "/%s takes POST" % path[0], [("Allow", "POST")])
        if not writable:
            return error_answer(403, "POST /%s needs http_token in [daemon]: without a token "
                                     "anyone who reaches the port could do it" % path[0])
        return json_answer(200, {"paused": app.pause(path[0] == "pause")})
    resource = _read_resource(path)
    if resource is None:
        return error_answer(404, "no such resource: %s" % _shorten("/" + "/".join(path), 200))
    if request.method not in HTTP_READ_METHODS:
        return error_answer(405, "%s takes GET, HEAD or OPTIONS" % _shorten("/" + "/".join(path), 200),
                            [("Allow", "GET, HEAD, OPTIONS")])
    return resource(app, request)


def _read_resource(path):
    if not path:
        return _answer_page
    if len(path) == 1:
        return {"status": _answer_status, "history": _answer_history,
                "metrics": _answer_metrics}.get(path[0])
    if path[0] == "hosts" and len(path) in (2, 3) and all(path[1:]):
        return _answer_host
    return None


def _answer_page(app, request):
    return HttpAnswer(200, render_page(app.document()).encode("utf-8"), "text/html; charset=utf-8",
                      (("Content-Security-Policy", PAGE_CSP), ("Referrer-Policy", "no-referrer")))


def _answer_status(app, request):
    return json_answer(200, app.document())


def _answer_history(app, request):
    n = request.query.get("n", "20")
    if not re.match(r"[0-9]{1,7}\Z", n):
        return error_answer(400, "n must be a whole number of transitions, got n=%s"
                            % (n if len(n) <= 40 else n[:40] + "..."))
    return json_answer(200, app.history(int(n)))


def _answer_metrics(app, request):
    return HttpAnswer(200, render_metrics(app.document()).encode("utf-8"),
                      "text/plain; version=0.0.4; charset=utf-8")


def _answer_host(app, request):
    name = request.path[1]
    try:
        conditions = parse_conditions(request.pairs) if len(request.path) == 3 else ()
    except ValueError as exc:
        return error_answer(400, str(exc))
    record = app.host(name)     # a load balancer asks often: this one host, not the whole document
    if record is None:
        return error_answer(404, "host %s was never seen" % _shorten(name, 100))
    body = dict({"host": name}, **record)
    if len(request.path) == 2:
        return json_answer(200, body)
    attributes = (record.get("last_report") or {}).get("attributes") or {}
    for condition in conditions:
        if condition.unknown_suffix(attributes):
            return error_answer(400, "%s: no attribute %s, and %s is not an operator (lt, le, gt, ge)"
                                % (_shorten(condition.text, 100), _shorten(condition.key, 80),
                                   _shorten(condition.key.rpartition(".")[2], 20)))
    if str(record.get("state")).lower() != request.path[2].lower():
        return json_answer(503, body)
    for condition in conditions:
        if not condition.holds(attributes):
            body["failed"] = {"condition": condition.text, "value": attributes.get(condition.key)}
            return json_answer(503, body)
    return json_answer(200, body)


# Load-balancer conditions (docs/http.md): /hosts/HOST/STATE?lag_bytes.le=16777216&role=sync

_CONDITION_OPS = {"lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge}
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")


class Condition(typing.NamedTuple):
    """One condition of the query: KEY=VALUE (equal as strings) or KEY.OP=N (as numbers)."""
    text: str                   # as asked, KEY.le=N
    key: str
    op: typing.Optional[str]    # lt, le, gt, ge; None: KEY=VALUE
    value: typing.Union[str, float]

    def holds(self, attributes):
        """Whether it holds on ``attributes`` (a report's); a missing attribute fails it."""
        seen = attributes.get(self.key)
        if self.op is None:
            return seen is not None and str(seen) == self.value
        number = _number(seen)
        return number is not None and _CONDITION_OPS[self.op](number, self.value)

    def unknown_suffix(self, attributes):
        """KEY.SUFFIX=... where the report has KEY and no KEY.SUFFIX: a typo of an operator
        (lag_bytes.lte), not an attribute of its own (a key may hold dots)."""
        return self.op is None and "." in self.key and self.key not in attributes \
            and self.key.rpartition(".")[0] in attributes


def _number(value):
    """An attribute's value as a number, or None when it is not one."""
    text = str(value).strip() if value is not None else ""
    return float(text) if _NUMBER_RE.match(text) else None


def parse_conditions(pairs):
    """The query's (name, value) pairs as Conditions, in order; ValueError (a 400) for a
    bad number or a condition without a name."""
    out = []
    for name, value in pairs:
        text = "%s=%s" % (name, value)
        key, _, suffix = name.rpartition(".")
        if suffix in _CONDITION_OPS:
            if not key:
                raise ValueError("%s: no attribute before .%s" % (_shorten(text, 100), suffix))
            number = _number(value)
            if number is None:
                raise ValueError("%s: %s is not a number" % (_shorten(text, 100), _shorten(value, 40)))
            out.append(Condition(text, key, suffix, number))
        elif not name:
            raise ValueError("%s: a condition is KEY=VALUE or KEY.OP=N" % _shorten(text, 100))
        else:
            out.append(Condition(text, name, None, value))
    return tuple(out)


# Prometheus text format 0.0.4: https://prometheus.io/docs/instrumenting/exposition_formats/

def _label_value(value):
    text = str(value)
    if "\\" in text or "\n" in text or '"' in text:
        text = text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return text


def _sample_value(value):
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return repr(round(float(value), 6))        # 0.001114, not 0.0011140000000000002


def _check_labels(check):
    """A check's labels: its command line and scope, and the group's host= when it sets one
    (the key's host, when not the command's file name); together as unique as the key."""
    host = check["key"].split("|")[1]
    pairs = [("check", check["name"]), ("scope", check["scope"])]
    if host != os.path.basename(check["name"].split()[0]):
        pairs.append(("host", host))
    return _labels(*pairs)


def _labels(*pairs):
    return "{%s}" % ",".join('%s="%s"' % (name, _label_value(value)) for name, value in pairs)


def render_metrics(doc):
    """The status document in the Prometheus text format (docs/http.md's families).

    ``daemon.counters`` (transitions and action runs since the start) and
    ``daemon.lag_ms`` count / sum come from the running daemon; a document
    without them leaves those series out.
    """
    d = doc["daemon"]
    out = []

    def family(name, kind, text, samples):
        """``samples``: (what follows the name: a suffix and labels, value); None is left out."""
        out.append("# HELP %s %s\n# TYPE %s %s" % (name, text, name, kind))
        out.extend("%s%s %s" % (name, tail, _sample_value(value)) for tail, value in samples
                   if value is not None)

    hosts = [(_labels(("host", h)), h, r) for h, r in doc["hosts"].items()]
    checks = [(_check_labels(c), c) for c in doc["checks"]]   # once for three families
    counters = d.get("counters") or {}
    lag = d.get("lag_ms") or {}
    workers = collections.Counter(w["state"] for w in d.get("workers") or [])
    family("hadaemon_up", "gauge", "1 while the daemon answers.", [("", 1)])
    family("hadaemon_info", "gauge", "The daemon's version.", [(_labels(("version", d["version"])), 1)])
    family("hadaemon_host_state", "gauge", "1 for each host's accepted state.",
           [(_labels(("host", h), ("state", r["state"])), 1) for _, h, r in hosts])
    family("hadaemon_host_state_since_seconds", "gauge", "When each host entered its state (epoch).",
           [(labels, r.get("since")) for labels, _, r in hosts])
    family("hadaemon_transitions_total", "counter", "Transitions since the daemon started.",
           [(_labels(("host", t["host"]), ("from", t["from"]), ("to", t["to"])), t["count"])
            for t in counters.get("transitions", ())])
    family("hadaemon_action_runs_total", "counter", "Ended action runs since the daemon started.",
           [(_labels(("section", r["section"]), ("result", r["result"])), r["count"])
            for r in counters.get("action_runs", ())])
    family("hadaemon_notify_events_total", "counter", "Notification events since the daemon started: "
           "ok delivered, failed given up after the last try, dropped out of the full queue.",
           [(_labels(("result", e["result"])), e["count"]) for e in counters.get("notify_events", ())])
    family("hadaemon_notify_waiting", "gauge", "Notification events waiting for their delivery.",
           [("", counters.get("notify_waiting"))])
    family("hadaemon_check_runs_total", "counter", "Runs of each check since the daemon started.",
           [(labels, c.get("runs")) for labels, c in checks])
    family("hadaemon_check_skipped_total", "counter",
           "Runs of each check skipped because the previous one still ran.",
           [(labels, c.get("skipped")) for labels, c in checks])
    family("hadaemon_check_duration_seconds", "gauge", "How long each check's last run took.",
           [(labels, (c.get("last") or {}).get("duration")) for labels, c in checks])
    lag_samples = [(_labels(("quantile", q)), lag[key] / 1000.0 if lag.get(key) is not None else None)
                   for q, key in (("0.5", "p50"), ("0.99", "p99"))]
    if lag.get("count") is not None:
        lag_samples += [("_sum", lag.get("sum", 0.0) / 1000.0), ("_count", lag["count"])]
    family("hadaemon_schedule_lag_seconds", "summary",
           "From a check's due time to its start on a worker.", lag_samples)
    family("hadaemon_action_queue_length", "gauge", "Action runs waiting for their turn.",
           [("", len(d.get("queue") or ()))])
    family("hadaemon_actions_paused", "gauge", "1 while actions are paused.", [("", bool(d["paused"]))])
    paused = set(d.get("paused_hosts") or ())
    family("hadaemon_host_paused", "gauge", "1 while a host's actions are paused (--pause HOST).",
           [(_labels(("host", h)), h in paused) for h in sorted(paused | set(doc["hosts"]))])
    family("hadaemon_workers", "gauge", "Check workers by state.",
           [(_labels(("state", s)), workers.get(s, 0))
            for s in sorted(set(workers) | {"idle", "busy", "starting"})])
    return "\n".join(out) + "\n"


# The page: the tables of --status for a person.  It loads nothing from elsewhere and
# runs no script at all; it refreshes itself with a meta refresh.  Its one style sheet
# is inline, allowed by its hash in the Content-Security-Policy (tests/test_http.py
# checks the hash against the sheet), so the policy can forbid everything else.
PAGE_CSS = (
    "body{font:14px/1.45 system-ui,sans-serif;margin:1.2em 1.6em;color:#1d2329;background:#f7f8fa}"
    "h1{font-size:1.35em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.5em 0 .4em}"
    "p{margin:.15em 0;overflow-wrap:anywhere}table{border-collapse:collapse;background:#fff}"
    ".t{overflow-x:auto;max-width:100%}@media (max-width:600px){body{margin:.6em .5em}}"
    "th,td{border:1px solid #d9dde3;padding:.25em .65em;text-align:left;vertical-align:top;"
    "white-space:nowrap}"
    "th{background:#eef1f4;font-weight:600}td.n{text-align:right}"
    ".s{display:inline-block;padding:0 .55em;border-radius:.8em;font-weight:600}"
    ".good{background:#d3f2d6;color:#0b5a16}.bad{background:#fbd3d3;color:#8c1111}"
    ".warn{background:#fbeec0;color:#6a5100}.standby{background:#d5e4fa;color:#12407c}"
    ".other{background:#e6e8eb;color:#3d4650}.dim{color:#6a737d}"
    ".paused{background:#8c1111;color:#fff;padding:.3em .7em;display:inline-block;font-weight:700}"
    "td.msg{white-space:normal;min-width:16em;max-width:36em;word-break:break-word;"
    "font-family:ui-monospace,monospace;font-size:.88em}"
    "footer{margin-top:1.6em;font-size:.85em}a{color:#12407c}")
PAGE_CSS_SHA256 = "yCZn7NiGTmvcbNOKCPokOYdHJspqV0PlYIOlTVMeXyc="
PAGE_CSP = ("default-src 'none'; style-src 'sha256-%s'; img-src 'none'; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'none'" % PAGE_CSS_SHA256)
PAGE_REFRESH = 2

_STATE_CLASSES = {
    "good": ("master", "primary", "up", "ok", "active", "leader"),
    "standby": ("slave", "standby", "replica", "secondary", "backup", "follower", "queued"),
    "warn": ("warning", "degraded", "running", "skipped"),
    "bad": ("down", "failed", "critical", "interrupted", "error", "fault", "fenced"),
}
_STATE_CLASS = {word: cls for cls, words in _STATE_CLASSES.items() for word in words}


def _h(value, limit=None):
    """Text for the page: clipped, then escaped (quotes too: it may land in an attribute)."""
    text = "-" if value is None else str(value)
    if limit is not None and len(text) > limit:
        text = text[:limit - 1] + "\u2026"
    import html     # here: html.entities, 0.3 MB a daemon that shows no page does without
    return html.escape(text, quote=True)


def _badge(state):
    """A state word in its colour; the class comes from a fixed table, never from the word."""
    if state is None:
        return "-"
    return '<span class="s %s">%s</span>' % (_STATE_CLASS.get(str(state).lower(), "other"), _h(state, 40))


def _when(then, now):
    """Local clock time and how long ago, or '-'."""
    if not then:
        return "-"
    clock = time.strftime("%H:%M:%S" if abs(now - then) < 86400 else "%Y-%m-%d %H:%M",
                          time.localtime(then))
    return '%s <span class="dim">(%s)</span>' % (clock, _h(format_ago(then, now)))


def _html_table(headings, rows, empty):
    if not rows:
        return '<p class="dim">%s</p>' % empty
    # In a box of its own that scrolls sideways: at phone width the page itself never does.
    out = ['<div class="t"><table><thead><tr>%s</tr></thead><tbody>' % "".join("<th>%s</th>" % h for h in headings)]
    for row in rows:
        out.append("<tr>%s</tr>" % "".join(cell if cell.startswith("<td") else "<td>%s</td>" % cell
                                           for cell in row))
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _page_daemon(d, now):
    if d.get("running"):
        line = "running, pid %s, up %s" % (d.get("pid"), format_ago(now - (d.get("uptime") or 0), now)
                                          .replace(" ago", ""))
    else:
        line = "not running (the last known state)"
    workers = collections.Counter(w["state"] for w in d.get("workers") or [])
    parts = [_h(line),
             "workers: %s" % _h(", ".join("%d %s" % (n, s) for s, n in sorted(workers.items())) or "none"),
             "%s action run%s queued" % (len(d.get("queue") or ()), "" if len(d.get("queue") or ()) == 1
                                         else "s")]
    lag = d.get("lag_ms") or {}
    if lag.get("p99") is not None:
        parts.append("schedule lag p99 %s ms" % _h(lag["p99"]))
    out = ["<p>%s</p>" % " &middot; ".join(parts)]
    out.append('<p>%s</p>' % ('<span class="paused">ACTIONS PAUSED</span>' if d.get("paused")
                              else '<span class="s good">actions enabled</span>'))
    if d.get("paused_hosts"):
        out.append('<p><span class="paused">ACTIONS PAUSED FOR %s</span></p>' % _h(", ".join(d["paused_hosts"])))
    swo = d.get("switchover")
    if swo:
        out.append("<p>switchover %s &rarr; %s scheduled at %s</p>" % (
            _h(swo.get("from")), _h(swo.get("to")), _h(format_time(swo.get("at")))))
    out.append('<p class="dim">config %s &middot; state %s</p>' % (_h(d.get("config_dir")),
                                                                  _h(d.get("state_dir"))))
    return "\n".join(out)


def _page_hosts(hosts, now):
    rows = []
    for name, h in hosts.items():
        pending = h.get("pending")
        last = h.get("last_report") or {}
        rows.append((_h(name, 100) + (' <span class="paused">paused</span>' if h.get("paused") else ""),
                     _badge(h.get("state")), _when(h.get("since"), now),
                     "%s &times;%d" % (_badge(pending["state"]), pending.get("count", 0)) if pending else "-",
                     "%s by %s %s" % (_badge(last["state"]), _h(last.get("check"), 80),
                                      _when(last.get("time"), now)) if last else "-"))
    return _html_table(("Host", "State", "Since", "Pending", "Last report"), rows,
                       "no host has reported yet")


def _next_run(check, now):
    recheck = "rechecking: " if check.get("rechecking") else ""
    if check.get("running"):
        return recheck + "running"
    if not check.get("next_run"):
        return None
    return recheck + ("due" if check["next_run"] <= now else format_ago(check["next_run"], now))


def _page_checks(checks, now):
    rows = []
    for c in checks:
        last = c.get("last") or {}
        reports = last.get("reports") or {}
        said = ", ".join("%s %s" % (_h(host, 60), _badge(state)) for host, state in sorted(reports.items()))
        message = last.get("message") or ("; ".join(last.get("rejected") or ()) or None)
        rows.append((_h(c.get("name"), 120), "%s, %s" % (_h(c.get("scope"), 60), _h(c.get("schedule"), 40)),
                     said or "-",
                     '<td class="n">%s</td>' % _h(last.get("exit")),
                     _h(format_duration(last["duration"]) if last.get("duration") else None),
                     _when(last.get("time"), now),
                     _h(_next_run(c, now)),
                     '<td class="n">%s</td>' % _h(c.get("runs")),
                     '<td class="n">%s</td>' % _h(c.get("skipped")),
                     '<td class="msg">%s</td>' % _h(message, 300)))
    return _html_table(("Check", "Where, when", "Reported", "Exit", "Took", "Last run", "Next", "Runs",
                        "Skipped", "Message"), rows, "no checks configured")


def _page_history(transitions, runs, now):
    rows = [('<td class="n">%s</td>' % _h(tr.get("id")), _when(tr.get("time"), now), _h(tr.get("host"), 100),
             "%s &rarr; %s" % (_badge(tr.get("from")), _badge(tr.get("to"))), _h(tr.get("check"), 80),
             "#%s" % _h(tr["run"]) if tr.get("run") is not None else "-")
            for tr in transitions[:10]]
    out = ["<h2>Last transitions</h2>",
           _html_table(("#", "When", "Host", "From &rarr; To", "By", "Run"), rows, "none")]
    rows = []
    for run in runs[:10]:
        commands = run.get("commands") or []
        took = run["ended"] - run["started"] if run.get("ended") and run.get("started") else None
        rows.append(('<td class="n">%s</td>' % _h(run.get("id")), "[%s]" % _h(run.get("section"), 80),
                     _h(run.get("host"), 100), "%s %s" % (_badge(run.get("state")), _h(run.get("reason"), 200)
                                                          if run.get("reason") else ""),
                     "%d/%d" % (sum(1 for cmd in commands if cmd.get("result")), len(commands)),
                     _h(format_duration(took) if took and took > 0 else None),
                     _when(run.get("ended") or run.get("started") or run.get("queued"), now)))
    out += ["<h2>Last action runs</h2>",
            _html_table(("#", "Section", "Host", "Result", "Commands", "Took", "When"), rows, "none")]
    return "\n".join(out)


def render_page(doc, now=None):
    """The status document as an HTML page (``GET /``): every name and message escaped."""
    now = time.time() if now is None else now
    hosts = doc["hosts"]
    title = ", ".join("%s %s" % (name, h.get("state")) for name, h in list(hosts.items())[:6])
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="refresh" content="%d">' % PAGE_REFRESH,
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>hadaemon%s</title>" % (": " + _h(title, 200) if title else ""),
        "<style>%s</style></head><body>" % PAGE_CSS,
        "<h1>hadaemon %s</h1>" % _h(doc["daemon"].get("version")),
        _page_daemon(doc["daemon"], now),
        "<h2>Hosts</h2>", _page_hosts(hosts, now),
        "<h2>Checks</h2>", _page_checks(doc["checks"], now),
        _page_history(doc["transitions"], doc["runs"], now),
        '<footer class="dim">%s &middot; refreshes every %d s &middot; <a href="status">status</a> '
        '&middot; <a href="history">history</a> &middot; <a href="metrics">metrics</a></footer>'
        % (_h(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))), PAGE_REFRESH),
        "</body></html>", ""])
