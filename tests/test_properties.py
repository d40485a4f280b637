"""Hostile input, property-based (hypothesis, bounded): nothing here may end in a traceback.

(a) the config parser: a Config or FILE:LINE errors, whatever the two files hold;
(b) check output and reports: always a dict, never a host or state outside the SPEC's pattern;
(c) the socket's line reader: dicts or ProtocolError;
(d) the state store: kill -9 at any write step (torn writes included), disk full,
    a torn index rewrite; reopening gives back every committed value.
"""

import contextlib
import dbm.dumb
import errno
import io
import json
import os
import re
import shutil
import tempfile

from hypothesis import HealthCheck, event, example, given, settings, strategies as st

import hadaemon.base
import hadaemon.config
import hadaemon.configfiles
import hadaemon.wire
import hadaemon.dumbfiles
import hadaemon.store
import hadaemon.children

BOUNDED = settings(max_examples=200, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*\Z")
ERROR_LINE = re.compile(r"/.+:\d+: \S")
READ_ERROR = re.compile(r"/.+/(checks|actions)\.conf: cannot read: ")


@contextlib.contextmanager
def config_dir(checks, actions):
    """A throwaway config dir (hypothesis runs many examples in one test)."""
    d = tempfile.mkdtemp(prefix="hadaemon-prop-")
    try:
        for sub, names in (("checks", ("check_a", "check_b")), ("actions", ("act", "notify"))):
            os.mkdir(os.path.join(d, sub))
            for name in names:
                path = os.path.join(d, sub, name)
                with open(path, "w") as f:
                    f.write("#!/bin/sh\n")
                os.chmod(path, 0o755)
        for name, content in (("checks.conf", checks), ("actions.conf", actions)):
            if content is not None:
                with open(os.path.join(d, name), "wb") as f:
                    f.write(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
        yield d
    finally:
        shutil.rmtree(d)


def assert_config_or_errors(d):
    try:
        cfg = hadaemon.configfiles.load_config(d)
    except hadaemon.base.ConfigError as exc:
        event("errors: %s" % ("1" if len(exc.errors) == 1 else "several"))
        assert exc.errors, "a ConfigError with no errors"
        for line in exc.errors:
            assert ERROR_LINE.match(line) or READ_ERROR.match(line), line
            assert line.startswith(d + "/"), line
        return None
    assert isinstance(cfg, hadaemon.config.Config)
    event("a config with %s" % ("checks" if cfg.checks else "sections" if cfg.sections else "nothing"))
    for check in cfg.checks:
        assert NAME.match(check.host) and os.path.isabs(check.argv[0])
    for (host, from_state, to_state), section in cfg.sections.items():
        assert host is None or NAME.match(host)
        assert all(s == "any" or NAME.match(s) for s in (from_state, to_state))
        assert all(os.path.isabs(c.argv[0]) for c in section.commands)
    return cfg


# -- (a) the config parser -------------------------------------------------------------------

WORDS = st.sampled_from([
    "check_a", "check_b", "act", "notify", "-act", "-", "=", "#", ";", "'", '"', "\\", "%HOST%",
    "%MASTER%", "%%", "interval", "cron", "timeout", "confirm", "workers", "host", "log", "history",
    "ssh_identity", "ssh_options", "connect_timeout", "action_timeout", "bogus", "5s", "0", "-1",
    "250ms", "1h", "9999999999999", "*/5", "*", "mon-fri", "31", "2", "db1", "bad host!", "a_to_b",
    "/bin/true", "true", "../x", "sub/x", "'a b'", '"x y"', "a#b", "stderr", "syslog", "/nonexistent/x",
    "\t", "", "\x00", "\u00e9", "\U0001F600", "\ufeff", "[", "]", ":"])
SECTION = st.one_of(
    st.sampled_from(["[daemon]", "[local]", "[ssh:db2]", "[ssh:u@h:22]", "[ssh:]", "[ssh:a b]",
                     "[slave_to_master]", "[any_to_any]", "[db1: a_to_b]", "[x_to_]", "[a_to_b_to_c]",
                     "[]", "[[local]]", "[local] ; c", "[local]x", " [ local ] ", "[bad host!: a_to_b]",
                     "[ssh:[::1]:22]", "[ssh:h:0]", "[ssh:h:99999]"]),
    st.text(max_size=12).map(lambda t: "[%s]" % t))
SETTING = st.tuples(st.sampled_from(["interval", "cron", "timeout", "confirm", "workers", "host", "log",
                                     "history", "ssh_options", "ssh_identity", "connect_timeout",
                                     "action_timeout", "bogus", "x"]),
                    st.sampled_from([" = ", "=", "  =  ", " ="]),
                    st.lists(WORDS, max_size=6).map(" ".join)).map("".join)
LINE = st.one_of(SECTION, SETTING, st.lists(WORDS, min_size=1, max_size=6).map(" ".join),
                 st.sampled_from(["", "# c", "; c", "   ", "\\", "check_a # x", "act ; y"]),
                 st.text(max_size=30))
CONF_TEXT = st.lists(LINE, max_size=25).map("\n".join)


@BOUNDED
@given(CONF_TEXT, CONF_TEXT)
@example("[local]\ncheck_a\n", "[a_to_b]\nact\n")
@example("[local]\ncron = 0 0 31 2 *\ncheck_a 'x\n", "[x_to_]\n-\n")
def test_config_text_gives_a_config_or_file_line_errors(checks, actions):
    with config_dir(checks, actions) as d:
        assert_config_or_errors(d)


VALID_CHECKS = ["[daemon]", "interval = 5s", "workers = 3", "[local]", "host = db1", "check_a -x 1",
                "check_b 'two words'", "[ssh:postgres@db2:22]", "ssh_identity = /etc/key", "cron = */5 * * * *",
                "check_a", "[local]", "confirm = 2", "check_b # comment"]
VALID_ACTIONS = ["[slave_to_master]", "act %MASTER%", "-notify %HOST% went %FROM% to %TO%",
                 "[db1: any_to_down]", "timeout = 20s", "notify 100%% down", "[any_to_any]", "act"]


def mutated(lines):
    """A valid file with a few lines inserted, dropped or swapped for random ones."""
    return st.lists(st.tuples(st.integers(0, len(lines)), st.sampled_from(["insert", "drop", "swap"]), LINE),
                    max_size=3).map(lambda edits: "\n".join(apply_edits(lines, edits)))


def apply_edits(lines, edits):
    lines = list(lines)
    for at, how, line in edits:
        at = min(at, len(lines))
        if how == "insert" or at == len(lines):
            lines.insert(at, line)
        elif how == "drop":
            del lines[at]
        else:
            lines[at] = line
    return lines


@BOUNDED
@given(mutated(VALID_CHECKS), mutated(VALID_ACTIONS))
@example("\n".join(VALID_CHECKS), "\n".join(VALID_ACTIONS))
def test_a_valid_config_with_random_edits_gives_a_config_or_file_line_errors(checks, actions):
    with config_dir(checks, actions) as d:
        assert_config_or_errors(d)


@BOUNDED
@given(st.binary(max_size=400), st.binary(max_size=400))
@example(b"\xff\xfe[local]", b"")
@example(b"[local]\r\ncheck_a\r\n", b"[a_to_b]\x00\nact")
def test_config_bytes_give_a_config_or_file_line_errors(checks, actions):
    with config_dir(checks, actions) as d:
        assert_config_or_errors(d)


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(["checks", "actions", "both"]))
def test_missing_files_are_named(which):
    with config_dir(None if which in ("checks", "both") else "",
                    None if which in ("actions", "both") else "") as d:
        errors = hadaemon.base.ConfigError
        try:
            hadaemon.configfiles.load_config(d)
        except errors as exc:
            assert all(READ_ERROR.match(line) for line in exc.errors)
            assert len(exc.errors) == (2 if which == "both" else 1)
        else:
            raise AssertionError("a missing file must be an error")


# -- (b) check output and reports --------------------------------------------------------------

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) |
    st.text(max_size=12) | st.sampled_from(["up", "MASTER", "a_to_b", "db1", "../x", "db1;rm -rf /", ""]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20)
