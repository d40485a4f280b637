"""--init DIR: a commented starter config, written from this code (a pip install has no other).

Owns the starter's files (checks.conf, actions.conf, a role check and an action
script, two role files) and write_starter, which writes them into a new or empty
config dir and never overwrites a file.

Uses: base.
"""

import os
import sys

from .base import EXIT_FAIL, EXIT_OK

STARTER_CHECKS = """\
# hadaemon starter config (written by hadaemon --init).  It watches two pretend
# database hosts, db1 and db2, whose roles are in the files roles/db1 and roles/db2:
#   echo slave > roles/db1; sleep 3; echo master > roles/db2
# switches them over.  Replace checks/check_role with a real check (examples/postgresql/
# checks/check_pg_role in hadaemon's source) and the actions with your own.
# Check it with:  hadaemon --config-dir THIS_DIR --check-config
# Every key, its default and its range: docs/configuration.md in hadaemon's source.

[daemon]
interval = 1s          ; how often a check runs
timeout  = 5s          ; a check running longer is killed, with its process group
confirm  = 1           ; identical reports in a row before a new state is accepted
workers  = 2           ; pre-forked check workers
action_timeout = 20s   ; a command of actions.conf running longer is killed
#http = 127.0.0.1:8642 ; the status page, JSON, load balancer checks, /metrics (docs/http.md)
#stop_timeout = 90s    ; your service manager's stop budget (systemd: TimeoutStopSec)

# A group: checks that run here ([local]) or on another host ([ssh:USER@HOST]).
[local]
confirm = 2            ; two reports in a row: one odd reading does not fail over
check_role db1
check_role db2
"""

STARTER_ACTIONS = """\
# hadaemon starter actions.  For a transition of host H from F to T the first existing
# section of [H: F_to_T], [H: any_to_T], [H: F_to_any], [H: any_to_any], [F_to_T],
# [any_to_T], [F_to_any], [any_to_any] runs, its commands one after another; the first
# that fails stops the sequence, unless its line starts with "-".
# %HOST%, %FROM%, %TO% and %STATE% (the hosts in STATE, e.g. %MASTER%) are expanded.

# A standby became master: here you would stop the middleware, move the service
# address and start the middleware pointed at %MASTER%.
[slave_to_master]
announce %HOST% is the new master (masters now: %MASTER%)

[master_to_slave]
announce %HOST% is a slave again

# A host went down: tell someone; "-" means a failure of this command is ignored.
[any_to_down]
timeout = 10s
-announce %HOST% went %FROM% to down

# First start on a fresh state db: every host goes unknown -> its state.
[unknown_to_any]
announce %HOST% is %TO% (first report)
"""

STARTER_CHECK_ROLE = """\
#!/bin/sh
# check_role HOST: reports HOST's role, read from the file roles/HOST of the config dir.
# A check prints state=... (and host=...) on stdout; docs/configuration.md says more.
role=$(cat "$HA_CONFIG_DIR/roles/$1" 2>/dev/null) || { echo "host=$1"; echo "state=down"; \
echo "message=no file roles/$1"; exit 0; }
echo "host=$1"
echo "state=$role"
"""

STARTER_ANNOUNCE = """\
#!/bin/sh
# announce WORDS...: says them on stdout, which hadaemon logs with the run.
echo "$*"
"""

STARTER_FILES = [       # (path, text, mode)
    ("checks.conf", STARTER_CHECKS, 0o644),
    ("actions.conf", STARTER_ACTIONS, 0o644),
    ("checks/check_role", STARTER_CHECK_ROLE, 0o755),
    ("actions/announce", STARTER_ANNOUNCE, 0o755),
    ("roles/db1", "master\n", 0o644),
    ("roles/db2", "slave\n", 0o644),
]


def write_starter(config_dir):
    """--init DIR: write STARTER_FILES into DIR; refuse, changing nothing, when one is there."""
    config_dir = os.path.abspath(config_dir)
    there = [name for name, _, _ in STARTER_FILES if os.path.lexists(os.path.join(config_dir, name))]
    if there:
        print("hadaemon: --init %s: refusing: %s already there (nothing was written)"
              % (config_dir, ", ".join(there)), file=sys.stderr)
        return EXIT_FAIL
    try:
        for name, text, mode in STARTER_FILES:
            path = os.path.join(config_dir, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "w") as f:
                f.write(text)
            os.chmod(path, mode)
    except OSError as exc:
        print("hadaemon: --init %s: %s" % (config_dir, exc), file=sys.stderr)
        return EXIT_FAIL
    print("wrote a starter config in %s: %s" % (config_dir, ", ".join(n for n, _, _ in STARTER_FILES)))
    print("next: hadaemon --config-dir %s --check-config, then --foreground" % config_dir)
    return EXIT_OK
