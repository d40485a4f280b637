"""--check-config (-t): the config read whole, then what a valid config may still get wrong.

Owns reading the config for a command (errors printed, exit 1), cmd_check_config
and its warnings, each at its FILE:LINE: a ``%WORD%`` in an action naming no state
hadaemon knows of (known_variables, the one list of them), a section whose worst
case outlasts ``stop_timeout``, an ssh control socket path too long; and
``--connect``, which tries each ssh target and etcd endpoint once.

Uses: base, configfiles, children, ssh, etcd, client.
"""

import os
import sys

from .base import ACTION_KILL_GRACE, ConfigError, EXIT_FAIL, EXIT_OK, EXIT_STATES, format_duration
from .configfiles import load_config
from .children import _VAR_RE
from .ssh import connect_ssh_targets, ssh_control_path
from .etcd import connect_etcd_endpoints
from .client import offline_status


def config_or_exit(config_dir, origin=None):
    """The config of ``config_dir``; on any mistake print them all and exit 1."""
    try:
        return load_config(config_dir)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        if origin and not os.path.isfile(os.path.join(config_dir, "checks.conf")):
            print("the config dir %s is %s; give --config-dir DIR or set HADAEMON_CONFIG_DIR"
                  % (config_dir, origin), file=sys.stderr)
        print("%d error%s: nothing was started or changed" % (len(exc.errors), "s" * (len(exc.errors) > 1)),
              file=sys.stderr)
        sys.exit(EXIT_FAIL)


def known_variables(config, db_states=()):
    """Every %NAME% an action may name and get a value from: HOST, FROM, TO, and the
    state words the config names (its sections), a check's exit status gives, or the
    state db holds (``db_states``), and the switchover_role / switchover_candidate words."""
    states = {"unknown"} | set(EXIT_STATES.values()) | set(db_states)
    states.update((config.daemon.switchover_role, config.daemon.switchover_candidate))
    for section in config.sections.values():
        states.update((section.from_state, section.to_state))
    states.discard("any")
    states.discard(None)
    return {"HOST", "FROM", "TO"} | {state.upper() for state in states}


def db_state_words(state_dir):
    """The states the state db holds (hosts' states, recent transitions); none when unreadable."""
    try:
        doc, ledger = offline_status(state_dir)
    except (OSError, ValueError):
        return set()
    words = {h.get("state") for h in doc["hosts"].values()}
    for entry in ledger.history(1000):
        words.update((entry.get("from"), entry.get("to")))
    return {w for w in words if isinstance(w, str)}


def config_warnings(config, state_dir):
    """The -t warnings of a valid config, each a line starting ``warning: FILE:LINE:``."""
    out = []
    known = known_variables(config, db_state_words(state_dir))
    for section in sorted(config.sections.values(), key=lambda s: s.where):
        for cmd in section.commands:
            for word in cmd.argv[1:]:
                for m in _VAR_RE.finditer(word):
                    if m.group(1) and m.group(1) not in known:
                        out.append("warning: %s: %%%s%% names no state hadaemon knows of (known: %s): "
                                   "it would be empty and the run refused" % (
                                       cmd.where, m.group(1), ", ".join(sorted(known))))
    budget = config.daemon.stop_timeout
    for section in sorted(config.sections.values(), key=lambda s: s.where):
        worst = len(section.commands) * (section.timeout + ACTION_KILL_GRACE)
        if budget is not None and worst > budget:
            out.append("warning: %s: [%s] may take %s at worst (%d commands, each up to its timeout "
                       "%s and %s to kill it), more than stop_timeout = %s: a stop while it runs "
                       "would be killed half-way" % (
                           section.where, section.name, format_duration(worst), len(section.commands),
                           format_duration(section.timeout), format_duration(ACTION_KILL_GRACE),
                           format_duration(budget)))
    for group in config.groups:
        if group.scope.kind == "ssh" and ssh_control_path(group, state_dir) is None:
            out.append("warning: [%s]: the state dir path %s is too long for an ssh control socket; "
                       "its checks would run without connection reuse" % (group.scope.name, state_dir))
    return out


def cmd_check_config(args):
    config = config_or_exit(args.config_dir, args.config_origin)
    print("configuration OK: %d checks in %d groups, %d action sections, %d workers"
          % (len(config.checks), len(config.groups), len(config.sections), config.daemon.workers))
    for line in config_warnings(config, args.state_dir):
        print(line)
    if not args.connect:
        return EXIT_OK
    results = connect_ssh_targets(config)
    for group, error, took in results:
        print("ssh [%s] (%s): %s" % (group.scope.name, group.where,
                                     "FAILED: %s" % error if error else "ok in %.2fs" % took))
    failed = any(error for _, error, _ in results)
    if config.cluster is not None:
        for url, error, what in connect_etcd_endpoints(config.cluster):
            print("etcd %s: %s" % (url, "FAILED: %s" % error if error else what))
            failed = failed or bool(error)
    elif not results:
        print("no ssh targets or etcd endpoints to try")
    return EXIT_FAIL if failed else EXIT_OK