REPORT_DATA = st.dictionaries(
    st.sampled_from(["state", "states", "host", "message", "x"]),
    JSONISH | st.dictionaries(st.text(max_size=8) | st.sampled_from(["db1", "db2", "a_to_b"]),
                              JSONISH, max_size=4),
    max_size=4)


def assert_encodable(result):
    assert isinstance(result, dict)
    line = hadaemon.wire.encode_message({"t": "result", "data": result})
    assert hadaemon.wire.decode_message(line[:-1])["data"] is not None


@BOUNDED
@given(st.binary(max_size=2000))
@example(b'{"state": "up", "x": "\\ud800"}')
@example(b'{"a":' + b"[" * 3000 + b"]" * 3000 + b"}")
@example(b"\x00\xff{")
def test_check_output_bytes_always_give_an_encodable_dict(raw):
    assert_encodable(hadaemon.wire.parse_check_output(raw))


@BOUNDED
@given(st.dictionaries(st.text(max_size=8), JSONISH, max_size=6), st.sampled_from(["", "\n", "  \n\n"]))
def test_check_output_json_objects_come_back(obj, pad):
    raw = (pad + json.dumps(obj) + pad).encode("utf-8", "surrogatepass")
    result = hadaemon.wire.parse_check_output(raw)
    assert_encodable(result)
    if not re.search(r"[\ud800-\udfff]", json.dumps(obj, ensure_ascii=False)):
        assert result == obj


