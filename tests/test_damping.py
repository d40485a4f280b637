"""SPEC §12 damping: ``confirm = N of M``.

The rule alone first (``ledger.confirm_step``, no process): a flaky check, table-driven,
then with hypothesis against the SPEC's sentence read literally (every report kept) and
against the rule before N of M for plain ``confirm = N``.  Then its config (FILE:LINE for
each bad value), the state db's check of a host record, the Ledger over a real state db
across a kill.  Last, the daemon: the window survives a restart, ``--status --json``
shows it, ``-t`` names the bad line.
"""

import json

from hypothesis import given, settings, strategies as st

import hadaemon.base
import hadaemon.configfiles
import hadaemon.store
import hadaemon.wire
from hadaemon.ledger import NEW_HOST, confirm_step

from test_config import errors_of, make_dir
from test_engine import configure, feed, seq_check, transitions
from test_ledger import T0, ClusterWorld, World


def steps(reports, n, m=None, cand=None):
    """Feed ``reports`` to confirm_step from ``cand`` (a host never seen): [(state, what)], the record."""
    cand = dict(NEW_HOST) if cand is None else cand
    out = []
    for word in reports:
        cand, what = confirm_step(cand, word, n, m)
        out.append((cand["state"], what))
    return out, cand


def literal(reports, n, m, state="unknown"):
    """SPEC §12 as written, every report kept: a host moves to S when the report just
    received says S and at least N of its last M reports (this one included) said S."""
    seen, out = [], []
    for word in reports:
        seen.append(word)
        if word != state and seen[-m:].count(word) >= n:
            state = word
        out.append(state)
    return out


def before_n_of_m(cand, state, confirm):
    """confirm_step as it was before N of M (212d1f9): ``confirm`` reports in a row."""
    if state == cand["state"]:
        if cand["pending"] is None:
            return cand, "same"
        return dict(cand, pending=None, count=0), "dropped"
    cand = dict(cand)
    if cand["pending"] == state:
        cand["count"] += 1
    else:
        cand["pending"], cand["count"] = state, 1
    if cand["count"] < confirm:
        return cand, "counted"
    return dict(cand, state=state, pending=None, count=0), "confirmed"


UP = dict(NEW_HOST, state="up", since=T0)
FLAKY = ["down", "up"] * 10             # fails every other time: a flaky network


# -- the rule, table-driven ----------------------------------------------------------------

def test_a_flaky_check_confirms_with_2_of_3_and_never_in_a_row():
    # confirm = 2: never two downs in a row, so the candidate never confirms, never clears.
    out, cand = steps(FLAKY, 2, None, UP)
    assert out == [("up", "counted"), ("up", "dropped")] * 10
    # confirm = 2 of 3: down, up, down is two downs of the last three.
    out, cand = steps(FLAKY[:3], 2, 3, UP)
    assert out == [("up", "counted"), ("up", "moved"), ("down", "confirmed")]
    assert (cand["state"], cand["since"]) == ("down", T0)      # ``since`` is accept()'s to set


def test_2_of_3_ignores_a_failure_now_and_then():
    out, cand = steps(["down", "up", "up"] * 5, 2, 3, UP)
    assert {state for state, _ in out} == {"up"}
    assert cand == dict(UP, recent=["up", "up"])               # that down can no longer count


def test_the_candidate_and_its_window_while_pending():
    cand, what = confirm_step(UP, "down", 2, 3)
    assert (what, cand) == ("counted", dict(UP, pending="down", count=1, window=3))
    cand, what = confirm_step(cand, "up", 2, 3)
    assert (what, cand) == ("moved", dict(UP, pending="down", count=1, window=3, recent=["down", "up"]))
    cand, what = confirm_step(cand, "up", 2, 3)                # that down slides out next: it is gone
    assert (what, cand) == ("dropped", dict(UP, recent=["up", "up"]))
    # The oldest of the three slides out at the next report: it can no longer count.
    assert confirm_step(cand, "up", 2, 3) == (cand, "same")    # the steady state writes nothing


def test_reports_before_a_transition_still_count():
    # Literally the last M reports: up, up, down, down makes down (2 of 4); the next up
    # is then the second up of the last four.
    out, _ = steps(["up", "up", "down", "down", "up"], 2, 4, UP)
    assert [state for state, _ in out] == ["up", "up", "up", "down", "up"]
    # A majority (3 of 4) needs three new ones.
    out, _ = steps(["down", "down", "down", "up", "up", "up"], 3, 4, UP)
    assert [state for state, _ in out] == ["up", "up", "down", "down", "down", "up"]


