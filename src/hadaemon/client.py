"""Control client: --status, --stop, --reload, --history.

Owns what the command line asks the running daemon over its socket, and what it
reads from the state db when no daemon runs (offline status, history), and the
rendering of both for a person.

Uses: base, wire, records, store, ledger_store, ledger, scheduler.
"""

import collections
import os
import sys
import time

from .base import (
    ACTION_KILL_GRACE, EXIT_FAIL, HadaemonError, PidLock, format_ago, format_duration, format_time,
)
from .wire import request
from .records import DaemonBlock, StatusDoc
from .store import Store
from .ledger_store import LocalStore
from .ledger import Ledger
from .scheduler import check_entry


def offline_status(state_dir, config=None, last=20):
    """The status document from the state db, for when no daemon answers; and its ledger."""
    data = Store.read(state_dir) if os.path.isdir(state_dir) else {}
    ledger = Ledger(LocalStore.of_data(data), state_dir)
    ledger.take(ledger.store.load())
    results = dict(data.get("checks") or {})       # an older db: all in one key
    results.update((k[6:], v) for k, v in data.items() if k.startswith("check:"))
    checks = [check_entry(c, results.get(c.key)) for c in config.checks] if config else []
    recent = ledger.recent(last)
    doc = StatusDoc(recent["transitions"], recent["runs"], DaemonBlock.offline(state_dir, config, ledger),
                    ledger.host_entries(), checks)
    return doc.to_wire(), ledger


def ask(args, message):
    """One request to the daemon on ``args.state_dir``; it cannot be reached: exit 1."""
    try:
        return request(args.state_dir, message)
    except (OSError, HadaemonError) as exc:
        print("hadaemon: cannot reach the daemon on %s: %s" % (args.state_dir, exc), file=sys.stderr)
        sys.exit(EXIT_FAIL)


def locked_pid(state_dir, wait=2.0):
    """The pid of the daemon holding the state dir's lock, None when none does.

    A daemon writes its pid just after taking the lock, and an offline --pause /
    --resume holds it without one: such a holder is waited out for ``wait``
    seconds, then reported as -1, a pid no caller may signal.
    """
    deadline = time.monotonic() + wait
    while True:
        pid = PidLock.holder(state_dir)
        if pid != -1 or time.monotonic() >= deadline:
            return pid
        time.sleep(0.05)


def stop_wait(config):
    """How long --stop waits by default: enough for the longest action sequence.

    The master lets a running sequence finish (each command its timeout plus the
    kill grace), then gives itself 10 s, then kills what is left (5 s); this adds
    a margin on top.  Without a readable config: 5 minutes.
    """
    if config is None:
        return 300.0
    longest = max([sum(section.timeout + ACTION_KILL_GRACE for _ in section.commands)
                   for section in config.sections.values()] or [0.0])
    return longest + 1.0 + 10.0 + 5.0 + 15.0


def _clip(text, width):
    text = str(text)
    return text if len(text) <= width else text[:width - 1] + "~"


def _table(rows, widths):
    """Rows of cells in columns of ``widths``; a row of one cell is a heading across them all."""
    lines = []
    for row in rows:
        if len(row) == 1:
            lines.append(_clip(row[0], sum(widths) + len(widths) - 1))
            continue
        cells = [_clip(cell, width).ljust(width) for cell, width in zip(row, widths)]
        lines.append(" ".join(cells).rstrip())
    return lines


def _clock(then):
    if not then:
        return "-"
    if time.time() - then < 86400:
        return time.strftime("%H:%M:%S", time.localtime(then))
    return time.strftime("%m-%d %H:%M", time.localtime(then))


STATUS_ROWS = 40                    # --status lists hosts and checks up to this many, then only trouble
TROUBLE_STATES = {"down", "unknown", "warning"}     # what a check reports when something is wrong


def _host_in_trouble(h):
    return h["state"] in TROUBLE_STATES or h.get("pending") is not None


def _check_in_trouble(c):
    last = c.get("last")
    if not last:
        return False
    return bool(last.get("exit") or last.get("signal") or last.get("rejected")
                or TROUBLE_STATES & set((last.get("reports") or {}).values()))


def _listing(n, what):
    if not n:
        return "none %s" % what
    return "%s %d %s:" % ("the" if n <= STATUS_ROWS else "the first %d of" % STATUS_ROWS, n, what)


def _more(n):
    return ["... and %d more (hadaemon --status --json lists them all)" % (n - STATUS_ROWS)] \
        if n > STATUS_ROWS else []


