"""The cluster of SPEC §10: several daemons, one acting, on a real etcd cluster.

Layers, each against real etcd members (Debian's etcd-server, tests/etcd.py):

- the [cluster] section: every mistake at FILE:LINE, ``--check-config --connect``;
- the etcd client alone: leases expire, a failed compare, failover between
  endpoints, calls without etcd quorum end at their timeout, TLS;
- the cluster agent (the process that talks to etcd) driven by a fake master.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import hadaemon.base
import hadaemon.config
import hadaemon.netsettings
import hadaemon.configfiles
import hadaemon.wire
import hadaemon.proc
import hadaemon.etcd
import hadaemon.cluster_agent
import hadaemon.cluster_member
from conftest import HADAEMON, wait_for
from etcd import ETCD, EtcdCluster, make_tls

pytestmark = pytest.mark.skipif(not os.path.exists(ETCD), reason="etcd-server is not installed")


@pytest.fixture(scope="module")
def etcd_shared(tmp_path_factory):
    """Three members no test kills (tests use keys of their own)."""
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def etcd(tmp_path):
    """Three members of this test's own, to kill and restart."""
    cluster = EtcdCluster(tmp_path / "etcd")
    os.mkdir(cluster.root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def unique(prefix="/t/"):
    return "%s%d-%d/" % (prefix, os.getpid(), time.monotonic_ns())


# ============================================================================
# The [cluster] section
# ============================================================================

def config_dir(tmp_path, cluster, extra_files=()):
    d = tmp_path / "conf"
    (d / "checks").mkdir(parents=True, exist_ok=True)
    check = d / "checks" / "check_a"
    check.write_text("#!/bin/sh\necho state=up\n")
    check.chmod(0o755)
    (d / "checks.conf").write_text("[daemon]\ninterval = 1s\n\n[cluster]\n" + textwrap.dedent(cluster).lstrip("\n")
                                   + "\n[local]\ncheck_a\n")
    (d / "actions.conf").write_text("")
    for name, text in extra_files:
        (d / name).write_text(text)
    return d


def cluster_errors(tmp_path, cluster, extra_files=()):
    d = config_dir(tmp_path, cluster, extra_files)
    with pytest.raises(hadaemon.base.ConfigError) as info:
        hadaemon.configfiles.load_config(str(d))
    return d, info.value.errors


def test_a_valid_cluster_section(tmp_path):
    d = config_dir(tmp_path, """
        etcd = http://10.0.0.5:2379, http://10.0.0.6 https://[fd00::7]:2381/
        name = pg-main
        node = watcher-a
        ttl = 1m
        quorum = 2
    """)
    cluster = hadaemon.configfiles.load_config(str(d)).cluster
    assert cluster.etcd == ("http://10.0.0.5:2379", "http://10.0.0.6", "https://[fd00::7]:2381")
    assert (cluster.name, cluster.node, cluster.ttl, cluster.quorum) == ("pg-main", "watcher-a", 60, 2)
    assert cluster.prefix == "/hadaemon/pg-main/"
    assert cluster.where == "%s:4" % (d / "checks.conf")
    assert hadaemon.netsettings.parse_etcd_url("http://10.0.0.6") == ("http", "10.0.0.6", 2379)
    assert hadaemon.netsettings.parse_etcd_url("https://[fd00::7]:2381/") == ("https", "fd00::7", 2381)


def test_defaults_node_is_the_host_name(tmp_path):
    d = config_dir(tmp_path, "etcd = http://127.0.0.1:2379\nname = c1\n")
    cluster = hadaemon.configfiles.load_config(str(d)).cluster
    assert (cluster.node, cluster.ttl, cluster.quorum) == (socket.gethostname(), 5, 1)


def test_no_cluster_section_means_no_cluster(tmp_path):
    d = tmp_path / "plain"
    (d / "checks").mkdir(parents=True)
    (d / "checks.conf").write_text("[daemon]\ninterval = 1s\n")
    (d / "actions.conf").write_text("")
    assert hadaemon.configfiles.load_config(str(d)).cluster is None


# (cluster section, line of the error in checks.conf, words it must contain)
MISTAKES = [
    ("etcd = ftp://x:1\nname = c", 5, ["ftp://x:1", "http://HOST:PORT"]),
    ("etcd = http://a:99999\nname = c", 5, ["port", "http://a:99999"]),
    ("etcd = http://a:1/v3\nname = c", 5, ["http://a:1/v3"]),
    ("etcd = http://a:1, http://a:1\nname = c", 5, ["twice"]),
    ("etcd = ,\nname = c", 5, ["at least one endpoint"]),
    ("etcd = http://a:1\nname = pg/main", 6, ["bad name", "pg/main"]),
    ("etcd = http://a:1\nname = c\nnode = a b", 7, ["node takes one value"]),
    ("etcd = http://a:1\nname = c\nnode = -x", 7, ["bad node", "-x"]),
    ("etcd = http://a:1\nname = c\nttl = 1.5s", 7, ["whole seconds", "1.5s"]),
    ("etcd = http://a:1\nname = c\nttl = 500ms", 7, ["whole seconds", "500ms"]),
    ("etcd = http://a:1\nname = c\nttl = 61s", 7, ["1s to 60s", "61s"]),
    ("etcd = http://a:1\nname = c\nttl = soon", 7, ["not a duration", "soon"]),
    ("etcd = http://a:1\nname = c\nquorum = 0", 7, ["quorum", "at least 1", "'0'"]),
    ("etcd = http://a:1\nname = c\nquorum = two", 7, ["quorum", "'two'"]),
    ("etcd = http://a:1\nname = c\ncolour = red", 7, ["unknown key 'colour'", "quorum"]),
    ("etcd = http://a:1\nname = c\nname = d", 7, ["name is set twice", ":6"]),
    ("etcd = http://a:1\nname = c\njust words", 7, ["only KEY = VALUE", "just words"]),
    ("name = c", 4, ["needs etcd = ..."]),
    ("etcd = http://a:1", 4, ["needs name = ..."]),
    ("etcd = https://a:1\nname = c\netcd_ca = missing.pem", 7, ["etcd_ca", "missing.pem",
                                                               "No such file"]),
    ("etcd = http://a:1\nname = c\netcd_ca = ca.pem", 7, ["etcd_ca set", "http://"]),
    ("etcd = https://a:1\nname = c\netcd_key = ca.pem", 7, ["etcd_key without etcd_cert"]),
    ("etcd = https://a:1\nname = c\netcd_ca = ca.pem", 7, ["cannot load the TLS files"]),
]


@pytest.mark.parametrize("section,line,needles", MISTAKES, ids=[m[0].split("\n")[-1] for m in MISTAKES])
def test_each_mistake_in_the_cluster_section(tmp_path, section, line, needles):
    d, errors = cluster_errors(tmp_path, section, extra_files=[("ca.pem", "not a certificate\n")])
    assert len(errors) == 1, errors
    assert errors[0].startswith("%s:%d: " % (d / "checks.conf", line)), errors
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def test_a_second_cluster_section_is_an_error_and_all_errors_are_reported(tmp_path):
    d, errors = cluster_errors(tmp_path, "etcd = http://a:1\nname = c\nquorum = 0\n[cluster]\n"
                                         "etcd = http://b:1\n")
    assert len(errors) == 2, errors
    assert "quorum" in errors[0] and "[cluster] again (first at %s:4)" % (d / "checks.conf") in errors[1]


def test_tls_files_relative_to_the_config_dir(tmp_path):
    tls = make_tls(tmp_path)
    files = [(name + ".pem", open(tls[key]).read()) for name, key in
             (("ca", "ca"), ("client", "client_cert"), ("client-key", "client_key"))]
    d = config_dir(tmp_path, "etcd = https://127.0.0.1:2379\nname = c\netcd_ca = ca.pem\n"
                             "etcd_cert = client.pem\netcd_key = client-key.pem\n", files)
    cluster = hadaemon.configfiles.load_config(str(d)).cluster
    assert cluster.etcd_ca == str(d / "ca.pem") and cluster.etcd_key == str(d / "client-key.pem")
    # A key that does not go with the certificate.
    (d / "client-key.pem").write_text(open(tls["server_key"]).read())
    with pytest.raises(hadaemon.base.ConfigError) as info:
        hadaemon.configfiles.load_config(str(d))
    assert "cannot load the TLS files" in info.value.errors[0] and ":8: " in info.value.errors[0]


def run_cli(d, *args, timeout=30):
    return subprocess.run([sys.executable, str(HADAEMON), "--config-dir", str(d), "--state-dir",
                           str(d / "var")] + list(args), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_check_config_finds_the_errors(tmp_path):
    d = config_dir(tmp_path, "etcd = http://127.0.0.1:1\nname = c\nttl = 0s\n")
    result = run_cli(d, "--check-config")
    assert result.returncode == 1
    assert "%s:7: " % (d / "checks.conf") in result.stderr and "ttl" in result.stderr


def test_check_config_connect_reaches_every_endpoint(tmp_path, etcd_shared):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    silent = "http://127.0.0.1:%d" % listener.getsockname()[1]
    try:
        d = config_dir(tmp_path, "etcd = %s, %s\nname = c\nttl = 2s\n" % (", ".join(etcd_shared.endpoints), silent))
        # Plain --check-config never connects.
        result = run_cli(d, "--check-config")
        assert result.returncode == 0, result.stderr
        with pytest.raises(socket.timeout):
            listener.accept()
        # --connect reaches each one and fails on the one that never answers.
        result = run_cli(d, "--check-config", "--connect")
        assert result.returncode == 1, result.stdout + result.stderr
        lines = [line for line in result.stdout.splitlines() if line.startswith("etcd ")]
        assert len(lines) == 4, result.stdout
        for url in etcd_shared.endpoints:
            assert any(url in line and " ok " in line and "etcd 3." in line for line in lines), lines
        assert any(silent in line and "FAILED" in line and "timed out" in line for line in lines), lines
        d = config_dir(tmp_path, "etcd = %s\nname = c\n" % ", ".join(etcd_shared.endpoints))
        result = run_cli(d, "--check-config", "--connect")
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        listener.close()


# ============================================================================
# The etcd client
# ============================================================================

def test_lease_grant_keepalive_expiry_and_revoke(etcd_shared):
    client = hadaemon.etcd.EtcdClient(etcd_shared.endpoints, 1.0)
    prefix = unique()
    lease, ttl = client.grant(1)
    assert lease > 0 and ttl >= 1
    client.put(prefix + "k", "v", lease)
    assert client.keepalive(lease)[0] >= 1
    _, kvs = client.range(prefix, prefix=True)
    assert [(kv["key"], kv["value"], kv["lease"]) for kv in kvs] == [(prefix + "k", "v", lease)]
    # Not renewed: the key is gone within about its ttl, and the lease is lost for good.
    started = time.monotonic()
    wait_for(lambda: not client.range(prefix, prefix=True)[1], timeout=5, what="the key to expire")
    assert time.monotonic() - started < 4
    assert client.keepalive(lease)[0] == 0
    lease2, _ = client.grant(5)
    client.put(prefix + "k2", "v", lease2)
    client.revoke(lease2)
    client.revoke(lease2)       # already gone: no error
    assert client.range(prefix, prefix=True)[1] == []
    assert client.keepalive(lease2)[0] == 0


def test_txn_compare_failure_returns_the_holder(etcd_shared):
    client = hadaemon.etcd.EtcdClient(etcd_shared.endpoints, 1.0)
    key = unique() + "leader"
    lease, _ = client.grant(5)
    create = [hadaemon.etcd.etcd_compare(key, "CREATE", 0)]
    ok, revision, _ = client.txn(create, [hadaemon.etcd.etcd_put(key, "a", lease)], [hadaemon.etcd.etcd_get(key)])
    assert ok and revision > 0
    ok, _, responses = client.txn(create, [hadaemon.etcd.etcd_put(key, "b", lease)], [hadaemon.etcd.etcd_get(key)])
    assert ok is False
    holder = hadaemon.etcd.decode_kv(responses[0]["response_range"]["kvs"][0])
    assert (holder["value"], holder["create"], holder["lease"]) == ("a", revision, lease)
    # A write guarded by the holder's create revision goes through; by another, not.
    guard = lambda rev: [hadaemon.etcd.etcd_compare(key, "CREATE", rev)]  # noqa: E731
    assert client.txn(guard(revision), [hadaemon.etcd.etcd_put(key + "/x", "1")])[0] is True
    assert client.txn(guard(revision + 1), [hadaemon.etcd.etcd_put(key + "/x", "2")])[0] is False
    assert client.range(key + "/x")[1][0]["value"] == "1"
    client.revoke(lease)
    # Once the holder's lease is gone the guard fails: a deposed leader cannot write.
    assert client.txn(guard(revision), [hadaemon.etcd.etcd_put(key + "/x", "3")])[0] is False


def test_an_error_answer_names_the_endpoint_and_the_reason(etcd_shared):
    client = hadaemon.etcd.EtcdClient(etcd_shared.endpoints, 1.0)
    with pytest.raises(hadaemon.etcd.EtcdError) as info:
        client.put(unique() + "k", "v", lease=12345)
    assert info.value.status == 404 and "lease not found" in str(info.value)
    assert not isinstance(info.value, hadaemon.etcd.EtcdUnknown)


def test_failover_between_endpoints_and_no_quorum_timeouts(etcd):
    client = hadaemon.etcd.EtcdClient(etcd.endpoints, 1.0)
    prefix = unique()
    lease, _ = client.grant(5)
    # Talk to a member that is not the raft leader (killing that one would add an election).
    raft_leader = etcd.leader()
    client.current = next(i for i, m in enumerate(etcd.members) if m is not raft_leader)
    client.put(prefix + "a", "1")
    first = client.last
    member = next(m for m in etcd.members if m.url == first.url)
    member.kill()
    # The kept-alive connection to the dead member is noticed; the call goes on.
    client.put(prefix + "b", "2")
    assert client.last.url != first.url
    assert client.keepalive(lease)[0] >= 1
    assert {kv["key"] for kv in client.range(prefix, prefix=True)[1]} == {prefix + "a", prefix + "b"}
    for _ in range(3):                      # each renewal goes to the next endpoint
        client.keepalive(lease)
    health = {h["endpoint"]: h for h in client.health()}
    assert health[first.url]["error"] == "Connection refused"
    assert all(health[m.url]["error"] is None and health[m.url]["last_ok"] for m in etcd.members
               if m is not member)
    # Two of three gone: a write never answers, only our timeout ends it, and its
    # outcome is unknown; a read and a renewal fail on every endpoint.
    second = next(m for m in etcd.members if m.running() and m.url != client.last.url)
    second.kill()
    started = time.monotonic()
    with pytest.raises(hadaemon.etcd.EtcdUnknown):
        client.put(prefix + "c", "3")
    assert 0.9 < time.monotonic() - started < 4
    started = time.monotonic()
    with pytest.raises(hadaemon.etcd.EtcdError) as info:
        client.range(prefix, prefix=True)
    assert "no etcd endpoint answered" in str(info.value) and "timed out" in str(info.value)
    assert time.monotonic() - started < 4
    with pytest.raises(hadaemon.etcd.EtcdError):
        client.keepalive(lease)
    # Back: the cluster answers again on the same client.
    etcd.restart(member)
    wait_for(lambda: _answers(client, prefix), timeout=10, what="etcd to answer again")


def _answers(client, prefix):
    try:
        client.range(prefix, prefix=True)
        return True
    except hadaemon.etcd.EtcdError:
        return False


def test_tls_with_a_client_certificate(tmp_path):
    tls = make_tls(tmp_path)
    cluster = EtcdCluster(tmp_path / "etcd", size=1, tls=tls)
    os.mkdir(cluster.root)
    try:
        cluster.start()
        settings = hadaemon.config.ClusterSettings(etcd=tuple(cluster.endpoints), name="c", node="a",
                                            etcd_ca=tls["ca"], etcd_cert=tls["client_cert"],
                                            etcd_key=tls["client_key"])
        client = hadaemon.etcd.EtcdClient.for_cluster(settings, 2.0)
        client.put("/tls/k", "v")
        assert client.range("/tls/k")[1][0]["value"] == "v"
        # Without the client certificate etcd refuses the handshake.
        bare = hadaemon.etcd.EtcdClient(cluster.endpoints, 2.0,
                                   hadaemon.netsettings.etcd_ssl_context(hadaemon.config.ClusterSettings(
                                       etcd=(), name="c", node="a", etcd_ca=tls["ca"])))
        with pytest.raises(hadaemon.etcd.EtcdError):
            bare.range("/tls/k")
        # And one that does not trust etcd's CA refuses etcd.
        untrusting = hadaemon.etcd.EtcdClient(cluster.endpoints, 2.0)
        with pytest.raises(hadaemon.etcd.EtcdError) as info:
            untrusting.range("/tls/k")
        assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    finally:
        cluster.stop()


def test_watch_streams_changes(etcd_shared):
    client = hadaemon.etcd.EtcdClient(etcd_shared.endpoints, 1.0)
    prefix = unique()
    revision, _ = client.range(prefix, prefix=True)
    watch = hadaemon.etcd.EtcdWatch(client.endpoints[0], prefix, revision + 1, 1.0)
    try:
        client.put(prefix + "a", "1")
        client.put(prefix + "b", "2")
        client.txn([], [hadaemon.etcd.etcd_delete(prefix + "a")])
        client.put("/elsewhere/" + prefix, "x")
        events = []

        def three():
            if hadaemon.proc._select_read([watch], 0.1):
                for doc in watch.read():
                    events.extend(doc["result"].get("events") or [])
            return len(events) >= 3
        wait_for(three, timeout=5, what="three events")
        seen = [(e.get("type", "PUT"), hadaemon.etcd.decode_kv(e["kv"])["key"]) for e in events]
        assert seen == [("PUT", prefix + "a"), ("PUT", prefix + "b"), ("DELETE", prefix + "a")]
    finally:
        watch.close()


# ============================================================================
# Which endpoint, and a lost answer settled (issue 20: a follower's fault costs nothing)
# ============================================================================

def test_endpoint_order_the_last_that_answered_first_the_silent_last():
    eps = [hadaemon.etcd.EtcdEndpoint("http://10.0.0.%d:2379" % i, None) for i in (1, 2, 3)]
    order = hadaemon.etcd.endpoint_order
    assert [ep.host for ep in order(eps, 0, 50.0)] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert [ep.host for ep in order(eps, 2, 50.0)] == ["10.0.0.3", "10.0.0.1", "10.0.0.2"]
    eps[2].down_until, eps[0].down_until = 60.0, 58.0        # gave no answer lately
    assert [ep.host for ep in order(eps, 2, 50.0)] == ["10.0.0.2", "10.0.0.1", "10.0.0.3"]
    assert [ep.host for ep in order(eps, 2, 59.0)] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert [ep.host for ep in order(eps, 2, 61.0)] == ["10.0.0.3", "10.0.0.1", "10.0.0.2"]


def test_a_client_keeps_to_the_endpoint_that_answered_and_demotes_a_failed_one():
    client = hadaemon.etcd.EtcdClient(["http://10.0.0.1:2379", "http://10.0.0.2:2379"], 0.5, demote=8.0)
    twin = client.twin(0.1)
    assert twin.endpoints is client.endpoints and twin.conns is not client.conns
    client._failed(client.endpoints[0], "timed out")            # seen by the twin too
    assert [ep.host for ep in twin._order(False)] == ["10.0.0.2", "10.0.0.1"]
    assert client.endpoints[0].down_until == pytest.approx(time.monotonic() + 8.0, abs=1.0)


class LostAnswers:
    """A client whose txns etcd applies (a dict of keys) and whose answers are lost while
    ``lose`` > 0: what the settling must make of it, without etcd."""

    def __init__(self, lose, apply_lost=True):
        self.kv, self.rev, self.lose, self.apply_lost, self.sent = {}, 100, lose, apply_lost, 0

    def _holds(self, cmp):
        kv = self.kv.get(hadaemon.etcd.unb64(cmp["key"]))
        field = {"CREATE": "create_revision", "MOD": "mod_revision", "VALUE": "value"}[cmp["target"]]
        if cmp["target"] == "VALUE":
            return kv is not None and kv["value"] == hadaemon.etcd.unb64(cmp["value"])
        have = (kv or {}).get({"CREATE": "create", "MOD": "mod"}[cmp["target"]], 0)
        want = int(cmp[field])
        return have < want if cmp["result"] == "LESS" else have == want

    def txn(self, compares, success, failure=()):
        self.sent += 1
        ok = all(self._holds(c) for c in compares)
        lost = self.lose > 0
        self.lose -= 1
        if ok and (self.apply_lost or not lost):
            self.rev += 1
            for op in success:
                put = op["request_put"] if "request_put" in op else None
                if put:
                    key = hadaemon.etcd.unb64(put["key"])
                    old = self.kv.get(key)
                    self.kv[key] = {"value": hadaemon.etcd.unb64(put["value"]), "lease": int(put.get("lease", 0)),
                                    "create": old["create"] if old else self.rev, "mod": self.rev}
        if lost:
            raise hadaemon.etcd.EtcdUnknown("http://x:1 /v3/kv/txn: no answer (timed out)")
        if ok:
            return True, self.rev, []
        responses = []
        for op in failure:
            kv = self.kv.get(hadaemon.etcd.unb64(op["request_range"]["key"]))
            responses.append({"response_range": {"kvs": [] if kv is None else [{
                "key": op["request_range"]["key"], "value": hadaemon.etcd.b64(kv["value"]),
                "lease": str(kv["lease"]), "create_revision": str(kv["create"]),
                "mod_revision": str(kv["mod"])}]}})
        return False, self.rev, responses


def settling_agent(client):
    settings = hadaemon.config.ClusterSettings(etcd=("http://127.0.0.1:1",), name="c", node="a", ttl=2)
    agent = hadaemon.cluster_agent.ClusterAgent(None, settings)
    agent.client = client
    return agent


@pytest.mark.parametrize("applied", [True, False], ids=["lost-but-applied", "lost-and-not-applied"])
def test_a_write_whose_answer_was_lost_is_sent_again_and_applies_once(applied):
    etcd = LostAnswers(lose=0)
    agent = settling_agent(etcd)
    won = agent.campaign({"lease": 7, "value": {"node": "a"}})
    epoch = won["epoch"]
    assert agent.guarded({"epoch": epoch, "seq": 1, "puts": {"ledger/x": 1}})["ok"] is True
    etcd.lose, etcd.apply_lost = 1, applied
    second = agent.guarded({"epoch": epoch, "seq": 2, "puts": {"ledger/x": 2}})
    assert second["ok"] is True, second
    assert etcd.sent == 4                                   # campaign, 1, 2 lost, 2 again
    assert json.loads(etcd.kv["/hadaemon/c/ledger/x"]["value"]) == 2
    assert json.loads(etcd.kv["/hadaemon/c/ledger/ticket"]["value"]) == {"epoch": epoch, "seq": 2}
    assert second["revision"] == etcd.kv["/hadaemon/c/ledger/ticket"]["mod"]
    # Sent again, write 1 (a late copy of it) no longer applies: its ticket is gone.
    replay = agent.guarded({"epoch": epoch, "seq": 1, "puts": {"ledger/x": 1}})
    assert replay["ok"] is False and json.loads(etcd.kv["/hadaemon/c/ledger/x"]["value"]) == 2
    assert "follows none applied" in replay["error"] and not replay.get("deposed")


def test_a_campaign_whose_answer_was_lost_is_won_by_its_holder_lease():
    etcd = LostAnswers(lose=1)
    won = settling_agent(etcd).campaign({"lease": 7, "value": {"node": "a"}})
    assert won == {"won": True, "epoch": etcd.kv["/hadaemon/c/leader"]["create"]}
    lost = settling_agent(etcd).campaign({"lease": 8, "value": {"node": "b"}})
    assert lost["won"] is False and lost["holder"]["lease"] == 7


def test_a_write_no_endpoint_answers_is_unknown_once_its_time_is_up():
    etcd = LostAnswers(lose=1000, apply_lost=False)
    agent = settling_agent(etcd)
    agent.settle_for = 0.2
    with pytest.raises(hadaemon.etcd.EtcdUnknown):
        agent.settled(lambda: etcd.txn([], []), lambda responses: False)
    assert etcd.sent >= 1


# ============================================================================
# The cluster agent, driven by a fake master
# ============================================================================

class FakeMaster:
    """A UNIX listener in the test, the cluster agent forked to it as the master would."""

    def __init__(self, tmp_path, settings):
        self.path = str(tmp_path / "m.sock")
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                code = hadaemon.cluster_agent.cluster_agent_main(self.path, settings)
            except BaseException:       # noqa: B036 - the child must reach os._exit
                code = 0
            finally:
                os._exit(code)
        self.listener.settimeout(10)
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(10)
        self.reader = hadaemon.wire.LineReader()
        self.pending = []
        self.kvs = {}           # the mirror: key -> kv
        self.revision = 0
        self.ids = iter(range(1, 1 << 30))
        hello = self.next()
        assert hello["t"] == "hello" and hello["role"] == "cluster" and hello["pid"] == self.pid

    def next(self, timeout=10):
        deadline = time.monotonic() + timeout
        while not self.pending:
            self.conn.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.conn.recv(1 << 20)
            assert data, "the agent hung up"
            self.pending.extend(self.reader.feed(data))
        msg = self.pending.pop(0)
        if msg["t"] == "snapshot":
            self.snapshot_part = getattr(self, "snapshot_part", {})
            self.snapshot_part.update({kv["key"]: kv for kv in msg["kvs"]})
            if msg["last"]:
                self.kvs, self.snapshot_part, self.revision = self.snapshot_part, {}, msg["revision"]
        elif msg["t"] == "events":
            for event in msg["events"]:
                if event["type"] == "delete":
                    self.kvs.pop(event["key"], None)
                else:
                    self.kvs[event["key"]] = event
                self.revision = max(self.revision, event["mod"])
        return msg

    def ask(self, **request):
        request["id"] = next(self.ids)
        self.conn.sendall(hadaemon.wire.encode_message(request))
        while True:
            msg = self.next()
            if msg["t"] == "reply" and msg["id"] == request["id"]:
                return msg

    def until(self, predicate, timeout=10):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out; mirror %s" % self.kvs
            try:
                self.next(timeout=0.2)
            except socket.timeout:
                pass

    def close(self):
        self.conn.close()
        self.listener.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return status
            time.sleep(0.02)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError("the agent did not leave when its master hung up")


def test_agent_leases_campaigns_guards_writes_and_mirrors(tmp_path, etcd_shared):
    name = "agent%d" % time.monotonic_ns()
    settings = hadaemon.config.ClusterSettings(etcd=tuple(etcd_shared.endpoints), name=name, node="a", ttl=2)
    a = FakeMaster(tmp_path, settings)
    b = None
    try:
        a.until(lambda: a.revision > 0)         # the first snapshot
        granted = a.ask(t="renew", lease=None, ttl=2)
        assert granted["granted"] and granted["ttl"] >= 2 and granted["lease"] > 0, granted
        lease = granted["lease"]
        renewed = a.ask(t="renew", lease=lease, ttl=2)
        assert renewed["ttl"] >= 2 and renewed["requests"] >= 3
        assert [e["endpoint"] for e in renewed["endpoints"]] == list(etcd_shared.endpoints)
        assert a.ask(t="put", key="members/a", value={"hosts": {"db1": "master"}}, lease=lease)["revision"]
        won = a.ask(t="campaign", lease=lease, value={"node": "a"})
        assert won["won"] and won["epoch"] > 0, won
        epoch = won["epoch"]
        a.until(lambda: "leader" in a.kvs and "members/a" in a.kvs)
        assert a.kvs["leader"]["create"] == epoch and a.kvs["leader"]["lease"] == lease
        assert a.kvs["leader"]["value"] == {"node": "a"}
        assert a.kvs["members/a"]["value"] == {"hosts": {"db1": "master"}}
        # A second member loses the campaign and learns the holder.
        (tmp_path / "b").mkdir()
        b = FakeMaster(tmp_path / "b", settings)
        lease_b = b.ask(t="renew", lease=None, ttl=2)["lease"]
        lost = b.ask(t="campaign", lease=lease_b, value={"node": "b"})
        assert lost["won"] is False and lost["holder"]["create"] == epoch and lost["holder"]["value"] == {"node": "a"}
        # The leader's guarded write goes through; one of a wrong epoch is refused,
        # and every later write of that epoch stays unsent.
        ok = a.ask(t="txn", epoch=epoch, puts={"ledger/meta": {"next_run": 2}}, deletes=[])
        assert ok["ok"] is True and ok["revision"] > epoch
        b.until(lambda: b.kvs.get("ledger/meta", {}).get("value") == {"next_run": 2})
        deposed = b.ask(t="txn", epoch=epoch + 1000, puts={"ledger/meta": {"x": 1}}, deletes=[])
        assert deposed["ok"] is False and deposed["deposed"]
        after = b.ask(t="txn", epoch=epoch + 1000, puts={"ledger/meta": {"x": 2}}, deletes=[])
        assert after["ok"] is False and "earlier write" in after["error"]
        # The leader resigns: its keys go, and the other member sees it.
        a.ask(t="revoke", lease=lease)
        b.until(lambda: "leader" not in b.kvs and "members/a" not in b.kvs)
        assert b.ask(t="renew", lease=lease, ttl=2)["ttl"] == 0          # a lost lease reads 0
        assert b.kvs["ledger/meta"]["value"] == {"next_run": 2}
        won = b.ask(t="campaign", lease=lease_b, value={"node": "b"})
        assert won["won"] and won["epoch"] > epoch
    finally:
        status = a.close()
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        if b is not None:
            b.close()


class AnswerEater:
    """A TCP proxy to one etcd endpoint that passes requests on and, while ``eat`` is
    set, drops etcd's answers: a write etcd applied whose answer is lost."""

    def __init__(self, url):
        import threading
        self.upstream = tuple(url.split("//", 1)[1].rsplit(":", 1))
        self.eat = False
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = "http://127.0.0.1:%d" % self.listener.getsockname()[1]
        self.socks = []
        self.threading = threading
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection((self.upstream[0], int(self.upstream[1])))
            self.socks += [client, server]
            self.threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            self.threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src, dst, answers):
        while True:
            try:
                data = src.recv(65536)
                if not data:
                    return
                if not (answers and self.eat):
                    dst.sendall(data)
            except OSError:
                return

    def close(self):
        self.listener.close()
        for s in self.socks:
            s.close()


def test_a_renewal_races_past_a_silent_endpoint(etcd_shared):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)                    # connects, takes the request, never answers
    silent_url = "http://127.0.0.1:%d" % silent.getsockname()[1]
    try:
        client = hadaemon.etcd.EtcdClient([silent_url] + list(etcd_shared.endpoints), 1.0, demote=30.0)
        lease = int(client.call("/v3/lease/grant", {"TTL": 5}, idempotent=True)["ID"])
        client.current = 0
        ttl, _ = client.keepalive(lease, stagger=0.2, budget=5.0)
        assert ttl >= 1
        health = {h["endpoint"]: h for h in client.health()}
        assert health[silent_url]["error"] == "timed out" and client.last.url != silent_url
        sent = client.requests
        for _ in range(4):                  # demoted: the renewals go round the others
            client.keepalive(lease, stagger=0.2, budget=5.0)
        assert client.requests == sent + 4 and client.last.url != silent_url
        client.revoke(lease)
    finally:
        silent.close()


