"""Command line: argparse, the commands, the relaunch, main().

Owns the options, the default config and state dirs, each ``cmd_*`` (foreground,
start, stop, status, reload, check-config, simulate, rerun, once; pause and
switchover are opsclient's), the relaunch that runs the daemon with this file as a
module, and main(), which the file calls last.

Uses: base, configfiles, wire, ledger, notify, master, whatif, client, opsclient, checkcmd,
      starter.
"""

import argparse
import json
import os
import select
import signal
import sys
import time

from .base import (
    ConfigError, DB_NAME, EXIT_FAIL, EXIT_NOT_RUNNING, EXIT_OK, EXIT_USAGE, HadaemonError,
    LOG_FILE, PidLock, SYSTEM_CONFIG_DIR, SYSTEM_STATE_DIR, __version__, close_inherited,
    ensure_state_dir, format_duration, log, setup_logging,
)
from .configfiles import load_config
from .wire import request
from .ledger import RUN_FINAL
from .notify import notify_test
from .master import Master
from .whatif import parse_what_if, render_simulation, simulate
from .client import ask, locked_pid, offline_status, render_history, render_run, render_status, stop_wait
from .opsclient import cmd_pause, cmd_switchover
from .checkcmd import cmd_check_config, config_or_exit
from .starter import write_starter


def default_config_dir(environ):
    """The config dir when --config-dir is not given, and where it comes from.

    HADAEMON_CONFIG_DIR; else the folder holding this file when it holds a
    checks.conf (copy-and-run, README.md); else /etc/hadaemon (an installed
    hadaemon lives in site-packages, a folder of no config).
    """
    if environ.get("HADAEMON_CONFIG_DIR"):
        return environ["HADAEMON_CONFIG_DIR"], "from HADAEMON_CONFIG_DIR"
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isfile(os.path.join(here, "checks.conf")):
        return here, "the folder of %s" % os.path.basename(__file__)
    return SYSTEM_CONFIG_DIR, "the default: neither --config-dir nor HADAEMON_CONFIG_DIR is " \
        "given, and %s holds no checks.conf" % here


def default_state_dir(config_dir, environ):
    """HADAEMON_STATE_DIR; else /var/lib/hadaemon for /etc/hadaemon (/etc holds no state);
    else CONFIGDIR/var."""
    if environ.get("HADAEMON_STATE_DIR"):
        return environ["HADAEMON_STATE_DIR"]
    if os.path.abspath(config_dir) == SYSTEM_CONFIG_DIR:
        return SYSTEM_STATE_DIR
    return os.path.join(config_dir, "var")