@BOUNDED
@given(st.lists(st.one_of(
    st.tuples(st.text(max_size=10), st.sampled_from(["=", " = ", "=  "]), st.text(max_size=10)).map("".join),
    st.text(max_size=20)), max_size=10).map("\n".join))
def test_check_output_lines_always_give_a_dict(text):
    result = hadaemon.wire.parse_check_output(text.encode("utf-8", "surrogatepass"))
    assert_encodable(result)
    assert all(isinstance(k, str) and isinstance(v, (str, dict, list, int, float, bool, type(None)))
               for k, v in result.items())


@BOUNDED
@given(REPORT_DATA, st.one_of(st.none(), st.integers(-300, 300)),
       st.sampled_from(["dflt", "check_tcp", "db1.example.com"]))
@example({"host": "db1;rm -rf /"}, 0, "dflt")
@example({"states": {"db1": "A_TO_B", "../x": "up", "": "up"}}, 0, "dflt")
def test_reports_never_carry_a_bad_name(data, exit_code, default_host):
    reports, problems = hadaemon.wire.reports_from_result(data, exit_code, default_host)
    assert isinstance(reports, list) and isinstance(problems, list)
    for host, state in reports:
        assert isinstance(host, str) and NAME.match(host), host
        assert isinstance(state, str) and NAME.match(state), state
        assert "_to_" not in state and state == state.lower()
    for problem in problems:
        assert isinstance(problem, str) and len(problem) < 300


@BOUNDED
@given(st.text(max_size=40), st.dictionaries(st.sampled_from(["db1", "db2", "db3"]),
                                              st.sampled_from(["master", "slave", "down", "host"])))
def test_expansion_never_raises(arg, states):
    variables = hadaemon.children.action_variables("db1", "slave", "master", states)
    text, empty = hadaemon.children.expand_argument(arg, variables)
    assert isinstance(text, str) and all(isinstance(n, str) for n in empty)
    if "%" not in arg:
        assert text == arg and empty == []


# -- (c) the socket's line reader ------------------------------------------------------------

@BOUNDED
@given(st.lists(st.binary(max_size=300), max_size=12))
@example([b'{"a": 1}\n{"b"', b': 2}\n'])
@example([b"[" * 5000 + b"\n"])
def test_line_reader_gives_dicts_or_protocol_error(chunks):
    reader = hadaemon.wire.LineReader(limit=1000)
    try:
        for chunk in chunks:
            for msg in reader.feed(chunk):
                assert isinstance(msg, dict)
    except hadaemon.base.ProtocolError:
        pass