def test_a_write_whose_answer_was_lost_is_settled_through_another_endpoint(tmp_path, etcd_shared):
    eater = AnswerEater(etcd_shared.endpoints[0])
    name = "settle%d" % time.monotonic_ns()
    settings = hadaemon.config.ClusterSettings(etcd=(eater.url,) + tuple(etcd_shared.endpoints[1:]),
                                               name=name, node="a", ttl=2)
    a = FakeMaster(tmp_path, settings)
    try:
        lease = a.ask(t="renew", lease=None, ttl=2)["lease"]
        epoch = a.ask(t="campaign", lease=lease, value={"node": "a"})["epoch"]
        assert a.ask(t="txn", epoch=epoch, seq=1, puts={"ledger/x": 1}, deletes=[])["ok"] is True
        eater.eat = True                    # etcd applies write 2; its answer is lost
        written = a.ask(t="txn", epoch=epoch, seq=2, puts={"ledger/x": 2}, deletes=[])
        assert written["ok"] is True, written
        errors = {e["endpoint"]: e["error"] for e in written["endpoints"]}
        assert errors[eater.url] == "timed out", errors
        client = hadaemon.etcd.EtcdClient(etcd_shared.endpoints, 1.0)
        _, kvs = client.range("/hadaemon/%s/ledger/" % name, prefix=True)
        got = {kv["key"].rsplit("/", 1)[1]: (json.loads(kv["value"]), kv["mod"]) for kv in kvs}
        assert got["x"][0] == 2 and got["ticket"][0] == {"epoch": epoch, "seq": 2}
        assert written["revision"] == got["ticket"][1]      # the revision it was applied at
        # A write the first endpoint never passed on: sent again, it applies there.
        eater.eat = False
        third = a.ask(t="txn", epoch=epoch, seq=3, puts={"ledger/x": 3}, deletes=[])
        assert third["ok"] is True and third["revision"] > written["revision"]
        # A late copy of write 2 applies no more: its ticket moved on.
        compare = [hadaemon.etcd.etcd_compare("/hadaemon/%s/leader" % name, "CREATE", epoch),
                   hadaemon.etcd.etcd_compare("/hadaemon/%s/ledger/ticket" % name, "VALUE",
                                              hadaemon.cluster_agent.ticket(epoch, 1))]
        assert client.txn(compare, [hadaemon.etcd.etcd_put("/hadaemon/%s/ledger/x" % name, "2")])[0] is False
        a.ask(t="revoke", lease=lease)
    finally:
        a.close()
        eater.close()


