"""A real etcd cluster on loopback for the tests and the bench (Debian's etcd-server).

``EtcdCluster(root, size=3).start()`` starts ``size`` members on free loopback
ports with fast elections (heartbeat 50 ms, election timeout 500 ms), their data
dirs under ``root``, and waits until every member answers ``/health`` with a
leader.  Members can be killed with SIGKILL and restarted on their data dir;
``stop()`` kills every member by its pid.  With ``tls=make_tls(dir)`` the members
serve https and require a client certificate.  No pytest here: the bench uses it too.
"""

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
# etcd's timing for the production shape (members on one LAN), as docs/cluster.md
# ("Running etcd for it") recommends: a heartbeat near the round trip, an election
# timeout ten heartbeats; --pre-vote (etcd 3.5's default) so that a member back from
# a partition does not depose the raft leader.  cluster_stack.py and test_partition.py
# run it; the loopback clusters here keep Member.timing.
LAN_TIMING = ("--heartbeat-interval", "25", "--election-timeout", "250", "--pre-vote")


def free_ports(n):
    """``n`` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def make_tls(root):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl.

    Returns {ca, server_cert, server_key, client_cert, client_key} (paths under ``root``)."""
    root = str(root)
    paths = {name: os.path.join(root, name + ".pem") for name in
             ("ca", "ca_key", "server_cert", "server_key", "client_cert", "client_key")}
    ext = os.path.join(root, "san.cnf")
    with open(ext, "w") as f:
        f.write("subjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth, clientAuth\n")

    def run(*args):
        subprocess.run(["openssl"] + list(args), check=True, capture_output=True, timeout=60)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")     # quicker than RSA
    run("req", "-x509", *ec, "-nodes", "-days", "2", "-subj", "/CN=hadaemon test CA",
        "-keyout", paths["ca_key"], "-out", paths["ca"])
    for who in ("server", "client"):
        csr = os.path.join(root, who + ".csr")
        run("req", *ec, "-nodes", "-subj", "/CN=hadaemon test " + who,
            "-keyout", paths[who + "_key"], "-out", csr)
        run("x509", "-req", "-in", csr, "-CA", paths["ca"], "-CAkey", paths["ca_key"],
            "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", paths[who + "_cert"])
    for path in paths.values():
        os.chmod(path, 0o600)
    return paths


