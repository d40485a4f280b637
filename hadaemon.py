#!/usr/bin/env python3
"""hadaemon: watch a master / hot-standby pair and run ordered actions on a role change.

One self-contained file, the standard library only, Python 3.8 or newer.  Copy the
folder that holds it to a host and run ``python3 hadaemon.py --start``.

Developed as the modules of the package src/hadaemon/, one job each; the shipped
hadaemon.py is made from them by tools/amalgamate.py (docs/HACKING.md).

Process model
-------------
master      one thread, one ``selectors`` loop over the UNIX socket, its client
            connections and a self-pipe fed by ``signal.set_wakeup_fd``.  It owns
            the state db alone, schedules checks, applies reports (docs/configuration.md) and
            queues action runs.  Every pass of the loop reaps children, fires due
            timers and keeps the worker pool full, so a lost signal never matters.
            Its parts, each a class of its own: the Ledger (states, transitions,
            runs, the queue), the Scheduler (when checks run), the Pool (every
            forked child), the ControlServer (the socket), the HttpServer (the
            status page, JSON, load-balancer checks and metrics, when ``http`` is
            set: its connections in the same loop), ActionRuns (the queue's head
            to the action run) and Reload (a config read in steps); the Master
            wires them.
worker      ``workers`` processes forked up front.  Each connects to the socket,
            says hello, then runs one check at a time as the master hands them out:
            the check gets its own session (process group), its output is parsed
            into a dict and sent back as one JSON line.
action run  one forked child per action sequence, at most one at a time.  It is
            forked ahead of need and waits, connected, for its sequence (so a
            transition's first command starts without a fork on the way); it runs
            the (already expanded) commands serially, reports each start and end
            over the socket, and exits.  The master records them.
            A worker keeps the pid of the check it runs in a page it shares with
            the master, an action run sends the pid of each command it starts: if
            either dies (SIGKILL, OOM) the master kills that process group.
            In a cluster's leader it asks the master before each command and
            keeps its command's deadlines by the leader's lease clock itself.
cluster     with ``[cluster]`` (docs/cluster.md): one forked agent that makes every etcd
agent       call (lease, campaign, guarded ledger writes, a watch of the cluster's
            keys) on the master's request, so a call etcd never answers blocks
            nothing but the next etcd call.  The master decides; the agent only
            talks.  It leaves when the master goes (the lease then expires).

Modules (src/hadaemon/, in the order of hadaemon.py: each uses only those above it)
---------------------------------------------------------------------------------
base.py            Constants, errors and small utilities: durations, names, fds, the pid
                   lock, logging.
cron.py            Cron: the five fields of a schedule (``cron = */5 * * * *``), read as
                   cron(8) does.
config.py          The configuration's records and its grammar.
netsettings.py     The network settings of the config: the HTTP address, token and TLS
                   files, the [cluster] keys.
configfiles.py     checks.conf and actions.conf, read whole into one Config, every
                   problem as FILE:LINE.
wire.py            Wire protocol and check output: what crosses the UNIX socket, and
                   what a check prints.
records.py         Typed records: what crosses the socket, what the ledger keeps and
                   what --status --json says.
dumbfiles.py       dbm.dumb's two files (.dat and .dir), read and written in dbm.dumb's
                   own format.
store.py           State store: dbm.dumb with a write-ahead journal.
proc.py            Running a process: its own session, bounded output, deadline, group
                   kill.
children.py        What the forked children run: the check worker and the action run.
ssh.py             Remote checks: the ssh: scope.
ledger_store.py    Ledger stores: where the ledger's decisions are kept, and the local
                   one.
switchover.py      Switchover: the planned move of a role from one host to another (SPEC
                   §12).
ledger.py          Ledger: host states, transitions, action runs and their queue
                   (docs/configuration.md).
scheduler.py       Scheduler: when each check runs, and what it last said.
pool.py            Pool: every forked child of the master.
control.py         Control server: the daemon's UNIX socket and everyone on it.
checkflow.py       Check flow: due checks handed to the workers, their results to the
                   ledger.
http_proto.py      HTTP/1.1 on the wire: requests read, answers written, the token
                   checked.
http_views.py      The HTTP answers: pure functions of the status document (JSON, the
                   page, metrics).
http_server.py     The HTTP server: a part of the master's loop, its connections and
                   their budget.
etcd.py            etcd: a v3 client on its JSON gateway (docs/cluster.md).
cluster_agent.py   Cluster agent: the process that talks to etcd.
cluster_member.py  Cluster member: the lease by our own clock, the leader, the views
                   (docs/cluster.md).
cluster_ledger.py  Cluster ledger: EtcdStore, the ledger kept in etcd, written by the
                   leader alone (docs/cluster.md).
cluster_link.py    The cluster as a part of the master: agent, member and the ledger's
                   etcd store wired together.
actions.py         Action runs: the queue's head, handed to the action run, and what it
                   says back.
reload.py          Reload: a new configuration, read in steps between the loop's other
                   work.
notify_queue.py    Notify queue: the events waiting for their delivery, kept in the
                   state db (docs/notify.md).
notify.py          Notifications: events made, stored, and delivered one at a time by a
                   child (docs/notify.md).
master.py          Master: the loop, signals, readiness and shutdown.
whatif.py          What if: --simulate (docs/operating.md): the section and the commands
                   a transition would run.
client.py          Control client: --status, --stop, --reload, --history.
opsclient.py       Operations from the command line: --switchover, --pause and --resume
                   (all, or some hosts).
checkcmd.py        --check-config (-t): the config read whole, then what a valid config
                   may still get wrong.
starter.py         --init DIR: a commented starter config, written from this code (a pip
                   install has no other).
cli.py             Command line: argparse, the commands, the relaunch, main().

Signals (master)
----------------
SIGHUP      re-read both config files; an invalid config is refused, the old kept
SIGTERM     graceful stop (SIGINT too): no new checks, the running sequence may
            finish within its timeout, workers end, pid file and socket removed;
            a cluster's leader steps down (its command ended) and resigns
SIGUSR1     reopen the log file (logrotate)
SIGCHLD     only wakes the loop; reaping is level-triggered

Files (in the state dir, default CONFIGDIR/var, or /var/lib/hadaemon; mode 0700)
-----------------------------------------------------------
hadaemon.pid       pid of the master; its flock is the one-daemon-per-state-dir lock
hadaemon.sock      the UNIX socket (mode 0600; peers of another uid are refused)
state.db.dat/.dir  the state db (``dbm.dumb``; values are JSON)
state.db.journal   the write-ahead journal that makes the db survive kill -9
hadaemon.log       the log, when daemonized with no ``log`` setting

Exit codes
----------
0 ok   1 failure or invalid config   2 usage   3 not running (``--status``, ``--rerun``)
"""

# Made by tools/amalgamate.py from src/hadaemon/: change the modules, then run it.
# Each part below names its source file, so a line here leads back to its module.

import _signal
import argparse
import base64
import collections
import dataclasses
import datetime
import errno
import fcntl
import functools
import gc
import hashlib
import heapq
import ipaddress
import itertools
import json
import logging
import mmap
import operator
import os
import queue
import re
import resource
import select
import selectors
import shlex
import shutil
import signal
import socket
import stat
import struct
import sys
import tempfile
import threading
import time
import typing
import urllib.parse


# ============================================================================
# base.py: Constants, errors and small utilities: durations, names, fds, the
# pid lock, logging.
# ============================================================================
#
# Owns the exit codes, the file names of the state dir, the limits every part shares,
# the error hierarchy (HadaemonError, ConfigError, ProtocolError), the helpers every
# process needs (close inherited fds, reset signals, decode a wait status, kill a
# process group), the pid file and its lock, and the logger ``log``.
#
# Uses: the standard library only.

__version__ = "0.1.0"


# -- Constants and exit codes ------------------------------------------------------------

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3

PID_FILE = "hadaemon.pid"
SOCK_FILE = "hadaemon.sock"
DB_NAME = "state.db"
LOG_FILE = "hadaemon.log"
SYSTEM_CONFIG_DIR = "/etc/hadaemon"     # an installed hadaemon's config dir, by default
SYSTEM_STATE_DIR = "/var/lib/hadaemon"  # ... and its state dir
SYSLOG_SOCKET = "/dev/log"      # log = syslog; UDP to localhost:514 where it does not exist

OUTPUT_CAP = 64 * 1024          # bytes of check / action output kept
MAX_MESSAGE = 4 * 1024 * 1024   # longest JSON line the socket accepts
ANSWER_MAX = 1 << 28            # longest answer of the daemon a control client reads
CLIENT_IDLE = 10.0              # seconds a connection may sit on half a message
ACTION_KILL_GRACE = 5.0         # SIGTERM -> SIGKILL for an action command
QUIET_WAIT = 0.05               # output of a process that ends by then is read at its exit
WORKER_HANG_GRACE = 10.0        # a busy worker silent this long past its check's timeout is hung
CHECKPOINT_EVERY = 2.0          # seconds between state db checkpoints
CONFIG_STEP = 50                # lines (or checks) a reading of the config does between yields
ANSWER_STEP = 50                # hosts or checks of a --status answer made between yields
ANSWER_SLICE = 0.002            # seconds a pass of the loop gives to answers and reloads in steps
ANSWER_BUFFER = 1 << 20         # bytes of an answer waiting for its reader before no more are made
MAX_WORKERS = 256
MAX_WINDOW = 100                # confirm = N of M: M at most this (the reports a host record keeps)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*\Z")
EXIT_STATES = {0: "up", 1: "warning", 2: "down"}

DAEMON_DEFAULTS = {
    "interval": 10.0,
    "timeout": 5.0,
    "confirm": 1,
    "recheck": None,      # a pending candidate's check runs again this soon: off unless set
    "workers": 2,
    "action_timeout": 60.0,
    "log": None,          # None: stderr in the foreground, var/hadaemon.log daemonized
    "history": 1000,
    "ssh_identity": None,
    "ssh_options": (),
    "connect_timeout": 5.0,
    "http": None,         # the status page, JSON and metrics: off unless set (docs/http.md)
    "http_token": None,
    "http_cert": None,
    "notify": None,       # the command each event runs (SPEC §12, docs/notify.md): off unless set
    "notify_timeout": 10.0,
    "switchover_role": "master",        # SPEC §12: the state a switchover moves
    "switchover_candidate": "slave",    # ... the state its target must be in
    "switchover_settle": 30.0,          # ... how long after its run its own transitions are expected
    "stop_timeout": None,  # what a stop may take (systemd's TimeoutStopSec): -t warns past it
}
GROUP_KEYS = {"interval", "cron", "timeout", "confirm", "recheck", "host"}
SSH_KEYS = {"ssh_identity", "ssh_options", "connect_timeout"}
DAEMON_KEYS = set(DAEMON_DEFAULTS)
SECTION_KEYS = {"timeout"}
CLUSTER_KEYS = {"etcd", "name", "node", "ttl", "quorum", "etcd_ca", "etcd_cert", "etcd_key"}
CLUSTER_TTL = 5                 # seconds of the leader lease when [cluster] sets no ttl
ETCD_PORT = 2379                # an etcd URL without a port


# -- Errors ------------------------------------------------------------------------------

class HadaemonError(Exception):
    """The root of every error hadaemon raises on purpose."""


class ConfigError(HadaemonError):
    """A configuration with one or more problems; ``errors`` holds every FILE:LINE line."""

    def __init__(self, errors):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class ProtocolError(HadaemonError):
    """A peer broke the wire protocol; the connection is closed, nothing else."""


# -- Small utilities: durations, names, fds, lock, logging -------------------------------

_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*\Z")
_DURATION_UNITS = {None: 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "h": 3600.0}
_DURATION_MAX = 365 * 86400.0   # longer is a typo; select() overflows near 1e10 s, inf breaks the heap


def parse_duration(text):
    """``250ms``, ``5s``, ``1.5s``, ``2m``, ``1h`` or bare seconds -> float seconds > 0."""
    m = _DURATION_RE.match(str(text))
    if not m:
        raise ValueError("not a duration: %r (say 250ms, 5s, 2m, 1h)" % (text,))
    value = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if value <= 0:
        raise ValueError("duration must be more than zero: %r" % (text,))
    if value > _DURATION_MAX:
        raise ValueError("duration longer than a year: %r" % (text,))
    return value


def format_duration(seconds):
    """A short human form: 250ms, 5s, 1.5s, 2m, 1h."""
    if seconds < 1:
        return "%dms" % round(seconds * 1000)
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return "%d%s" % (seconds // size, unit)
    return ("%.3f" % seconds).rstrip("0").rstrip(".") + "s"


def format_ago(then, now=None):
    """``3s ago`` / ``in 4s`` for a wall-clock time."""
    if not then:
        return "-"
    delta = (time.time() if now is None else now) - then
    word = "ago" if delta >= 0 else ""
    delta = abs(delta)
    if delta < 1:
        text = "%dms" % (delta * 1000)
    elif delta < 120:
        text = "%ds" % delta
    elif delta < 7200:
        text = "%dm" % (delta // 60)
    elif delta < 172800:
        text = "%dh" % (delta // 3600)
    else:
        text = "%dd" % (delta // 86400)
    return ("%s %s" % (text, word)) if word else ("in " + text)


def format_time(then):
    if not then:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(then))


def valid_name(name):
    """A host or state name as a check may report it (docs/configuration.md)."""
    return isinstance(name, str) and NAME_RE.match(name) is not None


def valid_state(state):
    return valid_name(state) and "_to_" not in state.lower()


def open_fds():
    """The fds this process holds (from /proc, so it costs nothing with a huge ulimit)."""
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(0, 1024))


def close_inherited(keep=()):
    """In a fresh child: close every fd above stderr except ``keep``."""
    for fd in open_fds():
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


_CHILD_NOFILE = None    # the soft limit of open files the daemon was started with


def raise_open_files_limit():
    """Lift the soft limit of open files to the hard one (at most 65536): every client
    is an fd, and 1024 (systemd's default) is soon reached.  What the daemon runs gets
    the old limit back (``child_setup``)."""
    global _CHILD_NOFILE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            _CHILD_NOFILE = soft
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the limit of open files from %d: %s", soft, exc)


def restore_open_files_limit():
    """In a forked child: the limit of open files the daemon was started with."""
    if _CHILD_NOFILE is not None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (_CHILD_NOFILE, hard))


def settle_heap(collect=True):
    """Move the objects that live as long as a configuration (checks, groups, runtimes,
    the state db's values) out of the garbage collector's sight (gc.freeze, which
    costs nothing): with ten thousand checks, a full collection walking them all held
    the loop up for a hundred milliseconds.  At start-up (after a collection) and
    after a reload; what becomes garbage later is freed by its reference count, as
    before (none of it forms cycles)."""
    if collect:
        gc.collect()
    gc.freeze()


def run_steps(steps):
    """Run a generator made to go in steps (it yields between them) to its end, at once;
    what it returns."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def reset_child_signals():
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1,
                signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass


def decode_wait_status(status):
    """(exit code or None, signal number or None) from a waitpid status."""
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), None
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    return None, None


def signal_name(signum):
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "signal %d" % signum


def killpg_quietly(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def peer_credentials(sock):
    """(pid, uid, gid) of the process at the other end of a UNIX socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


def ensure_state_dir(path):
    """Create the state dir 0700, or refuse one that others can write into."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise HadaemonError("cannot create state dir %s: %s" % (path, exc.strerror))
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise HadaemonError("state dir %s belongs to uid %d, not to us (uid %d)"
                            % (path, st.st_uid, os.getuid()))
    if st.st_mode & 0o077:
        raise HadaemonError("state dir %s has mode %04o: it must not be open to group or "
                            "others (chmod 700 %s)" % (path, stat.S_IMODE(st.st_mode), path))


class PidLock:
    """The pid file with an flock on it: the lock, not the file, says a daemon runs."""

    def __init__(self, state_dir):
        self.path = os.path.join(state_dir, PID_FILE)
        self.fd = None

    def acquire(self):
        """Take the lock; False when another process holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def write_pid(self):
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, b"%d\n" % os.getpid(), 0)

    def release(self, remove=True):
        if self.fd is None:
            return
        if remove:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        os.close(self.fd)
        self.fd = None

    @staticmethod
    def holder(state_dir):
        """The pid of the daemon holding the lock on ``state_dir``, or None."""
        path = os.path.join(state_dir, PID_FILE)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)


log = logging.getLogger("hadaemon")


class _Formatter(logging.Formatter):
    def __init__(self, with_time=True):
        fmt = "%(asctime)s %(levelname)s %(message)s" if with_time else "%(levelname)s %(message)s"
        super().__init__(fmt, "%Y-%m-%d %H:%M:%S")


def setup_logging(target, state_dir, debug=False):
    """Point the ``hadaemon`` logger at stderr, syslog or a file (reopened on demand)."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    if target in (None, "stderr"):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter())
    elif target == "syslog":
        from logging import handlers    # only here: 1 MB of modules a daemon on stderr does without
        address = SYSLOG_SOCKET if os.path.exists(SYSLOG_SOCKET) else ("localhost", 514)
        handler = handlers.SysLogHandler(address, facility="daemon")
        handler.ident = "hadaemon[%d]: " % os.getpid()
        handler.setFormatter(_Formatter(with_time=False))
    else:
        from logging import handlers
        path = target if os.path.isabs(target) else os.path.join(state_dir, target)
        handler = handlers.WatchedFileHandler(path)
        handler.setFormatter(_Formatter())
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False


def reopen_log():
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                if handler.stream:
                    handler.stream.close()
                handler.stream = handler._open()
            finally:
                handler.release()


# ============================================================================
# cron.py: Cron: the five fields of a schedule (``cron = */5 * * * *``), read
# as cron(8) does.
# ============================================================================
#
# Owns CronSpec: parse once, then the next matching minute after a wall-clock time.
#
# Uses: the standard library only.

_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
_DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]


class CronSpec:
    """Five cron fields (minute hour day-of-month month day-of-week), read as cron(8) does.

    As in cron, when both day fields are restricted a day matches if either does.
    """

    _FIELDS = (("minute", 0, 59, None), ("hour", 0, 23, None), ("day of month", 1, 31, None),
               ("month", 1, 12, _MONTHS), ("day of week", 0, 7, _DAYS))

    def __init__(self, text):
        self.text = " ".join(str(text).split())
        fields = self.text.split()
        if len(fields) != 5:
            raise ValueError("cron needs 5 fields (minute hour day month weekday), got %d in %r"
                             % (len(fields), text))
        sets = []
        for field, (what, low, high, names) in zip(fields, self._FIELDS):
            sets.append(self._parse_field(field, what, low, high, names))
        self.minutes, self.hours, self.days, self.months, weekdays = sets
        self.weekdays = {d % 7 for d in weekdays}
        self.days_star = fields[2].startswith("*")
        self.weekdays_star = fields[4].startswith("*")
        import datetime                 # here: a daemon without cron checks does without it
        if self.next_after(datetime.datetime(2000, 1, 1)) is None:
            raise ValueError("cron %r never matches a real date" % self.text)

    @staticmethod
    def _parse_field(field, what, low, high, names):
        def number(token):
            token = token.lower()
            if names and token[:3] in names and token.isalpha():
                return names.index(token[:3]) + (1 if what == "month" else 0)
            if not token.isdigit():
                raise ValueError("bad %s %r in cron" % (what, token))
            value = int(token)
            if not low <= value <= high:
                raise ValueError("%s %d out of range %d-%d in cron" % (what, value, low, high))
            return value

        values = set()
        for part in field.split(","):
            rng, slash, step = part.partition("/")
            if slash:
                if not step.isdigit() or int(step) < 1:
                    raise ValueError("bad step %r in cron %s field" % (step, what))
            if rng == "*":
                start, end = low, high
            elif "-" in rng:
                a, _, b = rng.partition("-")
                start, end = number(a), number(b)
                if start > end:
                    raise ValueError("backwards range %r in cron %s field" % (rng, what))
            else:
                start = number(rng)
                end = high if step else start
            values.update(range(start, end + 1, int(step) if step else 1))
        return values

    def _day_matches(self, dt):
        dom = dt.day in self.days
        dow = (dt.isoweekday() % 7) in self.weekdays
        if self.days_star or self.weekdays_star:
            return dom and dow
        return dom or dow

    def matches(self, dt):
        return (dt.minute in self.minutes and dt.hour in self.hours
                and dt.month in self.months and self._day_matches(dt))

    def next_after(self, dt):
        """The first matching minute strictly after ``dt`` (naive local time), or None."""
        import datetime
        dt = dt.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1)
        limit = dt + datetime.timedelta(days=366 * 8)
        while dt < limit:
            if dt.month not in self.months:
                dt = (dt.replace(day=1) + datetime.timedelta(days=32)).replace(day=1, hour=0, minute=0)
            elif not self._day_matches(dt):
                dt = (dt + datetime.timedelta(days=1)).replace(hour=0, minute=0)
            elif dt.hour not in self.hours:
                dt = (dt + datetime.timedelta(hours=1)).replace(minute=0)
            elif dt.minute not in self.minutes:
                dt += datetime.timedelta(minutes=1)
            else:
                return dt
        return None

    def __repr__(self):
        return "CronSpec(%r)" % self.text


# ============================================================================
# config.py: The configuration's records and its grammar.
# ============================================================================
#
# Owns the frozen records a Config is made of (DaemonSettings, Group, Check, Section,
# ClusterSettings, HttpAddress) and the reading of a line: ini sections and
# ``key = value`` settings, shell-like words, scopes (``[local]``, ``[ssh:...]``),
# commands resolved to checks/ or actions/ or the PATH.  No file is read whole
# here: configfiles does that.
#
# Uses: base, cron.

@dataclasses.dataclass(frozen=True)
class Scope:
    """Where a group's checks run: ``local`` or ``ssh:[USER@]HOST[:PORT]``."""
    name: str
    kind: str = "local"
    user: typing.Optional[str] = None
    host: typing.Optional[str] = None
    port: typing.Optional[int] = None


@dataclasses.dataclass(frozen=True)
class HttpAddress:
    """Where the HTTP server listens (docs/http.md): an IP address and a port."""
    host: str           # normalised: 127.0.0.1, ::1, 0.0.0.0, ::
    port: int
    text: str           # as written in checks.conf, for messages

    @property
    def family(self):
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def loopback(self):
        return ipaddress.ip_address(self.host).is_loopback

    def url(self, tls=False):
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s://%s:%d/" % ("https" if tls else "http", host, self.port)


@dataclasses.dataclass
class DaemonSettings:
    interval: float = DAEMON_DEFAULTS["interval"]
    timeout: float = DAEMON_DEFAULTS["timeout"]
    confirm: int = DAEMON_DEFAULTS["confirm"]
    recheck: typing.Optional[float] = DAEMON_DEFAULTS["recheck"]
    confirm_of: typing.Optional[int] = None     # confirm = N of M: M (None: N of N)
    workers: int = DAEMON_DEFAULTS["workers"]
    action_timeout: float = DAEMON_DEFAULTS["action_timeout"]
    log: typing.Optional[str] = None
    history: int = DAEMON_DEFAULTS["history"]
    ssh_identity: typing.Optional[str] = None
    ssh_options: tuple = ()
    connect_timeout: float = DAEMON_DEFAULTS["connect_timeout"]
    http: typing.Optional[HttpAddress] = None
    # The token itself, read from the file the setting names; kept out of every repr.
    http_token: typing.Optional[str] = dataclasses.field(default=None, repr=False)
    http_cert: typing.Optional[str] = None      # absolute path of the PEM (certificate and key)
    notify: typing.Optional[tuple] = None       # argv, argv[0] resolved as an action command's
    notify_timeout: float = DAEMON_DEFAULTS["notify_timeout"]
    switchover_role: str = DAEMON_DEFAULTS["switchover_role"]
    switchover_candidate: str = DAEMON_DEFAULTS["switchover_candidate"]
    switchover_settle: float = DAEMON_DEFAULTS["switchover_settle"]
    stop_timeout: typing.Optional[float] = None  # the supervisor's stop budget: -t warns past it


@dataclasses.dataclass
class Group:
    scope: Scope
    where: str
    interval: float
    cron: typing.Optional[CronSpec]
    timeout: float
    confirm: int
    host: typing.Optional[str]
    ssh_identity: typing.Optional[str] = None
    ssh_options: tuple = ()
    connect_timeout: float = 5.0
    recheck: typing.Optional[float] = None      # interval groups only (configfiles)
    confirm_of: typing.Optional[int] = None     # confirm = N of M: M (None: N of N)

    @property
    def window(self):
        """The M of ``confirm = N of M``: how many of the last reports count (N of N: N)."""
        return self.confirm_of or self.confirm


@dataclasses.dataclass
class Check:
    key: str            # "scope|host|name": unique, stable across reloads
    name: str           # the line, whitespace-normalised
    argv: tuple         # argv[0] resolved to a path
    host: str           # the host a report is about unless it says otherwise
    group: Group
    where: str          # FILE:LINE


@dataclasses.dataclass
class Command:
    argv: tuple         # words as written, argv[0] resolved; variables expanded at run time
    ignore: bool        # a leading "-": its failure does not stop the sequence
    where: str


@dataclasses.dataclass
class Section:
    host: typing.Optional[str]
    from_state: str
    to_state: str
    commands: list
    timeout: float
    where: str

    @property
    def name(self):
        return section_name(self.host, self.from_state, self.to_state)


SWITCHOVER = "switchover"       # [switchover] / [TO: switchover]: from_state None, to_state this


def section_name(host, from_state, to_state):
    """``FROM_to_TO`` or ``HOST: FROM_to_TO`` (``switchover``, ``HOST: switchover``), as the
    section is written (without brackets)."""
    tr = to_state if from_state is None else "%s_to_%s" % (from_state, to_state)
    return "%s: %s" % (host, tr) if host else tr


@dataclasses.dataclass(frozen=True)
class ClusterSettings:
    """The [cluster] section of docs/cluster.md: this daemon is one member of NAME on etcd."""
    etcd: tuple             # endpoint URLs, scheme://host:port
    name: str
    node: str
    ttl: int = CLUSTER_TTL
    quorum: int = 1
    etcd_ca: typing.Optional[str] = None        # absolute paths
    etcd_cert: typing.Optional[str] = None
    etcd_key: typing.Optional[str] = None
    where: str = ""

    @property
    def prefix(self):
        """Where the cluster's keys live in etcd."""
        return "/hadaemon/%s/" % self.name


@dataclasses.dataclass
class Config:
    config_dir: str
    daemon: DaemonSettings
    groups: list
    checks: list
    sections: dict      # (host or None, from, to) -> Section
    cluster: typing.Optional[ClusterSettings] = None

    @staticmethod
    def precedence(host, from_state, to_state):
        """The eight section keys actions.conf's precedence tries for HOST going FROM -> TO, first first."""
        return [(h, f, t) for h in (host, None)
                for f, t in ((from_state, to_state), ("any", to_state),
                             (from_state, "any"), ("any", "any"))]

    def section_named(self, name):
        """The section written ``[NAME]`` (as ``Section.name`` gives it), or None."""
        for section in self.sections.values():
            if section.name == name:
                return section
        return None

    def switchover_section(self, to):
        """The section a switchover to host ``to`` runs: [TO: switchover], else [switchover]."""
        return self.sections.get((to, None, SWITCHOVER)) or self.sections.get((None, None, SWITCHOVER))

    def section_for(self, host, from_state, to_state):
        """The one section actions.conf's precedence runs for HOST going FROM -> TO, or None."""
        for key in self.precedence(host, from_state, to_state):
            section = self.sections.get(key)
            if section is not None:
                return section
        return None


_SHELL_SPECIAL_RE = re.compile(r"[\"'\\#;]")


def split_words(text):
    """Split a line as a shell would (quotes and backslashes honoured, nothing run).

    Returns (words, end) where ``end`` is where a trailing comment starts: a ``#``
    or ``;`` at the start of a word, outside quotes.  Raises ValueError on an
    unterminated quote.
    """
    if not _SHELL_SPECIAL_RE.search(text):
        return text.split(), len(text)          # most lines: nothing to interpret
    words, word, i, n = [], None, 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n\f\v":
            if word is not None:
                words.append(word)
                word = None
            i += 1
            continue
        if word is None and c in "#;":
            return words, i
        word = word or ""
        if c == "'":
            j = text.find("'", i + 1)
            if j < 0:
                raise ValueError("unterminated ' quote")
            word += text[i + 1:j]
            i = j + 1
        elif c == '"':
            i += 1
            while True:
                if i >= n:
                    raise ValueError('unterminated " quote')
                c = text[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and i + 1 < n and text[i + 1] in '"\\$`':
                    c = text[i + 1]
                    i += 1
                word += c
                i += 1
        elif c == "\\":
            word += text[i + 1:i + 2]
            i += 2
        else:
            word += c
            i += 1
    if word is not None:
        words.append(word)
    return words, n


_SETTING_RE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)\Z")
_SECTION_RE = re.compile(r"\s*\[(.*?)\]\s*(?:\s[#;].*)?\Z")    # [NAME], maybe a comment after


def read_ini(path, errors):
    """Yield (where, kind, name_or_key, words, text) for each meaningful line of a file.

    kind is ``section`` (name), ``setting`` (key, value words) or ``line`` (words,
    text without its comment).  Lexical errors go to ``errors``.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        errors.append("%s: cannot read: %s" % (path, exc.strerror))
        return
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        lineno = raw[:exc.start].count(b"\n") + 1
        errors.append("%s:%d: not UTF-8 text" % (path, lineno))
        return
    del raw
    for lineno, line in enumerate(lines, 1):
        lines[lineno - 1] = None        # let go as read: a daemon reads between its other work
        where = "%s:%d" % (path, lineno)
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        m = _SECTION_RE.match(line)
        if m:
            yield where, "section", m.group(1).strip(), None, stripped
            continue
        if stripped[0] == "[" and "]" not in stripped:
            errors.append("%s: a section header needs a closing ]: %s" % (where, stripped))
            continue
        m = _SETTING_RE.match(line)
        try:
            if m:
                words, _ = split_words(m.group(2))
                yield where, "setting", m.group(1), words, stripped
            else:
                words, end = split_words(line)
                yield where, "line", None, words, " ".join(line[:end].split())
        except ValueError as exc:
            errors.append("%s: %s" % (where, exc))


def parse_scope(name):
    """``local`` or ``ssh:[USER@]HOST[:PORT]`` -> Scope; ValueError otherwise."""
    if name == "local":
        return Scope(name)
    if name.startswith("ssh:"):
        m = re.match(r"(?:([A-Za-z0-9_.][A-Za-z0-9_.-]*)@)?"
                     r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9_.-]*)(?::(\d{1,5}))?\Z", name[4:])
        if m and (m.group(3) is None or 0 < int(m.group(3)) < 65536):
            return Scope(name, "ssh", m.group(1), m.group(2).strip("[]"),
                         int(m.group(3)) if m.group(3) else None)
        raise ValueError("bad ssh scope %r: write ssh:[USER@]HOST[:PORT]" % name)
    raise ValueError("unknown scope [%s]: a group is [local] or [ssh:[USER@]HOST[:PORT]]" % name)


def resolve_command(word, subdir, config_dir, seen=None):
    """SUBDIR/word, then a path relative to the config dir (or absolute), then PATH.

    ``seen``: a dict of the answers so far in this reading of the config (ten
    thousand checks are mostly a few scripts with different arguments).
    """
    if seen is not None:
        if (word, subdir) not in seen:
            seen[word, subdir] = resolve_command(word, subdir, config_dir)
        return seen[word, subdir]
    candidates = []
    if "/" not in word:
        candidates.append(os.path.join(config_dir, subdir, word))
    candidates.append(os.path.join(config_dir, word))
    for path in candidates:
        if os.path.isfile(path):
            if os.access(path, os.X_OK):
                return os.path.abspath(path), None
            return None, "%s is not executable (chmod +x %s)" % (path, path)
    if "/" not in word:
        found = shutil.which(word)
        if found:
            return os.path.abspath(found), None
    return None, "command not found: %s (looked in %s/, the config dir and PATH)" % (word, subdir)


# ============================================================================
# netsettings.py: The network settings of the config: the HTTP address, token
# and TLS files, the [cluster] keys.
# ============================================================================
#
# Owns the parsing and validation of ``http``, ``http_token``, ``http_cert`` and of
# the [cluster] section (etcd URLs, name, node, ttl, quorum, TLS files), and the
# TLS contexts made from them (ssl is imported only where one is made).
#
# Uses: base, config.

_HTTP_ADDRESS_RE = re.compile(r"(?:\[([^\]]*)\]|([^\[\]:]*)):(\d{1,5})\Z")
_HTTP_FORMS = "write IP:PORT, :PORT, [::1]:PORT, 0.0.0.0:PORT or localhost:PORT"


def parse_http_address(text):
    """``IP:PORT``, ``:PORT`` (127.0.0.1), ``[IPv6]:PORT``, ``localhost:PORT`` -> HttpAddress.

    Only addresses, and ``localhost``: a name to resolve would make the listener
    depend on the resolver at every start and reload.
    """
    m = _HTTP_ADDRESS_RE.match(text)
    if not m:
        raise ValueError("http = %s is not an address with a port; %s" % (text, _HTTP_FORMS))
    port = int(m.group(3))
    if not 0 < port < 65536:
        raise ValueError("http = %s: port %d is not between 1 and 65535" % (text, port))
    bracketed = m.group(1) is not None
    host = m.group(1) if bracketed else (m.group(2) or "127.0.0.1")
    if host == "localhost" and not bracketed:
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("http = %s: %r is not an IP address; %s" % (text, host, _HTTP_FORMS)) from None
    if bracketed != (ip.version == 6):
        raise ValueError("http = %s: %s" % (text, "brackets are for IPv6 addresses only" if bracketed
                                             else "an IPv6 address goes in brackets: [%s]:%d" % (ip, port)))
    return HttpAddress(str(ip), port, text)


def _private_file(path):
    """(bytes, None) of a regular file that only its owner may read, or (None, the problem)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return None, "%s is not a file" % path
        if st.st_mode & 0o044:
            return None, ("%s is readable by group or others (mode %04o): chmod 600 %s"
                          % (path, stat.S_IMODE(st.st_mode), path))
        with open(path, "rb") as f:
            return f.read(), None
    except FileNotFoundError:
        return None, "%s does not exist" % path
    except OSError as exc:
        return None, "cannot read %s: %s" % (path, exc.strerror)


def read_http_token(path):
    """The access token in ``path`` (its content without surrounding whitespace): (token, problem)."""
    data, problem = _private_file(path)
    if problem:
        return None, problem
    token = data.strip()
    if not token:
        return None, "%s is empty" % path
    if not re.match(rb"[\x21-\x7e]+\Z", token):
        return None, ("%s: the token must be one word of printable ASCII (it travels in an "
                      "Authorization header)" % path)
    return token.decode("ascii"), None


def _no_password():
    return b""          # an encrypted key fails to load instead of prompting on a terminal


def http_ssl_context(path):
    """The server's TLS context from one PEM holding certificate and key; ValueError says what is wrong."""
    data, problem = _private_file(path)
    if problem:
        raise ValueError(problem)
    text = data.decode("ascii", "replace")
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ValueError("%s holds no certificate (-----BEGIN CERTIFICATE-----)" % path)
    if "ENCRYPTED PRIVATE KEY" in text or "Proc-Type: 4,ENCRYPTED" in text:
        raise ValueError("%s: the private key is encrypted; the daemon needs it without a "
                         "passphrase (openssl pkey -in KEY -out KEY.plain)" % path)
    if not re.search(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----", text):
        raise ValueError("%s holds no private key: put the key and the certificate in one PEM file"
                         % path)
    import ssl                          # only for https: 3 MB of modules a daemon without does without
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(path, password=_no_password)
    except ssl.SSLError as exc:
        raise ValueError("%s: not a certificate and key ssl can use (%s)"
                         % (path, exc.reason or exc)) from None
    return context


def _http_settings(daemon, config_dir, errors):
    """Check the [daemon] http settings together; the token's setting becomes the token itself."""
    if "http_token" in daemon:
        where, name = daemon["http_token"]
        token, problem = read_http_token(os.path.join(config_dir, name))
        if problem:
            errors.append("%s: http_token = %s: %s" % (where, name, problem))
            token = ""          # set, but bad: no second error for the address below
        daemon["http_token"] = (where, token)
    if "http_cert" in daemon:
        where, name = daemon["http_cert"]
        path = os.path.abspath(os.path.join(config_dir, name))
        try:
            http_ssl_context(path)
        except ValueError as exc:
            errors.append("%s: http_cert = %s: %s" % (where, name, exc))
        daemon["http_cert"] = (where, path)
    if "http" in daemon:
        where, address = daemon["http"]
        if not address.loopback and "http_token" not in daemon:
            errors.append("%s: http = %s is not a loopback address: set http_token too (a file "
                          "holding the access token), or anyone who reaches it reads the status"
                          % (where, address.text))


_ETCD_URL_RE = re.compile(r"(https?)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9_.-]*)(?::(\d{1,5}))?/?\Z")


def parse_etcd_url(url):
    """``http(s)://HOST[:PORT]`` -> (scheme, host, port); ValueError names what is wrong."""
    m = _ETCD_URL_RE.match(url)
    if not m:
        raise ValueError("bad etcd endpoint %r: write http://HOST:PORT or https://HOST:PORT" % url)
    port = int(m.group(3) or ETCD_PORT)
    if not 0 < port < 65536:
        raise ValueError("bad port in etcd endpoint %r" % url)
    return m.group(1), m.group(2).strip("[]"), port


def _cluster_value(key, words, where, config_dir, errors):
    """Convert one [cluster] setting; append an error and return None when bad."""
    try:
        if key == "etcd":
            urls = [u for u in " ".join(words).replace(",", " ").split() if u]
            if not urls:
                raise ValueError("etcd needs at least one endpoint URL")
            for url in urls:
                parse_etcd_url(url)
            if len(set(urls)) != len(urls):
                raise ValueError("an etcd endpoint is listed twice: %s" % " ".join(urls))
            return tuple(u.rstrip("/") for u in urls)
        if len(words) != 1:
            raise ValueError("%s takes one value, got %d: %r" % (key, len(words), " ".join(words)))
        value = words[0]
        if key in ("name", "node"):
            if not valid_name(value):
                raise ValueError("bad %s %r (letters, digits, _ . : - )" % (key, value))
            return value
        if key == "ttl":
            try:
                seconds = parse_duration(value)
            except ValueError as exc:
                raise ValueError("ttl: %s" % exc)
            if seconds != int(seconds) or not 1 <= seconds <= 60:
                raise ValueError("ttl must be whole seconds from 1s to 60s (etcd leases "
                                 "count in seconds), got %r" % value)
            return int(seconds)
        if key == "quorum":
            if not value.isdigit() or int(value) < 1:
                raise ValueError("quorum must be a whole number of at least 1, got %r" % value)
            return int(value)
        path = os.path.join(config_dir, value)      # etcd_ca, etcd_cert, etcd_key
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ValueError("%s = %s: cannot read %s: %s" % (key, value, path, exc.strerror))
        return path
    except ValueError as exc:
        errors.append("%s: %s" % (where, exc))
        return None


def etcd_ssl_context(cluster):
    """TLS for https endpoints: the CA (default: the system's) and the client certificate."""
    import ssl                          # ssl and http.client only with [cluster]: 3 MB and more
    context = ssl.create_default_context(cafile=cluster.etcd_ca)
    if cluster.etcd_cert:
        context.load_cert_chain(cluster.etcd_cert, cluster.etcd_key)
    return context


def _cluster_settings(where, entries, errors):
    """The [cluster] section whole: required keys, the node's default, TLS that loads."""
    import ssl
    values = {k: v for k, (_, v) in entries.items() if v is not None}
    if len(values) < len(entries):
        return None                             # each bad value has its error already
    missing = [k for k in ("etcd", "name") if k not in values]
    if missing:
        errors.append("%s: [cluster] needs %s" % (where, " and ".join(
            "%s = ..." % k for k in missing)))
        return None
    if "node" not in values:
        host = socket.gethostname()
        if not valid_name(host):
            errors.append("%s: [cluster] sets no node and the host name %r is not a valid "
                          "node name; set node = NAME" % (where, host))
            return None
        values["node"] = host
    settings = ClusterSettings(where=where, **values)
    tls = [k for k in ("etcd_ca", "etcd_cert", "etcd_key") if k in values]
    if tls and not any(u.startswith("https:") for u in settings.etcd):
        errors.append("%s: %s set, but every etcd endpoint is http:// (TLS files go with "
                      "https:// endpoints)" % (entries[tls[0]][0], tls[0]))
    elif settings.etcd_key and not settings.etcd_cert:
        errors.append("%s: etcd_key without etcd_cert" % entries["etcd_key"][0])
    elif tls:
        try:
            etcd_ssl_context(settings)
        except (ssl.SSLError, OSError) as exc:
            key = "etcd_cert" if settings.etcd_cert else "etcd_ca"
            errors.append("%s: cannot load the TLS files: %s" % (
                entries[key][0] if key in entries else where, exc))
    return settings


# ============================================================================
# configfiles.py: checks.conf and actions.conf, read whole into one Config,
# every problem as FILE:LINE.
# ============================================================================
#
# Owns load_config (and load_config_steps, the same in slices for a reload): the
# [daemon] settings, the groups and their checks, remote scripts' problems, the
# sections of actions.conf and their precedence keys.  A bad config raises one
# ConfigError that carries every problem found, never only the first.
#
# Uses: base, cron, config, netsettings.

def _setting_value(key, words, where, errors):
    """Convert one KEY = VALUE setting; append an error and return None when bad."""
    try:
        if key in ("ssh_options", "notify"):
            return tuple(words)
        if key == "confirm" and len(words) != 1:
            return _confirm_of(words)
        if len(words) != 1 and key != "cron":
            raise ValueError("%s takes one value, got %d: %r" % (key, len(words), " ".join(words)))
        value = " ".join(words)
        if key in ("interval", "timeout", "action_timeout", "connect_timeout", "notify_timeout",
                   "switchover_settle", "stop_timeout", "recheck"):
            return parse_duration(value)
        if key in ("confirm", "workers", "history"):
            if not value.isdigit() or int(value) < 1:
                raise ValueError("%s must be a whole number of at least 1, got %r" % (key, value))
            if key == "workers" and int(value) > MAX_WORKERS:
                raise ValueError("workers must be at most %d, got %s" % (MAX_WORKERS, value))
            return (int(value), None) if key == "confirm" else int(value)
        if key == "cron":
            return CronSpec(value)
        if key == "log" and os.path.isabs(value) and not os.path.isdir(os.path.dirname(value)):
            raise ValueError("log = %s: directory %s does not exist" % (value, os.path.dirname(value)))
        if key == "host" and not valid_name(value):
            raise ValueError("bad host name %r (letters, digits, _ . : - )" % value)
        if key == "http":
            return parse_http_address(value)
        if key in ("switchover_role", "switchover_candidate"):
            if not valid_name(value) or "_to_" in value.lower():
                raise ValueError("%s must be a state word, got %r" % (key, value))
            return value.lower()
        return value
    except ValueError as exc:
        errors.append("%s: %s" % (where, exc))
        return None


def _confirm_of(words):
    """``confirm = N of M`` (docs/configuration.md: damping) -> (N, M); ValueError when not."""
    n, of, m = words if len(words) == 3 else ("", "", "")
    if of != "of" or not (n.isdigit() and m.isdigit()) or not 1 <= int(n) <= int(m) <= MAX_WINDOW:
        raise ValueError("confirm = N of M needs whole numbers 1 <= N <= M <= %d, got %r"
                         % (MAX_WINDOW, " ".join(words)))
    return int(n), int(m)


def _split_confirm(values):
    """``confirm``'s (N, M) as the records keep it: ``confirm`` N, ``confirm_of`` M (None: N of N)."""
    if "confirm" in values:
        values["confirm"], values["confirm_of"] = values["confirm"]
    return values


def _parse_checks(path, config_dir, errors):
    daemon = {}
    groups = []          # [(scope, where, settings, lines)]
    scopes = {}          # name -> Scope: the same few, opening many groups
    cluster = {}
    cluster_where = None
    current = None
    for n, (where, kind, name, words, text) in enumerate(read_ini(path, errors), 1):
        if n % CONFIG_STEP == 0:
            yield
        if kind == "section":
            if name == "daemon":
                current = ("daemon", daemon)
                continue
            if name == "cluster":
                if cluster_where is not None:
                    errors.append("%s: [cluster] again (first at %s); one cluster per daemon"
                                  % (where, cluster_where))
                    current = ("bad", {})
                    continue
                cluster_where = where
                current = ("cluster", cluster)
                continue
            try:
                scope = scopes.get(name) or scopes.setdefault(name, parse_scope(name))
            except ValueError as exc:
                errors.append("%s: %s" % (where, exc))
                current = ("bad", {})
                continue
            group = (scope, where, {}, [])
            groups.append(group)
            current = ("group", group)
        elif current is None:
            errors.append("%s: %s before any [section]" % (where, text))
        elif current[0] == "bad":
            continue
        elif current[0] == "cluster":
            if kind != "setting":
                errors.append("%s: [cluster] holds only KEY = VALUE settings, not %r" % (where, text))
            elif name not in CLUSTER_KEYS:
                errors.append("%s: unknown key %r in [cluster]; known: %s"
                              % (where, name, ", ".join(sorted(CLUSTER_KEYS))))
            elif name in cluster:
                errors.append("%s: %s is set twice in this section (first at %s)"
                              % (where, name, cluster[name][0]))
            else:
                cluster[name] = (where, _cluster_value(name, words, where, config_dir, errors))
        elif kind == "setting":
            if current[0] == "daemon":
                settings, allowed, what = daemon, DAEMON_KEYS, "[daemon]"
            else:
                scope, _, settings, _ = current[1]
                allowed = GROUP_KEYS | (SSH_KEYS if scope.kind == "ssh" else set())
                what = "[%s]" % scope.name
            if name not in allowed:
                hint = " (ssh settings only go in [ssh:...] groups or [daemon])" if name in SSH_KEYS else ""
                errors.append("%s: unknown key %r in %s%s; known: %s"
                              % (where, name, what, hint, ", ".join(sorted(allowed))))
            elif name in settings:
                errors.append("%s: %s is set twice in this section (first at %s)"
                              % (where, name, settings[name][0]))
            else:
                value = _setting_value(name, words, where, errors)
                if value is not None:
                    settings[name] = (where, value)
        elif current[0] == "daemon":
            errors.append("%s: [daemon] holds only KEY = VALUE settings, not %r" % (where, text))
        elif words:
            current[1][3].append((where, words, text))
    _http_settings(daemon, config_dir, errors)
    _notify_setting(daemon, config_dir, errors)
    settings = DaemonSettings(**_split_confirm({k: v for k, (_, v) in daemon.items()}))
    group_list, checks = yield from _build_groups(groups, settings, config_dir, errors,
                                                  daemon.get("recheck", ("[daemon]",))[0])
    if cluster_where is not None:
        cluster = _cluster_settings(cluster_where, cluster, errors)
    return settings, group_list, checks, cluster or None


def _notify_setting(daemon, config_dir, errors):
    """notify = COMMAND ARGS (docs/notify.md): COMMAND looked up as an action command is."""
    if "notify" in daemon:
        where, words = daemon.pop("notify")
        path_, problem = resolve_command(words[0], "actions", config_dir) if words else \
            (None, "notify = needs a command")
        if problem:
            errors.append("%s: %s" % (where, problem))
        else:
            daemon["notify"] = (where, (path_,) + words[1:])


def _recheck_problem(gset, values, daemon_where):
    """Why a group's ``recheck`` cannot be (docs/configuration.md), or None.  The
    daemon's default applies to interval groups only: a cron group refuses its own."""
    if values["recheck"] is None:
        return None
    where = gset["recheck"][0] if "recheck" in gset else daemon_where
    if "cron" in gset:
        if "recheck" not in gset:
            values["recheck"] = None
            return None
        return "%s: recheck is for interval checks; this group runs by cron (%s)" % (
            where, gset["cron"][0])
    if values["recheck"] > values["interval"]:
        return "%s: recheck %s is longer than the interval %s of the group at %s" % (
            where, format_duration(values["recheck"]), format_duration(values["interval"]),
            gset["interval"][0] if "interval" in gset else "[daemon]")
    return None


def _build_groups(groups, settings, config_dir, errors, recheck_where):
    """Groups with the daemon's defaults filled in, and their checks, each command found
    (a generator, as _parse_checks: it yields every CONFIG_STEP checks)."""
    checks, seen = [], {}
    group_list = []
    resolved, remote = {}, {}           # per command word: a few scripts, many checks
    defaults = {"interval": settings.interval, "cron": None, "timeout": settings.timeout,
                "confirm": (settings.confirm, settings.confirm_of), "host": None,
                "ssh_identity": settings.ssh_identity, "ssh_options": settings.ssh_options,
                "connect_timeout": settings.connect_timeout, "recheck": settings.recheck}
    for i, (scope, gwhere, gset, lines) in enumerate(groups):
        groups[i] = None                # let go as read (see read_ini)
        if "interval" in gset and "cron" in gset:
            errors.append("%s: interval and cron both set; a group has one or the other"
                          % gset["cron"][0])
        values = _split_confirm(dict(defaults, **{key: value for key, (_, value) in gset.items()}))
        problem = _recheck_problem(gset, values, recheck_where)
        if problem:
            errors.append(problem)
        group = Group(scope, gwhere, **values)
        group_list.append(group)
        if scope.kind == "ssh" and lines and not shutil.which("ssh"):
            errors.append("%s: [%s]: no ssh client on PATH (install openssh-client)"
                          % (gwhere, scope.name))
        for where, words, name in lines:
            if len(checks) % CONFIG_STEP == 0:
                yield
            path_, problem = resolve_command(words[0], "checks", config_dir, resolved)
            if not problem and scope.kind == "ssh":
                if path_ not in remote:
                    remote[path_] = remote_problem(path_)
                problem = remote[path_]
            if problem:
                errors.append("%s: %s" % (where, problem))
                continue
            host = group.host or os.path.basename(words[0])
            if not valid_name(host):
                errors.append("%s: the check's host %r (from its file name) is not a valid host "
                              "name; set host = NAME in the group" % (where, host))
                continue
            key = "%s|%s|%s" % (scope.name, host, name)
            if key in seen:
                errors.append("%s: the same check %r for host %s in [%s] is already at %s"
                              % (where, name, host, scope.name, seen[key]))
                continue
            seen[key] = where
            checks.append(Check(key, name, (path_,) + tuple(words[1:]), host, group, where))
    return group_list, checks


def _parse_transition(text):
    """``FROM_to_TO`` -> (from, to), lower-cased; ValueError when malformed."""
    parts = text.split("_to_")
    if len(parts) != 2:
        raise ValueError("%r is not FROM_to_TO" % text)
    result = []
    for part in parts:
        if part != "any" and not valid_name(part):
            raise ValueError("bad state %r in %r (a state word or any)" % (part, text))
        result.append(part.lower())
    return tuple(result)


def _parse_actions(path, config_dir, default_timeout, errors):
    sections = {}
    current = None
    for n, (where, kind, name, words, text) in enumerate(read_ini(path, errors), 1):
        if n % CONFIG_STEP == 0:
            yield
        if kind == "section":
            current = None
            host, _, tr = name.rpartition(":")
            host = host.strip() or None
            try:
                if host is not None and not valid_name(host):
                    raise ValueError("bad host name %r" % host)
                if tr.strip() == SWITCHOVER:        # SPEC §12: [switchover], [TO: switchover]
                    from_state, to_state = None, SWITCHOVER
                else:
                    from_state, to_state = _parse_transition(tr.strip())
            except ValueError as exc:
                errors.append("%s: [%s]: %s; write [FROM_to_TO] or [HOST: FROM_to_TO]"
                              % (where, name, exc))
                current = "bad"
                continue
            key = (host, from_state, to_state)
            if key in sections:
                errors.append("%s: section [%s] already at %s" % (where, name, sections[key].where))
                current = "bad"
                continue
            current = sections[key] = Section(host, from_state, to_state, [], default_timeout, where)
            current.explicit = set()
        elif current is None:
            errors.append("%s: %s before any [FROM_to_TO] section" % (where, text))
        elif current == "bad":
            continue
        elif kind == "setting":
            if name not in SECTION_KEYS:
                errors.append("%s: unknown key %r in [%s]; known: %s"
                              % (where, name, current.name, ", ".join(sorted(SECTION_KEYS))))
            elif name in current.explicit:
                errors.append("%s: %s is set twice in [%s]" % (where, name, current.name))
            else:
                value = _setting_value(name, words, where, errors)
                current.explicit.add(name)
                if value is not None:
                    current.timeout = value
        elif words:
            ignore = words[0].startswith("-")
            words = list(words)
            if ignore:
                words[0] = words[0][1:]
                if not words[0]:
                    words.pop(0)
            if not words:
                errors.append("%s: a lone '-' is not a command" % where)
                continue
            path_, problem = resolve_command(words[0], "actions", config_dir)
            if problem:
                errors.append("%s: %s" % (where, problem))
                continue
            current.commands.append(Command((path_,) + tuple(words[1:]), ignore, where))
    for section in sections.values():
        del section.explicit
    return sections


def load_config_steps(config_dir):
    """load_config() in steps: a generator that yields every CONFIG_STEP lines or checks
    and returns the Config (or raises ConfigError), so that a daemon can read ten
    thousand checks between its other work."""
    config_dir = os.path.abspath(config_dir)
    errors = []
    settings, groups, checks, cluster = yield from _parse_checks(
        os.path.join(config_dir, "checks.conf"), config_dir, errors)
    sections = yield from _parse_actions(os.path.join(config_dir, "actions.conf"), config_dir,
                                         settings.action_timeout, errors)
    if errors:
        raise ConfigError(errors)
    return Config(config_dir, settings, groups, checks, sections, cluster)


def load_config(config_dir):
    """Read and check checks.conf and actions.conf whole; raise ConfigError with every problem."""
    return run_steps(load_config_steps(config_dir))


def remote_problem(path):
    """Why the file at ``path`` cannot be a remote check (a binary), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as exc:
        return "cannot read %s: %s" % (path, exc.strerror)
    if not head.startswith(b"#!") and b"\0" in head:
        return ("%s is a binary: a remote check is a script, sent to the interpreter of its "
                "#! line over there (wrap a plugin in a script)" % path)
    return None


# ============================================================================
# wire.py: Wire protocol and check output: what crosses the UNIX socket, and
# what a check prints.
# ============================================================================
#
# Owns the framing (one JSON object per line, at most MAX_MESSAGE bytes), the
# LineReader and Channel every process speaks through, ``request`` (a client's one
# question), and the reading of a check's stdout into the serialized hash and its
# reports (docs/configuration.md: what a check reports).
#
# Uses: base.

# One encoder for every message and value: json.dumps with options makes a new one each call.
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def encode_message(obj):
    return _ENCODE(obj).encode("utf-8") + b"\n"


def output_print(exit_code, output):
    """A check run's fingerprint, of its exit and its stdout as they came: the worker
    makes it of a clean run and sends it with the result (``print``); the master hands
    it back with the check's next job (records.Job's ``same``) while a result like that
    would change nothing, and a run with that print is sent as ``same``, held a while.
    Of the bytes, not of the output read: the same bytes read the same, so a run that
    says what the last said is known without reading it.
    128 bits of BLAKE2: a changed result taken for the same by chance (which would
    pass for it every time it came again) is not a risk a failover daemon runs."""
    return int.from_bytes(hashlib.blake2b(b"%d\n%s" % (exit_code, output), digest_size=16).digest(), "big")


def json_pieces(items, as_object, step=None):
    """A JSON array (or object, of (key, value) pairs) of ``items`` as pieces of text,
    ``step`` items each, made as they are read: one big answer in small bites."""
    yield b"{" if as_object else b"["
    step = step or ANSWER_STEP
    items = iter(items)
    sep = b""
    while True:
        batch = list(itertools.islice(items, step))
        if not batch:
            break
        yield sep + encode_message(dict(batch) if as_object else batch)[1:-2]
        sep = b","
    yield b"}" if as_object else b"]"


def decode_message(line):
    """One line -> dict; ProtocolError for anything else (never evaluates what it reads)."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError("not a JSON line: %s" % str(exc)[:80])
    if not isinstance(obj, dict):
        raise ProtocolError("a message must be a JSON object, got %s" % type(obj).__name__)
    return obj


class LineReader:
    """Split a byte stream into messages, refusing lines longer than ``limit``."""

    def __init__(self, limit=MAX_MESSAGE):
        self.buf = bytearray()
        self.limit = limit

    def feed(self, data):
        self.buf += data
        messages = []
        while True:
            end = self.buf.find(b"\n")
            if end < 0:
                break
            line = bytes(self.buf[:end])
            del self.buf[:end + 1]
            if line.strip():
                messages.append(decode_message(line))
        if len(self.buf) > self.limit:
            raise ProtocolError("message longer than %d bytes" % self.limit)
        return messages


class Channel:
    """A blocking connection to the master, as workers and action runs use it."""

    def __init__(self, sock):
        self.sock = sock
        self.reader = LineReader()
        self.pending = collections.deque()

    @classmethod
    def connect(cls, path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        return cls(sock)

    def send(self, obj):
        self.sock.sendall(encode_message(obj))

    def receive(self):
        """The next message, or None at EOF."""
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.pending.extend(self.reader.feed(data))
        return self.pending.popleft()

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        self.sock.close()


def request(state_dir, message, timeout=30.0):
    """Send one control message to the running daemon and return its answer."""
    chan = Channel.connect(os.path.join(state_dir, SOCK_FILE))
    # The limit guards the daemon against its clients; its own answers may be longer
    # (--status --json of ten thousand checks is some 6 MB).
    chan.reader.limit = ANSWER_MAX
    try:
        chan.sock.settimeout(timeout)
        chan.send(message)
        answer = chan.receive()
        if answer is None:
            raise HadaemonError("the daemon closed the connection without answering")
        return answer
    finally:
        chan.close()


# -- Check output: the serialized hash (docs/configuration.md) ------------------------

_KV_RE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*=\s*(.*?)\s*\Z")
_JSON_DEPTH = 32        # deeper check output is refused: json.dumps and repr recurse on it


def _nested_deeper(obj, limit):
    """True when ``obj`` holds containers more than ``limit`` deep (found without recursion)."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return True
            items = value.values() if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)
    return False


def parse_check_output(data):
    """Check stdout -> dict: a JSON object as is, else ``key=value`` lines plus ``message``.

    The dict is always one valid UTF-8 JSON line away from the master: JSON nested
    deeper than _JSON_DEPTH is refused, and lone surrogates (``"\\ud800"``) replaced.
    """
    text = data.decode("utf-8", "replace").replace("\x00", "")
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
            too_deep = _nested_deeper(obj, _JSON_DEPTH)
        except RecursionError:
            obj, too_deep = None, True
        except ValueError:
            obj, too_deep = None, False
        if too_deep:
            return {"message": "check output is JSON nested more than %d deep; ignored" % _JSON_DEPTH}
        if isinstance(obj, dict):
            try:
                encode_message(obj)
            except UnicodeEncodeError:      # a lone surrogate: valid JSON, but not UTF-8
                raw = json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
                obj = json.loads(raw.decode("utf-8", "replace"))
            return obj
    result, other = {}, []
    for line in text.splitlines():
        m = _KV_RE.match(line)
        if m:
            result[m.group(1)] = m.group(2)
        elif line.strip():
            other.append(line.strip())
    if other and "message" not in result:
        result["message"] = "\n".join(other)
    return result


def _shorten(value, limit=60):
    try:
        text = repr(value)
    except (RecursionError, ValueError):    # nested too deep; an int too long to print
        text = "<%s that cannot be shown>" % type(value).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def reports_from_result(data, exit_code, default_host):
    """The (host, state) pairs a check result reports, and why any were rejected.

    Without ``state`` (or ``states``) the exit code decides, as for Nagios plugins.
    """
    if "states" in data:
        states = data["states"]
        if not isinstance(states, dict):
            return [], ["'states' must be an object of host -> state, got %s" % _shorten(states)]
        pairs = list(states.items())
    else:
        state = data.get("state")
        if state is None:
            state = EXIT_STATES.get(exit_code, "unknown")
        pairs = [(data.get("host", default_host), state)]
    reports, problems = [], []
    for host, state in pairs:
        if not valid_name(host):
            problems.append("rejected report: bad host name %s" % _shorten(host))
        elif not valid_state(state):
            problems.append("rejected report for %s: bad state %s" % (host, _shorten(state)))
        else:
            reports.append((host, state.lower()))
    return reports, problems


# ============================================================================
# records.py: Typed records: what crosses the socket, what the ledger keeps
# and what --status --json says.
# ============================================================================
#
# Owns the records that were dicts built by hand in several places, each with its
# one conversion to and from the form it travels or is stored in:
#
#   Job          master -> worker: one check to run (``{"t": "job"}``)
#   CheckResult  worker -> master: what the check said (``{"t": "result"}``, or
#                ``{"t": "same"}`` when it said what its job expected); the
#                master's own result for a worker that died; the check's ``last``
#   Transition   a host moved FROM -> TO: to_json() / from_json(), the state db's
#                ``tr:N``, etcd's, --status --json's and --history's
#   Run          an action run, with its RunCommands and their CommandResults:
#                to_json() / from_json() (the state db's ``run:N``), to_etcd()
#                (outputs cut), to_action() / from_action() (the ``{"t": "run"}``
#                message), summary() (--status, --history, the ``run`` verb);
#                from_json() refuses a value of the wrong shape (well_formed)
#   StatusDoc    the --status --json document (socket, HTTP /status, offline), with
#   DaemonBlock  its ``daemon`` block and
#   ClusterStatus  that block's ``cluster``
#
# The wire forms are the published contract (docs/operating.md, docs/http.md,
# docs/cluster.md): their keys, values and order are kept exactly; an optional key is
# left out when it is None, as before.  The status document has no ``from_wire``: its
# readers (the renderers, the page, the metrics, the tests) read the JSON.
#
# Uses: base, wire.

# -- Master -> worker: a job ---------------------------------------------------------

@dataclasses.dataclass
class Job:
    """One check handed to a worker, to start at ``at``.  ``same``: the fingerprint
    (wire.output_print) of the check's last clean run, whose like would change nothing:
    a run with that print the worker may hold a while to send with others; None: send
    the result at once.  ``sent`` /
    ``sent_wall`` are the master's own (when it was handed: the lag, the lost result's
    start) and never sent; ``line`` too (its message encoded, see to_line), and
    ``said``: (data items, exit) of the result ``same`` stands for."""
    id: int
    key: str                            # the check's key
    argv: list                          # what runs (ssh: the ssh command)
    env: dict                           # HA_CHECK, HA_SCOPE, HA_STATE, HA_CONFIG_DIR, HA_STATE_DIR[, HA_HOST]
    timeout: float
    stdin: typing.Optional[str] = None  # ssh: the file the remote command reads
    ssh: bool = False
    at: float = 0.0                     # monotonic (one clock for the whole machine)
    same: typing.Optional[int] = None
    sent: typing.Optional[float] = None         # monotonic
    sent_wall: typing.Optional[float] = None    # wall clock
    line: typing.Optional[bytes] = dataclasses.field(default=None, compare=False, repr=False)
    said: typing.Optional[tuple] = dataclasses.field(default=None, compare=False, repr=False)

    def to_wire(self):
        """The ``job`` message a worker reads."""
        msg = {"t": "job", "id": self.id, "at": self.at, "same": self.same, "key": self.key,
               "timeout": self.timeout, "env": self.env, "argv": self.argv}
        if self.ssh:
            msg["stdin"], msg["ssh"] = self.stdin, True
        return msg

    def start(self):
        """When it started at the latest, had it run (monotonic): its time, or when handed."""
        return max(self.at, self.sent)

    def to_line(self):
        """The ``job`` message as the line sent, ``encode_message(to_wire())``: ``line``
        when the Scheduler made it already (from the part it keeps per check)."""
        if self.line is None:
            self.line = encode_message(self.to_wire())
        return self.line

    @classmethod
    def from_wire(cls, msg):
        """The worker's side; a message without id, key, argv, env or timeout raises
        KeyError (the worker exits with its traceback: the master gave it nonsense)."""
        return cls(msg["id"], msg["key"], msg["argv"], msg["env"], msg["timeout"],
                   msg.get("stdin"), bool(msg.get("ssh")), msg["at"], msg.get("same"))


# -- Worker -> master: a check's result ------------------------------------------------

class CheckResult(typing.NamedTuple):
    """What one run of a check said, and how it ran."""
    job: typing.Optional[int]           # the Job's id
    key: typing.Optional[str]           # the check's key
    data: dict                          # its output parsed ({} when the worker sent no dict)
    failed: bool                        # cut short, or ssh failed: it said nothing of its own
    exit: typing.Optional[int]
    signal: typing.Optional[int]
    started: typing.Optional[float]     # wall clock
    duration: typing.Optional[float]    # seconds
    trouble: typing.Optional[str]       # what the daemon had to do about it, for the log
    stderr: typing.Optional[str] = None     # its first 2048 characters; None when it wrote none
    fingerprint: typing.Optional[int] = None    # wire.output_print of a clean run; else None

    def to_wire(self):
        """The ``result`` message a worker sends (``stderr`` and ``print`` only when there
        are some)."""
        msg = {"t": "result", "job": self.job, "key": self.key, "data": self.data,
               "failed": self.failed, "exit": self.exit, "signal": self.signal,
               "started": self.started, "duration": self.duration, "trouble": self.trouble}
        if self.stderr:
            msg["stderr"] = self.stderr
        if self.fingerprint is not None:
            msg["print"] = self.fingerprint
        return msg

    @classmethod
    def from_wire(cls, msg, _new=tuple.__new__):
        """The master's side, lenient as the worker is its own child: ``data`` that is
        not an object reads as {}, ``exit`` and ``print`` not ints and ``trouble`` not a
        string as None, ``failed`` is True only when it is ``true``; the rest is taken as
        sent.  (Whether the message is a result for the job the worker runs is the Pool's.)"""
        get = msg.get
        data, exit_code, trouble, mark = get("data"), get("exit"), get("trouble"), get("print")
        # tuple.__new__: the hottest message, and the NamedTuple's __new__ is one call more.
        return _new(cls, (get("job"), get("key"), data if isinstance(data, dict) else {},
                          get("failed") is True, exit_code if isinstance(exit_code, int) else None,
                          get("signal"), get("started"), get("duration"),
                          trouble if isinstance(trouble, str) else None, get("stderr") or None,
                          mark if type(mark) is int else None))

    @classmethod
    def from_same(cls, job, msg):
        """The master's side of a ``same`` message: the run of ``job`` said what ``job.said``
        holds (its worker sends no more), clean, with no stderr.  A message whose times
        are not numbers gives None for them, as from_wire does."""
        started, duration = msg.get("started"), msg.get("duration")
        return cls(job.id, job.key, dict(job.said[0]), False, job.said[1], None,
                   started if isinstance(started, (int, float)) else None,
                   duration if isinstance(duration, (int, float)) else None, None, None, job.same)

    @classmethod
    def lost(cls, job, how, now_m):
        """The result of a check whose worker died while it ran: unknown, and failed
        (its unknown goes to the hosts the check last reported on)."""
        return cls(job.id, job.key, {"state": "unknown",
                                     "message": "worker died (%s) while running the check" % how},
                   True, None, None, job.sent_wall + (job.start() - job.sent), now_m - job.start(), None)

    def to_last(self, reports, problems):
        """The check's ``last``, as --status --json shows it and ``check:KEY`` keeps it."""
        data = self.data
        message = data.get("message")
        last = {"time": self.started, "duration": self.duration, "exit": self.exit,
                "signal": self.signal, "reports": {h: s for h, s in reports},
                "message": message[:500] if isinstance(message, str) else None,
                "attributes": {str(k)[:64]: _shorten(v, 200) if not isinstance(v, str) else v[:200]
                               for k, v in list(data.items())[:20]
                               if k not in ("state", "states", "host", "message")},
                "rejected": tuple(problems)}    # a tuple: untracked by the collector, as the rest
        if self.stderr:
            last["stderr"] = self.stderr[:500]
        return last

    def same_last(self, last):
        """to_last's dict for a run whose data and exit are those of the run that made
        ``last`` (the same reports, message, attributes, none rejected): a copy with
        this run's time, duration, exit, signal and stderr."""
        last = dict(last, time=self.started, duration=self.duration, exit=self.exit, signal=self.signal)
        if self.stderr:
            last["stderr"] = self.stderr[:500]
        elif "stderr" in last:
            del last["stderr"]
        return last


# -- The ledger's history: transitions and action runs ---------------------------------
#
# Their one JSON form is the state db's value (tr:N, run:N) and the wire form of
# --status --json, --history and HTTP; etcd keeps the same, a run's outputs cut
# (to_etcd).  The state db is read back through from_json, which refuses a value of
# the wrong shape (a damaged or hand-edited db, a hand-edited etcd): Store.load and
# ledger_from_etcd drop it with a note instead of letting it take the master down.

RUN_STATES = ("queued", "running", "ok", "failed", "interrupted", "skipped")
ETCD_OUTPUT_CAP = 4096          # bytes of a command's output kept in etcd (requests <= 1.5 MiB)


def _is_str(*values):
    return all(isinstance(v, str) for v in values)


def _is_time(value):
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


class Transition(typing.NamedTuple):
    """A host moved FROM -> TO (docs/configuration.md: states and transitions)."""
    id: int
    time: float                         # wall clock
    host: str
    frm: str                            # "from" in its JSON
    to: str
    check: typing.Optional[str]         # the check that reported it, or "cluster: a,b" (the voters)
    run: typing.Optional[int]           # the run of its section; None when no section matches
    switchover: typing.Optional[int] = None     # expected by this switchover run: no section ran

    def to_json(self):
        out = {"id": self.id, "time": self.time, "host": self.host, "from": self.frm,
               "to": self.to, "check": self.check, "run": self.run}
        if self.switchover is not None:
            out["switchover"] = self.switchover
        return out

    @staticmethod
    def well_formed(value):
        """Whether a stored ``value`` has the shape a transition is written in."""
        return isinstance(value, dict) and isinstance(value.get("id"), int) and _is_time(value.get("time")) \
            and _is_str(value.get("host"), value.get("from"), value.get("to")) \
            and (value.get("run") is None or isinstance(value["run"], int))

    @classmethod
    def from_json(cls, value):
        """ValueError when ``value`` is not the shape of a transition."""
        if not cls.well_formed(value):
            raise ValueError("not a transition: %s" % _shorten(value))
        get = value.get
        switchover = get("switchover")
        return cls(value["id"], get("time"), value["host"], value["from"], value["to"],
                   get("check"), get("run"), switchover if isinstance(switchover, int) else None)


class CommandResult(typing.NamedTuple):
    """How one command of a run ended, as its action run reported it."""
    exit: typing.Optional[int]
    signal: typing.Optional[int]
    error: typing.Optional[str]         # why it counts as failed (exit 1, timed out, ...), or None
    duration: typing.Optional[float]
    output: str                         # stdout and stderr, at most OUTPUT_CAP characters
    truncated: bool

    def to_json(self):
        return self._asdict()

    @classmethod
    def from_json(cls, value):
        if not isinstance(value, dict):
            raise ValueError("not a command's result: %s" % _shorten(value))
        get = value.get
        return cls(get("exit"), get("signal"), get("error"), get("duration"), get("output"),
                   get("truncated"))

    @classmethod
    def from_event(cls, msg):
        """From the action run's ``end`` message: its output (a string, or none) cut to OUTPUT_CAP."""
        output = msg.get("output") if isinstance(msg.get("output"), str) else ""
        return cls(msg.get("exit"), msg.get("signal"), msg.get("error"), msg.get("duration"),
                   output[:OUTPUT_CAP], bool(msg.get("truncated")))


@dataclasses.dataclass
class RunCommand:
    """One command of a run: as its section's line expanded it, and how it went."""
    argv: list
    ignore: bool                        # its failure does not end the sequence
    timeout: float
    where: str                          # FILE:LINE of its line in actions.conf
    started: typing.Optional[float] = None      # wall clock, once started
    result: typing.Optional[CommandResult] = None

    def to_json(self):
        out = {"argv": self.argv, "ignore": self.ignore, "timeout": self.timeout, "where": self.where}
        if self.started is not None:
            out["started"] = self.started
        if self.result is not None:
            out["result"] = self.result.to_json()
        return out

    @classmethod
    def from_json(cls, value):
        """From its JSON, or from a command expand_commands made (the same keys, no result)."""
        get = value.get
        result = get("result")
        return cls(value["argv"], get("ignore"), get("timeout"), get("where"), get("started"),
                   None if result is None else CommandResult.from_json(result))


@dataclasses.dataclass
class Run:
    """An action run of a transition's section: queued -> running -> ok | failed |
    interrupted, or skipped / failed without running (the Ledger's RUN_EDGES)."""
    id: int
    transition: typing.Optional[int]    # the transition's id
    host: str
    frm: str                            # "from" in its JSON
    to: str
    section: str                        # its name, "db2: any_to_master"
    state: typing.Optional[str]         # None only while it is made
    reason: typing.Optional[str]
    queued: typing.Optional[float]      # wall clock, as the rest
    started: typing.Optional[float]
    ended: typing.Optional[float]
    env: dict                           # the HA_* its commands get
    commands: list                      # of RunCommand
    rerun_of: typing.Optional[int] = None       # --rerun: the run it repeats
    variables: typing.Optional[dict] = None     # a cluster's: %NAME% for the member that runs it
    node: typing.Optional[str] = None           # a cluster's: the leader that ran it, and its epoch
    epoch: typing.Optional[int] = None
    # A switchover's (SPEC §12): {"from": host, "to": host, "request": its id}; then
    # host is TO, frm and to are the hosts, section [switchover] or [TO: switchover].
    switchover: typing.Optional[dict] = None

    def to_json(self):
        """The state db's value, and the base of the other forms; an optional key is
        left out when it is None (rerun_of, variables; node with epoch)."""
        out = {"id": self.id, "transition": self.transition, "host": self.host, "from": self.frm,
               "to": self.to, "section": self.section, "state": self.state, "reason": self.reason,
               "queued": self.queued, "started": self.started, "ended": self.ended, "env": self.env,
               "commands": [c.to_json() for c in self.commands]}
        if self.rerun_of is not None:
            out["rerun_of"] = self.rerun_of
        if self.variables is not None:
            out["variables"] = self.variables
        if self.node is not None:
            out["node"], out["epoch"] = self.node, self.epoch
        if self.switchover is not None:
            out["switchover"] = self.switchover
        return out

    @staticmethod
    def well_formed(value):
        """Whether a stored ``value`` has the shape a run is written in."""
        return isinstance(value, dict) and isinstance(value.get("id"), int) \
            and value.get("state") in RUN_STATES and isinstance(value.get("env"), dict) \
            and _is_str(value.get("host"), value.get("from"), value.get("to"), value.get("section")) \
            and isinstance(value.get("commands"), list) and all(
                isinstance(c, dict) and isinstance(c.get("argv"), list) and c["argv"] and _is_str(*c["argv"])
                and (c.get("result") is None or isinstance(c["result"], dict))
                for c in value["commands"])

    @classmethod
    def from_json(cls, value, check=True):
        """ValueError when ``value`` is not the shape of a run.  ``check=False``: a value
        already read, maybe partial (summarize_run's), its missing keys as None."""
        if check and not cls.well_formed(value):
            raise ValueError("not a run: %s" % _shorten(value))
        get = value.get
        return cls(get("id"), get("transition"), get("host"), get("from"), get("to"), get("section"),
                   get("state"), get("reason"), get("queued"), get("started"), get("ended"),
                   get("env"), [RunCommand.from_json(c) for c in get("commands") or ()],
                   get("rerun_of"), get("variables"), get("node"), get("epoch"),
                   get("switchover") if isinstance(get("switchover"), dict) else None)

    def to_etcd(self):
        """As etcd keeps it: each command's output cut to ETCD_OUTPUT_CAP (then ``truncated``)."""
        out = self.to_json()
        for cmd in out["commands"]:
            result = cmd.get("result")
            if result and len(result.get("output") or "") > ETCD_OUTPUT_CAP:
                cmd["result"] = dict(result, output=result["output"][:ETCD_OUTPUT_CAP], truncated=True)
        return out

    def to_action(self, confirm):
        """The ``run`` message's run, handed to the action run; ``confirm``: a cluster's
        leader, whose action run asks before each command whether it still may."""
        out = self.to_json()
        if confirm:
            out["confirm"] = True
        return out

    @classmethod
    def from_action(cls, value):
        """The action run's side: (the run, whether it asks before each command)."""
        return cls.from_json(value), bool(value.get("confirm"))

    def summary(self):
        """As --status, --history and the ``run`` verb show it: its environment, variables
        and the commands' timeouts left out; rerun_of always there; node and epoch in a cluster."""
        out = {"id": self.id, "transition": self.transition, "host": self.host, "from": self.frm,
               "to": self.to, "section": self.section, "state": self.state, "reason": self.reason,
               "queued": self.queued, "started": self.started, "ended": self.ended,
               "rerun_of": self.rerun_of,
               "commands": [{"argv": c.argv, "ignore": c.ignore, "where": c.where, "started": c.started,
                             "result": None if c.result is None else c.result.to_json()}
                            for c in self.commands]}
        if self.node is not None:
            out["node"], out["epoch"] = self.node, self.epoch
        if self.switchover is not None:
            out["switchover"] = {"from": self.switchover.get("from"), "to": self.switchover.get("to")}
        return out


# -- The status document ------------------------------------------------------------

class ClusterStatus(typing.NamedTuple):
    """daemon.cluster of --status --json (docs/cluster.md)."""
    name: str
    node: str
    role: str                           # leader | follower | none
    leader: typing.Optional[str]
    epoch: typing.Optional[int]
    quorum: int
    members: dict                       # node -> {"hosts": {host: state}}
    etcd: list                          # [{"endpoint", "ok"}]
    ttl: float
    acting: bool
    requests: typing.Optional[int]
    agent_pid: typing.Optional[int] = None

    def to_wire(self):
        return self._asdict()

    @classmethod
    def offline(cls, settings):
        """When no daemon answers: this member is none of the cluster now."""
        return cls(settings.name, settings.node, "none", None, None, settings.quorum, {},
                   [{"endpoint": url, "ok": False} for url in settings.etcd],
                   settings.ttl, False, None, None)


class DaemonBlock(typing.NamedTuple):
    """daemon of --status --json: the process, its paths, its parts' state."""
    running: bool
    pid: typing.Optional[int]
    version: str
    started: typing.Optional[float]     # wall clock
    uptime: typing.Optional[float]
    config_dir: typing.Optional[str]
    state_dir: str
    lag_ms: typing.Optional[dict]
    http: typing.Optional[str]
    counters: typing.Optional[dict]
    paused: bool
    queue: list
    workers: list
    action_pid: typing.Optional[int]
    ssh: list
    cluster: typing.Optional[ClusterStatus]
    switchover: typing.Optional[dict] = None    # a scheduled one: {from, to, at} (SPEC §12)
    paused_hosts: tuple = ()                    # --pause HOST..., seen or not

    def to_wire(self):
        block = self._asdict()
        if self.cluster is not None:
            block["cluster"] = self.cluster.to_wire()
        return block

    @classmethod
    def offline(cls, state_dir, config, ledger):
        """When no daemon answers: what the state db (``ledger``) and the config say."""
        actions = ledger.daemon_status()
        return cls(False, None, __version__, None, None, config.config_dir if config else None,
                   state_dir, None, None, None, actions["paused"], actions["queue"], [], None, [],
                   ClusterStatus.offline(config.cluster) if config and config.cluster else None,
                   actions.get("switchover"), list(actions.get("paused_hosts") or ()))


class StatusDoc(typing.NamedTuple):
    """The --status --json document.  ``hosts`` (pairs of name and entry) and
    ``checks`` may be generators, made as they are read: convert a StatusDoc once."""
    transitions: list                   # newest first, as the ledger keeps them
    runs: list                          # newest first, summarized
    daemon: DaemonBlock
    hosts: typing.Iterable              # (name, entry), by name
    checks: typing.Iterable             # entries, in the order of the checks

    def to_wire(self):
        """The document as one dict (HTTP, offline --status)."""
        return {"transitions": self.transitions, "runs": self.runs, "daemon": self.daemon.to_wire(),
                "hosts": dict(self.hosts), "checks": list(self.checks)}

    def pieces(self):
        """The document's one JSON line in pieces, byte for byte what to_wire() encodes:
        the hosts and checks a few hundred at a time, as they are made."""
        yield b'{"transitions":' + encode_message(self.transitions)[:-1] + \
            b',"runs":' + encode_message(self.runs)[:-1] + \
            b',"daemon":' + encode_message(self.daemon.to_wire())[:-1] + b',"hosts":'
        yield from json_pieces(self.hosts, as_object=True)
        yield b',"checks":'
        yield from json_pieces(self.checks, as_object=False)
        yield b"}\n"


# ============================================================================
# dumbfiles.py: dbm.dumb's two files (.dat and .dir), read and written in
# dbm.dumb's own format.
# ============================================================================
#
# Owns the byte layout alone: values in 512-byte blocks of .dat, one index line per
# key in .dir (a later line of a key wins), the fixed-size meta:checkpoint record.
# The journal discipline that makes the files safe under kill -9 is the store's.
#
# Uses: the standard library only.

_META_KEY = "meta:checkpoint"
_META_WIDTH = 64


def _blocks(size):
    """Bytes a value of ``size`` takes in .dat: whole 512-byte blocks."""
    return -(-size // 512) * 512


def _index_line(key, pos, size):
    """One line of a dbm.dumb index (.dir), exactly as dbm.dumb writes it.

    dbm.dumb stores a key as UTF-8 and writes that in the index as Latin-1 text.
    """
    return "%r, %r\n" % (key.encode("utf-8").decode("latin-1"), (pos, size))


# Most index lines: a key with no quote, backslash or unprintable byte (repr adds none).
_INDEX_LINE_RE = re.compile(r"'([^'\\]*)', \((\d+), (\d+)\)\Z")
_INDEX_REWRITE_MIN = 4096       # appended index lines tolerated before .dir is rewritten whole


class DumbFiles:
    """The db's two files, read and written as dbm.dumb does (dbm.dumb.open reads them).

    A value starts on a 512-byte boundary of .dat (NUL padding before it); a new
    value, or one grown past its blocks, goes at the end; one that still fits is
    overwritten in place.  .dir holds one line per key, as repr((key, (pos, size))).
    Written here, each checkpoint's new values go in one write, so a checkpoint
    costs a few system calls, not two opens of a file per key.  The Store above it
    decides what is written when; this class only knows the format.
    """

    def __init__(self, base):
        self.base = base
        self.dat_fd = None      # .dat, open for writing (None: not open, or to be made anew)
        self.dat_end = 0
        self.index = {}         # key -> (pos, size): the index recovery used, then the live one
        self.sizes = {}         # key -> bytes its value takes in .dat (512-byte blocks)
        self.live = 0           # their sum: what .dat would take compacted
        self.appended = 0       # index lines appended to .dir since it was last written whole
        self.index_whole = False    # the next write of the index is whole (an append failed)

    def paths(self):
        return [self.base + s for s in (".dat", ".dir", ".bak")]

    # -- reading ---------------------------------------------------------------

    @staticmethod
    def read_index(path):
        """key -> (pos, size) from a dumb index file (None when missing).

        Only lines exactly as dbm.dumb writes them count: a line the disk had no
        room to finish, and the next line appended to it, are skipped.
        """
        import ast
        try:
            with open(path, "r", encoding="latin-1") as f:
                lines = f.read()
        except FileNotFoundError:
            return None
        index = {}
        for line in lines.splitlines():
            try:
                m = _INDEX_LINE_RE.match(line)
                if m:
                    key, pos, size = m.group(1), int(m.group(2)), int(m.group(3))
                else:
                    key, (pos, size) = ast.literal_eval(line)
                    if not isinstance(key, str) or type(pos) is not int or type(size) is not int:
                        raise ValueError("not as dbm.dumb writes it")
                key = key.encode("latin-1").decode("utf-8")
                if _index_line(key, pos, size) != line + "\n" or min(pos, size) < 0:
                    raise ValueError("not as dbm.dumb writes it")
                index[key] = (pos, size)        # a later line of a key replaces an earlier one
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
        return index

    def read_values(self, index):
        """(key -> decoded JSON value, keys whose value does not read back)."""
        values, bad = {}, []
        try:
            with open(self.base + ".dat", "rb") as f:
                end = os.fstat(f.fileno()).st_size
                for key, (pos, size) in index.items():
                    if pos + size > end:
                        bad.append(key)
                        continue
                    f.seek(pos)
                    raw = f.read(size)
                    try:
                        if len(raw) != size:
                            raise ValueError("short")
                        values[key] = json.loads(raw.decode("utf-8"))
                    except (ValueError, UnicodeDecodeError, RecursionError):
                        bad.append(key)
        except FileNotFoundError:
            return {}, list(index)
        return values, bad

    # -- writing ---------------------------------------------------------------

    def open_dat(self):
        self.dat_fd = os.open(self.base + ".dat", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.dat_end = os.fstat(self.dat_fd).st_size
        self.sizes = {key: _blocks(size) for key, (pos, size) in self.index.items()}
        self.live = sum(self.sizes.values())

    def close_dat(self):
        if self.dat_fd is not None:
            try:
                os.close(self.dat_fd)
            except OSError:
                pass
            self.dat_fd = None

    def create(self):
        """New, empty db files: .dat with meta's value, .dir with its line (meta is the
        first key, so an index cut short always lacks it or carries a count that shows
        it is short)."""
        self.close_dat()
        for path in self.paths():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.index, self.appended = {_META_KEY: (0, _META_WIDTH)}, 0
        self.open_dat()
        try:
            self.put_meta()
            self.dat_end = _META_WIDTH
            self.write_index([], True)
        except OSError:
            self.close_dat()            # half made: the next checkpoint makes them anew
            raise

    def put_meta(self):
        """The count of keys the index holds, in its fixed-size value."""
        meta = json.dumps({"keys": len(self.index), "time": int(time.time())}).encode()
        self._pwrite(meta.ljust(_META_WIDTH), self.index[_META_KEY][0])

    def _pwrite(self, data, pos):
        view = memoryview(data)
        while view:
            written = os.pwrite(self.dat_fd, view, pos)
            view, pos = view[written:], pos + written

    def put_values(self, keys, text_of):
        """Write the values of ``keys`` (``text_of(key)``: its JSON text) into .dat; returns
        the keys, whose index lines are then to be written.  New and grown values go at
        the end in one write."""
        grown = []
        for key in keys:
            value = text_of(key).encode("utf-8")
            old = self.index.get(key)
            if old is not None and _blocks(len(value)) <= _blocks(old[1]):
                self._pwrite(value, old[0])
                self.index[key] = (old[0], len(value))
                # The last value of the file may have grown within its blocks.
                self.dat_end = max(self.dat_end, old[0] + len(value))
            else:
                grown.append((key, value))
        tail, end = bytearray(), self.dat_end
        for i, (key, value) in enumerate(grown):
            pos = -(-end // 512) * 512
            tail += bytes(pos - end) + value
            end = pos + len(value)
            grown[i] = (key, (pos, len(value)))
        if tail:
            self._pwrite(tail, self.dat_end)
            self.dat_end = end
            self.index.update(grown)
        for key in keys:
            size = _blocks(self.index[key][1])
            self.live += size - self.sizes.get(key, 0)
            self.sizes[key] = size
        return list(keys)

    def write_index(self, keys, whole):
        """Make the index lines of ``keys`` durable: appended to .dir, or .dir written whole."""
        index = self.index
        whole = whole or self.index_whole or \
            self.appended + len(keys) > max(_INDEX_REWRITE_MIN, len(index))
        self.index_whole = True         # until the write below is whole
        if whole:
            lines = [_index_line(k, pos, size) for k, (pos, size) in index.items()]
            # As dbm.dumb's sync(): the old index becomes .bak, the new one is written.
            try:
                os.unlink(self.base + ".bak")
            except FileNotFoundError:
                pass
            try:
                os.rename(self.base + ".dir", self.base + ".bak")
            except FileNotFoundError:
                pass
        else:
            lines = [_index_line(k, *index[k]) for k in keys]
        text = "".join(lines).encode("latin-1")
        try:
            fd = os.open(self.base + ".dir", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC |
                         (os.O_TRUNC if whole else os.O_APPEND), 0o600)
            try:
                view = memoryview(text)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except OSError:
            if whole:
                # The whole index is in .bak and .dir is cut (disk full): put .bak
                # back, or the next rewrite would delete it for the cut one.
                try:
                    os.replace(self.base + ".bak", self.base + ".dir")
                except OSError:
                    pass
            raise
        self.index_whole = False
        self.appended = 0 if whole else self.appended + len(keys)

    def replace_index(self):
        """.dir made anew from ``index``: written beside it, then renamed over it."""
        with open(self.base + ".dir.tmp", "w", encoding="latin-1") as f:
            f.write("".join(_index_line(k, pos, size) for k, (pos, size) in self.index.items()))
        os.replace(self.base + ".dir.tmp", self.base + ".dir")


# ============================================================================
# store.py: State store: dbm.dumb with a write-ahead journal.
# ============================================================================
#
# The db is a dbm.dumb database (the one dbm format every Python reads): values
# in state.db.dat, an index of one line per key in state.db.dir.  The store writes
# both itself, in dbm.dumb's format (dbm.dumb.open reads them), because dbm.dumb
# is not crash-safe (values change in place, its sync() rewrites the whole index)
# and opens a file twice per key written.  The discipline that makes it safe
# against kill -9 at any moment:
#
#   commit      every change is first appended to state.db.journal as one JSON
#               line in one write(2); from then on it is acknowledged.
#   checkpoint  every few seconds the dirty keys go into .dat (the new and grown
#               ones in one write at its end), the index lines of the keys written
#               are appended to .dir (a later line of a key wins), a fixed-size
#               "meta:checkpoint" records how many keys the index holds, and only
#               then is the journal truncated.  Soft values (last check results) are
#               appended to the journal first, so that every value the db files hold
#               since the last checkpoint is also in the journal: a value overwritten
#               in place and cut short by a crash always has its newer copy there.
#               So a checkpoint costs what changed, not what the db holds.  Once .dir
#               holds more appended lines than keys, or an append failed, it is
#               rewritten whole as dbm.dumb's sync() does it (the old one kept as .bak).
#   recovery    the index is taken from .dir if it holds meta:checkpoint and at
#               least the recorded number of keys (a .dir cut short by a kill while
#               it is rewritten, maybe to nothing, does not), else from .bak (the
#               .dir before that rewrite began, appended lines and all);
#               only lines exactly as dbm.dumb writes them count.  Values that no
#               longer decode were changed since the last checkpoint and come back
#               from the journal, replayed on top; keys that do not come back are
#               deleted, and the journal emptied (a torn last line would otherwise
#               swallow the next commit appended to it).  A value that decodes but
#               does not have the shape the master writes is dropped with a note.
#   disk full   a commit that cannot be written stays in memory (and in --status)
#               and is written with the next commit or checkpoint that can; the
#               outage is logged once, its end too.  A failed journal write makes
#               the next one start a new line; a failed rewrite of .dir puts .bak
#               back (a second one would delete the last whole index); a failed
#               compaction leaves every key dirty.
#   compaction  the space of a value that grew is never reused, so the .dat
#               file is rewritten when it is mostly dead: a full snapshot goes into
#               the journal first, then the db files are recreated from memory.
#               Recovery starts from the newest full snapshot when it finds one, and
#               rebuilds the files from it.
#
# Nothing is ever deleted: history lives in ring slots (tr:N, run:N modulo cap).
#
# Uses: base, wire, records, dumbfiles.

def well_formed(key, value):
    """Whether ``value``, read back from the db, has the shape the master writes at ``key``.

    A value that parses as JSON but is not (a damaged or hand-edited db) would take
    the master down later; recovery drops it instead.
    """
    kind = key.split(":", 1)[0]
    if kind == "host":
        return isinstance(value, dict) and valid_state(value.get("state")) and _is_time(value.get("since")) \
            and (value.get("pending") is None or valid_state(value["pending"])) \
            and isinstance(value.get("count"), int) and _damping_well_formed(value)
    if kind == "tr":
        return Transition.well_formed(value)
    if kind == "run":
        return Run.well_formed(value)
    if key == "queue":
        return isinstance(value, list) and all(isinstance(i, int) for i in value)
    if key == "meta":
        return isinstance(value, dict) and all(isinstance(value.get(k, 1), int)
                                               for k in ("next_transition", "next_run"))
    if key == "notify":                 # the events' counter (NotifyQueue)
        return isinstance(value, dict) and all(isinstance(value.get(k), int) for k in ("next", "done"))
    if kind == "notify":                # an event waiting for its delivery, by seq % its cap
        return isinstance(value, dict) and isinstance(value.get("seq"), int) \
            and isinstance(value.get("kind"), str)
    if key == "switchover":
        return isinstance(value, dict)
    if key == "hostpause":
        return isinstance(value, list) and all(valid_name(h) for h in value)
    if kind == "report":
        return isinstance(value, dict) and _is_time(value.get("time")) and valid_state(value.get("state"))
    if kind == "check" or key in ("reports", "checks"):     # the last two: older dbs, whole dicts
        return isinstance(value, dict)
    return True


def _damping_well_formed(value):
    """A host record's ``window`` and ``recent`` (ledger.confirm_step), when it has them."""
    window, recent = value.get("window"), value.get("recent")
    return (window is None or (isinstance(window, int) and 1 <= window)) \
        and (recent is None or (isinstance(recent, list) and len(recent) <= MAX_WINDOW
                                and all(word is None or valid_state(word) for word in recent)))


class Store:
    """Every durable thing the master knows, as key -> JSON value."""

    def __init__(self, state_dir):
        self.base = os.path.join(state_dir, DB_NAME)
        self.journal_path = self.base + ".journal"
        self.data = {}
        self.dirty = set()
        self.files = DumbFiles(self.base)
        self.jfd = None
        self.notes = []         # what recovery did, for the log
        self.torn = False       # the journal may end in part of a line
        self.unjournaled = set()    # keys whose value is in ``data`` but not the journal
        self.owed = set()           # of those, the committed ones (their write failed: disk full)
        self.encoded = {}           # dirty values as JSON text, made by a checkpoint for its two writes
        self.error = None           # the write error of an outage (disk full), logged once
        self.damage = None          # why the db files cannot be used, when they cannot
        self.created = False        # open() found no db and started a new one

    # -- reading ---------------------------------------------------------------

    def _load_db(self):
        """(values, undecodable keys, index file used or None); damage leaves values empty.

        When neither index is usable, ``self.damage`` says why.
        """
        self.damage = None
        for suffix in (".dir", ".bak"):
            index = self.files.read_index(self.base + suffix)
            if index is None:
                continue
            values, bad = self.files.read_values(index)
            meta = values.get(_META_KEY)
            if not isinstance(meta, dict):
                # Not our index, or a .dir cut (maybe to nothing) by sync(), or damage.
                self.damage = self.damage or ("its data file does not read back" if _META_KEY in bad
                                              else "its index does not parse")
                continue
            if suffix == ".dir" and len(index) < meta.get("keys", 0):
                self.damage = self.damage or "its index is incomplete"
                continue        # a .dir cut short while sync() rewrote it
            # .bak may lack keys whose index line found the disk full: those came
            # after the last checkpoint, so the journal has them.
            self.files.index = index
            return values, [key for key in bad if key != _META_KEY], suffix
        return {}, [], None

    def _read_journal(self):
        try:
            with open(self.journal_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return [], False
        entries, full = [], False
        lines = raw.split(b"\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                entry = json.loads(line.decode("utf-8"))
                if not isinstance(entry["s"], dict):
                    raise TypeError("not an object")
                if entry.get("full"):
                    entries, full = [], True    # a full snapshot replaces all before it
                entries.append(entry["s"])
            except (ValueError, UnicodeDecodeError, KeyError, TypeError, RecursionError):
                if i != len(lines) - 1:
                    self.notes.append("journal line %d is damaged and was skipped" % (i + 1))
        return entries, full

    def load(self):
        """Read db and journal into ``data``.

        Returns (index suffix used or None, journal entries, keys lost, whether the
        journal held a full snapshot).
        """
        values, bad, suffix = self._load_db()
        entries, full = self._read_journal()
        if full:
            values, bad = {}, []        # a compaction was cut short: the snapshot rules
        for entry in [values] + entries:
            for key, value in list(entry.items()):
                if not well_formed(key, value):
                    self.notes.append("%s holds %s, not what hadaemon writes there; dropped"
                                      % (key, _shorten(value)))
                    del entry[key]
        for entry in entries:
            values.update(entry)
        lost = [key for key in bad if key not in values]
        if lost:
            self.notes.append("values of %d keys could not be read and are lost: %s"
                              % (len(lost), ", ".join(sorted(lost)[:10])))
        values.pop(_META_KEY, None)
        self.data = values
        return suffix, entries, lost, full

    @classmethod
    def read(cls, state_dir):
        """A read-only snapshot of the db (for --status when no daemon runs)."""
        store = cls(state_dir)
        store.load()
        return store.data

    # -- opening for writing ---------------------------------------------------

    def _move_aside(self, why):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moved = []
        for path in self.files.paths():
            if os.path.exists(path):
                target = "%s.corrupt-%s%s" % (self.base, stamp, path[len(self.base):])
                os.rename(path, target)
                moved.append(target)
        self.notes.append("state db is damaged (%s); moved aside as %s and recreated"
                          % (why, ", ".join(moved) or "nothing"))

    def open(self):
        """Recover (see above), then open for writing and checkpoint what the journal held."""
        try:
            dat_size = os.path.getsize(self.base + ".dat")
        except OSError:
            dat_size = 0
        # A .dat with no index and nothing past the meta value is a new db whose
        # creation a crash cut short, not a damaged one; so is an empty .dir beside
        # it (dbm.dumb creates the file, then writes meta's line into it).
        try:
            dir_size = os.path.getsize(self.base + ".dir")
        except OSError:
            dir_size = 0
        exists = dat_size > _META_WIDTH or dir_size > 0 or os.path.exists(self.base + ".bak")
        suffix, entries, lost, full = self.load()
        self.jfd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           0o600)
        if full:
            # A compaction was cut short: its snapshot is the state, the files are
            # half-written leftovers.  The db is rebuilt from the snapshot.
            self.notes.append("state db was being rebuilt (compaction, repair) when the daemon "
                              "died; rebuilding it from its snapshot")
            self.checkpoint()
            return
        damage = (self.damage or "its index does not parse") if exists and suffix is None else \
            "unreadable values" if lost and suffix == ".dir" else None
        if damage:
            # What could be read is the state from now on.  It goes into the journal
            # as a full snapshot before the files are moved aside: a crash while the
            # new db is written must not leave only the journal's last few commits.
            self.torn = True            # after a torn last line, start a new one
            self._append({"full": True, "s": self.data})
            self._move_aside(damage)
            self.files.close_dat()           # the next checkpoint writes new files
            self.checkpoint()
            return
        index = dict(self.files.index) if suffix is not None else {}
        # Keys the index holds that recovery did not take: torn by a crash, or behind
        # a full snapshot.  The count in meta goes down first: an index that holds
        # more keys than it says is whole, one that holds fewer is not.
        stale = [key for key in index if key != _META_KEY and key not in self.data]
        for key in stale:
            del index[key]
        self.created = not exists and not entries
        if suffix is None:
            self.files.create()
        else:
            self.files.index = index
            self.files.open_dat()
            if stale:
                self.files.put_meta()
            if suffix == ".bak":
                self.notes.append("state db index was cut short by a crash; using its backup")
            # The lines recovery used, whole (dbm.dumb reads .dir strictly, and the
            # lines appended since it was last written whole go).
            self.files.replace_index()
        if entries or suffix != ".dir" or lost:
            self.dirty = set(self.data) if suffix != ".dir" or lost else \
                {k for e in entries for k in e}
            self.checkpoint()
        if os.fstat(self.jfd).st_size:
            # Only damaged lines are left (a torn last write): the next commit would be
            # glued to one of them and be lost with it.
            os.ftruncate(self.jfd, 0)

    def _append(self, entry):
        self._append_text(_ENCODE(entry))

    def _append_text(self, text):
        line = text.encode("utf-8")
        if self.torn:           # the last append failed part-way (disk full): end that line first
            line = b"\n" + line
        view = memoryview(line + b"\n")
        self.torn = True
        while view:
            written = os.write(self.jfd, view)
            view = view[written:]
        self.torn = False

    def _trouble(self, exc):
        if self.error is None:
            log.error("state db: cannot write in %s: %s; changes are kept in memory and "
                      "written as soon as it can", os.path.dirname(self.base), exc.strerror or exc)
        self.error = exc

    def commit(self, changes):
        """Make ``changes`` (key -> JSON value) durable against a crash of this process.

        If the journal cannot be written (disk full), the changes stay in memory and
        go to disk with the next commit or checkpoint that can write.
        """
        self.data.update(changes)
        self.dirty.update(changes)
        self.unjournaled.update(changes)
        self.owed.update(changes)
        for key in changes:
            self.encoded.pop(key, None)
        try:
            # Only what was committed: the soft values wait for the checkpoint, which
            # journals them before it writes (a transition's commit would otherwise
            # encode every check's last since the checkpoint, and its action wait).
            self._journal(self.owed)
        except OSError as exc:
            self._trouble(exc)
            return
        self.unjournaled.difference_update(self.owed)
        self.owed.clear()

    def soft(self, key, value):
        """Keep ``value`` at the next checkpoint; a crash may lose it (last check results).

        It is encoded by the checkpoint, not as it comes: a check that runs ten times
        between two checkpoints costs one encoding, not ten.  So ``value`` must not be
        changed after (every caller passes a new one).
        """
        self.data[key] = value
        self.encoded.pop(key, None)
        self.dirty.add(key)
        self.unjournaled.add(key)

    def _text(self, key):
        """The JSON text of ``key``'s value."""
        text = self.encoded.get(key)
        return _ENCODE(self.data[key]) if text is None else text

    def _journal(self, keys):
        """Append the values of ``keys`` to the journal, one line."""
        self._append_text('{"s":{%s}}' % ",".join(_ENCODE(key) + ":" + self._text(key) for key in keys))

    def checkpoint(self):
        """Write dirty keys into the dumb db, sync its index, then empty the journal.

        An OSError (disk full) is logged once per outage and raised; everything
        stays dirty and in memory for the next try.
        """
        try:
            self._checkpoint()
        except OSError as exc:
            self._trouble(exc)
            raise
        if self.error is not None:
            log.warning("state db: writing again; everything kept in memory is on disk")
            self.error = None

    def _checkpoint(self):
        rebuild = self.files.dat_fd is None
        if rebuild:
            # New files, from memory: after a compaction cut short by a crash, or
            # after a damaged db was moved aside.  (Even with nothing in them, the
            # index write below ends with the journal and its snapshot emptied.)
            self.dirty = set(self.data)     # first: whatever fails below, all are written later
            self.files.create()
        if not self.dirty and not rebuild:
            return
        try:
            self._write_dirty(rebuild)
        finally:
            self.encoded.clear()
        if self.files.dat_end > max(1 << 20, 4 * self.files.live):
            self.compact()

    def _write_dirty(self, rebuild):
        # Each dirty value encoded once, for the journal and the db files alike.
        self.encoded = {key: _ENCODE(self.data[key]) for key in self.dirty}
        if self.unjournaled:
            # Values are about to change in the db files in place: each must have
            # its copy in the journal until the index is written.
            self._journal(self.unjournaled)
            self.unjournaled.clear()
            self.owed.clear()
        try:
            self.files.write_index(self.files.put_values(sorted(self.dirty), self._text), rebuild)
            # The count of keys last: a .dir that holds fewer is one cut short.
            self.files.put_meta()
        except OSError:
            # .dir may end in part of a line: an append would be glued to it.  The
            # next checkpoint writes it whole.
            self.files.index_whole = True
            raise
        os.ftruncate(self.jfd, 0)
        self.dirty.clear()

    def compact(self):
        """Recreate the db files from memory, the journal holding a full snapshot meanwhile."""
        before = self.files.dat_end
        self._append({"full": True, "s": self.data})
        self.unjournaled.clear()
        self.owed.clear()
        # From here every key is dirty, so whatever fails below (the disk full), the
        # next checkpoint writes them all before it drops the snapshot from the journal.
        self.dirty = set(self.data)
        self.files.close_dat()               # the next checkpoint makes the files anew
        self.checkpoint()
        self.notes.append("state db compacted: %d -> %d bytes" % (before, self.files.dat_end))

    def close(self):
        if self.jfd is not None:
            try:
                if self.files.dat_fd is not None:
                    self.checkpoint()
                    # As dbm.dumb's close(): .dir whole, the one before kept as .bak.
                    self.files.write_index([], True)
            finally:
                self.files.close_dat()
                os.close(self.jfd)
                self.jfd = None


# ============================================================================
# proc.py: Running a process: its own session, bounded output, deadline, group
# kill.
# ============================================================================
#
# Owns run_process (what a worker does to run a check and an action run to run a
# command): a new session, stdout and stderr read up to OUTPUT_CAP, a deadline then
# SIGTERM, a grace then SIGKILL of the whole group; the pid shared with the master
# so a dead worker's check is killed too (ChildWatch, CommandLease).
#
# Uses: base.

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


# ============================================================================
# children.py: What the forked children run: the check worker and the action
# run.
# ============================================================================
#
# Owns child_setup (every child's first step), the check Worker (the jobs it is
# handed, each run at its time; unchanged results held a while to go together),
# action_main (one sequence of commands, run serially, each start and end reported),
# and the expansion of %MASTER%, %SLAVE%, %HOST% and friends in a section's commands.
#
# Uses: base, wire, records, proc.

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


# ============================================================================
# ssh.py: Remote checks: the ssh: scope.
# ============================================================================
#
# A check of an [ssh:...] group is the local ssh client, run by a worker like any
# check: the script file is its stdin and the remote command starts the script's
# interpreter over there.  Connections are reused through one ssh master
# connection per target, which the daemon's master process owns (SshMasters):
#
#   - it is a plain child of the master, ``ssh -M -N -o ControlPersist=no``,
#     started with the daemon, started again (with a backoff) whenever it exits,
#     stopped with SIGTERM at stop, and by the kernel if the daemon dies
#     (PR_SET_PDEATHSIG);
#   - checks run ``ssh -o ControlMaster=no -o ControlPath=...``: while the master's
#     socket is there they ride its connection; when it is not they connect on
#     their own, so a check always reports what ssh itself sees.
#
# Not ControlMaster=auto with ControlPersist in the checks: the first check's ssh
# would fork the master, which daemonizes into a session of its own, escapes the
# kill of the check's process group and outlives the daemon; and two checks
# starting at once race to become the master.
#
# Uses: base, children.

_SHELLS = {"sh", "bash", "dash", "ksh", "zsh", "ash", "mksh", "busybox"}
_SUN_PATH = 108                 # sizeof(sockaddr_un.sun_path) on Linux, its NUL included
_CONTROL_SUFFIX = 17            # ssh binds "PATH.<16 random chars>" first, then renames
SSH_RETRY_MAX = 30.0            # the longest wait before connecting a lost master again


def remote_interpreter(path):
    """The words of a script's #! line (``sh`` when it has none)."""
    try:
        with open(path, "rb") as f:
            first = f.readline(512)
    except OSError:
        first = b""
    if first.startswith(b"#!"):
        words = first[2:].decode("utf-8", "replace").split()
        if words:
            return words
    return ["sh"]


def remote_run(interp):
    """The remote words that run a script read from stdin with the #! words ``interp``."""
    prog = interp[0]
    if os.path.basename(prog) == "env":             # #!/usr/bin/env [-S] python3
        prog = next((w for w in interp[1:] if not w.startswith("-")), prog)
    if os.path.basename(prog) in _SHELLS:
        return list(interp) + ["-s", "--"]          # sh -s -- ARGS: the rest are $1...
    return list(interp) + ["-"]                     # python3 - ARGS, perl - ARGS, ...


def ssh_control_path(group, state_dir):
    """The control socket for the group's target, in the state dir; None when too long.

    Named by a hash of all that makes the connection (target, key, options), so the
    groups that share them share one master connection.
    """
    import hashlib
    key = json.dumps([group.scope.name, group.ssh_identity, list(group.ssh_options),
                      group.connect_timeout])
    path = os.path.join(state_dir, "ssh-" + hashlib.sha256(key.encode()).hexdigest()[:10])
    return path if len(path) + _CONTROL_SUFFIX < _SUN_PATH else None


def ssh_argv(group, control):
    """ssh with the group's settings, up to the host.

    ssh keeps the first value it reads for an option: ``control`` and the scope's
    user and port come before ``ssh_options`` and cannot be changed by them; the
    defaults after them (host key checking, timeouts) can.
    """
    scope = group.scope
    argv = [shutil.which("ssh") or "/usr/bin/ssh", "-o", "BatchMode=yes"] + list(control)
    if scope.port:
        argv += ["-p", str(scope.port)]
    if scope.user:
        argv += ["-l", scope.user]
    argv += list(group.ssh_options)
    argv += ["-o", "StrictHostKeyChecking=yes",
             "-o", "ConnectTimeout=%d" % max(1, round(group.connect_timeout))]
    if group.ssh_identity:
        argv += ["-i", group.ssh_identity, "-o", "IdentitiesOnly=yes"]
    return argv


def _control_option(path):
    # ssh expands %-tokens in ControlPath and splits the value on blanks unless quoted.
    return 'ControlPath="%s"' % path.replace("%", "%%") if path else "ControlPath=none"


def ssh_command(check, env, state_dir):
    """(argv, stdin path) that run ``check`` on its group's host through ssh.

    The script is read locally and fed to the remote interpreter on stdin; its
    arguments and the HA_* variables are quoted into the remote command line.
    Over there the check runs under ``timeout`` when the host has one (coreutils,
    busybox), so a hung check dies there too: killing the local ssh at the
    timeout does not kill what it started on the remote host.
    """
    import shlex
    group = check.group
    control = ssh_control_path(group, state_dir)
    argv = ssh_argv(group, ["-o", "ControlMaster=no", "-o", _control_option(control)])
    run = remote_run(remote_interpreter(check.argv[0])) + list(check.argv[1:])
    guard = ('command -v timeout >/dev/null 2>&1 && exec timeout -s KILL %d "$@"; exec "$@"'
             % (int(group.timeout) + 2))
    assignments = ["%s=%s" % (k, shlex.quote(v)) for k, v in sorted(env.items())]
    remote = "cd && exec env %s sh -c %s hadaemon %s" % (
        " ".join(assignments), shlex.quote(guard), " ".join(shlex.quote(w) for w in run))
    return argv + ["-T", group.scope.host, remote], check.argv[0]


def ssh_master_command(group, control):
    """The argv of the master connection for ``group``'s target, on socket ``control``."""
    alive = max(1, round(group.connect_timeout))
    return ssh_argv(group, ["-o", "ControlMaster=yes", "-o", _control_option(control),
                            "-o", "ControlPersist=no"]) + [
        "-o", "ServerAliveInterval=%d" % alive, "-o", "ServerAliveCountMax=3",
        "-N", "-T", group.scope.host]


def ssh_master_main(argv, log_path, config_dir, parent):
    """A forked child of the master that becomes one ssh master connection (exec)."""
    child_setup()
    os.chdir(config_dir)                # relative paths in ssh settings: as for the checks
    try:
        import ctypes                   # PR_SET_PDEATHSIG: go when the daemon goes, even by kill -9
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        return 0                        # the daemon died before the line above
    null = os.open(os.devnull, os.O_RDWR)
    err = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for fd, target in ((0, null), (1, null), (2, err)):
        os.dup2(target, fd)
    os.close(null)
    os.close(err)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.execv(argv[0], argv)


def _last_line(path):
    try:
        with open(path, "rb") as f:
            lines = f.read()[-4096:].decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return None
    return lines[-1].strip() if lines else None


@dataclasses.dataclass
class SshMaster:
    """One target's master connection, as the daemon's master process keeps it."""
    scope: str                          # the section name, for the log
    argv: list
    control: str                        # its ControlPath
    child: object = None                # the Pool's Child running ssh -M, while it runs
    since: float = 0.0                  # wall clock: when it (last) connected
    connected: bool = False             # its control socket has appeared
    failures: int = 0                   # exits in a row without connecting: the backoff
    retry_at: float = 0.0               # monotonic
    wanted: bool = True                 # False: being stopped, forgotten once reaped


class SshMasters:
    """The master connections of the daemon, one per ssh target of the config."""

    def __init__(self, state_dir):
        self.state_dir = state_dir
        self.masters = {}               # control path -> SshMaster
        self.config = None

    def targets(self, config):
        """control path -> (scope name, master argv) for every ssh target with checks."""
        wanted = {}
        for check in config.checks:
            group = check.group
            if group.scope.kind != "ssh":
                continue
            control = ssh_control_path(group, self.state_dir)
            if control is None:
                if self.config is None:
                    log.warning("[%s]: the state dir path %s is too long for an ssh control "
                                "socket: its checks run without connection reuse",
                                group.scope.name, self.state_dir)
                continue
            wanted.setdefault(control, (group.scope.name, ssh_master_command(group, control)))
        return wanted

    def maintain(self, config, now, fork):
        """Follow the config, start what is missing, notice what has connected."""
        if config is not self.config:
            wanted = self.targets(config)
            self.config = config
            for control, master in self.masters.items():
                master.wanted = control in wanted
                if not master.wanted and master.child is not None:
                    log.info("ssh %s: master connection (pid %d) no longer in the config; "
                             "stopping it", master.scope, master.child.pid)
                    self.stop(master)
            for control, (scope, argv) in wanted.items():
                self.masters.setdefault(control, SshMaster(scope, argv, control))
        for master in list(self.masters.values()):
            if not master.wanted:
                if master.child is None:
                    del self.masters[master.control]
            elif master.child is None:
                if now >= master.retry_at:
                    self.start(master, fork, config.config_dir)
            elif not master.connected and _is_socket(master.control):
                master.connected, master.failures, master.since = True, 0, time.time()
                log.info("ssh %s: master connection up (pid %d); checks reuse it",
                         master.scope, master.child.pid)

    def start(self, master, fork, config_dir):
        try:
            os.unlink(master.control)   # a stale socket would stop the new master listening
        except FileNotFoundError:
            pass
        child = fork("ssh", ssh_master_main, master.argv, master.control + ".log",
                     config_dir, os.getpid())
        if child is None:
            master.retry_at = time.monotonic() + 1.0
            return
        child.state = "running"
        master.child = child
        log.debug("ssh %s: connecting the master connection (pid %d)", master.scope, child.pid)

    def stop(self, master):
        """SIGTERM (ssh removes its socket); the master's loop sends SIGKILL 5 s later."""
        child = master.child
        if child is not None and not child.signalled:
            child.signal(signal.SIGTERM, time.monotonic() + 5.0)

    def stop_all(self):
        for master in self.masters.values():
            master.wanted = False
            self.stop(master)

    def reaped(self, child, how):
        """A master connection exited: forget it, or connect again after a backoff."""
        master = next((m for m in self.masters.values() if m.child is child), None)
        if master is None:
            return
        master.child = None
        try:
            os.unlink(master.control)   # left behind by a SIGKILL
        except FileNotFoundError:
            pass
        if not master.wanted:
            return
        why = _last_line(master.control + ".log")
        master.failures += 1
        delay = min(SSH_RETRY_MAX, 2.0 ** (master.failures - 1))
        master.retry_at = time.monotonic() + delay
        log.warning("ssh %s: master connection %s (%s%s); connecting again in %s", master.scope,
                    "lost" if master.connected else "failed", how, ": " + why if why else "",
                    format_duration(delay))
        master.connected = False

    def status(self):
        return [{"scope": m.scope, "pid": m.child.pid if m.child else None,
                 "connected": m.connected, "since": m.since if m.connected else None,
                 "control": m.control} for m in self.masters.values()]


def _is_socket(path):
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def connect_ssh_targets(config):
    """Connect once to every ssh group's target (``ssh ... true``), all at once.

    Returns [(group, error or None, seconds)], each bounded by the group's
    connect_timeout plus 5 s.
    """
    import subprocess
    tries, seen = [], set()
    for group in config.groups:
        key = (group.scope.name, group.ssh_identity, group.ssh_options, group.connect_timeout)
        if group.scope.kind != "ssh" or key in seen:
            continue
        seen.add(key)
        argv = ssh_argv(group, ["-o", "ControlPath=none"]) + ["-T", group.scope.host, "true"]
        started = time.monotonic()
        try:
            proc = subprocess.Popen(argv, cwd=config.config_dir, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    start_new_session=True)
        except OSError as exc:
            tries.append((group, None, started, "cannot start %s: %s" % (argv[0], exc.strerror)))
            continue
        tries.append((group, proc, started, None))
    results = []
    for group, proc, started, error in tries:
        if proc is not None:
            limit = group.connect_timeout + 5.0
            try:
                _, err = proc.communicate(timeout=max(0.0, started + limit - time.monotonic()))
            except subprocess.TimeoutExpired:
                killpg_quietly(proc.pid, signal.SIGKILL)
                proc.communicate()
                error = "no answer within %s" % format_duration(limit)
            else:
                lines = err.decode("utf-8", "replace").strip().splitlines()
                if proc.returncode:
                    error = lines[-1] if lines else "ssh exited %d" % proc.returncode
        results.append((group, error, time.monotonic() - started))
    return results


# ============================================================================
# ledger_store.py: Ledger stores: where the ledger's decisions are kept, and
# the local one.
# ============================================================================
#
# The Ledger (ledger.py) decides; a store keeps what it decided.  One decision of
# the rules is one Changes: one journal line in a LocalStore (a daemon alone, its
# own state db), part of one txn guarded by the leader's key in an EtcdStore (a
# cluster member, cluster_ledger.py; docs/cluster.md).  A LedgerStore answers:
#
#   load(cap)           the ledger as stored, a Snapshot (at start)
#   reread(cap)         the same, as the store holds it now; what was gathered and
#                       not sent is dropped (a cluster member: what etcd holds)
#   put(changes, cap)   keep a change set: at once (local), or in the txn being
#                       gathered (etcd); never fails back to the rules
#   put_report(h, r)    a host's last report (soft: a crash may lose it)
#   flush()             send what is gathered: a ticket, None when nothing may be
#                       written; durable(ticket) says when the store has it
#   paused(), set_paused(flag)    the pause of actions
#   paused_hosts(), set_hosts_paused(hosts, flag)   the pause of some hosts' actions
#                       (SPEC §12: any member may write it, as the pause)
#   publish_view(view)  a shared store only: what this member sees
#
# ``shared`` is the one mode bit of the rules: True when other members read this
# ledger (docs/cluster.md: each member confirms for itself, the leader accepts).
#
# Uses: records.

class Changes:
    """One change set of the rules; the store lays out its keys."""

    __slots__ = ("hosts", "transitions", "runs", "queue", "meta", "switchover")

    def __init__(self, hosts=None, runs=None, queue=None, meta=None, switchover=None):
        self.hosts = hosts or {}        # host -> its record {state, since, pending, count}
        self.transitions = []           # Transitions
        self.runs = runs or {}          # run id -> Run
        self.queue = queue              # the whole queue (run ids), when it changed
        self.meta = meta                # {"next_transition", "next_run"}, when they changed
        self.switchover = switchover    # the switchover book (switchover.py), when it changed

    def __bool__(self):
        return bool(self.hosts or self.transitions or self.runs) or \
            self.queue is not None or self.meta is not None or self.switchover is not None


def _by_id(data, prefix, record):
    """The ``record``s (Transition, Run) of the keys PREFIXn in ``data``, by id (the
    values were checked where they were read: Store.load, ledger_from_etcd)."""
    return sorted((record.from_json(v) for k, v in data.items() if k.startswith(prefix)),
                  key=lambda r: r.id)


class Snapshot(typing.NamedTuple):
    """The ledger as a store holds it: every transition and run it has, oldest first."""
    meta: dict                  # next_transition, next_run
    hosts: dict
    reports: dict
    transitions: list          # Transitions
    runs: list                 # Runs
    queue: list
    switchover: dict           # the switchover book (switchover.py): scheduled, expected, seen

    @classmethod
    def from_db(cls, data):
        """From the state db's key -> value ``data`` (the local db, or etcd's as its keys)."""
        meta = dict(data.get("meta") or {})
        meta.pop("paused", None)
        # One key per host (report:HOST); an older db has them all in one key, ``reports``.
        reports = dict(data.get("reports") or {})
        reports.update((k[7:], v) for k, v in data.items() if k.startswith("report:"))
        return cls(meta=meta,
                   hosts={k[5:]: v for k, v in data.items() if k.startswith("host:") and isinstance(v, dict)},
                   reports=reports, transitions=_by_id(data, "tr:", Transition), runs=_by_id(data, "run:", Run),
                   queue=list(data.get("queue") or []),
                   switchover=dict(data.get("switchover") or {}))


class LedgerStore:
    """Where the ledger is kept; see the comment above."""

    shared = False

    def publish_view(self, view):
        raise AssertionError("only a shared ledger publishes a view")


def db_changes(changes, cap):
    """A Changes as the state db's keys: host:H, tr:N, run:N (N = id % cap), queue, meta."""
    out = {"host:" + host: record for host, record in changes.hosts.items()}
    for tr in changes.transitions:
        out["tr:%d" % (tr.id % cap)] = tr.to_json()
    for run_id, run in changes.runs.items():
        out["run:%d" % (run_id % cap)] = run.to_json()
    if changes.queue is not None:
        out["queue"] = changes.queue
    if changes.switchover is not None:
        out["switchover"] = changes.switchover
    return out


class LocalStore(LedgerStore):
    """The ledger in this daemon's own state db (a Store): every put is one journal
    line, durable before it returns."""

    def __init__(self, store, data=None):
        self.store = store              # None: a read-only copy of ``data`` (offline --status)
        self._data = data

    @classmethod
    def of_data(cls, data):
        return cls(None, data)

    @property
    def data(self):
        return self.store.data if self.store is not None else self._data

    def load(self, cap=None):
        snapshot = Snapshot.from_db(self.data)
        if self.store is not None and self.data.get("reports"):
            for host, report in snapshot.reports.items():   # one key per host from now on
                self.store.soft("report:" + host, report)
            self.store.soft("reports", {})
        return snapshot

    def reread(self, cap=None):
        return Snapshot.from_db(self.data)

    def put(self, changes, cap):
        out = db_changes(changes, cap)
        if changes.meta is not None:
            out["meta"] = dict(changes.meta, paused=self.paused())
        self.store.commit(out)

    def put_report(self, host, report):
        self.store.soft("report:" + host, report)

    def flush(self):
        return 0

    def durable(self, ticket):
        return True

    def paused(self):
        return bool((self.data.get("meta") or {}).get("paused"))

    def set_paused(self, paused):
        self.store.commit({"meta": dict(self.data.get("meta") or {}, paused=bool(paused))})
        return self.paused()

    def paused_hosts(self):
        return set(self.data.get("hostpause") or ())

    def set_hosts_paused(self, hosts, paused):
        now = self.paused_hosts()
        now = now | set(hosts) if paused else now - set(hosts)
        self.store.commit({"hostpause": sorted(now)})
        return now


# ============================================================================
# switchover.py: Switchover: the planned move of a role from one host to
# another (SPEC §12).
# ============================================================================
#
# Owns the rules of ``--switchover TO [--from FROM] [--at TIME]`` and of its answer,
# for a daemon alone and a cluster member alike (the Ledger and its store keep what
# they decide; nothing here knows whether that is the state db or etcd):
#
#   refusal()         why a switchover cannot be now, in words that say what to fix;
#                     checked when asked, when a scheduled one comes due, and again
#                     when its run starts (a refusal then fails the run, unrun)
#   cannot_start()    why a run may not start: that refusal, or a pause (global, or
#                     of the run's host: --pause HOST)
#   the book          what the ledger keeps of switchovers besides their runs, one
#                     JSON value (``switchover`` in the state db, ledger/switchover in
#                     etcd): ``scheduled`` {from, to, at, request, asked} or None,
#                     ``expect`` {run, from, to, until, from_done, to_done} or None,
#                     ``seen`` the last request a cluster's leader took
#   expected()        whether a transition is one of the switchover's own (FROM's
#                     first out of the role, TO's first into it, from the run's start
#                     until ``switchover_settle`` after it ended ok): recorded, no
#                     section runs
#   SwitchoverDesk    the master's part: the control verbs (``switchover``,
#                     ``hostpause``), and each pass of the loop, for the acting
#                     daemon (alone, or the cluster's leader), the request a member
#                     stored in etcd and a scheduled switchover that came due
#
# A cluster's member answers from its copy of the ledger and stores the request in
# etcd (``switchover`` under the cluster's prefix); the leader takes it from there.
#
# The moments a notification will tell (SPEC §12: ``switchover`` events scheduled,
# cancelled, missed) all pass through SwitchoverDesk.event().
#
# Uses: base, records, children.

MISSED_AFTER = 60.0         # a scheduled switchover this late when a daemon first can act: dropped
REPORT_AGE = 3              # TO's last report may be this many of its check intervals old
CRON_INTERVAL = 60.0        # the interval a cron group counts as (a minute at most, as cron's)
ACTIVE_RUN = ("queued", "running")


def parse_at(text, now):
    """--at TIME as epoch seconds: ``HH:MM`` (the next such local time), ``YYYY-MM-DD HH:MM``
    (local time) or ``+DURATION``.  ValueError says what is wrong."""
    text = " ".join(str(text).split())
    if text.startswith("+"):
        return now + parse_duration(text[1:])
    base = datetime.datetime.fromtimestamp(now)
    for form in ("%H:%M", "%Y-%m-%d %H:%M"):
        try:
            when = datetime.datetime.strptime(text, form)
        except ValueError:
            continue
        if form == "%H:%M":
            when = base.replace(hour=when.hour, minute=when.minute, second=0, microsecond=0)
            if when.timestamp() <= now:
                when += datetime.timedelta(days=1)
        return when.timestamp()
    raise ValueError("bad TIME %r: write HH:MM, YYYY-MM-DD HH:MM (local time) or +DURATION "
                     "(+10m)" % text)


def new_request_id():
    """A request's id: unique enough across members and restarts."""
    return os.urandom(6).hex()


def _interval_of(config, host, report):
    """The check interval of the check that last reported ``host``."""
    checks = [c for c in config.checks if report and c.name == report.get("check")]
    checks = [c for c in checks if c.host == host] or checks
    if not checks:
        return config.daemon.interval
    return min(CRON_INTERVAL if c.group.cron is not None else c.group.interval for c in checks)


def _seconds(value):
    return "%g s" % round(value, 1) if value < 10 else "%d s" % value


def refusal(ledger, frm, to, now, run=None, request=None):
    """(why a switchover to ``to`` cannot be now, or None; FROM as it would be).

    ``frm``: --from, or None (the one host in the role).  ``run``: the switchover's own
    run, when it starts; ``request``: its request, when its schedule comes due (neither
    counts as another switchover).
    """
    config, d = ledger.config, ledger.config.daemon
    role, candidate = d.switchover_role, d.switchover_candidate
    if config.switchover_section(to) is None:
        return ("%s has no [switchover] section (nor [%s: switchover]): add one with the commands "
                "that move the %s role" % (os.path.join(config.config_dir, "actions.conf"), to, role)), frm
    if to not in ledger.hosts:
        return ("%s has never been seen: no check has reported it (hosts known: %s)" % (
            to, ", ".join(sorted(ledger.hosts)) or "none")), frm
    holders = sorted(ledger.by_state.get(role, ()))
    state = ledger.state_of(to)
    if state == role:
        return "%s is already %s (switchover_role = %s): nothing to move" % (to, role, role), frm
    if state != candidate:
        return ("%s is %s, not %s (switchover_candidate = %s): only a %s can take the %s role"
                % (to, state, candidate, candidate, candidate, role)), frm
    if len(holders) != 1:
        return ("%s hosts are %s%s (switchover_role = %s): a switchover moves the role from the "
                "one host that holds it" % (len(holders) or "no", role,
                                            " (%s)" % ", ".join(holders) if holders else "", role)), frm
    if frm is not None and frm != holders[0]:
        return "--from %s, but %s is the %s (leave out --from, or name %s)" % (
            frm, holders[0], role, holders[0]), frm
    frm = holders[0]
    report = ledger.reports.get(to)
    interval = _interval_of(config, to, report)
    if report is None or not isinstance(report.get("time"), (int, float)):
        return "%s has no report from this daemon's checks: is its check running? (hadaemon --status)" \
            % to, frm
    if now - report["time"] > REPORT_AGE * interval:
        return ("%s's last report is %s old (its check interval is %s): is its check running? "
                "(hadaemon --status)" % (to, _seconds(now - report["time"]), _seconds(interval))), frm
    if ledger.paused:
        return "actions are paused (hadaemon --resume, then ask again)", frm
    paused = sorted(ledger.store.paused_hosts() & {frm, to})
    if paused:
        return "actions are paused for %s (hadaemon --resume %s, then ask again)" % (
            " and ".join(paused), " ".join(paused)), frm
    own = run.switchover.get("request") if run is not None else request
    for other in ledger.runs.values():
        if other.switchover and other.state in ACTIVE_RUN and other is not run:
            return ("switchover run #%d (%s -> %s) is %s: wait for it to end, or hadaemon "
                    "--switchover --cancel" % (other.id, other.frm, other.to, other.state)), frm
    scheduled = ledger.book.get("scheduled")
    if scheduled and scheduled.get("request") != own:
        return ("a switchover %s -> %s is scheduled at %s: hadaemon --switchover --cancel first"
                % (scheduled["from"], scheduled["to"], format_time(scheduled["at"]))), frm
    return None, frm


def cannot_start(ledger, run, now):
    """(state, reason) when ``run`` may not start now (or be queued), else None: a
    switchover's refusal fails it; a pause, global or of its host, skips it."""
    if run.switchover:
        reason, _ = refusal(ledger, run.frm, run.to, now, run)
        return ("failed", reason) if reason else None
    if ledger.paused:
        return "skipped", "paused"
    if run.host in ledger.store.paused_hosts():
        return "skipped", "paused %s" % run.host
    return None


def switchover_plan(ledger, frm, to, config):
    """(section, env, commands or [], error) of a switchover from ``frm`` to ``to``, expanded
    against the states of now: %FROM%, %TO% and %HOST% (= TO) name hosts here."""
    section = config.switchover_section(to)
    if section is None:
        return None, {}, [], "no [switchover] section (nor [%s: switchover]) in %s" % (
            to, os.path.join(config.config_dir, "actions.conf"))
    variables = action_variables(to, frm, to, ledger.states())
    plan = plan_run(section, to, frm, to, None, config.config_dir, ledger.state_dir, variables)
    return section, dict(plan.env, HA_TRANSITION="switchover"), plan.commands, plan.error


def switchover_run(ledger, run_id, frm, to, request, now):
    """Run ``run_id``: the switchover from host ``frm`` to ``to``, its commands as they would
    be now (made again when it starts), not yet queued."""
    section, env, commands, _ = switchover_plan(ledger, frm, to, ledger.config)
    return Run(run_id, None, to, frm, to, section.name if section else "switchover", None, None,
               now, None, None, dict(env, HA_RUN_ID=str(run_id)), [RunCommand.from_json(c) for c in commands],
               switchover={"from": frm, "to": to, "request": request})


def switchover_commands(ledger, run, config):
    """The commands of switchover ``run`` as it starts, expanded against the states of now
    (its env's HA_MASTER, HA_SLAVE with them).  ValueError says why it cannot start."""
    section, env, _, _ = switchover_plan(ledger, run.frm, run.to, config)
    if section is None:
        raise ValueError("no [switchover] section (nor [%s: switchover]) in this daemon's %s"
                         % (run.to, os.path.join(config.config_dir, "actions.conf")))
    commands = expand_commands(section, action_variables(run.to, run.frm, run.to, ledger.states()))
    run.env = dict(run.env, HA_MASTER=env["HA_MASTER"], HA_SLAVE=env["HA_SLAVE"])
    return [RunCommand.from_json(c) for c in commands]


def expected(book, host, old, new, role, now):
    """The switchover run whose own transition this is (host: old -> new), or None; the
    book is marked (each of the two is expected once)."""
    exp = book.get("expect")
    if not exp or (exp.get("until") is not None and now > exp["until"]):
        return None
    if host == exp["from"] and old == role and new != role and not exp.get("from_done"):
        book["expect"] = dict(exp, from_done=True)
        return exp["run"]
    if host == exp["to"] and new == role and old != role and not exp.get("to_done"):
        book["expect"] = dict(exp, to_done=True)
        return exp["run"]
    return None


def run_moved(book, run, state, now, settle):
    """A switchover run changed state: the expectation of its own transitions begins when
    it starts, lasts ``settle`` after it ended ok, ends when it failed or was interrupted."""
    exp = book.get("expect")
    if state == "running":
        book["expect"] = {"run": run.id, "from": run.frm, "to": run.to, "until": None,
                          "from_done": False, "to_done": False}
    elif exp and exp.get("run") == run.id:
        if state == "ok":
            book["expect"] = dict(exp, until=now + settle)
        elif state in ("failed", "interrupted"):
            book["expect"] = None


def scheduled_view(book):
    """daemon.switchover of --status --json: {from, to, at} or None."""
    sched = book.get("scheduled")
    return {"from": sched["from"], "to": sched["to"], "at": sched["at"]} if sched else None


class SwitchoverDesk:
    """The master's part for --switchover and --pause HOST: see the comment above."""

    VERBS = ("switchover", "hostpause")

    def __init__(self, ledger, leadership):
        self.ledger = ledger
        self.leadership = leadership    # actions.Alone, or a cluster member's ClusterLink
        self.since = None               # when this daemon first could act (wall clock)

    def event(self, what, sched):
        """A moment of a scheduled switchover: ``scheduled``, ``cancelled`` or ``missed``
        (SPEC §12: a ``switchover`` event; its one call point)."""
        log.warning("switchover %s: %s -> %s at %s", what, sched.get("from"), sched.get("to"),
                    format_time(sched.get("at")))
        self.ledger.notify("switchover", event=what, to=sched.get("to"), at=sched.get("at"),
                           **{"from": sched.get("from")})

    # -- the control verbs ------------------------------------------------------------

    def answer(self, msg, now):
        if msg.get("cmd") == "hostpause":
            return self.answer_hostpause(msg)
        op = msg.get("op")
        if op == "state":
            return self.request_state(msg.get("request"))
        if op == "cancel":
            return self.ask_cancel(now)
        to, frm, at = msg.get("to"), msg.get("from"), msg.get("at")
        if not valid_name(to) or (frm is not None and not valid_name(frm)) or \
                (at is not None and not isinstance(at, (int, float))):
            return {"ok": False, "usage": True, "errors": ["bad request %r" % ({k: msg.get(k) for k in (
                "to", "from", "at")},)]}
        reason, frm = refusal(self.ledger, frm, to, now)
        if reason:
            return {"ok": False, "errors": [reason]}
        request = {"request": new_request_id(), "from": frm, "to": to, "at": at, "asked": now}
        return self.take(request, now)

    def ask_cancel(self, now):
        sched, run = self.ledger.book.get("scheduled"), self.queued_run()
        if sched is None and run is None:
            return {"ok": False, "errors": ["no switchover is scheduled or queued: nothing to cancel"]}
        what = "%s -> %s %s" % (sched["from"], sched["to"], "scheduled at %s" % format_time(sched["at"])) \
            if sched else "%s -> %s (run #%d, queued)" % (run.frm, run.to, run.id)
        answer = self.take({"request": new_request_id(), "cancel": True, "asked": now}, now)
        return answer if self.ledger.store.shared else dict(answer, cancelled=what)

    def take(self, request, now):
        """A request that passed the refusals: applied at once by a daemon alone, stored in
        etcd by a cluster member (the leader applies it)."""
        store = self.ledger.store
        if store.shared:
            store.put_switchover_request(request)
            return {"ok": True, "request": request["request"], "stored": False, "cluster": True}
        self.apply(request, now)
        return dict(self.request_state(request["request"]), ok=True)

    def request_state(self, request):
        """Where request ``request`` is: stored (etcd has it), taken, its run, its schedule."""
        ledger = self.ledger
        store = ledger.store
        run = next((r for r in reversed(ledger.runs.values())
                    if r.switchover and r.switchover.get("request") == request), None)
        sched = ledger.book.get("scheduled")
        stored = not store.shared or ledger.book.get("seen") == request or \
            (store.switchover_request() or {}).get("request") == request
        return {"ok": True, "request": request, "stored": stored,
                "taken": not store.shared or ledger.book.get("seen") == request or run is not None,
                "run": run.summary() if run is not None else None,
                "scheduled": scheduled_view(ledger.book) if sched and sched.get("request") == request else None}

    def answer_hostpause(self, msg):
        hosts = msg.get("hosts")
        if not isinstance(hosts, list) or not hosts or not all(valid_name(h) for h in hosts):
            return {"ok": False, "usage": True, "errors": ["bad host names %r" % (hosts,)]}
        paused = bool(msg.get("paused"))
        self.ledger.store.set_hosts_paused(hosts, paused)
        log.warning("actions %s for %s by request%s", "paused" if paused else "resumed", ", ".join(hosts),
                    " (the whole cluster, once etcd has it)" if self.ledger.store.shared else "")
        self.ledger.notify("daemon", event="paused" if paused else "resumed", hosts=sorted(hosts))
        return {"ok": True, "paused_hosts": sorted(self.ledger.store.paused_hosts()),
                "cluster": self.ledger.store.shared}

    def queued_run(self):
        return next((r for r in self.ledger.runs.values() if r.switchover and r.state == "queued"), None)

    # -- the acting daemon, each pass ---------------------------------------------------

    def tick(self, now):
        """A request stored in etcd (a cluster's leader), a scheduled switchover come due."""
        if not self.leadership.acting():
            return
        ledger = self.ledger
        self.since = now if self.since is None else self.since
        if ledger.store.shared:
            request = ledger.store.switchover_request()
            if request and request.get("request") != ledger.book.get("seen"):
                self.apply(request, now)
        sched = ledger.book.get("scheduled")
        if sched is None or now < sched["at"]:
            return
        if now - sched["at"] > MISSED_AFTER:
            ledger.note_book("scheduled", None)
            log.error("switchover %s -> %s scheduled at %s dropped: %s late, more than %s; no daemon "
                      "could act on it then (hadaemon --switchover %s to ask again)", sched["from"],
                      sched["to"], format_time(sched["at"]), format_duration(now - sched["at"]),
                      format_duration(MISSED_AFTER), sched["to"])
            self.event("missed", sched)
            return
        reason, frm = refusal(ledger, sched["from"], sched["to"], now, request=sched["request"])
        if reason and self.starting(sched["to"], now):
            return                      # its first report since this daemon started comes first
        ledger.note_book("scheduled", None)
        ledger.queue_switchover(frm, sched["to"], sched["request"], reason, now)

    def starting(self, host, now):
        """Whether ``host``'s checks have not reported since this daemon started, and still
        may (within REPORT_AGE of their interval): a schedule due at a restart waits for them."""
        report = self.ledger.reports.get(host) or {}
        if (report.get("time") or 0) >= self.since:
            return False
        return now - self.since <= REPORT_AGE * _interval_of(self.ledger.config, host, report)

    def apply(self, request, now):
        """Take a request (checked where it was asked): cancel, schedule, or queue its run
        (failed at once, unrun, when a refusal holds now)."""
        ledger = self.ledger
        ledger.note_book("seen", request.get("request"))
        if request.get("cancel"):
            sched, run = ledger.book.get("scheduled"), self.queued_run()
            if sched is not None:
                ledger.note_book("scheduled", None)
                self.event("cancelled", sched)
            elif run is not None:
                ledger.dequeue(run, "skipped", "cancelled by request (--switchover --cancel)", now, head=False)
            else:
                log.warning("switchover: --cancel asked, but none is scheduled or queued")
            return
        reason, frm = refusal(ledger, request.get("from"), request["to"], now)
        at = request.get("at")
        if at is not None and at > now and not reason:
            sched = {"from": frm, "to": request["to"], "at": at, "request": request["request"],
                     "asked": request.get("asked")}
            ledger.note_book("scheduled", sched)
            self.event("scheduled", sched)
            return
        ledger.queue_switchover(frm, request["to"], request["request"], reason, now)


# ============================================================================
# ledger.py: Ledger: host states, transitions, action runs and their queue
# (docs/configuration.md).
# ============================================================================
#
# What the daemon has decided, and the rules that decide it: a report goes in,
# transitions and action runs come out.  The rules exist once, for a daemon alone
# and for a cluster member alike; only where the ledger is kept differs (a
# LedgerStore, ledger_store.py: the daemon's own state db, or etcd written by the
# cluster's leader alone, docs/cluster.md).  Every change goes to the store before
# anything acts on it.  The ledger knows nothing of sockets, processes or the
# clock: every time is handed in (wall-clock seconds), so a test can drive it with
# no process started.
#
#   report()      the pending candidate and its confirm count (confirm_step); a
#                 confirmed state goes to accept() -- or, in a cluster, into this
#                 member's view, and the leader accepts what quorum sees (agree())
#   accept()      the transition FROM_to_TO and the run of its section (actions.conf): queued,
#                 or skipped (paused), or failed (an empty variable)
#   head(), dequeue(), commands_for(), start(), command_started(), command_ended(), finish()
#                 a run's life: queued -> running -> ok | failed | interrupted
#   open(), reread(), interrupt_running()
#                 the ledger as the store holds it; what was running when its
#                 runner died (or its leader lost the lead) is interrupted
#
# Every transition and every run's change of state (but ``queued``) is told to
# ``notify`` (notify.py's ``event``, set by the master; nothing by default), after
# the change it tells of.
#
# ``shared`` (the store's) is read where a cluster genuinely differs: whose
# candidate a report moves (this member's own view), who accepts a confirmed
# state (the leader, from quorum's views), and a run recording its variables (so
# another member can expand its own section).
#
# Uses: base, records, children, ledger_store, switchover.

# An action run: queued -> running -> ok | failed | interrupted, or skipped / failed
# without running (paused, an empty variable).
RUN_EDGES = {
    None: {"queued", "skipped", "failed"},
    "queued": {"running", "skipped", "failed"},
    "running": {"ok", "failed", "interrupted"},
}
RUN_FINAL = {"ok", "failed", "interrupted", "skipped"}
NEW_HOST = {"state": "unknown", "since": None, "pending": None, "count": 0}
DAMPING_KEYS = ("pending", "count", "window", "recent")   # confirm_step's part of a host record


def summarize_run(run):
    """A run (a Run, or its JSON as the state db holds it) as --status and --history
    show it: Run.summary()."""
    return (run if isinstance(run, Run) else Run.from_json(run, check=False)).summary()


def history_entries(transitions, runs, n):
    """The ``n`` newest transitions and switchovers, newest first, each transition with its
    run and that run's reruns, oldest first (--history).  Records, or their JSON as the state db holds it."""
    transitions = [tr if isinstance(tr, Transition) else Transition.from_json(tr) for tr in transitions]
    runs = {rid: run if isinstance(run, Run) else Run.from_json(run) for rid, run in runs.items()}
    reruns = collections.defaultdict(list)
    for run in runs.values():
        if run.rerun_of is not None:
            reruns[run.transition].append(run.summary())
    # A switchover's run is an entry of its own (SPEC §12), in time order with the rest.
    entries = [(tr.time or 0, 0, tr.id, tr) for tr in transitions] + \
        [(run.queued or 0, 1, run.id, run) for run in runs.values() if run.switchover]
    out = []
    for _, kind, _, item in sorted(entries, key=lambda e: e[:3])[-n:][::-1] if n > 0 else []:
        if kind == 1:
            out.append({"id": None, "time": item.queued, "host": item.host, "from": item.frm,
                        "to": item.to, "check": None, "run": item.summary(), "reruns": [],
                        "switchover": {"from": item.frm, "to": item.to}})
            continue
        run = runs.get(item.run) if item.run is not None else None
        out.append(dict(item.to_json(), run=run.summary() if run else None,
                        reruns=reruns.get(item.id, []) if run else []))
    return out


def no_event(kind, **keys):
    """Where events go when no one listens (a Ledger's ``notify`` until the master sets it)."""


def transition_event(tr):
    """The keys of a ``transition`` event (docs/notify.md) from a Transition."""
    doc = tr.to_json()
    return {"host": doc["host"], "from": doc["from"], "to": doc["to"], "check": doc["check"],
            "id": doc["id"], "run": doc["run"], "switchover": doc.get("switchover")}


def confirm_step(cand, state, confirm, window=None):
    """docs/configuration.md's confirm, ``confirm = N of M`` (``confirm`` N, ``window`` M;
    None: N of N, reports in a row), one report of ``state`` on a candidate record:
    (the record after it, what happened).

    The record is {state, pending, count}, and while a candidate is pending its
    ``window`` (M), and ``recent``: the last M reports, oldest first, each None that
    can no longer count (cut from the front), kept only when it is not ``count``
    times ``pending`` (N of N never needs it).  The host moves to ``state`` when it
    is not its state and at least N of the last M reports (this one included) said
    it.  What happened: "same" (nothing changed), "moved" (only ``recent`` did),
    "dropped" (its own state again: no candidate left), "counted" (not confirmed
    yet) or "confirmed" (the record is in ``state``, maybe with a new candidate)."""
    n, m = confirm, window or confirm
    recent = cand.get("recent")
    if state == cand["state"] and cand["pending"] is None:
        # The usual report, on a window that holds nothing but the state (N of M: the
        # newest M - 1 reports, as the oldest can no longer count) or nothing (N of N).
        steady = recent is None if m == n else recent == [state] * (m - 1)
        if steady:
            return cand, "same"
    if recent is None:
        recent = [cand["pending"]] * cand["count"] if cand["pending"] is not None else []
    last = (recent + [state])[-m:]
    now = cand["state"]
    confirmed = state != now and last.count(state) >= n
    if confirmed:
        now = state
    last = _still_counting(last, now, n, m)
    pending = next((word for word in reversed(last) if word is not None and word != now), None)
    new = {key: value for key, value in cand.items() if key not in ("window", "recent")}
    new.update(state=now, pending=pending, count=last.count(pending) if pending else 0)
    if pending is not None:
        new["window"] = m
    if last != [pending] * new["count"]:
        new["recent"] = last
    if confirmed:
        return new, "confirmed"
    if state != now:
        return new, "counted"
    if pending is None and cand["pending"] is not None:
        return new, "dropped"
    return new, "same" if new == cand else "moved"


def _still_counting(last, state, n, m):
    """``last`` (the last ``m`` reports, oldest first) with None for each report that can
    no longer count toward an ``n`` of ``m``, leading Nones cut.  A report ``age``
    reports old stays in the window ``m - 1 - age`` more reports; its word W can reach
    ``n`` in that time only if W's count among the newest ``age + 1`` plus those
    reports does.  A report of the host's own ``state`` counts only toward a return
    to it, which N of N can never make while the report is in its window."""
    out, seen = [], collections.Counter()
    for age, word in enumerate(reversed(last)):
        seen[word] += 1
        counts = word is not None and age <= m - 2 and seen[word] + m - 1 - age >= n \
            and (word != state or n < m)
        out.append(word if counts else None)
    while out and out[-1] is None:
        out.pop()
    return out[::-1]


def pending_among(ledger, reports):
    """Whether one of ``reports`` ((host, state) pairs, applied to ``ledger``) left its
    state the host's pending candidate (a member's own, in a cluster): what ``recheck``
    follows."""
    candidates = ledger.seen if ledger.shared else ledger.hosts
    return any(candidates.get(host, NEW_HOST)["pending"] == state for host, state in reports)


def change_nothing(ledger, group, reports):
    """Whether ``reports`` ((host, state) pairs) of a check of ``group``, applied to
    ``ledger`` now, would each change nothing (confirm_step's "same"): a worker may then
    hold back a run that says them again, a while (checkflow.py)."""
    candidates = ledger.seen if ledger.shared else ledger.hosts
    return all(confirm_step(candidates.get(host, NEW_HOST), state, group.confirm, group.window)[1] == "same"
               for host, state in reports)


class Ledger:
    """Host states, transitions, action runs and the queue, kept in a LedgerStore."""

    def __init__(self, store, state_dir, config=None):
        # A Store (the state db) is this daemon's own: a LocalStore over it.
        self.store = store if isinstance(store, LedgerStore) else LocalStore(store)
        self.shared = self.store.shared
        self.state_dir = state_dir
        self.config = config
        self.meta = {"next_transition": 1, "next_run": 1}
        self.hosts = {}                 # host -> {state, since, pending, count}, as accepted
        self.seen = {}                  # shared: host -> {state, pending, count}, this member's own
        self.view = {}                  # shared: host -> the state this member confirmed
        self.reports = {}               # host -> its last report {time, check, state} (soft)
        self.by_state = collections.defaultdict(set)    # state -> hosts in it
        self.transitions = collections.deque()    # Transitions, oldest first
        self.runs = collections.OrderedDict()   # id -> Run, oldest first
        self.queue = []                 # run ids waiting, in order
        self.book = {}                  # switchovers: scheduled, expected, seen (switchover.py)
        # Since this process started, for metrics: (host, from, to) and (section, result).
        self.transition_counts = collections.Counter()
        self.run_counts = collections.Counter()
        self.notify = no_event          # notify.py's event(kind, **keys), set by the master

    @property
    def cap(self):
        """History kept: transitions and runs (None: all there is, when reading)."""
        return self.config.daemon.history if self.config is not None else None

    @property
    def paused(self):
        return self.store.paused()

    def take(self, snapshot):
        """The ledger becomes ``snapshot`` (a store's), its history capped."""
        self.meta.update(snapshot.meta)
        self.hosts = snapshot.hosts
        self.by_state.clear()
        for host, record in self.hosts.items():
            self.by_state[record["state"]].add(host)
        self.reports = snapshot.reports
        cap = self.cap
        self.transitions = collections.deque(snapshot.transitions[-cap if cap else 0:], maxlen=cap)
        self.runs = collections.OrderedDict((r.id, r) for r in snapshot.runs[-cap if cap else 0:])
        self.queue = [rid for rid in snapshot.queue if rid in self.runs]
        self.book = dict(snapshot.switchover)

    def open(self, now, acting=True):
        """Load the ledger as stored.  Acting (a daemon alone; not a cluster member at
        its start, which waits for etcd's ledger): a run that was running when the
        daemon died is interrupted."""
        self.take(self.store.load(self.cap))
        if not acting:
            return
        self.interrupt_running(lambda run: "the daemon died while it ran", now)
        if self.paused:
            log.warning("actions are paused (hadaemon --resume to run them again)")
        if self.queue:
            log.info("%d queued action runs from before the restart", len(self.queue))

    def reread(self, log_new=False):
        """Memory becomes what the store holds (a cluster: etcd; writes gathered and not
        sent are dropped); ``log_new``: say which transitions are new (the leader's)."""
        known = self.transitions[-1].id if self.transitions else 0
        reports = self.reports          # this member's own, in no other store's ledger
        self.take(self.store.reread(self.cap))
        self.reports = reports
        if log_new:
            for tr in self.transitions:
                if tr.id > known:
                    log.info("transition %s: %s -> %s (by %s; recorded by the leader)",
                             tr.host, tr.frm, tr.to, tr.check)

    def interrupt_running(self, reason_of, now):
        """Every run still running is interrupted, ``reason_of(run)`` saying why."""
        changes = Changes()
        for run in list(self.runs.values()):
            if run.state == "running":
                self._set_run_state(run, "interrupted", reason_of(run), changes, now)
                self.queue = [rid for rid in self.queue if rid != run.id]
                changes.queue = self.queue
        if changes:
            self._put(changes)

    def set_paused(self, paused):
        """Pause or resume actions: the paused state to answer (a cluster: the one asked,
        once etcd has it)."""
        return self.store.set_paused(paused)

    def _put(self, changes):
        self.store.put(changes, self.cap)

    def state_of(self, host):
        return self.hosts.get(host, NEW_HOST)["state"]

    def states(self):
        return {host: record["state"] for host, record in self.hosts.items()}

    # -- reports, candidates, transitions (docs/configuration.md: states) ---------

    def report(self, host, state, check, now, attributes=None):
        """One report of ``state`` for ``host`` by ``check`` (``attributes``: the other keys it
        printed); the transition it makes, or None (always None in a cluster: a member's
        confirm moves its view, the leader accepts)."""
        self.reports[host] = report = {"time": now, "check": check.name, "state": state}
        if attributes:
            report["attributes"] = attributes       # docs/http.md: load-balancer conditions
        self.store.put_report(host, report)         # a crash may lose it
        cand = (self.seen if self.shared else self.hosts).get(host, NEW_HOST)
        confirm, window = check.group.confirm, check.group.window
        new, what = confirm_step(cand, state, confirm, window)
        if what == "same":
            return None                             # the usual report: nothing new
        if what == "dropped":
            log.info("host %s: %s again; candidate %s dropped", host, state, cand["pending"])
        elif what == "counted" and window == confirm:
            log.info("host %s: reported %s by %s (%d/%d)", host, state, check.name, new["count"], confirm)
        elif what == "counted":
            log.info("host %s: reported %s by %s (%d of the last %d; %d needed)", host, state,
                     check.name, new["count"], window, confirm)
        if self.shared:                             # docs/cluster.md: after this member's own confirm
            self.seen[host] = new
            if what == "confirmed":
                # Confirmed states only: a host with only a candidate is not "unknown" to it.
                log.info("host %s: %s sees %s (by %s)", host, self.store.node, state, check.name)
                self.view[host] = state
                self.store.publish_view(self.view)
            return None
        if what == "confirmed":
            return self.accept(host, state, check.name, now, new)
        self.hosts[host] = new                      # the candidate survives a restart
        self._put(Changes(hosts={host: new}))
        return None

    def agree(self, moves, now):
        """The cluster's leader: each (host, state, voters) that quorum sees moves."""
        for host, state, voters in moves:
            self.accept(host, state, "cluster: %s" % ",".join(voters), now)

    def accept(self, host, state, by, now, cand=None):
        """``host`` moves to ``state``: record the transition and its section's run.
        ``cand``: confirm_step's record that confirmed it (its window goes on)."""
        record = dict(self.hosts.get(host, NEW_HOST))
        old = record["state"]
        record.pop("window", None)
        record.pop("recent", None)
        record.update(state=state, since=now, pending=None, count=0)
        if cand is not None:
            record.update((key, cand[key]) for key in DAMPING_KEYS if key in cand)
        self.hosts[host] = record
        self.by_state[old].discard(host)
        self.by_state[state].add(host)
        cap = self.cap
        tr_id = self.meta["next_transition"]
        self.meta["next_transition"] = tr_id + 1
        changes = Changes(hosts={host: record}, meta=self.meta)
        section = self.config.section_for(host, old, state)
        expecting = expected(self.book, host, old, state, self.config.daemon.switchover_role, now)
        if expecting is not None:       # a switchover's own transition: no section runs
            section, changes.switchover = None, self.book
        run, run_id = None, (self.meta["next_run"] if section is not None else None)
        # Logged before its run is made: a run skipped (paused) or failed at once logs after it.
        log.info("transition %s: %s -> %s (by %s)%s", host, old, state, by,
                 "; runs [%s] as run %d" % (section.name, run_id) if section else
                 "; expected by switchover run %d: no section runs" % expecting
                 if expecting is not None else "; no action section matches")
        if section is not None:         # the run first: the Transition names it
            run = self.new_run(tr_id, host, old, state, section, changes, now)
        run_id = run.id if run is not None else None
        tr = Transition(tr_id, now, host, old, state, by, run_id, expecting)
        self.transitions.append(tr)
        while len(self.transitions) > cap:
            self.transitions.popleft()
        changes.transitions.append(tr)
        self._put(changes)
        self.notify("transition", **transition_event(tr))
        if run is not None and run.state != "queued":
            self._run_event(run)        # skipped or failed at once: told after its transition
        self.transition_counts[(host, old, state)] += 1
        return tr

    # -- action runs and their queue (docs/configuration.md: actions.conf) -------

    def new_run(self, tr_id, host, frm, to, section, changes, now, rerun_of=None):
        """The run of ``section`` for transition ``tr_id`` (``host``: ``frm`` -> ``to``):
        queued, or skipped / failed at once."""
        run_id = self.meta["next_run"]
        self.meta["next_run"] = run_id + 1
        plan = plan_run(section, host, frm, to, None, self.config.config_dir,
                        self.state_dir, StateVariables(host, frm, to, self.by_state))
        run = Run(run_id, tr_id, host, frm, to, section.name, None, None, now, None, None,
                  dict(plan.env, HA_RUN_ID=str(run_id)), [RunCommand.from_json(c) for c in plan.commands],
                  rerun_of)
        if self.shared:
            # The member that runs it may be another leader: it expands the section of
            # its own actions.conf with these (commands_for).
            run.variables = action_variables(host, frm, to, self.states())
        if plan.error:
            self._set_run_state(run, "failed", plan.error, changes, now)
        else:
            why = cannot_start(self, run, now)
            self._set_run_state(run, why[0] if why else "queued", why and why[1], changes, now)
        return self._enter(run, changes)

    def _enter(self, run, changes):
        """A new run joins the runs (and the queue, when it is queued there)."""
        if run.state == "queued":
            self.queue.append(run.id)
            changes.queue = self.queue
        self.runs[run.id] = run
        while len(self.runs) > self.cap:
            self.runs.popitem(last=False)
        return run

    def queue_switchover(self, frm, to, request, reason, now):
        """The run of a switchover from host ``frm`` to ``to`` (SPEC §12), through the queue
        like any; failed at once, unrun, when ``reason`` (a refusal) holds."""
        run = switchover_run(self, self.meta["next_run"], frm, to, request, now)
        self.meta["next_run"] = run.id + 1
        changes = Changes(meta=self.meta)
        self._set_run_state(run, "failed" if reason else "queued", reason, changes, now)
        self._enter(run, changes)
        self._put(changes)
        return run

    def note_book(self, key, value):
        """switchover.py's book: ``scheduled`` (one, or None), ``seen`` (the request a leader took)."""
        self.book[key] = value
        self._put(Changes(switchover=self.book))

    def rerun(self, run_id, now):
        """--rerun: the section of ended run ``run_id`` (by its name, in the current
        config) again, for its host, FROM and TO, expanded against the states of now;
        a new run with ``rerun_of``, through the queue like any (or skipped, paused).

        ValueError says why not: an unknown id, a run still queued or running, a
        section no longer in the config.
        """
        old = self.runs.get(run_id)
        if old is None:
            raise ValueError("no run #%s in the history (its last %d runs)" % (run_id, self.cap))
        if old.switchover:
            raise ValueError("run #%d is a switchover: ask for it again (hadaemon --switchover %s)"
                             % (run_id, old.to))
        if old.state not in RUN_FINAL:
            raise ValueError("run #%d is %s; only an ended run can be re-run"
                             % (run_id, old.state))
        section = self.config.section_named(old.section)
        if section is None:
            raise ValueError("section [%s] of run #%d is no longer in %s" % (
                old.section, run_id, os.path.join(self.config.config_dir, "actions.conf")))
        changes = Changes(meta=self.meta)
        run = self.new_run(old.transition, old.host, old.frm, old.to, section, changes, now,
                           rerun_of=run_id)
        self._put(changes)
        if run.state != "queued":
            self._run_event(run)
        log.info("run %d: rerun of #%d [%s] for %s %s_to_%s, by request: %s", run.id, run_id,
                 section.name, run.host, run.frm, run.to, run.state)
        return run

    def _set_run_state(self, run, state, reason, changes, now):
        """Every run state change passes here: checks the edge, logs, records in ``changes``."""
        if state not in RUN_EDGES.get(run.state, ()):
            raise AssertionError("run %s: %s -> %s" % (run.id, run.state, state))
        run.state = state
        if reason:
            run.reason = reason
        if state == "running":
            run.started = now
        if state in RUN_FINAL:
            run.ended = now
            self.run_counts[(run.section, state)] += 1
        if run.switchover:
            run_moved(self.book, run, state, now, self.config.daemon.switchover_settle)
            changes.switchover = self.book
        if state != "queued":
            level = logging.ERROR if state in ("failed", "interrupted") else logging.INFO
            log.log(level, "run %d [%s] for %s: %s%s", run.id, run.section, "%s -> %s" % (run.frm, run.to)
                    if run.switchover else "%s %s_to_%s" % (run.host, run.frm, run.to), state,
                    (" (%s)" % reason) if reason else "")
        changes.runs[run.id] = run
        if state != "queued" and run.id in self.runs:   # a new run's is told by its maker
            self._run_event(run)

    def _run_event(self, run):
        self.notify("run", run=run.id, section=run.section, host=run.host, result=run.state,
                    reason=run.reason)

    def head(self):
        """The run first in the queue, or None (ids of runs gone from history are dropped)."""
        while self.queue:
            run = self.runs.get(self.queue[0])
            if run is not None:
                return run
            self.queue.pop(0)
            self._put(Changes(queue=self.queue))
        return None

    def dequeue(self, run, state, reason, now, head=True):
        """The head of the queue leaves it: ``running``, or ``skipped`` / ``failed`` unrun
        (not ``head``: a run anywhere in it, cancelled: --switchover --cancel)."""
        assert run.id in self.queue[:1 if head else None], "run %s is not first" % run.id
        self.queue.remove(run.id)
        changes = Changes(queue=self.queue)
        self._set_run_state(run, state, reason, changes, now)
        self._put(changes)

    def commands_for(self, run, config):
        """The commands ``run`` starts with: as planned when it was queued; a run with
        ``variables`` (a cluster's) expands its section, found by its name as a rerun
        finds it (precedence chose it when it was queued), in this member's ``config``.
        ValueError says why it cannot start."""
        if run.switchover:
            return switchover_commands(self, run, config)
        if run.variables is None:
            return run.commands
        section = config.section_named(run.section)
        if section is None:
            raise ValueError("no section [%s] in this member's %s" % (
                run.section, os.path.join(config.config_dir, "actions.conf")))
        return [RunCommand.from_json(c) for c in expand_commands(section, run.variables)]

    def start(self, run, commands, stamp, config_dir, now):
        """The head of the queue starts with ``commands``; ``stamp`` (a cluster's leader:
        cluster, node, epoch) says who runs it, in the run and in its environment."""
        run.commands = commands
        if stamp is not None:
            cluster, node, epoch = stamp
            run.node, run.epoch = node, epoch
            run.env = dict(run.env, HA_CONFIG_DIR=config_dir, HA_STATE_DIR=self.state_dir,
                           HA_CLUSTER=cluster, HA_NODE=node, HA_LEADER_EPOCH=str(epoch))
        self.dequeue(run, "running", None, now)

    def command_started(self, run, index, when):
        cmd = run.commands[index]
        cmd.started = when
        log.info("run %d: command %d/%d: %s", run.id, index + 1, len(run.commands), _command_words(cmd))
        self._put(Changes(runs={run.id: run}))

    def command_ended(self, run, index, msg):
        """Record a command's end, as its action run reported it in ``msg``."""
        cmd = run.commands[index]
        cmd.result = result = CommandResult.from_event(msg)
        level = logging.WARNING if result.error else logging.INFO
        log.log(level, "run %d: command %d/%d %s: %s in %.3fs%s", run.id, index + 1,
                len(run.commands), _command_words(cmd), result.error or "exit %s" % result.exit,
                result.duration or 0, " (failure ignored)" if result.error and cmd.ignore else "")
        for line in (msg.get("output") if isinstance(msg.get("output"), str) else "").splitlines()[:20]:
            log.info("run %d:   | %s", run.id, line)
        self._put(Changes(runs={run.id: run}))

    def finish(self, run, state, reason, now):
        """A running run ends: ``ok``, ``failed`` or ``interrupted``."""
        changes = Changes()
        self._set_run_state(run, state, reason, changes, now)
        self._put(changes)

    # -- what it reports about itself --------------------------------------------

    def recent(self, last=20):
        """The last transitions and runs, newest first."""
        transitions = [tr.to_json() for tr in list(self.transitions)[-last:][::-1]]
        runs = [r.summary() for r in list(self.runs.values())[-last:]][::-1]
        return {"transitions": transitions, "runs": runs}

    def host_entries(self):
        """(host, its --status entry) by name, made as read but from the records as they are
        now, with the document's runs and queue: never a host moved with its run nowhere."""
        return ((name, self.host_status(name, record)) for name, record in sorted(self.hosts.items()))

    def host_status(self, name, record=None):
        """One host as --status shows it (``record``: as host_entries took it); None if never seen."""
        record = record or self.hosts.get(name)
        if record is None:
            return None
        cand = self.seen.get(name) if self.shared else record     # a member's candidate is its own
        pending = None
        if cand and cand.get("pending"):
            pending = {"state": cand["pending"], "count": cand.get("count", 0)}
            if cand.get("window") is not None:      # None: a record from before N of M
                pending["window"] = cand["window"]
        return {"state": record.get("state"), "since": record.get("since"),
                "pending": pending, "last_report": self.reports.get(name),
                "paused": name in self.store.paused_hosts()}

    def daemon_status(self):
        """What the daemon block of --status says of actions."""
        return {"paused": self.paused, "queue": list(self.queue),
                "switchover": scheduled_view(self.book), "paused_hosts": sorted(self.store.paused_hosts())}

    def counters(self):
        """Transitions and ended runs since this process started (Prometheus' counters)."""
        return {"transitions": [{"host": h, "from": f, "to": t, "count": n}
                                for (h, f, t), n in sorted(self.transition_counts.items())],
                "action_runs": [{"section": sec, "result": result, "count": n}
                                for (sec, result), n in sorted(self.run_counts.items())]}

    def history(self, n):
        return history_entries(list(self.transitions), self.runs, n)


def _command_words(cmd):
    return " ".join([os.path.basename(cmd.argv[0])] + cmd.argv[1:])


# ============================================================================
# scheduler.py: Scheduler: when each check runs, and what it last said.
# ============================================================================
#
# One timer heap of (due, seq, key, token) over every configured check.  Interval
# checks run at a fixed rate from their schedule (a late pass skips, it never
# bursts); cron checks at their next matching minute.  A check due while its last
# run is still queued or running is skipped and counted: it never overlaps itself.
# Due checks wait in ``ready`` for a worker.  The master's pass takes the checks
# due within AHEAD and hands them out at once, each with its time (``at``), at
# which its worker starts it: one wake-up of the master for a batch of checks, not
# one each.  A check handed to a worker and not yet answered goes to that worker
# again, behind its last run, so a check never overlaps itself and its results
# come in the order it ran; one due while it still waits for a worker is skipped.
# The lag we sample is a run's start after its time.
# A check whose report left a candidate pending (``recheck``) runs again that soon
# after, from a second heap, its scheduled runs passing unrun meanwhile; once the
# candidate is settled it is back on its schedule, which never moved.
#
# Uses: base, config, wire, records, ssh.

AHEAD = 0.1         # seconds ahead a pass of the master hands out the checks due
LEAD = 0.02         # a pass comes this long before the next check is due (next_wake)


@dataclasses.dataclass
class CheckRuntime:
    """What the master knows of one configured check between reloads."""
    check: Check
    next_due: float = 0.0
    token: int = 0                      # heap entries with an older token are stale
    queued: bool = False                # in ``ready``: a run due meanwhile is skipped
    handed: int = 0                     # runs handed to ``worker`` and not answered yet
    worker: typing.Any = None           # the pool's Child they were handed to
    waiting: typing.Optional[list] = None   # its first run is not in the heap yet: next_due
                                            # is an offset from waiting[0] (Scheduler.fresh)
    runs: int = 0
    skipped: int = 0
    last: typing.Optional[dict] = None
    trouble: typing.Optional[str] = None    # logged once when it starts, once when it ends
    hosts: tuple = ()                   # the hosts its last own report was about
    rechecking: bool = False            # a candidate it reported is pending: recheck, not schedule
    recheck_at: typing.Optional[float] = None   # when it runs again, while one is planned
    job_tail: typing.Optional[tuple] = None     # (HA_STATE, config dir, state dir, its job's
                                                # line after the id): Scheduler._job_line
    said: typing.Optional[tuple] = None         # (data items, exit, reports, print) of its last
                                                # clean run: Scheduler._derive

    @property
    def busy(self):
        """Queued or handed, not answered: --status's "running"."""
        return self.queued or self.handed > 0


def percentile(ordered, q):
    """The q-quantile of an ascending list of seconds, in milliseconds (None when empty)."""
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)


def describe_schedule(group):
    return ("cron " + group.cron.text) if group.cron else "every " + format_duration(group.interval)


def check_entry(check, last, rt=None, next_run=None, schedules=None):
    """One check as --status --json shows it (``rt`` None: from the state db).

    ``schedules``: a dict that keeps each group's schedule text, made once.
    """
    group = check.group
    if schedules is None:
        schedule = describe_schedule(group)
    else:
        schedule = schedules.get(id(group)) or schedules.setdefault(id(group), describe_schedule(group))
    reported = ",".join(sorted((last or {}).get("reports") or {}))    # what --status shows too
    return {"key": check.key, "name": check.name, "scope": group.scope.name,
            "host": reported or check.host, "where": check.where, "schedule": schedule,
            "next_run": next_run, "running": rt.busy if rt else False,
            "rechecking": rt.rechecking if rt else False,
            "runs": rt.runs if rt else None, "skipped": rt.skipped if rt else None, "last": last}


def _same_schedule(a, b):
    return (a.group.interval, a.group.cron and a.group.cron.text) == \
           (b.group.interval, b.group.cron and b.group.cron.text)


def _cron_due(cron, now_wall=None):
    now_wall = time.time() if now_wall is None else now_wall
    import datetime
    nxt = cron.next_after(datetime.datetime.fromtimestamp(now_wall))
    return time.monotonic() + max(0.0, time.mktime(nxt.timetuple()) - now_wall)


class Scheduler:
    """The checks' runtimes and timers; hands out due checks as jobs for the workers."""

    def __init__(self, once=False, store=None):
        self.once = once                # --once: every check due now, and only once
        self.store = store              # where each last result goes (check:KEY, soft)
        self.runtimes = {}              # check key -> CheckRuntime
        self.heap = []                  # (due, seq, key, token)
        self.rechecks = []              # the same, of the rechecks planned (recheck())
        self.stale = 0                  # heap entries of checks a reload removed or rescheduled
        self.ready = collections.deque()    # (CheckRuntime, due) waiting for a worker
        self.lags = collections.deque(maxlen=10000)
        self.lag_count, self.lag_sum = 0, 0.0     # since the start: the window above forgets
        self.lag_cache = None                       # (when, lag_count, percentiles of the window)
        self.heap_seq = itertools.count()
        self.tokens = itertools.count()     # never reused: a removed check that comes back is new
        # After a (re)configuration, the checks that start afresh wait here, by the
        # offset of their first run from the swap, and go into the heap when due: the
        # swap does not push ten thousand of them at once.  One batch per swap: [its
        # time], deque of (offset, CheckRuntime), earliest first.  The entry of a
        # check that a later reload replaced is dropped when its time comes.
        self.fresh = []
        self.job_ids = itertools.count(1)

    def configure(self, checks, now):
        """(Re)build the schedule at once (at start-up; a reload goes in steps):
        plan_steps() then swap() (see there)."""
        self.swap(run_steps(self.plan_steps(checks)), now)

    def plan_steps(self, checks):
        """The new schedule, prepared: keep what is known of checks whose schedule is
        unchanged.  A generator that looks at CONFIG_STEP checks between yields and
        changes nothing; it returns the plan for swap()."""
        old = self.runtimes
        runtimes, kept, fresh, cron = {}, [], [], []
        for i, check in enumerate(checks, 1):
            if i % CONFIG_STEP == 0:
                yield
            rt = old.get(check.key)
            if rt is not None and _same_schedule(rt.check, check):
                kept.append((rt, check))
                runtimes[check.key] = rt
                continue
            rt = runtimes[check.key] = CheckRuntime(check, token=next(self.tokens))
            if check.group.cron and not self.once:
                rt.next_due = _cron_due(check.group.cron)
                cron.append(rt)
            else:
                fresh.append(rt)
        # The first runs spread over the first interval (--once: all at once).
        since = [None]                  # the time of the swap, when it comes
        for i, rt in enumerate(fresh):
            if i % CONFIG_STEP == 0:
                yield
            rt.next_due = 0.0 if self.once else rt.check.group.interval * i / len(fresh)
            rt.waiting = since
        fresh = collections.deque(sorted(((rt.next_due, rt) for rt in fresh), key=lambda e: e[0]))
        yield
        return old, runtimes, kept, fresh, cron, since

    def swap(self, plan, now=None):
        """Put the planned schedule in at once.  A check whose schedule is unchanged keeps
        its runtime and its place in the heap; new ones and rescheduled ones start
        afresh, their first runs spread over their first interval from ``now`` (default:
        the time of the swap).  Returns the runtimes replaced, for the caller to let go
        of a slice at a time."""
        old, runtimes, kept, fresh, cron, since = plan
        since[0] = time.monotonic() if now is None else now
        for rt, check in kept:
            rt.check, rt.job_tail, rt.said = check, None, None  # its job's line and last made anew
        for rt in cron:
            self._push(rt)
        if fresh:
            self.fresh.append((since, fresh))
        for key, rt in old.items():             # queued or handed as they are now
            new = runtimes.get(key)
            if new is not None and new is not rt:
                new.queued, new.handed, new.worker = rt.queued, rt.handed, rt.worker
        self.stale += len(old) - len(kept)
        self.runtimes = runtimes
        if self.stale > max(len(runtimes), 1000):
            # Entries left by reloads wait for their due time, a year for a cron check:
            # drop them once they outnumber the checks.
            self.heap = [e for e in self.heap if e[2] in runtimes and runtimes[e[2]].token == e[3]]
            heapq.heapify(self.heap)
            self.stale = 0
        self.ready = collections.deque((runtimes[rt.check.key], due) for rt, due in self.ready
                                       if rt.check.key in runtimes)
        return list(old.values())

    def _push_fresh(self, until):
        """Checks waiting for their first run due by ``until`` go into the heap."""
        for since, queue in self.fresh:
            while queue and since[0] + queue[0][0] <= until:
                offset, rt = queue.popleft()
                if self.runtimes.get(rt.check.key) is rt:
                    rt.next_due, rt.waiting = since[0] + offset, None
                    self._push(rt)
        self.fresh = [batch for batch in self.fresh if batch[1]]

    def due_of(self, rt):
        """When ``rt`` runs next (monotonic)."""
        if rt.recheck_at is not None:
            return rt.recheck_at
        return rt.waiting[0] + rt.next_due if rt.waiting else rt.next_due

    def _push(self, rt):
        heapq.heappush(self.heap, (rt.next_due, next(self.heap_seq), rt.check.key, rt.token))

    def next_due(self):
        due = self.heap[0][0] if self.heap else None
        if self.rechecks and (due is None or self.rechecks[0][0] < due):
            due = self.rechecks[0][0]
        for since, queue in self.fresh:
            if due is None or since[0] + queue[0][0] < due:
                due = since[0] + queue[0][0]
        return due

    def next_wake(self):
        """When the master's next pass should come for the checks (None: no check)."""
        due = self.next_due()
        return None if due is None else due - LEAD

    def fire_due(self, now, ahead=0.0):
        """Move every check due by ``now`` + ``ahead`` to ``ready``, or count it skipped;
        set its next time.  Ahead only when the next check is due within LEAD: a pass
        awake for something else (a result) takes nothing early, so the workers get
        their jobs in batches, not a few at every pass."""
        due = self.next_due() if ahead else None
        until = now + ahead if due is not None and due <= now + LEAD else now
        if self.fresh:
            self._push_fresh(until)
        while self.rechecks and self.rechecks[0][0] <= until:
            due, _, key, token = heapq.heappop(self.rechecks)
            rt = self.runtimes.get(key)
            if rt is not None and rt.token == token and rt.recheck_at == due:
                rt.recheck_at = None
                if not rt.queued:
                    self.enqueue(rt, due)
        while self.heap and self.heap[0][0] <= until:
            due, _, key, token = heapq.heappop(self.heap)
            rt = self.runtimes.get(key)
            if rt is None or rt.token != token:
                continue
            if rt.rechecking and not self.once:
                pass                            # its recheck runs instead
            elif rt.queued:
                rt.skipped += 1
                log.debug("check %s: still waiting for a worker at its next run; skipped", rt.check.name)
            else:
                self.enqueue(rt, due)
            if self.once:
                continue
            group = rt.check.group
            if group.cron:
                rt.next_due = _cron_due(group.cron)
            else:
                rt.next_due = due + group.interval
                if rt.next_due <= now:          # we fell behind: skip, never burst
                    missed = int((now - rt.next_due) // group.interval) + 1
                    rt.skipped += missed
                    rt.next_due += missed * group.interval
            self._push(rt)

    def enqueue(self, rt, due, front=False):
        """``rt`` waits for a worker: queued, so a run due meanwhile is skipped (``front``:
        first, a run that was handed and came back)."""
        rt.queued = True
        if front:
            self.ready.appendleft((rt, due))
        else:
            self.ready.append((rt, due))

    def take(self, now, host_state, config_dir, state_dir, quiet=None):
        """The next ready check as a Job to start at its time (None when none waits),
        counted as handed.  ``quiet(group, reports)``: whether those reports of a check
        of that group would change nothing now; if so, and the check is not rechecking,
        its worker may hold a result that says what its last clean run said (Job.same)."""
        if not self.ready:
            return None
        rt, due = self.ready.popleft()
        rt.queued = False
        rt.handed += 1
        said = rt.said
        same = said[3] if said is not None and quiet is not None and not rt.rechecking \
            and quiet(rt.check.group, said[2]) else None
        check = rt.check
        env = {"HA_CHECK": check.name, "HA_SCOPE": check.group.scope.name,
               "HA_STATE": host_state(check.host), "HA_CONFIG_DIR": config_dir,
               "HA_STATE_DIR": state_dir}
        if check.group.host:
            env["HA_HOST"] = check.group.host
        if check.group.scope.kind == "ssh":
            argv, stdin = ssh_command(check, env, state_dir)
            job = Job(next(self.job_ids), check.key, argv, env, check.group.timeout, stdin, True, due, same)
            if same is not None:
                job.said = said[:2]
            return job
        job = Job(next(self.job_ids), check.key, list(check.argv), env, check.group.timeout,
                  at=due, same=same)
        if same is not None:
            job.said = said[:2]
        job.line = self._job_line(rt, job, config_dir, state_dir)
        return job

    @staticmethod
    def _job_line(rt, job, config_dir, state_dir):
        """``job``'s line (Job.to_line) from the part after its id kept per check: its
        message is encoded again only when HA_STATE or the directories changed (a reload
        of the check forgets it, in swap())."""
        head = b'{"t":"job","id":%d,"at":%s,"same":%s' % (
            job.id, repr(job.at).encode(), b"null" if job.same is None else b"%d" % job.same)
        kept, state = rt.job_tail, job.env["HA_STATE"]
        if kept is not None and kept[0] == state and kept[1] == config_dir and kept[2] == state_dir:
            return head + kept[3]
        line = job.to_line()
        rt.job_tail = (state, config_dir, state_dir, line[len(head):]) \
            if line.startswith(head + b",") else None
        return line

    def released(self, key):
        """A run of check ``key`` handed and not answered is no more (its worker died, or
        gave it back): its runtime, or None (a reload removed it)."""
        rt = self.runtimes.get(key)
        if rt is not None:
            rt.handed = max(0, rt.handed - 1)
        return rt

    def sample_lag(self, job, result):
        """How late ``job`` started after its time (by ``result``'s start, a wall clock)."""
        lag = max(0.0, result.started - job.sent_wall - (job.at - job.sent)) \
            if isinstance(result.started, (int, float)) else 0.0
        self.lags.append(lag)
        self.lag_count += 1
        self.lag_sum += lag

    def finished(self, key, result):
        """Check ``key``'s CheckResult -> (its runtime, [(host, state)] reported), None if unknown."""
        rt = self.released(key)
        if rt is None:
            return None                 # removed by a reload while it ran
        rt.runs += 1
        items, said = tuple(result.data.items()), rt.said
        if said is not None and said[0] == items and said[1] == result.exit and not result.failed:
            # The same as its last clean run said: the same reports and text, nothing to log.
            reports, rt.last = said[2], result.same_last(rt.last)
            if result.fingerprint is not None and result.fingerprint != said[3]:
                rt.said = said[:3] + (result.fingerprint,)      # its bytes, as they are now
        else:
            reports = self._derive(rt, result, items)
        if result.trouble != rt.trouble:
            self._note_trouble(rt, result.trouble)
        if log.isEnabledFor(logging.DEBUG):     # its arguments cost more than the record
            log.debug("check %s: %s; %s in %.3fs", rt.check.name,
                      ", ".join("%s %s" % pair for pair in reports) or "no valid report",
                      "killed by %s" % signal_name(result.signal) if isinstance(result.signal, int)
                      else "exit %s" % result.exit, result.duration or 0)
        if self.store is not None:
            self.store.soft("check:" + rt.check.key, rt.last)     # a crash may lose it
        return rt, reports

    @staticmethod
    def _derive(rt, result, items):
        """``rt``'s reports (returned) and last from ``result`` (``items``: its data's),
        its rejected reports logged.  A clean run of text values is kept as ``rt.said``:
        a run that says the same again needs none of it (finished)."""
        reports, problems = reports_from_result(result.data, result.exit, rt.check.host)
        if result.failed and rt.hosts:
            # It never said whom it is about this time: its unknown goes to the hosts
            # it watches, not to a host named after its file.
            reports = [(host, "unknown") for host in rt.hosts]
        elif reports:
            rt.hosts = tuple(host for host, _ in reports)
        for problem in problems:
            log.warning("check %s: %s", rt.check.name, problem)
        rt.last = result.to_last(reports, problems)
        # Only text values: == on them is sameness (1 == 1.0 == True, and nested dicts
        # equal in another order, would each show differently in its last).  Its print
        # (None when the worker made none: it had trouble or stderr) is the next job's same.
        clean = not result.failed and not problems and all(type(v) is str for _, v in items)
        rt.said = (items, result.exit, reports, result.fingerprint) if clean else None
        return reports

    def recheck(self, rt, pending, now):
        """After ``rt``'s reports went to the ledger: while a candidate one of them made
        is ``pending``, its group's ``recheck`` after ``now`` (the run's end) is its next
        run; once none is, it is back on its schedule."""
        recheck = rt.check.group.recheck
        if pending and recheck and not self.once and self.runtimes.get(rt.check.key) is rt:
            rt.rechecking, rt.recheck_at = True, now + recheck
            heapq.heappush(self.rechecks, (rt.recheck_at, next(self.heap_seq), rt.check.key, rt.token))
        elif rt.rechecking:
            rt.rechecking, rt.recheck_at = False, None
            log.debug("check %s: candidate settled; back on its schedule", rt.check.name)

    @staticmethod
    def _note_trouble(rt, trouble):
        """What the daemon had to do about a check's runs: logged when it starts and ends."""
        if trouble != rt.trouble:
            if trouble:
                log.warning("check %s: %s", rt.check.name, trouble[:200])
            else:
                log.info("check %s: runs normally again", rt.check.name)
            rt.trouble = trouble

    def all_ran(self):
        return all(rt.runs >= 1 for rt in self.runtimes.values())

    @staticmethod
    def adopt_results(store):
        """An older state db keeps every last result in one key, ``checks``: one key per
        check from now on (written at the next checkpoint)."""
        old = store.data.get("checks")
        if old:
            for key, last in old.items():
                store.soft("check:" + key, last)
            store.soft("checks", {})

    def status(self, now_m, now):
        """checks of the --status --json document, one by one (made as they are read)."""
        schedules = {}                  # per group: ten thousand checks share a few
        for rt in list(self.runtimes.values()):
            entry = check_entry(rt.check, rt.last, rt, now + max(0.0, self.due_of(rt) - now_m),
                                schedules)
            yield entry

    def lag_summary(self):
        # Sorting 10000 samples takes a millisecond or more, and the status page, /status
        # and /metrics ask often: the percentiles of a window this long are recomputed
        # at most once a second (at once while they have no sample yet).
        now = time.monotonic()
        cache = self.lag_cache
        if cache is None or (cache[1] != self.lag_count
                             and (now - cache[0] >= 1.0 or not cache[2]["samples"])):
            lags = sorted(self.lags)
            cache = self.lag_cache = (now, self.lag_count, {
                "p50": percentile(lags, 0.5), "p99": percentile(lags, 0.99),
                "max": percentile(lags, 1.0), "samples": len(lags)})
        return dict(cache[2], count=self.lag_count, sum=round(self.lag_sum * 1000, 3))


# ============================================================================
# pool.py: Pool: every forked child of the master.
# ============================================================================
#
# One ``children`` map, keyed by pid, holds every process the master forks: the
# check workers, the action run (one waits, forked ahead of need, until it is
# handed a sequence) and the ssh master connections.  One fork shape registers
# them; one reaping loop (waitpid until 0, level-triggered) collects them; one
# deadline per child (``kill_at``) turns a polite SIGTERM into SIGKILL.
#
# Uses: base, proc, children, ssh.

# A worker: starting -> idle <-> busy (jobs handed, not all answered) -> exiting.
WORKER_EDGES = {
    "starting": {"idle", "exiting"},
    "idle": {"busy", "exiting"},
    "busy": {"idle", "exiting"},
    "exiting": set(),
}
KILL_GRACE = 5.0                # SIGTERM -> SIGKILL for a child of the master
HELLO_WITHIN = 10.0             # a worker that has not said hello by then is killed


@dataclasses.dataclass
class Child:
    """A forked process of the master: a check worker, an action run, an ssh master."""
    pid: int
    kind: str                           # "worker" | "action" | "ssh" (a master connection)
    state: str
    started: float                      # monotonic
    conn: typing.Any = None
    jobs: dict = dataclasses.field(default_factory=dict)   # a worker's: id -> Job handed, not answered
    answered: float = 0.0                    # a worker's last result (monotonic)
    gave_back: bool = False                  # a worker that gave jobs back: none more until it answers
    free_at: float = 0.0                     # a worker's: when the runs handed to it should be done
    run_id: typing.Optional[int] = None
    kill_at: typing.Optional[float] = None   # monotonic deadline to be gone by
    signalled: bool = False                  # SIGTERM sent: the next signal is SIGKILL
    lost: bool = False                       # a worker that hung up or died unasked
    pgid: typing.Optional[int] = None        # group of the command an action run runs now
    slot: typing.Any = None                  # a worker's shared page: pid and job of its check

    def check_pgid(self):
        """The group of the check this worker runs now (from its shared page), or None."""
        pid = struct.unpack_from("q", self.slot, 0)[0] if self.slot is not None else 0
        return pid if pid > 1 else None

    def running_job(self):
        """The id of the job this worker runs now (from its shared page), or None."""
        job = struct.unpack_from("q", self.slot, 8)[0] if self.slot is not None else 0
        return job or None

    def close_slot(self):
        if self.slot is not None:
            self.slot.close()
            self.slot = None

    def signal(self, sig, deadline):
        """Send ``sig`` (gone, it is not an error) and give it until ``deadline`` to exit."""
        self.kill_at, self.signalled = deadline, True
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass


class Pool:
    """The master's children: forked, said hello, reaped, retired, replaced with a backoff."""

    def __init__(self, sock_path, state_dir):
        self.sock_path = sock_path
        self.children = {}              # pid -> Child
        self.ssh = SshMasters(state_dir)
        self.stopping = False
        self.spawn_after = 0.0          # no worker forked before (after quick deaths)
        self.runner_after = 0.0         # no spare action run forked before (after a quick death)
        self.quick_deaths = 0

    def fork(self, kind, target, *args):
        """The one fork shape: the parent registers the child, the child never returns."""
        try:
            pid = os.fork()
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                log.error("cannot fork a %s: too many processes (EAGAIN); retrying", kind)
            else:
                log.error("cannot fork a %s: %s", kind, exc)
            return None
        if pid:
            child = Child(pid, kind, "starting", time.monotonic())
            self.children[pid] = child
            return child
        code = 1
        try:
            code = target(*args)
        except (_Terminate, _Orphaned, BrokenPipeError, ConnectionError):
            code = 0
        except BaseException:           # noqa: B036 - the child must reach os._exit
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code or 0)         # this must never return

    # -- who is who ------------------------------------------------------------------

    def workers(self, *states):
        return [c for c in self.children.values() if c.kind == "worker"
                and (not states or c.state in states)]

    def action_child(self):
        """The action run running a sequence, or None."""
        for child in self.children.values():
            if child.kind == "action" and child.run_id is not None:
                return child
        return None

    def spare_runner(self):
        """The action run forked ahead, waiting for a sequence, or None."""
        for child in self.children.values():
            if child.kind == "action" and child.run_id is None:
                return child
        return None

    def set_worker_state(self, child, state):
        if state not in WORKER_EDGES[child.state]:
            raise AssertionError("worker %d: %s -> %s" % (child.pid, child.state, state))
        child.state = state

    def greet(self, child):
        """A child said hello on its connection: a worker is ready for jobs."""
        if child.kind == "worker" and child.state == "starting":
            self.set_worker_state(child, "idle")

    def hand(self, child, job, now):
        """Give a worker a Job (it starts it at ``job.at``); returns the message to send
        it, encoded."""
        job.sent, job.sent_wall = now, time.time()
        child.jobs[job.id] = job
        if child.state == "idle":
            self.set_worker_state(child, "busy")
        return job.to_line()

    def job_done(self, child, msg):
        """A worker's result message (``result`` or ``same``): the Job it answers."""
        job = child.jobs.pop(msg.get("job"), None) if msg.get("t") in ("result", "same") else None
        if job is None:
            raise ProtocolError("unexpected message from worker %d" % child.pid)
        child.answered, child.gave_back = time.monotonic(), False
        self._maybe_idle(child)
        return job

    def given_back(self, child, msg):
        """A worker's ``back``: the Jobs it could not start in time, for another worker."""
        ids = msg.get("jobs")
        if not isinstance(ids, list) or not all(i in child.jobs for i in ids):
            raise ProtocolError("unexpected message from worker %d" % child.pid)
        child.gave_back = True
        jobs = [child.jobs.pop(i) for i in ids]
        self._maybe_idle(child)
        return jobs

    def _maybe_idle(self, child):
        if not child.jobs and child.state == "busy":
            self.set_worker_state(child, "idle")

    def takers(self):
        """The workers that may be handed jobs now: said hello, not leaving, not behind."""
        ready = [c for c in self.children.values() if c.kind == "worker" and c.state in ("idle", "busy")]
        return [c for c in ready if not c.gave_back] or ready

    def runner(self, config_dir):
        """An action run for the next sequence: the spare, else one forked now (None: failed)."""
        child = self.spare_runner()
        if child is None:           # none waits (its fork failed, or it died): fork now
            child = self.fork("action", action_main, self.sock_path, config_dir)
        return child

    # -- keeping it full -------------------------------------------------------------

    def manage(self, config, now, ssh=True):
        """Keep ``workers`` workers and one spare action run; kill the hung; follow the ssh targets."""
        if self.stopping:
            return
        # One look at the children (every pass of the loop comes here): the workers
        # counted, the few late to say hello or hung noted, the action runs seen.
        live, late, hung, spare, running = 0, [], [], None, False
        for child in self.children.values():
            if child.kind == "worker":
                state = child.state
                if state == "exiting":
                    continue
                live += 1
                if state == "starting":
                    if now - child.started > HELLO_WITHIN:
                        late.append(child)
                elif state != "idle":
                    # Workers enforce their checks' timeouts and send a held result within
                    # HOLD: one silent long past the first job's is hung (stopped, stuck),
                    # and its check must not freeze its host's state.
                    job = next(iter(child.jobs.values()), None)
                    if job is not None and \
                            now - max(job.start(), child.answered) > job.timeout + WORKER_HANG_GRACE + HOLD:
                        hung.append(child)
            elif child.kind == "action":
                if child.run_id is None:
                    spare = child
                else:
                    running = True
        missing = config.daemon.workers - live
        if missing > 0 and now >= self.spawn_after:
            for _ in range(missing):
                slot = mmap.mmap(-1, 16)        # shared with the worker: its check's pid and job
                child = self.fork("worker", worker_main, self.sock_path, config.config_dir, slot)
                if child is None:
                    slot.close()
                    self.spawn_after = now + 1.0
                    break
                child.slot = slot
        if missing < 0:
            # A smaller pool (after a reload) shrinks by idle workers only: retiring a
            # busy one would cut its check short and report it unknown.
            for child in self.workers("idle")[:-missing]:
                self.retire(child)
        for child in late:
            log.error("worker %d did not connect within %ds; killing it", child.pid, HELLO_WITHIN)
            self.retire(child, signal.SIGKILL)
        for child in hung:
            log.error("worker %d: no result of check %s %s after its timeout; killing it",
                      child.pid, next(iter(child.jobs.values())).env["HA_CHECK"],
                      format_duration(WORKER_HANG_GRACE))
            self.retire(child, signal.SIGKILL)
        if now >= self.runner_after and spare is None and not running:
            # One action run forked and waiting, so a sequence starts without a fork.
            # Not while a sequence runs: the next cannot start before it ends, and a
            # fork (a copy of the master's page tables, a millisecond of CPU) as its
            # commands start would take the CPU they need.
            if self.fork("action", action_main, self.sock_path, config.config_dir) is None:
                self.runner_after = now + 1.0
        if ssh:
            self.ssh.maintain(config, now, self.fork)

    def retire(self, child, sig=signal.SIGTERM):
        if child.state != "exiting":
            self.set_worker_state(child, "exiting")
        child.signal(sig, time.monotonic() + KILL_GRACE)

    def enforce_kills(self, now):
        """A child past its deadline gets SIGTERM, then SIGKILL on a later pass."""
        for child in self.children.values():      # signal() changes no one's membership
            if child.kill_at is not None and now >= child.kill_at:
                sig = signal.SIGKILL if child.signalled else signal.SIGTERM
                log.warning("%s %d did not exit in time; sending %s", child.kind, child.pid,
                            signal_name(sig))
                child.signal(sig, now + KILL_GRACE)

    # -- the end of a child ------------------------------------------------------------

    def reap(self):
        """Every child that has exited, as [(child, how)] (level-triggered: a coalesced
        SIGCHLD loses nothing).  They stay known until ``forget``, so what they sent
        before they went can still be read."""
        gone = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            child = self.children.get(pid)
            if child is None:
                continue
            if child.kind == "worker" and child.state != "exiting":
                child.lost = True       # and, reaped, it must not be signalled any more
                self.set_worker_state(child, "exiting")
            code, sig = decode_wait_status(status)
            gone.append((child, ("killed by %s" % signal_name(sig)) if sig else "exit %s" % code))
        return gone

    def forget(self, child):
        self.children.pop(child.pid, None)

    def worker_gone(self, child, how):
        """A worker that died unasked is replaced, after a backoff if it keeps dying young."""
        if not child.lost:
            return
        log.error("worker %d died (%s); replacing it", child.pid, how)
        if time.monotonic() - child.started < 1.0:
            self.quick_deaths += 1
            self.spawn_after = time.monotonic() + min(30.0, 0.25 * 2 ** self.quick_deaths)
        else:
            self.quick_deaths = 0

    def spare_gone(self, child, how):
        """The spare action run died before it had a sequence: replaced (later if it died young)."""
        if self.stopping:
            return
        log.error("action run %d died waiting for a sequence (%s); replacing it", child.pid, how)
        if time.monotonic() - child.started < 1.0:
            self.runner_after = time.monotonic() + 5.0

    def stop(self, now):
        """The daemon stops: workers, the spare action run and ssh masters are asked to go."""
        self.stopping = True
        for child in self.workers():
            self.retire(child)
        spare = self.spare_runner()
        if spare is not None:
            spare.signal(signal.SIGTERM, now + KILL_GRACE)
        self.ssh.stop_all()

    def kill_all(self):
        """SIGKILL every child and reap them (5 s at most); returns the children reaped."""
        for child in self.children.values():
            try:
                os.kill(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        gone = []
        deadline = time.monotonic() + 5
        while self.children and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            child = self.children.pop(pid, None)
            if child is not None:
                gone.append(child)
        return gone

    def status(self):
        """What the daemon block of --status says of the children."""
        return {"workers": [{"pid": w.pid, "state": w.state} for w in self.workers()],
                "action_pid": getattr(self.action_child(), "pid", None),
                "ssh": self.ssh.status()}


# ============================================================================
# control.py: Control server: the daemon's UNIX socket and everyone on it.
# ============================================================================
#
# Workers, action runs and control clients (--status, --reload, ...) all connect
# to var/hadaemon.sock and speak one JSON object per line.  Peers of another uid
# are refused (SO_PEERCRED).  A connection's first message says who it is: a
# ``hello`` from a child the Pool knows, or else a control request.  One bad
# message closes one connection, never the master.
#
# Uses: base, wire, proc.

class Conn:
    """One accepted connection: a worker, an action run, or a control client."""

    def __init__(self, sock, pid, uid):
        self.sock = sock
        self.pid, self.uid = pid, uid
        self.reader = LineReader()
        self.out = bytearray()
        self.writing = False            # registered for EVENT_WRITE too (its out waits)
        self.role = None
        self.child = None
        self.opened = time.monotonic()
        self.answering = None           # an answer made in steps: a generator of its bytes
        self.waiting = collections.deque()  # requests that came in meanwhile, answered in turn


class ControlServer:
    """The listener and its connections on the master's selector.

    What a message means is the master's: ``on_result(child, msg)`` for what a
    worker says, ``on_event(child, msg)`` for what an action run or the cluster agent
    says, ``answer(msg)`` for a control verb: its answer, a dict sent back at once,
    or a generator that makes it in steps (bytes of the answer's line; None: nothing
    yet, ask later), which ``answer_some`` runs a slice of time each pass of the loop.
    """

    def __init__(self, sel, path, pool, on_result, on_event, answer):
        self.sel, self.path, self.pool = sel, path, pool
        self.on_result, self.on_event, self.answer = on_result, on_event, answer
        self.conns = {}                 # fd -> Conn
        self.listener = None
        self.resting_until = None       # out of fds: the listener rests until then
        self.answering = []             # connections with an answer being made
        self.oldest = float("inf")      # no connection that may be a client opened before

    def listen(self):
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(256)
        sock.setblocking(False)
        self.listener = sock
        self.sel.register(sock, selectors.EVENT_READ, self.accept)

    def accept(self, mask):
        for _ in range(64):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    # The listener would stay readable and spin the loop (and the log):
                    # it rests a second, and each rest is logged once.
                    log.error("cannot accept connections: too many open files (%d clients); "
                              "new ones wait 1s", len(self.conns))
                    self.sel.unregister(self.listener)
                    self.resting_until = time.monotonic() + 1.0
                    return
                raise
            pid, uid, _ = peer_credentials(sock)
            if uid not in (0, os.getuid()):
                log.warning("refused a connection from pid %d: uid %d is not ours", pid, uid)
                sock.close()
                continue
            sock.setblocking(False)
            conn = Conn(sock, pid, uid)
            self.conns[sock.fileno()] = conn
            self.oldest = min(self.oldest, conn.opened)
            self.sel.register(sock, selectors.EVENT_READ, functools.partial(self.on_io, conn))

    def on_io(self, conn, mask):
        if mask & selectors.EVENT_WRITE:
            self.flush(conn)
        if not mask & selectors.EVENT_READ or conn.sock.fileno() < 0:
            return
        try:
            data = conn.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return
        try:
            for msg in conn.reader.feed(data):
                self.on_message(conn, msg)
                if conn.sock.fileno() < 0:
                    return
        except ProtocolError as exc:
            log.warning("connection from pid %d (%s): %s; closed", conn.pid, conn.role or "client", exc)
            self.close(conn)

    def on_message(self, conn, msg):
        if conn.role is None:
            self.identify(conn, msg)
        elif conn.role == "worker":
            self.on_result(conn.child, msg)
        elif conn.role in ("action", "cluster", "notify"):
            self.on_event(conn.child, msg)
        else:
            self.respond(conn, msg)

    def identify(self, conn, msg):
        if msg.get("t") == "hello":
            child = self.pool.children.get(conn.pid)
            if child is None or msg.get("pid") != conn.pid or msg.get("role") != child.kind \
                    or child.conn is not None:
                raise ProtocolError("hello from pid %d that is not a child of ours" % conn.pid)
            conn.role, conn.child, child.conn = child.kind, child, conn
            self.pool.greet(child)
            return
        conn.role = "control"
        self.respond(conn, msg)

    def respond(self, conn, msg):
        """Answer a control request, in the order they came."""
        if conn.answering is not None:
            conn.waiting.append(msg)
            return
        answer = self.answer(msg)
        if isinstance(answer, dict):
            self.send(conn, answer)
        else:
            conn.answering = answer
            self.answering.append(conn)

    def answer_some(self, until):
        """Make the answers under way, a piece of each in turn, until monotonic ``until``;
        one whose reader lags (ANSWER_BUFFER unsent) waits."""
        while self.answering and time.monotonic() < until:
            progress = False
            for conn in list(self.answering):
                if conn.sock.fileno() < 0:
                    self.answering.remove(conn)
                    continue
                if len(conn.out) > ANSWER_BUFFER:
                    continue
                try:
                    piece = next(conn.answering)
                except StopIteration:
                    conn.answering = None
                    self.answering.remove(conn)
                    while conn.waiting and conn.answering is None and conn.sock.fileno() >= 0:
                        self.respond(conn, conn.waiting.popleft())
                    continue
                except Exception:       # a bug in one answer closes one connection
                    log.exception("answering pid %d failed; connection closed", conn.pid)
                    self.close(conn)
                    continue
                if piece:
                    conn.out += piece
                    self.flush(conn)
                    progress = True
            if not progress:
                return

    def busy(self):
        """Whether an answer under way can be worked on now (the loop must not sleep)."""
        return bool(self.answering) and any(len(c.out) <= ANSWER_BUFFER for c in self.answering)

    def send(self, conn, obj):
        """Send ``obj``, a message (a dict) or its line already encoded (bytes)."""
        if conn is None or conn.sock.fileno() < 0:
            return
        conn.out += obj if isinstance(obj, bytes) else encode_message(obj)
        self.flush(conn)

    def flush(self, conn):
        try:
            while conn.out:
                sent = conn.sock.send(conn.out)
                del conn.out[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.close(conn)
            return
        if conn.writing != bool(conn.out):    # the usual send changes nothing: no selector call
            conn.writing = bool(conn.out)
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
            self.sel.modify(conn.sock, events, self.sel.get_key(conn.sock).data)

    def close(self, conn):
        fd = conn.sock.fileno()
        if fd < 0:
            return
        self.sel.unregister(conn.sock)
        del self.conns[fd]
        conn.sock.close()
        if conn.answering is not None:
            conn.answering.close()
            conn.answering = None
            self.answering.remove(conn)
        child = conn.child
        if child is not None:
            child.conn = None
            if child.kind == "worker" and child.state != "exiting":
                # A worker that hung up is of no use: retire it, reap it, replace it.
                child.lost = True
                self.pool.retire(child)

    def drain(self, child):
        """Handle what an exited child sent before it went (its "done", a last result).

        A quick child can send everything and exit between two passes of the loop,
        its connection still unread, even still in the listen backlog: accept and
        read it now, while the child is still known (its hello needs that).
        """
        if child.conn is None:
            self.accept(selectors.EVENT_READ)
            conns = [c for c in self.conns.values() if c.pid == child.pid and c.role is None]
        else:
            conns = [child.conn]
        for conn in conns:
            for _ in range(64):         # bounded; the peer is gone, so EOF comes soon
                if conn.sock.fileno() < 0 or not _select_read([conn.sock], 0):
                    break
                self.on_io(conn, selectors.EVENT_READ)
        if child.conn is not None:
            self.close(child.conn)

    def tick(self, now):
        """Close control clients idle too long; let the listener back after a rest.
        The connections are looked at only once the oldest that may be a client is
        that old (the workers' never are)."""
        if now - self.oldest > CLIENT_IDLE:
            self.oldest = float("inf")
            for conn in list(self.conns.values()):
                if conn.role not in (None, "control"):
                    continue
                if now - conn.opened > CLIENT_IDLE:
                    log.warning("connection from pid %d idle for %ds; closed", conn.pid, CLIENT_IDLE)
                    self.close(conn)
                else:
                    self.oldest = min(self.oldest, conn.opened)
        if self.resting_until is not None and now >= self.resting_until:
            self.resting_until = None
            self.sel.register(self.listener, selectors.EVENT_READ, self.accept)

    def close_all(self):
        for conn in list(self.conns.values()):
            self.close(conn)
        if self.listener is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.listener.close()


# ============================================================================
# checkflow.py: Check flow: due checks handed to the workers, their results to
# the ledger.
# ============================================================================
#
#   Scheduler.ready --dispatch--> a worker's queue --result / back--> Ledger.report
#
# A pass hands out every check due within AHEAD (scheduler.py), each to the first
# worker free at its time (by the runs it was handed, each as long as its check's
# last run), else to the one free soonest; or to the worker that has the check's
# last run still unanswered (so its runs never overlap and answer in order).  So
# the work goes to as few workers as keep up, which stay warm: woken for every
# check, a worker costs a third less CPU per check than woken for every fourth
# (bench/worker.py).  A worker starts each
# at its time, sends a changed result at once, and holds one that says what the
# check's last clean run said for up to HOLD, to send it with others (children.py):
# a job says which result that is (``same``) only while the check's reports would
# change nothing (ledger.change_nothing: each the host's state, no candidate pending)
# and the check is not rechecking, so a change, and every report a candidate waits
# for, comes at once.
#
# A worker that could not start a job in time gives it back, and is handed nothing
# until it answers again; a worker that dies loses only the check it was running
# (reported unknown), and the jobs it had not answered go back to ``ready``.
#
# Uses: base, records, ledger.

UNTIMED = 0.01      # seconds a check that never ran yet is taken to run
AROUND = 0.0005     # seconds of a worker's own around each check it runs


def first_free(takers, at):
    """The first of ``takers`` free by ``at`` (Child.free_at), else the one free soonest."""
    soonest = takers[0]
    for child in takers:
        if child.free_at <= at:
            return child
        if child.free_at < soonest.free_at:
            soonest = child
    return soonest


def took(last):
    """How long the run of a check whose ``last`` (CheckRuntime.last) it is took."""
    duration = last.get("duration") if last is not None else None
    return duration if isinstance(duration, float) else UNTIMED


class CheckFlow:
    """Hands the ready checks to the workers; takes their results and given-back jobs."""

    def __init__(self, scheduler, pool, server, ledger, notify, dirs):
        self.scheduler, self.pool, self.server = scheduler, pool, server
        self.ledger, self.notify = ledger, notify
        self.dirs = dirs                # () -> (config dir, state dir), as they are now
        self.quiet = functools.partial(change_nothing, ledger)     # what a job may hold

    def dispatch(self, now):
        ready = self.scheduler.ready
        if not ready:
            return
        takers = self.pool.takers()
        if not takers:
            return
        config_dir, state_dir = self.dirs()
        state_of, quiet, take, hand = self.ledger.state_of, self.quiet, self.scheduler.take, self.pool.hand
        lines = {}                      # pid -> (worker, its lines): one write each
        while ready:
            rt, at = ready[0]
            if rt.handed:
                child = rt.worker
                if child.state not in ("idle", "busy") or child.gave_back:
                    # Its last run is on a worker that is leaving, or behind: still
                    # running, or waiting, at this one's time.
                    ready.popleft()
                    rt.queued, rt.skipped = False, rt.skipped + 1
                    continue
            else:
                child = first_free(takers, at)
            job = take(now, state_of, config_dir, state_dir, quiet)
            rt.worker = child
            child.free_at = max(child.free_at, at) + AROUND + took(rt.last)
            lines.setdefault(child.pid, (child, []))[1].append(hand(child, job, now))
        for child, batch in lines.values():
            self.server.send(child.conn, b"".join(batch))

    def on_worker(self, child, msg):
        """What a worker sent: a result, or the jobs it gives back."""
        if msg.get("t") == "back":
            for job in self.pool.given_back(child, msg):
                self.give_back(job)
            return
        job = self.pool.job_done(child, msg)
        if msg["t"] == "same" and job.said is not None:
            result = CheckResult.from_same(job, msg)
        else:
            result = CheckResult.from_wire(msg)
        self.scheduler.sample_lag(job, result)
        self.result(job, result)

    def give_back(self, job, skip=None):
        """``job`` did not run: its check waits for a worker again (at the front), or is
        skipped, as a run due while the last still runs is (``skip``; None: when another
        run of it is still unanswered)."""
        rt = self.scheduler.released(job.key)
        if rt is None or rt.queued:
            return
        if skip or (skip is None and rt.handed):
            rt.skipped += 1
            return
        self.scheduler.enqueue(rt, job.at, front=True)

    def result(self, job, result):
        done = self.scheduler.finished(job.key, result)
        if done is not None:
            rt, reports = done
            self.notify.check_ran(rt, result)
            # A result that could be held (it says what the last said: the very reports)
            # changed nothing when it ran; one that reached us after a newer report of its
            # host would have come before that one: it is not applied after it.
            held = job.same is not None and rt.said is not None and reports is rt.said[2]
            ended = (result.started or 0) + (result.duration or 0) if held else None
            last, now = self.ledger.reports, time.time()
            for host, state in reports:
                if held and host in last and last[host]["time"] > ended:
                    continue
                self.ledger.report(host, state, rt.check, now, rt.last["attributes"])
            if rt.check.group.recheck or rt.rechecking:
                self.scheduler.recheck(rt, pending_among(self.ledger, reports), time.monotonic())

    def worker_exited(self, child, stopping, how):
        """A worker is gone: the check it ran is lost, the rest of its jobs wait again."""
        jobs, child.jobs = child.jobs, {}
        running = child.running_job()
        if not stopping:                # a check the stop ended is no report
            pgid = child.check_pgid()
            if pgid:
                killpg_quietly(pgid, signal.SIGKILL)            # the check it left behind
            lost = jobs.pop(running, None)
            if lost is not None:
                self.result(lost, CheckResult.lost(lost, how, time.monotonic()))
            for job in jobs.values():       # a later run of the lost check was due while it ran
                self.give_back(job, skip=lost is not None and job.key == lost.key)
        child.close_slot()


# ============================================================================
# http_proto.py: HTTP/1.1 on the wire: requests read, answers written, the
# token checked.
# ============================================================================
#
# Owns the limits of the HTTP server, the request parser (RequestReader,
# parse_request_head), the Bearer/Basic token check, and the encoding of an answer.
# The answers themselves are http_views'; the server in the master's loop is
# http_server's.
#
# docs/http.md.  HttpServer is a part of the master's loop beside the control socket:
# a non-blocking listener and connections on the master's selector, no thread.  The
# answers are pure functions of the status document (the one --status --json
# prints), so the page, the JSON, the load balancer's check and the metrics can
# never disagree with each other or with --status.
#
# Why not http.server: its request handler reads a blocking file object, one
# request per call, and writes its answer before returning; nothing of it fits a
# loop that must never wait on a client.  http.client.parse_headers would fit (on
# a whole head; the etcd client below has the module loaded anyway), but measured it
# takes 52 us per head against 15 us for the parser below, and it quietly drops a
# malformed line or accepts a folded one, where a server must refuse both (RFC 9112 §5).
#
# Uses: base.

HTTP_HEAD_MAX = 8192            # request line plus headers: past it 431 (414: the line alone)
HTTP_MAX_CONNS = 64             # a new connection past this closes the oldest waiting one
HTTP_REQUEST_TIME = 10.0        # from a request's first byte (or the TLS handshake's) to its end
HTTP_IDLE = 10.0                # a kept-alive connection idle this long is closed
HTTP_SEND_TIME = 10.0           # an answer the client does not take in this time is dropped
HTTP_LINGER = 2.0               # after an answer that closes: reading what the client still sends
HTTP_RECV = 65536
HTTP_PASS_BUDGET = 0.005        # seconds of answering in one pass of the loop, at most;
HTTP_SHARE = 0.25               # and under a flood at most this share of the master's time
HTTP_AUTH_LOG_EVERY = 60.0      # one line per client address per minute about a refused token
HTTP_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
                404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
                413: "Content Too Large", 414: "URI Too Long", 431: "Request Header Fields Too Large",
                500: "Internal Server Error", 503: "Service Unavailable",
                505: "HTTP Version Not Supported"}
HTTP_READ_METHODS = ("GET", "HEAD", "OPTIONS")
# Without a token, a Host header must name the server by address (or localhost): a web
# page elsewhere could otherwise point a name of its own at 127.0.0.1 and read the
# answers with the browser of someone on this host (DNS rebinding).
_LOCAL_HOST_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[0-9.]+|localhost|[A-Za-z0-9.-]+\.localhost)(:[0-9]+)?\Z",
                            re.I)


class HttpError(HadaemonError):
    """A request answered with an error status; ``close``: the connection ends after it."""

    def __init__(self, status, message, close=False, headers=()):
        super().__init__(message)
        self.status, self.message, self.close, self.headers = status, message, close, tuple(headers)


@dataclasses.dataclass
class HttpRequest:
    method: str
    target: str         # as sent, for the debug log
    path: tuple         # the path's segments, each percent-decoded: () is "/"
    query: dict         # name -> value (the last one when repeated)
    version: tuple      # (1, 1)
    headers: dict       # lower-cased name -> value; repeated ones joined with ", "
    keep_alive: bool
    pairs: tuple = ()   # the query's (name, value) pairs, in order, repeats and all


_TCHAR = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE_RE = re.compile(rb"(" + _TCHAR + rb") (\S+) HTTP/(\d)\.(\d)\Z")
_HEADER_RE = re.compile(rb"(" + _TCHAR + rb"):[ \t]*(.*?)[ \t]*\Z", re.S)
_HEAD_END_RE = re.compile(rb"\r?\n\r?\n")
_BLANK_LINES_RE = re.compile(rb"[\r\n]*")
_FIELD_CTL_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class RequestReader:
    """Bytes in, request heads out, one at a time, within the limits of docs/http.md.

    Incremental: ``feed`` whatever arrived, then ``next_request`` until it returns
    None.  The end of a head is searched only in bytes not searched before, so a
    client sending one byte at a time costs no more than one sending it all.
    """

    def __init__(self):
        self.buf = bytearray()
        self.scanned = 0

    def feed(self, data):
        self.buf += data

    def started(self):
        """True once part of a request is in (blank lines between requests do not count)."""
        return _BLANK_LINES_RE.match(self.buf).end() < len(self.buf)

    def next_request(self):
        """The next whole request head, taken from the buffer; None until one is in.

        Raises HttpError (closing the connection) when the head breaks a limit or the
        grammar, or announces a body.
        """
        blank = _BLANK_LINES_RE.match(self.buf).end()   # RFC 9112 §2.2: ignore CRLFs before a request
        if blank:
            del self.buf[:blank]
            self.scanned = 0
        end = _HEAD_END_RE.search(self.buf, max(0, self.scanned - 3))
        if end is None or end.end() > HTTP_HEAD_MAX:
            if end is None and len(self.buf) < HTTP_HEAD_MAX:
                self.scanned = len(self.buf)
                return None
            if self.buf.find(b"\n", 0, HTTP_HEAD_MAX) < 0:
                raise HttpError(414, "the request line is longer than %d bytes" % HTTP_HEAD_MAX, True)
            raise HttpError(431, "the request line and headers are longer than %d bytes"
                            % HTTP_HEAD_MAX, True)
        head = bytes(self.buf[:end.start()])
        del self.buf[:end.end()]
        self.scanned = 0
        return parse_request_head(head)


def parse_request_head(head):
    """One request head (without its blank line) -> HttpRequest; HttpError when malformed."""
    lines = [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]
    m = _REQUEST_LINE_RE.match(lines[0])
    if not m:
        raise HttpError(400, "malformed request line", True)
    version = (int(m.group(3)), int(m.group(4)))
    if version[0] != 1:
        raise HttpError(505, "HTTP/%d.%d is not served: speak HTTP/1.1" % version, True)
    headers = {}
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise HttpError(400, "a folded header line (obsolete line folding is refused)", True)
        hm = _HEADER_RE.match(line)
        if not hm or _FIELD_CTL_RE.search(hm.group(2)):
            raise HttpError(400, "malformed header line", True)
        name, value = hm.group(1).decode("ascii").lower(), hm.group(2).decode("latin-1")
        headers[name] = headers[name] + ", " + value if name in headers else value
    if "transfer-encoding" in headers:
        raise HttpError(413, "no request here takes a body", True)
    if "content-length" in headers:
        lengths = {v.strip() for v in headers["content-length"].split(",")}
        length = lengths.pop()
        if lengths or not re.match(r"[0-9]{1,18}\Z", length):
            raise HttpError(400, "bad Content-Length", True)
        if int(length) > 0:
            raise HttpError(413, "no request here takes a body", True)
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "close" not in tokens if version >= (1, 1) else "keep-alive" in tokens
    method = m.group(1).decode("ascii")
    path, pairs = _parse_target(m.group(2), method)
    return HttpRequest(method, m.group(2).decode("latin-1"), path, dict(pairs), version, headers, keep_alive,
                       tuple(pairs))


def _parse_target(raw, method):
    """A request target -> (path segments, the query's pairs); HttpError 400 when it is not one."""
    try:
        target = raw.decode("ascii")
        if target == "*" and method == "OPTIONS":
            return (), []       # the server as a whole: answered as "/"
        if target.lower().startswith(("http://", "https://")):     # absolute form (RFC 9112 §3.2.2)
            target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
        if not target.startswith("/"):
            raise ValueError("not a path")
        path, _, query = target.partition("#")[0].partition("?")
        segments = tuple(urllib.parse.unquote(seg, errors="strict") for seg in path.split("/")[1:])
        if segments == ("",):
            segments = ()
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, errors="strict",
                                       max_num_fields=32)
        return segments, pairs
    except (UnicodeError, ValueError):
        raise HttpError(400, "malformed request target", True) from None


def token_problem(header, token):
    """None when ``header`` (Authorization) carries ``token``, else why not (never the token).

    ``Bearer TOKEN``, or Basic with any user name and TOKEN as password (so a browser
    can log in); compared in constant time.
    """
    if not header:
        return "no token"
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip().encode("latin-1")
    if scheme.lower() == "bearer":
        given = credentials
    elif scheme.lower() == "basic":
        try:
            user_pass = base64.b64decode(credentials, validate=True)
        except ValueError:
            return "malformed Basic credentials"
        given = user_pass.partition(b":")[2]
    else:
        return "not Bearer or Basic"     # never the word itself: it may be the token
    import hmac     # here: it loads libcrypto, 3.4 MB of PSS a daemon without a token does without
    return None if hmac.compare_digest(given, token.encode("ascii")) else "wrong token"


@dataclasses.dataclass
class HttpAnswer:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple = ()                 # extra (name, value) pairs
    close: bool = False                 # end the connection after it


def json_answer(status, obj, headers=()):
    return HttpAnswer(status, json.dumps(obj, separators=(",", ":")).encode() + b"\n",
                      headers=tuple(headers))


def error_answer(status, message, headers=(), close=False):
    answer = json_answer(status, {"error": message}, headers)
    answer.close = close
    return answer


_HTTP_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_HTTP_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(when):
    """RFC 9110's IMF-fixdate, whatever the locale."""
    t = time.gmtime(when)
    return "%s, %02d %s %04d %02d:%02d:%02d GMT" % (_HTTP_WEEKDAYS[t.tm_wday], t.tm_mday, _HTTP_MONTHS[t.tm_mon - 1],
                                                    t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)


def encode_answer(answer, method, version, keep_alive, now=None):
    """The bytes of an answer: status line, headers, and the body unless HEAD or OPTIONS."""
    lines = ["HTTP/1.1 %d %s" % (answer.status, HTTP_REASONS.get(answer.status, "Unknown")),
             "Date: " + http_date(time.time() if now is None else now),
             "Server: hadaemon",
             "Content-Type: " + answer.content_type,
             "Content-Length: %d" % len(answer.body),
             "Cache-Control: no-store",
             "X-Content-Type-Options: nosniff"]
    lines += ["%s: %s" % pair for pair in answer.headers]
    if not keep_alive or answer.close:
        lines.append("Connection: close")
    elif version < (1, 1):
        lines.append("Connection: keep-alive")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if method in ("HEAD", "OPTIONS") else head + answer.body


# ============================================================================
# http_views.py: The HTTP answers: pure functions of the status document
# (JSON, the page, metrics).
# ============================================================================
#
# Owns the routing table of docs/http.md, the status page's HTML and its CSS (with
# the hash its Content-Security-Policy names), and the Prometheus text format.
# Nothing here reads a socket or the clock: a test hands in the document.
#
# Uses: base, wire, http_proto.

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


# ============================================================================
# http_server.py: The HTTP server: a part of the master's loop, its
# connections and their budget.
# ============================================================================
#
# Owns HttpServer: a non-blocking listener and its connections on the master's
# selector (no thread), TLS when ``http_cert`` is set, the per-connection deadlines,
# and the answering budget that keeps a flood of requests from holding due checks
# back (at most a share of the loop's time).
#
# Uses: base, netsettings, wire, http_proto, http_views.

# -- the server: a part of the master's loop -----------------------------------------

def http_listen(address):
    """A non-blocking listening socket on ``address``; HadaemonError naming it when it cannot."""
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # a restart need not wait out TIME_WAIT
        sock.bind((address.host, address.port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise HadaemonError("cannot listen on %s (http = %s): %s%s" % (
            address.url(), address.text, exc.strerror,
            "; another process holds the port" if exc.errno == errno.EADDRINUSE else "")) from None
    sock.setblocking(False)
    return sock


class HttpApp(typing.NamedTuple):
    """What HttpServer answers from: the master's own views, so nothing can be stale."""
    document: typing.Callable       # () -> the --status --json document
    host: typing.Callable           # (name) -> that document's hosts[name], built alone; None: never seen
    history: typing.Callable        # (n) -> --history n --json
    pause: typing.Callable          # (flag) -> the paused state after it


class HttpConn:
    """One HTTP client connection and where it is in its life."""

    def __init__(self, sock, peer, now, tls):
        self.sock = sock
        self.peer = peer                    # the client's address, for the log
        self.reader = RequestReader()
        self.out = bytearray()              # the answer still to send
        self.handshake = tls                # a TLS handshake is yet to finish
        self.since = now                    # when its current wait began: accepted, or last answered
        self.request_at = now if tls else None  # first byte of the request on its way (or the handshake)
        self.sent_at = None                 # when ``out`` began to wait for the client
        self.closing = False                # end the connection once ``out`` is sent
        self.linger_until = None            # half-closed: reading what the client still sends until then
        self.events = selectors.EVENT_READ     # 0: out of the selector, waiting for credit
        self.handler = None

    def waiting_since(self):
        return self.since if self.request_at is None else self.request_at


class HttpServer:
    """The HTTP server of docs/http.md: a listener and its connections on the master's selector.

    The master calls ``configure(settings)`` at start and on reload, ``tick(now)`` on
    every pass of its loop and ``close()`` at stop; the rest happens in selector
    callbacks, and none of them waits.  ``app`` (an HttpApp) is what it answers
    from.  While an answer waits to go out its connection is not read, so a client
    that never reads holds one answer, not more.
    """

    def __init__(self, sel, app):
        self.sel, self.app = sel, app
        self.address = None
        self.listener = None
        self.tls = None                     # ssl.SSLContext with http_cert
        self.token = None
        self.conns = {}                     # fd -> HttpConn
        self.refused = {}                   # (client address, "token" | "host") -> when last logged
        self.accept_paused_until = None
        self.next_tick = 0.0
        # Answering time is credit: spent by each answer, earned back at HTTP_SHARE of
        # the time that passes, never more than HTTP_PASS_BUDGET.  Without credit a
        # connection leaves the selector (``waiting``) until there is some again.
        self.credit, self.credit_at = HTTP_PASS_BUDGET, None
        self.waiting = []
        self.would_block = (BlockingIOError, InterruptedError)     # and ssl's, with http_cert

    @property
    def url(self):
        return self.address.url(self.tls is not None) if self.listener is not None else None

    def configure(self, settings):
        """Apply the [daemon] http settings: listen, move, or stop.

        Raises HadaemonError naming the address when it cannot listen there; then
        everything stays as it was (the old listener too).
        """
        tls = None
        if settings.http and settings.http_cert:
            try:
                tls = http_ssl_context(settings.http_cert)
            except ValueError as exc:
                raise HadaemonError("http_cert: %s" % exc) from None
        before = (self.url, self.token is not None)
        if settings.http != self.address:
            self._move(settings.http)
        elif (tls is None) != (self.tls is None):
            for conn in list(self.conns.values()):     # they speak the other protocol
                self._close(conn)
        self.tls, self.token = tls, settings.http_token
        if tls is not None:
            import ssl
            self.would_block = (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                                ssl.SSLWantWriteError)
        if (self.url, self.token is not None) != before:
            log.info("http: %s%s", "serving " + self.url if self.url else "off",
                     " (token required)" if self.url and self.token else "")

    def _move(self, address):
        new = None
        if address is not None:
            try:
                new = http_listen(address)
            except HadaemonError:
                if self.listener is None or address.port != self.address.port:
                    raise
                # The old listener may be what holds the port (127.0.0.1:P -> 0.0.0.0:P):
                # let it go, and take it back if the new address still cannot be had.
                old = self.address
                self._stop_listening()
                try:
                    new = http_listen(address)
                except HadaemonError:
                    self._start_listening(http_listen(old), old)
                    raise
        self._stop_listening()
        for conn in list(self.conns.values()):
            self._close(conn)
        if new is not None:
            self._start_listening(new, address)

    def _start_listening(self, sock, address):
        self.listener, self.address = sock, address
        self.sel.register(sock, selectors.EVENT_READ, self.accept)

    def _stop_listening(self):
        if self.listener is not None:
            if self.accept_paused_until is None:
                self.sel.unregister(self.listener)
            self.listener.close()
        self.listener = self.address = self.accept_paused_until = None

    def close(self):
        for conn in list(self.conns.values()):
            self._close(conn)
        self._stop_listening()

    # -- connections ------------------------------------------------------------------

    def accept(self, mask):
        now = time.monotonic()
        for _ in range(HTTP_MAX_CONNS):
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    log.error("http: cannot accept connections: too many open files; new ones wait 1s")
                    self.sel.unregister(self.listener)
                    self.accept_paused_until = now + 1.0
                else:
                    log.warning("http: accept failed: %s", exc)
                return
            if len(self.conns) >= HTTP_MAX_CONNS:
                oldest = min(self.conns.values(), key=lambda c: (bool(c.out), c.waiting_since()))
                log.debug("http: %d connections open; closing the one from %s waiting since %.1fs",
                          len(self.conns), oldest.peer, now - oldest.waiting_since())
                self._close(oldest)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.tls is not None:
                    sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except OSError as exc:
                log.debug("http: connection from %s lost at once: %s", peer[0], exc)
                sock.close()
                continue
            conn = HttpConn(sock, peer[0], now, self.tls is not None)
            conn.handler = lambda m, c=conn: self.on_io(c, m)
            self.conns[sock.fileno()] = conn
            self.sel.register(sock, selectors.EVENT_READ, conn.handler)

    def on_io(self, conn, mask):
        now = time.monotonic()
        if conn.linger_until is not None:
            self._linger(conn)
        elif conn.handshake:
            self._handshake(conn, now)
        else:
            if conn.out:
                self._flush(conn, now)
            if not conn.out and not conn.closing and conn.sock.fileno() >= 0:
                self._pump(conn, now)

    def _handshake(self, conn, now):
        import ssl                      # a handshake: there is a TLS context, ssl is loaded
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._want(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._want(conn, selectors.EVENT_WRITE)
            return
        except OSError as exc:          # ssl.SSLError too: not TLS, a bad client, a reset
            log.debug("http: TLS handshake with %s failed: %s", conn.peer, exc)
            self._close(conn)
            return
        conn.handshake = False
        conn.request_at, conn.since = None, now
        self._pump(conn, now)

    def _pump(self, conn, now):
        """Answer what the buffer holds, reading more while no answer waits to go out."""
        for _ in range(16):             # then a later pass: one client does not hold the loop
            if self.credit <= 0:
                # Enough answering for now: due checks go out first, and the workers
                # and their checks get the CPU.  tick() lets the connection back.
                self._wait(conn)
                return
            try:
                request = conn.reader.next_request()
            except HttpError as exc:
                self._send(conn, None, error_answer(exc.status, exc.message, exc.headers, True), now)
                return
            if request is not None:
                conn.request_at = now if conn.reader.started() else None
                started = time.monotonic()
                self._send(conn, request, self.answer(request, conn.peer, now), now)
                self.credit -= time.monotonic() - started
                if conn.out or conn.closing:
                    return
                continue
            try:
                data = conn.sock.recv(HTTP_RECV)
            except self.would_block:
                self._want(conn, selectors.EVENT_READ)
                return
            except OSError:
                data = b""
            if not data:
                self._close(conn)
                return
            conn.reader.feed(data)
            if conn.request_at is None and conn.reader.started():
                conn.request_at = now
        self._want(conn, selectors.EVENT_WRITE)   # bytes may wait where the selector cannot see them

    def answer(self, request, peer, now):
        """The answer to one request: the token first, then docs/http.md's table."""
        if self.token is not None:
            problem = token_problem(request.headers.get("authorization"), self.token)
            if problem:
                self._log_refused(peer, request, problem, now, "token")
                return error_answer(401, "a token is needed: Authorization: Bearer TOKEN, or Basic "
                                         "with the token as password",
                                    [("WWW-Authenticate", 'Basic realm="hadaemon"')])
        elif not _LOCAL_HOST_RE.match(request.headers.get("host", "localhost").strip()):
            why = ("Host %s: without http_token only an IP address or localhost names this server"
                   % _shorten(request.headers["host"], 100))
            self._log_refused(peer, request, why, now, "host")
            return error_answer(403, why)
        try:
            return http_route(request, self.app, self.token is not None)
        except Exception:               # noqa: BLE001 - a bug in one answer must not stop the master
            log.exception("http: answering %s %s failed", request.method, _shorten(request.target, 200))
            return error_answer(500, "internal error; the daemon's log has the details")

    def _log_refused(self, peer, request, problem, now, kind):
        last = self.refused.get((peer, kind))
        if last is not None and now - last < HTTP_AUTH_LOG_EVERY:
            return
        if len(self.refused) > 1024:
            self.refused = {p: t for p, t in self.refused.items() if now - t < HTTP_AUTH_LOG_EVERY}
        self.refused[peer, kind] = now
        log.warning("http: refused %s %s from %s: %s (logged once a minute per address and reason)",
                    request.method, _shorten(request.target, 100), peer, problem)

    def _send(self, conn, request, answer, now):
        keep = request is not None and request.keep_alive and not answer.close
        conn.out += encode_answer(answer, request.method if request else "GET",
                                  request.version if request else (1, 1), keep)
        conn.closing = not keep
        conn.since = now
        log.debug("http %s %s %s: %d, %d bytes", conn.peer, request.method if request else "-",
                  _shorten(request.target if request else "(malformed)", 200), answer.status,
                  len(answer.body))
        self._flush(conn, now)

    def _flush(self, conn, now):
        try:
            while conn.out:
                del conn.out[:conn.sock.send(conn.out)]
        except self.would_block:
            pass
        except OSError:
            self._close(conn)
            return
        if conn.out:
            conn.sent_at = conn.sent_at or now
            self._want(conn, selectors.EVENT_WRITE)
            return
        conn.sent_at = None
        if conn.closing:
            self._finish(conn, now)

    def _finish(self, conn, now):
        """After an answer that ends the connection: half-close, then read out what the
        client still sends, so our answer is not lost to a reset (RFC 9112 §9.6)."""
        if conn.sock.fileno() < 0:
            return
        if self.tls is not None or not conn.reader.started():
            self._close(conn)
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.linger_until = now + HTTP_LINGER
        self._want(conn, selectors.EVENT_READ)

    def _linger(self, conn):
        try:
            if conn.sock.recv(HTTP_RECV):
                return
        except self.would_block:
            return
        except OSError:
            pass
        self._close(conn)

    def _want(self, conn, events):
        if conn.events == events or conn.sock.fileno() < 0:
            return
        if conn.events:
            self.sel.modify(conn.sock, events, conn.handler)
        else:
            self.waiting.remove(conn)
            self.sel.register(conn.sock, events, conn.handler)
        conn.events = events

    def _wait(self, conn):
        """Out of the selector until there is credit (level-triggered, it would spin)."""
        if conn.events:
            self.sel.unregister(conn.sock)
            conn.events = 0
            self.waiting.append(conn)

    def _close(self, conn):
        fd = conn.sock.fileno()
        if fd < 0:
            return
        if conn.events:
            self.sel.unregister(conn.sock)
        else:
            self.waiting.remove(conn)
        del self.conns[fd]
        conn.sock.close()

    def wakeup(self):
        """When the loop must wake for connections waiting for credit (monotonic), or None."""
        if not self.waiting or self.credit_at is None:
            return None
        return self.credit_at + max(0.0, -self.credit) / HTTP_SHARE + 0.001

    def tick(self, now):
        """Every pass: credit earned, and waiting connections back once there is some.
        Twice a second: the deadlines of half-sent requests, idle keep-alives, unread answers."""
        if self.credit_at is not None:
            self.credit = min(HTTP_PASS_BUDGET, self.credit + (now - self.credit_at) * HTTP_SHARE)
        self.credit_at = now
        if self.credit > 0:
            for conn in list(self.waiting):
                self._want(conn, selectors.EVENT_WRITE)     # writable: back in the next pass
        if self.accept_paused_until is not None and now >= self.accept_paused_until:
            self.accept_paused_until = None
            self.sel.register(self.listener, selectors.EVENT_READ, self.accept)
        if now < self.next_tick:
            return
        self.next_tick = now + 0.5
        for conn in list(self.conns.values()):
            if conn.linger_until is not None:
                if now >= conn.linger_until:
                    self._close(conn)
            elif conn.out:
                if now - conn.sent_at > HTTP_SEND_TIME:
                    log.debug("http: %s did not take its answer in %ds; closed", conn.peer, HTTP_SEND_TIME)
                    self._close(conn)
            elif conn.request_at is not None:
                if now - conn.request_at > HTTP_REQUEST_TIME:
                    if conn.handshake:
                        self._close(conn)
                    else:
                        self._send(conn, None, error_answer(
                            408, "the request was not complete within %ds" % HTTP_REQUEST_TIME,
                            close=True), now)
            elif now - conn.since > HTTP_IDLE:
                self._close(conn)


# ============================================================================
# etcd.py: etcd: a v3 client on its JSON gateway (docs/cluster.md).
# ============================================================================
#
# What this client is built on, measured on etcd 3.4 (../shared/notes/etcd-v3-gateway.md):
#
#   - every call is a POST of a JSON body to /v3/...; keys and values are base64;
#     int64 fields come back as strings; fields at their default value are left out
#     of answers (a txn whose compare failed has no "succeeded" at all).
#   - without etcd quorum, writes, lease grants and keep-alives never answer: only
#     our socket timeout ends them.  A write that timed out may still be applied
#     later, so its outcome is unknown (EtcdUnknown), never a failure to retry.
#   - a call that never left (refused, no route, the connect timed out) is tried on
#     the next endpoint; so is a read or a keep-alive whose answer was lost.
#   - http.client, never urllib: urllib follows http_proxy from the environment.
#
# Every call blocks for at most ``timeout``: the client runs in the cluster agent,
# a process of its own, so a call etcd never answers stalls nothing of the master.
#
# Uses: base, netsettings, wire, proc.

class EtcdError(HadaemonError):
    """etcd refused a call (``status`` / ``code`` say why), or no endpoint answered."""

    def __init__(self, message, status=None, code=None):
        super().__init__(message)
        self.status, self.code = status, code


class EtcdUnknown(EtcdError):
    """A write was sent and its answer lost: it may be applied, now or later."""


class _TryNext(Exception):
    """This endpoint did not do it (never reached, or a read it failed): try the next."""


def b64(text):
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def unb64(text):
    return base64.b64decode(text or "").decode("utf-8", "replace")


def prefix_end(prefix):
    """The range_end that makes a range cover every key starting with ``prefix``."""
    raw = prefix.encode("utf-8")
    return base64.b64encode(raw[:-1] + bytes([raw[-1] + 1])).decode("ascii")


def decode_kv(kv):
    """A gateway key-value -> {key, value, lease, create, mod} with ints and text."""
    return {"key": unb64(kv.get("key")), "value": unb64(kv.get("value")),
            "lease": int(kv.get("lease") or 0), "create": int(kv.get("create_revision") or 0),
            "mod": int(kv.get("mod_revision") or 0)}


def etcd_put(key, value, lease=None):
    put = {"key": b64(key), "value": b64(value)}
    if lease:
        put["lease"] = str(lease)
    return {"request_put": put}


def etcd_delete(key):
    return {"request_delete_range": {"key": b64(key)}}


def etcd_get(key):
    return {"request_range": {"key": b64(key)}}


def etcd_compare(key, target, value, result="EQUAL"):
    """A txn compare: ``target`` CREATE / MOD / VERSION (a revision) or VALUE (text) / LEASE."""
    field = {"CREATE": "create_revision", "MOD": "mod_revision", "VERSION": "version",
             "VALUE": "value", "LEASE": "lease"}[target]
    return {"key": b64(key), "target": target, "result": result,
            field: b64(value) if target == "VALUE" else str(value)}


def connect_bounded(host, port, timeout):
    """A TCP connection to host:port within ``timeout`` seconds, the name lookup included:
    getaddrinfo alone may wait on a dead DNS server far longer, so a name (not an address)
    is looked up in a thread of its own, given up on (left to end by itself) at the timeout."""
    deadline = time.monotonic() + timeout
    try:
        found = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except socket.gaierror:
        answer = []
        lookup = threading.Thread(target=lambda: answer.append(_lookup(host, port)), daemon=True)
        lookup.start()
        lookup.join(timeout)
        if not answer:
            raise socket.gaierror(socket.EAI_AGAIN, "the name lookup of %s took longer than %gs"
                                  % (host, timeout))
        if isinstance(answer[0], OSError):
            raise answer[0]
        found = answer[0]
    error = socket.timeout("timed out")
    for family, kind, proto, _, address in found:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock = socket.socket(family, kind, proto)
        sock.settimeout(left)
        try:
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


def _lookup(host, port):
    try:
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except OSError as exc:
        return exc


class EtcdEndpoint:
    """One endpoint URL and what it last did: shared by the clients of one agent (each
    keeps its own connection to it), so that one's failure demotes it for the other."""

    def __init__(self, url, context):
        self.url = url
        self.scheme, self.host, self.port = parse_etcd_url(url)
        self.context = context
        self.last_ok = None             # monotonic time of its last answer
        self.error = None               # why its last call failed, until one succeeds
        self.down_until = 0.0           # tried last until then, after it gave no answer


def endpoint_order(endpoints, current, now):
    """The order to try ``endpoints`` in: from ``current`` (the one that answered last) on
    round the ring, those demoted (no answer lately) last, the longest demoted first."""
    ring = endpoints[current:] + endpoints[:current]
    return [ep for ep in ring if ep.down_until <= now] + \
        sorted((ep for ep in ring if ep.down_until > now), key=lambda ep: ep.down_until)


def _etcd_message(doc, status):
    """What an error answer says: {error, message, code}, or for streams {error: {message}}."""
    error = doc.get("error")
    if isinstance(error, dict):
        error = error.get("message")
    return str(doc.get("message") or error or "HTTP %d" % status)[:300]


def _os_error_text(exc):
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class EtcdClient:
    """Calls on the JSON gateway of every endpoint given, moving on when one fails.

    A call goes first to the endpoint that answered this client last, then round the
    others; one that gave no answer (refused, timed out, reset, etcd's own timeout) is
    demoted for ``demote`` seconds: tried last, after those that answer.  ``requests``
    counts the calls sent (for the figures: a steady cluster should only send
    keep-alives).  Each attempt is bounded by ``timeout`` seconds.
    """

    def __init__(self, urls, timeout=1.0, context=None, demote=None, endpoints=None):
        if any(url.startswith("https:") for url in urls) and context is None:
            import ssl
            context = ssl.create_default_context()
        self.endpoints = endpoints or [EtcdEndpoint(url, context) for url in urls]
        self.timeout = timeout
        self.demote = 2 * timeout if demote is None else demote
        self.conns = {}                 # url -> its kept-alive connection (this client's own)
        self.current = 0                # where the next call goes first
        self.requests = 0
        self.last = None                # the endpoint that answered the last call

    @classmethod
    def for_cluster(cls, cluster, timeout, demote=None):
        context = etcd_ssl_context(cluster) if any(u.startswith("https:") for u in cluster.etcd) else None
        return cls(cluster.etcd, timeout, context, demote)

    def twin(self, timeout):
        """A client of its own connections on the same endpoints, sharing what each did."""
        return EtcdClient([ep.url for ep in self.endpoints], timeout, demote=self.demote,
                          endpoints=self.endpoints)

    def _order(self, rotate):
        if rotate:
            self.current = (self.current + 1) % len(self.endpoints)
        return endpoint_order(self.endpoints, self.current, time.monotonic())

    def call(self, path, body, idempotent=False, rotate=False, timeout=None):
        """POST ``body`` to ``path``: the decoded answer.  A call that never left goes to
        the next endpoint; so does an ``idempotent`` one whose answer was lost.  Raises
        EtcdUnknown for a write whose answer was lost, EtcdError otherwise."""
        payload = json.dumps(body).encode("utf-8")
        failures = []
        for ep in self._order(rotate):
            try:
                answer = self._call_one(ep, path, payload, idempotent, timeout or self.timeout)
            except _TryNext as exc:
                failures.append("%s: %s" % (ep.url, exc))
                continue
            except EtcdUnknown as exc:
                if idempotent:
                    failures.append("%s: %s" % (ep.url, exc))
                    continue
                raise
            self.current = self.endpoints.index(ep)
            self.last = ep
            return answer
        raise EtcdError("no etcd endpoint answered: %s" % "; ".join(failures))

    def _connection(self, ep, timeout):
        """The kept-alive connection to ``ep``, or a new one, bounded by ``timeout``.  One
        etcd closed (or a member that restarted) reads as EOF: a request sent on it would
        be lost for nothing."""
        import http.client
        conn = self.conns.get(ep.url)
        if conn is not None and conn.sock is not None and _select_read([conn.sock], 0):
            self._close(ep)
            conn = None
        if conn is None or conn.sock is None:
            if ep.scheme == "https":
                conn = http.client.HTTPSConnection(ep.host, ep.port, timeout=timeout, context=ep.context)
            else:
                conn = http.client.HTTPConnection(ep.host, ep.port, timeout=timeout)
            self.conns[ep.url] = conn
            try:
                sock = connect_bounded(ep.host, ep.port, timeout)    # not conn.connect(): DNS too
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if ep.scheme == "https":
                    sock = ep.context.wrap_socket(sock, server_hostname=ep.host)
                conn.sock = sock
            except (OSError, http.client.HTTPException) as exc:
                self._close(ep)
                raise _TryNext(_os_error_text(exc))
        conn.sock.settimeout(timeout)
        return conn

    def _close(self, ep):
        conn = self.conns.pop(ep.url, None)
        if conn is not None:
            conn.close()

    def _failed(self, ep, why):
        self._close(ep)
        ep.error = why
        ep.down_until = time.monotonic() + self.demote

    def _call_one(self, ep, path, payload, idempotent, timeout):
        return self._receive(ep, self._send(ep, path, payload, timeout), path, idempotent)

    def _send(self, ep, path, payload, timeout):
        """The request sent on ``ep``'s connection (made within ``timeout``): the connection."""
        import http.client
        try:
            conn = self._connection(ep, timeout)
            self.requests += 1
            try:
                conn.request("POST", path, payload, {"Content-Type": "application/json"})
            except (OSError, http.client.HTTPException) as exc:
                raise _TryNext(_os_error_text(exc))
        except _TryNext as exc:
            self._failed(ep, str(exc))
            raise
        return conn

    def _receive(self, ep, conn, path, idempotent):
        """The answer on ``conn``, read within its socket's timeout: the decoded document."""
        import http.client
        try:
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            why = _os_error_text(exc)
            self._failed(ep, why)
            raise EtcdUnknown("%s %s: no answer (%s)" % (ep.url, path, why))
        if resp.will_close:
            self._close(ep)
        try:
            doc = json.loads(data.decode("utf-8")) if data else {}
        except (UnicodeDecodeError, ValueError):
            doc = {"error": data[:200].decode("utf-8", "replace")}
        if not isinstance(doc, dict):
            doc = {"error": "unexpected answer %r" % (data[:200],)}
        if resp.status >= 500:
            self._failed(ep, _etcd_message(doc, resp.status))
            if not idempotent:
                # etcd's own timeouts ("context deadline exceeded", "leader changed"):
                # the proposal may be in the log and still be applied.
                raise EtcdUnknown("%s %s: %s" % (ep.url, path, ep.error))
            raise _TryNext(ep.error)
        ep.last_ok, ep.error, ep.down_until = time.monotonic(), None, 0.0
        if resp.status != 200:
            raise EtcdError("%s %s: %s" % (ep.url, path, _etcd_message(doc, resp.status)),
                            status=resp.status, code=doc.get("code"))
        return doc

    def race(self, path, body, stagger, budget, rotate=False):
        """An idempotent call sent to the first endpoint, and to the next each ``stagger``
        seconds it goes unanswered, the first answer taken, for ``budget`` seconds: a
        dead endpoint costs a stagger, and a call etcd holds (a raft election) is
        answered as soon as etcd can, not dropped by a timeout just before."""
        payload = json.dumps(body).encode("utf-8")
        order = self._order(rotate)
        started = time.monotonic()
        deadline, next_at = started + budget, started
        pending, failures = {}, []
        try:
            while True:
                now = time.monotonic()
                if order and now >= next_at:
                    ep = order.pop(0)
                    try:
                        pending[ep] = (self._send(ep, path, payload, max(0.05, min(stagger, deadline - now))), now)
                    except _TryNext as exc:
                        failures.append("%s: %s" % (ep.url, exc))
                        continue            # refused at once: the next one now
                    next_at = now + stagger
                if not pending and not order:
                    raise EtcdError("no etcd endpoint answered: %s" % "; ".join(failures))
                if now >= deadline:
                    raise EtcdError("no etcd endpoint answered in %.2fs: %s" % (budget, "; ".join(
                        failures + ["%s: no answer (timed out)" % ep.url for ep in pending])))
                wait = (min(next_at, deadline) if order else deadline) - now
                ready = _select_read([conn.sock for conn, _ in pending.values()], max(0.0, wait))
                for ep in [ep for ep, (conn, _) in pending.items() if conn.sock in ready]:
                    conn, _ = pending.pop(ep)
                    conn.sock.settimeout(max(0.05, deadline - time.monotonic()))
                    try:
                        answer = self._receive(ep, conn, path, True)
                    except (_TryNext, EtcdUnknown) as exc:
                        failures.append("%s: %s" % (ep.url, exc))
                        next_at = time.monotonic()      # the next one now
                        continue
                    self.current = self.endpoints.index(ep)
                    self.last = ep
                    return answer
        finally:
            now = time.monotonic()
            for ep, (conn, sent) in pending.items():
                self._close(ep)             # its answer would come on a connection we reuse
                if now - sent >= stagger:
                    self._failed(ep, "timed out")

    # -- the calls hadaemon uses ------------------------------------------------------

    def status(self, ep):
        """/v3/maintenance/status of one endpoint (for --check-config --connect)."""
        answer = self._call_one(ep, "/v3/maintenance/status", b"{}", True, self.timeout)
        self.last = ep
        return answer

    def grant(self, ttl, timeout=None):
        """A new lease: (id, the TTL etcd granted, maybe more than asked)."""
        answer = self.call("/v3/lease/grant", {"TTL": ttl}, idempotent=True, timeout=timeout)
        if answer.get("error"):
            raise EtcdError("lease grant refused: %s" % answer["error"])
        return int(answer["ID"]), int(answer.get("TTL") or 0)

    def keepalive(self, lease, stagger=None, budget=None):
        """Renew a lease: (its TTL, or 0 when it is gone (expired or revoked), revision).

        Sent to each endpoint in turn, so every endpoint is heard from within a few
        renewals and a member that lost its quorum is found without an extra call;
        raced (``race``) when it does not answer within ``stagger``."""
        stagger = stagger or self.timeout
        answer = self.race("/v3/lease/keepalive", {"ID": str(lease)}, stagger,
                           budget or len(self.endpoints) * stagger, rotate=True)
        result = answer.get("result") or {}
        return int(result.get("TTL") or 0), int((result.get("header") or {}).get("revision") or 0)

    def revoke(self, lease, timeout=None):
        """Revoke a lease (and delete its keys); one already gone is no error."""
        try:
            self.call("/v3/lease/revoke", {"ID": str(lease)}, idempotent=True, timeout=timeout)
        except EtcdError as exc:
            if exc.status != 404:
                raise

    def range(self, key, prefix=False):
        """(revision, [kv]) of ``key``, or of every key under it with ``prefix``."""
        body = {"key": b64(key)}
        if prefix:
            body["range_end"] = prefix_end(key)
        answer = self.call("/v3/kv/range", body, idempotent=True)
        revision = int((answer.get("header") or {}).get("revision") or 0)
        return revision, [decode_kv(kv) for kv in answer.get("kvs") or []]

    def put(self, key, value, lease=None):
        """Put one key (on ``lease``): the revision of the write."""
        body = etcd_put(key, value, lease)["request_put"]
        answer = self.call("/v3/kv/put", body)
        return int((answer.get("header") or {}).get("revision") or 0)

    def txn(self, compares, success, failure=()):
        """(succeeded, revision, responses) of a transaction."""
        answer = self.call("/v3/kv/txn", {"compare": list(compares), "success": list(success),
                                          "failure": list(failure)})
        revision = int((answer.get("header") or {}).get("revision") or 0)
        return bool(answer.get("succeeded")), revision, answer.get("responses") or []

    def health(self):
        """[{endpoint, last_ok, error}] for every endpoint (last_ok: monotonic, or None)."""
        return [{"endpoint": ep.url, "last_ok": ep.last_ok, "error": ep.error}
                for ep in self.endpoints]

    def close(self):
        for ep in self.endpoints:
            self._close(ep)


def connect_etcd_endpoints(cluster, timeout=2.0):
    """--check-config --connect: [(url, error or None, what it answered)] for each endpoint."""
    client = EtcdClient.for_cluster(cluster, timeout)
    results = []
    for ep in client.endpoints:
        started = time.monotonic()
        try:
            answer = client.status(ep)
        except (EtcdError, _TryNext) as exc:
            results.append((ep.url, str(exc), None))
            continue
        took = time.monotonic() - started
        header = answer.get("header") or {}
        results.append((ep.url, None, "ok in %.2fs (etcd %s, member %s, %s)" % (
            took, answer.get("version", "?"), header.get("member_id", "?"),
            "the raft leader" if answer.get("leader") == header.get("member_id")
            else "leader %s" % answer.get("leader", "unknown"))))
    client.close()
    return results


class EtcdWatch:
    """One watch stream (POST /v3/watch) on one endpoint, read without blocking.

    The gateway answers with chunked transfer encoding, one JSON object per line;
    ``read()`` returns the objects that have arrived and raises EtcdError when the
    stream ends or breaks.  ``fileno()`` is for select.
    """

    def __init__(self, ep, prefix, start_revision, timeout):
        import ssl
        self.ep = ep
        self.buf = bytearray()
        self.headers_done = False
        self.lines = LineReader()
        sock = connect_bounded(ep.host, ep.port, timeout)
        try:
            if ep.scheme == "https":
                sock = ep.context.wrap_socket(sock, server_hostname=ep.host)
            body = json.dumps({"create_request": {"key": b64(prefix), "range_end": prefix_end(prefix),
                                                  "start_revision": str(start_revision)}}).encode()
            host = "[%s]" % ep.host if ":" in ep.host else ep.host
            sock.sendall(b"POST /v3/watch HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (host.encode(), ep.port, len(body), body))
            sock.setblocking(False)
        except (OSError, ssl.SSLError):
            sock.close()
            raise
        self.sock = sock

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        self.sock.close()

    def read(self):
        """The JSON objects that arrived (each {"result": {...}}); EtcdError at the end."""
        import ssl
        ended = False
        while True:
            try:
                data = self.sock.recv(262144)
            except (BlockingIOError, ssl.SSLWantReadError, InterruptedError):
                break
            except (OSError, ssl.SSLError) as exc:
                raise EtcdError("watch on %s broke: %s" % (self.ep.url, _os_error_text(exc)))
            if not data:
                ended = True
                break
            self.buf += data
        out = self._decode()
        if ended:
            raise EtcdError("watch on %s: the stream ended" % self.ep.url)
        return out

    def _decode(self):
        if not self.headers_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    raise EtcdError("watch on %s: no end of the headers" % self.ep.url)
                return []
            head = bytes(self.buf[:end]).decode("latin-1").lower()
            del self.buf[:end + 4]
            if not head.startswith("http/1.1 200") or "transfer-encoding: chunked" not in head:
                raise EtcdError("watch on %s refused: %s" % (self.ep.url, head.splitlines()[0]))
            self.headers_done = True
        out = []
        while True:
            end = self.buf.find(b"\r\n")
            if end < 0:
                break
            try:
                size = int(bytes(self.buf[:end]).split(b";")[0], 16)
            except ValueError:
                raise EtcdError("watch on %s: bad chunk" % self.ep.url)
            if size == 0:
                raise EtcdError("watch on %s: the stream ended" % self.ep.url)
            if len(self.buf) < end + 2 + size + 2:
                break
            chunk = bytes(self.buf[end + 2:end + 2 + size])
            del self.buf[:end + 2 + size + 2]
            try:
                out.extend(self.lines.feed(chunk))
            except ProtocolError as exc:
                raise EtcdError("watch on %s: %s" % (self.ep.url, exc))
        return out


# ============================================================================
# cluster_agent.py: Cluster agent: the process that talks to etcd.
# ============================================================================
#
# Every etcd call of a member runs here, in a child of the master forked like the
# workers and speaking the same newline-JSON over the daemon socket.  A call to an
# etcd without quorum blocks until its timeout (a fraction of ttl); in the master's
# loop that would freeze every check, the control socket and the running sequence
# for as long; here it freezes only the next etcd call.
#
# The agent holds no decisions.  The master owns the lease (its id), decides when
# to renew it, campaigns, and sends each guarded write; it also judges, by its own
# monotonic clock, whether its lease can still be alive: the agent renews only when
# asked, so a master that is frozen (SIGSTOP) or dead lets its lease expire.  A
# thread reads the master's requests; the lease's (renew, revoke) go to a thread of
# their own with connections of their own, so a renewal never waits behind a write
# that is being settled; the main loop answers the others in order, and keeps a
# mirror of the cluster's keys flowing to the master: one range of the prefix, then
# a watch from the revision after it; again on any break.
#
# Both ask the endpoint that answered last first, and an endpoint that gave no
# answer goes last for a while, for both (etcd.py).  A write whose answer was lost
# is settled, not given up: every ledger write of an epoch carries a ticket (the
# epoch and the write's number in it) and applies only where the ticket of the
# write before it is (the first: where no ticket of this epoch is), so it is sent
# again through the next endpoint: applied there, or refused because it was applied
# already (the refusal shows our ticket) or because we no longer lead.  Each write
# applies once however often it is sent, and never after a later one.  A campaign
# is settled the same way (the holder of the key shows our lease).
#
#   master -> agent   {t: renew, id, lease, ttl}      renew (a new lease when lease is null)
#                     {t: put, id, key, value, lease}  a key on a lease (a member's view)
#                     {t: campaign, id, lease, value}  create the leader key if absent
#                     {t: txn, id, epoch, seq, puts, deletes}   ledger write number seq of
#                                                      the leader of epoch (the leader key's
#                                                      create revision), with its ticket
#                     {t: revoke, id, lease}           resign, or stop
#                     {t: resync}                      range and watch again
#   agent -> master   {t: reply, id, ...}              one per request, in order
#                     {t: snapshot, revision, kvs, last}   the keys, in parts; then
#                     {t: events, revision, events}    each change, in revision order
#
# Keys in messages are relative to /hadaemon/NAME/; values are JSON.  A write of an
# epoch that failed or was lost stops every later write of that epoch unsent: the
# ledger never holds a later write of a leader without an earlier one.
#
# Uses: base, wire, proc, children, etcd.

RENEWS_PER_TTL = 4              # renewals sent per ttl
SNAPSHOT_PART = 1 << 20         # bytes of keys per snapshot message (the socket takes 4 MiB)
TICKET_KEY = "ledger/ticket"    # the epoch and number of the last ledger write


def etcd_timeouts(ttl):
    """(renewal stagger, other call) timeouts for ``ttl`` seconds (docs/cluster.md: the
    arithmetic).

    A renewal is due a quarter ttl after the last one, and the leader stops half a
    ttl after that one: the renewal has a quarter ttl, and goes to the next endpoint
    each sixteenth ttl the ones before it leave it unanswered (``EtcdClient.race``).
    Any other call waits an eighth ttl for one endpoint."""
    return max(0.1, min(1.0, ttl / 16.0)), max(0.25, min(2.0, ttl / 8.0))


def ticket(epoch, seq):
    """The ledger/ticket value of write ``seq`` of the leader of ``epoch`` (compared as text)."""
    return json.dumps({"epoch": epoch, "seq": seq}, sort_keys=True)


def parse_json_value(text):
    try:
        return json.loads(text)
    except ValueError:
        return None


class ClusterAgent:
    """The agent's loop: the master's etcd calls one at a time, and the mirror."""

    def __init__(self, chan, cluster):
        self.chan = chan
        self.cluster = cluster
        self.prefix = cluster.prefix
        self.stagger, self.timeout = etcd_timeouts(cluster.ttl)
        self.renew_for = cluster.ttl / float(RENEWS_PER_TTL)
        self.settle_for = cluster.ttl / 2.0     # a lost write is sent again for so long
        self.client = EtcdClient.for_cluster(cluster, self.timeout, demote=2.0 * cluster.ttl)
        self.lease_client = self.client.twin(self.timeout)
        self.lease_requests = queue.Queue()
        self.sending = threading.Lock()     # the threads send to the master
        self.inbox = collections.deque()    # the reading thread's, for the main loop
        self.reader = LineReader()
        self.wake_r, self.wake_w = os.pipe()    # the reading thread wakes the main loop
        os.set_blocking(self.wake_w, False)
        self.orphaned = False
        self.watch = None
        self.watch_after = 0.0          # no new mirror before (monotonic), after a failure
        self.watch_failures = 0
        self.poisoned = set()           # epochs whose writes stopped

    def send(self, msg):
        with self.sending:
            self.chan.send(msg)

    def run(self):
        threading.Thread(target=self.lease_loop, name="lease", daemon=True).start()
        threading.Thread(target=self.read_loop, name="read", daemon=True).start()
        while True:
            if self.watch is not None and self.watch.ep.down_until > time.monotonic():
                # A call to it failed: it may have lost its quorum and so its events.
                self.drop_watch("its endpoint %s failed a call" % self.watch.ep.url)
            if self.watch is None and time.monotonic() >= self.watch_after:
                self.start_mirror()
            wait = 0.0 if self.inbox else 1.0
            if self.watch is None:
                wait = min(wait, max(0.0, self.watch_after - time.monotonic()))
            self.receive(wait)
            if self.inbox:
                self.handle(self.inbox.popleft())

    # -- input ---------------------------------------------------------------------

    def read_loop(self):
        """The reading thread: the master's requests, the lease's to the lease's thread at
        once (the main loop may be settling a write), the others to the main loop."""
        try:
            while True:
                data = self.chan.sock.recv(262144)
                if not data:
                    break               # the master is gone: its lease expires by itself
                for msg in self.reader.feed(data):
                    if msg.get("t") in ("renew", "revoke"):
                        self.lease_requests.put(msg)
                    else:
                        self.inbox.append(msg)
                self.wake()
        except BaseException:           # noqa: B036 - a bad message: the agent goes, as before
            log.exception("cluster agent: reading the master's requests failed")
        self.orphaned = True
        self.wake()

    def wake(self):
        try:
            os.write(self.wake_w, b"x")
        except BlockingIOError:
            pass                        # a wake-up is pending already

    def receive(self, wait):
        fds = [self.wake_r] + ([self.watch] if self.watch is not None else [])
        for fd in _select_read(fds, wait):
            if fd == self.wake_r:
                os.read(self.wake_r, 4096)
                if self.orphaned:
                    raise _Orphaned()
            elif self.watch is not None:
                try:
                    results = self.watch.read()
                except EtcdError as exc:
                    self.drop_watch(str(exc))
                    continue
                for doc in results:
                    self.watched(doc)

    def lease_loop(self):
        """The lease's thread: renewals and revocations, on connections of their own.
        Should it fail, the agent goes (the master forks another): a lease thread gone
        would leave the master waiting for renewals that never come."""
        try:
            while True:
                self.handle(self.lease_requests.get())
        except (BrokenPipeError, ConnectionError):
            self.orphaned = True        # its reply found the master gone: the main loop ends
            self.wake()
        except BaseException:           # noqa: B036 - whatever it was, the process must go
            log.exception("cluster agent: the lease thread failed")
            os._exit(1)

    # -- requests --------------------------------------------------------------------

    def handle(self, msg):
        kind = msg.get("t")
        reply = {"t": "reply", "id": msg.get("id"), "op": kind}
        try:
            if kind == "renew":
                reply.update(self.renew(msg))
            elif kind == "revoke":
                self.lease_client.revoke(msg["lease"], self.timeout)
            elif kind == "put":
                reply["revision"] = self.client.put(self.prefix + msg["key"], json.dumps(msg["value"]),
                                                    msg.get("lease"))
            elif kind == "campaign":
                reply.update(self.campaign(msg))
            elif kind == "txn":
                reply.update(self.guarded(msg))
            elif kind == "resync":
                self.drop_watch(None)
                self.start_mirror()
            else:
                reply["error"] = "unknown request %r" % (kind,)
        except EtcdUnknown as exc:
            reply.update(error=str(exc), unknown=True)
        except EtcdError as exc:
            reply.update(error=str(exc), status=exc.status)
        reply["endpoints"] = self.client.health()
        reply["requests"] = self.client.requests + self.lease_client.requests
        self.send(reply)

    def renew(self, msg):
        lease = msg.get("lease")
        if not lease:
            lease, ttl = self.lease_client.grant(msg["ttl"], self.timeout)
            return {"lease": lease, "ttl": ttl, "granted": True}
        ttl, revision = self.lease_client.keepalive(lease, self.stagger, self.renew_for)
        return {"lease": lease, "ttl": ttl, "revision": revision}

    def settled(self, send, applied):
        """``send()`` a write, again through the next endpoint while its answer is lost,
        for ``settle_for`` seconds: (succeeded, revision, responses) of the first answer,
        or ``applied(responses)`` -> (True, revision) when a refusal shows that an
        earlier sending of it was applied.  EtcdUnknown when none answered in time."""
        deadline = time.monotonic() + self.settle_for
        lost = None
        while True:
            sent = time.monotonic()
            try:
                ok, revision, responses = send()
            except EtcdUnknown as exc:
                lost = exc
            except EtcdError as exc:
                if exc.status is not None:
                    raise                   # etcd refused it: nothing to settle
                lost = lost or exc          # never left: not applied (unless an earlier one was)
            else:
                if lost is not None:
                    log.info("cluster agent: a write whose answer was lost (%s) was settled", lost)
                    if not ok:
                        ok, revision = applied(responses) or (False, revision)
                return ok, revision, responses
            if time.monotonic() + self.timeout > deadline:
                raise lost if isinstance(lost, EtcdUnknown) else EtcdUnknown(str(lost))
            time.sleep(max(0.0, sent + 0.05 - time.monotonic()))    # refused at once: not a spin

    def campaign(self, msg):
        """Create the leader key on our lease if nobody holds it: {won, epoch, holder}."""
        key = self.prefix + "leader"

        def ours(responses):
            holder = _first_kv(responses, 0)
            return holder is not None and holder["lease"] == msg["lease"] and (True, holder["create"])
        ok, revision, responses = self.settled(lambda: self.client.txn(
            [etcd_compare(key, "CREATE", 0)],
            [etcd_put(key, json.dumps(msg["value"]), msg["lease"])], [etcd_get(key)]), ours)
        if ok:
            return {"won": True, "epoch": revision}
        holder = _first_kv(responses, 0)
        if holder is not None:
            holder["value"] = parse_json_value(holder["value"])
        return {"won": False, "holder": holder}

    def guarded(self, msg):
        """Ledger write ``seq`` of the leader of ``epoch``: applied once, after write seq - 1
        of it (the tickets), or not at all if it no longer leads."""
        epoch, seq = msg["epoch"], msg.get("seq") or 1
        if epoch in self.poisoned:
            return {"ok": False, "error": "an earlier write of epoch %d failed" % epoch}
        leader, mark = self.prefix + "leader", self.prefix + TICKET_KEY
        ops = [etcd_put(self.prefix + k, json.dumps(v, sort_keys=True)) for k, v in msg.get("puts", {}).items()]
        ops += [etcd_delete(self.prefix + k) for k in msg.get("deletes", [])]
        ops.append(etcd_put(mark, ticket(epoch, seq)))
        compares = [etcd_compare(leader, "CREATE", epoch),
                    etcd_compare(mark, "VALUE", ticket(epoch, seq - 1)) if seq > 1 else
                    etcd_compare(mark, "MOD", epoch + 1, "LESS")]     # no write of this epoch yet

        def ours(responses):
            kv = _first_kv(responses, 1)
            return kv is not None and kv["value"] == ticket(epoch, seq) and (True, kv["mod"])
        try:
            ok, revision, responses = self.settled(
                lambda: self.client.txn(compares, ops, [etcd_get(leader), etcd_get(mark)]), ours)
        except EtcdError:
            self.poisoned.add(epoch)
            raise
        if not ok:
            self.poisoned.add(epoch)
            holder = _first_kv(responses, 0)
            if holder is None or holder["create"] != epoch:
                return {"ok": False, "deposed": True, "error": "no longer the leader of epoch %d" % epoch}
            return {"ok": False, "error": "write %d of epoch %d follows none applied" % (seq, epoch)}
        return {"ok": True, "revision": revision}

    # -- the mirror --------------------------------------------------------------------

    def start_mirror(self):
        """Range the prefix whole, send it, and watch from the next revision."""
        import ssl
        try:
            revision, kvs = self.client.range(self.prefix, prefix=True)
            ep = self.client.last
            watch = EtcdWatch(ep, self.prefix, revision + 1, self.timeout)
        except (EtcdError, OSError, ssl.SSLError) as exc:
            self.watch_failures += 1
            self.watch_after = time.monotonic() + min(2.0, 0.1 * 2 ** self.watch_failures)
            log.debug("cluster agent: no mirror: %s", exc)
            return
        self.watch_failures = 0
        part, size = [], 0
        for kv in kvs:
            kv["key"] = kv["key"][len(self.prefix):]
            kv["value"] = parse_json_value(kv["value"])
            part.append(kv)
            size += len(kv["key"]) + len(json.dumps(kv["value"]))
            if size > SNAPSHOT_PART:
                self.send({"t": "snapshot", "revision": revision, "kvs": part, "last": False})
                part, size = [], 0
        self.send({"t": "snapshot", "revision": revision, "kvs": part, "last": True})
        self.watch = watch

    def drop_watch(self, why):
        if self.watch is not None:
            if why:
                log.debug("cluster agent: watch dropped: %s", why)
            self.watch.close()
            self.watch = None
            self.watch_after = time.monotonic() + (0.1 if why else 0.0)

    def watched(self, doc):
        result = doc.get("result") or {}
        if doc.get("error") or result.get("canceled") or result.get("compact_revision"):
            self.drop_watch("watch ended: %s" % (doc.get("error") or result.get("cancel_reason")
                                                 or "compacted"))
            return
        events = []
        for event in result.get("events") or []:
            kv = decode_kv(event.get("kv") or {})
            events.append({"type": "delete" if event.get("type") == "DELETE" else "put",
                           "key": kv["key"][len(self.prefix):], "lease": kv["lease"],
                           "create": kv["create"], "mod": kv["mod"],
                           "value": parse_json_value(kv["value"]) if event.get("type") != "DELETE" else None})
        if events:
            revision = int((result.get("header") or {}).get("revision") or 0)
            self.send({"t": "events", "revision": revision, "events": events})


def _first_kv(responses, index):
    """The key-value the ``index``-th range of a txn's answer found (decoded), or None."""
    if len(responses) <= index:
        return None
    kvs = (responses[index].get("response_range") or {}).get("kvs") or []
    return decode_kv(kvs[0]) if kvs else None


def cluster_agent_main(sock_path, cluster):
    """The forked cluster agent: hello, then the agent's loop until the master goes."""
    child_setup()
    # A master gone is an EPIPE its threads end on (run, lease_loop), not a death by signal.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    chan = Channel.connect(sock_path)
    chan.send({"t": "hello", "role": "cluster", "pid": os.getpid()})
    ClusterAgent(chan, cluster).run()
    return 0


# ============================================================================
# cluster_member.py: Cluster member: the lease by our own clock, the leader,
# the views (docs/cluster.md).
# ============================================================================
#
# What this daemon knows and decides as one member of the cluster, with no socket
# and no process: the master hands it the agent's messages and the time, sends the
# requests it queues, and asks it before it acts.
#
# The lease clock.  A renewal sent at our monotonic time t and answered with TTL
# means etcd's lease lives at least until t + TTL (etcd set its expiry when the
# renewal reached it, after t).  That bound, ``valid_until``, is all we trust:
#
#     t ---------- t + TTL/2 ---------- t + 3/4 TTL ---------- t + TTL
#     renewed      stop: no new command;   the command gets       the lease may
#                  SIGTERM to the running  SIGKILL                 expire; another
#                  command, step down                              member may win
#
# Renewals go every TTL/4, so one lost or slow renewal costs nothing; two in a row
# and the leader steps down, its command dead a quarter TTL before anyone else may
# start one.  A leader frozen (SIGSTOP) past its lease wakes up with its clock far
# past the stop and steps down before it does anything else.  A renewal that failed
# stops new commands until one succeeds.
#
# Roles: none (no lease: etcd unreachable, or not joined yet) -> follower (a live
# lease, a view published) -> leader (the leader key, created on our lease in a
# txn; its create revision is the epoch) -> stepping down -> none.  A leader acts
# only once its mirror holds its own leader key (so it holds every ledger write of
# the leaders before it) and while its lease clock runs.
#
# Uses: base, records, cluster_agent.

# A member: none -> follower (a lease, its view published) -> leader (the leader key on
# its lease) -> none (stepped down, or the lease lost: a new lease makes it a follower).
ROLE_EDGES = {
    "none": {"follower"},
    "follower": {"leader", "none"},
    "leader": {"none"},
}
LEADER_KEY = "leader"
MEMBER_KEYS = "members/"
LEDGER_KEYS = "ledger/"
PAUSE_KEY = "pause"
HOSTPAUSE_KEYS = "hostpause/"       # hostpause/HOST: {"paused": bool} (SPEC §12: --pause HOST)
SWITCHOVER_KEY = "switchover"       # the last --switchover request a member stored


def agreed_state(current, seen, quorum):
    """The state a host moves to in a cluster, or None: the state at least ``quorum``
    live members see, seen by more of them than the current one (a tie keeps it).

    ``seen`` maps each live member that sees the host to the state it sees."""
    counts = collections.Counter(seen.values())
    here = counts.get(current, 0)
    best = sorted((n, s) for s, n in counts.items() if s != current and n >= quorum and n > here)
    if not best or (len(best) > 1 and best[-1][0] == best[-2][0]):
        return None
    return best[-1][1]


def pid_alive(pid):
    """True when a process ``pid`` (an int) exists."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class ClusterMember:
    """This daemon as a member of the cluster; see the comment above."""

    def __init__(self, settings, now):
        self.settings = settings
        self.node = settings.node
        self.lease = None
        self.granted = None                 # the TTL etcd granted
        self.valid_until = None             # our lease lives at least until (monotonic)
        self.renew_failed = False           # the last renewal failed: no new command
        self.next_renew = now
        self.next_put = self.next_campaign = self.next_revoke = now   # after a failed one: not before
        self.abandoned = []                 # leases we gave up that etcd may still hold
        self.role = "none"
        self.epoch = None                   # ours, as leader
        self.seq = 0                        # ledger writes sent in our epoch
        self.acting = False                 # leader with its own key in the mirror
        self.stepping = None                # {"why", "term_at", "kill_at"} while stepping down
        self.mirror = {}                    # key (relative) -> {value, lease, create, mod}
        self.revision = 0
        self.synced = False                 # a whole snapshot arrived
        self._snapshot = None
        self.view = {}                      # host -> the state we see (after our confirm)
        self.published = None               # the view etcd holds (as last acknowledged)
        self.endpoints = [{"endpoint": url, "last_ok": None, "error": None} for url in settings.etcd]
        self.requests = 0
        self.outbox = []
        self.inflight = {}                  # request id -> (op, sent, extra)
        self.ids = itertools.count(1)
        self.notes = collections.deque()    # for the master: ("acting", epoch), ("step_down", why),
        #                                     ("mirror", keys), ("written", id, result)
        self.unreachable_logged = False
        self.hostname = socket.gethostname()    # in our member key: another member of our name names us
        self.conflict = None                # why we refuse: another live member has our node name

    # -- the clock ---------------------------------------------------------------------

    @property
    def ttl(self):
        return self.granted or self.settings.ttl

    def stop_at(self):
        """No command may run from then on: half a TTL before the lease could expire."""
        return self.valid_until - self.ttl / 2.0 if self.valid_until is not None else None

    def kill_by(self):
        """A command still running then gets SIGKILL: a quarter TTL before the lease could expire."""
        return self.valid_until - self.ttl / 4.0 if self.valid_until is not None else None

    def may_start(self, now):
        """The monotonic deadline before which a command may start now, or None."""
        if not self.acting or self.stepping or self.renew_failed:
            return None
        stop = self.stop_at()
        return stop if now < stop else None

    def _request(self, op, extra=None, **fields):
        rid = next(self.ids)
        self.inflight[rid] = (op, time.monotonic(), extra)
        fields.update(t=op, id=rid)
        self.outbox.append(fields)
        return rid

    def _busy(self, op):
        return any(o == op for o, _, _ in self.inflight.values())

    def take_requests(self):
        out, self.outbox = self.outbox, []
        return out

    # -- each pass of the master's loop --------------------------------------------------

    def tick(self, now):
        """Queue what is due (renewal, our view, a campaign); step down when the clock says.
        Called only while the agent is connected."""
        if self.stepping is not None:
            return
        if self.role == "leader" and now >= self.stop_at():
            self.step_down("its lease could not be renewed in time", now)
            return
        if self.valid_until is not None and now >= self.valid_until:
            self.lost_lease("could not renew its lease", now)
        quarter = self.settings.ttl / float(RENEWS_PER_TTL)
        if not self._busy("renew") and now >= self.next_renew and not self.conflict:
            self.next_renew = now + quarter
            self._request("renew", extra=now, lease=self.lease, ttl=self.settings.ttl)
        if self.abandoned and not self._busy("revoke") and now >= self.next_revoke:
            # etcd renews every lease when it elects a raft leader: one we gave up while it
            # was unreachable would hold our old keys (the leader key!) another ttl.
            self.next_revoke = now + quarter
            self._request("revoke", extra=self.abandoned[0], lease=self.abandoned[0])
        if self.role == "none" or self.renew_failed or self.conflict:
            return
        if self.view != self.published and not self._busy("put") and now >= self.next_put:
            self._put_view()
        if self.role == "follower" and self.synced and LEADER_KEY not in self.mirror \
                and not self._busy("campaign") and now >= self.next_campaign:
            self.next_campaign = now + quarter
            self._request("campaign", lease=self.lease,
                          value={"node": self.node, "pid": os.getpid(), "since": time.time()})

    def _put_view(self):
        value = {"hosts": dict(self.view), "pid": os.getpid(), "host": self.hostname}
        self._request("put", extra=("view", dict(self.view)), key=MEMBER_KEYS + self.node,
                      value=value, lease=self.lease)

    def _check_same_node(self, keys, now):
        """Another member with our node name: both leave and refuse (other_same_node)."""
        other = other_same_node(self, keys)
        if other is None:
            return
        self.conflict = ("another member uses node = %s: pid %s on host %s; both refuse: give each "
                         "member a node name of its own ([cluster] node in checks.conf)"
                         % (self.node, other.get("pid"), other.get("host")))
        log.error("cluster %s: %s", self.settings.name, self.conflict)
        self._put_view()
        self.lost_lease(self.conflict, now)

    def set_pause(self, paused):
        """Pause or resume the whole cluster (any member may: it is the operator's word)."""
        return self.put_word(PAUSE_KEY, {"paused": bool(paused)})

    def put_word(self, key, value):
        """Store the operator's word at ``key`` (a pause, a host's pause, a switchover request):
        any member may, on no lease.  A ("paused", id, error) note follows."""
        return self._request("put", extra=("pause", None), key=key, lease=None,
                             value=dict(value, by=self.node, time=time.time()))

    def set_view(self, hosts):
        self.view = dict(hosts)

    # -- the agent's messages ----------------------------------------------------------

    def on_message(self, msg, now):
        kind = msg.get("t")
        if kind == "reply":
            entry = self.inflight.pop(msg.get("id"), None)
            if isinstance(msg.get("endpoints"), list):
                self.endpoints = msg["endpoints"]
                self.requests = msg.get("requests", self.requests)
            if entry is not None:
                getattr(self, "_on_" + entry[0])(msg, entry, now)
        elif kind == "snapshot":
            self._snapshot = self._snapshot or {}
            for kv in msg.get("kvs") or []:
                self._snapshot[kv["key"]] = kv
            if msg.get("last"):
                changed = set(self.mirror) | set(self._snapshot)
                self.mirror, self._snapshot = self._snapshot, None
                self.revision = max(self.revision, msg.get("revision") or 0)
                self.synced = True
                self._mirror_changed(changed, now)
        elif kind == "events":
            changed = set()
            for event in msg.get("events") or []:
                key = event.get("key")
                if event.get("type") == "delete":
                    self.mirror.pop(key, None)
                else:
                    self.mirror[key] = {k: event.get(k) for k in ("value", "lease", "create", "mod")}
                self.revision = max(self.revision, event.get("mod") or 0)
                changed.add(key)
            self._mirror_changed(changed, now)
        else:
            raise ProtocolError("unexpected message %r from the cluster agent" % (kind,))

    def agent_lost(self, now):
        """The agent died: what it had in hand is lost (a write of ours: unknown)."""
        self.outbox = []
        for rid, (op, sent, extra) in list(self.inflight.items()):
            self.inflight.pop(rid)
            getattr(self, "_on_" + op)({"id": rid, "error": "the cluster agent died", "unknown": True},
                                       (op, sent, extra), now)
        self.synced = False

    def _on_renew(self, msg, entry, now):
        sent = entry[2]
        if msg.get("error"):
            self.renew_failed = True
            # Try again soon: a blip must not cost the lease (each try asks every endpoint).
            self.next_renew = min(self.next_renew, now + self.settings.ttl / float(4 * RENEWS_PER_TTL))
            if not self.unreachable_logged:
                log.error("cluster: etcd unreachable (%s); no member acts without it", msg["error"])
                self.unreachable_logged = True
            return
        if msg.get("lease") != self.lease and not msg.get("granted"):
            return                          # a renewal of a lease we gave up meanwhile
        if not msg.get("ttl"):
            self.lost_lease("its lease expired", now)
            return
        if msg.get("granted"):
            if self.lease is not None:      # granted while we thought we held one: keep ours
                self.abandoned.append(msg["lease"])
                return
            self.lease = msg["lease"]
            self._set_role("follower")
            self.published = None
            log.info("cluster %s: joined as %s (lease %x, ttl %ds)", self.settings.name, self.node,
                     self.lease, msg["ttl"])
        self.granted = msg["ttl"]
        self.valid_until = max(self.valid_until or 0.0, sent + msg["ttl"])
        self.renew_failed = False
        if self.unreachable_logged:
            log.warning("cluster: etcd answers again")
            self.unreachable_logged = False

    def _on_put(self, msg, entry, now):
        what, view = entry[2]
        if what == "pause":
            self.notes.append(("paused", msg.get("id"), msg.get("error")))
        elif not msg.get("error"):
            self.published = view
        elif msg.get("status") == 404:      # our lease is gone: the key went with it
            self.lost_lease("its lease is gone", now)
        else:                               # not again at every pass while etcd fails
            self.next_put = now + self.settings.ttl / float(RENEWS_PER_TTL)

    def _on_campaign(self, msg, entry, now):
        if msg.get("won"):
            self._lead(msg["epoch"], now)
        elif msg.get("holder") and LEADER_KEY not in self.mirror and self.synced:
            # Someone holds the key our mirror lacks: the watch missed it.
            self._request("resync")
        # No answer: the mirror shows who holds the key (maybe we do).

    def _on_revoke(self, msg, entry, now):
        lease = entry[2]
        if not msg.get("error") and lease in self.abandoned:
            self.abandoned.remove(lease)

    def _on_resync(self, msg, entry, now):
        pass

    def _on_txn(self, msg, entry, now):
        if msg.get("ok"):
            result = "ok"
        elif msg.get("unknown"):
            result = "unknown"
        else:
            result = "refused"
        self.notes.append(("written", msg.get("id"), result, msg.get("error")))
        if result != "ok" and self.role == "leader":
            self.step_down("a ledger write %s: %s" % ("was lost" if result == "unknown" else "failed",
                                                       msg.get("error")), now)

    # -- leadership ----------------------------------------------------------------------

    def _lead(self, epoch, now):
        if self.role != "follower" or self.stepping is not None:
            return
        self._set_role("leader")
        self.epoch, self.acting, self.seq = epoch, False, 0
        log.warning("cluster %s: %s leads (epoch %d)", self.settings.name, self.node, epoch)
        self._check_acting(now)

    def _check_acting(self, now):
        holder = self.mirror.get(LEADER_KEY)
        if self.role != "leader" or self.acting:
            return
        if holder is not None and holder.get("create") == self.epoch and self.revision >= self.epoch:
            self.acting = True
            self.notes.append(("acting", self.epoch))

    def _mirror_changed(self, keys, now):
        self._check_same_node(keys, now)
        holder = self.mirror.get(LEADER_KEY)
        if self.lease is not None and holder is not None and holder.get("lease") == self.lease \
                and self.role == "follower" and not self.conflict:     # one that refuses leads no more
            self._lead(holder["create"], now)       # our campaign won, its answer was lost
        if self.role == "leader":
            # A mirror that has reached our epoch without our key: it expired, was
            # revoked or deleted, and another member may hold it now.
            if self.revision >= self.epoch and (holder is None or holder.get("create") != self.epoch):
                self.step_down("its leader key is gone", now)
            else:
                self._check_acting(now)
        self.notes.append(("mirror", keys))

    def step_down(self, why, now):
        """Stop acting: the master ends the running command by ``kill_at`` and calls
        ``stepped_down`` once it is gone."""
        if self.stepping is not None:
            return
        log.error("cluster %s: %s steps down: %s", self.settings.name, self.node, why)
        quarter = self.ttl / 4.0
        kill_at = now + min(ACTION_KILL_GRACE, quarter)
        if self.valid_until is not None:
            kill_at = max(now, min(kill_at, self.valid_until - quarter))
        self.stepping = {"why": why, "term_at": now, "kill_at": kill_at}
        self.acting = False
        self.notes.append(("step_down", why))

    def stepped_down(self, now):
        """The command is gone: give up the lease (and the leader key on it)."""
        self._forget_lease()
        self.stepping = None
        self.next_renew = now + self.settings.ttl / float(RENEWS_PER_TTL)

    def lost_lease(self, why, now):
        if self.role == "leader":
            self.step_down(why, now)
            return
        if self.role != "none":
            log.error("cluster %s: %s is no longer a member: %s", self.settings.name, self.node, why)
        self._forget_lease()
        self.next_renew = now

    def _forget_lease(self):
        if self.lease is not None:          # revoked as soon as etcd takes it
            self.abandoned.append(self.lease)
            self._request("revoke", extra=self.lease, lease=self.lease)
            self.next_revoke = time.monotonic() + self.settings.ttl / float(RENEWS_PER_TTL)
        self.lease = self.valid_until = self.granted = self.epoch = None
        self.acting, self.published = False, None
        if self.role != "none":
            self._set_role("none")

    def _set_role(self, role):
        """Every change of role passes here and is checked against ROLE_EDGES."""
        if role not in ROLE_EDGES[self.role]:
            raise AssertionError("cluster member %s: %s -> %s" % (self.node, self.role, role))
        self.role = role

    # -- what the master reads -----------------------------------------------------------

    def leader(self):
        """(node, epoch) of the leader the mirror shows, or (None, None)."""
        holder = self.mirror.get(LEADER_KEY)
        if holder is None or not isinstance(holder.get("value"), dict):
            return None, None
        return holder["value"].get("node"), holder.get("create")

    def views(self):
        """node -> {host: state} of every live member (ours as we see it now)."""
        out = {}
        for key, kv in self.mirror.items():
            if key.startswith(MEMBER_KEYS) and isinstance(kv.get("value"), dict):
                hosts = kv["value"].get("hosts")
                if isinstance(hosts, dict):
                    out[key[len(MEMBER_KEYS):]] = hosts
        if self.role != "none":
            out[self.node] = dict(self.view)
        else:
            out.pop(self.node, None)
        return out

    def agreement(self, states):
        """[(host, new state, [nodes that see it])] for each host whose state should move,
        given the accepted ``states`` (host -> state)."""
        views = self.views()
        hosts = set()
        for hosts_seen in views.values():
            hosts.update(hosts_seen)
        moves = []
        for host in sorted(hosts):
            seen = {node: v[host] for node, v in views.items() if isinstance(v.get(host), str)}
            state = agreed_state(states.get(host, "unknown"), seen, self.settings.quorum)
            if state is not None:
                moves.append((host, state, sorted(n for n, s in seen.items() if s == state)))
        return moves

    def paused(self):
        kv = self.mirror.get(PAUSE_KEY)
        return bool(kv and isinstance(kv.get("value"), dict) and kv["value"].get("paused"))

    def paused_hosts(self):
        return {key[len(HOSTPAUSE_KEYS):] for key, kv in self.mirror.items()
                if key.startswith(HOSTPAUSE_KEYS) and isinstance(kv.get("value"), dict)
                and kv["value"].get("paused")}

    def word(self, key):
        """The value of an operator's word (set by put_word), or None."""
        value = (self.mirror.get(key) or {}).get("value")
        return value if isinstance(value, dict) else None

    def write(self, puts, deletes=()):
        """A guarded ledger write of ours as leader (stepping down too: the run it ends is
        recorded if etcd still takes it): its request id, None when not leading."""
        if self.role != "leader":
            return None
        self.seq += 1
        return self._request("txn", epoch=self.epoch, seq=self.seq, puts=puts, deletes=list(deletes))

    def status(self, now, agent_pid=None):
        """daemon.cluster of --status --json (docs/cluster.md), a ClusterStatus."""
        node, epoch = self.leader() if self.role != "none" else (None, None)
        return ClusterStatus(
            name=self.settings.name, node=self.node,
            role="leader" if self.role == "leader" and self.stepping is None else
                 ("follower" if self.role in ("follower", "leader") else "none"),
            leader=node, epoch=epoch, quorum=self.settings.quorum,
            members={n: {"hosts": dict(sorted(h.items()))} for n, h in sorted(self.views().items())}
            if self.role != "none" else {},
            etcd=[{"endpoint": e["endpoint"],
                   "ok": e["last_ok"] is not None and now - e["last_ok"] <= self.settings.ttl}
                  for e in self.endpoints],
            ttl=self.settings.ttl, acting=self.acting, requests=self.requests, agent_pid=agent_pid)


def other_same_node(member, keys):
    """The value of the other member that has ``member``'s node name, or None.

    Our member key written on another live lease once ours was in: another member has
    our node name (a key older than ours is an earlier life's, its lease not yet expired).
    Ours goes back once (for the other to see the same), then both leave and refuse."""
    key = MEMBER_KEYS + member.node
    kv = member.mirror.get(key)
    if member.conflict or member.published is None or kv is None or key not in keys \
            or kv.get("lease") in (member.lease, None) or kv.get("lease") in member.abandoned:
        return None
    other = kv.get("value") if isinstance(kv.get("value"), dict) else {}
    if other.get("host") == member.hostname and not pid_alive(other.get("pid")):
        return None                     # our own earlier life on this host, its lease not yet gone
    return other


# ============================================================================
# cluster_ledger.py: Cluster ledger: EtcdStore, the ledger kept in etcd,
# written by the leader alone (docs/cluster.md).
# ============================================================================
#
# The Ledger's rules are the same for a cluster member (ledger.py); this is where
# they keep what they decide when the ledger is shared:
#
#   put()        each change set of the leader goes into the pass's txn, sent by
#                flush() as one etcd txn guarded by its leader key
#                (ClusterMember.write); durable() once etcd acknowledged it.  The
#                local state db is written only from what etcd holds (the mirror),
#                the leader's own writes included: a read copy for --status when
#                etcd is down.
#   publish_view()  what this member sees, under members/NODE on its lease; no
#                member accepts a state by itself, the leader weighs the views
#                (views_changed).
#   mirrored()   each change of the mirror goes into the local copy; a follower's
#                ledger then rereads it (ClusterLink); a leader, whose memory runs
#                ahead of etcd by its writes in flight, rereads it whole when it
#                takes over, and again when it steps down.
#   paused()     the /pause key, which any member may write; likewise paused_hosts()
#                (hostpause/HOST) and the last switchover request (switchover).
#
# Keys under /hadaemon/NAME/: leader, members/NODE, pause, hostpause/HOST, switchover
# (a request), ledger/meta (next ids), ledger/queue, ledger/switchover (switchover.py's
# book), ledger/host/HOST, ledger/tr/ID, ledger/run/ID (IDs zero-padded so they sort;
# the leader deletes what falls out of its history).
#
# Uses: base, store, ledger_store, cluster_member.

def ledger_to_etcd(changes, cap):
    """A Ledger change set (Changes) -> (puts, deletes) of etcd keys."""
    puts, deletes = {}, []
    for host, record in changes.hosts.items():
        puts[LEDGER_KEYS + "host/" + host] = {"state": record["state"], "since": record["since"]}
    for kind, records in (("tr", changes.transitions), ("run", changes.runs.values())):
        for record in records:      # a run's outputs cut to ETCD_OUTPUT_CAP
            puts[LEDGER_KEYS + "%s/%010d" % (kind, record.id)] = \
                record.to_etcd() if kind == "run" else record.to_json()
            if cap and record.id > cap:
                deletes.append(LEDGER_KEYS + "%s/%010d" % (kind, record.id - cap))
    if changes.queue is not None:
        puts[LEDGER_KEYS + "queue"] = list(changes.queue)
    if changes.meta is not None:
        puts[LEDGER_KEYS + "meta"] = {k: changes.meta[k] for k in ("next_transition", "next_run")}
    if changes.switchover is not None:
        puts[LEDGER_KEYS + "switchover"] = changes.switchover
    return puts, deletes


def ledger_from_etcd(key, value, cap):
    """One etcd ledger key -> (state db key, value), or None (not a ledger key, or
    a value of the wrong shape: a hand-edited etcd must not take the daemon down)."""
    if not key.startswith(LEDGER_KEYS) or value is None:
        return None
    name = key[len(LEDGER_KEYS):]
    kind, _, rest = name.partition("/")
    if kind == "host" and isinstance(value, dict):
        local, value = "host:" + rest, {"state": value.get("state"), "since": value.get("since"),
                                        "pending": None, "count": 0}
    elif kind in ("tr", "run") and rest.isdigit() and cap:
        local = "%s:%d" % (kind, int(rest) % cap)
    elif name in ("queue", "meta", "switchover"):
        local = name
    else:
        return None
    return (local, value) if well_formed(local, value) else None


TXN_OPS = 64                    # puts and deletes in one txn (etcd takes 128 by default)
TXN_BYTES = 512 * 1024          # ... and bytes of values (its requests: 1.5 MiB)


class EtcdStore(LedgerStore):
    """The ledger of a cluster member; see the comment above."""

    shared = True

    def __init__(self, local, member):
        self.local = local              # a LocalStore: the read copy in the state db
        self.member = member
        self.node = member.node
        self.puts, self.deletes, self.size = {}, set(), 0
        self.views_changed = False      # the leader has views to weigh
        self.hosts_paused = set()       # the mirror's hostpause/HOST keys, as mirrored() last saw them
        self.last_write = 0             # request id of our newest ledger write (None: dropped)
        self.acked = 0                  # ... and of the newest etcd acknowledged

    def load(self, cap=None):
        """The local copy: --status shows it until etcd's ledger arrives.  Only a leader,
        from etcd's ledger, decides what happened to runs that were running."""
        return self.local.load(cap)

    def reread(self, cap=None):
        """What etcd holds, as the mirror shows it (our writes gathered are dropped)."""
        self.discard()
        data = {}
        for key, kv in self.member.mirror.items():
            entry = ledger_from_etcd(key, kv.get("value"), cap)
            if entry is not None:
                data[entry[0]] = entry[1]
        return Snapshot.from_db(data)

    def discard(self):
        self.puts, self.deletes, self.size = {}, set(), 0

    def put(self, changes, cap):
        """Gathered into the pass's txn; sent at once when it grows big."""
        puts, deletes = ledger_to_etcd(changes, cap)
        self.puts.update(puts)
        self.deletes.update(deletes)
        self.deletes.difference_update(puts)
        self.size += sum(len(json.dumps(v)) for v in puts.values())
        if len(self.puts) + len(self.deletes) >= TXN_OPS or self.size >= TXN_BYTES:
            self.flush()

    def put_report(self, host, report):
        self.local.put_report(host, report)

    def flush(self):
        """Send what was gathered as one guarded txn.  The ticket: the request id of the
        newest txn, which holds every change put so far (with nothing gathered, the one
        put() sent when the txn grew big); None when that one could not be sent."""
        if not self.puts and not self.deletes:
            return self.last_write
        puts, deletes = self.puts, sorted(self.deletes)
        self.discard()
        self.last_write = rid = self.member.write(puts, deletes)
        if rid is None:
            # Only the leader decides; a change here while not leading is a bug.
            log.error("cluster: a ledger change while not leading was dropped: %s",
                      ", ".join(sorted(puts)))
        return rid

    def durable(self, ticket):
        return self.acked >= ticket

    def written(self, rid, result):
        if result == "ok":
            self.acked = max(self.acked, rid)

    def paused(self):
        return self.member.paused()

    def set_paused(self, paused):
        self.member.set_pause(paused)
        return paused

    def paused_hosts(self):
        """As the mirror shows them; before it arrives, as the local copy kept them."""
        return self.hosts_paused if self.member.synced else self.local.paused_hosts()

    def set_hosts_paused(self, hosts, paused):
        """Asked: etcd has it when the mirror shows it (then ``paused_hosts`` says so)."""
        for host in hosts:
            self.member.put_word(HOSTPAUSE_KEYS + host, {"paused": bool(paused)})
        return self.hosts_paused | set(hosts) if paused else self.hosts_paused - set(hosts)

    def switchover_request(self):
        return self.member.word(SWITCHOVER_KEY)

    def put_switchover_request(self, request):
        self.member.put_word(SWITCHOVER_KEY, request)

    def publish_view(self, view):
        self.member.set_view(view)
        self.views_changed = True

    def mirrored(self, keys, cap):
        """Mirror changes into the local copy; True when the ledger's keys (or the
        pause) changed there."""
        changes = {}
        for key in keys:
            kv = self.member.mirror.get(key)
            entry = ledger_from_etcd(key, kv and kv.get("value"), cap)
            if entry is not None:
                changes[entry[0]] = entry[1]
        if any(k.startswith(MEMBER_KEYS) or k == PAUSE_KEY for k in keys):
            self.views_changed = True
        if "meta" in changes or PAUSE_KEY in keys:
            meta = changes.get("meta") or self.local.data.get("meta") or {}
            changes["meta"] = dict(meta, paused=self.member.paused())
        if any(k.startswith(HOSTPAUSE_KEYS) for k in keys):
            self.hosts_paused = self.member.paused_hosts()
            changes["hostpause"] = sorted(self.hosts_paused)
        if changes:
            self.local.store.commit(changes)
        return bool(changes)


def cluster_reload_problem(old, new):
    """Why a reload cannot apply this [cluster] change (a restart can), or None."""
    if (old is None) != (new is None):
        return "[cluster] %s: restart the daemon to %s the cluster" % (
            "added" if new else "removed", "join" if new else "leave")
    if old is None:
        return None
    fixed = ("etcd", "name", "node", "etcd_ca", "etcd_cert", "etcd_key")
    changed = [k for k in fixed if getattr(old, k) != getattr(new, k)]
    if changed:
        return "%s: [cluster] %s changed: restart the daemon to apply it (quorum and ttl " \
               "apply on reload)" % (new.where, ", ".join(changed))
    return None


# ============================================================================
# cluster_link.py: The cluster as a part of the master: agent, member and the
# ledger's etcd store wired together.
# ============================================================================
#
# Owns ClusterLink: the agent child (forked by the Pool), the messages between it and
# the ClusterMember, what the mirror's news and taking over mean for the Ledger
# (reread, interrupt_running), when the leader weighs the members' views (agree),
# the lease clock told to the running command, and the cluster's face of the
# leadership ActionRuns asks (acting, stamp, may, interrupted; a daemon alone's is
# actions.Alone).
#
# Uses: base, pool, cluster_agent.

class ClusterLink:
    """The cluster as a part of the master: the agent (a child in the Pool), the member
    and the cluster ledger.  The master calls ``tick`` every pass of its loop, hands it
    the agent's messages, and asks it before an action command starts."""

    def __init__(self, ledger, pool, server):
        self.ledger, self.store, self.member = ledger, ledger.store, ledger.store.member
        self.pool, self.server = pool, server
        self.agent_after = 0.0          # no agent forked before (after quick deaths)
        self.extended = None            # the lease clock the running command was last told
        self.leave_by = None            # stopping: the agent goes once the lease is revoked, or then
        self.restarting = None          # the pid of an agent asked to go (a new ttl)

    def agent(self):
        return next((c for c in self.pool.children.values() if c.kind == "cluster"), None)

    def tick(self, now):
        """One pass: keep the agent, send what the member asks, act on what it noted."""
        agent = self.agent()
        if agent is None and self.leave_by is None and now >= self.agent_after:
            self.pool.fork("cluster", cluster_agent_main, self.pool.sock_path, self.member.settings)
        elif agent is not None and agent.conn is not None:
            if self.leave_by is None:
                self.member.tick(now)
            for request in self.member.take_requests():
                self.server.send(agent.conn, request)
        while self.member.notes:
            note = self.member.notes.popleft()
            if note[0] == "mirror":
                if self.store.mirrored(note[1], self.ledger.cap) and self.member.role != "leader":
                    # an event, not a whole snapshot: say what the leader did
                    self.ledger.reread(log_new=len(note[1]) < 100)
            elif note[0] == "acting":
                self.take_over(time.time())
            elif note[0] == "written":
                self.store.written(note[1], note[2])
            elif note[0] == "paused" and note[2]:
                log.error("cluster: a request (pause, resume, switchover) not written: %s", note[2])
        if self.member.stepping is not None:
            self.stepping(now)
        elif self.leave_by is not None and agent is not None and agent.kill_at is None and \
                (now >= self.leave_by or not self.member.inflight):
            agent.signal(signal.SIGTERM, now + KILL_GRACE)
        if self.leave_by is None:
            self.agree(time.time())

    # -- the leadership ActionRuns asks (a daemon alone's is Alone) ----------------------

    confirms = True                     # the action run asks ``may`` before each command

    def acting(self):
        return self.member.acting

    def stamp(self):
        """Who runs a run: (cluster, node, epoch)."""
        return self.member.settings.name, self.member.settings.node, self.member.epoch

    def leader_name(self):
        return self.member.leader()[0]

    def extend_lease(self, handing):
        """A renewal moved the lease clock on: the running command's deadlines move with it
        (its action run keeps them itself, so a frozen master cannot keep it running).
        ``handing``: a run waits to be handed; its ``run`` must reach it first."""
        member = self.member
        if not member.acting or member.stepping or member.renew_failed or \
                member.valid_until == self.extended:
            return
        child = self.pool.action_child()
        if child is None or child.conn is None or handing:
            return
        self.extended = member.valid_until
        self.server.send(child.conn, {"t": "lease", "until": member.stop_at(), "kill_at": member.kill_by()})

    def stepping(self, now):
        """Stepping down: the running command gets SIGTERM, SIGKILL by kill_at; then resign."""
        step = self.member.stepping
        child = self.pool.action_child()
        if child is not None:
            if not step.get("termed"):
                step["termed"] = True
                if child.pgid:
                    killpg_quietly(child.pgid, signal.SIGTERM)
            if now >= step["kill_at"] and not step.get("killed"):
                step["killed"] = True
                if child.pgid:
                    killpg_quietly(child.pgid, signal.SIGKILL)
                child.signal(signal.SIGKILL, now + KILL_GRACE)
            return
        self.ledger.store.flush()           # the run it ended, before the lease is revoked
        self.member.stepped_down(now)
        self.ledger.reread()

    def agree(self, now):
        """The acting leader: every host that quorum live members see in a new state moves."""
        if not self.store.views_changed or not self.member.acting:
            return
        self.store.views_changed = False
        self.ledger.agree(self.member.agreement(self.ledger.states()), now)

    def take_over(self, now):
        """We lead now: the ledger as etcd holds it, with every earlier leader's writes;
        what was running under one of them is interrupted, never run again."""
        ledger = self.ledger
        ledger.reread()
        ledger.notify("leader", leader=self.member.node, epoch=self.member.epoch)
        ledger.interrupt_running(lambda run: "its leader (%s, epoch %s) lost the lead while it ran"
                                 % ("?" if run.node is None else run.node,
                                    "?" if run.node is None else run.epoch), now)
        self.store.views_changed = True
        log.info("cluster %s: %s takes over the ledger: %d hosts, %d transitions, %d runs, %d queued",
                 self.member.settings.name, self.member.node, len(ledger.hosts), len(ledger.transitions),
                 len(ledger.runs), len(ledger.queue))

    def next_wake(self, now):
        """When the loop must pass again for the cluster, at the latest.

        Only what a pass can act on counts: a deadline already past whose work waits
        for the agent (a renewal in flight, requests while it is not connected) would
        make the loop spin until the agent answers.
        """
        member = self.member
        agent = self.agent()
        connected = agent is not None and agent.conn is not None
        if member.notes or (connected and member.outbox):
            return now
        times = [member.next_renew, member.next_put, member.next_campaign, member.next_revoke]
        if agent is None and self.leave_by is None:
            times.append(self.agent_after)
        if member.stepping is not None:
            times.append(member.stepping["kill_at"])
        elif member.role == "leader" and member.valid_until is not None:
            times.append(member.stop_at())
        if member.valid_until is not None:
            times.append(member.valid_until)
        return min([t for t in times if t > now] or [now + 1.0])

    def may(self):
        """The answer to an action run that asks before its next command."""
        until = self.member.may_start(time.monotonic())
        if until is None:
            why = (self.member.stepping or {}).get("why") or "its lease is not renewed"
            return {"t": "stop", "reason": "the leader may not start commands: %s" % why}
        return {"t": "go", "until": until, "kill_at": self.member.kill_by()}

    def interrupted(self):
        """Why a run ends now, if the leader is stepping down (None otherwise)."""
        step = self.member.stepping
        return "the leader stepped down: %s" % step["why"] if step else None

    def agent_exited(self, child, how, stopping):
        self.member.agent_lost(time.monotonic())
        if stopping or self.leave_by is not None or child.pid == self.restarting:
            return
        log.error("cluster agent %d died (%s); replacing it", child.pid, how)
        if time.monotonic() - child.started < 1.0:
            self.agent_after = time.monotonic() + 1.0

    def stop(self, now):
        """The daemon stops: a leader steps down (its command ended, its run interrupted),
        then the lease is revoked, and the agent goes."""
        if self.member.role == "leader":
            self.member.step_down("the daemon stops", now)
        elif self.member.lease is not None:
            self.member.stepped_down(now)
        self.leave_by = now + 2.0 + self.member.settings.ttl / 4.0

    def reconfigure(self, settings):
        """quorum and ttl on reload (a new ttl with the next lease; the agent's timeouts too)."""
        ttl_changed = settings.ttl != self.member.settings.ttl
        self.member.settings = settings
        self.store.views_changed = True         # a new quorum may move a host now
        agent = self.agent()
        if ttl_changed and agent is not None:
            log.info("cluster: ttl is now %ds; the cluster agent restarts with its timeouts", settings.ttl)
            self.restarting = agent.pid
            agent.signal(signal.SIGTERM, time.monotonic() + KILL_GRACE)


# ============================================================================
# actions.py: Action runs: the queue's head, handed to the action run, and
# what it says back.
# ============================================================================
#
# At most one sequence runs at a time, in the action run the Pool keeps waiting.
# The head of the Ledger's queue is handed to it; its events (a command started,
# spawned, ended; the sequence done; in a cluster's leader, whether it still may)
# go to the Ledger; its death ends the run as failed, or interrupted when the
# daemon stops or a cluster's leader steps down.
#
# Uses: base, switchover.

def _command_index(run, msg):
    index = msg.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(run.commands):
        raise ProtocolError("bad command index %r" % (index,))
    return index


def _spawned_pid(msg):
    """The pid of a {t: spawned} message: an action run's command, leader of its group."""
    pid = msg.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        raise ProtocolError("bad pid %r in a spawned message" % (pid,))
    return pid


class Alone:
    """The leadership of a daemon alone: it always acts, asks no one, stamps nothing.
    (A cluster member's is its ClusterLink.)"""

    confirms = False                    # its action run asks nobody before a command

    def acting(self):
        return True

    def stamp(self):
        return None

    def interrupted(self):
        return None

    def leader_name(self):
        return None


class ActionRuns:
    """Ledger -> the action run -> Ledger."""

    def __init__(self, ledger, pool, server, leadership):
        self.ledger, self.pool, self.server = ledger, pool, server
        self.leadership = leadership    # Alone, or a cluster member's ClusterLink
        self.handoff = None             # (run, ticket): handed to its action run once durable

    def start_next(self, config):
        """docs/configuration.md: one sequence at a time, in order; docs/cluster.md: only
        the acting leader, and a run goes to its action run only once its ``running``
        is durable (at once in a daemon alone's state db; in etcd once it acknowledged)."""
        if self.handoff is None and not self.ledger.queue:
            return                      # nothing to hand, nothing queued: the usual pass
        if not self.leadership.acting():
            self.handoff = None         # stepping down: nothing is handed any more
            return
        if self.handoff is not None:
            self._deliver()
            return
        if self.pool.action_child() is not None:
            return
        run = self.ledger.head()
        if run is None:
            return
        now = time.time()
        why = cannot_start(self.ledger, run, now)       # paused; a switchover's refusal
        if why:
            self.ledger.dequeue(run, why[0], why[1], now)
            return
        try:
            commands = self.ledger.commands_for(run, config)
        except ValueError as exc:
            self.ledger.dequeue(run, "failed", str(exc), now)
            return
        child = self.pool.runner(config.config_dir)
        if child is None:
            self.ledger.dequeue(run, "failed", "cannot fork the action run", now)
            return
        if child.conn is None:
            return                      # not connected yet: a later pass hands it the run
        self.ledger.start(run, commands, self.leadership.stamp(), config.config_dir, now)
        ticket = self.ledger.store.flush()  # with the transition, if it came in this pass
        if ticket is None:
            return                      # not written (no longer leading): nothing handed
        child.run_id = run.id
        self.handoff = (run, ticket)
        self._deliver()

    def _deliver(self):
        run, ticket = self.handoff
        child = self.pool.action_child()
        if child is None or child.run_id != run.id:
            self.handoff = None         # its action run died: recorded by exited()
        elif self.ledger.store.durable(ticket):
            self.handoff = None
            self.server.send(child.conn, {"t": "run", "run": run.to_action(self.leadership.confirms)})

    def event(self, child, msg):
        """The action run reports: a command started, spawned, ended; the sequence is done;
        in a cluster it asks before each command (``may``) whether it still may."""
        run = self.ledger.runs.get(child.run_id)
        if run is None or msg.get("run") != run.id:
            raise ProtocolError("event for run %r, expected %r" % (msg.get("run"), child.run_id))
        kind = msg.get("t")
        if kind == "start":
            self.ledger.command_started(run, _command_index(run, msg), msg.get("time"))
        elif kind == "spawned":
            _command_index(run, msg)
            child.pgid = _spawned_pid(msg)
        elif kind == "end":
            child.pgid = None
            self.ledger.command_ended(run, _command_index(run, msg), msg)
        elif kind == "may" and self.leadership.confirms:
            _command_index(run, msg)
            self.server.send(child.conn, self.leadership.may())
        elif kind == "done" and run.state != "running":
            # Ended already: a leader that took over again interrupted it before its
            # last command's SIGTERM came back (cluster_link.take_over).
            log.info("run %d: its action run's end (%s) comes after the run was %s", run.id,
                     msg.get("result"), run.state)
        elif kind == "done":
            state = msg.get("result") if msg.get("result") in ("ok", "interrupted") else "failed"
            reason = msg.get("reason")
            stepped = self.leadership.interrupted()
            if stepped and state == "failed":
                # its command ended by the step-down's SIGTERM (exit 143): interrupted, as
                # the next leader would record it
                state, reason = "interrupted", "%s (%s)" % (stepped, reason)
            self.ledger.finish(run, state, reason, time.time())
        else:
            raise ProtocolError("unknown action event %r" % (kind,))

    def exited(self, child, how, stopping):
        if child.pgid:
            killpg_quietly(child.pgid, signal.SIGKILL)  # the command it left behind
        if child.run_id is None:        # the spare, before it had a sequence
            self.pool.spare_gone(child, how)
            return
        run = self.ledger.runs.get(child.run_id)
        if run is None or run.state != "running":
            return
        stepped = self.leadership.interrupted()
        if stepped:
            self.ledger.finish(run, "interrupted", "%s (%s)" % (stepped, how), time.time())
        elif stopping:
            self.ledger.finish(run, "interrupted", "the daemon stopped while it ran (%s)" % how, time.time())
        else:
            self.ledger.finish(run, "failed", "the action run died (%s)" % how, time.time())

    def stop_budget(self, now):
        """The daemon stops: the time the running sequence has left to finish in (its
        commands' timeouts), or 10 s when none runs; its kill is set for then."""
        action = self.pool.action_child()
        if action is None:
            return 10.0
        run = self.ledger.runs.get(action.run_id)
        pending = [c for c in run.commands if c.result is None] if run else []
        budget = sum(c.timeout + ACTION_KILL_GRACE for c in pending) + 1.0
        log.info("waiting up to %s for run %s to finish", format_duration(budget), action.run_id)
        action.kill_at = now + budget
        return budget


# ============================================================================
# reload.py: Reload: a new configuration, read in steps between the loop's
# other work.
# ============================================================================
#
# SIGHUP and --reload read both files again.  Ten thousand checks take a second to
# read: the reading goes a slice per pass of the loop, so due checks wait for a
# slice, never for the whole of it; the new config is swapped in at once when it is
# read whole (a bad one is refused whole).  What the swap replaced is freed
# a slice per pass too: freed at once, it held the loop up for tens of milliseconds.
#
# Uses: base, wire.

class Reload:
    """The reloads asked for and done, by number, and the reading under way."""

    def __init__(self, steps):
        self.steps = steps              # () -> generator: reads, prepares, swaps in; returns errors
        self.asked = self.done = 0
        self.reading = None             # (request number, generator)
        self.errors = []                # of the last reading done
        self.graveyard = []             # lists a swap replaced, emptied from their ends

    def want(self):
        """A reload is asked for: the reading starts now, or starts over if one is under
        way (the files may have changed since).  Returns the request's number."""
        self.asked += 1
        if self.reading is not None:
            self.reading = None
            gc.enable()
        return self.asked

    def due(self):
        """A reading asked for, or what one replaced left to free: step() and let_go()
        have work (the loop asks this, one call, instead of calling both)."""
        return self.done < self.asked or bool(self.graveyard)

    def busy(self):
        """Reading, or freeing: the loop should pass again at once."""
        return self.reading is not None or bool(self.graveyard)

    def step(self, until):
        """Read until monotonic ``until``; the steps swap the config in once it is read."""
        if self.done >= self.asked:
            return
        if self.reading is None:
            log.info("reloading the configuration")
            self.reading = (self.asked, self.steps())
            # Reading makes tens of thousands of objects that live on: the collector
            # would walk them all, again and again, while they are made.  They are
            # frozen once swapped in (settle_heap); a refused config is freed by
            # reference counts alone.
            gc.disable()
        number, steps = self.reading
        try:
            next(steps)
            while time.monotonic() < until:
                next(steps)
            return
        except StopIteration as done:
            errors = done.value
        except ConfigError as exc:
            for line in exc.errors:
                log.error("reload refused: %s", line)
            errors = exc.errors
        self.reading = None
        gc.enable()
        self.done, self.errors = number, errors

    def drop(self, why):
        """The daemon stops: a reading under way ends, refused with ``why``."""
        if self.done < self.asked:
            self.done, self.reading = self.asked, None
            gc.enable()
            self.errors = [why]

    def bury(self, *dead):
        """Lists a swap replaced, to be freed a slice at a time."""
        self.graveyard += dead

    def let_go(self, n=ANSWER_STEP):
        """Free ``n`` of the objects a reload replaced."""
        while n > 0 and self.graveyard:
            dead = self.graveyard[-1]
            k = min(n, len(dead))
            del dead[len(dead) - k:]
            n -= k
            if not dead:
                self.graveyard.pop()

    def answer(self):
        """--reload's answer, once the reading it asked for (or a later one) is done."""
        number = self.want()
        while self.done < number:
            yield None
        yield encode_message({"ok": not self.errors, "errors": self.errors})


# ============================================================================
# notify_queue.py: Notify queue: the events waiting for their delivery, kept
# in the state db (docs/notify.md).
# ============================================================================
#
# Owns the numbering of events (``seq``: one more per event, across restarts) and
# the events not delivered yet, oldest first, at most NOTIFY_CAP of them.  Each
# event is committed to the state db (a Store: one journal line) before anyone
# may deliver it, so after a kill -9 every event not known to be delivered is
# delivered again (at least once).  Keys:
#
#   notify        {"next": the seq of the next event, "done": every seq up to it is
#                 delivered, given up or dropped}
#   notify:N      the event of seq S at N = S % NOTIFY_CAP (a ring, as tr:N and run:N:
#                 nothing is deleted from the db)
#
# A full queue drops its oldest event for the new one, counted, and says so in the
# log once until it has room again.  No process and no clock here: the master's
# part (notify.py) hands the head to the notify child and says how it ended.
#
# Uses: base.

NOTIFY_CAP = 1000               # events waiting at most; past that the oldest are dropped
NOTIFY_RESULTS = ("ok", "failed", "dropped")


class NotifyQueue:
    """The events waiting, in seq order, committed to ``store`` (a Store) as they change."""

    def __init__(self, store, cap=NOTIFY_CAP):
        self.store = store
        self.cap = cap
        self.next = 1                   # the seq of the next event
        self.done = 0                   # every seq up to this one has left the queue
        self.waiting = collections.deque()
        self.counts = collections.Counter()     # since this process started: NOTIFY_RESULTS
        self.full = 0                   # dropped since the queue last had room (for the log)
        self.opened = False

    def open(self):
        """The queue as the state db holds it (once, before the first use)."""
        self.opened = True
        data = self.store.data
        meta = data.get("notify") or {}
        self.next = max(1, meta.get("next", 1))
        self.done = max(0, min(meta.get("done", 0), self.next - 1))
        lost = 0
        for seq in range(max(self.done + 1, self.next - self.cap), self.next):
            event = data.get(self.slot(seq))
            if isinstance(event, dict) and event.get("seq") == seq:
                self.waiting.append(event)
            else:
                lost += 1
        if lost:
            log.error("notify: %d waiting events could not be read back from the state db; "
                      "they are lost", lost)
        if self.waiting:
            log.info("notify: %d events from before the restart wait for their delivery (seq %d-%d)",
                     len(self.waiting), self.waiting[0]["seq"], self.waiting[-1]["seq"])

    def slot(self, seq):
        return "notify:%d" % (seq % self.cap)

    def _meta(self):
        return {"notify": {"next": self.next, "done": self.done}}

    def push(self, event):
        """Number ``event`` (a dict: kind, time, node, its keys), store it, queue it; returns it."""
        if not self.opened:
            self.open()
        seq = self.next
        self.next += 1
        event = dict(event, seq=seq)
        if len(self.waiting) >= self.cap:
            dropped = self.waiting.popleft()
            self.done = dropped["seq"]
            self.counts["dropped"] += 1
            if not self.full:
                log.error("notify: %d events wait, the most kept; the oldest are dropped from now "
                          "on (first: seq %d, %s)", self.cap, dropped["seq"], dropped.get("kind"))
            self.full += 1
        self.waiting.append(event)
        changes = self._meta()
        changes[self.slot(seq)] = event
        self.store.commit(changes)
        return event

    def head(self):
        """The oldest event waiting, or None."""
        if not self.opened:
            self.open()
        return self.waiting[0] if self.waiting else None

    def finish(self, seq, result):
        """Event ``seq`` left the queue: ``ok`` (delivered) or ``failed`` (given up).  False
        when it is no longer the head (the full queue dropped it meanwhile)."""
        if not self.waiting or self.waiting[0]["seq"] != seq:
            return False
        self.waiting.popleft()
        self.done = seq
        self.counts[result] += 1
        if self.full and len(self.waiting) < self.cap:
            log.warning("notify: the queue has room again; %d events were dropped", self.full)
            self.full = 0
        self.store.commit(self._meta())
        return True

    def status(self):
        """Counters since the start and what waits (daemon.counters of --status --json)."""
        return {"notify_events": [{"result": r, "count": self.counts[r]} for r in NOTIFY_RESULTS],
                "notify_waiting": len(self.waiting)}


# ============================================================================
# notify.py: Notifications: events made, stored, and delivered one at a time
# by a child (docs/notify.md).
# ============================================================================
#
# Owns the ``notify =`` command's events (SPEC §12): Notifications, the master's
# part, which every other part tells what happened through one call,
# ``event(kind, **keys)``; notify_main, the child that runs the command for one
# event at a time (its retries included); and --notify-test.
#
#   event()       stamp (kind, time, node), store (NotifyQueue: seq, the state db),
#                 hand the head to the child when it is free
#   the child     the command with the event as one JSON object on stdin, HA_EVENT
#                 in its environment, cwd = the config dir; a try that exits
#                 non-zero or runs past notify_timeout is made again after 1, 2 and
#                 4 s; then it says ``done`` (ok, or failed: given up)
#   done          the event leaves the queue (committed), the next is handed
#
# The master's loop never waits for a notify command: the child runs it, and the
# master only sends a line and reads one.  A child that dies is replaced (after a
# second when it died young) and is handed the same event again.
#
# Uses: base, wire, proc, children, pool, actions, notify_queue.

NOTIFY_RETRIES = (1.0, 2.0, 4.0)    # seconds before each try again
NOTIFY_KILL_GRACE = 2.0             # a notify command past its timeout: SIGTERM, then SIGKILL
NOTIFY_STOP_WAIT = 5.0              # stopping: how long after the last event its delivery may take


def notify_node(config):
    """``node`` of every event: the cluster's node, or this host's name."""
    return config.cluster.node if config.cluster is not None else socket.gethostname()


def deliver_event(argv, event, timeout, watch, master=None, environ=None, on_spawn=None):
    """Run the notify command ``argv`` once with ``event`` on its stdin: its ProcResult."""
    env = dict(os.environ if environ is None else environ)
    env.update(HA_EVENT=str(event.get("kind")), HA_SEQ=str(event.get("seq")))
    with tempfile.TemporaryFile() as f:
        f.write(json.dumps(event, sort_keys=True).encode("utf-8") + b"\n")
        f.seek(0)
        return run_process(list(argv), env, timeout, NOTIFY_KILL_GRACE, watch, stdin_fd=f.fileno(),
                           merge_stderr=True, master=master, on_spawn=on_spawn)


def _output_tail(output):
    lines = output.decode("utf-8", "replace").strip().splitlines()
    return lines[-1][:300] if lines else ""


def _rest(chan, seconds):
    """Wait ``seconds`` before a try again, listening to the master: False when told to go."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        readable, _, _ = select.select([chan.sock], [], [], left)
        if readable:
            msg = chan.receive()
            if msg is None or msg.get("t") == "exit":
                return False


def notify_main(sock_path, config_dir):
    """The notify child: hello, then one event at a time, each tried until it is delivered
    or given up, each try's failure and the end said to the master."""
    child_setup()
    os.chdir(config_dir)
    watch = ChildWatch()
    chan = Channel.connect(sock_path)
    chan.send({"t": "hello", "role": "notify", "pid": os.getpid()})
    environ = dict(os.environ, HA_CONFIG_DIR=config_dir, HA_STATE_DIR=os.path.dirname(sock_path))
    while True:
        msg = chan.receive()
        if msg is None or msg.get("t") == "exit":
            return 0
        event, argv, timeout = msg["event"], msg["argv"], msg["timeout"]

        def announce(pid, seq=event["seq"]):
            # The master kills this group if we die before the command ends.
            chan.send({"t": "spawned", "seq": seq, "pid": pid})
        for tries, again in enumerate(NOTIFY_RETRIES + (None,), 1):
            res = deliver_event(argv, event, timeout, watch, chan.sock, environ, announce)
            failure = res.failure(timeout)
            if failure is None:
                break
            chan.send({"t": "failed", "seq": event["seq"], "try": tries, "error": failure,
                       "output": _output_tail(res.output), "again": again})
            if again is not None and not _rest(chan, again):
                return 0
        chan.send({"t": "done", "seq": event["seq"], "result": "failed" if failure else "ok",
                   "tries": tries, "error": failure})


class Notifications:
    """The master's part: ``event()`` from every other part; the notify child, kept by it.

    ``config_of()`` gives the configuration of now (a reload swaps it)."""

    def __init__(self, store, pool, server, config_of):
        self.queue = NotifyQueue(store)
        self.pool, self.server, self.config_of = pool, server, config_of
        self.pid = None                 # the notify child's
        self.inflight = None            # the seq handed to it, until it says done
        self.child_after = 0.0          # no child forked before (after a quick death)
        self.leave_by = None            # stopping: the child goes when nothing waits, or then
        self.troubled = set()           # checks whose trouble was told (until they run cleanly)

    def event(self, kind, **keys):
        """SPEC §12: an event of ``kind`` with ``keys``, stored, then delivered in its turn
        (nothing when no notify command is set).  The one call every part makes."""
        config = self.config_of()
        if config.daemon.notify is None:
            return None
        event = dict({"kind": kind, "time": round(time.time(), 6), "node": notify_node(config)}, **keys)
        event = self.queue.push(event)
        if self.leave_by is not None:       # stopping: this one gets its chance too
            self.leave_by = max(self.leave_by, time.monotonic() + NOTIFY_STOP_WAIT)
        self.hand()
        return event

    def check_ran(self, rt, result):
        """A check's run (its runtime, its CheckResult): a ``check`` event when it was cut
        short (timed out, could not start) or reported a rejected name; once until it
        runs cleanly again."""
        if self.config_of().daemon.notify is None:
            return
        rejected = rt.last["rejected"]
        key = rt.check.key
        if not result.failed and not rejected:
            self.troubled.discard(key)
        elif key not in self.troubled:
            self.troubled.add(key)
            message = (result.trouble or result.data.get("message")) if result.failed else rejected[0]
            self.event("check", check=rt.check.name, message=str(message)[:500])

    def child(self):
        return self.pool.children.get(self.pid) if self.pid is not None else None

    def hand(self):
        """The head of the queue to the child, when it is free and connected."""
        child = self.child()
        if self.inflight is not None or child is None or child.conn is None or child.kill_at:
            return
        settings = self.config_of().daemon
        event = self.queue.head()
        if event is None or settings.notify is None:
            return
        self.inflight = event["seq"]
        self.server.send(child.conn, {"t": "event", "event": event, "argv": list(settings.notify),
                                      "timeout": settings.notify_timeout})

    def tick(self, now):
        """Every pass of the loop: a child while events wait (stopping: until it may go)."""
        if self.pid is None and self.leave_by is None and self.queue.opened and not self.queue.waiting:
            return                      # no child, nothing waits: the usual pass
        child = self.child()
        if self.leave_by is not None and self._leave(child, now):
            return
        if child is None and now >= self.child_after and self.queue.head() is not None \
                and self.config_of().daemon.notify is not None:
            child = self.pool.fork("notify", notify_main, self.pool.sock_path, self.config_of().config_dir)
            self.pid = child.pid if child is not None else None
            self.child_after = now + 1.0 if child is None else 0.0
        self.hand()

    def _leave(self, child, now):
        """Stopping: whether the child goes now (nothing waits any more, or its time is up)."""
        idle = self.inflight is None and not self.queue.waiting and self.pool.action_child() is None
        if not idle and now < self.leave_by:
            return False
        if child is not None and child.kill_at is None:
            child.signal(signal.SIGTERM, now + KILL_GRACE)
            if not idle:
                log.warning("notify: stopping with %d events not delivered; they are delivered "
                            "after the next start", len(self.queue.waiting))
        return True

    def stopping(self, now):
        """The daemon stops: the ``stopping`` event; the child goes once nothing waits, or
        NOTIFY_STOP_WAIT later (what is left is delivered after the next start): a hung
        receiver does not hold up a stop."""
        self.leave_by = now + NOTIFY_STOP_WAIT
        self.event("daemon", event="stopping")

    def on_message(self, child, msg):
        """What the notify child says: a try failed, or an event is done with."""
        kind, seq = msg.get("t"), msg.get("seq")
        if seq != self.inflight or kind not in ("spawned", "failed", "done"):
            raise ProtocolError("unexpected notify message %r for seq %r" % (kind, seq))
        if kind == "spawned":
            child.pgid = _spawned_pid(msg)
            return
        child.pgid = None
        event = self.queue.head() or {}
        what = "event %s (%s)" % (seq, event.get("kind") if event.get("seq") == seq else "dropped")
        if kind == "failed":
            log.warning("notify: %s: try %s of %d failed: %s%s%s", what, msg.get("try"),
                        len(NOTIFY_RETRIES) + 1, msg.get("error"),
                        " (%s)" % msg["output"] if msg.get("output") else "",
                        "; again in %s" % format_duration(msg["again"]) if msg.get("again") else "")
            return
        result = "ok" if msg.get("result") == "ok" else "failed"
        if result == "failed":
            log.error("notify: %s dropped after %s tries: %s", what, msg.get("tries"), msg.get("error"))
        self.inflight = None
        self.queue.finish(seq, result)
        self.hand()

    def exited(self, child, how, stopping):
        """The notify child is gone: the event it had is handed to the next one again."""
        if child.pgid:
            killpg_quietly(child.pgid, signal.SIGKILL)  # the command it left behind
        self.pid = self.inflight = None
        if stopping and child.kill_at is not None:
            return
        log.error("notify child %d died (%s); %s", child.pid, how,
                  "replacing it" if self.queue.waiting else "a new one starts with the next event")
        if time.monotonic() - child.started < 1.0:
            self.child_after = time.monotonic() + 1.0

    def status(self):
        return self.queue.status()


def notify_test(config, state_dir):
    """--notify-test: the notify command once, with an event of kind ``test`` (seq 0), no
    daemon; prints what it did.  Exit 0 when the command exited 0."""
    settings = config.daemon
    if settings.notify is None:
        print("hadaemon: no notify command: set notify = COMMAND ARGS in [daemon] of %s"
              % os.path.join(config.config_dir, "checks.conf"), file=sys.stderr)
        return EXIT_FAIL
    event = {"kind": "test", "seq": 0, "time": round(time.time(), 6), "node": notify_node(config),
             "message": "a test event from hadaemon --notify-test"}
    print("notify command: %s" % " ".join(settings.notify))
    print("event (stdin, HA_EVENT=test): %s" % json.dumps(event, sort_keys=True))
    os.chdir(config.config_dir)
    environ = dict(os.environ, HA_CONFIG_DIR=config.config_dir, HA_STATE_DIR=state_dir)
    res = deliver_event(settings.notify, event, settings.notify_timeout, ChildWatch(), environ=environ)
    for line in res.output.decode("utf-8", "replace").splitlines()[:50]:
        print("  | %s" % line)
    failure = res.failure(settings.notify_timeout)
    print("%s in %.3fs" % (failure or "exit 0", res.duration))
    return EXIT_FAIL if failure else EXIT_OK


# ============================================================================
# master.py: Master: the loop, signals, readiness and shutdown.
# ============================================================================
#
# The story of the daemon's life, in run(): set up (lock, state db, socket,
# signals, schedule), say ready, loop, shut down.  Each pass of the loop is
# level-triggered: it handles recorded signals, reaps, enforces kill deadlines,
# keeps the pool full, fires due checks, hands them to the workers and starts
# the next queued action run, so a lost signal or wake-up never matters.  The
# parts do the work; the master only wires them:
#
#   Scheduler --CheckFlow--> a worker --result--> ControlServer --CheckFlow--> Ledger.report
#   Ledger.head --ActionRuns--> the action run --events--> ControlServer --> ActionRuns
#   SIGHUP, --reload --> Reload (a slice per pass) --> Master.reload swaps it in
#
# Uses: base, configfiles, records, store, ledger_store, switchover, ledger, scheduler, pool, control,
#       checkflow, http_server, cluster_member, cluster_ledger, cluster_link, actions, reload, notify.

class Notifier:
    """systemd's sd_notify protocol, when NOTIFY_SOCKET is set."""

    def __init__(self):
        self.address = os.environ.get("NOTIFY_SOCKET")
        usec = os.environ.get("WATCHDOG_USEC", "")
        self.watchdog = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else None
        if self.address and self.address.startswith("@"):
            self.address = "\0" + self.address[1:]

    def send(self, text):
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(text.encode(), self.address)
        except OSError as exc:
            log.warning("systemd notify %r failed: %s", text, exc)


class Master:
    """The daemon: ``run()`` is setup, ready, loop, shutdown; the parts do the rest."""

    def __init__(self, config, state_dir, once=False, default_log="stderr", ready_fd=None):
        self.config = config
        self.state_dir = state_dir
        self.once = once
        self.default_log = default_log      # where logs go when ``log`` is not set
        self.ready_fd = ready_fd
        self.lock = PidLock(state_dir)
        self.store = Store(state_dir)
        if config.cluster is None:
            ledger_store = LocalStore(self.store)
        else:
            ledger_store = EtcdStore(LocalStore(self.store), ClusterMember(config.cluster, time.monotonic()))
        self.ledger = Ledger(ledger_store, state_dir, config)
        self.scheduler = Scheduler(once, self.store)
        self.pool = Pool(os.path.join(state_dir, SOCK_FILE), state_dir)
        self.sel = selectors.DefaultSelector()
        self.flow = CheckFlow(self.scheduler, self.pool, None, self.ledger, None,
                              lambda: (self.config.config_dir, self.state_dir))
        self.server = self.flow.server = ControlServer(self.sel, self.pool.sock_path, self.pool,
                                                       self.flow.on_worker, self.child_event, self.answer)
        self.cluster = None if config.cluster is None else ClusterLink(self.ledger, self.pool, self.server)
        self.leadership = Alone() if self.cluster is None else self.cluster
        self.runs = ActionRuns(self.ledger, self.pool, self.server, self.leadership)
        self.switchover = SwitchoverDesk(self.ledger, self.leadership)
        self.http = HttpServer(self.sel, HttpApp(self.status_document, self.ledger.host_status,
                                                 self.ledger.history,
                                                 lambda flag: self.set_paused(flag, "an http request")))
        self.notifier = Notifier()
        self.notify = self.flow.notify = Notifications(self.store, self.pool, self.server,
                                                       lambda: self.config)
        self.ledger.notify = self.notify.event      # docs/HACKING.md: events
        self.signals = []
        self.stopping = False
        self.stop_deadline = None
        self.started_wall, self.started = time.time(), time.monotonic()
        self.next_checkpoint = self.started + CHECKPOINT_EVERY
        self.next_watchdog = self.started
        self.reloads = Reload(self.reload_steps)

    # -- the life of the daemon --------------------------------------------------

    def run(self):
        """Process flow: setup, say ready, loop, shut down.  Returns the exit code."""
        try:
            self.setup()
        except (HadaemonError, OSError) as exc:
            self.signal_ready("error: %s" % exc)
            raise
        log.info("hadaemon %s started (pid %d): %d checks, %d workers, %d action sections, "
                 "state in %s", __version__, os.getpid(), len(self.config.checks),
                 self.config.daemon.workers, len(self.config.sections), self.state_dir)
        if self.store.created:
            log.info("state db: none in %s; a new one is created", self.state_dir)
        self.signal_ready("ok %d" % os.getpid())
        self.notifier.send("READY=1\nMAINPID=%d" % os.getpid())
        self.notify.event("daemon", event="started")
        try:
            self.loop()
        finally:
            self.shutdown()
        failed = sum(n for (_, result), n in self.ledger.run_counts.items() if result == "failed")
        return EXIT_FAIL if self.once and failed else EXIT_OK

    def setup(self):
        ensure_state_dir(self.state_dir)
        if not self.lock.acquire():
            pid = PidLock.holder(self.state_dir)
            raise HadaemonError("a daemon already runs on %s (pid %s)" % (self.state_dir, pid))
        self.lock.write_pid()
        raise_open_files_limit()
        self.store.open()
        for note in self.store.notes:
            log.error("state db: %s", note)
        self.ledger.open(time.time(), self.leadership.acting())
        self.scheduler.adopt_results(self.store)
        self.http.configure(self.config.daemon)    # a busy port fails the start before the socket exists
        self.server.listen()
        self.install_signals()
        self.scheduler.configure(self.config.checks, time.monotonic())
        settle_heap()

    def install_signals(self):
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(sig, self.record_signal)
        self.sel.register(self.wake_r, selectors.EVENT_READ, self.drain_wakeup)

    def record_signal(self, signum, frame):
        self.signals.append(signum)     # only record: the loop does the work

    def drain_wakeup(self, mask):
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def signal_ready(self, text):
        """Tell ``--start``, waiting on a pipe, that we are up (or why not)."""
        if self.ready_fd is not None:
            try:
                os.write(self.ready_fd, text.encode() + b"\n")
                os.close(self.ready_fd)
            except OSError:
                pass
            self.ready_fd = None

    def loop(self):
        while True:
            now = time.monotonic()
            for key, mask in self.sel.select(self.timeout(now)):
                key.data(mask)
            now = time.monotonic()
            if self.signals:
                self.handle_signals()
            self.reap()
            self.pool.enforce_kills(now)
            if self.notifier.watchdog and now >= self.next_watchdog:
                # While stopping too: the loop is healthy while a sequence finishes.
                self.notifier.send("WATCHDOG=1")
                self.next_watchdog = now + self.notifier.watchdog
            self.http.tick(now)         # while stopping too: it answers until the end
            self.notify.tick(now)       # likewise: it delivers what waits, for a while
            # Answers that touch every check or host are made a slice per pass: due
            # checks wait for a slice, never for the whole of them.
            if self.server.answering:
                self.server.answer_some(time.monotonic() + ANSWER_SLICE)
            if self.stopping:
                if self.cluster is not None:
                    self.cluster.tick(now)     # step down, resign
                self.ledger.store.flush()
                if not self.pool.children or now >= self.stop_deadline:
                    return
                continue
            self.pool.manage(self.config, now, ssh=not self.once)
            if self.cluster is None:
                # A run queued by this pass's results starts before the checks are handed
                # out (up to AHEAD of them); once more below, for what the rest of the pass
                # queues.  Not in a cluster: a member hears etcd first (cluster.tick), where
                # the run may be another's already (test_kill_loop ran sequences twice).
                self.runs.start_next(self.config)
            self.scheduler.fire_due(now, AHEAD)
            self.flow.dispatch(now)
            if self.cluster is not None:
                self.cluster.tick(now)         # the agent, the mirror, agreement
            self.switchover.tick(time.time())     # a stored request, a scheduled one come due
            self.runs.start_next(self.config)
            if self.cluster is not None:                    # after the run it may have handed
                self.cluster.extend_lease(self.runs.handoff is not None)
            self.ledger.store.flush()       # a cluster: the pass's changes as one txn
            if self.reloads.due():
                self.reloads.step(time.monotonic() + ANSWER_SLICE)     # a reload, likewise
                self.reloads.let_go()
            self.server.tick(now)
            if now >= self.next_checkpoint:
                self.checkpoint(now)
            if self.once and self.scheduler.all_ran() and not self.ledger.queue \
                    and self.pool.action_child() is None:
                self.begin_stop("--once pass complete")

    def timeout(self, now):
        if self.server.busy() or (self.reloads.busy() and not self.stopping):
            return 0.0                  # work in steps under way: look at the sockets, go on
        wake = min(self.next_checkpoint, now + 1.0)     # the earliest deadline (no list made)
        due = None if self.stopping else self.scheduler.next_wake()
        if due is not None and due < wake:
            wake = due
        if self.notifier.watchdog and self.next_watchdog < wake:
            wake = self.next_watchdog
        if self.cluster is not None:
            wake = min(wake, self.cluster.next_wake(now))
        http = self.http.wakeup()
        if http is not None and http < wake:
            wake = http
        return max(0.0, wake - now)

    def handle_signals(self):
        while self.signals:
            sig = self.signals.pop(0)
            if sig == signal.SIGHUP:
                self.reloads.want()
            elif sig in (signal.SIGTERM, signal.SIGINT):
                self.begin_stop("%s received" % signal_name(sig))
            elif sig == signal.SIGUSR1:
                reopen_log()
                log.info("log reopened")

    def reload_steps(self):
        """A reload in steps: read both files, prepare the schedule, swap it all in at
        once (no step between the scheduler's swap and the rest).  Returns the errors."""
        config = yield from load_config_steps(self.config.config_dir)
        problem = cluster_reload_problem(self.config.cluster, config.cluster)
        if problem:
            raise ConfigError([problem])
        plan = yield from self.scheduler.plan_steps(config.checks)
        try:
            self.http.configure(config.daemon)  # it binds: a busy port refuses the reload
        except HadaemonError as exc:
            raise ConfigError([str(exc)])       # before anything is swapped in
        self.reloads.bury(self.scheduler.swap(plan))
        return self.reload(config)

    def reload(self, config):
        """Swap in ``config``, read and checked whole (the schedule is swapped already).
        Returns the errors (none)."""
        self.notifier.send("RELOADING=1")
        log_changed = config.daemon.log != self.config.daemon.log
        self.reloads.bury(self.config.checks, self.config.groups)
        self.config = self.ledger.config = config
        settle_heap(collect=False)      # a collection now would walk all of them once more
        if self.cluster is not None:
            self.cluster.reconfigure(config.cluster)
        if log_changed:
            target = config.daemon.log or self.default_log
            if target == "stderr":
                target = self.default_log   # daemonized, stderr is /dev/null
            setup_logging(target, self.state_dir, log.level == logging.DEBUG)
        else:
            reopen_log()
        log.info("configuration reloaded: %d checks, %d action sections",
                 len(config.checks), len(config.sections))
        self.notifier.send("READY=1")
        self.notify.event("daemon", event="reloaded")
        return []

    def checkpoint(self, now):
        self.next_checkpoint = now + CHECKPOINT_EVERY
        try:
            self.store.checkpoint()
        except OSError:
            pass        # logged by the store; everything stays dirty for the next one

    def begin_stop(self, why):
        """No new checks or runs; the running sequence may finish within its timeouts."""
        if self.stopping:
            return
        log.info("stopping: %s", why)
        self.notifier.send("STOPPING=1")
        self.stopping = True
        self.reloads.drop("the daemon is stopping; the configuration was not reloaded")
        self.scheduler.ready.clear()
        now = time.monotonic()
        self.notify.stopping(now)
        self.pool.stop(now)
        if self.cluster is not None:
            self.cluster.stop(now)
        self.stop_deadline = now + self.runs.stop_budget(now) + 10.0
        # systemd >= 236 waits that long, not TimeoutStopSec, before its SIGKILL.
        self.notifier.send("EXTEND_TIMEOUT_USEC=%d" % ((self.stop_deadline - now + 5.0) * 1e6))

    def shutdown(self):
        for child in self.pool.kill_all():
            if child.kind == "action":
                self.runs.exited(child, "killed at stop", self.stopping)
        self.server.close_all()
        self.http.close()
        try:
            self.checkpoint(time.monotonic())
            self.store.close()
        except OSError as exc:
            log.error("closing the state db: %s", exc)
        self.lock.release()
        log.info("stopped")

    # -- checks: Scheduler -> a worker -> Ledger -------------------------------------

    def reap(self):
        for child, how in self.pool.reap():
            self.server.drain(child)        # what it sent before it went
            self.pool.forget(child)
            if child.kind == "worker":
                self.worker_exited(child, how)
            elif child.kind == "ssh":
                self.pool.ssh.reaped(child, how)
            elif child.kind == "cluster":
                self.cluster.agent_exited(child, how, self.stopping)
            elif child.kind == "notify":
                self.notify.exited(child, how, self.stopping)
            else:
                self.runs.exited(child, how, self.stopping)

    def worker_exited(self, child, how):
        self.pool.worker_gone(child, how)
        self.flow.worker_exited(child, self.stopping, how)

    def child_event(self, child, msg):
        """What the cluster agent or an action run says."""
        if child.kind == "cluster":
            self.cluster.member.on_message(msg, time.monotonic())
        elif child.kind == "notify":
            self.notify.on_message(child, msg)
        else:
            self.runs.event(child, msg)

    # -- what the daemon answers -------------------------------------------------------

    def answer(self, msg):
        """A control verb (from the socket): its answer."""
        cmd = msg.get("cmd")
        if cmd == "status":
            return self.status_stream()
        if cmd == "reload":
            if self.stopping:
                return {"ok": False, "errors": ["the daemon is stopping"]}
            return self.reloads.answer()
        if cmd in ("pause", "resume"):
            return {"ok": True, "paused": self.set_paused(cmd == "pause", "request"),
                    "cluster": self.cluster is not None}
        if cmd == "history":
            return {"ok": True, "history": self.ledger.history(
                msg.get("n") if isinstance(msg.get("n"), int) else 20)}
        if cmd == "ping":
            return {"ok": True, "pid": os.getpid()}
        if cmd in ("rerun", "run"):
            return self.answer_run(cmd, msg.get("run"))
        if cmd in SwitchoverDesk.VERBS:
            return self.switchover.answer(msg, time.time())
        return {"ok": False, "errors": ["unknown command %r" % (cmd,)]}

    def set_paused(self, paused, by):
        """--pause / --resume, or POST /pause and /resume: the paused state to answer."""
        self.notify.event("daemon", event="paused" if paused else "resumed")
        paused = self.ledger.set_paused(paused)
        log.warning("actions %s by %s%s", "paused" if paused else "resumed", by,
                    " (the whole cluster, once etcd has it)" if self.cluster else "")
        return paused

    def answer_run(self, cmd, run_id):
        """``rerun``: queue run ``run_id``'s section again (docs/operating.md); ``run``: how it is now."""
        if not isinstance(run_id, int) or isinstance(run_id, bool):
            return {"ok": False, "errors": ["bad run id %r" % (run_id,)]}
        if cmd == "run":
            run = self.ledger.runs.get(run_id)
            return {"ok": True, "run": run.summary()} if run else \
                {"ok": False, "errors": ["no run #%d in the history" % run_id]}
        if not self.leadership.acting():
            leader = self.leadership.leader_name()
            return {"ok": False, "errors": ["this member does not lead the cluster: run --rerun on "
                                            "the leader (%s)" % (leader or "none now")]}
        try:
            return {"ok": True, "run": self.ledger.rerun(run_id, time.time()).summary()}
        except ValueError as exc:
            return {"ok": False, "errors": [str(exc)]}

    def daemon_status(self, now_m):
        """The DaemonBlock of --status --json."""
        cluster = None
        if self.cluster is not None:
            cluster = self.cluster.member.status(now_m, getattr(self.cluster.agent(), "pid", None))
        return DaemonBlock(running=True, pid=os.getpid(), version=__version__,
                           started=self.started_wall, uptime=now_m - self.started,
                           config_dir=self.config.config_dir, state_dir=self.state_dir,
                           lag_ms=self.scheduler.lag_summary(), http=self.http.url,
                           counters=dict(self.ledger.counters(), **self.notify.status()), cluster=cluster,
                           **self.ledger.daemon_status(), **self.pool.status())

    def status_doc(self):
        """The StatusDoc, its hosts and checks made as they are read."""
        now_m, now = time.monotonic(), time.time()
        recent = self.ledger.recent()
        return StatusDoc(recent["transitions"], recent["runs"], self.daemon_status(now_m),
                         self.ledger.host_entries(), self.scheduler.status(now_m, now))

    def status_stream(self):
        """--status --json as pieces of its one line: the daemon's block, then what each
        part says of itself, the hosts and checks a few hundred at a time (the loop
        goes on between the pieces, so ten thousand checks hold up nothing due)."""
        yield from self.status_doc().pieces()

    def status_document(self):
        """--status --json whole, as a dict, made in one go (the HTTP server's pages)."""
        return self.status_doc().to_wire()


# ============================================================================
# whatif.py: What if: --simulate (docs/operating.md): the section and the
# commands a transition would run.
# ============================================================================
#
# Owns the parsing of ``HOST FROM TO`` and ``HOST=STATE`` words, the simulation
# against the current states (from the daemon or its state db), and its rendering.
# It runs nothing.
#
# Uses: base, config, children.

# --simulate answers with the functions the daemon itself uses (the precedence of
# Config.precedence, plan_run) over states it only reads: the running daemon's,
# asked with the status verb (which logs nothing and writes nothing), else the
# state db's (Store.read, which never opens it for writing).  It runs nothing,
# writes nothing and logs nothing, so it is safe on a live pair at any time.

def parse_what_if(host, transition, sets):
    """--simulate's words -> (host, from, to, {host: state} of every --set).

    ValueError names the bad value: a host or state name a check may not report,
    a transition that is not FROM_to_TO, a --set without ``=``.
    """
    if not valid_name(host):
        raise ValueError("bad host name %r (letters, digits, _ . : -, a letter or digit first)"
                         % host)
    parts = transition.split("_to_")
    if len(parts) != 2 or not all(parts):
        raise ValueError("%r is not FROM_to_TO (slave_to_master, say)" % transition)
    for part in parts:
        if not valid_state(part):
            raise ValueError("bad state %r in %r" % (part, transition))
    overrides = {}
    for item in sets:
        name, eq, state = item.partition("=")
        name, state = name.strip(), state.strip()
        if not eq:
            raise ValueError("--set %r: write HOST=STATE" % item)
        if not valid_name(name):
            raise ValueError("--set %r: bad host name %r" % (item, name))
        if not valid_state(state):
            raise ValueError("--set %r: bad state %r" % (item, state))
        overrides[name] = state.lower()
    return host, parts[0].lower(), parts[1].lower(), overrides


def simulate(config, state_dir, host, from_state, to_state, states, sets=None, **context):
    """What the daemon would do if HOST had just gone FROM -> TO: the --simulate --json document.

    ``states`` are the known hosts' states; every --set in ``sets`` is applied on
    top, then HOST is put in TO, as a transition leaves it.  ``context`` goes into
    the document as it is (source, pid, paused).  ``would_run`` is False when no
    section matches or a variable would be empty (``error`` says which).
    """
    sets = dict(sets or {})
    after = dict(states, **sets)
    after[host] = to_state
    section, tried = None, []
    for key in config.precedence(host, from_state, to_state):
        tried.append(section_name(*key))
        section = config.sections.get(key)
        if section is not None:
            break
    doc = {"host": host, "from": from_state, "to": to_state,
           "transition": "%s_to_%s" % (from_state, to_state)}
    doc.update(context)
    doc.update(states=dict(sorted(after.items())), set=sets, tried=tried, section=None,
               commands=[], expanded=False, variables={}, env={}, would_run=False, error=None)
    if section is None:
        doc["error"] = "no section matches %s %s_to_%s in %s" % (
            host, from_state, to_state, os.path.join(config.config_dir, "actions.conf"))
        return doc
    plan = plan_run(section, host, from_state, to_state, after, config.config_dir, state_dir)
    doc.update(section={"name": section.name, "where": section.where, "timeout": section.timeout},
               variables=plan.variables, env=plan.env, would_run=plan.error is None,
               error=plan.error, expanded=plan.error is None)
    if plan.error:      # as written: the one that cannot be expanded is named by the error
        doc["commands"] = [{"argv": list(c.argv), "ignore": c.ignore, "where": c.where}
                           for c in section.commands]
    else:
        doc["commands"] = [{"argv": c["argv"], "ignore": c["ignore"], "where": c["where"]}
                           for c in plan.commands]
    return doc


def _wrap(head, items, indent="  "):
    """HEAD then ITEMS in lines of at most 78 columns, the next lines indented; an item
    (a path, ``[db1: any_to_any]``) is never split."""
    lines, line = [], head
    for item in items:
        if line.strip() and len(line) + 1 + len(item) > 78:
            lines.append(line)
            line = indent + item
        else:
            line += (" " if line.strip() else "") + item
    return lines + [line]


def render_simulation(doc):
    """The --simulate document for a person."""
    out = ["%s: %s -> %s, as if it had just happened (nothing is run or changed)"
           % (doc["host"], doc["from"], doc["to"])]
    source = {"daemon": "the running daemon (pid %s)" % doc.get("pid"),
              "db": "the state db (no daemon running)",
              "none": "nowhere yet (no state db): every other host unknown"}[doc["source"]]
    sets = " ".join("%s=%s" % kv for kv in sorted(doc["set"].items()))
    out.append("states: from %s%s" % (source, "; --set " + sets if sets else ""))
    out += _wrap("  ", ["%s=%s" % kv for kv in doc["states"].items()])
    if doc.get("paused"):
        out += _wrap("ACTIONS ARE PAUSED:", "this sequence would be recorded as skipped (paused) "
                     "and not run, until hadaemon --resume".split())
    section = doc["section"]
    if section is None:
        out.append("no section matches; tried, in the order of precedence:")
        out += _wrap("  ", ["[%s]" % name for name in doc["tried"]])
        out += _wrap("would run nothing:", doc["error"].split())
        return "\n".join(out)
    passed = doc["tried"][:-1]
    out.append("section [%s] at %s%s" % (section["name"], section["where"],
                                         ", timeout %s per command" % format_duration(section["timeout"])))
    if passed:
        out += _wrap("  before it, not in the config:", ["[%s]" % n for n in passed], "    ")
    out.append("commands%s, in order (- = its failure is ignored):"
               % ("" if doc.get("expanded") else " as written"))
    for i, cmd in enumerate(doc["commands"], 1):
        out.append("%3d %s %s" % (i, "-" if cmd["ignore"] else " ", shlex.join(cmd["argv"])))
    if not doc["commands"]:
        out.append("    none: the run would end ok at once")
    out += _wrap("variables:", ["%%%s%%=%s" % (k, shlex.quote(v)) for k, v in doc["variables"].items()])
    out += _wrap("environment:", ["%s=%s" % (k, shlex.quote(v)) for k, v in doc["env"].items()]
                 + ["HA_RUN_ID=(the new run's id)"])
    if doc["would_run"]:
        out.append("would run: %d command%s" % (len(doc["commands"]), "s" * (len(doc["commands"]) != 1)))
    else:
        out += _wrap("would NOT run:", ("%s; the run would be recorded as failed" % doc["error"]).split())
    return "\n".join(out)


# ============================================================================
# client.py: Control client: --status, --stop, --reload, --history.
# ============================================================================
#
# Owns what the command line asks the running daemon over its socket, and what it
# reads from the state db when no daemon runs (offline status, history), and the
# rendering of both for a person.
#
# Uses: base, wire, records, store, ledger_store, ledger, scheduler.

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


# ============================================================================
# opsclient.py: Operations from the command line: --switchover, --pause and
# --resume (all, or some hosts).
# ============================================================================
#
# Owns what the command line asks the daemon for SPEC §12's operations and how it
# waits: ``--switchover TO [--from FROM] [--at TIME] [--wait [--timeout S]]``,
# ``--switchover --cancel``, ``--pause [HOST...]`` / ``--resume [HOST...]`` (with no
# daemon running: written to the state db, or in a cluster to etcd).  In a cluster
# any member takes a request: it returns once etcd has it.
#
# Exit codes: 0 done (queued, scheduled, stored); 1 refused or failed (the reason
# printed); 2 bad arguments; 3 no daemon (--switchover).
#
# Uses: base, configfiles, wire, store, switchover, etcd, cluster_agent, cluster_member, client.

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


# ============================================================================
# checkcmd.py: --check-config (-t): the config read whole, then what a valid
# config may still get wrong.
# ============================================================================
#
# Owns reading the config for a command (errors printed, exit 1), cmd_check_config
# and its warnings, each at its FILE:LINE: a ``%WORD%`` in an action naming no state
# hadaemon knows of (known_variables, the one list of them), a section whose worst
# case outlasts ``stop_timeout``, an ssh control socket path too long; and
# ``--connect``, which tries each ssh target and etcd endpoint once.
#
# Uses: base, configfiles, children, ssh, etcd, client.

def config_or_exit(config_dir, origin=None):
    """The config of ``config_dir``; on any mistake print them all and exit 1."""
    try:
        return load_config(config_dir)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        if origin and not os.path.isfile(os.path.join(config_dir, "checks.conf")):
            print("the config dir %s is %s; give --config-dir DIR or set HADAEMON_CONFIG_DIR"
                  % (config_dir, origin), file=sys.stderr)
        print("%d error%s: nothing was started or changed" % (len(exc.errors), "s" * (len(exc.errors) > 1)),
              file=sys.stderr)
        sys.exit(EXIT_FAIL)


def known_variables(config, db_states=()):
    """Every %NAME% an action may name and get a value from: HOST, FROM, TO, and the
    state words the config names (its sections), a check's exit status gives, or the
    state db holds (``db_states``), and the switchover_role / switchover_candidate words."""
    states = {"unknown"} | set(EXIT_STATES.values()) | set(db_states)
    states.update((config.daemon.switchover_role, config.daemon.switchover_candidate))
    for section in config.sections.values():
        states.update((section.from_state, section.to_state))
    states.discard("any")
    states.discard(None)
    return {"HOST", "FROM", "TO"} | {state.upper() for state in states}


def db_state_words(state_dir):
    """The states the state db holds (hosts' states, recent transitions); none when unreadable."""
    try:
        doc, ledger = offline_status(state_dir)
    except (OSError, ValueError):
        return set()
    words = {h.get("state") for h in doc["hosts"].values()}
    for entry in ledger.history(1000):
        words.update((entry.get("from"), entry.get("to")))
    return {w for w in words if isinstance(w, str)}


def config_warnings(config, state_dir):
    """The -t warnings of a valid config, each a line starting ``warning: FILE:LINE:``."""
    out = []
    known = known_variables(config, db_state_words(state_dir))
    for section in sorted(config.sections.values(), key=lambda s: s.where):
        for cmd in section.commands:
            for word in cmd.argv[1:]:
                for m in _VAR_RE.finditer(word):
                    if m.group(1) and m.group(1) not in known:
                        out.append("warning: %s: %%%s%% names no state hadaemon knows of (known: %s): "
                                   "it would be empty and the run refused" % (
                                       cmd.where, m.group(1), ", ".join(sorted(known))))
    budget = config.daemon.stop_timeout
    for section in sorted(config.sections.values(), key=lambda s: s.where):
        worst = len(section.commands) * (section.timeout + ACTION_KILL_GRACE)
        if budget is not None and worst > budget:
            out.append("warning: %s: [%s] may take %s at worst (%d commands, each up to its timeout "
                       "%s and %s to kill it), more than stop_timeout = %s: a stop while it runs "
                       "would be killed half-way" % (
                           section.where, section.name, format_duration(worst), len(section.commands),
                           format_duration(section.timeout), format_duration(ACTION_KILL_GRACE),
                           format_duration(budget)))
    for group in config.groups:
        if group.scope.kind == "ssh" and ssh_control_path(group, state_dir) is None:
            out.append("warning: [%s]: the state dir path %s is too long for an ssh control socket; "
                       "its checks would run without connection reuse" % (group.scope.name, state_dir))
    return out


def cmd_check_config(args):
    config = config_or_exit(args.config_dir, args.config_origin)
    print("configuration OK: %d checks in %d groups, %d action sections, %d workers"
          % (len(config.checks), len(config.groups), len(config.sections), config.daemon.workers))
    for line in config_warnings(config, args.state_dir):
        print(line)
    if not args.connect:
        return EXIT_OK
    results = connect_ssh_targets(config)
    for group, error, took in results:
        print("ssh [%s] (%s): %s" % (group.scope.name, group.where,
                                     "FAILED: %s" % error if error else "ok in %.2fs" % took))
    failed = any(error for _, error, _ in results)
    if config.cluster is not None:
        for url, error, what in connect_etcd_endpoints(config.cluster):
            print("etcd %s: %s" % (url, "FAILED: %s" % error if error else what))
            failed = failed or bool(error)
    elif not results:
        print("no ssh targets or etcd endpoints to try")
    return EXIT_FAIL if failed else EXIT_OK


# ============================================================================
# starter.py: --init DIR: a commented starter config, written from this code
# (a pip install has no other).
# ============================================================================
#
# Owns the starter's files (checks.conf, actions.conf, a role check and an action
# script, two role files) and write_starter, which writes them into a new or empty
# config dir and never overwrites a file.
#
# Uses: base.

STARTER_CHECKS = """\
# hadaemon starter config (written by hadaemon --init).  It watches two pretend
# database hosts, db1 and db2, whose roles are in the files roles/db1 and roles/db2:
#   echo slave > roles/db1; sleep 3; echo master > roles/db2
# switches them over.  Replace checks/check_role with a real check (examples/postgresql/
# checks/check_pg_role in hadaemon's source) and the actions with your own.
# Check it with:  hadaemon --config-dir THIS_DIR --check-config
# Every key, its default and its range: docs/configuration.md in hadaemon's source.

[daemon]
interval = 1s          ; how often a check runs
timeout  = 5s          ; a check running longer is killed, with its process group
confirm  = 1           ; identical reports in a row before a new state is accepted
workers  = 2           ; pre-forked check workers
action_timeout = 20s   ; a command of actions.conf running longer is killed
#http = 127.0.0.1:8642 ; the status page, JSON, load balancer checks, /metrics (docs/http.md)
#stop_timeout = 90s    ; your service manager's stop budget (systemd: TimeoutStopSec)

# A group: checks that run here ([local]) or on another host ([ssh:USER@HOST]).
[local]
confirm = 2            ; two reports in a row: one odd reading does not fail over
check_role db1
check_role db2
"""

STARTER_ACTIONS = """\
# hadaemon starter actions.  For a transition of host H from F to T the first existing
# section of [H: F_to_T], [H: any_to_T], [H: F_to_any], [H: any_to_any], [F_to_T],
# [any_to_T], [F_to_any], [any_to_any] runs, its commands one after another; the first
# that fails stops the sequence, unless its line starts with "-".
# %HOST%, %FROM%, %TO% and %STATE% (the hosts in STATE, e.g. %MASTER%) are expanded.

# A standby became master: here you would stop the middleware, move the service
# address and start the middleware pointed at %MASTER%.
[slave_to_master]
announce %HOST% is the new master (masters now: %MASTER%)

[master_to_slave]
announce %HOST% is a slave again

# A host went down: tell someone; "-" means a failure of this command is ignored.
[any_to_down]
timeout = 10s
-announce %HOST% went %FROM% to down

# First start on a fresh state db: every host goes unknown -> its state.
[unknown_to_any]
announce %HOST% is %TO% (first report)
"""

STARTER_CHECK_ROLE = """\
#!/bin/sh
# check_role HOST: reports HOST's role, read from the file roles/HOST of the config dir.
# A check prints state=... (and host=...) on stdout; docs/configuration.md says more.
role=$(cat "$HA_CONFIG_DIR/roles/$1" 2>/dev/null) || { echo "host=$1"; echo "state=down"; \
echo "message=no file roles/$1"; exit 0; }
echo "host=$1"
echo "state=$role"
"""

STARTER_ANNOUNCE = """\
#!/bin/sh
# announce WORDS...: says them on stdout, which hadaemon logs with the run.
echo "$*"
"""

STARTER_FILES = [       # (path, text, mode)
    ("checks.conf", STARTER_CHECKS, 0o644),
    ("actions.conf", STARTER_ACTIONS, 0o644),
    ("checks/check_role", STARTER_CHECK_ROLE, 0o755),
    ("actions/announce", STARTER_ANNOUNCE, 0o755),
    ("roles/db1", "master\n", 0o644),
    ("roles/db2", "slave\n", 0o644),
]


def write_starter(config_dir):
    """--init DIR: write STARTER_FILES into DIR; refuse, changing nothing, when one is there."""
    config_dir = os.path.abspath(config_dir)
    there = [name for name, _, _ in STARTER_FILES if os.path.lexists(os.path.join(config_dir, name))]
    if there:
        print("hadaemon: --init %s: refusing: %s already there (nothing was written)"
              % (config_dir, ", ".join(there)), file=sys.stderr)
        return EXIT_FAIL
    try:
        for name, text, mode in STARTER_FILES:
            path = os.path.join(config_dir, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "w") as f:
                f.write(text)
            os.chmod(path, mode)
    except OSError as exc:
        print("hadaemon: --init %s: %s" % (config_dir, exc), file=sys.stderr)
        return EXIT_FAIL
    print("wrote a starter config in %s: %s" % (config_dir, ", ".join(n for n, _, _ in STARTER_FILES)))
    print("next: hadaemon --config-dir %s --check-config, then --foreground" % config_dir)
    return EXIT_OK


# ============================================================================
# cli.py: Command line: argparse, the commands, the relaunch, main().
# ============================================================================
#
# Owns the options, the default config and state dirs, each ``cmd_*`` (foreground,
# start, stop, status, reload, check-config, simulate, rerun, once; pause and
# switchover are opsclient's), the relaunch that runs the daemon with this file as a
# module, and main(), which the file calls last.
#
# Uses: base, configfiles, wire, ledger, notify, master, whatif, client, opsclient, checkcmd,
#       starter.

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


if __name__ == "__main__":
    sys.exit(main())
