"""SPEC §9 end to end: the real daemon's HTTP server, and the real clients around it.

HAProxy routes a TCP frontend to whichever backend the daemon says is master;
promtool reads /metrics; headless Chromium renders the page (and, when asked,
writes the README's screenshot); curl speaks Bearer, Basic and HTTPS.  Then the
server is fed what a hostile network sends while a check keeps its schedule.
Every client is a Debian package (tests/run installs them); a test skips when its
client is missing.  Every process started here is killed at teardown by its pid.
"""

import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import textwrap
import threading
import time

import pytest

from conftest import ROOT, figure, wait_for
from test_http import Client, get, make_pems, parse_metrics

TOKEN = "e2e-Token-77"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def role_and_message_check(d):
    """checks/check_role HOST: the state in world/HOST, the message in world/HOST.message."""
    return d.script("checks/check_role", """
        echo "host=$1"
        if [ -f "%(w)s/$1" ]; then echo "state=$(cat "%(w)s/$1")"; else echo "state=down"; fi
        [ -f "%(w)s/$1.message" ] && echo "message=$(cat "%(w)s/$1.message")"
        exit 0
    """ % {"w": d.world})


def http_setup(d, interval="200ms", extra=(), actions="[any_to_master]\nrecord %HOST%\n", groups=""):
    """db1 master, db2 slave, the HTTP server on a free loopback port; returns the port."""
    port = free_port()
    role_and_message_check(d)
    d.recorder()
    d.write("checks.conf", "[daemon]\nworkers = 2\nhttp = 127.0.0.1:%d\n%s\n[local]\ninterval = %s\n"
                           "check_role db1\ncheck_role db2\n%s" % (port, "\n".join(extra), interval, groups))
    d.write("actions.conf", actions)
    d.set("db1", "master")
    d.set("db2", "slave")
    return port


def start_with_http(d, port, scheme="http"):
    d.start()
    d.wait_state("db1", "master")
    d.wait_state("db2", "slave")
    status = d.status()
    assert status["daemon"]["http"] == "%s://127.0.0.1:%d/" % (scheme, port)
    return status


class Proc:
    """A client or server process of a test, killed by its pid at teardown."""

    def __init__(self):
        self.procs = []

    def start(self, argv, **kw):
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def cleanup(self):
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass


@pytest.fixture
def procs():
    p = Proc()
    yield p
    p.cleanup()


def need(program):
    path = shutil.which(program) or (("/usr/sbin/" + program) if os.access("/usr/sbin/" + program, os.X_OK)
                                     else None)
    if not path:
        pytest.skip("%s is not installed (tests/run installs it)" % program)
    return path


# -- the daemon side ---------------------------------------------------------------------

def test_status_json_and_http_agree(daemon):
    d = daemon
    port = http_setup(d)
    start_with_http(d, port)
    text = d.cli("--status").stdout
    assert re.search(r"^http +http://127\.0\.0\.1:%d/$" % port, text, re.M), text
    over_http = json.loads(get(port, "/status")[2])
    assert set(over_http) == {"daemon", "hosts", "checks", "transitions", "runs"}
    assert set(over_http["daemon"]) == set(d.status()["daemon"])
    assert over_http["hosts"]["db1"]["state"] == "master"
    history = json.loads(get(port, "/history?n=1")[2])
    assert len(history) == 1 and history[0]["host"] in ("db1", "db2")
    status, _, body = get(port, "/hosts/db2/slave")
    assert status == 200 and json.loads(body)["host"] == "db2"
    assert get(port, "/hosts/db2/master")[0] == 503
    assert get(port, "/hosts/db3")[0] == 404
    assert get(port, "/pause", [("Content-Length", "0")], method="POST")[0] == 403   # no token


