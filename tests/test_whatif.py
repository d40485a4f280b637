"""--simulate (SPEC §11, issue 13): what would run if HOST went FROM -> TO now.

The choice of the section (all eight cases of SPEC §5's precedence) and the expansion
of every variable are table-driven through ``hadaemon.simulate`` on a loaded config,
without processes.  The command itself is run as an operator runs it, against a state
db the test writes with ``hadaemon.Store`` or against the real daemon: its output, its
exit codes, and that it changes nothing at all (the state dir's files and the daemon's
log byte for byte, with a daemon running and without).
"""

import json
import os
import stat

import pytest

import hadaemon.base
import hadaemon.configfiles
import hadaemon.store
import hadaemon.whatif
from conftest import wait_for


# -- helpers ------------------------------------------------------------------------------

def base_config(d, actions, interval="1h"):
    """A valid checks.conf (one check, reporting db1 and db2 from world/) and ``actions``."""
    d.script("checks/check_pair", """
        r() { cat "%s/$1" 2>/dev/null || echo down; }
        echo "{\\"states\\": {\\"db1\\": \\"$(r db1)\\", \\"db2\\": \\"$(r db2)\\"}}"
    """ % d.world)
    d.recorder()
    d.script("actions/notify", "exit 3\n")
    d.write("checks.conf", "[daemon]\ninterval = %s\n[local]\ncheck_pair\n" % interval)
    d.write("actions.conf", actions)


def seed_db(state_dir, states, paused=False, crashed=None):
    """A state db holding ``states`` (host -> state), as a daemon leaves it.

    ``crashed``: more host states committed to the journal only, as a daemon killed
    before its next checkpoint leaves them (the db files do not have them yet).
    """
    hadaemon.base.ensure_state_dir(str(state_dir))
    store = hadaemon.store.Store(str(state_dir))
    store.open()
    changes = {"host:" + h: {"state": s, "since": 1.0e9, "pending": None, "count": 0}
               for h, s in states.items()}
    changes["meta"] = {"next_transition": 1, "next_run": 1, "paused": paused}
    store.commit(changes)
    store.checkpoint()
    if crashed:
        store.commit({"host:" + h: {"state": s, "since": 1.0e9, "pending": None, "count": 0}
                      for h, s in crashed.items()})
        os.close(store.jfd)             # no checkpoint, no close: as kill -9 leaves it
        os.close(store.files.dat_fd)
        return
    store.close()


def snapshot(*paths):
    """Every file under ``paths``: name -> (bytes, mode, mtime); sockets by their stat only."""
    files = {}
    for top in paths:
        top = str(top)
        entries = [top] if os.path.isfile(top) else \
            [os.path.join(root, n) for root, _, names in os.walk(top) for n in names]
        for path in sorted(entries):
            st = os.lstat(path)
            body = None if stat.S_ISSOCK(st.st_mode) else open(path, "rb").read()
            files[path] = (body, st.st_mode, st.st_mtime_ns, st.st_size)
    return files


def simulate_json(d, *args):
    result = d.cli("--simulate", *args, "--json")
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


# -- precedence (SPEC §5), without processes -------------------------------------------------

PRECEDENCE = ["db2: slave_to_master", "db2: any_to_master", "db2: slave_to_any", "db2: any_to_any",
              "slave_to_master", "any_to_master", "slave_to_any", "any_to_any"]
# Sections that must never win for db2 going slave -> master.
DECOYS = ["db1: slave_to_master", "db1: any_to_any", "db2: master_to_slave", "db2: any_to_slave",
          "db2: slave_to_down", "master_to_slave", "any_to_down", "down_to_any"]