def test_n_of_n_keeps_the_records_as_before():
    # confirm = 3 and confirm = 3 of 3: no window of reports in the record, only the
    # candidate and its count (and the window's size while one is pending).
    for m in (None, 3):
        cand, what = confirm_step(UP, "down", 3, m)
        assert (what, cand) == ("counted", dict(UP, pending="down", count=1, window=3))
        cand, what = confirm_step(cand, "warning", 3, m)
        assert (what, cand) == ("counted", dict(UP, pending="warning", count=1, window=3))
        cand, what = confirm_step(cand, "up", 3, m)
        assert (what, cand) == ("dropped", UP)


def test_a_record_from_before_n_of_m_goes_on():
    old = {"state": "up", "since": T0, "pending": "down", "count": 2}     # no window
    cand, what = confirm_step(old, "down", 3, None)
    assert (what, cand["state"]) == ("confirmed", "down")
    cand, what = confirm_step(old, "up", 2, 5)
    assert (what, cand["pending"], cand["count"]) == ("moved", "down", 2)


# -- the rule, property-based ----------------------------------------------------------------

WORDS = st.sampled_from(["up", "down", "unknown", "warning"])
REPORTS = st.lists(st.sampled_from(["up", "down", "warning"]) | WORDS, max_size=60)


@settings(max_examples=400, deadline=None)
@given(REPORTS, st.integers(1, 8), st.integers(0, 8))
def test_n_of_m_is_the_sentence_of_the_spec(reports, n, extra):
    """What the record keeps (the reports that can still count) decides as every report would."""
    m = n + extra
    out, _ = steps(reports, n, m)
    assert [state for state, _ in out] == literal(reports, n, m)


@settings(max_examples=300, deadline=None)
@given(REPORTS, st.integers(1, 6), st.booleans())
def test_n_of_n_is_the_rule_before_n_of_m(reports, n, written_of):
    """confirm = N (and N of N): the same states, the same records (but for the window's
    size while pending), the same log at each report."""
    new, old = dict(NEW_HOST), dict(NEW_HOST)
    for word in reports:
        new, what = confirm_step(new, word, n, n if written_of else None)
        old, was = before_n_of_m(old, word, n)
        assert what == was
        assert {k: v for k, v in new.items() if k != "window"} == old
        assert new.get("window") == (n if old["pending"] else None)


# -- the config ------------------------------------------------------------------------------

def test_confirm_n_of_m_in_daemon_and_groups(tmp_path):
    d = make_dir(tmp_path, """
        [daemon]
        confirm = 2 of 5

        [local]
        check_a

        [local]
        confirm = 3
        check_b

        [local]
        confirm = 1 of 100
        host = db1
        check_a

        [local]
        confirm = 250
        host = db2
        check_a
    """)
    cfg = hadaemon.configfiles.load_config(str(d))
    assert (cfg.daemon.confirm, cfg.daemon.confirm_of) == (2, 5)
    assert [(g.confirm, g.window) for g in cfg.groups] == [(2, 5), (3, 3), (1, 100), (250, 250)]


BAD = ["3 of 2", "0 of 3", "2 of 101", "2 out of 3", "2 of", "2 of 3 4", "two of 3", "2 of 3.5", "-1 of 3"]


def test_each_bad_confirm_is_an_error_at_its_line(tmp_path):
    text = "[daemon]\nconfirm = %s\n" % BAD[0] + "".join(
        "[local]\nconfirm = %s\nhost = h%d\ncheck_a\n" % (bad, i) for i, bad in enumerate(BAD[1:]))
    d = make_dir(tmp_path, text)
    errors = errors_of(d)
    assert len(errors) == len(BAD), errors
    for i, (bad, error) in enumerate(zip(BAD, errors)):
        line = 2 if i == 0 else 4 * i
        assert error.startswith("%s/checks.conf:%d: " % (d, line)), error
        assert repr(bad) in error and "confirm" in error, error