def test_agent_without_etcd_quorum_answers_within_its_timeout(tmp_path, etcd):
    settings = hadaemon.config.ClusterSettings(etcd=tuple(etcd.endpoints), name="q", node="a", ttl=2)
    a = FakeMaster(tmp_path, settings)
    try:
        lease = a.ask(t="renew", lease=None, ttl=2)["lease"]
        epoch = a.ask(t="campaign", lease=lease, value={"node": "a"})["epoch"]
        etcd.members[0].kill()
        etcd.members[1].kill()
        # A raft leader left alone renews leases until it notices (an election
        # timeout later); then a renewal fails on every endpoint, ended by our own
        # timeouts (etcd's own would take 7 s, or never come).
        took = []

        def renewal_fails():
            started = time.monotonic()
            renewed = a.ask(t="renew", lease=lease, ttl=2)
            took.append(time.monotonic() - started)
            return renewed.get("error")
        error = wait_for(renewal_fails, timeout=10, interval=0.1, what="a renewal to fail")
        assert "no etcd endpoint answered" in error and "timed out" in error, error
        assert max(took) < 3, took
        started = time.monotonic()
        written = a.ask(t="txn", epoch=epoch, puts={"ledger/x": 1}, deletes=[])
        assert written.get("unknown") is True, written
        assert time.monotonic() - started < 3
        # The epoch is stopped: nothing later of it is sent, even once etcd is back.
        etcd.restart(etcd.members[0])
        later = a.ask(t="txn", epoch=epoch, puts={"ledger/y": 1}, deletes=[])
        assert later["ok"] is False and "earlier write" in later["error"]
        errors = {e["endpoint"]: e["error"] for e in later["endpoints"]}
        assert errors[etcd.members[1].url] == "Connection refused"
    finally:
        a.close()