@pytest.mark.parametrize("first", range(len(PRECEDENCE)), ids=PRECEDENCE)
def test_each_case_of_the_precedence(daemon, first):
    """With the sections from case ``first`` on (and decoys), case ``first`` wins."""
    present = PRECEDENCE[first:] + DECOYS
    base_config(daemon, "".join("[%s]\nrecord %s\n" % (name, name.replace(": ", "-"))
                                for name in present))
    config = hadaemon.configfiles.load_config(str(daemon.dir))
    doc = hadaemon.whatif.simulate(config, str(daemon.state), "db2", "slave", "master", {"db1": "slave"})
    assert doc["section"]["name"] == PRECEDENCE[first]
    assert doc["tried"] == PRECEDENCE[:first + 1]
    assert doc["commands"][0]["argv"][1] == PRECEDENCE[first].replace(": ", "-")
    # The first section written is the one that wins.
    assert doc["section"]["where"] == "%s:1" % (daemon.dir / "actions.conf")
    assert config.section_for("db2", "slave", "master").name == PRECEDENCE[first]
    assert doc["would_run"] and doc["error"] is None


def test_no_section_matches(daemon):
    base_config(daemon, "".join("[%s]\nrecord\n" % name for name in DECOYS))
    config = hadaemon.configfiles.load_config(str(daemon.dir))
    doc = hadaemon.whatif.simulate(config, str(daemon.state), "db2", "slave", "master", {})
    assert doc["section"] is None and doc["commands"] == [] and not doc["would_run"]
    assert doc["tried"] == PRECEDENCE
    assert doc["error"] == "no section matches db2 slave_to_master in %s" % (daemon.dir / "actions.conf")


# -- variables --------------------------------------------------------------------------------

VARIABLES = [
    # (argument as written, db1..db4 states before the move, --set, argument as run)
    ("%HOST%", {}, {}, "db2"),
    ("%FROM%", {}, {}, "slave"),
    ("%TO%", {}, {}, "master"),
    ("%MASTER%", {"db1": "slave"}, {}, "db2"),                   # HOST is in TO once it moved
    ("%MASTER%", {"db1": "master"}, {}, "db1,db2"),              # sorted, comma-joined
    ("%SLAVE%", {"db1": "slave", "db4": "slave", "db3": "down"}, {}, "db1,db4"),
    ("%DOWN%", {"db1": "slave", "db3": "down"}, {}, "db3"),      # %STATE% for any state word
    ("%SLAVE%", {"db2": "slave"}, {}, None),                     # db2 left slave: none is
    ("%SLAVE%", {"db1": "master"}, {"db3": "slave"}, "db3"),     # --set adds a host
    ("%MASTER%", {"db1": "master"}, {"db1": "down"}, "db2"),     # --set overrides a state
    ("%MASTER%", {}, {"db2": "down"}, "db2"),                    # HOST's own --set: TO wins
    ("100%%", {}, {}, "100%"),
    ("%%HOST%%", {}, {}, "%HOST%"),
    ("x%HOST%:%TO%y", {}, {}, "xdb2:mastery"),
    ("%NOSUCHSTATE%", {}, {}, None),
]


@pytest.mark.parametrize("written,states,sets,expanded", VARIABLES,
                         ids=["%s-%d" % (v[0], i) for i, v in enumerate(VARIABLES)])
def test_each_variable(daemon, written, states, sets, expanded):
    base_config(daemon, "[slave_to_master]\nrecord first\nrecord '%s' last\n" % written)
    config = hadaemon.configfiles.load_config(str(daemon.dir))
    doc = hadaemon.whatif.simulate(config, str(daemon.state), "db2", "slave", "master", states, sets)
    if expanded is None:
        name = written.strip("%")
        assert not doc["would_run"]
        assert doc["error"] == "%%%s%% is empty (no host is %s) at %s:3" % (
            name, name.lower(), daemon.dir / "actions.conf")
        assert [c["argv"][1:] for c in doc["commands"]] == [["first"], [written, "last"]]
        assert doc["expanded"] is False
    else:
        assert doc["would_run"] and doc["error"] is None
        assert doc["commands"][1]["argv"][1:] == [expanded, "last"]
    after = dict(states, **sets)
    after["db2"] = "master"
    assert doc["states"] == after
    assert doc["env"]["HA_MASTER"] == ",".join(sorted(h for h, s in after.items() if s == "master"))
    assert doc["env"]["HA_SLAVE"] == ",".join(sorted(h for h, s in after.items() if s == "slave"))
    assert doc["env"]["HA_TRANSITION"] == "slave_to_master" and "HA_RUN_ID" not in doc["env"]


