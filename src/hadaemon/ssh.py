"""Remote checks: the ssh: scope.

A check of an [ssh:...] group is the local ssh client, run by a worker like any
check: the script file is its stdin and the remote command starts the script's
interpreter over there.  Connections are reused through one ssh master
connection per target, which the daemon's master process owns (SshMasters):

  - it is a plain child of the master, ``ssh -M -N -o ControlPersist=no``,
    started with the daemon, started again (with a backoff) whenever it exits,
    stopped with SIGTERM at stop, and by the kernel if the daemon dies
    (PR_SET_PDEATHSIG);
  - checks run ``ssh -o ControlMaster=no -o ControlPath=...``: while the master's
    socket is there they ride its connection; when it is not they connect on
    their own, so a check always reports what ssh itself sees.

Not ControlMaster=auto with ControlPersist in the checks: the first check's ssh
would fork the master, which daemonizes into a session of its own, escapes the
kill of the check's process group and outlives the daemon; and two checks
starting at once race to become the master.

Uses: base, children.
"""

import dataclasses
import json
import os
import shutil
import signal
import stat
import time

from .base import format_duration, killpg_quietly, log
from .children import child_setup


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