def build_parser():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(
        description="Watch a master / hot-standby pair and run ordered actions when a role changes.",
        epilog="Config dir: --config-dir, else $HADAEMON_CONFIG_DIR, else the folder holding this "
               "program when it holds a checks.conf (copy-and-run: %s), else %s (an installed "
               "hadaemon).  State dir: --state-dir, else $HADAEMON_STATE_DIR, else %s when the "
               "config dir is %s, else CONFIGDIR/var.  "
               "Exit codes: 0 ok, 1 failure or invalid config, 2 usage, 3 not running (--status, "
               "--reload, --rerun)."
               % (here, SYSTEM_CONFIG_DIR, SYSTEM_STATE_DIR, SYSTEM_CONFIG_DIR))
    p.add_argument("--config-dir", metavar="DIR",
                   help="folder with checks.conf, actions.conf, checks/, actions/ (default: "
                        "see below; now %s)" % default_config_dir(os.environ)[0])
    p.add_argument("--state-dir", metavar="DIR",
                   help="pid file, socket, state db and log (default: see below)")
    cmd = p.add_mutually_exclusive_group()
    add = cmd.add_argument
    add("--start", dest="command", action="store_const", const="start",
        help="start in the background (the default); prints the pid; already running is exit 0")
    add("--foreground", "-f", dest="command", action="store_const", const="foreground",
        help="run in the foreground, logging to stderr (systemd, containers, tests)")
    add("--stop", dest="command", action="store_const", const="stop",
        help="stop the daemon and wait for it to exit; not running is exit 0")
    add("--status", dest="command", action="store_const", const="status",
        help="daemon, hosts, checks, last transitions and runs; exit 0 running, 3 not running")
    add("--reload", dest="command", action="store_const", const="reload",
        help="re-read both files; an invalid config is refused (errors printed, exit 1); "
             "exit 3 not running")
    add("--check-config", "-t", dest="command", action="store_const", const="check",
        help="validate both files and every command they name; exit 0 or 1")
    add("--once", dest="command", action="store_const", const="once",
        help="cron mode: run every check once, apply transitions, run their actions, exit")
    add("--history", dest="history", nargs="?", type=int, const=20, metavar="N",
        help="the N newest transitions (default 20), each with its action run")
    add("--pause", nargs="*", metavar="HOST",
        help="stop running action sequences (they are recorded as skipped), of HOSTs only when "
             "given; checks go on")
    add("--resume", nargs="*", metavar="HOST",
        help="run action sequences again (of HOSTs only when given: the global pause stays)")
    add("--switchover", nargs="?", const="", metavar="TO",
        help="move the role (switchover_role) from the one host holding it to TO by the "
             "[switchover] section; exit 0 once queued or scheduled, 1 refused (saying why)")
    add("--simulate", nargs=2, metavar=("HOST", "FROM_to_TO"),
        help="print the section and the commands that would run if HOST went FROM -> TO now "
             "(states from the daemon, else the state db); runs and changes nothing; exit 0 "
             "it would run, 1 no section or an empty variable")
    add("--rerun", type=int, metavar="RUN_ID",
        help="queue the section of an ended run again (same host and transition, the "
             "states of now) as a new run; needs the daemon (exit 3); exit 0 once queued")
    add("--notify-test", dest="command", action="store_const", const="notify-test",
        help="run the notify command once with a test event, no daemon; exit 0 when it exited 0")
    add("--init", metavar="DIR",
        help="write a commented starter config into DIR (made if missing; a checks.conf or "
             "actions.conf there is never overwritten), one that passes --check-config")
    add("--version", action="version", version="hadaemon " + __version__)
    p.add_argument("--wait", action="store_true",
                   help="with --rerun or --switchover: wait until the run ends; exit 0 ok, 1 otherwise")
    p.add_argument("--from", dest="frm", metavar="FROM",
                   help="with --switchover: the host that holds the role now (refused if not)")
    p.add_argument("--at", metavar="TIME",
                   help="with --switchover: HH:MM (the next), 'YYYY-MM-DD HH:MM' (local) or +DURATION")
    p.add_argument("--cancel", action="store_true",
                   help="with --switchover: drop the one scheduled or still queued")
    p.add_argument("--set", action="append", default=[], metavar="HOST=STATE",
                   help="with --simulate: pretend HOST is in STATE (repeat for more hosts)")
    p.add_argument("--json", action="store_true",
                   help="with --status, --history or --simulate: print JSON")
    p.add_argument("--connect", action="store_true",
                   help="with --check-config: also try each ssh target and each etcd endpoint "
                        "of [cluster] once")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="how long --stop waits (default: enough for the longest action "
                        "sequence), --start (default: 30) or --rerun / --switchover --wait "
                        "(default: no limit)")
    p.add_argument("--debug", action="store_true",
                   help="log at debug level too: each check's result, each HTTP request, a check "
                        "skipped because its previous run still ran, ssh and cluster details")
    return p


def cmd_foreground(args, once=False):
    config = config_or_exit(args.config_dir, args.config_origin)
    try:
        ensure_state_dir(args.state_dir)
        setup_logging(config.daemon.log or "stderr", args.state_dir, args.debug)
        return Master(config, args.state_dir, once=once).run()
    except (HadaemonError, OSError) as exc:
        print("hadaemon: %s" % exc, file=sys.stderr)
        return EXIT_FAIL


