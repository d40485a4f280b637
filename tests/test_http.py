"""SPEC §9 without the daemon: settings, the request parser, the answers, the page,
the metrics, and HttpServer itself on real sockets driven by a small selector loop.

The parser and the answers are pure and table-driven.  The server tests run
HttpServer in a loop of their own (a thread of the test process: the daemon has no
thread, the test harness may) with its timeouts shortened, so that slow, hostile and
half-gone clients are seen in a second instead of ten.  tests/test_http_daemon.py runs
the same against the real daemon with HAProxy, promtool, Chromium and curl.
"""

import base64
import hashlib
import html.parser
import json
import logging
import re
import selectors
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

import hadaemon.base
import hadaemon.config
import hadaemon.netsettings
import hadaemon.configfiles
import hadaemon.ledger
import hadaemon.http_proto
import hadaemon.http_views
import hadaemon.http_server
from conftest import HADAEMON, wait_for

# -- settings: [daemon] http, http_token, http_cert ------------------------------------


def config_dir(tmp_path, daemon_lines, files=None):
    """A config dir whose checks.conf has ``daemon_lines`` in [daemon]; ``files``: name -> (text, mode)."""
    d = tmp_path / "conf"
    (d / "checks").mkdir(parents=True, exist_ok=True)
    check = d / "checks" / "check_a"
    check.write_text("#!/bin/sh\necho state=up\n")
    check.chmod(0o755)
    (d / "checks.conf").write_text("[daemon]\n%s\n[local]\ncheck_a\n" % "\n".join(daemon_lines))
    (d / "actions.conf").write_text("")
    for name, (text, mode) in (files or {}).items():
        path = d / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        path.chmod(mode)
    return d


def config_errors(d):
    with pytest.raises(hadaemon.base.ConfigError) as info:
        hadaemon.configfiles.load_config(str(d))
    return info.value.errors


TOKEN = "s3cret-Token_42"
GOOD_TOKEN = {"http.token": ("\n  %s  \n" % TOKEN, 0o600)}


@pytest.mark.parametrize("text, host, port, loopback", [
    ("127.0.0.1:8642", "127.0.0.1", 8642, True),
    (":8642", "127.0.0.1", 8642, True),
    ("localhost:8642", "127.0.0.1", 8642, True),
    ("[::1]:8642", "::1", 8642, True),
    ("0.0.0.0:8642", "0.0.0.0", 8642, False),
    ("[::]:1", "::", 1, False),
    ("10.1.2.3:65535", "10.1.2.3", 65535, False),
])
def test_http_addresses(text, host, port, loopback):
    address = hadaemon.netsettings.parse_http_address(text)
    assert (address.host, address.port, address.loopback) == (host, port, loopback)
    assert address.url().startswith("http://")


@pytest.mark.parametrize("text, words", [
    ("8642", ["IP:PORT", "8642"]),
    ("db1.example.com:80", ["'db1.example.com' is not an IP address"]),
    ("::1:80", ["not an address with a port"]),
    ("[127.0.0.1]:80", ["brackets are for IPv6"]),
    ("fe80::1]:80", ["not an address"]),
    (":0", ["port 0"]),
    (":70000", ["70000"]),
    ("127.0.0.1:", ["not an address with a port"]),
])
def test_bad_http_addresses(text, words):
    with pytest.raises(ValueError) as info:
        hadaemon.netsettings.parse_http_address(text)
    for word in words:
        assert word in str(info.value)


def test_http_settings_parse(tmp_path):
    d = config_dir(tmp_path, ["http = 0.0.0.0:8642", "http_token = http.token"], GOOD_TOKEN)
    config = hadaemon.configfiles.load_config(str(d))
    assert config.daemon.http.host == "0.0.0.0" and config.daemon.http_token == TOKEN
    assert TOKEN not in repr(config.daemon)            # the token never lands in a repr
    assert hadaemon.configfiles.load_config(str(config_dir(tmp_path / "x", []))).daemon.http is None


# (id, daemon lines, files, the line of the error, words it must contain)
HTTP_MISTAKES = [
    ("non-loopback-without-token", ["http = 0.0.0.0:8642"], {}, 2,
     ["0.0.0.0:8642", "not a loopback address", "http_token"]),
    ("ipv6-any-without-token", ["http = [::]:8642"], {}, 2, ["not a loopback address"]),
    ("bad-address", ["http = somewhere"], {}, 2, ["somewhere", "IP:PORT"]),
    ("two-values", ["http = :1 :2"], {}, 2, ["http takes one value"]),
    ("token-missing", ["http = :8642", "http_token = nope.token"], {}, 3,
     ["http_token = nope.token", "nope.token does not exist"]),
    ("token-empty", ["http = :8642", "http_token = t"], {"t": (" \n\t\n", 0o600)}, 3, ["is empty"]),
    ("token-group-readable", ["http = :8642", "http_token = t"], {"t": (TOKEN, 0o640)}, 3,
     ["readable by group or others", "0640", "chmod 600"]),
    ("token-world-readable", ["http = :8642", "http_token = t"], {"t": (TOKEN, 0o604)}, 3,
     ["readable by group or others"]),
    ("token-two-words", ["http = :8642", "http_token = t"], {"t": ("two words", 0o600)}, 3,
     ["printable ASCII"]),
    ("token-binary", ["http = :8642", "http_token = t"], {"t": (b"\xff\xfe", 0o600)}, 3,
     ["printable ASCII"]),
    ("token-a-directory", ["http = :8642", "http_token = checks"], {}, 3, ["is not a file"]),
    ("token-bad-and-not-loopback", ["http = 0.0.0.0:1", "http_token = t"], {"t": ("", 0o600)}, 3,
     ["is empty"]),
    ("cert-missing", ["http = :8642", "http_cert = none.pem"], {}, 3,
     ["http_cert = none.pem", "none.pem does not exist"]),
    ("cert-not-pem", ["http = :8642", "http_cert = x.pem"], {"x.pem": ("hello\n", 0o600)}, 3,
     ["holds no certificate"]),
]


