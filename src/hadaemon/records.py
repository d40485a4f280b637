"""Typed records: what crosses the socket and what --status --json says, one type each.

Owns the records that were dicts built by hand in several places, each with its
one conversion to and from the form it travels or is stored in:

  Job          master -> worker: one check to run (``{"t": "job"}``)
  CheckResult  worker -> master: what the check said (``{"t": "result"}``); the
               master's own result for a worker that died; the check's ``last``
  StatusDoc    the --status --json document (socket, HTTP /status, offline), with
  DaemonBlock  its ``daemon`` block and
  ClusterStatus  that block's ``cluster``

The wire forms are the published contract (docs/operating.md, docs/http.md,
docs/cluster.md): their keys, values and order are kept exactly; an optional key is
left out when it is None, as before.  The status document has no ``from_wire``: its
readers (the renderers, the page, the metrics, the tests) read the JSON.

Uses: base, wire.
"""

import dataclasses
import typing

from .base import __version__
from .wire import _shorten, encode_message, json_pieces


# -- Master -> worker: a job ---------------------------------------------------------

@dataclasses.dataclass
class Job:
    """One check handed to a worker.  ``sent`` / ``sent_wall`` are the master's own
    (when it was handed: the hang deadline, the lost result's start) and never sent."""
    id: int
    key: str                            # the check's key
    argv: list                          # what runs (ssh: the ssh command)
    env: dict                           # HA_CHECK, HA_SCOPE, HA_STATE, HA_CONFIG_DIR, HA_STATE_DIR[, HA_HOST]
    timeout: float
    stdin: typing.Optional[str] = None  # ssh: the file the remote command reads
    ssh: bool = False
    sent: typing.Optional[float] = None         # monotonic
    sent_wall: typing.Optional[float] = None    # wall clock

    def to_wire(self):
        """The ``job`` message a worker reads."""
        msg = {"t": "job", "id": self.id, "key": self.key, "timeout": self.timeout,
               "env": self.env, "argv": self.argv}
        if self.ssh:
            msg["stdin"], msg["ssh"] = self.stdin, True
        return msg

    @classmethod
    def from_wire(cls, msg, _new=tuple.__new__):
        """The worker's side; a message without id, key, argv, env or timeout raises
        KeyError (the worker exits with its traceback: the master gave it nonsense)."""
        return cls(msg["id"], msg["key"], msg["argv"], msg["env"], msg["timeout"],
                   msg.get("stdin"), bool(msg.get("ssh")))


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

    def to_wire(self):
        """The ``result`` message a worker sends (``stderr`` only when there was some)."""
        msg = {"t": "result", "job": self.job, "key": self.key, "data": self.data,
               "failed": self.failed, "exit": self.exit, "signal": self.signal,
               "started": self.started, "duration": self.duration, "trouble": self.trouble}
        if self.stderr:
            msg["stderr"] = self.stderr
        return msg

    @classmethod
    def from_wire(cls, msg, _new=tuple.__new__):
        """The master's side, lenient as the worker is its own child: ``data`` that is
        not an object reads as {}, ``exit`` not an int and ``trouble`` not a string as
        None, ``failed`` is True only when it is ``true``; the rest is taken as sent.
        (Whether the message is a result for the job the worker runs is the Pool's.)"""
        get = msg.get
        data, exit_code, trouble = get("data"), get("exit"), get("trouble")
        # tuple.__new__: the hottest message, and the NamedTuple's __new__ is one call more.
        return _new(cls, (get("job"), get("key"), data if isinstance(data, dict) else {},
                          get("failed") is True, exit_code if isinstance(exit_code, int) else None,
                          get("signal"), get("started"), get("duration"),
                          trouble if isinstance(trouble, str) else None, get("stderr") or None))

    @classmethod
    def lost(cls, job, how, now_m):
        """The result of a check whose worker died while it ran: unknown, and failed
        (its unknown goes to the hosts the check last reported on)."""
        return cls(job.id, job.key, {"state": "unknown",
                                     "message": "worker died (%s) while running the check" % how},
                   True, None, None, job.sent_wall, now_m - job.sent, None)

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
                   ClusterStatus.offline(config.cluster) if config and config.cluster else None)


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
