"""What the forked children run: the check worker and the action run.

Owns child_setup (every child's first step), the check Worker (the jobs it is
handed, each run at its time; unchanged results held a while to go together),
action_main (one sequence of commands, run serially, each start and end reported),
and the expansion of %MASTER%, %SLAVE%, %HOST% and friends in a section's commands.

Uses: base, wire, records, proc.
"""

import collections
import heapq
import itertools
import os
import re
import select
import signal
import struct
import sys
import time
import typing

from .base import (
    ACTION_KILL_GRACE, OUTPUT_CAP, close_inherited, reset_child_signals, restore_open_files_limit,
)
from .wire import Channel, encode_message, output_print, parse_check_output
from .records import CheckResult, Job, Run
from .proc import ChildWatch, CommandLease, _Orphaned, _Terminate, run_process


def _raise_terminate(signum, frame):
    raise _Terminate()


def child_setup():
    """What every forked child does first: default signals, a clean slate of fds."""
    reset_child_signals()
    restore_open_files_limit()
    signal.signal(signal.SIGTERM, _raise_terminate)
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # a ^C in the foreground is the master's
    close_inherited()


def said_again(job, res):
    """Whether run ``res`` of ``job`` is its check's last clean run again, byte for byte
    (its job's ``same``): nothing of it need be read or sent but its times."""
    return job.same is not None and res.exit_code is not None \
        and not (res.stderr or res.truncated or res.timed_out) \
        and output_print(res.exit_code, res.output) == job.same


def check_result(job, res, started):
    """The CheckResult of run ``res`` of ``job``, for the master; a clean one (no trouble,
    no stderr) carries its print, for the check's next job to carry as ``same``."""
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
    failed = bool(cut_short or ssh_failed)
    clean = not (failed or trouble or res.stderr)
    return CheckResult(job.id, job.key, data, failed, res.exit_code,
                       res.signal, started, round(res.duration, 6), "; ".join(trouble) or None,
                       res.stderr[:2048].decode("utf-8", "replace") if res.stderr else None,
                       output_print(res.exit_code, res.output) if clean else None)


HOLD = 0.1          # seconds an unchanged result may wait in its worker, to go with others
GIVE_BACK = 0.05    # a queued job that cannot start this long after its time goes back
EARLY = 0.0005      # a job starts this much before its time rather than sleep once more