@pytest.mark.parametrize("case", HTTP_MISTAKES, ids=[c[0] for c in HTTP_MISTAKES])
def test_http_setting_mistakes(tmp_path, case):
    _, lines, files, line, words = case
    d = config_dir(tmp_path, lines, files)
    errors = config_errors(d)
    assert len(errors) == 1, errors
    assert errors[0].startswith("%s:%d: " % (d / "checks.conf", line)), errors
    for word in words:
        assert word in errors[0], errors


def test_every_http_mistake_is_reported_at_once(tmp_path):
    d = config_dir(tmp_path, ["http = 0.0.0.0:99999", "http_token = t", "http_cert = c.pem"],
                   {"t": (TOKEN, 0o644)})
    errors = config_errors(d)
    assert [e.split(": ")[0].rsplit(":", 1)[1] for e in errors] == ["2", "3", "4"], errors


# -- certificates (made by openssl here) --------------------------------------------------

def openssl(*args, cwd):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pems(d):
    """In ``d``, a self-signed certificate for 127.0.0.1 and its friends (PEM texts): key+cert,
    cert alone, key alone, an encrypted key, a key of another certificate; ``ca``: the cert's path."""
    d.mkdir(parents=True, exist_ok=True)
    for name, extra in (("a", ["-nodes"]), ("b", ["-nodes"]), ("enc", ["-passout", "pass:secret"])):
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-days", "2",
                "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                "-keyout", name + ".key", "-out", name + ".crt", *extra, cwd=d)
    texts = {n: (d / n).read_text() for n in ("a.key", "a.crt", "b.key", "enc.key", "enc.crt")}
    return {"good": texts["a.crt"] + texts["a.key"], "cert-only": texts["a.crt"], "key-only": texts["a.key"],
            "encrypted": texts["enc.crt"] + texts["enc.key"], "mismatch": texts["a.crt"] + texts["b.key"],
            "ca": d / "a.crt"}


