"""Running a process: its own session, bounded output, deadline, group kill.

Owns run_process (what a worker does to run a check and an action run to run a
command): a new session, stdout and stderr read up to OUTPUT_CAP, a deadline then
SIGTERM, a grace then SIGKILL of the whole group; the pid shared with the master
so a dead worker's check is killed too (ChildWatch, CommandLease).

Uses: base.
"""

import _signal
import dataclasses
import os
import select
import signal
import socket
import time
import typing

from .base import (
    OUTPUT_CAP, QUIET_WAIT, decode_wait_status, format_duration, killpg_quietly, signal_name,
)


class _Terminate(BaseException):
    """Raised in a worker or action run by SIGTERM, so cleanup runs on the way out."""


class _Orphaned(BaseException):
    """The master went away: stop what we run and leave."""


@dataclasses.dataclass
class ProcResult:
    exit_code: typing.Optional[int] = None
    signal: typing.Optional[int] = None
    output: bytes = b""
    stderr: bytes = b""
    truncated: bool = False
    timed_out: bool = False
    error: typing.Optional[str] = None
    duration: float = 0.0
    late: bool = False              # not started: past its ``not_after``

    def failure(self, timeout):
        """Why this run failed, or None when it exited 0."""
        if self.error:
            return self.error
        if self.timed_out:
            return "timed out after %s" % format_duration(timeout)
        if self.signal:
            return "killed by %s" % signal_name(self.signal)
        if self.exit_code:
            return "exit %d" % self.exit_code
        return None


