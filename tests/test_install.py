"""Installing with pip (issue 13), and where a hadaemon with no folder of its own looks.

``pip install .`` into a fresh venv gives a ``hadaemon`` command that runs a small
config with ``--once``.  The config dir is --config-dir, else $HADAEMON_CONFIG_DIR,
else the folder holding hadaemon.py when it holds a checks.conf (copy-and-run, as
before), else /etc/hadaemon; the state dir --state-dir, else $HADAEMON_STATE_DIR,
else /var/lib/hadaemon for /etc/hadaemon, else CONFIGDIR/var.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

import hadaemon.base
from conftest import HADAEMON, ROOT, figure, load_shipped

PACKAGE_FILES = ("pyproject.toml", "setup.cfg", "hadaemon.py", "README.md")


def small_config(path):
    """A config dir whose one check reports db1 master, and whose action writes a file."""
    (path / "checks").mkdir(parents=True)
    (path / "actions").mkdir()
    check = path / "checks" / "check_db1"
    check.write_text("#!/bin/sh\necho host=db1\necho state=master\n")
    action = path / "actions" / "note"
    action.write_text('#!/bin/sh\necho "$* $HA_RUN_ID" >> "$HA_CONFIG_DIR/noted"\n')
    for script in (check, action):
        script.chmod(0o755)
    (path / "checks.conf").write_text("[local]\ncheck_db1\n")
    (path / "actions.conf").write_text("[any_to_master]\nnote %HOST% went %FROM% to %TO%\n")
    return path


def run(argv, timeout=60, env=None, **kw):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env, **kw)


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADAEMON_")}
    env.update(extra)
    return env


def pip_supports_python_option():
    """pip >= 22.3 installs into another interpreter's environment (--python)."""
    out = run([sys.executable, "-m", "pip", "--version"]).stdout.split()
    if len(out) < 2:
        return False
    version = tuple(int(p) for p in out[1].split(".")[:2] if p.isdigit())
    return version >= (22, 3)


def test_pip_install_gives_a_hadaemon_command(tmp_path):
    """A fresh venv, pip install of the package's files (copied: the build writes build/ and
    *.egg-info next to them), then ``hadaemon --version`` and ``--once`` on a small config."""
    src = tmp_path / "src"
    src.mkdir()
    for name in PACKAGE_FILES:
        shutil.copy(ROOT / name, src / name)
    venv = tmp_path / "venv"
    try:
        started = time.monotonic()
        if pip_supports_python_option():
            # No pip inside the venv: this interpreter's pip installs into it (faster).
            made = run([sys.executable, "-m", "venv", "--without-pip", venv])
            pip = [sys.executable, "-m", "pip", "--python", venv / "bin" / "python"]
        else:
            made = run([sys.executable, "-m", "venv", venv], timeout=120)
            pip = [venv / "bin" / "python", "-m", "pip"]
        assert made.returncode == 0, made.stderr
        # The build backend (setuptools, named in pyproject.toml) comes from the index,
        # in an isolated build environment, as for any user.
        installed = run(pip + ["install", "--no-cache-dir", "--disable-pip-version-check",
                               "--timeout", "30", src], timeout=300)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        figure("pip install into a fresh venv: %.1fs (load %s)"
               % (time.monotonic() - started, open("/proc/loadavg").read().split()[0]))
        command = venv / "bin" / "hadaemon"
        assert command.is_file()

        version = run([command, "--version"], env=clean_env())
        assert version.returncode == 0 and version.stdout.strip() == "hadaemon " + hadaemon.base.__version__
        where = run([venv / "bin" / "python", "-c", "import hadaemon; print(hadaemon.__file__)"],
                    cwd=str(tmp_path))
        assert where.stdout.strip().startswith(str(venv / "lib"))  # the installed copy, not ours

        # --init: the starter config comes from the code (the wheel holds no other file).
        starter = tmp_path / "starter"
        made = run([command, "--init", starter], env=clean_env())
        assert made.returncode == 0, made.stdout + made.stderr
        checked = run([command, "--config-dir", starter, "--check-config"], env=clean_env())
        assert checked.returncode == 0 and checked.stdout.startswith("configuration OK"), checked.stdout

        conf = small_config(tmp_path / "conf")
        once = run([command, "--config-dir", conf, "--once"], env=clean_env())
        assert once.returncode == 0, once.stdout + once.stderr
        assert (conf / "noted").read_text() == "db1 went unknown to master 1\n"
        assert (conf / "var" / "state.db.dat").is_file()      # the state dir: CONFIGDIR/var

        # The same through HADAEMON_CONFIG_DIR, state dir from HADAEMON_STATE_DIR.
        state = tmp_path / "state"
        status = run([command, "--status", "--json"],
                     env=clean_env(HADAEMON_CONFIG_DIR=str(conf), HADAEMON_STATE_DIR=str(state)))
        assert status.returncode == 3, status.stderr
        daemon = json.loads(status.stdout)["daemon"]
        assert (daemon["config_dir"], daemon["state_dir"]) == (str(conf), str(state))

        # Nothing given: an installed hadaemon (site-packages has no checks.conf) says
        # /etc/hadaemon, and how it came to it.
        helptext = run([command, "--help"], env=clean_env()).stdout
        assert "now %s)" % hadaemon.base.SYSTEM_CONFIG_DIR in helptext
        assert "$HADAEMON_CONFIG_DIR" in helptext and "$HADAEMON_STATE_DIR" in helptext
        if not os.path.exists(hadaemon.base.SYSTEM_CONFIG_DIR):
            check = run([command, "--check-config"], env=clean_env())
            assert check.returncode == 1
            assert "/etc/hadaemon/checks.conf: cannot read" in check.stderr
            assert "the config dir /etc/hadaemon is the default: neither --config-dir nor " \
                   "HADAEMON_CONFIG_DIR is given" in check.stderr
    finally:
        shutil.rmtree(venv, ignore_errors=True)