@pytest.fixture(scope="module")
def pems(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    return make_pems(tmp_path_factory.mktemp("pem"))


@pytest.mark.parametrize("kind, mode, words", [
    ("cert-only", 0o600, ["holds no private key"]),
    ("key-only", 0o600, ["holds no certificate"]),
    ("encrypted", 0o600, ["encrypted", "without a passphrase"]),
    ("mismatch", 0o600, ["not a certificate and key ssl can use", "KEY_VALUES_MISMATCH"]),
    ("good", 0o640, ["readable by group or others"]),
    ("good", 0o644, ["readable by group or others"]),
])
def test_http_cert_mistakes(tmp_path, pems, kind, mode, words):
    d = config_dir(tmp_path, ["http = :8642", "http_cert = http.pem"], {"http.pem": (pems[kind], mode)})
    errors = config_errors(d)
    assert len(errors) == 1 and errors[0].startswith("%s:3: http_cert = http.pem: " % (d / "checks.conf")), errors
    for word in words:
        assert word in errors[0], errors


def test_http_cert_good(tmp_path, pems):
    d = config_dir(tmp_path, ["http = :8642", "http_cert = http.pem"], {"http.pem": (pems["good"], 0o600)})
    assert hadaemon.configfiles.load_config(str(d)).daemon.http_cert == str(d / "http.pem")


def test_check_config_finds_http_mistakes(tmp_path):
    d = config_dir(tmp_path, ["http = 0.0.0.0:8642", "http_token = t"], {"t": (TOKEN, 0o644)})
    result = subprocess.run([sys.executable, str(HADAEMON), "--config-dir", str(d), "--check-config"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "%s:3: http_token = t:" % (d / "checks.conf") in result.stderr
    assert "readable by group or others" in result.stderr and TOKEN not in result.stderr + result.stdout


# -- the request parser -------------------------------------------------------------------

def read_all(chunks):
    """Feed chunks one by one, taking requests as they complete; (requests, error or None)."""
    reader, got = hadaemon.http_proto.RequestReader(), []
    try:
        for chunk in chunks:
            reader.feed(chunk)
            while True:
                request = reader.next_request()
                if request is None:
                    break
                got.append(request)
    except hadaemon.http_proto.HttpError as exc:
        return got, exc
    return got, None


def summary(request):
    return (request.method, request.path, request.query, request.version, request.keep_alive,
            request.headers)


STREAMS = [
    b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET /hosts/db1/master HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nX-A: 1\r\nX-A: 2\r\nUser-Agent:   curl/8  \r\n\r\nGET /metrics HTTP/1.1\r\n\r\n",
    b"GET /history?n=5&x=%41 HTTP/1.1\nHost: bare-newlines\n\n",
    b"\r\n\r\nOPTIONS * HTTP/1.0\r\n\r\n",
    b"POST /pause HTTP/1.1\r\nContent-Length: 0\r\n\r\nGET http://h:1/status?n=2 HTTP/1.1\r\n\r\n",
]


@pytest.mark.parametrize("stream", STREAMS)
def test_split_at_every_byte_reads_the_same(stream):
    whole, error = read_all([stream])
    assert error is None and whole
    for cut in range(1, len(stream)):
        got, error = read_all([stream[:cut], stream[cut:]])
        assert error is None and list(map(summary, got)) == list(map(summary, whole)), cut
    got, error = read_all([stream[i:i + 1] for i in range(len(stream))])
    assert list(map(summary, got)) == list(map(summary, whole))


def test_what_the_parser_makes_of_a_request():
    (a, b), _ = read_all([STREAMS[2]])
    assert (a.method, a.path, a.version, a.keep_alive) == ("HEAD", (), (1, 1), True)
    assert a.headers == {"x-a": "1, 2", "user-agent": "curl/8"}
    assert (b.method, b.path) == ("GET", ("metrics",))
    (c,), _ = read_all([STREAMS[3]])
    assert c.path == ("history",) and c.query == {"n": "5", "x": "A"}
    (d,), _ = read_all([STREAMS[4]])
    assert (d.method, d.path, d.keep_alive) == ("OPTIONS", (), False)
    (e, f), _ = read_all([STREAMS[5]])
    assert e.method == "POST" and f.path == ("status",) and f.query == {"n": "2"}
    (g,), _ = read_all([b"GET /hosts/a%2Fb/x%20y HTTP/1.1\r\n\r\n"])
    assert g.path == ("hosts", "a/b", "x y")      # a %2F is part of a segment, not a separator


@pytest.mark.parametrize("head, keep_alive", [
    (b"GET / HTTP/1.1\r\n\r\n", True),
    (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", False),
    (b"GET / HTTP/1.1\r\nConnection: Upgrade, Close\r\n\r\n", False),
    (b"GET / HTTP/1.0\r\n\r\n", False),
    (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", True),
])
def test_keep_alive_rules(head, keep_alive):
    (request,), _ = read_all([head])
    assert request.keep_alive is keep_alive


def line_of(size):
    """A request line of exactly ``size`` bytes, CRLF included."""
    fixed = len(b"GET / HTTP/1.1\r\n")
    return b"GET /" + b"a" * (size - fixed) + b" HTTP/1.1\r\n"


LIMIT_CASES = [
    (line_of(8190) + b"\r\n", None),                            # 8192 with the blank line: the limit
    (line_of(8191) + b"\r\n", 431),
    (line_of(100) + b"X: " + b"y" * 8100 + b"\r\n\r\n", 431),
    (b"GET /" + b"a" * 9000, 414),                              # no end of line within 8 KiB
    (b"GET /" + b"a" * (1 << 20) + b" HTTP/1.1\r\n\r\n", 414),
    (b"POST /pause HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 413),
    (b"POST /pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 413),
    (b"GET / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    (b"GET /\r\n\r\n", 400),                                   # HTTP/0.9
    (b"GET  / HTTP/1.1\r\n\r\n", 400),
    (b"get / http/1.1\r\n\r\n", 400),
    (b"GET status HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nNo colon\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX : space before colon\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: nul\x00inside\r\n\r\n", 400),
    (b"GET /%ff%fe HTTP/1.1\r\n\r\n", 400),
    (b"GET /\xc3\xa9 HTTP/1.1\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) + b"\r\n\r\n", 400),
]


@pytest.mark.parametrize("stream, status", LIMIT_CASES,
                         ids=["%d-%s" % (i, case[1]) for i, case in enumerate(LIMIT_CASES)])
def test_limits_and_malformed_requests(stream, status):
    got, error = read_all([stream])
    if status is None:
        assert error is None and len(got) == 1
    else:
        assert error is not None and (error.status, error.close) == (status, True), (error, got)


def test_the_limit_holds_whatever_the_chunks():
    """Half a megabyte in one byte, then 1 KiB chunks: refused as soon as 8 KiB are in."""
    reader = hadaemon.http_proto.RequestReader()
    reader.feed(b"G")
    assert reader.next_request() is None and reader.started()
    with pytest.raises(hadaemon.http_proto.HttpError) as info:
        for _ in range(512):
            reader.feed(b"x" * 1024)
            reader.next_request()
    assert info.value.status == 414 and len(reader.buf) <= hadaemon.http_proto.HTTP_HEAD_MAX + 1024


def requests_or_an_http_error(chunks):
    reader = hadaemon.http_proto.RequestReader()
    for chunk in chunks:
        reader.feed(chunk)
        try:
            while reader.next_request() is not None:
                pass
        except hadaemon.http_proto.HttpError as exc:
            assert exc.status in (400, 413, 414, 431, 505)
            return
        assert len(reader.buf) < hadaemon.http_proto.HTTP_HEAD_MAX


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_any_bytes_give_requests_or_an_http_error(chunks):
    requests_or_an_http_error(chunks)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"GET", b" ", b"/", b"status", b"HTTP/1.1", b"\r\n", b"\n", b":",
                                 b"Host", b"%", b"?n=", b"1", b"\t", b"Connection: close"]),
                max_size=30))
def test_near_http_gives_requests_or_an_http_error(parts):
    requests_or_an_http_error([b"".join(parts)])


# -- the answers ----------------------------------------------------------------------------

def sample_doc():
    """A status document shaped like the daemon's, with hostile text where text may be."""
    now = time.time()
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)> & \'q\''
    return {
        "daemon": {"running": True, "pid": 4242, "version": hadaemon.base.__version__, "started": now - 300,
                   "uptime": 300.0, "config_dir": "/etc/ha<daemon>", "state_dir": "/var/lib/ha",
                   "paused": False, "queue": [7], "action_pid": None, "ssh": [],
                   "workers": [{"pid": 1, "state": "idle"}, {"pid": 2, "state": "busy"}],
                   "lag_ms": {"p50": 0.4, "p99": 3.5, "max": 9.0, "samples": 100, "count": 1234,
                              "sum": 567.5},
                   "counters": {"transitions": [{"host": "db1", "from": "unknown", "to": "master",
                                                 "count": 1},
                                                {"host": "db2", "from": "slave", "to": "master", "count": 2}],
                                "action_runs": [{"section": "any_to_master", "result": "ok", "count": 2},
                                                {"section": 'db2: "x"\\y', "result": "failed", "count": 1}],
                                "notify_events": [{"result": "ok", "count": 5}, {"result": "failed", "count": 1},
                                                  {"result": "dropped", "count": 0}],
                                "notify_waiting": 3}},
        "hosts": {
            "db1": {"state": "master", "since": now - 120, "pending": None,
                    "last_report": {"time": now - 1, "check": "check_role db1", "state": "master"}},
            "db2": {"state": "slave", "since": now - 100, "pending": {"state": "down", "count": 2},
                    "last_report": {"time": now - 2, "check": "check_role db2", "state": "down"}},
        },
        "checks": [
            {"key": 'local|db1|check_role db1', "name": "check_role db1", "scope": "local", "host": "db1",
             "where": "/etc/ha/checks.conf:5", "schedule": "every 1s", "next_run": now + 0.5,
             "running": False, "runs": 120, "skipped": 1,
             "last": {"time": now - 1, "duration": 0.012, "exit": 0, "signal": None,
                      "reports": {"db1": "master"}, "message": evil, "attributes": {}, "rejected": []}},
            {"key": 'local|db2|check "x"\\y\nz', "name": 'check "x"\\y', "scope": "local", "host": "db2",
             "where": "/etc/ha/checks.conf:6", "schedule": "every 1s", "next_run": now + 0.2,
             "running": True, "runs": 0, "skipped": 0, "last": None},
        ],
        "transitions": [{"id": 2, "time": now - 100, "host": "db2", "from": "unknown", "to": "slave",
                         "check": "check_role db2", "run": None},
                        {"id": 1, "time": now - 120, "host": "db1", "from": "unknown", "to": "master",
                         "check": evil, "run": 1}],
        "runs": [{"id": 1, "transition": 1, "host": "db1", "from": "unknown", "to": "master",
                  "section": "any_to_master", "state": "failed", "reason": evil, "queued": now - 120,
                  "started": now - 119.9, "ended": now - 119.5,
                  "commands": [{"argv": ["/x/act", evil], "ignore": False, "where": "a:1",
                                "started": now - 119.9, "result": {"exit": 1}}]}],
    }


class FakeApp:
    def __init__(self, doc=None):
        self.doc = doc or sample_doc()
        self.paused = False

    def document(self):
        return self.doc

    def host(self, name):
        return self.doc["hosts"].get(name)

    def history(self, n):
        return self.doc["transitions"][:n]

    def pause(self, flag):
        self.paused = flag
        return flag


def request(method, target, headers=()):
    head = "%s %s HTTP/1.1\r\n%s\r\n" % (method, target, "".join("%s: %s\r\n" % h for h in headers))
    (req,), _ = read_all([head.encode()])
    return req


def route(method, target, writable=False, app=None):
    return hadaemon.http_views.http_route(request(method, target), app or FakeApp(), writable)


@pytest.mark.parametrize("method, target, status, ctype", [
    ("GET", "/", 200, "text/html; charset=utf-8"),
    ("GET", "/status", 200, "application/json"),
    ("GET", "/status?pretty=1", 200, "application/json"),
    ("GET", "/history", 200, "application/json"),
    ("GET", "/history?n=1", 200, "application/json"),
    ("GET", "/history?n=x", 400, "application/json"),
    ("GET", "/history?n=-1", 400, "application/json"),
    ("GET", "/metrics", 200, "text/plain; version=0.0.4; charset=utf-8"),
    ("GET", "/hosts/db1", 200, "application/json"),
    ("GET", "/hosts/db1/master", 200, "application/json"),
    ("GET", "/hosts/db1/MASTER", 200, "application/json"),
    ("GET", "/hosts/db2/master", 503, "application/json"),
    ("GET", "/hosts/db9", 404, "application/json"),
    ("GET", "/hosts/db9/master", 404, "application/json"),
    ("GET", "/hosts/", 404, "application/json"),
    ("GET", "/hosts/db1/master/x", 404, "application/json"),
    ("GET", "/nothing", 404, "application/json"),
    ("GET", "/status/", 404, "application/json"),
    ("POST", "/pause", 403, "application/json"),
    ("GET", "/pause", 405, "application/json"),
    ("POST", "/status", 405, "application/json"),
    ("DELETE", "/", 405, "application/json"),
    ("BREW", "/hosts/db1", 405, "application/json"),
])
def test_routes(method, target, status, ctype):
    answer = route(method, target)
    assert (answer.status, answer.content_type) == (status, ctype)
    if status >= 400 and status != 503:
        assert set(json.loads(answer.body)) == {"error"}


def test_route_bodies():
    app = FakeApp()
    assert json.loads(route("GET", "/status", app=app).body) == app.doc
    assert len(json.loads(route("GET", "/history?n=1", app=app).body)) == 1
    assert len(json.loads(route("GET", "/history", app=app).body)) == 2
    host = json.loads(route("GET", "/hosts/db2/master", app=app).body)
    assert list(host) == ["host", "state", "since", "pending", "last_report"]
    assert host["host"] == "db2" and host["pending"] == {"state": "down", "count": 2}
    assert dict(route("GET", "/pause").headers)["Allow"] == "POST"
    assert dict(route("PUT", "/status").headers)["Allow"] == "GET, HEAD, OPTIONS"
    assert json.loads(route("POST", "/pause", writable=True, app=app).body) == {"paused": True}
    assert app.paused is True
    assert json.loads(route("POST", "/resume", writable=True, app=app).body) == {"paused": False}


ONE_APP = FakeApp()


def encoded(method, target, keep_alive=True, version=(1, 1)):
    answer = route("GET" if method in ("HEAD", "OPTIONS") else method, target, app=ONE_APP)
    return answer, hadaemon.http_proto.encode_answer(answer, method, version, keep_alive, now=0)


def split_answer(raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    return lines[0], dict(line.split(": ", 1) for line in lines[1:]), body


@pytest.mark.parametrize("target", ["/", "/status", "/hosts/db2/master", "/metrics", "/nothing"])
def test_head_and_options_are_get_without_the_body(target):
    answer, get = encoded("GET", target)
    status, headers, body = split_answer(get)
    assert status.startswith("HTTP/1.1 %d " % answer.status) and body == answer.body
    assert int(headers["Content-Length"]) == len(body)
    for name in ("Content-Type", "Content-Length", "Cache-Control", "Date"):
        assert name in headers
    assert headers["Cache-Control"] == "no-store" and headers["Date"] == "Thu, 01 Jan 1970 00:00:00 GMT"
    for method in ("HEAD", "OPTIONS"):
        _, raw = encoded(method, target)
        assert raw == get[:len(get) - len(body)]


def test_connection_headers():
    assert split_answer(encoded("GET", "/status", keep_alive=False)[1])[1]["Connection"] == "close"
    assert "Connection" not in split_answer(encoded("GET", "/status")[1])[1]
    assert split_answer(encoded("GET", "/status", version=(1, 0))[1])[1]["Connection"] == "keep-alive"


class Server:
    """HttpServer on a selector driven by a thread of the test: the loop the master runs."""

    def __init__(self, app=None, token=None, cert=None, address="127.0.0.1:0"):
        self.app = app or FakeApp()
        self.sel = selectors.DefaultSelector()
        self.http = hadaemon.http_server.HttpServer(self.sel, self.app)
        self.lock = threading.Lock()
        self.passes = 0
        self.slowest = 0.0
        self.configure(address, token, cert)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def configure(self, address, token=None, cert=None):
        if address.endswith(":0"):
            address = address[:-1] + str(free_port())
        settings = hadaemon.config.DaemonSettings(http=hadaemon.netsettings.parse_http_address(address),
                                           http_token=token, http_cert=cert)
        with self.lock:
            self.http.configure(settings)
        self.port = self.http.address.port

    def loop(self):
        while not self.stop.is_set():
            with self.lock:
                started = time.monotonic()
                for key, mask in self.sel.select(0.05):
                    key.data(mask)
                self.http.tick(time.monotonic())
                self.passes += 1
                self.slowest = max(self.slowest, time.monotonic() - started)

    def close(self):
        self.stop.set()
        self.thread.join(10)
        self.http.close()
        self.sel.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(hadaemon.http_server, "HTTP_REQUEST_TIME", 1.0)
    monkeypatch.setattr(hadaemon.http_server, "HTTP_IDLE", 1.0)
    monkeypatch.setattr(hadaemon.http_server, "HTTP_SEND_TIME", 1.0)
    made = []

    def make(**kw):
        made.append(Server(**kw))
        return made[-1]
    yield make
    for s in made:
        s.close()


class Client:
    """A raw HTTP/1.1 client on one connection: what is sent is exactly what the test says."""

    def __init__(self, port=None, sock=None, timeout=5.0):
        self.sock = sock or socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()

    def send(self, data):
        self.sock.sendall(data)

    def _more(self):
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return chunk

    def answer(self, method="GET"):
        """The next answer: (status, headers, body); None when the server closed first."""
        while b"\r\n\r\n" not in self.buf:
            if not self._more():
                return None
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status, headers, _ = split_answer(head + b"\r\n\r\n")
        length = 0 if method in ("HEAD", "OPTIONS") else int(headers["Content-Length"])
        while len(self.buf) < length:
            assert self._more(), "closed in the middle of a body"
        body, self.buf = self.buf[:length], self.buf[length:]
        return int(status.split()[1]), headers, body

    def closed(self, timeout=5.0):
        """True when the server ends the connection (EOF or reset) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while self._more():
                pass
        except ConnectionResetError:
            pass
        except socket.timeout:
            return False
        return True


def get(port, target, headers=(), method="GET"):
    with Client(port) as client:
        client.send(("%s %s HTTP/1.1\r\nConnection: close\r\n%s\r\n"
                     % (method, target, "".join("%s: %s\r\n" % h for h in headers))).encode())
        return client.answer(method)


def test_keep_alive_and_pipelining(server):
    s = server()
    with Client(s.port) as client:
        for target in (b"/status", b"/hosts/db1/master", b"/metrics"):
            client.send(b"GET %s HTTP/1.1\r\nHost: localhost:8642\r\n\r\n" % target)
            status, headers, body = client.answer()
            assert status == 200 and "Connection" not in headers
        client.send(b"GET /hosts/db2/master HTTP/1.1\r\n\r\nHEAD / HTTP/1.1\r\n\r\n"
                    b"GET /nothing HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert client.answer()[0] == 503
        assert client.answer("HEAD")[0] == 200
        status, headers, _ = client.answer()
        assert status == 404 and headers["Connection"] == "close"
        assert client.closed()
    with Client(s.port) as client:
        client.send(b"GET /status HTTP/1.0\r\n\r\n")
        assert client.answer()[1]["Connection"] == "close" and client.closed()


def _send_quietly(client, payload):
    try:
        client.send(payload)
    except OSError:
        pass


@pytest.mark.parametrize("payload, status", [
    (b"GET /" + b"a" * (1 << 20) + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"b" * 9000 + b"\r\n\r\n", 431),
    (b"POST /pause HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n" + b"z" * 1000000, 413),
    (bytes(range(256)) * 4 + b"\r\n\r\n", 400),
], ids=["1MB-request-line", "9KB-header", "1MB-body", "binary"])
def test_bad_requests_get_their_answer_then_a_close(server, payload, status):
    s = server()
    with Client(s.port) as client:
        sender = threading.Thread(target=_send_quietly, args=(client, payload), daemon=True)
        sender.start()
        sender.join(10)         # all sent before a byte is read: a reset would lose the answer
        answer = client.answer()
        assert answer is not None and answer[0] == status, answer
        assert answer[1]["Connection"] == "close" and "error" in json.loads(answer[2])
        assert client.closed()
    assert get(s.port, "/status")[0] == 200


def test_half_sent_requests_time_out_with_408_and_idle_ones_close(server):
    s = server()
    with Client(s.port) as half, Client(s.port) as idle:
        half.send(b"GET /status HTTP/1.1\r\nHost:")
        answer = half.answer()
        assert answer is not None and answer[0] == 408
        assert idle.closed(timeout=3)


def test_resetting_clients(server):
    s = server()
    for payload in (b"", b"GET /status HTTP/1.1\r\n\r\n", b"GET /sta"):
        client = Client(s.port)
        client.send(payload)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.sock.close()                 # SO_LINGER 0: a reset, not a FIN
    assert get(s.port, "/hosts/db1/master")[0] == 200
    wait_for(lambda: not s.http.conns, timeout=5, what="the reset connections to be gone")


def test_64_connections_at_most_the_oldest_waiting_one_goes(server, monkeypatch):
    monkeypatch.setattr(hadaemon.http_server, "HTTP_REQUEST_TIME", 30.0)     # no 408 here: only the limit acts
    s = server()
    clients = [Client(s.port) for _ in range(hadaemon.http_proto.HTTP_MAX_CONNS)]
    try:
        for client in clients:
            client.send(b"GET /status HTTP/1.1\r\n")       # half-sent, all of them
        wait_for(lambda: len(s.http.conns) == hadaemon.http_proto.HTTP_MAX_CONNS, timeout=5, what="64 connections")
        assert get(s.port, "/hosts/db1/master")[0] == 200    # one more still gets its answer
        assert clients[0].answer() is None                   # the first, half-sent longest, went
        clients[1].send(b"\r\n")                            # the second is still there
        assert clients[1].answer()[0] == 200
        assert len(s.http.conns) <= hadaemon.http_proto.HTTP_MAX_CONNS
    finally:
        for client in clients:
            client.sock.close()


def test_an_answer_nobody_reads_is_dropped(server):
    doc = sample_doc()
    doc["checks"][0]["last"]["message"] = "m" * (8 << 20)
    s = server(app=FakeApp(doc))
    with Client(s.port) as client:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.send(b"GET /status HTTP/1.1\r\n\r\n")
        wait_for(lambda: any(c.out for c in list(s.http.conns.values())), timeout=5,
                 what="an answer waiting")
        wait_for(lambda: not s.http.conns, timeout=5, what="the unread answer to be dropped")
    assert get(s.port, "/hosts/db1")[0] == 200


# -- the token ---------------------------------------------------------------------------------

def basic(user, password):
    return "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()


@pytest.mark.parametrize("authorization, ok", [
    (None, False),
    ("Bearer " + TOKEN, True),
    ("bearer   " + TOKEN, True),
    ("Bearer " + TOKEN + "x", False),
    ("Bearer " + TOKEN[:-1], False),
    (basic("anyone", TOKEN), True),
    (basic("", TOKEN), True),
    (basic(TOKEN, "nope"), False),
    ("Basic " + base64.b64encode(TOKEN.encode()).decode(), False),     # no colon: no password
    ("Basic !!!not-base64", False),
    (TOKEN, False),
    ("Digest " + TOKEN, False),
])
def test_token(server, caplog, authorization, ok):
    s = server(token=TOKEN)
    headers = [("Authorization", authorization)] if authorization else []
    with caplog.at_level(logging.DEBUG, logger="hadaemon"):
        status, answer_headers, body = get(s.port, "/hosts/db1/master", headers)
    if ok:
        assert status == 200
    else:
        assert status == 401 and answer_headers["WWW-Authenticate"] == 'Basic realm="hadaemon"'
        assert "refused GET '/hosts/db1/master' from 127.0.0.1" in caplog.text
    assert TOKEN not in caplog.text and TOKEN not in body.decode()


def test_refused_tokens_are_logged_once_a_minute_per_address(caplog):
    http = hadaemon.http_server.HttpServer(selectors.DefaultSelector(), FakeApp())
    http.token = TOKEN
    bad = request("GET", "/status", [("Authorization", "Bearer wrong")])
    with caplog.at_level(logging.WARNING, logger="hadaemon"):
        for now, peer in ((100.0, "10.0.0.1"), (130.0, "10.0.0.1"), (159.0, "10.0.0.1"),
                          (130.0, "10.0.0.2"), (161.0, "10.0.0.1")):
            assert http.answer(bad, peer, now).status == 401
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert [line.split(" from ")[1].split(":")[0] for line in lines] == ["10.0.0.1", "10.0.0.2", "10.0.0.1"]
    assert all("wrong token" in line for line in lines)


def test_pause_needs_the_token(server):
    app = FakeApp()
    s = server(app=app, token=TOKEN)
    auth = [("Authorization", "Bearer " + TOKEN), ("Content-Length", "0")]
    assert get(s.port, "/pause", auth, method="POST")[0] == 200 and app.paused
    assert get(s.port, "/resume", [("Content-Length", "0")], method="POST")[0] == 401 and app.paused
    assert json.loads(get(s.port, "/resume", auth, method="POST")[2]) == {"paused": False}


# -- HTTPS ------------------------------------------------------------------------------------

def test_https(server, pems, tmp_path):
    pem = tmp_path / "http.pem"
    pem.write_text(pems["good"])
    pem.chmod(0o600)
    s = server(cert=str(pem))
    assert s.http.url.startswith("https://127.0.0.1:")
    context = ssl.create_default_context(cafile=str(pems["ca"]))
    with Client(s.port) as silent, Client(s.port) as plain:
        plain.send(b"GET / HTTP/1.1\r\n\r\n")       # plain HTTP to the TLS port
        # ``silent`` connects and says nothing: the loop goes on serving the others.
        for _ in range(3):
            tls = context.wrap_socket(socket.create_connection(("127.0.0.1", s.port), timeout=5),
                                      server_hostname="127.0.0.1")
            with Client(sock=tls) as client:
                client.send(b"GET /hosts/db1/master HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\n"
                            b"Connection: close\r\n\r\n")
                assert client.answer()[0] == 200
                status, _, body = client.answer()
                assert status == 200 and b"hadaemon_up 1" in body
        assert plain.closed(timeout=3)
        assert silent.closed(timeout=3)           # the handshake has HTTP_REQUEST_TIME too
    assert s.slowest < 0.5, "a pass of the loop took %.3fs" % s.slowest


# -- reconfiguring ----------------------------------------------------------------------------

def test_reconfigure_moves_keeps_or_refuses(server):
    s = server()
    first = s.port
    assert get(first, "/status")[0] == 200
    s.configure("0.0.0.0:%d" % first, token=TOKEN)       # same port, wider address: the old one let go
    assert get(first, "/status")[0] == 401
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = busy.getsockname()[1]
        with pytest.raises(hadaemon.base.HadaemonError) as info:
            s.configure("127.0.0.1:%d" % taken)
        assert "http://127.0.0.1:%d/" % taken in str(info.value) and "in use" in str(info.value)
        assert s.http.address.port == first
        assert get(first, "/status", [("Authorization", "Bearer " + TOKEN)])[0] == 200   # old one kept
    s.configure("127.0.0.1:0")
    assert s.port != first and get(s.port, "/status")[0] == 200
    with pytest.raises(OSError):
        get(first, "/status")
    with s.lock:
        s.http.configure(hadaemon.config.DaemonSettings())
    assert s.http.url is None and s.http.listener is None


# -- the page -----------------------------------------------------------------------------------

def test_the_style_hash_in_the_policy_is_the_style_sheets():
    digest = base64.b64encode(hashlib.sha256(hadaemon.http_views.PAGE_CSS.encode()).digest()).decode()
    assert hadaemon.http_views.PAGE_CSS_SHA256 == digest
    assert "style-src 'sha256-%s'" % digest in hadaemon.http_views.PAGE_CSP
    assert "default-src 'none'" in hadaemon.http_views.PAGE_CSP and "script-src" not in hadaemon.http_views.PAGE_CSP


class PageTags(html.parser.HTMLParser):
    """Every tag and attribute name in a page, as a browser's tokenizer sees them."""

    def __init__(self):
        super().__init__()
        self.names, self.attributes = set(), set()

    def handle_starttag(self, tag, attrs):
        self.names.add(tag)
        self.attributes.update(name for name, _ in attrs)


def test_page_escapes_everything_and_loads_nothing():
    page = hadaemon.http_views.render_page(sample_doc())
    tags = PageTags()
    tags.feed(page)
    assert tags.names <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "span", "div", "table",
                          "thead", "tbody", "tr", "th", "td", "footer", "a"}, tags.names
    assert not [a for a in tags.attributes if a.startswith("on") or a == "src"], tags.attributes
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "/etc/ha&lt;daemon&gt;" in page
    assert page.count("<style>") == 1 and "<style>%s</style>" % hadaemon.http_views.PAGE_CSS in page
    assert not re.search(r"\sstyle=", page)                     # the policy would block it
    assert not re.search(r"(src|href)=\"?(https?:)?//", page)     # nothing from elsewhere
    assert re.findall(r'href="([^"]*)"', page) == ["status", "history", "metrics"]
    assert '<meta http-equiv="refresh" content="2">' in page


def test_page_shows_states_pending_checks_and_history():
    page = hadaemon.http_views.render_page(sample_doc())
    assert '<span class="s good">master</span>' in page
    assert '<span class="s standby">slave</span>' in page
    assert '<span class="s bad">down</span> &times;2' in page            # db2's pending candidate
    assert "check_role db1" in page and "every 1s" in page and "(2m ago)" in page
    assert "ACTIONS PAUSED" not in page and "actions enabled" in page
    doc = sample_doc()
    doc["daemon"]["paused"] = True
    assert "ACTIONS PAUSED" in hadaemon.http_views.render_page(doc)
    empty = {"daemon": dict(doc["daemon"], running=False), "hosts": {}, "checks": [], "transitions": [],
             "runs": []}
    assert "no host has reported yet" in hadaemon.http_views.render_page(empty)


# -- the metrics ----------------------------------------------------------------------------------

METRIC_LINE = re.compile(r'([a-z_:][a-z0-9_:]*)(\{(?:[a-z_]+="(?:[^"\\\n]|\\[\\"n])*",?)*\})? (\S+)\Z')


def parse_metrics(text):
    families, samples = {}, []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            families[name] = kind
        elif line.startswith("# HELP ") or not line:
            continue
        else:
            m = METRIC_LINE.match(line)
            assert m, "not a sample line: %r" % line
            float(m.group(3))
            samples.append((m.group(1), m.group(2) or "", m.group(3)))
    return families, samples


SPEC_FAMILIES = {
    "hadaemon_up": "gauge", "hadaemon_info": "gauge", "hadaemon_host_state": "gauge",
    "hadaemon_host_state_since_seconds": "gauge", "hadaemon_transitions_total": "counter",
    "hadaemon_action_runs_total": "counter", "hadaemon_check_runs_total": "counter",
    "hadaemon_check_skipped_total": "counter", "hadaemon_check_duration_seconds": "gauge",
    "hadaemon_schedule_lag_seconds": "summary", "hadaemon_action_queue_length": "gauge",
    "hadaemon_actions_paused": "gauge", "hadaemon_workers": "gauge",
    "hadaemon_notify_events_total": "counter", "hadaemon_notify_waiting": "gauge",
    "hadaemon_host_paused": "gauge",            # SPEC §12: --pause HOST
}


def test_metrics_families_and_values():
    text = hadaemon.http_views.render_metrics(sample_doc())
    families, samples = parse_metrics(text)
    assert families == SPEC_FAMILIES
    values = {name + labels: value for name, labels, value in samples}
    assert values['hadaemon_info{version="%s"}' % hadaemon.base.__version__] == "1"
    assert values['hadaemon_host_state{host="db2",state="slave"}'] == "1"
    assert values['hadaemon_transitions_total{host="db2",from="slave",to="master"}'] == "2"
    assert values['hadaemon_action_runs_total{section="db2: \\"x\\"\\\\y",result="failed"}'] == "1"
    assert values['hadaemon_check_runs_total{check="check \\"x\\"\\\\y",scope="local",host="db2"}'] == "0"
    assert values['hadaemon_schedule_lag_seconds{quantile="0.99"}'] == "0.0035"
    doc = sample_doc()
    doc["daemon"]["lag_ms"]["p50"] = 1.114              # / 1000: 0.0011140000000000002 in floats
    assert 'hadaemon_schedule_lag_seconds{quantile="0.5"} 0.001114\n' in hadaemon.http_views.render_metrics(doc)
    assert values["hadaemon_schedule_lag_seconds_count"] == "1234"
    assert values["hadaemon_schedule_lag_seconds_sum"] == "0.5675"
    assert values["hadaemon_action_queue_length"] == "1" and values["hadaemon_actions_paused"] == "0"
    assert [values['hadaemon_workers{state="%s"}' % s] for s in ("busy", "idle", "starting")] == ["1", "1", "0"]
    assert 'hadaemon_check_duration_seconds{check="check \\"x' not in text     # never ran: no sample
    assert [values['hadaemon_notify_events_total{result="%s"}' % r] for r in ("ok", "failed", "dropped")] \
        == ["5", "1", "0"] and values["hadaemon_notify_waiting"] == "3"


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool is not installed (Debian: prometheus)")
def test_promtool_accepts_the_metrics():
    result = subprocess.run(["promtool", "check", "metrics"], input=hadaemon.http_views.render_metrics(sample_doc()),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), \
        result.stdout + result.stderr


def test_metrics_of_a_document_without_counters():
    doc = sample_doc()
    del doc["daemon"]["counters"]
    doc["daemon"]["lag_ms"] = None
    families, samples = parse_metrics(hadaemon.http_views.render_metrics(doc))
    assert families == SPEC_FAMILIES
    assert not [s for s in samples if s[0].startswith(("hadaemon_transitions", "hadaemon_schedule_lag",
                                                       "hadaemon_notify"))]


def test_http_date_ignores_the_locale():
    assert hadaemon.http_proto.http_date(0) == "Thu, 01 Jan 1970 00:00:00 GMT"
    assert hadaemon.http_proto.http_date(1796160454) == time.strftime("%a, %d %b %Y %H:%M:%S GMT",
                                                          time.gmtime(1796160454))


def test_no_answer_carries_a_runs_environment():
    """The document's runs are summaries: the env a run got (HA_* and the daemon's) stays out."""
    assert "env" not in hadaemon.ledger.summarize_run({"id": 1, "env": {"SECRET": "x"}, "commands": []})


@pytest.mark.parametrize("host, status", [
    (None, 200), ("127.0.0.1", 200), ("127.0.0.1:8642", 200), ("[::1]:8642", 200), ("localhost", 200),
    ("LOCALHOST:1", 200), ("db-watch.localhost:80", 200),
    ("attacker.example:8642", 403), ("attacker.example", 403), ("127.0.0.1.nip.io", 403), ("", 403),
])
def test_without_a_token_a_host_header_must_be_an_address(host, status):
    """DNS rebinding: a page from elsewhere that points its own name at 127.0.0.1 reads nothing."""
    http = hadaemon.http_server.HttpServer(selectors.DefaultSelector(), FakeApp())
    headers = [("Host", host)] if host is not None else []
    assert http.answer(request("GET", "/status", headers), "127.0.0.1", 0.0).status == status
    http.token = TOKEN                  # with a token the Host does not matter
    headers.append(("Authorization", "Bearer " + TOKEN))
    assert http.answer(request("GET", "/status", headers), "127.0.0.1", 0.0).status == 200


def test_answering_is_bounded_per_pass_and_to_a_share_of_the_time(server):
    """A flood of costly requests is answered a few milliseconds per pass of the loop, and
    for HTTP_SHARE of the time over all: the master's other work and the workers come
    between.  Here each answer takes 20 ms: one a pass, and 80 ms apart at the least."""
    passes, costs = [], []

    class SlowApp(FakeApp):
        def document(self):
            passes.append(s.passes)
            started = time.monotonic()
            time.sleep(0.02)
            costs.append(time.monotonic() - started)
            return self.doc
    s = server(app=SlowApp())
    clients = [Client(s.port) for _ in range(3)]
    try:
        started = time.monotonic()
        for client in clients:
            client.send(b"GET /status HTTP/1.1\r\n\r\n" * 3)
        for client in clients:
            assert [client.answer()[0] for _ in range(3)] == [200] * 3
        elapsed = time.monotonic() - started
    finally:
        for client in clients:
            client.sock.close()
    assert len(passes) == 9 and len(set(passes)) == 9, passes
    # Credit: HTTP_PASS_BUDGET to start with, HTTP_SHARE of the time since, one answer over.
    assert sum(costs) <= hadaemon.http_proto.HTTP_PASS_BUDGET + hadaemon.http_proto.HTTP_SHARE * elapsed + max(costs), \
        (sum(costs), elapsed)