# ============================================================================
# The member's logic alone: quorum, the lease clock, roles (no process)
# ============================================================================

@pytest.mark.parametrize("current,seen,quorum,expected", [
    ("master", {"a": "down"}, 1, "down"),
    ("master", {"a": "down", "b": "master"}, 1, None),              # a tie keeps the state
    ("master", {"a": "down", "b": "master", "c": "down"}, 2, "down"),
    ("master", {"a": "down", "b": "master", "c": "master"}, 1, None),
    ("master", {"a": "down"}, 2, None),                             # one watcher alone: nothing
    ("master", {"a": "down", "b": "down"}, 2, "down"),
    ("unknown", {"a": "master"}, 1, "master"),
    ("unknown", {"a": "master", "b": "slave"}, 1, None),            # two candidates tie
    ("unknown", {"a": "master", "b": "slave", "c": "slave"}, 1, "slave"),
    ("master", {"a": "master", "b": "master"}, 1, None),
    ("master", {}, 1, None),
    ("master", {"a": "down", "b": "unknown", "c": "unknown"}, 2, "unknown"),
])
def test_agreed_state(current, seen, quorum, expected):
    assert hadaemon.cluster_member.agreed_state(current, seen, quorum) == expected


class Member:
    """A ClusterMember with a pretend agent: the test answers its requests."""

    def __init__(self, node="a", ttl=2, quorum=1):
        settings = hadaemon.config.ClusterSettings(etcd=("http://127.0.0.1:1",), name="c", node=node, ttl=ttl,
                                            quorum=quorum)
        self.now = 100.0
        self.m = hadaemon.cluster_member.ClusterMember(settings, self.now)
        self.revision = 10

    def tick(self, dt=0.0):
        self.now += dt
        self.m.tick(self.now)
        return self.m.take_requests()

    def reply(self, request, **fields):
        self.m.on_message(dict(fields, t="reply", id=request["id"]), self.now)

    def event(self, key, value=None, lease=0, create=None, delete=False):
        self.revision += 1
        self.m.on_message({"t": "events", "revision": self.revision, "events": [
            {"type": "delete" if delete else "put", "key": key, "value": value, "lease": lease,
             "create": create or self.revision, "mod": self.revision}]}, self.now)
        return self.revision

    def join(self, lease=7):
        """Granted a lease, an empty snapshot: a follower."""
        renew = self.tick()[0]
        assert renew["t"] == "renew" and renew["lease"] is None
        self.reply(renew, lease=lease, ttl=self.m.settings.ttl, granted=True)
        self.m.on_message({"t": "snapshot", "revision": self.revision, "kvs": [], "last": True}, self.now)
        assert self.m.role == "follower"

    def lead(self):
        """Join, campaign, win, see our key: the acting leader; returns the epoch."""
        self.join()
        campaign = next(r for r in self.tick() if r["t"] == "campaign")
        self.reply(campaign, won=True, epoch=self.revision + 1)
        assert self.m.role == "leader" and not self.m.acting      # not before the mirror shows it
        assert self.m.may_start(self.now) is None
        epoch = self.event("leader", {"node": self.m.node}, lease=self.m.lease)
        assert self.m.acting and ("acting", epoch) in self.m.notes
        return epoch

    def renew(self, dt, **answer):
        """Let ``dt`` pass, then answer the renewal that is due."""
        requests = self.tick(dt)
        renew = next(r for r in requests if r["t"] == "renew")
        self.reply(renew, **(answer or {"lease": self.m.lease, "ttl": self.m.settings.ttl}))
        return renew