def test_copy_and_run_still_uses_its_own_folder(tmp_path):
    """The folder holding hadaemon.py and a checks.conf is the config dir; var/ in it the state."""
    folder = small_config(tmp_path / "copied")
    shutil.copy(HADAEMON, folder / "hadaemon.py")
    once = run([sys.executable, folder / "hadaemon.py", "--once"], env=clean_env(), cwd="/")
    assert once.returncode == 0, once.stdout + once.stderr
    assert (folder / "noted").read_text() == "db1 went unknown to master 1\n"
    assert (folder / "var" / "state.db.dat").is_file()

    # HADAEMON_CONFIG_DIR wins over the folder, --config-dir over both.
    other = small_config(tmp_path / "other")
    env = clean_env(HADAEMON_CONFIG_DIR=str(other))
    status = run([sys.executable, folder / "hadaemon.py", "--status", "--json"], env=env)
    daemon = json.loads(status.stdout)["daemon"]
    assert (daemon["config_dir"], daemon["state_dir"]) == (str(other), str(other / "var"))
    status = run([sys.executable, folder / "hadaemon.py", "--config-dir", folder, "--status",
                  "--json"], env=env)
    daemon = json.loads(status.stdout)["daemon"]
    assert (daemon["config_dir"], daemon["state_dir"]) == (str(folder), str(folder / "var"))
    assert not (other / "var").exists()        # --status reads, never creates


@pytest.mark.parametrize("environ,config_dir,state_dir", [
    ({}, "HERE", "HERE/var"),
    ({"HADAEMON_CONFIG_DIR": "/srv/ha"}, "/srv/ha", "/srv/ha/var"),
    ({"HADAEMON_CONFIG_DIR": "/srv/ha", "HADAEMON_STATE_DIR": "/run/ha"}, "/srv/ha", "/run/ha"),
    ({"HADAEMON_CONFIG_DIR": "/etc/hadaemon"}, "/etc/hadaemon", "/var/lib/hadaemon"),
    ({"HADAEMON_CONFIG_DIR": ""}, "HERE", "HERE/var"),          # set but empty: not set
])
def test_the_default_dirs(environ, config_dir, state_dir):
    shipped = load_shipped()                        # the file users run, not the package's module
    here = os.path.dirname(shipped.__file__)        # the repo: it holds a checks.conf
    got, _ = shipped.default_config_dir(environ)
    assert got == config_dir.replace("HERE", here)
    assert shipped.default_state_dir(got, environ) == state_dir.replace("HERE", here)


def test_a_lone_hadaemon_py_defaults_to_etc(tmp_path):
    """Without a checks.conf next to it, hadaemon.py is taken for an installed one."""
    shutil.copy(HADAEMON, tmp_path / "hadaemon.py")
    probe = textwrap.dedent("""
        import sys; sys.path.insert(0, %r)
        import hadaemon
        print(hadaemon.default_config_dir({})[0], hadaemon.default_state_dir("/etc/hadaemon", {}))
    """ % str(tmp_path))
    out = run([sys.executable, "-c", probe]).stdout.split()
    assert out == ["/etc/hadaemon", "/var/lib/hadaemon"]