# -- the command line, from the state db ----------------------------------------------------

ACTIONS = """\
[db2: slave_to_master]
timeout = 20s
record stop %SLAVE%
-notify "%HOST% is %TO%"
record 'promote to' %MASTER%

[any_to_down]
record %HOST% down, master: %MASTER%
"""


def test_the_command_from_the_state_db(daemon):
    d = daemon
    base_config(d, ACTIONS)
    seed_db(d.state, {"db1": "master", "db2": "slave", "db3": "slave"})
    result = d.cli("--simulate", "db2", "slave_to_master", "--set", "db1=down")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    conf = d.dir / "actions.conf"
    assert out.startswith("db2: slave -> master, as if it had just happened")
    assert "states: from the state db (no daemon running); --set db1=down\n" \
           "  db1=down db2=master db3=slave\n" in out
    assert "section [db2: slave_to_master] at %s:1, timeout 20s per command\n" % conf in out
    record, notify = d.dir / "actions" / "record", d.dir / "actions" / "notify"
    assert "  1   %s stop db3\n" % record in out
    assert "  2 - %s 'db2 is master'\n" % notify in out       # "-": its failure is ignored
    assert "  3   %s 'promote to' db2\n" % record in out
    assert "%MASTER%=db2" in out and "%DOWN%=db1" in out
    assert out.rstrip().endswith("would run: 3 commands")

    code, doc = simulate_json(d, "db2", "slave_to_master", "--set", "db1=down")
    assert code == 0 and doc["source"] == "db" and doc["pid"] is None and doc["paused"] is False
    assert [(c["argv"], c["ignore"], c["where"]) for c in doc["commands"]] == [
        ([str(record), "stop", "db3"], False, "%s:3" % conf),
        ([str(notify), "db2 is master"], True, "%s:4" % conf),
        ([str(record), "promote to", "db2"], False, "%s:5" % conf)]
    assert doc["section"] == {"name": "db2: slave_to_master", "where": "%s:1" % conf, "timeout": 20.0}
    assert doc["env"] == {"HA_HOST": "db2", "HA_FROM": "slave", "HA_TO": "master",
                          "HA_TRANSITION": "slave_to_master", "HA_MASTER": "db2",
                          "HA_SLAVE": "db3", "HA_CONFIG_DIR": str(d.dir),
                          "HA_STATE_DIR": str(d.state)}

    # FROM need not be the host's state, nor the host a known one.
    code, doc = simulate_json(d, "db9", "unknown_to_down")
    assert code == 0 and doc["section"]["name"] == "any_to_down"
    assert doc["commands"][0]["argv"][1:] == ["db9", "down,", "master:", "db1"]


def test_empty_variable_and_no_section_exit_1(daemon):
    d = daemon
    base_config(d, ACTIONS)
    seed_db(d.state, {"db1": "master", "db2": "slave"})
    result = d.cli("--simulate", "db2", "slave_to_master")    # db1 master, db2 master: no slave
    assert result.returncode == 1
    conf = d.dir / "actions.conf"
    assert "commands as written" in result.stdout
    assert ("would NOT run: %%SLAVE%% is empty (no host is slave) at %s:3; the run would be "
            "recorded as failed" % conf) in " ".join(result.stdout.split())
    result = d.cli("--simulate", "db1", "master_to_slave")
    assert result.returncode == 1
    assert "no section matches; tried, in the order of precedence:\n  [db1: master_to_slave]" \
        in result.stdout
    assert "would run nothing: no section matches db1 master_to_slave in %s" % conf \
        in " ".join(result.stdout.split())
    code, doc = simulate_json(d, "db2", "slave_to_master")
    assert code == 1 and doc["would_run"] is False and "%SLAVE% is empty" in doc["error"]


