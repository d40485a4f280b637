"""checks.conf and actions.conf, read whole into one Config, every problem as FILE:LINE.

Owns load_config (and load_config_steps, the same in slices for a reload): the
[daemon] settings, the groups and their checks, remote scripts' problems, the
sections of actions.conf and their precedence keys.  A bad config raises one
ConfigError that carries every problem found, never only the first.

Uses: base, cron, config, netsettings.
"""

import os
import shutil

from .base import (
    CLUSTER_KEYS, CONFIG_STEP, ConfigError, DAEMON_KEYS, GROUP_KEYS, MAX_WINDOW, MAX_WORKERS,
    SECTION_KEYS, SSH_KEYS, format_duration, parse_duration, run_steps, valid_name,
)
from .cron import CronSpec
from .config import (
    Check, Command, Config, DaemonSettings, Group, SWITCHOVER, Section, parse_scope, read_ini,
    resolve_command,
)
from .netsettings import _cluster_settings, _cluster_value, _http_settings, parse_http_address


def _setting_value(key, words, where, errors):
    """Convert one KEY = VALUE setting; append an error and return None when bad."""
    try:
        if key in ("ssh_options", "notify"):
            return tuple(words)
        if key == "confirm" and len(words) != 1:
            return _confirm_of(words)
        if len(words) != 1 and key != "cron":
            raise ValueError("%s takes one value, got %d: %r" % (key, len(words), " ".join(words)))
        value = " ".join(words)
        if key in ("interval", "timeout", "action_timeout", "connect_timeout", "notify_timeout",
                   "switchover_settle", "stop_timeout", "recheck"):
            return parse_duration(value)
        if key in ("confirm", "workers", "history"):
            if not value.isdigit() or int(value) < 1:
                raise ValueError("%s must be a whole number of at least 1, got %r" % (key, value))
            if key == "workers" and int(value) > MAX_WORKERS:
                raise ValueError("workers must be at most %d, got %s" % (MAX_WORKERS, value))
            return (int(value), None) if key == "confirm" else int(value)
        if key == "cron":
            return CronSpec(value)
        if key == "log" and os.path.isabs(value) and not os.path.isdir(os.path.dirname(value)):
            raise ValueError("log = %s: directory %s does not exist" % (value, os.path.dirname(value)))
        if key == "host" and not valid_name(value):
            raise ValueError("bad host name %r (letters, digits, _ . : - )" % value)
        if key == "http":
            return parse_http_address(value)
        if key in ("switchover_role", "switchover_candidate"):
            if not valid_name(value) or "_to_" in value.lower():
                raise ValueError("%s must be a state word, got %r" % (key, value))
            return value.lower()
        return value
    except ValueError as exc:
        errors.append("%s: %s" % (where, exc))
        return None


def _confirm_of(words):
    """``confirm = N of M`` (docs/configuration.md: damping) -> (N, M); ValueError when not."""
    n, of, m = words if len(words) == 3 else ("", "", "")
    if of != "of" or not (n.isdigit() and m.isdigit()) or not 1 <= int(n) <= int(m) <= MAX_WINDOW:
        raise ValueError("confirm = N of M needs whole numbers 1 <= N <= M <= %d, got %r"
                         % (MAX_WINDOW, " ".join(words)))
    return int(n), int(m)


def _split_confirm(values):
    """``confirm``'s (N, M) as the records keep it: ``confirm`` N, ``confirm_of`` M (None: N of N)."""
    if "confirm" in values:
        values["confirm"], values["confirm_of"] = values["confirm"]
    return values