def _no_pid(state_dir):
    print("hadaemon: the lock on %s is held by a process that wrote no pid (a --pause or "
          "--resume working on the db?); try again" % state_dir, file=sys.stderr)
    return EXIT_FAIL


def cmd_start(args):
    config = config_or_exit(args.config_dir, args.config_origin)
    pid = locked_pid(args.state_dir)
    if pid == -1:
        return _no_pid(args.state_dir)
    if pid:
        print("hadaemon already running (pid %d)" % pid)
        return EXIT_OK
    try:
        ensure_state_dir(args.state_dir)
    except HadaemonError as exc:
        print("hadaemon: %s" % exc, file=sys.stderr)
        return EXIT_FAIL
    rfd, wfd = os.pipe()
    first = os.fork()
    if first == 0:                                   # the first child: a new session
        try:
            os.close(rfd)
            os.setsid()
            if os.fork():
                os._exit(0)
            os.umask(0o027)                          # the daemon itself
            os.chdir("/")
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.close(null)
            # A fork keeps every fd, CLOEXEC or not: a pipe of our caller (cron,
            # a CI runner, $(...)) held open here would never reach EOF.
            close_inherited(keep=(wfd,))
            default_log = os.path.join(args.state_dir, LOG_FILE)
            # stderr is /dev/null once daemonized: log = stderr means the default file.
            target = config.daemon.log if config.daemon.log not in (None, "stderr") else default_log
            setup_logging(target, args.state_dir, args.debug)
            code = Master(config, args.state_dir, default_log=default_log, ready_fd=wfd).run()
        except BaseException:                        # noqa: B036 - logged, then _exit
            log.exception("hadaemon failed")
            code = EXIT_FAIL
        finally:
            os._exit(code if isinstance(code, int) else EXIT_FAIL)  # this must never return
    os.close(wfd)
    os.waitpid(first, 0)
    answer = b""
    deadline = time.monotonic() + (args.timeout or 30.0)
    while time.monotonic() < deadline:
        ready, _, _ = select.select([rfd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(rfd, 4096)
        if not chunk:
            break
        answer += chunk
    os.close(rfd)
    text = answer.decode("utf-8", "replace").strip()
    if text.startswith("ok "):
        # Ready means the socket is bound; return only once the loop answers on it.
        try:
            answer = request(args.state_dir, {"cmd": "ping"}, timeout=args.timeout or 30.0)
        except (OSError, HadaemonError) as exc:
            print("hadaemon did not start: pid %s does not answer on its socket: %s (see %s)"
                  % (text[3:], exc, LOG_FILE), file=sys.stderr)
            return EXIT_FAIL
        print("hadaemon started (pid %s)" % answer.get("pid", text[3:]))
        return EXIT_OK
    print("hadaemon did not start: %s" % (text[7:] if text.startswith("error: ") else
                                          text or "no answer (see %s)" % LOG_FILE), file=sys.stderr)
    return EXIT_FAIL


def cmd_stop(args):
    pid = locked_pid(args.state_dir, wait=min(2.0, args.timeout or 2.0))
    if pid == -1:
        return _no_pid(args.state_dir)     # never kill(-1, ...): that is every process we may signal
    if not pid:
        print("hadaemon not running")
        return EXIT_OK
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    if args.timeout:
        wait = args.timeout
    else:
        try:
            wait = stop_wait(load_config(args.config_dir))
        except ConfigError:
            wait = stop_wait(None)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not PidLock.holder(args.state_dir):
            print("hadaemon stopped (pid %d)" % pid)
            return EXIT_OK
        time.sleep(0.05)
    print("hadaemon (pid %d) still running after %s" % (pid, format_duration(wait)), file=sys.stderr)
    return EXIT_FAIL


def cmd_status(args):
    pid = locked_pid(args.state_dir)
    if pid:
        doc = ask(args, {"cmd": "status"})
    else:
        try:
            config = load_config(args.config_dir)
        except ConfigError:
            config = None
        doc, _ = offline_status(args.state_dir, config)
    print(json.dumps(doc, indent=2, sort_keys=True) if args.json else render_status(doc))
    return EXIT_OK if pid else EXIT_NOT_RUNNING


def cmd_history(args):
    if locked_pid(args.state_dir):
        entries = ask(args, {"cmd": "history", "n": args.history})["history"]
    else:
        entries = offline_status(args.state_dir)[1].history(args.history)
    print(json.dumps(entries, indent=2) if args.json else render_history(entries))
    return EXIT_OK


def cmd_reload(args):
    pid = locked_pid(args.state_dir)
    if not pid:
        print("hadaemon not running", file=sys.stderr)
        return EXIT_NOT_RUNNING
    answer = ask(args, {"cmd": "reload"})
    if answer.get("ok"):
        print("configuration reloaded")
        return EXIT_OK
    for line in answer.get("errors", []):
        print(line, file=sys.stderr)
    print("reload refused: the daemon keeps its old configuration", file=sys.stderr)
    return EXIT_FAIL




def cmd_simulate(args):
    """--simulate: the section and commands a transition would run; nothing run, written or logged."""
    try:
        host, from_state, to_state, sets = parse_what_if(args.simulate[0], args.simulate[1], args.set)
    except ValueError as exc:
        print("hadaemon: --simulate: %s" % exc, file=sys.stderr)
        return EXIT_USAGE
    config = config_or_exit(args.config_dir, args.config_origin)
    pid = locked_pid(args.state_dir)
    if pid and pid > 0:
        status = ask(args, {"cmd": "status"})
        source = "daemon"
    else:
        try:
            status, _ = offline_status(args.state_dir)
        except OSError as exc:
            print("hadaemon: cannot read the state db in %s: %s" % (args.state_dir, exc),
                  file=sys.stderr)
            return EXIT_FAIL
        source = "db" if any(os.path.exists(os.path.join(args.state_dir, DB_NAME + suffix))
                             for suffix in (".dat", ".journal")) else "none"
    states = {name: h["state"] for name, h in status["hosts"].items()}
    doc = simulate(config, args.state_dir, host, from_state, to_state, states, sets,
                   source=source, pid=pid if source == "daemon" else None,
                   paused=bool(status["daemon"]["paused"]))
    print(json.dumps(doc, indent=2) if args.json else render_simulation(doc))
    return EXIT_OK if doc["would_run"] else EXIT_FAIL


def cmd_rerun(args):
    """--rerun RUN_ID [--wait]: the daemon queues the run's section again, as a new run."""
    pid = locked_pid(args.state_dir)
    if pid == -1:
        return _no_pid(args.state_dir)
    if not pid:
        print("hadaemon not running: --rerun needs the daemon (the run goes through its queue)",
              file=sys.stderr)
        return EXIT_NOT_RUNNING
    answer = ask(args, {"cmd": "rerun", "run": args.rerun})
    if not answer.get("ok"):
        for line in answer.get("errors") or ["refused"]:
            print("hadaemon: --rerun %d: %s" % (args.rerun, line), file=sys.stderr)
        return EXIT_FAIL
    run = answer["run"]
    what = "rerun of #%d [%s] for %s %s -> %s" % (run["rerun_of"], run["section"], run["host"],
                                                  run["from"], run["to"])
    if run["state"] == "skipped":
        host = run["reason"][len("paused "):] if run.get("reason", "").startswith("paused ") else ""
        print("run #%d (%s) recorded as skipped (%s): actions are paused%s; hadaemon --resume%s, "
              "then --rerun %d again" % (run["id"], what, run["reason"], " for " + host if host else "",
                                         " " + host if host else "", args.rerun))
        return EXIT_FAIL
    if run["state"] != "queued":
        print("run #%d (%s) %s at once: %s" % (run["id"], what, run["state"], run.get("reason")))
        return EXIT_FAIL
    print("run #%d queued: %s" % (run["id"], what))
    return wait_run(args, run["id"]) if args.wait else EXIT_OK


def wait_run(args, run_id):
    """Poll the daemon until run ``run_id`` ends (or --timeout): 0 when it ended ok, else 1."""
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    pause = 0.05
    while True:
        try:
            answer = request(args.state_dir, {"cmd": "run", "run": run_id}, timeout=10.0)
        except (OSError, HadaemonError):
            answer = None
        run = answer.get("run") if answer and answer.get("ok") else None
        if run is None and not locked_pid(args.state_dir):
            # The daemon stopped: the db has the run's last state (a queued run stays
            # queued, and runs when the daemon starts again).
            run = offline_status(args.state_dir)[1].runs.get(run_id)
            run = run.summary() if run is not None else None
            if run is None or run["state"] not in RUN_FINAL:
                print("hadaemon: the daemon stopped; run #%d is %s" % (
                    run_id, run["state"] if run else "not in the state db"), file=sys.stderr)
                return EXIT_FAIL
        if run is not None and run["state"] in RUN_FINAL:
            print("\n".join(render_run(run, indent="")))
            return EXIT_OK if run["state"] == "ok" else EXIT_FAIL
        if deadline is not None and time.monotonic() >= deadline:
            print("hadaemon: run #%d still %s after %gs" % (
                run_id, run["state"] if run else "unknown", args.timeout), file=sys.stderr)
            return EXIT_FAIL
        left = deadline - time.monotonic() if deadline is not None else pause
        time.sleep(max(0.0, min(pause, left)))
        pause = min(pause * 1.5, 0.5)


def cmd_once(args):
    if config_or_exit(args.config_dir, args.config_origin).cluster is not None:
        print("hadaemon: refusing --once: this daemon is a member of a [cluster], where the "
              "leader alone acts; run it as a daemon", file=sys.stderr)
        return EXIT_FAIL
    pid = locked_pid(args.state_dir)
    if pid:
        print("hadaemon: refusing --once: a daemon runs on %s (pid %s)"
              % (args.state_dir, pid if pid > 0 else "unknown"), file=sys.stderr)
        return EXIT_FAIL
    return cmd_foreground(args, once=True)


# CPython keeps the syntax tree of the script it was started with until that script
# ends: for this file about 10 MB, held by the daemon for its whole life and shared
# by every process it forks.  So the commands that become the daemon, started as a
# script, exec python3 once more, with the same flags and arguments, to run this
# file as a module instead.  Its code comes compiled, marshalled in a memory file
# (HADAEMON_CODE_FD) this process wrote: the new one compiles nothing, so it is not
# left with the few MB of freed memory a compilation scatters.  The loader travels
# in the environment (and leaves it), so that ps shows a short line that ends as the
# operator typed it: python3 -c "import os; exec(...)" /path/hadaemon.py --start
_LOADER = ("import marshal, os, sys, types; path = sys.argv[1]; "
           "fd = int(os.environ.pop('HADAEMON_CODE_FD', '-1')); "
           "m = sys.modules['hadaemon'] = types.ModuleType('hadaemon'); m.__file__ = path; "
           "code = marshal.load(os.fdopen(fd, 'rb')) if fd >= 0 else "
           "compile(open(path, 'rb').read(), path, 'exec'); "
           "exec(code, m.__dict__); del code; sys.exit(m.main(sys.argv[2:]))")
_AS_MODULE = "import os; exec(os.environ.pop('HADAEMON_LOADER'))"


def _interpreter_flags():
    """The python3 options this interpreter was started with that matter to the daemon."""
    flags = sys.flags
    out = ["-I"] if flags.isolated else ["-E"] * bool(flags.ignore_environment) + ["-s"] * bool(flags.no_user_site)
    out += ["-S"] * bool(flags.no_site) + ["-B"] * bool(flags.dont_write_bytecode)
    out += ["-O" * flags.optimize] if flags.optimize else []
    out += ["-W" + w for w in sys.warnoptions]
    for key, value in getattr(sys, "_xoptions", {}).items():
        out += ["-X", key if value is True else "%s=%s" % (key, value)]
    return out


def relaunch_as_module(argv):
    """Run ``hadaemon.py ARGV`` again with this file loaded as a module (see above).

    Returns only when the exec fails; the caller then goes on as it is.
    """
    path = os.path.abspath(__file__)
    fd = -1
    try:
        import marshal
        frame = sys._getframe()
        while frame.f_back is not None:             # the script's own code: no second compile
            frame = frame.f_back
        if frame.f_code.co_name == "<module>" and frame.f_globals is globals():
            code = marshal.dumps(frame.f_code)
        else:
            with open(path, "rb") as f:
                code = marshal.dumps(compile(f.read(), path, "exec"))
        fd = os.memfd_create("hadaemon-code", 0)    # inherited: not close-on-exec
        os.write(fd, code)
        os.lseek(fd, 0, os.SEEK_SET)
    except (OSError, AttributeError, ValueError):   # no memfd here: the new one compiles
        fd = -1
    try:
        env = dict(os.environ, HADAEMON_LOADER=_LOADER, HADAEMON_CODE_FD=str(fd))
        os.execve(sys.executable, [sys.executable] + _interpreter_flags() +
                  ["-c", _AS_MODULE, path] + list(argv), env)
    except OSError:
        if fd >= 0:
            os.close(fd)


def run_command(argv):
    args = build_parser().parse_args(argv)
    args.config_origin = None
    if args.config_dir is None:
        args.config_dir, args.config_origin = default_config_dir(os.environ)
    args.config_dir = os.path.abspath(args.config_dir)
    args.state_dir = os.path.abspath(args.state_dir or default_state_dir(args.config_dir, os.environ))
    if args.set and args.simulate is None:
        build_parser().error("--set goes with --simulate")
    if args.init is not None:
        return write_starter(args.init)
    if args.history is not None:
        return cmd_history(args)
    if args.simulate is not None:
        return cmd_simulate(args)
    if args.wait and args.rerun is None and args.switchover is None:
        build_parser().error("--wait goes with --rerun or --switchover")
    if (args.frm or args.at or args.cancel) and args.switchover is None:
        build_parser().error("--from, --at and --cancel go with --switchover")
    if args.switchover is not None:
        if args.json:
            build_parser().error("--json goes with --status, --history or --simulate")
        return cmd_switchover(args)
    if args.pause is not None or args.resume is not None:
        return cmd_pause(args, args.pause is not None, args.pause or args.resume or ())
    if args.rerun is not None:
        if args.json:
            build_parser().error("--json goes with --status, --history or --simulate")
        return cmd_rerun(args)
    command = args.command or "start"
    if command in ("start", "foreground") and __name__ == "__main__" and __spec__ is None:
        relaunch_as_module(sys.argv[1:] if argv is None else argv)
    if args.json and command != "status":
        build_parser().error("--json goes with --status, --history or --simulate")
    if args.connect and command != "check":
        build_parser().error("--connect goes with --check-config")
    try:
        if command == "foreground":
            return cmd_foreground(args)
        if command == "start":
            return cmd_start(args)
        if command == "stop":
            return cmd_stop(args)
        if command == "status":
            return cmd_status(args)
        if command == "reload":
            return cmd_reload(args)
        if command == "check":
            return cmd_check_config(args)
        if command == "notify-test":
            return notify_test(config_or_exit(args.config_dir, args.config_origin), args.state_dir)
        if command == "once":
            return cmd_once(args)
    except HadaemonError as exc:
        print("hadaemon: %s" % exc, file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_FAIL
    return EXIT_USAGE


def main(argv=None):
    """The command line; a reader that went away (``--status | head -3``) ends it quietly."""
    try:
        code = run_command(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # As a Unix tool does: no traceback, and no second error when Python flushes
        # stdout at exit (it goes to /dev/null now).
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
        return EXIT_FAIL
