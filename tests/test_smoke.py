"""The demo shipped in the repository works as the README says."""

import shutil

from conftest import ROOT, Daemon, wait_for


def test_demo_failover(tmp_path):
    d = Daemon(tmp_path)
    try:
        for name in ("checks.conf", "actions.conf"):
            shutil.copy(ROOT / name, d.dir / name)
        for sub in ("checks", "actions"):
            shutil.rmtree(d.dir / sub)
            shutil.copytree(ROOT / sub, d.dir / sub)
        d.start()
        d.wait_state("db1", "master")
        d.wait_state("db2", "slave")
        # Demote first: flipped together, db2 may confirm master before db1 confirms
        # slave, and then %MASTER% is rightly "db1,db2".
        (d.state / "demo" / "db1").write_text("slave\n")
        d.wait_state("db1", "slave")
        (d.state / "demo" / "db2").write_text("master\n")
        d.wait_state("db2", "master")
        wait_for(lambda: "middleware started, pointed at master db2" in d.log(), what="the demo action output")
        runs = [r for r in d.runs() if r["section"] == "slave_to_master"]
        assert runs and runs[0]["state"] == "ok"
        assert runs[0]["commands"][1]["argv"][1:] == ["move-to", "db2"]
    finally:
        d.cleanup()