def _parse_checks(path, config_dir, errors):
    daemon = {}
    groups = []          # [(scope, where, settings, lines)]
    scopes = {}          # name -> Scope: the same few, opening many groups
    cluster = {}
    cluster_where = None
    current = None
    for n, (where, kind, name, words, text) in enumerate(read_ini(path, errors), 1):
        if n % CONFIG_STEP == 0:
            yield
        if kind == "section":
            if name == "daemon":
                current = ("daemon", daemon)
                continue
            if name == "cluster":
                if cluster_where is not None:
                    errors.append("%s: [cluster] again (first at %s); one cluster per daemon"
                                  % (where, cluster_where))
                    current = ("bad", {})
                    continue
                cluster_where = where
                current = ("cluster", cluster)
                continue
            try:
                scope = scopes.get(name) or scopes.setdefault(name, parse_scope(name))
            except ValueError as exc:
                errors.append("%s: %s" % (where, exc))
                current = ("bad", {})
                continue
            group = (scope, where, {}, [])
            groups.append(group)
            current = ("group", group)
        elif current is None:
            errors.append("%s: %s before any [section]" % (where, text))
        elif current[0] == "bad":
            continue
        elif current[0] == "cluster":
            if kind != "setting":
                errors.append("%s: [cluster] holds only KEY = VALUE settings, not %r" % (where, text))
            elif name not in CLUSTER_KEYS:
                errors.append("%s: unknown key %r in [cluster]; known: %s"
                              % (where, name, ", ".join(sorted(CLUSTER_KEYS))))
            elif name in cluster:
                errors.append("%s: %s is set twice in this section (first at %s)"
                              % (where, name, cluster[name][0]))
            else:
                cluster[name] = (where, _cluster_value(name, words, where, config_dir, errors))
        elif kind == "setting":
            if current[0] == "daemon":
                settings, allowed, what = daemon, DAEMON_KEYS, "[daemon]"
            else:
                scope, _, settings, _ = current[1]
                allowed = GROUP_KEYS | (SSH_KEYS if scope.kind == "ssh" else set())
                what = "[%s]" % scope.name
            if name not in allowed:
                hint = " (ssh settings only go in [ssh:...] groups or [daemon])" if name in SSH_KEYS else ""
                errors.append("%s: unknown key %r in %s%s; known: %s"
                              % (where, name, what, hint, ", ".join(sorted(allowed))))
            elif name in settings:
                errors.append("%s: %s is set twice in this section (first at %s)"
                              % (where, name, settings[name][0]))
            else:
                value = _setting_value(name, words, where, errors)
                if value is not None:
                    settings[name] = (where, value)
        elif current[0] == "daemon":
            errors.append("%s: [daemon] holds only KEY = VALUE settings, not %r" % (where, text))
        elif words:
            current[1][3].append((where, words, text))
    _http_settings(daemon, config_dir, errors)
    _notify_setting(daemon, config_dir, errors)
    settings = DaemonSettings(**_split_confirm({k: v for k, (_, v) in daemon.items()}))
    group_list, checks = yield from _build_groups(groups, settings, config_dir, errors,
                                                  daemon.get("recheck", ("[daemon]",))[0])
    if cluster_where is not None:
        cluster = _cluster_settings(cluster_where, cluster, errors)
    return settings, group_list, checks, cluster or None


def _notify_setting(daemon, config_dir, errors):
    """notify = COMMAND ARGS (docs/notify.md): COMMAND looked up as an action command is."""
    if "notify" in daemon:
        where, words = daemon.pop("notify")
        path_, problem = resolve_command(words[0], "actions", config_dir) if words else \
            (None, "notify = needs a command")
        if problem:
            errors.append("%s: %s" % (where, problem))
        else:
            daemon["notify"] = (where, (path_,) + words[1:])


def _recheck_problem(gset, values, daemon_where):
    """Why a group's ``recheck`` cannot be (docs/configuration.md), or None.  The
    daemon's default applies to interval groups only: a cron group refuses its own."""
    if values["recheck"] is None:
        return None
    where = gset["recheck"][0] if "recheck" in gset else daemon_where
    if "cron" in gset:
        if "recheck" not in gset:
            values["recheck"] = None
            return None
        return "%s: recheck is for interval checks; this group runs by cron (%s)" % (
            where, gset["cron"][0])
    if values["recheck"] > values["interval"]:
        return "%s: recheck %s is longer than the interval %s of the group at %s" % (
            where, format_duration(values["recheck"]), format_duration(values["interval"]),
            gset["interval"][0] if "interval" in gset else "[daemon]")
    return None


def _build_groups(groups, settings, config_dir, errors, recheck_where):
    """Groups with the daemon's defaults filled in, and their checks, each command found
    (a generator, as _parse_checks: it yields every CONFIG_STEP checks)."""
    checks, seen = [], {}
    group_list = []
    resolved, remote = {}, {}           # per command word: a few scripts, many checks
    defaults = {"interval": settings.interval, "cron": None, "timeout": settings.timeout,
                "confirm": (settings.confirm, settings.confirm_of), "host": None,
                "ssh_identity": settings.ssh_identity, "ssh_options": settings.ssh_options,
                "connect_timeout": settings.connect_timeout, "recheck": settings.recheck}
    for i, (scope, gwhere, gset, lines) in enumerate(groups):
        groups[i] = None                # let go as read (see read_ini)
        if "interval" in gset and "cron" in gset:
            errors.append("%s: interval and cron both set; a group has one or the other"
                          % gset["cron"][0])
        values = _split_confirm(dict(defaults, **{key: value for key, (_, value) in gset.items()}))
        problem = _recheck_problem(gset, values, recheck_where)
        if problem:
            errors.append(problem)
        group = Group(scope, gwhere, **values)
        group_list.append(group)
        if scope.kind == "ssh" and lines and not shutil.which("ssh"):
            errors.append("%s: [%s]: no ssh client on PATH (install openssh-client)"
                          % (gwhere, scope.name))
        for where, words, name in lines:
            if len(checks) % CONFIG_STEP == 0:
                yield
            path_, problem = resolve_command(words[0], "checks", config_dir, resolved)
            if not problem and scope.kind == "ssh":
                if path_ not in remote:
                    remote[path_] = remote_problem(path_)
                problem = remote[path_]
            if problem:
                errors.append("%s: %s" % (where, problem))
                continue
            host = group.host or os.path.basename(words[0])
            if not valid_name(host):
                errors.append("%s: the check's host %r (from its file name) is not a valid host "
                              "name; set host = NAME in the group" % (where, host))
                continue
            key = "%s|%s|%s" % (scope.name, host, name)
            if key in seen:
                errors.append("%s: the same check %r for host %s in [%s] is already at %s"
                              % (where, name, host, scope.name, seen[key]))
                continue
            seen[key] = where
            checks.append(Check(key, name, (path_,) + tuple(words[1:]), host, group, where))
    return group_list, checks