def test_reload_rebinds_refuses_a_busy_port_and_a_busy_port_fails_the_start(daemon, tmp_path):
    d = daemon
    port = http_setup(d)
    start_with_http(d, port)
    moved = free_port()
    d.write("checks.conf", (d.dir / "checks.conf").read_text().replace(":%d" % port, ":%d" % moved))
    assert d.cli("--reload").returncode == 0
    assert get(moved, "/hosts/db1/master")[0] == 200
    with pytest.raises(ConnectionRefusedError):
        get(port, "/status")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = busy.getsockname()[1]
        d.write("checks.conf", (d.dir / "checks.conf").read_text().replace(":%d" % moved, ":%d" % taken))
        result = d.cli("--reload")
        assert result.returncode == 1 and "127.0.0.1:%d" % taken in result.stderr, result.stderr
        assert get(moved, "/hosts/db1/master")[0] == 200            # the old listener stays
        assert d.status()["daemon"]["http"] == "http://127.0.0.1:%d/" % moved
        # A second daemon wanting the busy port does not start, and says why.
        other = type(d)(tmp_path / "other")
        http_setup(other)
        other.write("checks.conf", (other.dir / "checks.conf").read_text().replace(
            re.search(r"127\.0\.0\.1:\d+", (other.dir / "checks.conf").read_text()).group(0),
            "127.0.0.1:%d" % taken))
        try:
            result = other.cli("--start", timeout=60)
            assert result.returncode == 1, result.stdout + result.stderr
            assert "127.0.0.1:%d" % taken in result.stderr and "in use" in result.stderr, result.stderr
        finally:
            other.cleanup()


# -- HAProxy -------------------------------------------------------------------------------

class Backend:
    """A tiny TCP server that says its name to whoever connects (a thread of the test)."""

    def __init__(self, name):
        self.name = name.encode()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.sendall(self.name + b"\n")
                except OSError:
                    pass

    def close(self):
        self.sock.close()


HAPROXY_CFG = """
global
    log stderr format short local0 info
defaults
    mode tcp
    log global
    timeout connect 1s
    timeout client 5s
    timeout server 5s
frontend writes
    bind 127.0.0.1:{front}
    default_backend master
backend master
    option httpchk
    http-check send meth GET uri-lf /hosts/%[srv_name]/master ver HTTP/1.1 hdr Host 127.0.0.1
    http-check expect status 200
    default-server inter 300ms fall 1 rise 1 check port {http} addr 127.0.0.1
    server db1 127.0.0.1:{db1}
    server db2 127.0.0.1:{db2}
"""


def routed_to(port):
    """The name of the backend a connection to HAProxy's frontend reaches, or None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            return sock.recv(64).decode().strip() or None
    except OSError:
        return None


def haproxy_world(d):
    """The daemon serving HTTP (db1 master, db2 slave), a backend server for each, a free
    port for HAProxy's frontend: (http port, backends, frontend port)."""
    port = http_setup(d)
    start_with_http(d, port)
    return port, {name: Backend(name) for name in ("db1", "db2")}, free_port()


