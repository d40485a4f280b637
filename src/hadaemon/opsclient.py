"""Operations from the command line: --switchover, --pause and --resume (all, or some hosts).

Owns what the command line asks the daemon for SPEC §12's operations and how it
waits: ``--switchover TO [--from FROM] [--at TIME] [--wait [--timeout S]]``,
``--switchover --cancel``, ``--pause [HOST...]`` / ``--resume [HOST...]`` (with no
daemon running: written to the state db, or in a cluster to etcd).  In a cluster
any member takes a request: it returns once etcd has it.

Exit codes: 0 done (queued, scheduled, stored); 1 refused or failed (the reason
printed); 2 bad arguments; 3 no daemon (--switchover).

Uses: base, configfiles, wire, store, switchover, etcd, cluster_agent, cluster_member, client.
"""

import json
import sys
import time

from .base import (
    ConfigError, EXIT_FAIL, EXIT_NOT_RUNNING, EXIT_OK, EXIT_USAGE, HadaemonError, PidLock,
    ensure_state_dir, format_time, valid_name,
)
from .configfiles import load_config
from .wire import request
from .store import Store
from .etcd import EtcdClient, EtcdError
from .cluster_agent import etcd_timeouts
from .cluster_member import HOSTPAUSE_KEYS, PAUSE_KEY
from .switchover import parse_at
from .client import ask, locked_pid, offline_status, render_run


def _cluster_of(args):
    try:
        return load_config(args.config_dir).cluster
    except ConfigError:
        return None


def _bad_hosts(hosts):
    bad = [h for h in hosts if not valid_name(h)]
    if bad:
        print("hadaemon: bad host name %r (letters, digits, _ . : - )" % bad[0], file=sys.stderr)
    return bad


def cmd_pause(args, paused, hosts=()):
    """--pause / --resume: actions of the whole daemon (cluster), or of ``hosts`` only."""
    if _bad_hosts(hosts):
        return EXIT_USAGE
    cluster = _cluster_of(args)
    if cluster is not None:
        return cmd_pause_cluster(args, cluster, paused, hosts)
    if locked_pid(args.state_dir):
        _ask_pause(args, paused, hosts)
    else:
        ensure_state_dir(args.state_dir)
        lock = PidLock(args.state_dir)
        if not lock.acquire():
            return cmd_pause(args, paused, hosts)
        store = Store(args.state_dir)
        try:
            store.open()
            if hosts:
                now = set(store.data.get("hostpause") or ())
                store.commit({"hostpause": sorted(now | set(hosts) if paused else now - set(hosts))})
            else:
                store.commit({"meta": dict(store.data.get("meta") or {}, paused=paused)})
        finally:
            store.close()
            lock.release()
    print(_paused_line(paused, hosts))
    return EXIT_OK


def _ask_pause(args, paused, hosts):
    if hosts:
        return ask(args, {"cmd": "hostpause", "hosts": list(hosts), "paused": paused})
    return ask(args, {"cmd": "pause" if paused else "resume"})


def _paused_line(paused, hosts):
    if hosts:
        return "actions %s for %s%s" % ("paused" if paused else "resumed", ", ".join(hosts),
                                        ": their transitions are recorded, their runs skipped"
                                        if paused else "")
    return "actions %s" % ("paused: transitions are recorded, sequences skipped" if paused else "resumed")


def _shows(doc, paused, hosts):
    """Whether the status document ``doc`` shows the pause asked."""
    if not hosts:
        return doc["daemon"]["paused"] == paused
    now = set(doc["daemon"].get("paused_hosts") or ())
    return set(hosts) <= now if paused else not set(hosts) & now


def cmd_pause_cluster(args, cluster, paused, hosts=()):
    """--pause / --resume of a cluster member: the whole cluster, through etcd."""
    where = "cluster %s: actions %s%s on every member" % (
        cluster.name, "paused" if paused else "resumed", " for " + ", ".join(hosts) if hosts else "")
    if locked_pid(args.state_dir):
        _ask_pause(args, paused, hosts)
        deadline = time.monotonic() + (args.timeout or 3.0 * cluster.ttl + 5.0)
        while time.monotonic() < deadline:
            if _shows(ask(args, {"cmd": "status"}), paused, hosts):
                print(where)
                return EXIT_OK
            time.sleep(0.05)
        print("hadaemon: asked, but etcd has not confirmed it: is etcd reachable? (see the log)",
              file=sys.stderr)
        return EXIT_FAIL
    _, timeout = etcd_timeouts(cluster.ttl)
    client = EtcdClient.for_cluster(cluster, max(timeout, 2.0))
    try:
        for key in [HOSTPAUSE_KEYS + h for h in hosts] or [PAUSE_KEY]:
            client.put(cluster.prefix + key, json.dumps(
                {"paused": paused, "by": cluster.node, "time": time.time()}))
    except EtcdError as exc:
        print("hadaemon: cannot write to etcd, nothing was changed for certain: %s" % exc, file=sys.stderr)
        return EXIT_FAIL
    finally:
        client.close()
    print("%s (written to etcd; this daemon is not running)" % where)
    return EXIT_OK


# -- --switchover ------------------------------------------------------------------------