def test_member_joins_publishes_its_view_and_campaigns():
    t = Member()
    t.join()
    t.m.set_view({"db1": "master"})
    requests = t.tick()
    put = next(r for r in requests if r["t"] == "put")
    assert put["key"] == "members/a" and put["value"]["hosts"] == {"db1": "master"} and put["lease"] == 7
    assert next(r for r in requests if r["t"] == "campaign")["lease"] == 7
    t.reply(put, revision=12)
    assert t.tick() == []                       # nothing changed: nothing sent (no renewal due yet)
    t.m.set_view({"db1": "master"})
    assert [r["t"] for r in t.tick(0.5)] == ["renew"]       # a quarter ttl later


def test_a_leader_acts_only_while_its_lease_clock_runs():
    t = Member(ttl=2)
    t.lead()
    start = t.now
    assert t.m.may_start(t.now) == pytest.approx(start + 1.0)   # renewed at start: stop half a ttl later
    t.renew(0.5)
    assert t.m.may_start(t.now) == pytest.approx(start + 0.5 + 1.0)
    # A renewal fails: no new command, though the lease still runs; it is tried
    # again soon, and one that succeeds lets commands start again.
    t.renew(0.5, error="no etcd endpoint answered")
    assert t.m.may_start(t.now) is None and t.m.role == "leader"
    t.renew(0.125)
    assert t.m.may_start(t.now) == pytest.approx(t.now + 1.0)
    # Then they fail, answered or not: half a ttl after the last one sent that
    # succeeded, the leader steps down.
    last_good = t.now
    t.renew(0.5, error="no etcd endpoint answered")
    assert [r["t"] for r in t.tick(0.125)] == ["renew"]     # sent, never answered
    t.tick(0.25)
    assert t.now < last_good + 1.0 and t.m.stepping is None
    t.tick(last_good + 1.0 - t.now)
    assert t.m.stepping is not None and ("step_down", "its lease could not be renewed in time") in t.m.notes
    assert t.m.stepping["kill_at"] <= t.m.valid_until - 0.5         # killed a quarter ttl before
    t.m.stepped_down(t.now)
    revoke = t.m.take_requests()
    assert [r["t"] for r in revoke] == ["revoke"] and revoke[0]["lease"] == 7
    assert t.m.role == "none" and t.m.lease is None and t.m.may_start(t.now) is None


def test_a_leader_frozen_past_its_lease_steps_down_before_anything():
    t = Member(ttl=2)
    t.lead()
    renew = t.tick(0.5)[0]                     # a renewal sent just before the freeze
    t.now += 10                                # SIGSTOP ... SIGCONT
    assert t.m.may_start(t.now) is None        # asked before the loop's tick: no
    t.reply(renew, lease=7, ttl=2)             # the agent ran on: renewed, but from before
    assert t.m.may_start(t.now) is None
    t.tick()
    assert t.m.stepping is not None and t.m.role == "leader"
    assert t.m.status(t.now).role == "follower"


def test_a_leader_whose_key_goes_or_whose_write_fails_steps_down():
    t = Member()
    epoch = t.lead()
    t.event("leader", delete=True)
    assert t.m.stepping and "leader key is gone" in t.m.stepping["why"]
    t = Member()
    epoch = t.lead()
    write = t.m.write({"ledger/meta": {"next_run": 2}})
    assert write is not None
    txn = t.m.take_requests()[-1]
    assert txn["t"] == "txn" and txn["epoch"] == epoch
    t.reply(txn, error="timed out", unknown=True)
    assert ("written", write, "unknown", "timed out") in t.m.notes and t.m.stepping
    # Stepping down, it still writes (the run it ends, if etcd takes it: the agent sends
    # nothing more of an epoch whose write failed); once it has resigned, nothing.
    assert t.m.write({"x": 1}) is not None
    t.m.stepped_down(t.now)
    assert t.m.write({"x": 1}) is None


def test_a_campaign_won_whose_answer_was_lost_is_seen_in_the_mirror():
    t = Member()
    t.join()
    campaign = next(r for r in t.tick() if r["t"] == "campaign")
    t.reply(campaign, error="no answer", unknown=True)
    assert t.m.role == "follower"
    epoch = t.event("leader", {"node": "a"}, lease=7)
    assert t.m.role == "leader" and t.m.epoch == epoch and t.m.acting


def test_a_follower_sees_the_leader_and_every_view():
    t = Member(node="b", quorum=2)
    t.join(lease=8)
    t.event("members/a", {"hosts": {"db1": "down"}}, lease=7)
    t.event("leader", {"node": "a"}, lease=7)
    assert [r["t"] for r in t.tick() if r["t"] == "campaign"] == []    # a leader exists
    t.m.set_view({"db1": "master"})
    assert t.m.leader() == ("a", t.revision)
    assert t.m.views() == {"a": {"db1": "down"}, "b": {"db1": "master"}}
    assert t.m.agreement({"db1": "master"}) == []                       # one of two: no
    t.event("members/c", {"hosts": {"db1": "down"}}, lease=9)
    assert t.m.agreement({"db1": "master"}) == [("db1", "down", ["a", "c"])]
    t.event("members/c", delete=True)                                  # c's lease expired
    assert t.m.agreement({"db1": "master"}) == []
    doc = t.m.status(t.now).to_wire()
    assert (doc["role"], doc["leader"], doc["quorum"]) == ("follower", "a", 2)
    assert doc["members"] == {"a": {"hosts": {"db1": "down"}}, "b": {"hosts": {"db1": "master"}}}


# ============================================================================
# Three daemons on one etcd: the scenarios
# ============================================================================
#
# Each daemon has its own config dir, state dir and world (the files its check
# reads: so each member can see something else).  Every action command appends to
# one shared log: a "start" line (node, epoch, time, run, command, host,
# transition), a "beat" every 50 ms while it runs, and an "end" line; so a test
# can tell who ran what, and that no two commands ran at the same moment (a
# command killed with SIGKILL ran until its last beat, at most 50 ms before).