class ChildWatch:
    """SIGCHLD turned into a readable pipe, so a wait on output also wakes on exit."""

    def __init__(self):
        self.rfd, wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        os.set_blocking(wfd, False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        self.kept = (None, None)        # (master's fd, a poll of it and of rfd): poller()

    def poller(self, master):
        """A poll of our pipe and of ``master`` (a socket, or None), kept for the next
        process: a worker's is the same every check."""
        fd = None if master is None else master.fileno()
        if self.kept[0] != fd or self.kept[1] is None:
            poller = select.poll()
            poller.register(self.rfd, select.POLLIN)
            if fd is not None:
                poller.register(fd, select.POLLIN)
            self.kept = (fd, poller)
        return self.kept[1]

    def drain(self):
        try:
            while len(os.read(self.rfd, 512)) == 512:      # a short read emptied it
                pass
        except BlockingIOError:
            pass


def _select_read(fds, timeout):
    try:
        readable, _, _ = select.select(fds, [], [], timeout)
    except InterruptedError:
        return []
    return readable


def _read_pipe(fd, buf, result, to_eof):
    """Read what the pipe ``fd`` holds into ``buf`` (kept up to OUTPUT_CAP); False at EOF.

    With ``to_eof`` its writers are gone, so no read can block: read it to the end,
    which a short read is (what is left of a pipe without writers comes in one read).
    """
    while True:
        data = os.read(fd, 65536)
        if not data:
            return False
        room = OUTPUT_CAP - len(buf)
        if len(data) > room:
            result.truncated = True
        buf += data[:max(0, room)]
        if not to_eof:
            return True
        if len(data) < 65536:
            return False


_SIGTERM_ONLY = (signal.SIGTERM,)


def run_process(argv, env, timeout, grace, watch, stdin_path=None, merge_stderr=False,
                master=None, on_spawn=None, not_after=None, lease=None, stdin_fd=None, alarm=None):
    """Run ``argv`` in a session of its own and collect its output (cut at OUTPUT_CAP).

    At ``timeout`` the group gets SIGTERM (SIGKILL at once when ``grace`` is 0) and
    SIGKILL ``grace`` seconds later.  When the process exits, whatever is left of
    its group is killed, so nothing it forked outlives it.  If the ``master``
    socket reads EOF the master is gone: the group is killed and _Orphaned raised.
    ``on_spawn(pid)`` is called once the process (and its group, of the same id) exists.
    Past ``not_after`` (monotonic) it is not started at all: ``result.error`` says so.
    A ``lease`` (CommandLease) ends it by its own deadlines, which the master moves on.
    Its stdin is ``stdin_fd`` when given (a notify command's event), else ``stdin_path``.
    An ``alarm`` (a worker's: its ``at``, monotonic or None) is rung (``ring(now)``) at
    its time while the process runs, and reads what the master sends (``hear()``).
    """
    started = time.monotonic()
    if not_after is not None and started >= not_after:
        return ProcResult(error="not started: the leader's time to start commands ran out", late=True)
    out_r, out_w = os.pipe()
    err_r, err_w = (None, out_w) if merge_stderr else os.pipe()
    stdin = (os.POSIX_SPAWN_DUP2, stdin_fd, 0) if stdin_fd is not None else \
        (os.POSIX_SPAWN_OPEN, 0, stdin_path or os.devnull, os.O_RDONLY, 0)
    actions = [stdin, (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)]
    # A SIGTERM (our _Terminate) landing between the spawn and the ``try`` below
    # would leave the new session running unwatched: hold it off until then.
    # (_signal's own: signal's wrapper makes an enum of each signal in the set it returns.)
    old_mask = _signal.pthread_sigmask(signal.SIG_BLOCK, _SIGTERM_ONLY)
    try:
        pid = os.posix_spawn(argv[0], list(argv), env, file_actions=actions, setsid=True,
                             setsigdef=(signal.SIGPIPE, signal.SIGXFSZ), setsigmask=())
    except OSError as exc:
        _signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        for fd in {out_r, out_w, err_r, err_w} - {None}:
            os.close(fd)
        return ProcResult(error="cannot start %s: %s" % (argv[0], exc.strerror or exc),
                          duration=time.monotonic() - started)
    for fd in {out_w, err_w}:
        os.close(fd)
    watched = _Watched(pid, [fd for fd in (out_r, err_r) if fd is not None], started, timeout,
                       grace, watch, master, lease, alarm)
    try:
        _signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if on_spawn is not None:
            on_spawn(pid)
        watched.wait()
    except BaseException:
        killpg_quietly(pid, signal.SIGKILL)
        if watched.status is None:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        raise
    finally:
        for fd in watched.collected:
            os.close(fd)
    result = watched.result
    result.exit_code, result.signal = decode_wait_status(watched.status)
    result.output = bytes(watched.collected[out_r])
    if err_r is not None:
        result.stderr = bytes(watched.collected[err_r])
    return result


class CommandLease:
    """The deadlines of an action command run by a cluster's leader, kept by the action
    run itself: SIGTERM at ``until``, SIGKILL at ``kill_at`` (both by the leader's lease
    clock), unless the master moves them on as it renews its lease.  So a command
    ends in time even when its master is frozen (SIGSTOP) or stuck.

    ``read`` takes what the master sent on ``chan``: {t: lease} moves the deadlines,
    anything else waits in ``chan.pending``."""

    def __init__(self, chan, until, kill_at):
        self.chan, self.until, self.kill_at = chan, until, kill_at
        self.termed = self.killed = False

    def read(self):
        data = self.chan.sock.recv(65536)
        if not data:
            raise _Orphaned()
        for msg in self.chan.reader.feed(data):
            if msg.get("t") == "lease":
                self.until = max(self.until, msg["until"])
                self.kill_at = max(self.kill_at, msg["kill_at"])
            else:
                self.chan.pending.append(msg)

    def next_deadline(self):
        return self.kill_at if self.termed else self.until

    def keep(self, pgid, now):
        if now >= self.until and not self.termed:
            self.termed = True
            killpg_quietly(pgid, signal.SIGTERM)
        if now >= self.kill_at and not self.killed:
            self.killed = True
            killpg_quietly(pgid, signal.SIGKILL)


class _Watched:
    """A spawned process being waited for: its pipes read, its deadlines kept.

    Until ``quiet_until`` only the process's exit (SIGCHLD) wakes us, then its pipes
    are read to the end: a quick process costs one wake-up, not one per write or
    close (_quick, the usual check's whole wait).  One still running by then has its
    output read as it comes, so one that writes more than a pipe holds is never
    blocked for long.
    """

    def __init__(self, pid, fds, started, timeout, grace, watch, master, lease=None, alarm=None):
        self.pid, self.started, self.grace, self.watch, self.master = pid, started, grace, watch, master
        self.lease, self.alarm = lease, alarm
        self.result = ProcResult()
        self.collected = {fd: bytearray() for fd in fds}
        self.reading = set(fds)
        self.status = None
        self.deadline = started + timeout
        self.kill_at = self.drain_until = None
        self.quiet_until = started + QUIET_WAIT
        self.poller = None

    def wait(self):
        if self.lease is None and self._quick():
            return
        self.poller = select.poll()
        self.poller.register(self.watch.rfd, select.POLLIN)
        if self.master is not None:
            self.poller.register(self.master, select.POLLIN)
        look = False            # call waitpid: a SIGCHLD came, a timer ran out or the pipes closed
        while True:
            if self.status is None and look:
                self._collect_exit()
            now = time.monotonic()
            if self.status is not None and (not self.reading or now >= self.drain_until):
                return
            self._keep_deadlines(now)
            try:
                events = self.poller.poll(max(0.0, self._wait_time(now)) * 1000)
            except InterruptedError:
                events = []
            look = self._handle(events) or not events

    def _quick(self):
        """The usual process, cheaply: its exit is the first thing to come, within the
        quiet time (no message of the master, no alarm, no deadline before it), and its
        pipes are at their end then.  One sleep, one look at the pipes; True when it is
        all done.  False when anything else came first: wait() goes on from there, and
        what was read stays read."""
        until = min(self.quiet_until, self.deadline)
        alarm = self.alarm
        if alarm is not None and alarm.at is not None and alarm.at < until:
            until = alarm.at
        try:
            events = self.watch.poller(self.master).poll(max(0.0, until - time.monotonic()) * 1000)
        except InterruptedError:
            return False
        if len(events) != 1 or events[0][0] != self.watch.rfd:
            return False        # nothing came in time, or the master spoke as well
        self.watch.drain()
        self._collect_exit()
        if self.status is None:
            return False
        pipes = select.poll()
        for fd in self.reading:
            pipes.register(fd, select.POLLIN)
        for fd, mask in pipes.poll(0):
            if mask & select.POLLHUP:           # no writer is left: read it to its end
                _read_pipe(fd, self.collected[fd], self.result, to_eof=True)
                self.reading.discard(fd)
        return not self.reading     # else a leftover of the group holds one: wait() drains it

    def _collect_exit(self):
        wpid, wstatus = os.waitpid(self.pid, os.WNOHANG)
        if wpid:
            self.status = wstatus
            self.result.duration = time.monotonic() - self.started
            killpg_quietly(self.pid, signal.SIGKILL)     # leftovers of its group
            self.drain_until = time.monotonic() + 0.5

    def _keep_deadlines(self, now):
        if self.quiet_until is not None and (self.status is not None or now >= self.quiet_until):
            self.quiet_until = None
            for fd in self.reading:
                self.poller.register(fd, select.POLLIN)
        if self.status is None and not self.result.timed_out and now >= self.deadline:
            self.result.timed_out = True
            killpg_quietly(self.pid, signal.SIGTERM if self.grace else signal.SIGKILL)
            self.kill_at = now + self.grace if self.grace else None
        if self.kill_at is not None and now >= self.kill_at:
            killpg_quietly(self.pid, signal.SIGKILL)
            self.kill_at = None
        if self.lease is not None and self.status is None:
            self.lease.keep(self.pid, now)
        if self.alarm is not None and self.alarm.at is not None and now >= self.alarm.at:
            self.alarm.ring(now)

    def _wait_time(self, now):
        if self.status is not None:
            wait = self.drain_until - now
        elif self.kill_at is not None:
            wait = self.kill_at - now
        elif self.result.timed_out:
            wait = 1.0
        else:
            wait = self.deadline - now
        if self.quiet_until is not None:
            wait = min(wait, self.quiet_until - now)
        if self.lease is not None and self.status is None:
            wait = min(wait, self.lease.next_deadline() - now)
        if self.alarm is not None and self.alarm.at is not None:
            wait = min(wait, self.alarm.at - now)
        return wait

    def _handle(self, events):
        """Read what the poll found; True when waitpid should look (an exit, or EOF on all)."""
        look = False
        for fd, mask in events:
            if fd == self.watch.rfd:
                self.watch.drain()
                look = True
            elif fd in self.reading:
                if not _read_pipe(fd, self.collected[fd], self.result, to_eof=mask & select.POLLHUP):
                    self.poller.unregister(fd)
                    self.reading.discard(fd)
                    look = look or not self.reading
            elif self.master is not None and fd == self.master.fileno():
                if self.lease is not None:
                    self.lease.read()           # the master moves the deadlines on
                    continue
                if self.alarm is not None:
                    self.alarm.hear()           # a worker takes its new jobs (EOF: _Orphaned)
                    continue
                if not self.master.recv(1, socket.MSG_PEEK):
                    raise _Orphaned()
                self.poller.unregister(fd)       # a message waits; it is read later
        return look
