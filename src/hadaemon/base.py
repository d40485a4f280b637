"""Constants, errors and small utilities: durations, names, fds, the pid lock, logging.

Owns the exit codes, the file names of the state dir, the limits every part shares,
the error hierarchy (HadaemonError, ConfigError, ProtocolError), the helpers every
process needs (close inherited fds, reset signals, decode a wait status, kill a
process group), the pid file and its lock, and the logger ``log``.

Uses: the standard library only.
"""

import fcntl
import gc
import logging
import os
import re
import resource
import signal
import socket
import stat
import struct
import sys
import time


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