def _parse_transition(text):
    """``FROM_to_TO`` -> (from, to), lower-cased; ValueError when malformed."""
    parts = text.split("_to_")
    if len(parts) != 2:
        raise ValueError("%r is not FROM_to_TO" % text)
    result = []
    for part in parts:
        if part != "any" and not valid_name(part):
            raise ValueError("bad state %r in %r (a state word or any)" % (part, text))
        result.append(part.lower())
    return tuple(result)


def _parse_actions(path, config_dir, default_timeout, errors):
    sections = {}
    current = None
    for n, (where, kind, name, words, text) in enumerate(read_ini(path, errors), 1):
        if n % CONFIG_STEP == 0:
            yield
        if kind == "section":
            current = None
            host, _, tr = name.rpartition(":")
            host = host.strip() or None
            try:
                if host is not None and not valid_name(host):
                    raise ValueError("bad host name %r" % host)
                if tr.strip() == SWITCHOVER:        # SPEC §12: [switchover], [TO: switchover]
                    from_state, to_state = None, SWITCHOVER
                else:
                    from_state, to_state = _parse_transition(tr.strip())
            except ValueError as exc:
                errors.append("%s: [%s]: %s; write [FROM_to_TO] or [HOST: FROM_to_TO]"
                              % (where, name, exc))
                current = "bad"
                continue
            key = (host, from_state, to_state)
            if key in sections:
                errors.append("%s: section [%s] already at %s" % (where, name, sections[key].where))
                current = "bad"
                continue
            current = sections[key] = Section(host, from_state, to_state, [], default_timeout, where)
            current.explicit = set()
        elif current is None:
            errors.append("%s: %s before any [FROM_to_TO] section" % (where, text))
        elif current == "bad":
            continue
        elif kind == "setting":
            if name not in SECTION_KEYS:
                errors.append("%s: unknown key %r in [%s]; known: %s"
                              % (where, name, current.name, ", ".join(sorted(SECTION_KEYS))))
            elif name in current.explicit:
                errors.append("%s: %s is set twice in [%s]" % (where, name, current.name))
            else:
                value = _setting_value(name, words, where, errors)
                current.explicit.add(name)
                if value is not None:
                    current.timeout = value
        elif words:
            ignore = words[0].startswith("-")
            words = list(words)
            if ignore:
                words[0] = words[0][1:]
                if not words[0]:
                    words.pop(0)
            if not words:
                errors.append("%s: a lone '-' is not a command" % where)
                continue
            path_, problem = resolve_command(words[0], "actions", config_dir)
            if problem:
                errors.append("%s: %s" % (where, problem))
                continue
            current.commands.append(Command((path_,) + tuple(words[1:]), ignore, where))
    for section in sections.values():
        del section.explicit
    return sections


def load_config_steps(config_dir):
    """load_config() in steps: a generator that yields every CONFIG_STEP lines or checks
    and returns the Config (or raises ConfigError), so that a daemon can read ten
    thousand checks between its other work."""
    config_dir = os.path.abspath(config_dir)
    errors = []
    settings, groups, checks, cluster = yield from _parse_checks(
        os.path.join(config_dir, "checks.conf"), config_dir, errors)
    sections = yield from _parse_actions(os.path.join(config_dir, "actions.conf"), config_dir,
                                         settings.action_timeout, errors)
    if errors:
        raise ConfigError(errors)
    return Config(config_dir, settings, groups, checks, sections, cluster)


def load_config(config_dir):
    """Read and check checks.conf and actions.conf whole; raise ConfigError with every problem."""
    return run_steps(load_config_steps(config_dir))



def remote_problem(path):
    """Why the file at ``path`` cannot be a remote check (a binary), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as exc:
        return "cannot read %s: %s" % (path, exc.strerror)
    if not head.startswith(b"#!") and b"\0" in head:
        return ("%s is a binary: a remote check is a script, sent to the interpreter of its "
                "#! line over there (wrap a plugin in a script)" % path)
    return None