def render_cluster(c):
    """The cluster block of --status: who leads, and what each live member sees."""
    if c["role"] == "leader":
        role = "the LEADER (epoch %s)" % c["epoch"]
    elif c["role"] == "follower":
        role = "a follower of %s (epoch %s)" % (c["leader"], c["epoch"]) if c["leader"] else \
            "a follower; no leader yet"
    else:
        role = "not a live member (no etcd, or not joined)"
    out = [_clip("cluster %s: node %s is %s" % (c["name"], c["node"], role), 80),
           "  quorum %d; %s; etcd: %d of %d endpoints answering" % (
               c["quorum"], "%d live members" % len(c["members"]) if c["role"] != "none"
               else "no member acts without etcd", sum(1 for e in c["etcd"] if e["ok"]), len(c["etcd"]))]
    for node, view in sorted(c["members"].items()):
        seen = " ".join("%s=%s" % hv for hv in sorted(view["hosts"].items())) or "sees no host yet"
        out.append(_clip("  %-12s %s" % (node + (" *" if node == c["leader"] else ""), seen), 80))
    return out


def _render_daemon(doc):
    """The head of --status: the daemon, its paths, workers, action run, cluster, ssh."""
    d = doc["daemon"]
    out = []
    if d["running"]:
        head = "hadaemon %s: running, pid %d, up %s" % (
            d["version"], d["pid"], format_ago(time.time() - d["uptime"]).replace(" ago", ""))
    else:
        head = "hadaemon %s: not running (the last known state)" % d["version"]
    out.append(head + ("; ACTIONS PAUSED" if d["paused"] else "; actions enabled"))
    if d.get("paused_hosts"):
        out.append(_clip("ACTIONS PAUSED FOR %s (hadaemon --resume HOST...)" % ", ".join(d["paused_hosts"]), 80))
    if d.get("switchover"):
        swo = d["switchover"]
        out.append("switchover %s -> %s scheduled at %s (%s)" % (swo["from"], swo["to"], format_time(swo["at"]),
                                                                format_ago(swo["at"])))
    # Paths on lines of their own: only a path longer than the terminal is cut by it.
    if d.get("config_dir"):
        out.append("config  %s" % d["config_dir"])
    out.append("state   %s" % d["state_dir"])
    if d.get("http"):
        out.append("http    %s" % d["http"])
    if d["running"]:
        states = collections.Counter(w["state"] for w in d["workers"])
        out.append("workers %d: %s" % (len(d["workers"]), ", ".join(
            "%d %s" % (n, st) for st, n in sorted(states.items())) or "none yet"))
        run = next((r for r in doc["runs"] if r["state"] == "running"), None)
        out.append("%s, %d queued" % ("action run #%d running (pid %s)" % (run["id"], d["action_pid"])
                                      if run else "no action running", len(d["queue"])))
    if d.get("cluster"):
        out += render_cluster(d["cluster"])
    for m in d.get("ssh") or []:
        if m["connected"]:
            what = "master connection up since %s (pid %d)" % (_clock(m["since"]), m["pid"])
        else:
            what = "no master connection (checks connect on their own)"
        out.append(_clip("ssh [%s]: %s" % (m["scope"], what), 80))
    return out


def _render_hosts(hosts):
    """The hosts table; past STATUS_ROWS, a count by state and those in trouble."""
    out = []
    shown = hosts
    if len(hosts) > STATUS_ROWS:
        shown = {name: h for name, h in hosts.items() if _host_in_trouble(h)}
        states = collections.Counter(h["state"] for h in hosts.values())
        out.append(_clip("%d hosts: %s; %s" % (len(hosts), ", ".join(
            "%d %s" % (n, st) for st, n in states.most_common()), _listing(len(shown), "in trouble")), 80))
    rows = [("HOST", "STATE", "SINCE", "PENDING", "LAST REPORT")]
    for name, h in list(shown.items())[:STATUS_ROWS]:
        pending = "%s %d" % (h["pending"]["state"], h["pending"]["count"]) if h["pending"] else "-"
        last = h.get("last_report") or {}
        rows.append((name + (" PAUSED" if h.get("paused") else ""), h["state"],
                     "%s (%s)" % (_clock(h["since"]), format_ago(h["since"])),
                     pending, format_ago(last.get("time")) if last else "-"))
    if len(rows) > 1:
        out += _table(rows, (14, 10, 22, 12, 16)) + _more(len(shown))
    elif not hosts:
        out.append("no hosts reported yet")
    return out


def _next_column(check):
    """NEXT of a check: when it runs next; ``recheck`` while a candidate it reported is pending."""
    if check.get("rechecking"):
        return "recheck"
    return format_ago(check.get("next_run")) if check.get("next_run") else "-"


