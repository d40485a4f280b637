"""HTTP/1.1 on the wire: requests read, answers written, the token checked.

Owns the limits of the HTTP server, the request parser (RequestReader,
parse_request_head), the Bearer/Basic token check, and the encoding of an answer.
The answers themselves are http_views'; the server in the master's loop is
http_server's.

docs/http.md.  HttpServer is a part of the master's loop beside the control socket:
a non-blocking listener and connections on the master's selector, no thread.  The
answers are pure functions of the status document (the one --status --json
prints), so the page, the JSON, the load balancer's check and the metrics can
never disagree with each other or with --status.

Why not http.server: its request handler reads a blocking file object, one
request per call, and writes its answer before returning; nothing of it fits a
loop that must never wait on a client.  http.client.parse_headers would fit (on
a whole head; the etcd client below has the module loaded anyway), but measured it
takes 52 us per head against 15 us for the parser below, and it quietly drops a
malformed line or accepts a folded one, where a server must refuse both (RFC 9112 §5).

Uses: base.
"""

import base64
import dataclasses
import json
import re
import time
import urllib.parse

from .base import HadaemonError


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