@BOUNDED
@given(st.lists(st.dictionaries(st.text(max_size=6), JSONISH, max_size=4), max_size=6), st.data())
def test_line_reader_round_trips_messages_cut_anywhere(messages, data):
    stream = b"".join(hadaemon.wire.encode_message(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    reader, got, last = hadaemon.wire.LineReader(), [], 0
    for cut in cuts + [len(stream)]:
        got += reader.feed(stream[last:cut])
        last = cut
    assert got == json.loads("[%s]" % ",".join(json.dumps(m) for m in messages))


# -- (d) the state store: kill -9 at any step ------------------------------------------------

PAGE = 4096


class Crash(BaseException):
    """kill -9: nothing after it runs in this process."""


class Faults:
    """Counts every write-like step the store takes; dies (or finds the disk full) at chosen steps.

    A step that writes data is torn when it fails: a prefix of it reaches the file
    first.  As in the kernel, a write is cut only where it crosses a page boundary of
    the file (or before its first byte): ``tear`` picks which of those cuts.
    ``index_line``: die while writing that line of a rewritten index (.dir).
    """

    def __init__(self):
        self.arm(None, frozenset(), 0.5)
        self.enabled = False
        self.page = PAGE

    def arm(self, crash_at, enospc, tear, index_line=None, index_full=False):
        self.enabled, self.step, self.crash_at, self.enospc, self.tear = True, 0, crash_at, enospc, tear
        self.index_line = index_line
        self.index_full = index_full    # every rewrite of the index finds the disk full
        self.dead = False               # after the kill: a dbm object collected now writes nothing

    def mutate(self, data, do, crash=False, offset=0):
        if self.dead:
            return len(data) if data else 0
        if not self.enabled:
            return do(data)
        self.step += 1
        crash = crash or self.step == self.crash_at
        if crash or (data is not None and self.step in self.enospc):
            if data:
                first = (offset // self.page + 1) * self.page - offset
                cuts = [0] + list(range(first, len(data), self.page))
                do(data[:cuts[min(len(cuts) - 1, int(self.tear * len(cuts)))]])
            if crash:
                self.enabled, self.dead = False, True
                raise Crash()
            raise OSError(errno.ENOSPC, "No space left on device (test)")
        return do(data)


class FaultyOs:
    """``os`` as hadaemon and dbm.dumb see it, every change to a file going through Faults.

    The store writes the journal and .dir with write() (appended, or .dir rewritten
    whole from its start) and .dat with pwrite().  A rewrite of .dir dies at line
    ``index_line`` when asked; with ``index_full`` every write to .dir finds the disk full.
    """

    def __init__(self, faults):
        self._faults = faults
        self._files = {}                        # fd -> (path, flags) of what is open

    def __getattr__(self, name):
        return getattr(os, name)

    def open(self, path, flags, mode=0o777, **kw):
        fd = os.open(path, flags, mode, **kw)
        self._files[fd] = (os.fsdecode(path), flags)
        return fd

    def close(self, fd):
        self._files.pop(fd, None)
        os.close(fd)

    def write(self, fd, data):
        path, flags = self._files.get(fd, ("", os.O_APPEND))
        data = bytes(data)
        faults = self._faults
        offset = os.fstat(fd).st_size if flags & os.O_APPEND else os.lseek(fd, 0, os.SEEK_CUR)

        def do(d):
            return os.write(fd, d) if d else 0
        if path.endswith(".dir") and faults.enabled and not faults.dead:
            if faults.index_full:
                raise OSError(errno.ENOSPC, "No space left on device (test)")
            if flags & os.O_TRUNC and faults.index_line is not None:
                lines = data.splitlines(keepends=True)
                if faults.index_line < len(lines):
                    head = b"".join(lines[:faults.index_line])
                    do(head)
                    faults.mutate(lines[faults.index_line], do, crash=True, offset=offset + len(head))
        return faults.mutate(data, do, offset=offset)

    def pwrite(self, fd, data, offset):
        return self._faults.mutate(bytes(data), lambda d: os.pwrite(fd, d, offset) if d else 0,
                                   offset=offset)

    def ftruncate(self, fd, length):
        self._faults.mutate(None, lambda _: os.ftruncate(fd, length))

    def unlink(self, path):
        self._faults.mutate(None, lambda _: os.unlink(path))

    remove = unlink

    def rename(self, a, b):
        self._faults.mutate(None, lambda _: os.rename(a, b))

    def replace(self, a, b):
        self._faults.mutate(None, lambda _: os.replace(a, b))


class FaultyFile:
    def __init__(self, faults, real, text, rewritten_index, append=False):
        self._faults, self._real, self._text, self._append = faults, real, text, append
        self._lines = 0 if rewritten_index else None

    def write(self, s):
        if self._faults.dead:
            return len(s)
        data = s.encode("latin-1") if self._text else bytes(s)
        crash = False
        if self._lines is not None and self._faults.enabled:
            crash = self._lines == self._faults.index_line
            self._lines += 1
            if self._faults.index_full:
                raise OSError(errno.ENOSPC, "No space left on device (test)")

        def do(d):
            self._real.write(d)
            self._real.flush()
        offset = os.fstat(self._real.fileno()).st_size if self._append else self._real.tell()
        self._faults.mutate(data, do, crash, offset)
        return len(s)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._real.close()


class FaultyIo:
    def __init__(self, faults):
        self._faults = faults

    def __getattr__(self, name):
        return getattr(io, name)

    def open(self, file, mode="r", *args, **kwargs):
        if mode in ("r", "rb"):
            return io.open(file, mode, *args, **kwargs)
        if self._faults.dead:
            return FaultyFile(self._faults, io.BytesIO(), "b" not in mode, False)
        rewritten_index = mode == "w" and os.fsdecode(file).endswith(".dir")
        return FaultyFile(self._faults, io.open(file, mode.replace("b", "") + "b"), "b" not in mode,
                          rewritten_index, "a" in mode)


@contextlib.contextmanager
def faulty_files(faults):
    """Route hadaemon's and dbm.dumb's writes through ``faults`` (restored afterwards)."""
    fos, fio = FaultyOs(faults), FaultyIo(faults)
    saved = [(hadaemon.store, "os", hadaemon.store.os), (hadaemon.dumbfiles, "os", hadaemon.dumbfiles.os),
             (dbm.dumb, "_os", dbm.dumb._os), (dbm.dumb, "_io", dbm.dumb._io),
             (dbm.dumb._Database, "_os", dbm.dumb._Database._os),
             (dbm.dumb._Database, "_io", dbm.dumb._Database._io)]
    hadaemon.store.os = hadaemon.dumbfiles.os = dbm.dumb._os = dbm.dumb._Database._os = fos
    dbm.dumb._io = dbm.dumb._Database._io = fio
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def abandon(store):
    """What kill -9 leaves: no close, no checkpoint, the fds gone."""
    for fd in (store.files.dat_fd, store.jfd):
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
    store.files.dat_fd = store.jfd = None


ABSENT = object()


def one_of(got, allowed):
    return any(got is a if a is ABSENT else (got is not ABSENT and got == a) for a in allowed)


class Model:
    """What must come back.

    ``c:`` keys are committed: each must come back with its last acknowledged value,
    or with the value of a later commit that failed or was cut short (it may have
    landed).  ``s:`` keys are soft: a clean one must come back as it was; a dirty one
    (set since the last checkpoint) as any value it had since, or not at all (a torn
    in-place write may take its old value with it: "a crash may lose it").
    """

    def __init__(self):
        self.acked, self.prev, self.maybe = {}, {}, {}
        self.soft_values, self.dirty_soft = {}, set()
        self.last_sure, self.last_in_journal = None, False

    def committed(self, changes, sure):
        for key, value in changes.items():
            if sure:
                self.prev[key] = (self.acked.get(key, ABSENT), self.maybe.get(key, []))
                self.acked[key], self.maybe[key] = value, []
            else:
                self.maybe.setdefault(key, []).append(value)
        if sure:
            self.last_sure, self.last_in_journal = changes, True

    def last_commit_torn(self):
        """The journal's last line was cut: its commit may be gone, nothing before it."""
        if self.last_in_journal:
            for key in self.last_sure:
                old, old_maybe = self.prev[key]
                self.maybe[key] = old_maybe + [self.acked[key]] + self.maybe[key]
                self.acked[key] = old
            self.last_in_journal = False

    def soft(self, key, value):
        self.soft_values.setdefault(key, [ABSENT]).append(value)
        self.dirty_soft.add(key)

    def checkpointed(self):
        self.dirty_soft.clear()
        self.soft_values = {k: v[-1:] for k, v in self.soft_values.items()}
        self.last_in_journal = False

    def check(self, data):
        for key in set(self.acked) | set(self.maybe):
            allowed = [self.acked.get(key, ABSENT)] + self.maybe.get(key, [])
            got = data.get(key, ABSENT)
            assert one_of(got, allowed), "committed %s came back as %r, not one of %r" % (
                key, "nothing" if got is ABSENT else got, allowed)
        for key, values in self.soft_values.items():
            got = data.get(key, ABSENT)
            allowed = values + [ABSENT] if key in self.dirty_soft else values[-1:]
            assert one_of(got, allowed), "soft %s came back as %r, not one of %r" % (key, got, allowed)
        assert set(data) <= set(self.acked) | set(self.maybe) | set(self.soft_values), sorted(data)
        # what came back is durable now: it is the new truth
        self.__init__()
        for key, value in data.items():
            if key.startswith("c:"):
                self.acked[key] = value
            else:
                self.soft_values[key] = [value]


VALUES = st.one_of(st.integers(), st.text(max_size=8), st.lists(st.integers(), max_size=4),
                   st.text(alphabet="ab\u00e9\U0001F600", min_size=400, max_size=1500),
                   st.dictionaries(st.sampled_from(["state", "since"]), st.integers(), max_size=2))
# Soft values are objects and arrays under 512 bytes, as the master's are ("reports",
# "checks"): a stale index reading a rewritten one then finds invalid JSON, never a
# different value.  Committed values may be anything: the journal puts them right.
SOFT_VALUES = st.one_of(st.lists(st.integers(-10 ** 6, 10 ** 6), max_size=8),
                        st.dictionaries(st.sampled_from(["time", "check", "state"]),
                                        st.integers() | st.text(max_size=20), max_size=3))
OPS = st.lists(st.one_of(
    st.tuples(st.just("commit"), st.dictionaries(st.sampled_from(["c:%d" % i for i in range(6)]), VALUES,
                                                 min_size=1, max_size=3)),
    st.tuples(st.just("soft"), st.sampled_from(["s:0", "s:1"]), SOFT_VALUES),
    st.tuples(st.just("checkpoint")),
    st.tuples(st.just("compact"))), max_size=14)
ROUND = st.tuples(
    OPS,
    st.one_of(st.none(), st.integers(1, 60)),                   # the write step that is a kill -9
    st.one_of(st.just(frozenset()), st.frozensets(st.integers(1, 60), max_size=3)),   # disk full
    st.floats(0, 1),                                            # how much of a torn write lands
    st.sampled_from(["", "", "torn-journal", "torn-index"]),    # how the round ends
    st.integers(0, 12))                                         # the index line being written


def run_round(state_dir, faults, model, ops, crash_at, enospc, tear, ending, index_line, rnd):
    store = hadaemon.store.Store(state_dir)
    store.open()
    model.check(store.data)
    faults.arm(crash_at, enospc, tear)
    try:
        for op in ops:
            if op[0] == "commit":
                try:
                    store.commit(op[1])
                except OSError:
                    model.committed(op[1], sure=False)          # refused: may land later, or not
                    continue
                except Crash:
                    model.committed(op[1], sure=False)
                    raise
                # A commit the disk had no room for is kept in memory, not refused: it is
                # sure only once in the journal (a later write may put it there, or not).
                model.committed(op[1], sure=not store.unjournaled)
            elif op[0] == "soft":
                store.soft(op[1], op[2])
                model.soft(op[1], op[2])
            else:
                try:
                    getattr(store, op[0])()
                except OSError:
                    continue
                model.checkpointed()
        faults.enabled = False
        if ending == "torn-journal" and ops and ops[-1][0] == "commit" and model.last_in_journal \
                and model.last_sure is ops[-1][1]:
            # killed while the last commit was being written (a large one spans pages)
            with open(store.journal_path, "rb") as f:
                raw = f.read()
            if raw:
                start = raw.rstrip(b"\n").rfind(b"\n") + 1
                os.truncate(store.journal_path, rnd.draw(st.integers(start, len(raw) - 1)))
                model.last_commit_torn()
        elif ending == "torn-index":
            # kill -9 while .dir is rewritten whole: .bak complete, .dir a prefix, journal intact
            store.files.index_whole = True
            if not store.dirty:
                store.dirty = set(store.data) or {"s:0"}
                if "s:0" not in store.data:
                    store.soft("s:0", "x")
                    model.soft("s:0", "x")
            faults.arm(None, frozenset(), tear, index_line)
            try:
                store.checkpoint()
            except OSError:
                pass
            else:
                model.checkpointed()
        event("round ended without a crash")
    except Crash:
        event("killed at a write step")
    finally:
        faults.enabled = False
        abandon(store)
    del store                           # dbm objects the kill left behind go while still dead
    faults.dead = False


@settings(max_examples=int(os.environ.get("STORE_EXAMPLES", 200)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(ROUND, min_size=1, max_size=4), st.data())
def test_store_gives_back_every_committed_value_after_a_crash(rounds, rnd):
    state_dir = tempfile.mkdtemp(prefix="hadaemon-store-")
    faults = Faults()
    model = Model()
    try:
        with faulty_files(faults):
            for args in rounds:
                run_round(state_dir, faults, model, *args, rnd)
            store = hadaemon.store.Store(state_dir)
            store.open()
            model.check(store.data)
            store.close()
            assert hadaemon.store.Store.read(state_dir) == store.data
            # recovery left a clean db: opening it again finds nothing to repair
            again = hadaemon.store.Store(state_dir)
            again.open()
            assert again.data == store.data and again.notes == []
            again.close()
    finally:
        shutil.rmtree(state_dir)


def test_store_survives_the_disk_filling_up_during_two_index_rewrites(tmp_path):
    """A rewrite of .dir moves the whole index to .bak first: failing twice in a row
    (after an append to it failed) must not leave both cut short."""
    faults = Faults()
    with faulty_files(faults):
        store = hadaemon.store.Store(str(tmp_path))
        store.open()
        store.commit({"c:%d" % i: {"n": i} for i in range(20)})
        store.checkpoint()
        store.commit({"c:20": {"n": 20}})
        faults.arm(None, frozenset(), 0.5, index_full=True)
        for _ in range(3):
            try:
                store.checkpoint()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
            else:
                raise AssertionError("the checkpoint should have found the disk full")
        store.commit({"c:21": {"n": 21}})
        faults.enabled = False
        abandon(store)
        store = hadaemon.store.Store(str(tmp_path))
        store.open()
        assert store.data == {"c:%d" % i: {"n": i} for i in range(22)}
        store.close()


def test_store_checkpoints_again_once_the_disk_has_room(tmp_path):
    """The disk full at each write step of a checkpoint, then of a compaction; then room
    again: the next checkpoint works, empties the journal, and the db holds everything."""
    faults = Faults()
    with faulty_files(faults):
        store = hadaemon.store.Store(str(tmp_path))
        store.open()
        store.commit({"c:%d" % i: [i] * i for i in range(8)})
        store.checkpoint()
        for op in ("checkpoint", "compact"):
            store.commit({"c:changing": "dry run"})
            faults.arm(None, frozenset(), 0.5)
            getattr(store, op)()
            steps = faults.step
            assert steps >= 4
            for step in range(1, steps + 1):
                store.commit({"c:changing": [op, step]})
                faults.arm(None, frozenset([step]), 0.5)
                try:
                    getattr(store, op)()
                except OSError:
                    pass
                faults.enabled = False
                store.checkpoint()
                assert os.path.getsize(store.journal_path) == 0, (op, step)
                # the journal is empty: the db files alone must hold everything
                assert hadaemon.store.Store.read(str(tmp_path)) == store.data, (op, step)
        expected = dict(store.data)
        abandon(store)
        store = hadaemon.store.Store(str(tmp_path))
        store.open()
        assert store.data == expected and store.data["c:changing"] == ["compact", steps]
        store.close()


def test_store_survives_an_index_line_cut_by_the_disk_full_then_a_crash(tmp_path):
    """A checkpoint appends the index lines of what it wrote to .dir.  Disk full in the
    middle of them leaves half a line; the next checkpoint rewrites .dir whole (an
    append would be glued to it), and a kill -9 in that rewrite leaves .dir cut and
    .bak ending in the half line.  Nothing may be lost."""
    faults = Faults()
    faults.page = 1                     # the disk may fill at any byte
    with faulty_files(faults):
        store = hadaemon.store.Store(str(tmp_path))
        store.open()
        store.commit({"c:%02d" % i: {"n": i} for i in range(20)})
        store.checkpoint()
        store.commit({"c:new1": {"n": 21}, "c:new2": {"n": 22}})
        # checkpoint: the new values (1), their index lines (2): the disk fills at 2,
        # in the middle of the first line
        faults.arm(None, frozenset([2]), 0.25)
        try:
            store.checkpoint()
        except OSError:
            pass
        else:
            raise AssertionError("the checkpoint should have found the disk full")
        with open(store.base + ".dir", "rb") as f:
            assert not f.read().endswith(b"\n")        # half a line
        faults.arm(None, frozenset(), 0.0, index_line=0)
        try:
            store.checkpoint()                      # .dir rewritten whole, killed at its first line
        except Crash:
            pass
        else:
            raise AssertionError("the checkpoint should have rewritten .dir whole")
        abandon(store)
        with open(store.base + ".bak", "rb") as f:
            assert not f.read().endswith(b"\n")        # the half line, in the old index
        store = hadaemon.store.Store(str(tmp_path))
        store.open()
        assert store.data == dict({"c:%02d" % i: {"n": i} for i in range(20)},
                                  **{"c:new1": {"n": 21}, "c:new2": {"n": 22}})
        store.close()


DB_FILES = st.fixed_dictionaries({}, optional={
    ".dir": st.one_of(st.binary(max_size=300), st.lists(st.one_of(
        st.sampled_from(["'meta:checkpoint', (0, 64)", "'k', (512, 3)", "'k', (-5, 3)", "'k', (0, 10**15)",
                         "'k', (1.0, 2)", "'k', (512, -1)", "'k', 'x'", "b'k', (512, 3)", "('k',)", "[[[["]),
        st.text(max_size=20)), max_size=6).map(lambda ls: "\n".join(ls).encode("latin-1", "replace"))),
    ".bak": st.binary(max_size=200),
    ".dat": st.one_of(st.binary(max_size=700),
                      st.just(b'{"keys": 1}'.ljust(64) + b"\0" * 448 + b'[1]')),
    ".journal": st.one_of(st.binary(max_size=200), st.lists(st.sampled_from([
        b'{"s":{"k":1}}', b'{"s":[]}', b'{"full":true,"s":{}}', b'{"s":{"k":', b"[" * 3000, b"\xff"]),
        max_size=4).map(b"\n".join)),
})


@BOUNDED
@given(DB_FILES)
@example({".dir": b"'meta:checkpoint', (0, 64)\n'k', (-5, 3)\n", ".dat": b'{"keys": 1}'.ljust(64)})
@example({".dir": b"'meta:checkpoint', (0, 64)\n'k', (0, 1000000000000)\n", ".dat": b'{"keys": 1}'.ljust(64)})
def test_store_opens_whatever_garbage_the_files_hold(files):
    """A damaged state db is moved aside or repaired, never a traceback; then it works."""
    state_dir = tempfile.mkdtemp(prefix="hadaemon-garbage-")
    try:
        for suffix, content in files.items():
            with open(os.path.join(state_dir, hadaemon.base.DB_NAME + suffix), "wb") as f:
                f.write(content)
        assert isinstance(hadaemon.store.Store.read(state_dir), dict)
        store = hadaemon.store.Store(state_dir)
        store.open()
        store.commit({"after": [1]})
        store.close()
        again = hadaemon.store.Store(state_dir)
        again.open()
        assert again.data == store.data and again.data["after"] == [1]
        again.close()
    finally:
        shutil.rmtree(state_dir)