ACT = """#!/bin/bash
log=%(log)s
steps=$(cat %(steps)s 2>/dev/null || echo 2)
echo "start $HA_NODE $HA_LEADER_EPOCH $EPOCHREALTIME $HA_RUN_ID $1 $HA_HOST $HA_TRANSITION $HA_CLUSTER" >> "$log"
for ((i = 0; i < steps; i++)); do
    sleep 0.05
    echo "beat $HA_NODE $HA_LEADER_EPOCH $EPOCHREALTIME $HA_RUN_ID $1" >> "$log"
done
echo "end $HA_NODE $HA_LEADER_EPOCH $EPOCHREALTIME $HA_RUN_ID $1" >> "$log"
"""


class Command:
    """One action command as the shared log saw it."""

    def __init__(self, fields):
        self.node, self.epoch, self.start, self.run, self.index = \
            fields[1], int(fields[2]), float(fields[3]), int(fields[4]), int(fields[5])
        self.host, self.transition, self.cluster = fields[6], fields[7], fields[8]
        self.last = self.start          # its last sign of life
        self.ended = False

    def __repr__(self):
        return "<run %d cmd %d on %s epoch %d %.3f-%.3f%s>" % (
            self.run, self.index, self.node, self.epoch, self.start, self.last, "" if self.ended else " cut")


def acting_leader(docs):
    """(node, epoch) when every member's cluster block in ``docs`` (node -> block) names
    one leader, that one leads and acts, and every other one follows; else None."""
    leaders = {(doc["leader"], doc["epoch"]) for doc in docs.values()}
    if len(leaders) != 1:
        return None
    node, epoch = leaders.pop()
    if node is None or node not in docs or docs[node]["role"] != "leader" or not docs[node].get("acting"):
        return None
    if any(doc["role"] != "follower" for n, doc in docs.items() if n != node):
        return None
    return node, epoch


class HaCluster:
    """Three hadaemon daemons (nodes a, b, c) in one cluster on the ``etcd`` fixture."""

    def __init__(self, tmp_path, etcd, nodes=("a", "b", "c"), ttl=2, quorum=1, interval="150ms",
                 confirm=1, hosts=("db1", "db2")):
        from conftest import Daemon
        self.etcd = etcd
        self.log = tmp_path / "actions.log"
        self.steps = tmp_path / "steps"
        self.ttl, self.interval = ttl, hadaemon.base.parse_duration(interval)
        self.daemons = {}
        for node in nodes:
            d = Daemon(tmp_path / node)
            d.role_check()
            d.script("actions/act", ACT.split("\n", 1)[1] % {"log": self.log, "steps": self.steps},
                     shebang="#!/bin/bash")
            d.write("checks.conf", """
                [daemon]
                interval = %s
                confirm = %d
                workers = 1
                action_timeout = 20s

                [cluster]
                etcd = %s
                name = test
                node = %s
                ttl = %ds
                quorum = %d

                [local]
                %s
            """ % (interval, confirm, ", ".join(etcd.endpoints), node, ttl, quorum,
                   "\n                ".join("check_role %s" % h for h in hosts)))
            d.write("actions.conf", """
                [any_to_any]
                act 1
                act 2
            """)
            self.daemons[node] = d

    # -- the world -------------------------------------------------------------------

    def set(self, host, state, nodes=None):
        for node in nodes or self.daemons:
            self.daemons[node].set(host, state)

    def command_length(self, steps):
        """How many 50 ms beats each command lasts from now on."""
        self.steps.write_text("%d\n" % steps)

    # -- the daemons -----------------------------------------------------------------

    def start(self, *nodes):
        for node in nodes or self.daemons:
            self.daemons[node].start(wait=False)
        for node in nodes or self.daemons:
            d = self.daemons[node]
            wait_for(lambda: d.proc.poll() is not None or d.running(), timeout=20,
                     what="daemon %s to answer" % node)
            assert d.proc.poll() is None, "daemon %s exited at start:\n%s" % (node, d.tail())

    def up(self):
        return [n for n, d in self.daemons.items() if d.proc is not None and d.proc.poll() is None]

    def status(self, node):
        try:
            return self.daemons[node].ask("status", timeout=5)
        except (OSError, hadaemon.base.HadaemonError):
            return None

    def clusters(self):
        """node -> daemon.cluster of every daemon that answers."""
        out = {}
        for node in self.up():
            doc = self.status(node)
            if doc is not None:
                out[node] = doc["daemon"]["cluster"]
        return out

    def leader(self, timeout=None, without=(), all_up=True):
        """(node, epoch) once every live daemon agrees on one acting leader (with
        ``all_up=False``: every one that answers yet, a restarted one may not)."""
        def agreed():
            docs = self.clusters()
            if not docs or (all_up and any(n not in docs for n in self.up())):
                return None
            agreed_on = acting_leader(docs)
            return None if agreed_on is None or agreed_on[0] in without else agreed_on
        return wait_for(agreed, timeout=timeout or 4 * self.ttl + 10, interval=0.05,
                        what="the daemons to agree on a leader (%s)" % self.tails())

    def ledger(self, node=None):
        """--history of one daemon: transitions by id, runs by id (oldest first)."""
        node = node or self.up()[0]
        entries = self.daemons[node].ask("history", n=100000)["history"]
        trs, runs = {}, {}
        for entry in sorted(entries, key=lambda e: e["id"]):
            run = entry.get("run")
            trs[entry["id"]] = dict(entry, run=run["id"] if run else None)
            if run:
                runs[run["id"]] = run
        return trs, runs

    def settled(self, expect, node=None):
        """True when the ledger holds ``expect`` (host -> state) and no run is left to run."""
        node = node or self.up()[0]
        doc = self.status(node)
        if doc is None:
            return False
        states = {h: v["state"] for h, v in doc["hosts"].items()}
        if any(states.get(h) != s for h, s in expect.items()):
            return False
        return not doc["daemon"]["queue"] and all(r["state"] not in ("queued", "running")
                                                    for r in doc["runs"])

    def wait_settled(self, expect, timeout=30):
        wait_for(lambda: all(self.settled(expect, n) for n in self.up()), timeout=timeout,
                 interval=0.1, what="every daemon to show %s, nothing left to run (%s)" % (expect, self.tails()))

    def commands(self):
        """Every command of the shared log, in the order they started."""
        found = {}
        try:
            lines = self.log.read_text().splitlines()
        except FileNotFoundError:
            return []
        for line in lines:
            fields = line.split()
            key = (fields[1], fields[4], fields[5])         # node, run, command
            if fields[0] == "start":
                found[key] = Command(fields)
            elif key in found:
                found[key].last = max(found[key].last, float(fields[3]))
                found[key].ended = found[key].ended or fields[0] == "end"
        return sorted(found.values(), key=lambda c: c.start)

    def overlaps(self, commands=None):
        """Pairs of commands that ran at the same moment (one started before the other's last beat)."""
        commands = commands if commands is not None else self.commands()
        out = []
        for i, c in enumerate(commands):
            for other in commands[i + 1:]:
                if other.start < c.last:
                    out.append((c, other))
        return out

    def tails(self):
        return "\n".join("--- %s:\n%s" % (n, d.tail(15)) for n, d in self.daemons.items())

    def cleanup(self):
        for d in self.daemons.values():
            d.cleanup()


@pytest.fixture
def ha(tmp_path, etcd):
    """Make an HaCluster with ``ha(**settings)``; every daemon is killed at teardown."""
    made = []

    def make(**kwargs):
        cluster = HaCluster(tmp_path, etcd, **kwargs)
        made.append(cluster)
        return cluster
    yield make
    for cluster in made:
        cluster.cleanup()


def sequences(commands):
    """run id -> the nodes that started its first command (more than one: it ran twice)."""
    out = {}
    for c in commands:
        if c.index == 1:
            out.setdefault(c.run, []).append(c.node)
    return out


def test_one_member_acts(ha):
    """Every sequence runs exactly once, on the leader; all agree on leader and epoch."""
    cl = ha()
    cl.set("db1", "master")
    cl.set("db2", "slave")
    cl.start()
    leader, epoch = cl.leader()
    cl.wait_settled({"db1": "master", "db2": "slave"})
    cl.set("db1", "slave")
    cl.set("db2", "master")
    cl.wait_settled({"db1": "slave", "db2": "master"})
    assert cl.leader(timeout=5) == (leader, epoch)
    trs, runs = cl.ledger(leader)
    assert sorted((t["host"], t["from"], t["to"]) for t in trs.values()) == [
        ("db1", "master", "slave"), ("db1", "unknown", "master"),
        ("db2", "slave", "master"), ("db2", "unknown", "slave")]
    assert sorted(trs) == list(range(1, 5))
    assert all(r["state"] == "ok" for r in runs.values()), runs
    commands = cl.commands()
    assert sequences(commands) == {run: [leader] for run in runs}
    assert len(commands) == 2 * len(runs) and all(c.ended for c in commands)
    assert {(c.node, c.epoch, c.cluster) for c in commands} == {(leader, epoch, "test")}
    assert cl.overlaps(commands) == []
    # Every member holds the same ledger in its own state db.
    for node in cl.daemons:
        assert cl.ledger(node) == (trs, runs)
    for node, doc in cl.clusters().items():
        assert set(doc["members"]) == {"a", "b", "c"}
        assert doc["members"][node]["hosts"] == {"db1": "slave", "db2": "master"}
    # an endpoint is "ok" when it answered within ttl: on a loaded machine one may lag a
    # pass, so every member's list is read until all say so (bounded)
    wait_for(lambda: all(all(e["ok"] for e in doc["etcd"]) for doc in cl.clusters().values()),
             timeout=10, what="every member to see every etcd endpoint answering")