def test_haproxy_routes_writes_to_the_master(daemon, procs, tmp_path):
    haproxy, d = need("haproxy"), daemon
    port, backends, front = haproxy_world(d)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(front=front, http=port, db1=backends["db1"].port,
                                      db2=backends["db2"].port))
    log = open(tmp_path / "haproxy.log", "wb")
    try:
        procs.start([haproxy, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: all(routed_to(front) == "db1" for _ in range(5)), timeout=15,
                 what="HAProxy to route to db1 (log: %s)" % (tmp_path / "haproxy.log").read_text()[-2000:])
        d.set("db1", "slave")
        d.set("db2", "master")
        flipped = time.monotonic()
        d.wait_state("db2", "master")
        wait_for(lambda: all(routed_to(front) == "db2" for _ in range(5)), timeout=10,
                 what="HAProxy to route to db2 (log: %s)" % (tmp_path / "haproxy.log").read_text()[-2000:])
        figure("haproxy: writes routed to the new master %.2fs after the flip (check interval 200ms, "
               "inter 300ms)" % (time.monotonic() - flipped))
        text = (tmp_path / "haproxy.log").read_text()
        assert re.search(r"Server master/db1 is DOWN.*Layer7 wrong status, code: 503", text), text
        assert re.search(r"Server master/db2 is UP", text), text
    finally:
        log.close()
        for b in backends.values():
            b.close()


def example_haproxy_cfg(http, token, **ports):
    """examples/http/haproxy.cfg as it is, but for its addresses, ports and token: on
    loopback, hadaemon on ``http``, the servers (db1, db2) and the frontends (write,
    read) on ``ports``.  Each replacement must find its text: the example may not drift
    from what the test runs."""
    text = (EXAMPLES / "haproxy.cfg").read_text()
    for old, new in (("bind :5000", "bind 127.0.0.1:%d" % ports["write"]),
                     ("bind :5001", "bind 127.0.0.1:%d" % ports["read"]),
                     ("check port 8642 addr 10.0.0.5", "check port %d addr 127.0.0.1" % http),
                     ("server db1 10.0.0.11:5432", "server db1 127.0.0.1:%d" % ports["db1"]),
                     ("server db2 10.0.0.12:5432", "server db2 127.0.0.1:%d" % ports["db2"]),
                     ("CHANGE-ME-the-content-of-http.token", token)):
        assert old in text, "examples/http/haproxy.cfg has no %r any more" % old
        text = text.replace(old, new)
    return text


def docs_blocks(name):
    """The fenced blocks of docs/NAME."""
    return re.findall(r"(?ms)^```[a-z]*\n(.*?)^```", (ROOT / "docs" / name).read_text())


def test_haproxy_read_backend_follows_the_standby_lag(daemon, procs, tmp_path):
    """The example's read backend (/hosts/%[srv_name]/slave?lag_bytes.le=16777216): db2 out
    while the lag its check reports is over 16 MiB (the reads go to the master), back
    once it is under again."""
    haproxy = need("haproxy")
    d = daemon
    shown = [b for b in docs_blocks("http.md") if b.startswith(("frontend ", "backend "))]
    assert any("backend pg_standby" in b for b in shown), shown
    for block in shown:
        assert block in (EXAMPLES / "haproxy.cfg").read_text(), \
            "docs/http.md shows HAProxy lines that are not examples/http/haproxy.cfg's:\n" + block
    d.script("checks/check_role", """
        echo "host=$1"
        echo "state=$(cat "%(w)s/$1")"
        [ -f "%(w)s/$1.lag" ] && echo "lag_bytes=$(cat "%(w)s/$1.lag")"
        exit 0
    """ % {"w": d.world})
    port = free_port()
    d.write("http.token", TOKEN + "\n").chmod(0o600)
    d.write("checks.conf", "[daemon]\nworkers = 2\nhttp = 127.0.0.1:%d\nhttp_token = http.token\n"
                           "[local]\ninterval = 200ms\ncheck_role db1\ncheck_role db2\n" % port)
    d.write("actions.conf", "")
    d.set("db1", "master")
    d.set("db2", "slave")
    d.set("db2.lag", "4096")
    d.start()
    d.wait_state("db1", "master")
    d.wait_state("db2", "slave")
    backends = {name: Backend(name) for name in ("db1", "db2")}
    write, read = free_port(), free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(example_haproxy_cfg(port, TOKEN, write=write, read=read, db1=backends["db1"].port,
                                       db2=backends["db2"].port))
    log_path = tmp_path / "haproxy.log"
    log = open(log_path, "wb")

    def routes(front, name, timeout):
        wait_for(lambda: all(routed_to(front) == name for _ in range(5)), timeout=timeout,
                 what="HAProxy :%d to route to %s (log: %s)" % (front, name, log_path.read_text()[-2000:]))

    auth = [("Authorization", "Bearer " + TOKEN)]
    try:
        procs.start([haproxy, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        routes(write, "db1", 20)
        routes(read, "db2", 20)
        d.set("db2.lag", "50000000")                       # 48 MiB behind
        behind = time.monotonic()
        routes(read, "db1", 20)                             # no standby fit: the master reads
        out = time.monotonic() - behind
        status, _, body = get(port, "/hosts/db2/slave?lag_bytes.le=16777216", auth)
        assert status == 503 and json.loads(body)["failed"] == {
            "condition": "lag_bytes.le=16777216", "value": "50000000"}, body
        d.set("db2.lag", "0")
        caught_up = time.monotonic()
        routes(read, "db2", 20)
        back = time.monotonic() - caught_up
        figure("haproxy read backend: db2 out %.2fs after its lag went over 16 MiB, back %.2fs after "
               "it caught up (check interval 200ms; the example's inter 1s fall 2 rise 2)" % (out, back))
        routes(write, "db1", 5)                             # writes never moved
        text = log_path.read_text()
        assert re.search(r"Server pg_standby/db2 is DOWN.*Layer7 wrong status, code: 503", text), text
        assert re.search(r"Server pg_standby/db2 is UP", text), text
        assert re.search(r"Server pg_standby/db1 is DOWN.*code: 503", text), text     # a master
    finally:
        log.close()
        for b in backends.values():
            b.close()


def test_the_example_haproxy_cfg_works_with_the_docs_http_setup(daemon, procs, tmp_path):
    """Issue 23.1: examples/http/haproxy.cfg (whose blocks docs/http.md shows, as the test
    above checks) in front of docs/http.md's loopback setup without a token (http =
    127.0.0.1:PORT; the Authorization header left as shipped): the master is UP.  A Host the
    daemon refuses is logged, once per client and reason."""
    haproxy, d = need("haproxy"), daemon
    port, backends, write = haproxy_world(d)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(example_haproxy_cfg(port, "CHANGE-ME-the-content-of-http.token", write=write,
                                       read=free_port(), db1=backends["db1"].port, db2=backends["db2"].port))
    log_path = tmp_path / "haproxy.log"
    log = open(log_path, "wb")
    try:
        procs.start([haproxy, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        # db2 (a slave: 503) goes DOWN after two checks; by then a refused db1 would have too.
        wait_for(lambda: "Server pg_master/db2 is DOWN" in log_path.read_text(), timeout=15,
                 what="HAProxy to mark db2 down (log: %s)" % log_path.read_text()[-2000:])
        text = log_path.read_text()
        assert "Layer7 wrong status, code: 503" in text and "pg_master/db1 is DOWN" not in text, text
        assert all(routed_to(write) == "db1" for _ in range(5))
        assert "refused" not in d.log()
    finally:
        log.close()
        for b in backends.values():
            b.close()
    # The same check with another Host: refused, and the log says why (once for the two).
    for _ in range(2):
        status, _, body = get(port, "/hosts/db1/master", headers=(("Host", "hadaemon"),))
        assert status == 403 and b"only an IP address or localhost" in body
    d.wait_log("http: refused GET '/hosts/db1/master' from 127.0.0.1: Host 'hadaemon': without http_token")
    assert d.log().count("http: refused") == 1, d.tail()


# -- promtool --------------------------------------------------------------------------------

def test_promtool_accepts_metrics_and_counters_grow(daemon):
    promtool = need("promtool")
    d = daemon
    port = http_setup(d, interval="100ms")
    start_with_http(d, port)
    first = get(port, "/metrics")[2].decode()
    d.set("db1", "down")
    d.wait_state("db1", "down")
    wait_for(lambda: 'result="ok"' in get(port, "/metrics")[2].decode(), what="the runs to count")
    second = get(port, "/metrics")[2].decode()
    for text in (first, second):
        result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
    a = {n + labels: float(v) for n, labels, v in parse_metrics(first)[1]}
    b = {n + labels: float(v) for n, labels, v in parse_metrics(second)[1]}
    key = 'hadaemon_check_runs_total{check="check_role db1",scope="local"}'
    assert b[key] > a[key] > 0
    assert b["hadaemon_schedule_lag_seconds_count"] > a["hadaemon_schedule_lag_seconds_count"]
    assert b['hadaemon_transitions_total{host="db1",from="master",to="down"}'] == 1
    assert b['hadaemon_transitions_total{host="db1",from="unknown",to="master"}'] == 1
    assert b['hadaemon_action_runs_total{section="any_to_master",result="ok"}'] == 1
    assert b['hadaemon_host_state{host="db1",state="down"}'] == 1
    assert b['hadaemon_workers{state="idle"}'] + b['hadaemon_workers{state="busy"}'] == 2


# -- Chromium ----------------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars",
                  "--enable-logging=stderr", "--v=0"]       # the console, CSP violations too, on stderr
HOSTILE = "<script>document.body.setAttribute('data-pwned','1')</script><b onclick=x()>bold</b>"


def chromium(url, tmp_path, screenshot, size=(1280, 860)):
    """Headless Chromium on ``url``: the DOM after load, and a screenshot.  Bounded by a timeout."""
    program = need("chromium")
    profile = tmp_path / "chromium-profile"
    argv = [program] + CHROMIUM_FLAGS + ["--user-data-dir=%s" % profile, "--window-size=%d,%d" % size,
                                         "--screenshot=%s" % screenshot, "--dump-dom", url]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("chromium did not finish within 60s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def test_chromium_renders_the_page_and_the_script_stays_text(daemon, tmp_path):
    d = daemon
    # db3's check needs 1000 reports in a row: its candidate stays pending, for the page to show.
    port = http_setup(d, groups="[local]\nconfirm = 1000\ninterval = 200ms\ncheck_role db3\n")
    d.set("db3", "slave")
    (d.world / "db1.message").write_text("streaming to db2, lag 0 bytes\n")
    (d.world / "db2.message").write_text(HOSTILE + "\n")
    start_with_http(d, port)
    d.set("db2", "down")                # a transition and a failed-looking state on the page
    d.wait_state("db2", "down")
    wait_for(lambda: HOSTILE in get(port, "/status")[2].decode(), what="the message to be reported")
    shot = tmp_path / "page.png"
    started = time.monotonic()
    dom, err = chromium("http://127.0.0.1:%d/" % port, tmp_path, shot)
    figure("chromium: dump-dom and screenshot in %.1fs" % (time.monotonic() - started))
    assert "<h2>Hosts</h2>" in dom, dom[:2000] + err[-2000:]
    assert '<td>db1</td><td><span class="s good">master</span>' in dom
    assert '<td>db2</td><td><span class="s bad">down</span>' in dom
    assert re.search(r'<td>db3</td><td><span class="s other">unknown</span></td><td>-</td>'
                     r'<td><span class="s standby">slave</span> ×\d+</td>', dom), dom
    assert "check_role db1" in dom and "check_role db2" in dom
    assert "&lt;script&gt;document.body.setAttribute('data-pwned','1')&lt;/script&gt;" in dom
    assert "data-pwned=" not in dom and "<script" not in dom and "<b onclick" not in dom
    # The policy holds the style sheet's hash: a browser that refused it (or anything) says so.
    assert "Content Security Policy" not in err, [line for line in err.splitlines() if "Policy" in line]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000
    target = os.environ.get("HADAEMON_SCREENSHOT")
    if target:                                              # the README's picture is made here
        path = ROOT / "docs" / "status-page.png" if target == "1" else os.path.abspath(target)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(shot, path)


def test_the_page_fits_a_phone(daemon, tmp_path):
    """Issue 23.9: at 390 px (a phone) the page never scrolls sideways; its tables scroll
    inside their own box.  The page as served, with a probe that writes the widths."""
    d = daemon
    port = http_setup(d)
    (d.world / "db2.message").write_text("replication lag 123456789 bytes; " * 6 + "\n")
    start_with_http(d, port)
    wait_for(lambda: "replication lag" in get(port, "/status")[2].decode(), what="the message")
    page = get(port, "/")[2].decode()
    # Headless Chromium's window is at least 500 px wide: the page goes in a frame of 390 px
    # (srcdoc: the frame is of the wrapper's origin, so its probe may write the widths there).
    probe = ("<script>var e = document.documentElement; parent.document.documentElement.setAttribute("
             "'data-fit', e.scrollWidth + ' ' + window.innerWidth + ' ' + "
             "document.querySelector('table').scrollWidth)</script>")
    framed = html.escape(page.replace("</body>", probe + "</body>"), quote=True)
    path = tmp_path / "phone.html"            # a file: no Content-Security-Policy to stop the probe
    path.write_text('<!DOCTYPE html><html><body style="margin:0"><iframe width="390" height="844" '
                    'style="border:0" srcdoc="%s"></iframe></body></html>' % framed)
    dom, err = chromium(path.as_uri(), tmp_path, tmp_path / "phone.png", size=(800, 900))
    m = re.search(r'data-fit="(\d+) (\d+) (\d+)"', dom)
    assert m, dom[:2000] + err[-2000:]
    page_width, viewport, table_width = map(int, m.groups())
    figure("chromium at 390 px: document.scrollWidth %d, innerWidth %d, first table %d px wide"
           % (page_width, viewport, table_width))
    assert viewport == 390 and page_width <= viewport, (page_width, viewport)


# -- curl: token, Basic, HTTPS ----------------------------------------------------------------

def curl(*args):
    program = need("curl")
    result = subprocess.run([program, "-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"] + list(args),
                            capture_output=True, text=True, timeout=30)
    body, _, code = result.stdout.rpartition("\n")
    return int(code or 0), body, result.stderr


def test_curl_with_token_basic_and_https(daemon, tmp_path):
    need("openssl")
    d = daemon
    pems = make_pems(tmp_path / "pem")
    (d.dir / "http.pem").write_text(pems["good"])
    (d.dir / "http.pem").chmod(0o600)
    (d.dir / "http.token").write_text(TOKEN + "\n")
    (d.dir / "http.token").chmod(0o600)
    port = http_setup(d, extra=["http_token = http.token", "http_cert = http.pem"])
    start_with_http(d, port, scheme="https")
    url = "https://127.0.0.1:%d" % port
    ca = ["--cacert", str(pems["ca"])]
    code, body, _ = curl(*ca, "-H", "Authorization: Bearer " + TOKEN, url + "/hosts/db1/master")
    assert code == 200 and json.loads(body)["state"] == "master"
    code, body, _ = curl(*ca, "-u", "anyone:" + TOKEN, url + "/")
    assert code == 200 and "<h2>Hosts</h2>" in body
    code, body, _ = curl(*ca, "-u", "anyone:" + TOKEN, "-X", "POST", url + "/pause")
    assert code == 200 and json.loads(body) == {"paused": True}
    assert d.status()["daemon"]["paused"] is True
    code, body, _ = curl(*ca, "-H", "Authorization: Bearer " + TOKEN, "-X", "POST", url + "/resume")
    assert code == 200 and json.loads(body) == {"paused": False}
    # Wrong or missing: 401, one log line per address per minute, never the token.
    for args in (["-H", "Authorization: Bearer wrong-" + TOKEN], [], ["-u", "x:nope"]):
        code, body, _ = curl(*ca, "-i", *args, url + "/status")
        assert code == 401 and 'WWW-Authenticate: Basic realm="hadaemon"' in body
    code, _, err = curl(url + "/status")                   # the self-signed cert is not trusted
    assert code == 0 and "certificate" in err
    d.wait_log("http: refused GET '/status' from 127.0.0.1")
    log = d.log()
    assert log.count("http: refused") == 1, log
    assert TOKEN not in log


# -- bad input and load ---------------------------------------------------------------------------

def test_hostile_clients_get_their_answer_and_checks_keep_their_schedule(daemon):
    d = daemon
    port = http_setup(d, interval="100ms")
    start_with_http(d, port)

    def runs():             # over HTTP: no process to start, so the moment is the moment
        return sum(c["runs"] for c in json.loads(get(port, "/status")[2])["checks"])
    idle = [Client(port, timeout=20) for _ in range(25)]
    half = [Client(port, timeout=20) for _ in range(25)]
    try:
        before, t0 = runs(), time.monotonic()
        for client in half:
            client.send(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1")
        answers = {}
        for name, payload in (("1MB line", b"GET /" + b"a" * (1 << 20) + b" HTTP/1.1\r\n\r\n"),
                              ("9KB headers", b"GET / HTTP/1.1\r\nX: " + b"b" * 9000 + b"\r\n\r\n"),
                              ("body", b"POST /pause HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789"),
                              ("garbage", bytes(range(256)) * 8 + b"\r\n\r\n")):
            with Client(port) as client:
                try:
                    client.send(payload)
                except OSError:
                    pass
                answer = client.answer()
                answers[name] = answer[0] if answer else None
                assert client.closed()
        for _ in range(20):                                  # clients that reset
            client = Client(port)
            client.send(b"GET /metrics HTTP/1.1\r\n\r\n")
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            client.sock.close()
        assert answers == {"1MB line": 414, "9KB headers": 431, "body": 413, "garbage": 400}, answers
        assert get(port, "/hosts/db1/master")[0] == 200       # and a well-behaved client is served
        # The slow ones, 10 s later: a half-sent request gets 408, an idle connection a close.
        status, headers, _ = half[-1].answer()
        assert status == 408 and headers["Connection"] == "close"
        assert idle[0].closed(timeout=20)
        done, elapsed = runs() - before, time.monotonic() - t0
        figure("hostile clients: %d check runs in %.1fs with 50 slow connections open and bad requests "
               "(2 checks every 100ms: %.0f due)" % (done, elapsed, 20 * elapsed))
        assert done >= 0.9 * 20 * elapsed, (done, elapsed)
    finally:
        for client in idle + half:
            client.sock.close()


# -- the README's examples: HAProxy, Prometheus, the alerting rules -------------------------

EXAMPLES = ROOT / "examples" / "http"

RULES_TEST = """
rule_files:
  - {rules}
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'hadaemon_host_state_since_seconds{{host="db1",instance="w1:8642",job="hadaemon"}}'
        values: '100 100 100 100 460 460 460 460 460 460 460 460 460 460 460 460 460 460'
      - series: 'hadaemon_host_state_since_seconds{{host="db2",instance="w1:8642",job="hadaemon"}}'
        values: '100x17'
      - series: 'hadaemon_actions_paused{{instance="w1:8642",job="hadaemon"}}'
        values: '0 0 1x40'
    alert_rule_test:
      - eval_time: 3m
        alertname: HadaemonHostChangedState
        exp_alerts: []
      - eval_time: 5m
        alertname: HadaemonHostChangedState
        exp_alerts:
          - exp_labels: {{severity: warning, host: db1, instance: "w1:8642", job: hadaemon}}
            exp_annotations:
              summary: "db1 changed state on w1:8642"
              description: "hadaemon saw db1 move to another state in the last 10 minutes; see hadaemon.py --history."
      - eval_time: 16m
        alertname: HadaemonHostChangedState
        exp_alerts: []
      - eval_time: 20m
        alertname: HadaemonActionsPaused
        exp_alerts: []
      - eval_time: 33m
        alertname: HadaemonActionsPaused
        exp_alerts:
          - exp_labels: {{severity: warning, instance: "w1:8642", job: hadaemon}}
            exp_annotations:
              summary: "hadaemon on w1:8642 has had its actions paused for 30 minutes"
              description: "Transitions are recorded but no action runs (hadaemon.py --resume)."
"""


def test_the_haproxy_example_is_valid():
    haproxy = need("haproxy")
    result = subprocess.run([haproxy, "-c", "-f", str(EXAMPLES / "haproxy.cfg")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_docs_prometheus_steps_make_the_snippet_pass_promtool(tmp_path):
    """Issue 23.2: docs/http.md's commands, as written there: the token and certificate made in
    hadaemon's config dir, then the files Prometheus needs made from them, then promtool
    on the snippet docs/http.md shows (and the example file, copied beside it)."""
    promtool = need("promtool")
    need("openssl")
    docs = (ROOT / "docs" / "http.md").read_text()
    make = re.search(r"Make the two with, for example:\n\n  ```sh\n(.*?)  ```", docs, re.S).group(1)
    prom = docs[docs.index("## Prometheus"):]
    steps, snippet = re.findall(r"```(?:sh|yaml)\n(.*?)```", prom, re.S)[:2]
    assert "scrape_configs:" in snippet and "promtool check config prometheus.yml" in steps
    ha, there = tmp_path / "ha", tmp_path / "prometheus"
    ha.mkdir()
    there.mkdir()
    made = subprocess.run(["sh", "-ec", textwrap.dedent(make)], cwd=ha, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    (there / "prometheus.yml").write_text(snippet)
    steps = steps.replace("HA=/etc/hadaemon", "HA=%s" % ha, 1)
    assert str(ha) in steps
    env = dict(os.environ, PATH="%s:%s" % (os.path.dirname(promtool), os.environ["PATH"]))
    result = subprocess.run(["sh", "-ec", steps], cwd=there, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0 and "SUCCESS" in result.stdout + result.stderr, result.stdout + result.stderr
    shutil.copy(EXAMPLES / "prometheus.yml", there / "prometheus.yml")
    shutil.copy(EXAMPLES / "hadaemon.rules.yml", there / "hadaemon.rules.yml")
    result = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=there, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_prometheus_examples_are_valid_and_the_alerts_fire(tmp_path):
    promtool = need("promtool")
    for name in ("prometheus.yml", "hadaemon.rules.yml"):
        shutil.copy(EXAMPLES / name, tmp_path / name)
    (tmp_path / "hadaemon.token").write_text(TOKEN + "\n")
    (tmp_path / "hadaemon-ca.pem").write_text("")

    def promtool_ok(*args):
        result = subprocess.run([promtool] + list(args), capture_output=True, text=True, timeout=60,
                                cwd=tmp_path)
        assert result.returncode == 0 and "SUCCESS" in result.stdout + result.stderr, result.stdout + result.stderr
    promtool_ok("check", "config", "prometheus.yml")
    promtool_ok("check", "rules", "hadaemon.rules.yml")
    (tmp_path / "rules_test.yml").write_text(RULES_TEST.format(rules="hadaemon.rules.yml"))
    promtool_ok("test", "rules", "rules_test.yml")