BAD = [
    (["db2", "slave-master"], "'slave-master' is not FROM_to_TO"),
    (["db2", "slave_to_master_to_down"], "is not FROM_to_TO"),
    (["db2", "_to_master"], "'_to_master' is not FROM_to_TO"),
    (["db2", "slave_to_"], "is not FROM_to_TO"),
    (["db 2", "slave_to_master"], "bad host name 'db 2'"),
    (["db2", "sla/ve_to_master"], "bad state 'sla/ve'"),
    (["db2", "slave_to_master", "--set", "db1"], "--set 'db1': write HOST=STATE"),
    (["db2", "slave_to_master", "--set", "db1="], "--set 'db1=': bad state ''"),
    (["db2", "slave_to_master", "--set", "=slave"], "--set '=slave': bad host name ''"),
    (["db2", "slave_to_master", "--set", "db1=a_to_b"], "bad state 'a_to_b'"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_words_exit_2_naming_them(daemon, args, message):
    base_config(daemon, ACTIONS)
    result = daemon.cli("--simulate", *args)
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr
    assert not daemon.state.exists()


def test_usage_errors_exit_2(daemon):
    base_config(daemon, ACTIONS)
    for args, message in ((["--status", "--set", "db1=slave"], "--set goes with --simulate"),
                          (["--simulate", "db2"], "expected 2 arguments"),
                          (["--simulate", "db2", "a_to_b", "--stop"], "not allowed with")):
        result = daemon.cli(*args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


def test_help_names_the_new_options(daemon):
    helptext = daemon.cli("--help").stdout
    for flag in ("--simulate HOST FROM_to_TO", "--set HOST=STATE", "--rerun RUN_ID", "--wait"):
        assert flag in helptext, flag


def test_an_invalid_config_fails_as_check_config_does(daemon):
    d = daemon
    base_config(d, "[slave_to_master]\nno_such_action %MASTER%\n[sideways]\nrecord\n")
    check = d.cli("--check-config")
    result = d.cli("--simulate", "db2", "slave_to_master")
    assert check.returncode == result.returncode == 1
    assert result.stderr == check.stderr and result.stdout == ""
    assert "%s:2: command not found: no_such_action" % (d.dir / "actions.conf") in result.stderr
    assert "%s:3: [sideways]" % (d.dir / "actions.conf") in result.stderr


def test_paused_it_still_answers_and_says_so(daemon):
    d = daemon
    base_config(d, ACTIONS)
    seed_db(d.state, {"db1": "master", "db3": "slave"}, paused=True)
    result = d.cli("--simulate", "db2", "slave_to_master")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ACTIONS ARE PAUSED: this sequence would be recorded as skipped (paused) and not run" \
        in " ".join(result.stdout.split())
    assert simulate_json(d, "db2", "slave_to_master")[1]["paused"] is True


# -- no side effect at all ------------------------------------------------------------------

SIMULATIONS = [  # (arguments, exit code), whatever db1..db3 are
    (["db2", "slave_to_master", "--set", "db3=slave"], 0),
    (["db2", "slave_to_master", "--set", "db3=slave", "--json"], 0),
    (["db2", "slave_to_master", "--set", "db1=slave", "--set", "db7=slave"], 0),
    (["db1", "master_to_slave"], 1),                                        # no section
    (["db2", "slave_to_master", "--set", "db1=x", "--set", "db3=x"], 1),    # no slave
    (["db1", "slave_to_down", "--set", "db2=master"], 0),
    (["db1", "bad_to_"], 2)]


def run_simulations(d):
    codes = [d.cli("--simulate", *args).returncode for args, _ in SIMULATIONS]
    assert codes == [code for _, code in SIMULATIONS]


def test_no_side_effect_without_a_daemon(daemon):
    """A db a kill -9 left behind (a commit in the journal only) is read, and left, as it is."""
    d = daemon
    base_config(d, ACTIONS)
    seed_db(d.state, {"db1": "master", "db2": "slave"}, crashed={"db3": "slave"})
    (d.state / "hadaemon.log").write_text("the daemon's last words\n")
    assert (d.state / "state.db.journal").stat().st_size > 0
    before = snapshot(d.state)
    run_simulations(d)
    code, doc = simulate_json(d, "db2", "slave_to_down")     # db3: from the journal
    assert code == 0 and doc["states"] == {"db1": "master", "db2": "down", "db3": "slave"}
    assert snapshot(d.state) == before

    # No state dir at all: none is created.
    d.state = d.tmp / "never"
    run_simulations(d)
    code, doc = simulate_json(d, "db2", "unknown_to_master")
    assert doc["source"] == "none" and doc["states"] == {"db2": "master"}
    assert not d.state.exists()


def test_no_side_effect_with_a_daemon_running(daemon):
    """States come from the daemon; the db files and its log do not change by one byte."""
    d = daemon
    base_config(d, ACTIONS)                 # one check, every hour: it runs once, at start
    d.set("db1", "master")
    d.set("db2", "slave")
    d.start()
    wait_for(lambda: {h: v["state"] for h, v in d.status()["hosts"].items()} ==
             {"db1": "master", "db2": "slave"}, what="both hosts known")
    # The transitions' commits are in the journal until the next checkpoint empties it.
    wait_for(lambda: (d.state / "state.db.journal").stat().st_size == 0 and
             all(r["state"] not in ("queued", "running") for r in d.status()["runs"]),
             what="a checkpoint after the first reports and their runs")
    status_before = d.status()
    before = snapshot(d.state, d.log_path)
    run_simulations(d)
    code, doc = simulate_json(d, "db2", "slave_to_master", "--set", "db3=slave")
    assert code == 0 and doc["source"] == "daemon" and doc["pid"] == d.proc.pid
    assert doc["states"] == {"db1": "master", "db2": "master", "db3": "slave"}
    assert snapshot(d.state, d.log_path) == before
    after = d.status()
    assert after["transitions"] == status_before["transitions"]
    assert after["runs"] == status_before["runs"] and after["daemon"]["queue"] == []

    assert d.cli("--pause").returncode == 0
    result = d.cli("--simulate", "db2", "slave_to_master", "--set", "db3=slave")
    assert result.returncode == 0 and "ACTIONS ARE PAUSED" in result.stdout
    assert "the running daemon (pid %d)" % d.proc.pid in result.stdout


def test_simulate_shows_what_the_daemon_then_runs(daemon):
    """One function plans both: the run the daemon then records is what --simulate said."""
    d = daemon
    base_config(d, "[slave_to_master]\nrecord promote %HOST% %MASTER% 'was %FROM%'\n"
                   "-record slaves: %SLAVE%\n", interval="200ms")
    d.set("db1", "master")
    d.set("db2", "slave")
    d.start()
    d.set("db1", "slave")
    wait_for(lambda: {h: v["state"] for h, v in d.status()["hosts"].items()} ==
             {"db1": "slave", "db2": "slave"}, what="both hosts slaves")
    code, doc = simulate_json(d, "db2", "slave_to_master")
    assert code == 0 and doc["source"] == "daemon"
    assert d.runs() == []
    d.set("db2", "master")
    run = d.wait_runs(1)[-1]
    assert (run["host"], run["from"], run["to"], run["state"]) == ("db2", "slave", "master", "ok")
    assert run["section"] == doc["section"]["name"] == "slave_to_master"
    assert [(c["argv"], c["ignore"], c["where"]) for c in run["commands"]] == \
        [(c["argv"], c["ignore"], c["where"]) for c in doc["commands"]]
    assert [c["argv"][1:] for c in doc["commands"]] == [["promote", "db2", "db2", "was slave"],
                                                       ["slaves:", "db1"]]
    env = doc["env"]
    # What each command got in its environment (actions/record writes it down).
    assert d.actions_log() == ["%s | %s %s master=%s slave=%s run=%d" % (
        " ".join(c["argv"][1:]), env["HA_TRANSITION"], env["HA_HOST"], env["HA_MASTER"],
        env["HA_SLAVE"], run["id"]) for c in doc["commands"]]