def test_leader_killed_mid_sequence(ha):
    """kill -9 of the leader while its command runs and another run waits: a new leader
    within ttl plus an interval, the running run interrupted and never run again, the
    queued one run once, later transitions run once."""
    cl = ha(hosts=("db1",))
    cl.set("db1", "master")
    cl.start()
    leader, epoch = cl.leader()
    cl.wait_settled({"db1": "master"})
    cl.command_length(40)                               # 2 s per command
    cl.set("db1", "slave")
    started = wait_for(lambda: [c for c in cl.commands() if c.transition == "master_to_slave"],
                       timeout=15, what="the sequence to start")[0]
    assert started.node == leader
    cl.command_length(2)
    cl.set("db1", "master")                             # the next run queues behind it
    queued = wait_for(lambda: cl.status(leader)["daemon"]["queue"], timeout=10, what="a queued run")
    cl.daemons[leader].kill9()
    killed = time.monotonic()
    new, new_epoch = cl.leader(without=(leader,))
    took = time.monotonic() - killed
    assert new != leader and new_epoch > epoch
    cl.wait_settled({"db1": "master"})
    trs, runs = cl.ledger(new)
    assert runs[started.run]["state"] == "interrupted", runs[started.run]
    assert "its leader (%s, epoch %d) lost the lead" % (leader, epoch) in runs[started.run]["reason"]
    assert [runs[r]["state"] for r in queued] == ["ok"] and runs[queued[0]]["node"] == new
    # A later transition runs once, on the new leader, with its epoch.
    cl.set("db1", "slave")
    cl.wait_settled({"db1": "slave"})
    trs, runs = cl.ledger(new)
    assert [t["to"] for t in trs.values()] == ["master", "slave", "master", "slave"]
    commands = cl.commands()
    assert sequences(commands) == {r: [leader if r <= started.run else new] for r in runs}
    assert [(c.node, c.index) for c in commands if c.run == started.run] == [(leader, 1)]  # never again
    for run in queued + [max(runs)]:
        assert [(c.node, c.epoch, c.ended) for c in commands if c.run == run] == [(new, new_epoch, True)] * 2
    assert cl.overlaps(commands) == []
    hadaemon_figure("leader kill -9 -> new leader acting in %.2fs (ttl %ds, interval %s)"
                    % (took, cl.ttl, hadaemon.base.format_duration(cl.interval)))


def hadaemon_figure(line):
    from conftest import figure
    figure("cluster: " + line)


def test_quorum_of_two(ha):
    """One member seeing db1 down changes nothing; when a second does, it fails over once."""
    cl = ha(quorum=2, hosts=("db1",))
    cl.set("db1", "master")
    cl.start()
    leader, _ = cl.leader()
    cl.wait_settled({"db1": "master"})
    before = len(cl.commands())
    lonely = next(n for n in cl.daemons if n != leader)
    cl.set("db1", "down", nodes=[lonely])
    # Every member (the leader too) sees the lonely view; nothing moves.
    wait_for(lambda: all(doc["members"].get(lonely, {}).get("hosts", {}).get("db1") == "down"
                         for doc in cl.clusters().values()), timeout=10, what="the view to spread")
    for _ in range(5):
        time.sleep(cl.interval)
        assert cl.status(leader)["hosts"]["db1"]["state"] == "master"
    assert len(cl.commands()) == before
    second = next(n for n in cl.daemons if n not in (leader, lonely))
    cl.set("db1", "down", nodes=[second])
    cl.wait_settled({"db1": "down"})
    trs, runs = cl.ledger(leader)
    assert [(t["from"], t["to"]) for t in trs.values()] == [("unknown", "master"), ("master", "down")]
    assert [c.transition for c in cl.commands()[before:]] == ["master_to_down"] * 2
    # The leader itself still sees master: two of three see down, the tie-breaker is the count.
    assert cl.status(leader)["daemon"]["cluster"]["members"][leader]["hosts"]["db1"] == "master"
    assert cl.overlaps() == []


def test_etcd_quorum_lost(ha, etcd):
    """Two of three etcd members gone: nobody starts a command; back: the change is
    acted on once and nothing recorded is lost."""
    cl = ha(hosts=("db1",))
    cl.set("db1", "master")
    cl.start()
    leader, epoch = cl.leader()
    cl.wait_settled({"db1": "master"})
    trs_before, runs_before = cl.ledger(leader)
    before = len(cl.commands())
    raft_leader = etcd.leader()
    dead = [raft_leader] + [m for m in etcd.members if m is not raft_leader][:1]
    for m in dead:
        m.kill()
    cl.set("db1", "slave")
    # Every member notices, each its own way: none stays acting, all keep checking.
    wait_for(lambda: all(doc["role"] == "none" for doc in cl.clusters().values()), timeout=4 * cl.ttl + 5,
             what="every member to leave the cluster (%s)" % cl.tails())
    lost_at = time.monotonic()
    wait_for(lambda: time.monotonic() > lost_at + cl.ttl, timeout=cl.ttl + 1)
    assert len(cl.commands()) == before, cl.commands()[before:]
    for node in cl.daemons:
        doc = cl.status(node)
        assert doc["hosts"]["db1"]["state"] == "master"              # the copy in each db
        assert doc["daemon"]["cluster"]["members"] == {} and doc["daemon"]["cluster"]["leader"] is None
    for m in dead:
        etcd.restart(m)
    cl.wait_settled({"db1": "slave"}, timeout=30)
    new, new_epoch = cl.leader()
    assert new_epoch > epoch
    trs, runs = cl.ledger(new)
    assert {k: trs[k] for k in trs_before} == trs_before                # nothing lost
    assert [(t["from"], t["to"]) for t in trs.values()] == [("unknown", "master"), ("master", "slave")]
    later = cl.commands()[before:]
    assert [(c.transition, c.node) for c in later] == [("master_to_slave", new)] * 2
    assert cl.overlaps() == []


def test_frozen_leader_starts_nothing_after_it_thaws(ha):
    """SIGSTOP the leader past its lease, SIGCONT: no command from it after it thaws."""
    cl = ha(hosts=("db1",))
    cl.set("db1", "master")
    cl.start()
    leader, epoch = cl.leader()
    cl.wait_settled({"db1": "master"})
    cl.command_length(60)                               # 3 s: longer than the lease
    cl.set("db1", "slave")
    first = wait_for(lambda: [c for c in cl.commands() if c.transition == "master_to_slave"],
                     timeout=15, what="the sequence to start")[0]
    # Frozen while its first command runs: the command's own action run ends it
    # before the lease could run out (the master cannot), the second never starts.
    master = cl.daemons[leader].proc.pid
    os.kill(master, signal.SIGSTOP)
    cl.command_length(6)
    try:
        others = [n for n in cl.daemons if n != leader]

        def took_over():
            docs = {n: cl.status(n) for n in others}
            leaders = {(d["daemon"]["cluster"]["leader"], d["daemon"]["cluster"]["epoch"])
                       for d in docs.values() if d}
            return len(leaders) == 1 and next(iter(leaders))[0] in others and next(iter(leaders))
        new, new_epoch = wait_for(took_over, timeout=4 * cl.ttl + 10, interval=0.05,
                                  what="another member to lead")
        cl.set("db1", "master")                         # something for both to act on
        wait_for(lambda: [c for c in cl.commands() if c.node == new], timeout=15,
                 what="the new leader to act")
    finally:
        thawed = time.time()
        os.kill(master, signal.SIGCONT)
    cl.wait_settled({"db1": "master"})
    wait_for(lambda: cl.status(leader) and cl.status(leader)["daemon"]["cluster"]["role"] == "follower",
             timeout=10, what="the thawed member to follow")
    cl.set("db1", "slave")
    cl.wait_settled({"db1": "slave"})
    commands = cl.commands()
    late = [c for c in commands if c.node == leader and c.start > thawed]
    assert late == [], late
    assert new_epoch > epoch
    trs, runs = cl.ledger(new)
    assert runs[first.run]["state"] == "interrupted", runs[first.run]
    cut = [c for c in commands if (c.run, c.index) == (first.run, first.index)][0]
    assert not cut.ended and cut.last - cut.start < 3.0, cut
    assert [c.index for c in commands if c.run == first.run] == [1]     # the second never started
    assert cl.overlaps(commands) == []


SEED = int(os.environ.get("HADAEMON_CLUSTER_SEED") or time.time())
KILLS = int(os.environ.get("HADAEMON_CLUSTER_KILLS") or 20)