def switchover_message(args, now):
    """The ``switchover`` request of the command line, or (None, why) for bad arguments."""
    if args.cancel:
        if args.switchover or args.frm or args.at:
            return None, "--switchover --cancel takes no host, --from or --at"
        return {"cmd": "switchover", "op": "cancel"}, None
    if not args.switchover:
        return None, "--switchover needs the host to move the role to (or --cancel)"
    for name in [args.switchover] + ([args.frm] if args.frm else []):
        if not valid_name(name):
            return None, "bad host name %r (letters, digits, _ . : - )" % name
    at = None
    if args.at is not None:
        try:
            at = parse_at(args.at, now)
        except ValueError as exc:
            return None, str(exc)
    return {"cmd": "switchover", "op": "ask", "to": args.switchover, "from": args.frm, "at": at}, None


def cmd_switchover(args):
    """--switchover TO [--from FROM] [--at TIME] [--wait [--timeout S]], --switchover --cancel."""
    message, why = switchover_message(args, time.time())
    if message is None:
        print("hadaemon: %s" % why, file=sys.stderr)
        return EXIT_USAGE
    pid = locked_pid(args.state_dir)
    if pid == -1:
        print("hadaemon: the lock on %s is held by a process that wrote no pid (a --pause working "
              "on the db?); try again" % args.state_dir, file=sys.stderr)
        return EXIT_FAIL
    if not pid:
        print("hadaemon not running: --switchover needs the daemon (in a cluster, any member's)",
              file=sys.stderr)
        return EXIT_NOT_RUNNING
    answer = ask(args, message)
    what = "--switchover --cancel" if args.cancel else "--switchover %s" % args.switchover
    if not answer.get("ok"):
        for line in answer.get("errors") or ["refused"]:
            print("hadaemon: %s refused: %s" % (what, line), file=sys.stderr)
        return EXIT_USAGE if answer.get("usage") else EXIT_FAIL
    if not answer.get("stored"):
        answer = _until_stored(args, answer["request"])
        if answer is None:
            print("hadaemon: %s asked, but etcd has not confirmed it: is etcd reachable? (see the log)"
                  % what, file=sys.stderr)
            return EXIT_FAIL
    print(_taken_line(args, answer))
    if args.wait and not args.cancel:
        return wait_switchover(args, answer["request"])
    return EXIT_OK


def _until_stored(args, request_id):
    """A cluster member's request: its state once etcd has it (None: not within 3 ttl)."""
    cluster = _cluster_of(args)
    deadline = time.monotonic() + (3.0 * cluster.ttl + 5.0 if cluster else 10.0)
    while time.monotonic() < deadline:
        answer = ask(args, {"cmd": "switchover", "op": "state", "request": request_id})
        if answer.get("stored"):
            return answer
        time.sleep(0.05)
    return None


def _taken_line(args, answer):
    if answer.get("cancelled"):
        return "switchover %s cancelled" % answer["cancelled"]
    if args.cancel:
        return "switchover cancel stored: the leader drops the one scheduled or queued"
    run, sched = answer.get("run"), answer.get("scheduled")
    if sched:
        return "switchover %s -> %s scheduled at %s" % (sched["from"], sched["to"], format_time(sched["at"]))
    if run is not None:
        return "switchover %s -> %s: run #%d %s%s" % (run["from"], run["to"], run["id"], run["state"],
                                                      " (%s)" % run["reason"] if run.get("reason") else "")
    return "switchover to %s stored: the cluster's leader %s it" % (
        args.switchover, "schedules" if args.at else "runs")


def _request_state(args, request_id):
    try:
        return request(args.state_dir, {"cmd": "switchover", "op": "state", "request": request_id},
                       timeout=10.0)
    except (OSError, HadaemonError):
        return None


def wait_switchover(args, request_id):
    """Until the request's run ends (or --timeout): 0 when it ended ok, else 1."""
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    pause = 0.05
    while True:
        answer = _request_state(args, request_id)
        run = answer.get("run") if answer else None
        if answer is None and not locked_pid(args.state_dir):
            ledger = offline_status(args.state_dir)[1]
            run = next((r.summary() for r in ledger.runs.values()
                        if (r.switchover or {}).get("request") == request_id), None)
            if run is None or run["state"] not in ("ok", "failed", "interrupted", "skipped"):
                print("hadaemon: the daemon stopped; the switchover is %s" % (
                    run["state"] if run else "not run"), file=sys.stderr)
                return EXIT_FAIL
        if run is not None and run["state"] in ("ok", "failed", "interrupted", "skipped"):
            print("\n".join(render_run(run, indent="")))
            return EXIT_OK if run["state"] == "ok" else EXIT_FAIL
        if answer and answer.get("taken") and run is None and not answer.get("scheduled"):
            print("hadaemon: the switchover was dropped (cancelled, or its time missed; see the log)",
                  file=sys.stderr)
            return EXIT_FAIL
        if deadline is not None and time.monotonic() >= deadline:
            print("hadaemon: the switchover is still %s after %gs" % (
                run["state"] if run else "scheduled" if answer and answer.get("scheduled") else "waiting",
                args.timeout), file=sys.stderr)
            return EXIT_FAIL
        left = deadline - time.monotonic() if deadline is not None else pause
        time.sleep(max(0.0, min(pause, left)))
        pause = min(pause * 1.5, 0.5)