def _render_checks(checks):
    """The checks table, by scope; past STATUS_ROWS, a count and those in trouble."""
    out = []
    if len(checks) > STATUS_ROWS:
        trouble = [c for c in checks if _check_in_trouble(c)]
        not_run = sum(1 for c in checks if not c.get("last"))
        skipped = sum(c.get("skipped") or 0 for c in checks)
        out.append(_clip("%d checks: %d ok, %d not run yet%s; %s" % (
            len(checks), len(checks) - len(trouble) - not_run, not_run,
            ", %d runs skipped" % skipped if skipped else "", _listing(len(trouble), "in trouble")), 80))
        checks = trouble
    rows = [("CHECK", "HOST", "LAST", "EXIT", "TOOK", "WHEN", "NEXT", "SKIP")]
    scope = None
    for c in checks[:STATUS_ROWS]:
        if c["scope"] != scope:             # the scope as a heading, as in checks.conf
            scope = c["scope"]
            rows.append(("[%s]" % scope,))
        last = c.get("last") or {}
        reported = ",".join(sorted(set((last.get("reports") or {}).values()))) or \
            ("rejected" if last.get("rejected") else "-")
        took = format_duration(last["duration"]) if last.get("duration") else "-"
        rows.append((c["name"], c["host"], reported,
                     "-" if last.get("exit") is None else last["exit"], took,
                     format_ago(last.get("time")), _next_column(c),
                     "-" if c.get("skipped") is None else c["skipped"]))
    if len(rows) > 1:
        out += _table(rows, (22, 10, 9, 4, 6, 9, 8, 5)) + _more(len(checks))
        out.append("")
    return out


def _render_history(doc):
    """The last transitions and action runs."""
    out = ["LAST TRANSITIONS"]
    rows = [("#", "WHEN", "HOST", "FROM -> TO", "RUN")]
    for tr in doc["transitions"][:8]:
        rows.append((tr["id"], _clock(tr["time"]), tr["host"], "%s -> %s" % (tr["from"], tr["to"]),
                     "switchover #%s" % tr["switchover"] if tr.get("switchover") is not None else
                     "-" if tr.get("run") is None else "#%s" % tr["run"]))
    out += _table(rows, (5, 9, 14, 26, 14)) if len(rows) > 1 else ["  none"]
    out.append("")
    out.append("LAST ACTION RUNS")
    rows = [("#", "SECTION", "HOST", "RESULT", "CMDS", "TOOK")]
    for run in doc["runs"][:8]:
        done = sum(1 for c in run["commands"] if c.get("result"))
        took = format_duration(run["ended"] - run["started"]) if run.get("ended") and run.get("started") \
            and run["ended"] > run["started"] else "-"
        result = run["state"] + (" (rerun of #%d)" % run["rerun_of"] if run.get("rerun_of") else "") \
            + (": " + run["reason"] if run.get("reason") else "")
        rows.append((run["id"], "[%s]" % run["section"], run["host"], result,
                     "%d/%d" % (done, len(run["commands"])), took))
    out += _table(rows, (5, 22, 10, 26, 5, 6)) if len(rows) > 1 else ["  none"]
    return out


def render_status(doc):
    """The status document for a person, in 80 columns."""
    out = _render_daemon(doc) + [""] + _render_hosts(doc["hosts"]) + [""]
    out += _render_checks(doc["checks"]) + _render_history(doc)
    return "\n".join(out)


def render_run(run, indent="      "):
    """A run and its commands, as --history and --rerun --wait show them."""
    out = ["%srun #%d [%s]: %s%s%s%s" % (indent, run["id"], run["section"], run["state"],
                                        " (rerun of #%d)" % run["rerun_of"] if run.get("rerun_of") else "",
                                        (" (%s)" % run["reason"]) if run.get("reason") else "",
                                        " on %s, epoch %s" % (run["node"], run["epoch"])
                                        if run.get("node") else "")]
    for cmd in run["commands"]:
        res = cmd.get("result")
        what = "not run" if res is None else (res.get("error") or "ok")
        out.append("%s  %s%s  -> %s" % (indent, "-" if cmd["ignore"] else "",
                                        " ".join([os.path.basename(cmd["argv"][0])] + cmd["argv"][1:]),
                                        what))
    return out


def render_history(entries):
    if not entries:
        return "no transitions recorded"
    out = []
    for tr in entries:
        if isinstance(tr.get("switchover"), dict):         # a switchover's own entry
            out.append("      %s  switchover %s -> %s (asked)" % (format_time(tr["time"]), tr["from"], tr["to"]))
        else:
            out.append("#%-4d %s  %s: %s -> %s  (by %s)" % (
                tr["id"], format_time(tr["time"]), tr["host"], tr["from"], tr["to"], tr.get("check")))
        run = tr.get("run")
        if tr.get("switchover") is not None and not isinstance(tr["switchover"], dict):
            out.append("      expected by switchover run #%d: no action section" % tr["switchover"])
            continue
        if run is None:
            out.append("      no action section")
            continue
        for each in [run] + (tr.get("reruns") or []):
            out += render_run(each)
    return "\n".join(out)
