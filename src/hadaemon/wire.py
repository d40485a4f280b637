"""Wire protocol and check output: what crosses the UNIX socket, and what a check prints.

Owns the framing (one JSON object per line, at most MAX_MESSAGE bytes), the
LineReader and Channel every process speaks through, ``request`` (a client's one
question), and the reading of a check's stdout into the serialized hash and its
reports (docs/configuration.md: what a check reports).

Uses: base.
"""

import collections
import hashlib
import itertools
import json
import os
import re
import socket

from .base import (
    ANSWER_MAX, ANSWER_STEP, EXIT_STATES, HadaemonError, MAX_MESSAGE, ProtocolError, SOCK_FILE,
    valid_name, valid_state,
)


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