def test_the_state_db_drops_a_host_record_with_a_bad_window():
    good = dict(UP, pending="down", count=1, window=3, recent=["down", None, "up"])
    assert hadaemon.store.well_formed("host:db1", good)
    for bad in (dict(good, recent="down"), dict(good, recent=["down", "x y"]), dict(good, window=0),
                dict(good, recent=["up"] * (hadaemon.base.MAX_WINDOW + 1)), dict(good, window="3")):
        assert not hadaemon.store.well_formed("host:db1", bad), bad


# -- the Ledger over a real state db -----------------------------------------------------------

def test_the_window_survives_a_kill_and_shows_in_pending(tmp_path):
    w = World(tmp_path, "[any_to_any]\n/bin/true\n", confirm="2 of 3")
    assert w.report("db1", "master") is None
    assert w.report("db1", "master") is not None                 # unknown -> master, 2 of 3
    assert w.report("db1", "slave") is None
    assert w.ledger.host_status("db1")["pending"] == {"state": "slave", "count": 1, "window": 3}
    w.reopen()                                                  # kill -9: nothing flushed
    assert w.ledger.host_status("db1")["pending"] == {"state": "slave", "count": 1, "window": 3}
    assert w.report("db1", "master") is None
    w.reopen()
    tr = w.report("db1", "slave")                               # slave, master, slave
    assert (tr.frm, tr.to) == ("master", "slave")
    assert w.ledger.host_status("db1")["pending"] == {"state": "master", "count": 1, "window": 3}


def test_a_cluster_member_confirms_n_of_m_for_its_own_view(tmp_path):
    """In a cluster each member confirms for itself (docs/cluster.md): the same rule moves
    its view, and its own candidate shows its window; the leader accepts from the views."""
    w = ClusterWorld(tmp_path, "[any_to_any]\n/bin/true\n", node="b", role="follower", confirm="2 of 3")
    for state in ("master", "down", "master"):              # master, down, master: 2 of 3
        assert w.report("db1", state) is None
    assert w.member.view == {"db1": "master"}
    w.report("db1", "master")
    w.report("db1", "down")                                 # master, master, down
    assert w.member.view == {"db1": "master"}
    assert w.ledger.seen["db1"]["pending"] == "down" and w.ledger.seen["db1"]["window"] == 3
    w.report("db1", "slave")                                # master, down, slave: none has 2
    w.report("db1", "down")                                 # down, slave, down
    assert w.member.view == {"db1": "down"}


# -- the daemon ------------------------------------------------------------------------------

def test_the_daemon_keeps_the_window_across_a_restart_and_shows_it(daemon):
    d = daemon
    d.status = lambda: hadaemon.wire.request(str(d.state), {"cmd": "status"})     # no CLI per poll
    seq_check(d)
    configure(d, """
        [daemon]
        interval = 100ms

        [local]
        confirm = 2 of 3
        check_seq db1
    """, "[any_to_any]\n-true\n")
    d.start()
    feed(d, "db1", "up", "up")
    assert d.host_state("db1") == "up"
    feed(d, "db1", "down", "up")
    host = d.status()["hosts"]["db1"]
    assert (host["state"], host["pending"]) == ("up", {"state": "down", "count": 1, "window": 3})
    assert d.stop() == 0
    stopped = json.loads(d.cli("--status", "--json").stdout)["hosts"]["db1"]   # of a stopped daemon
    assert stopped["pending"] == {"state": "down", "count": 1, "window": 3}
    d.start()
    feed(d, "db1", "down")                                      # down, up, down: 2 of 3
    d.wait_state("db1", "down")
    assert transitions(d) == [("db1", "unknown", "up"), ("db1", "up", "down")]
    # And after a kill -9 too: down, down, up, kill, up is two ups of the last three.
    feed(d, "db1", "down", "down", "up")
    assert d.status()["hosts"]["db1"]["pending"] == {"state": "up", "count": 1, "window": 3}
    d.kill9()
    d.start()
    feed(d, "db1", "up")
    d.wait_state("db1", "up")
    assert "reported down by check_seq db1 (1 of the last 3; 2 needed)" in d.log()
    # -t names the line of a bad value.
    configure(d, "[daemon]\nconfirm = 4 of 3\n[local]\ncheck_seq db1\n", "")
    result = d.cli("-t")
    assert result.returncode != 0
    assert "%s:2: confirm = N of M needs whole numbers 1 <= N <= M <= 100, got '4 of 3'" % (
        d.dir / "checks.conf") in result.stdout + result.stderr