class Worker:
    """A check worker's jobs: each run at its time (``at``), earliest first.

    A result that says what the master expects (its job's ``same``) is sent as
    ``{"t": "same"}`` (its job, start and duration: the rest the master knows),
    held up to HOLD and sent with others; any other goes at once, after those held
    before it, so the master reads every result, in the order they ran.  While a
    check runs (the alarm), held results still leave in time, and the queued jobs
    that could not start within GIVE_BACK of their time go back to the master
    (``back``) for another worker.  The shared page (``slot``) says which job runs:
    8 bytes the pid of its check, 8 its id.
    """

    def __init__(self, chan, slot=None):
        self.chan, self.slot = chan, slot
        # Ours as bytes, once: posix_spawn encodes every entry of a str one on every call.
        self.environb = dict(os.environb)
        self.fs_encoding = (sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())
        self.watch = ChildWatch()
        self.queue = []                 # heap of (at, seq, Job)
        self.seq = itertools.count()
        self.held = []                  # result lines not sent yet, in the order they ran
        self.held_until = None
        self.at = None                  # the alarm's time, while a check runs
        self.leaving = False            # told to exit: after the check that runs
        # epoll where there is one: its sleep to a job's time costs less than select's.
        epoll = getattr(select, "epoll", None)
        self.poller, self.unit = (epoll(), 1.0) if epoll else (select.poll(), 1000.0)
        self.poller.register(chan.sock.fileno(), select.POLLIN)

    def serve(self):
        """Run the jobs as they come, until the master says ``exit`` or goes."""
        queue, monotonic = self.queue, time.monotonic
        while not self.leaving:
            now = monotonic()
            wait = None
            if queue:
                wait = queue[0][0] - now
                if wait <= EARLY:
                    self.run(heapq.heappop(queue)[2])
                    continue
            if self.held:
                if wait is None or now >= self.held_until:
                    self.flush()
                elif self.held_until - now < wait:
                    wait = self.held_until - now
            if not self.read(wait):
                break
        self.flush()
        return 0

    def read(self, timeout):
        """Take what the master sent, waiting up to ``timeout`` (None: until it sends);
        False when it hung up (``exit`` sets ``leaving``)."""
        chan = self.chan
        if not chan.pending:
            # (Its timeout is in whole milliseconds, rounded up: EARLY less, to start on time.)
            if timeout is not None and not self.poller.poll(max(0.0, timeout - EARLY) * self.unit):
                return True
            data = chan.sock.recv(65536)
            if not data:
                return False
            chan.pending.extend(chan.reader.feed(data))
        while chan.pending:
            msg = chan.pending.popleft()
            kind = msg.get("t")
            if kind == "exit":
                self.leaving = True
            elif kind == "job":
                job = Job.from_wire(msg)
                heapq.heappush(self.queue, (job.at, next(self.seq), job))
        return True

    def hear(self):
        """The master sent something while a check runs: new jobs join the queue (and the
        alarm), so one that cannot start in time is given back while the check runs."""
        if not self.read(0.0):
            raise _Orphaned()
        self.at = self.alarm_at()

    def run(self, job):
        """Run ``job``'s check, while the master's messages and the alarm are heeded; its
        result held or sent."""
        slot = self.slot
        if slot is not None:
            struct.pack_into("q", slot, 8, job.id)
        self.at = self.alarm_at()
        started = time.time()
        try:
            res = run_process(job.argv, self.env_of(job), job.timeout, 0, self.watch,
                              stdin_path=job.stdin, master=self.chan.sock, on_spawn=self.announce,
                              alarm=self)
        finally:
            self.at = None
            if slot is not None:
                struct.pack_into("qq", slot, 0, 0, 0)
        if said_again(job, res):
            # What the master expected: said in a word, and held.  (Times in whole
            # microseconds: repr() of a float costs ten times more.)
            self.held.append(b'{"t":"same","job":%d,"started":%d.%06d,"duration":%d.%06d}\n' % (
                (job.id,) + divmod(int(started * 1e6), 1000000) + divmod(int(res.duration * 1e6), 1000000)))
            if self.held_until is None:
                self.held_until = time.monotonic() + HOLD
        else:
            self.held.append(encode_message(check_result(job, res, started).to_wire()))
            self.flush()

    def env_of(self, job):
        """``job``'s environment: ours and its HA_*, in bytes."""
        env = self.environb.copy()
        encoding, errors = self.fs_encoding
        for name, value in job.env.items():
            env[name.encode(encoding, errors)] = value.encode(encoding, errors)
        return env

    def announce(self, pid):
        """The check's process exists: its pid on the shared page.  The master kills its
        group if we die before it ends (SIGKILL, OOM); shared memory, not a message, so
        that the master is not woken for every check."""
        if self.slot is not None:
            struct.pack_into("q", self.slot, 0, pid)

    def flush(self):
        if self.held:
            self.chan.sock.sendall(b"".join(self.held))
            self.held, self.held_until = [], None

    def alarm_at(self):
        """When a running check must be interrupted for the others (None: never)."""
        at = self.held_until
        if self.queue and (at is None or self.queue[0][0] + GIVE_BACK < at):
            at = self.queue[0][0] + GIVE_BACK
        return at

    def ring(self, now):
        """The alarm, while a check runs: held results sent, the late jobs given back
        (after what is held: the master knows then which of their checks still run)."""
        late = []
        while self.queue and self.queue[0][0] + GIVE_BACK <= now:
            late.append(heapq.heappop(self.queue)[2].id)
        if late or (self.held_until is not None and now >= self.held_until):
            self.flush()
        if late:
            self.chan.send({"t": "back", "jobs": late})
        self.at = self.alarm_at()


def worker_main(sock_path, config_dir, slot=None):
    """A pre-forked check worker: hello, then the jobs it is handed until told to go."""
    child_setup()
    os.chdir(config_dir)
    chan = Channel.connect(sock_path)
    chan.send({"t": "hello", "role": "worker", "pid": os.getpid()})
    return Worker(chan, slot).serve()


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
