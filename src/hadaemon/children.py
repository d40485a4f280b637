"""What the forked children run: the check worker and the action run.

Owns child_setup (every child's first step), worker_main (hello, then one check
at a time as the master hands them out, each result sent back as one line),
action_main (one sequence of commands, run serially, each start and end reported),
and the expansion of %MASTER%, %SLAVE%, %HOST% and friends in a section's commands.

Uses: base, wire, records, proc.
"""

import collections
import os
import re
import signal
import struct
import time
import typing

from .base import (
    ACTION_KILL_GRACE, OUTPUT_CAP, close_inherited, reset_child_signals, restore_open_files_limit,
)
from .wire import Channel, parse_check_output
from .records import CheckResult, Job, Run
from .proc import ChildWatch, CommandLease, _Terminate, run_process


def _raise_terminate(signum, frame):
    raise _Terminate()


def child_setup():
    """What every forked child does first: default signals, a clean slate of fds."""
    reset_child_signals()
    restore_open_files_limit()
    signal.signal(signal.SIGTERM, _raise_terminate)
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # a ^C in the foreground is the master's
    close_inherited()


def run_check(job, watch, master=None, environ=None, slot=None):
    """Run one check ``job`` (a Job) and return its CheckResult for the master.

    ``environ``: the environment to start from (default os.environ); a worker passes
    one copy made at its start, as os.environ decodes every entry on every copy.
    ``slot``: the worker's page shared with the master, where the pid of the running
    check is kept (0 when none runs).
    """
    env = dict(os.environ if environ is None else environ)
    env.update(job.env)
    started = time.time()

    def announce(pid):
        # The master kills this group if we die before the check ends (SIGKILL, OOM).
        # Shared memory, not a message: no wake-up of the master for every check.
        if slot is not None:
            struct.pack_into("q", slot, 0, pid)
    try:
        res = run_process(job.argv, env, job.timeout, 0, watch,
                          stdin_path=job.stdin, master=master, on_spawn=announce)
    finally:
        if slot is not None:
            struct.pack_into("q", slot, 0, 0)
    # Why the check said nothing of its own: cut short by us or the system, or ssh failed.
    cut_short = res.failure(job.timeout) if res.error or res.timed_out or res.signal else None
    ssh_failed = cut_short is None and job.ssh and res.exit_code == 255
    if cut_short:
        data = {"state": "unknown", "message": cut_short}
    elif ssh_failed:
        lines = res.stderr.decode("utf-8", "replace").strip().splitlines()
        data = {"state": "unknown", "message": "ssh failed: %s" % (lines[-1] if lines else "exit 255")}
    else:
        data = parse_check_output(res.output)
    if res.truncated:
        data.setdefault("truncated", True)
    # What the daemon had to do about this run, for one log line when it changes.
    trouble = [cut_short] if cut_short else []
    if res.truncated:
        trouble.append("output cut at %d KiB" % (OUTPUT_CAP // 1024))
    if not res.output.isascii():
        try:
            res.output.decode("utf-8")
        except UnicodeDecodeError:
            trouble.append("output is not UTF-8 text")
    return CheckResult(job.id, job.key, data, bool(cut_short or ssh_failed), res.exit_code,
                       res.signal, started, round(res.duration, 6), "; ".join(trouble) or None,
                       res.stderr[:2048].decode("utf-8", "replace") if res.stderr else None)


def worker_main(sock_path, config_dir, slot=None):
    """A pre-forked check worker: hello, then one job at a time until told to go."""
    child_setup()
    os.chdir(config_dir)
    watch = ChildWatch()
    chan = Channel.connect(sock_path)
    chan.send({"t": "hello", "role": "worker", "pid": os.getpid()})
    environ = dict(os.environ)
    while True:
        job = chan.receive()
        if job is None or job.get("t") == "exit":
            return 0
        if job.get("t") == "job":
            chan.send(run_check(Job.from_wire(job), watch, master=chan.sock, environ=environ,
                                slot=slot).to_wire())


# -- Action runner -----------------------------------------------------------------------

_VAR_RE = re.compile(r"%%|%([A-Z0-9][A-Z0-9_.:-]*)%")


def expand_argument(text, variables):
    """Expand %VAR% in one argument; returns (text, names of empty variables)."""
    empty = []

    def replace(m):
        if m.group(0) == "%%":
            return "%"
        name = m.group(1)
        value = variables.get(name, "")
        if not value:
            empty.append(name)
        return value
    return _VAR_RE.sub(replace, text), empty


def action_variables(host, from_state, to_state, states):
    """%HOST%, %FROM%, %TO% and one %STATE% per state word: hosts in it, sorted, comma-joined."""
    variables = {"HOST": host, "FROM": from_state, "TO": to_state}
    by_state = collections.defaultdict(list)
    for name, state in states.items():
        by_state[state].append(name)
    for state, hosts in by_state.items():
        if state.upper() not in ("HOST", "FROM", "TO"):
            variables[state.upper()] = ",".join(sorted(hosts))
    return variables


class StateVariables(dict):
    """The variables of action_variables(), from an index of hosts by state that the
    caller keeps: a %STATE% is made when a command names it, not every state's at
    every transition (ten thousand hosts would make each transition cost that)."""

    def __init__(self, host, from_state, to_state, by_state):
        super().__init__(HOST=host, FROM=from_state, TO=to_state)
        self.by_state = by_state        # state -> set of hosts

    def get(self, name, default=None):
        if name not in self and self.by_state.get(name.lower()):
            self[name] = ",".join(sorted(self.by_state[name.lower()]))
        return super().get(name, default)


def expand_commands(section, variables):
    """The section's commands with variables expanded; ValueError names an empty one."""
    commands = []
    for cmd in section.commands:
        argv = [cmd.argv[0]]
        for word in cmd.argv[1:]:
            text, empty = expand_argument(word, variables)
            if empty:
                raise ValueError("%%%s%% is empty (no host is %s) at %s"
                                 % (empty[0], empty[0].lower(), cmd.where))
            argv.append(text)
        commands.append({"argv": argv, "ignore": cmd.ignore, "timeout": section.timeout,
                         "where": cmd.where})
    return commands


class RunPlan(typing.NamedTuple):
    """What a run of a section gets: the daemon queues it, --simulate prints it."""
    variables: dict                 # NAME -> value, for %NAME%
    env: dict                       # the HA_* of every command, but HA_RUN_ID (the run's own id)
    commands: list                  # expanded, as the action run gets them; [] with an error
    error: typing.Optional[str]     # why the sequence cannot run (an empty variable), or None


def plan_run(section, host, from_state, to_state, states, config_dir, state_dir, variables=None):
    """The run of SECTION for HOST going FROM -> TO, against STATES (host -> state, as
    they are once the transition is applied), or ``variables`` made from them already
    (the daemon's StateVariables).

    One function for the daemon and --simulate, so that what --simulate shows is
    what would run.
    """
    if variables is None:
        variables = action_variables(host, from_state, to_state, states)
    env = {"HA_HOST": host, "HA_FROM": from_state, "HA_TO": to_state,
           "HA_TRANSITION": "%s_to_%s" % (from_state, to_state),
           "HA_MASTER": variables.get("MASTER", ""), "HA_SLAVE": variables.get("SLAVE", ""),
           "HA_CONFIG_DIR": config_dir, "HA_STATE_DIR": state_dir}
    try:
        return RunPlan(variables, env, expand_commands(section, variables), None)
    except ValueError as exc:
        return RunPlan(variables, env, [], str(exc))


def action_main(sock_path, config_dir):
    """Wait for one action sequence, then run it command after command, reporting each.

    Forked ahead of need: all a transition waits for is one message to this process.
    """
    child_setup()
    os.chdir(config_dir)
    watch = ChildWatch()
    chan = Channel.connect(sock_path)
    chan.send({"t": "hello", "role": "action", "pid": os.getpid()})
    env = dict(os.environ)
    msg = chan.receive()
    if msg is None or msg.get("t") != "run":
        return 0                        # the master stopped, or needs no more runs
    run, confirm = Run.from_action(msg["run"])
    env.update(run.env)
    outcome, reason = "ok", None
    for index, cmd in enumerate(run.commands):
        not_after = lease = None
        if confirm:
            # A cluster's leader: before each command the master says whether it still
            # leads, and until when (by its lease clock) this command may start and run.
            chan.send({"t": "may", "run": run.id, "index": index})
            answer = chan.receive()
            while answer is not None and answer.get("t") == "lease":
                answer = chan.receive()         # a renewal's news, from before we asked
            if answer is None:
                return 0
            if answer.get("t") != "go" or not isinstance(answer.get("until"), (int, float)):
                outcome, reason = "interrupted", answer.get("reason") or "the leader stepped down"
                break
            not_after = answer["until"]
            lease = CommandLease(chan, answer["until"], answer["kill_at"])
        chan.send({"t": "start", "run": run.id, "index": index, "time": time.time()})

        def announce(pid, index=index):
            # The master kills this group if we die before the command ends.
            chan.send({"t": "spawned", "run": run.id, "index": index, "pid": pid})
        res = run_process(cmd.argv, env, cmd.timeout, ACTION_KILL_GRACE, watch,
                          merge_stderr=True, master=chan.sock, on_spawn=announce, not_after=not_after,
                          lease=lease)
        failure = res.failure(cmd.timeout)
        if res.late:
            outcome, reason = "interrupted", failure
            break
        if lease is not None and lease.termed:
            failure = "ended: the leader's lease could run out (%s)" % failure
        chan.send({"t": "end", "run": run.id, "index": index, "exit": res.exit_code,
                   "signal": res.signal, "error": failure, "timed_out": res.timed_out,
                   "duration": round(res.duration, 6), "truncated": res.truncated,
                   "output": res.output.decode("utf-8", "replace")})
        if lease is not None and lease.termed:
            outcome, reason = "interrupted", "%s: %s" % (cmd.where, failure)
            break
        if failure and not cmd.ignore:
            outcome = "failed"
            reason = "%s: %s (%s)" % (cmd.where, failure, os.path.basename(cmd.argv[0]))
            break
    chan.send({"t": "done", "run": run.id, "result": outcome, "reason": reason})
    return 0