def gateway(url, path, body=None, timeout=2.0, context=None):
    """One POST (GET when ``body`` is None) to an etcd endpoint: (status, parsed JSON or None)."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    if url.startswith("https:"):
        conn = http.client.HTTPSConnection(host, int(port), timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        if body is None:
            conn.request("GET", path)
        else:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, data.decode("utf-8", "replace")
    finally:
        conn.close()


class Member:
    timing = ("--heartbeat-interval", "50", "--election-timeout", "500")

    def __init__(self, cluster, index, client_port, peer_port):
        self.cluster = cluster
        self.name = "m%d" % index
        self.client_port = client_port
        self.peer_port = peer_port
        self.url = "%s://127.0.0.1:%d" % ("https" if cluster.tls else "http", client_port)
        self.peer_url = "http://127.0.0.1:%d" % peer_port
        self.data_dir = os.path.join(cluster.root, self.name)
        self.log_path = os.path.join(cluster.root, self.name + ".log")
        self.proc = None
        self.started_once = False

    def argv(self):
        initial = ",".join("%s=%s" % (m.name, m.peer_url) for m in self.cluster.members)
        return [ETCD, "--name", self.name, "--data-dir", self.data_dir,
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", initial, "--initial-cluster-token", self.cluster.token,
                "--initial-cluster-state", "existing" if self.started_once else "new",
                "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn"] + list(self.timing) \
            + self.tls_args()

    def tls_args(self):
        tls = self.cluster.tls
        if not tls:
            return []
        return ["--cert-file", tls["server_cert"], "--key-file", tls["server_key"],
                "--client-cert-auth", "--trusted-ca-file", tls["ca"]]

    def start(self):
        assert not self.running(), "%s already runs" % self.name
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.started_once = True
        self.cluster.pids.add(self.proc.pid)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig=signal.SIGKILL):
        """SIGKILL (or ``sig``) this member and reap it."""
        if self.running():
            os.kill(self.proc.pid, sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.proc.wait(timeout=10)

    def healthy(self):
        try:
            status, doc = gateway(self.url, "/health", timeout=0.5, context=self.cluster.context)
        except OSError:
            return False
        return status == 200 and isinstance(doc, dict) and doc.get("health") == "true"

    def tail(self, n=10):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


class EtcdCluster:
    """``size`` etcd members on loopback; see the module docstring."""

    def __init__(self, root, size=3, tls=None):
        self.root = str(root)
        self.size = size
        self.tls = tls              # make_tls(): clients must show a certificate of its CA
        self.context = None
        if tls:
            self.context = ssl.create_default_context(cafile=tls["ca"])
            self.context.load_cert_chain(tls["client_cert"], tls["client_key"])
        self.token = "hadaemon-test-%d-%d" % (os.getpid(), int(time.time() * 1000))
        self.members = []
        self.pids = set()           # every etcd pid ever started: all are killed at stop()

    @property
    def endpoints(self):
        return [m.url for m in self.members]

    def start(self, timeout=30.0, attempts=3):
        """Start every member and wait until all are healthy; new ports if one was taken."""
        for attempt in range(attempts):
            ports = free_ports(2 * self.size)
            self.members = [Member(self, i, ports[2 * i], ports[2 * i + 1]) for i in range(self.size)]
            for m in self.members:
                shutil.rmtree(m.data_dir, ignore_errors=True)
            for m in self.members:
                m.start()
            try:
                self.wait_healthy(timeout)
                return self
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                self.stop()         # a port taken between our probe and etcd's bind: again
        return self

    def wait_healthy(self, timeout=30.0, members=None):
        """Wait until every running member (or ``members``) answers /health true."""
        deadline = time.monotonic() + timeout
        members = members or [m for m in self.members if m.running()]
        while True:
            dead = [m for m in members if not m.running()]
            if dead:
                raise RuntimeError("etcd member %s exited:\n%s" % (dead[0].name, dead[0].tail()))
            if all(m.healthy() for m in members):
                return
            if time.monotonic() > deadline:
                sick = [m for m in members if not m.healthy()]
                raise RuntimeError("etcd members %s not healthy after %ss:\n%s" % (
                    ",".join(m.name for m in sick), timeout, sick[0].tail()))
            time.sleep(0.05)

    def restart(self, member, timeout=30.0):
        """Start a killed member again on its data dir and wait for it to be healthy."""
        member.start()
        self.wait_healthy(timeout, [member])

    def leader(self):
        """The member that is etcd's raft leader now, or None."""
        for m in self.members:
            if not m.running():
                continue
            try:
                status, doc = gateway(m.url, "/v3/maintenance/status", {}, timeout=0.5, context=self.context)
            except OSError:
                continue
            if status == 200 and doc.get("leader") and doc.get("leader") == doc.get("header", {}).get("member_id"):
                return m
        return None

    def metric(self, name):
        """The sum over running members of a counter from their /metrics (None if none answered)."""
        total, seen = 0.0, False
        for m in self.members:
            if not m.running():
                continue
            try:
                status, text = gateway(m.url, "/metrics", timeout=1.0, context=self.context)
            except OSError:
                continue
            if status != 200 or not isinstance(text, str):
                continue
            for line in text.splitlines():
                if line.startswith(name) and not line.startswith("#"):
                    total += float(line.rsplit(" ", 1)[1])
                    seen = True
        return total if seen else None

    def stop(self):
        """SIGKILL every member ever started, by pid, and reap them."""
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                try:
                    m.proc.kill()
                except ProcessLookupError:
                    pass
        for m in self.members:
            if m.proc is not None:
                try:
                    m.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