def test_kill_loop(ha):
    """Leader after leader killed with -9 at random moments while the world flips:
    no sequence runs twice, no transition is lost, no two commands run at once."""
    from conftest import figure, pids_in_group
    rng = random.Random(SEED)
    cl = ha(ttl=1, interval="100ms", hosts=("db1",))
    cl.command_length(3)                        # 150 ms per command, two per sequence
    state = "master"
    cl.set("db1", state)
    cl.start()
    takeovers, flips, carried = [], 0, set()
    begun = time.monotonic()
    for k in range(KILLS):
        leader, _ = cl.leader(all_up=False)     # the last one killed may still be starting
        if k == 0 or rng.random() < 0.8:
            for i in range(2 if rng.random() < 0.4 else 1):     # twice: a run queues behind
                if i:
                    time.sleep(rng.uniform(0.15, 0.3))
                state = "slave" if state == "master" else "master"
                cl.set("db1", state)
                flips += 1
        time.sleep(rng.uniform(0.0, 0.6))       # idle, or mid-sequence, or between commands
        d = cl.daemons[leader]
        pid = d.proc.pid
        doc = cl.status(leader)
        carried |= set(doc["daemon"]["queue"]) if doc else set()
        d.kill9()
        killed = time.monotonic()
        wait_for(lambda: not (set(pids_in_group(pid)) | set(d.descendants())), timeout=15,
                 what="the killed leader's processes to go")
        d.started.remove(pid)                   # gone, group and all: its pid may be reused
        cl.leader(without=(leader,), all_up=False)
        takeovers.append(time.monotonic() - killed)
        d.start(wait=False)                     # back on its state dir, as a follower
    for node, d in cl.daemons.items():
        wait_for(lambda: d.proc.poll() is not None or d.running(), timeout=20, what="%s to answer" % node)
    cl.set("db1", state)
    cl.wait_settled({"db1": state}, timeout=60)
    leader, _ = cl.leader()
    trs, runs = cl.ledger(leader)
    for node in cl.daemons:                     # every member holds the same ledger
        assert cl.ledger(node) == (trs, runs), node

    commands = cl.commands()
    started = {}
    for c in commands:
        started.setdefault((c.run, c.index), []).append(c)
    duplicates = sum(len(v) - 1 for v in started.values())
    lost = [i for i in range(1, max(trs) + 1) if i not in trs]          # gaps in the ids
    previous = "unknown"
    for tr in trs.values():                     # each transition starts where the last ended
        if tr["from"] != previous:
            lost.append(tr["id"])
        previous = tr["to"]
    if previous != state:
        lost.append("final")
    overlaps = cl.overlaps(commands)
    interrupted = sum(r["state"] == "interrupted" for r in runs.values())
    takeovers.sort()
    figure("cluster: %d leader kills, %d flips, %d transitions, %d runs (%d ok, %d interrupted, %d queued "
           "at a kill), %d duplicate sequences, %d lost transitions, %d overlapping commands (seed %d)"
           % (KILLS, flips, len(trs), len(runs), sum(r["state"] == "ok" for r in runs.values()),
              interrupted, len(carried), duplicates, len(lost), len(overlaps), SEED))
    figure("cluster: kill -> new leader acting: p50 %.2fs, max %.2fs (ttl 1s, interval 100ms); "
           "the loop took %.0fs" % (takeovers[len(takeovers) // 2], takeovers[-1], time.monotonic() - begun))
    assert duplicates == 0 and not lost and not overlaps, (duplicates, lost, overlaps)
    for run in runs.values():
        assert run["state"] in ("ok", "interrupted", "failed"), run
        mine = [c for c in commands if c.run == run["id"]]
        if run["state"] == "ok":
            assert sorted(c.index for c in mine) == [1, 2] and all(c.ended for c in mine), (run, mine)
        assert all(c.node == run.get("node") and c.epoch == run.get("epoch") for c in mine), (run, mine)
    assert all(c.run in runs for c in commands), "commands of runs the ledger does not know"
    for run_id in carried:                      # queued at a kill: run by a later leader, once
        assert runs[run_id]["state"] in ("ok", "failed", "interrupted"), runs[run_id]


def test_pause_status_reload_and_stop(ha):
    """--pause / --resume on any member pause the whole cluster; --status shows the
    cluster; a reload applies quorum but refuses another etcd or name; a leader that
    stops resigns at once."""
    cl = ha(hosts=("db1",))
    cl.set("db1", "master")
    cl.start()
    leader, epoch = cl.leader()
    cl.wait_settled({"db1": "master"})
    follower, other = [n for n in cl.daemons if n != leader]
    result = cl.daemons[follower].cli("--pause")
    assert result.returncode == 0 and "cluster test: actions paused on every member" in result.stdout, result
    wait_for(lambda: all(cl.status(n)["daemon"]["paused"] for n in cl.daemons), timeout=10,
             what="every member to be paused")
    before = len(cl.commands())
    cl.set("db1", "slave")
    cl.wait_settled({"db1": "slave"})
    trs, runs = cl.ledger(other)
    assert runs[max(runs)]["state"] == "skipped" and runs[max(runs)]["reason"] == "paused"
    assert len(cl.commands()) == before
    assert cl.daemons[other].cli("--resume").returncode == 0
    wait_for(lambda: not any(cl.status(n)["daemon"]["paused"] for n in cl.daemons), timeout=10,
             what="every member to be resumed")
    # an endpoint counts as answering when it did within ttl: on a loaded machine one may
    # lag a pass, so the rendering is read until it says so (bounded)
    header = "cluster test: node %s is the LEADER (epoch %d)\n  quorum 1; 3 live members; " \
             "etcd: 3 of 3 endpoints answering" % (leader, epoch)
    text = wait_for(lambda: (lambda t: t if header in t else None)(cl.daemons[leader].cli("--status").stdout),
                    timeout=10, what="the leader's --status with every endpoint answering")
    for node in cl.daemons:
        assert "  %-12s db1=slave" % (node + (" *" if node == leader else "")) in text, text
    text = cl.daemons[follower].cli("--status").stdout
    assert "node %s is a follower of %s (epoch %d)" % (follower, leader, epoch) in text, text
    # Reload: quorum applies, another cluster name is refused (and the old config kept).
    d = cl.daemons[leader]
    conf = (d.dir / "checks.conf").read_text()
    d.write("checks.conf", conf.replace("quorum = 1", "quorum = 2"))
    assert d.cli("--reload").returncode == 0
    assert cl.status(leader)["daemon"]["cluster"]["quorum"] == 2
    d.write("checks.conf", conf.replace("name = test", "name = other"))
    result = d.cli("--reload")
    assert result.returncode == 1 and "[cluster] name changed: restart the daemon" in result.stderr, result
    assert cl.status(leader)["daemon"]["cluster"]["name"] == "test"
    # A leader that stops resigns: another leads without waiting for its lease to expire.
    stopped = time.monotonic()
    assert d.stop() == 0
    new, new_epoch = cl.leader()
    took = time.monotonic() - stopped
    assert new != leader and new_epoch > epoch
    hadaemon_figure("leader stopped (SIGTERM) -> new leader acting in %.2fs (ttl %ds)" % (took, cl.ttl))
    assert "steps down: the daemon stops" in d.log()
    doc = json.loads(d.cli("--status", "--json").stdout)          # offline, from its own db
    assert doc["daemon"]["cluster"]["role"] == "none" and doc["hosts"]["db1"]["state"] == "slave"


def test_notify_events_of_a_cluster(ha):
    """docs/notify.md: the leader sends transition, run and leader events (a new leader its
    own), every member its own daemon events; seq counts per member."""
    cl = ha(hosts=("db1",))
    events_log = cl.log.parent / "events.log"
    for d in cl.daemons.values():
        d.script("actions/note", 'cat >> "%s"\n' % events_log)
        conf = d.dir / "checks.conf"
        conf.write_text(conf.read_text().replace("[daemon]\n", "[daemon]\nnotify = note\n", 1))
    cl.set("db1", "master")
    cl.start()
    leader, epoch = cl.leader()
    cl.wait_settled({"db1": "master"})

    def events():
        try:
            return [json.loads(line) for line in events_log.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return []
    wait_for(lambda: len([e for e in events() if e["kind"] == "run"]) >= 2, timeout=15,
             what="the run's events")
    cl.daemons[leader].kill9()
    new, new_epoch = cl.leader(without=(leader,))
    wait_for(lambda: [e for e in events() if e["kind"] == "leader" and e["node"] == new], timeout=15,
             what="the new leader's event")
    evs = events()
    for node in cl.daemons:
        seqs = [e["seq"] for e in evs if e["node"] == node]
        assert seqs == list(range(1, len(seqs) + 1)), (node, seqs)
        assert [e["event"] for e in evs if e["node"] == node and e["kind"] == "daemon"][:1] == ["started"]
    assert [(e["node"], e["leader"], e["epoch"]) for e in evs if e["kind"] == "leader"] == [
        (leader, leader, epoch), (new, new, new_epoch)]
    acted = [e for e in evs if e["kind"] in ("transition", "run")]
    assert {e["node"] for e in acted} == {leader}
    assert [(e["kind"], e.get("to") or e.get("result")) for e in acted] == [
        ("transition", "master"), ("run", "running"), ("run", "ok")]
