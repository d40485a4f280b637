"""Typed records: what crosses the socket, what the ledger keeps and what --status --json says.

Owns the records that were dicts built by hand in several places, each with its
one conversion to and from the form it travels or is stored in:

  Job          master -> worker: one check to run (``{"t": "job"}``)
  CheckResult  worker -> master: what the check said (``{"t": "result"}``, or
               ``{"t": "same"}`` when it said what its job expected); the
               master's own result for a worker that died; the check's ``last``
  Transition   a host moved FROM -> TO: to_json() / from_json(), the state db's
               ``tr:N``, etcd's, --status --json's and --history's
  Run          an action run, with its RunCommands and their CommandResults:
               to_json() / from_json() (the state db's ``run:N``), to_etcd()
               (outputs cut), to_action() / from_action() (the ``{"t": "run"}``
               message), summary() (--status, --history, the ``run`` verb);
               from_json() refuses a value of the wrong shape (well_formed)
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

from .base import OUTPUT_CAP, __version__
from .wire import _shorten, encode_message, json_pieces


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
