"""checks.conf and actions.conf: every kind of mistake, and what a valid config parses into.

Table-driven, no processes: ``load_config`` on files written to a temp dir.  Every
error line must start with the right absolute FILE:LINE and name the offending value.
"""

import os
import shutil
import stat
import textwrap

import pytest

import hadaemon.base
import hadaemon.cron
import hadaemon.config
import hadaemon.configfiles

CHECKS = ("check_a", "check_b", "check+x")
ACTIONS = ("act", "notify")
VALID_CHECKS = "[local]\ncheck_a\n"


def make_dir(tmp_path, checks=VALID_CHECKS, actions="", name="conf"):
    """A config dir with a few executables in checks/ and actions/ and the two files."""
    d = tmp_path / name
    for sub, names in (("checks", CHECKS), ("actions", ACTIONS)):
        (d / sub).mkdir(parents=True, exist_ok=True)
        for n in names:
            exe(d / sub / n)
    noexec = d / "checks" / "noexec"
    noexec.write_text("#!/bin/sh\n")
    noexec.chmod(0o644)
    write(d / "checks.conf", checks)
    write(d / "actions.conf", actions)
    return d


def exe(path, body="#!/bin/sh\nexit 0\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    path.chmod(0o755)
    return path


def write(path, text):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text).lstrip("\n"))


def errors_of(d):
    with pytest.raises(hadaemon.base.ConfigError) as info:
        hadaemon.configfiles.load_config(str(d))
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


# -- one mistake, one error line -------------------------------------------------------
#
# (id, checks.conf, actions.conf, file the error is in, line, words the error must contain)

C, A = "checks.conf", "actions.conf"
MISTAKES = [
    ("daemon-unknown-key", "[daemon]\nbogus = 1\n" + VALID_CHECKS, "", C, 2, ["'bogus'", "[daemon]"]),
    ("group-unknown-key", "[local]\ncheck_a\nfrobnicate = 3\n", "", C, 3, ["'frobnicate'", "[local]"]),
    ("action-unknown-key", VALID_CHECKS, "[a_to_b]\nretries = 3\nact\n", A, 2, ["'retries'", "[a_to_b]"]),
    ("ssh-key-in-local", "[local]\nssh_identity = /etc/key\ncheck_a\n", "", C, 2,
     ["'ssh_identity'", "[local]", "ssh"]),
    ("connect-timeout-in-local", "[local]\nconnect_timeout = 3s\ncheck_a\n", "", C, 2,
     ["'connect_timeout'"]),
    ("bad-duration-unit", "[daemon]\ninterval = 5x\n" + VALID_CHECKS, "", C, 2, ["'5x'", "duration"]),
    ("bad-duration-words", "[local]\ntimeout = 5 parsecs\ncheck_a\n", "", C, 2, ["timeout", "5 parsecs"]),
    ("zero-duration", "[local]\ninterval = 0s\ncheck_a\n", "", C, 2, ["'0s'"]),
    ("negative-duration", "[local]\ninterval = -1s\ncheck_a\n", "", C, 2, ["'-1s'"]),
    ("bad-action-timeout", "[daemon]\naction_timeout = soon\n" + VALID_CHECKS, "", C, 2, ["'soon'"]),
    ("bad-section-timeout", VALID_CHECKS, "[a_to_b]\ntimeout = 1 min\nact\n", A, 2, ["1 min"]),
    ("confirm-zero", "[local]\nconfirm = 0\ncheck_a\n", "", C, 2, ["confirm", "'0'"]),
    ("confirm-not-a-number", "[daemon]\nconfirm = abc\n" + VALID_CHECKS, "", C, 2, ["confirm", "'abc'"]),
    ("confirm-fraction", "[local]\nconfirm = 1.5\ncheck_a\n", "", C, 2, ["'1.5'"]),
    ("workers-too-many", "[daemon]\nworkers = 257\n" + VALID_CHECKS, "", C, 2, ["workers", "257"]),
    ("workers-zero", "[daemon]\nworkers = 0\n" + VALID_CHECKS, "", C, 2, ["workers", "'0'"]),
    ("interval-and-cron", "[local]\ninterval = 1m\ncron = */5 * * * *\ncheck_a\n", "", C, 3,
     ["interval", "cron"]),
    ("recheck-with-cron", "[local]\ncron = */5 * * * *\nrecheck = 1s\ncheck_a\n", "", C, 3,
     ["recheck", "cron", "checks.conf:2"]),
    ("recheck-longer-than-interval", "[local]\ninterval = 500ms\nrecheck = 2s\ncheck_a\n", "", C, 3,
     ["recheck 2s", "interval 500ms", "checks.conf:2"]),
    ("daemon-recheck-longer-than-interval", "[daemon]\nrecheck = 20s\n" + VALID_CHECKS, "", C, 2,
     ["recheck 20s", "interval 10s"]),
    ("recheck-not-a-duration", "[local]\nrecheck = soon\ncheck_a\n", "", C, 2, ["'soon'"]),
    ("cron-out-of-range", "[local]\ncron = 61 * * * *\ncheck_a\n", "", C, 2, ["61", "minute"]),
    ("cron-field-count", "[local]\ncron = * * *\ncheck_a\n", "", C, 2, ["5 fields", "'* * *'"]),
    ("cron-never", "[local]\ncron = 0 0 31 2 *\ncheck_a\n", "", C, 2, ["0 0 31 2 *", "never"]),
    ("unknown-scope", "[remote]\ncheck_a\n", "", C, 1, ["[remote]", "scope"]),
    ("empty-scope", "[]\ncheck_a\n", "", C, 1, ["[]"]),
    ("bad-ssh-scope", "[ssh:bad host]\ncheck_a\n", "", C, 1, ["'ssh:bad host'"]),
    ("ssh-port-out-of-range", "[ssh:db2:70000]\ncheck_a\n", "", C, 1, ["'ssh:db2:70000'"]),
    ("ssh-no-host", "[ssh:]\ncheck_a\n", "", C, 1, ["'ssh:'"]),
    ("unterminated-single-quote", "[local]\ncheck_a 'abc\n", "", C, 2, ["unterminated", "'"]),
    ("unterminated-double-quote", VALID_CHECKS, "[a_to_b]\nact \"abc\n", A, 2, ["unterminated", '"']),
    ("setting-before-section", "interval = 1s\n" + VALID_CHECKS, "", C, 1, ["interval = 1s", "before"]),
    ("check-before-section", "check_a\n" + VALID_CHECKS, "", C, 1, ["check_a", "before"]),
    ("action-before-section", VALID_CHECKS, "act x\n[a_to_b]\nact\n", A, 1, ["act x", "before"]),
    ("check-not-found", "[local]\nno_such_check -v\n", "", C, 2, ["no_such_check", "not found"]),
    ("check-not-executable", "[local]\nnoexec\n", "", C, 2, ["noexec", "not executable"]),
    ("action-not-found", VALID_CHECKS, "[a_to_b]\nno_such_action %HOST%\n", A, 2,
     ["no_such_action", "not found"]),
    ("check-in-actions-dir-only", "[local]\nact\n", "", C, 2, ["act", "not found"]),
    ("action-in-checks-dir-only", VALID_CHECKS, "[a_to_b]\ncheck_b\n", A, 2, ["check_b", "not found"]),
    ("duplicate-check", "[local]\ncheck_a -x  1\ncheck_a   -x 1\n", "", C, 3,
     ["check_a -x 1", "check_a", "checks.conf:2"]),
    ("duplicate-check-across-groups", "[local]\nhost = db1\ncheck_a\n[local]\nhost = db1\ncheck_a\n", "",
     C, 6, ["db1", "checks.conf:3"]),
    ("bad-host-name", "[local]\nhost = db1;rm\ncheck_a\n", "", C, 2, ["'db1;rm'"]),
    ("bad-host-two-words", "[local]\nhost = bad host!\ncheck_a\n", "", C, 2, ["bad host!"]),
    ("bad-host-from-file-name", "[local]\ncheck+x\n", "", C, 2, ["'check+x'"]),
    ("transition-empty-to", VALID_CHECKS, "[x_to_]\nact\n", A, 1, ["[x_to_]"]),
    ("transition-empty-from", VALID_CHECKS, "[_to_x]\nact\n", A, 1, ["[_to_x]"]),
    ("transition-three-states", VALID_CHECKS, "[a_to_b_to_c]\nact\n", A, 1, ["[a_to_b_to_c]"]),
    ("transition-no-to", VALID_CHECKS, "[master]\nact\n", A, 1, ["[master]"]),
    ("transition-bad-host", VALID_CHECKS, "[bad host!: a_to_b]\nact\n", A, 1, ["bad host!"]),
    ("transition-bad-state", VALID_CHECKS, "[a_to_b!]\nact\n", A, 1, ["'b!'"]),
    ("duplicate-section", VALID_CHECKS, "[a_to_b]\nact\n[a_to_b]\nact\n", A, 3,
     ["[a_to_b]", "actions.conf:1"]),
    ("duplicate-section-case", VALID_CHECKS, "[a_to_b]\nact\n[A_to_B]\nact\n", A, 3,
     ["[A_to_B]", "actions.conf:1"]),
    ("duplicate-host-section", VALID_CHECKS, "[db1: a_to_b]\nact\n[db1:a_to_b]\nact\n", A, 3,
     ["db1", "actions.conf:1"]),
    ("daemon-setting-twice", "[daemon]\nworkers = 2\nworkers = 3\n" + VALID_CHECKS, "", C, 3,
     ["workers", "twice", "checks.conf:2"]),
    ("group-setting-twice", "[local]\ntimeout = 1s\ncheck_a\ntimeout = 2s\n", "", C, 4,
     ["timeout", "twice"]),
    ("section-setting-twice", VALID_CHECKS, "[a_to_b]\ntimeout = 1s\ntimeout = 2s\nact\n", A, 3,
     ["timeout", "twice"]),
    ("lone-dash", VALID_CHECKS, "[a_to_b]\n-\n", A, 2, ["'-'"]),
    ("lone-dash-comment", VALID_CHECKS, "[a_to_b]\nact\n  -   # nothing\n", A, 3, ["'-'"]),
    ("daemon-check-line", "[daemon]\ncheck_a\n" + VALID_CHECKS, "", C, 2, ["[daemon]", "check_a"]),
    ("non-utf8-checks", b"[local]\ncheck_a\ncheck_b \xff\xfe\n", "", C, 3, ["UTF-8"]),
    ("non-utf8-actions", VALID_CHECKS, b"[a_to_b]\nact\n\nact \xe9t\xe9\n", A, 4, ["UTF-8"]),
    ("log-dir-missing", "[daemon]\nlog = /nonexistent/dir/hadaemon.log\n" + VALID_CHECKS, "", C, 2,
     ["/nonexistent/dir"]),
]


@pytest.mark.parametrize("checks, actions, file, line, needles",
                         [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_each_mistake_gives_one_error_with_file_line(tmp_path, checks, actions, file, line, needles):
    d = make_dir(tmp_path, checks, actions)
    errors = errors_of(d)
    assert len(errors) == 1, errors
    prefix = "%s/%s:%d: " % (d, file, line)
    assert errors[0].startswith(prefix), errors
    for needle in needles:
        assert needle in errors[0][len(prefix):], (needle, errors[0])


@pytest.mark.parametrize("missing", ["checks.conf", "actions.conf"])
def test_missing_file(tmp_path, missing):
    d = make_dir(tmp_path)
    (d / missing).unlink()
    errors = errors_of(d)
    assert errors == ["%s/%s: cannot read: No such file or directory" % (d, missing)]


def test_missing_config_dir(tmp_path):
    errors = errors_of(tmp_path / "nowhere")
    assert len(errors) == 2
    assert errors[0].startswith("%s/nowhere/checks.conf: cannot read" % tmp_path)
    assert errors[1].startswith("%s/nowhere/actions.conf: cannot read" % tmp_path)


def test_every_error_is_reported(tmp_path):
    d = make_dir(tmp_path, """
        [daemon]
        bogus = 1
        [local]
        confirm = 0
        no_such_check
        check_a 'open
        [elsewhere]
        check_a
    """)
    errors = errors_of(d)
    assert [e.split(": ", 1)[0] for e in sorted(errors)] == \
        ["%s/checks.conf:%d" % (d, n) for n in (2, 4, 5, 6, 7)]


def test_errors_from_both_files_together(tmp_path):
    d = make_dir(tmp_path, "[local]\nno_such_check\n", "[a_to_b]\nno_such_action\n[x_to_]\n")
    errors = errors_of(d)
    assert len(errors) == 3
    assert errors[0].startswith("%s/checks.conf:2: " % d)
    assert sorted(e.split(": ", 1)[0] for e in errors[1:]) == \
        ["%s/actions.conf:2" % d, "%s/actions.conf:3" % d]


def test_bad_section_body_is_not_reported_twice(tmp_path):
    """The lines under a section that is itself wrong are skipped, not each reported."""
    d = make_dir(tmp_path, "[nowhere]\nno_such_check\nbogus = 1\n" + VALID_CHECKS,
                 "[x_to_]\nno_such_action\n")
    assert len(errors_of(d)) == 2


def test_unreadable_file(tmp_path):
    if os.getuid() == 0:
        pytest.skip("root reads any file")
    d = make_dir(tmp_path)
    (d / "checks.conf").chmod(0)
    assert errors_of(d) == ["%s/checks.conf: cannot read: Permission denied" % d]


# -- valid configs ---------------------------------------------------------------------

def test_group_settings_apply_regardless_of_order_and_default_from_daemon(tmp_path):
    d = make_dir(tmp_path, """
        [daemon]
        interval = 7s
        timeout = 3s
        confirm = 2
        workers = 4
        action_timeout = 30s
        history = 50

        [local]
        check_a one
        interval = 500ms
        host = db1
        check_b
        confirm = 3

        [local]
        check_a one
    """)
    cfg = hadaemon.configfiles.load_config(str(d))
    assert cfg.config_dir == str(d)
    assert (cfg.daemon.interval, cfg.daemon.timeout, cfg.daemon.confirm, cfg.daemon.workers,
            cfg.daemon.action_timeout, cfg.daemon.history) == (7, 3, 2, 4, 30, 50)
    g1, g2 = cfg.groups
    assert (g1.interval, g1.timeout, g1.confirm, g1.host, g1.cron) == (0.5, 3, 3, "db1", None)
    assert (g2.interval, g2.timeout, g2.confirm, g2.host, g2.cron) == (7, 3, 2, None, None)
    assert g1.scope == g2.scope == hadaemon.config.Scope("local")
    assert g1.where == "%s/checks.conf:9" % d
    assert [(c.name, c.host, c.group is g1) for c in cfg.checks] == [
        ("check_a one", "db1", True), ("check_b", "db1", True), ("check_a one", "check_a", False)]
    assert cfg.checks[0].argv == (str(d / "checks" / "check_a"), "one")
    assert cfg.checks[0].key == "local|db1|check_a one"
    assert cfg.checks[1].where == "%s/checks.conf:13" % d


def test_daemon_defaults_when_unset(tmp_path):
    cfg = hadaemon.configfiles.load_config(str(make_dir(tmp_path)))
    assert cfg.daemon == hadaemon.config.DaemonSettings()
    assert (cfg.daemon.interval, cfg.daemon.timeout, cfg.daemon.confirm, cfg.daemon.workers) == (10, 5, 1, 2)
    assert cfg.sections == {}


def test_recheck_default_applies_to_interval_groups_only(tmp_path):
    """[daemon] recheck is every interval group's default (off when unset); a cron
    group is not refused for the default, it just does without it."""
    cfg = hadaemon.configfiles.load_config(str(make_dir(tmp_path, """
        [daemon]
        interval = 1s
        recheck = 100ms
        [local]
        check_a
        [local]
        cron = */5 * * * *
        check_b
        [local]
        interval = 2s
        recheck = 1.5s
        host = other
        check_a
    """)))
    assert [g.recheck for g in cfg.groups] == [0.1, None, 1.5]
    assert hadaemon.configfiles.load_config(str(make_dir(tmp_path, name="plain"))).groups[0].recheck is None


def test_cron_group(tmp_path):
    cfg = hadaemon.configfiles.load_config(str(make_dir(tmp_path, "[local]\ncron = */15 9-17 * * mon-fri\ncheck_a\n")))
    cron = cfg.groups[0].cron
    assert isinstance(cron, hadaemon.cron.CronSpec) and cron.text == "*/15 9-17 * * mon-fri"
    assert cron.minutes == {0, 15, 30, 45} and cron.weekdays == {1, 2, 3, 4, 5}


def test_comments(tmp_path):
    d = make_dir(tmp_path, """
        # a whole-line comment
          ; an indented one
        [daemon]   # after a section
        interval = 2s   ; after a value
        [local]  ; after a group
        check_a '#kept' "x ; y" a#b c;d   # trailing comment
        check_b arg ;trailing
            # indented comment in a group
    """, """
        [a_to_b] ; comment
        act "#1" # comment
    """)
    cfg = hadaemon.configfiles.load_config(str(d))
    assert cfg.daemon.interval == 2
    a, b = cfg.checks
    assert a.argv[1:] == ("#kept", "x ; y", "a#b", "c;d")
    assert a.name == "check_a '#kept' \"x ; y\" a#b c;d"
    assert b.argv[1:] == ("arg",) and b.name == "check_b arg"
    assert cfg.sections[(None, "a", "b")].commands[0].argv[1:] == ("#1",)


def test_shell_like_splitting_and_name_normalised(tmp_path):
    d = make_dir(tmp_path, "[local]\n  check_a    x \t 'two words'  \"q\\\"uote\"  back\\ slash  \n")
    (check,) = hadaemon.configfiles.load_config(str(d)).checks
    assert check.argv[1:] == ("x", "two words", 'q"uote', "back slash")
    assert check.name == "check_a x 'two words' \"q\\\"uote\" back\\ slash"


def test_default_host_is_the_file_name_of_the_first_word(tmp_path):
    plugin = exe(tmp_path / "plugins" / "check_tcp")
    d = make_dir(tmp_path, "[local]\n%s -H 127.0.0.1 -p 5432\ncheck_b\n" % plugin)
    tcp, b = hadaemon.configfiles.load_config(str(d)).checks
    assert (tcp.host, tcp.argv) == ("check_tcp", (str(plugin), "-H", "127.0.0.1", "-p", "5432"))
    assert b.host == "check_b"


def test_same_check_for_two_hosts_or_two_scopes_is_fine(tmp_path):
    d = make_dir(tmp_path, """
        [local]
        host = db1
        check_a
        [local]
        host = db2
        check_a
        [ssh:db3]
        host = db1
        check_a
    """)
    assert [c.key for c in hadaemon.configfiles.load_config(str(d)).checks] == \
        ["local|db1|check_a", "local|db2|check_a", "ssh:db3|db1|check_a"]


@pytest.mark.parametrize("name, user, host, port", [
    ("ssh:db2", None, "db2", None),
    ("ssh:postgres@db2.example.com:22", "postgres", "db2.example.com", 22),
    ("ssh:root@10.0.0.2", "root", "10.0.0.2", None),
    ("ssh:[::1]:2222", None, "::1", 2222),
])
def test_ssh_scope(tmp_path, name, user, host, port):
    d = make_dir(tmp_path, """
        [daemon]
        connect_timeout = 2s
        ssh_options = -o "UserKnownHostsFile=/etc/my hosts"
        [%s]
        ssh_identity = /etc/hadaemon/id_ed25519
        check_a
    """ % name)
    (group,) = hadaemon.configfiles.load_config(str(d)).groups
    assert group.scope == hadaemon.config.Scope(name, "ssh", user, host, port)
    assert group.ssh_identity == "/etc/hadaemon/id_ed25519"
    assert group.ssh_options == ("-o", "UserKnownHostsFile=/etc/my hosts")
    assert group.connect_timeout == 2


def test_actions(tmp_path):
    d = make_dir(tmp_path, "[daemon]\naction_timeout = 30s\n" + VALID_CHECKS, """
        [slave_to_master]
        act stop
        -notify %HOST% went %FROM% to %TO%
        - act   start   %MASTER%

        [any_to_down]
        timeout = 20s
        notify "%HOST% is down"

        [db2: slave_to_master]
        act promote

        [DB3 :Any_to_MASTER]
        act
    """)
    cfg = hadaemon.configfiles.load_config(str(d))
    act, notify = str(d / "actions" / "act"), str(d / "actions" / "notify")
    assert set(cfg.sections) == {(None, "slave", "master"), (None, "any", "down"),
                                 ("db2", "slave", "master"), ("DB3", "any", "master")}
    s = cfg.sections[(None, "slave", "master")]
    assert (s.name, s.timeout, s.host, s.where) == ("slave_to_master", 30, None, "%s/actions.conf:1" % d)
    assert [(c.argv, c.ignore) for c in s.commands] == [
        ((act, "stop"), False),
        ((notify, "%HOST%", "went", "%FROM%", "to", "%TO%"), True),
        ((act, "start", "%MASTER%"), True)]
    assert s.commands[2].where == "%s/actions.conf:4" % d
    down = cfg.sections[(None, "any", "down")]
    assert down.timeout == 20 and down.commands[0].argv == (notify, "%HOST% is down")
    assert cfg.sections[("db2", "slave", "master")].name == "db2: slave_to_master"
    assert not hasattr(s, "explicit")


def test_empty_files_are_a_valid_config(tmp_path):
    cfg = hadaemon.configfiles.load_config(str(make_dir(tmp_path, "", "")))
    assert cfg.checks == [] and cfg.groups == [] and cfg.sections == {}


# -- command resolution: checks/ > relative to the config dir > PATH -------------------

def test_command_resolution_order(tmp_path, monkeypatch):
    d = make_dir(tmp_path, "[local]\ntool\nsub/helper x\n", "[a_to_b]\ntool\n")
    bindir = tmp_path / "bin"
    for path in (d / "checks" / "tool", d / "actions" / "tool", d / "tool", bindir / "tool",
                 d / "sub" / "helper", d / "checks" / "sub" / "helper"):
        exe(path)
    monkeypatch.setenv("PATH", "%s:/usr/bin:/bin" % bindir)

    def first_words():
        cfg = hadaemon.configfiles.load_config(str(d))
        return ([c.argv[0] for c in cfg.checks],
                cfg.sections[(None, "a", "b")].commands[0].argv[0])

    # a word with a slash is a path relative to the config dir, never looked up in checks/
    assert first_words() == ([str(d / "checks" / "tool"), str(d / "sub" / "helper")],
                             str(d / "actions" / "tool"))
    (d / "checks" / "tool").unlink()
    (d / "actions" / "tool").unlink()
    assert first_words() == ([str(d / "tool"), str(d / "sub" / "helper")], str(d / "tool"))
    (d / "tool").unlink()
    assert first_words() == ([str(bindir / "tool"), str(d / "sub" / "helper")], str(bindir / "tool"))
    (bindir / "tool").unlink()
    errors = errors_of(d)
    assert len(errors) == 2 and all("command not found: tool" in e for e in errors)


def test_absolute_command_and_path_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    true = shutil.which("true")
    d = make_dir(tmp_path, "[local]\nhost = h\ntrue\n/bin/sh -c 'exit 0'\n")
    a, b = hadaemon.configfiles.load_config(str(d)).checks
    assert a.argv == (true,)
    assert b.argv == ("/bin/sh", "-c", "exit 0")


def test_a_directory_is_not_a_command(tmp_path):
    d = make_dir(tmp_path, "[local]\nsubdir\n")
    (d / "checks" / "subdir").mkdir()
    (d / "subdir").mkdir()
    assert "command not found: subdir" in errors_of(d)[0]


def test_non_executable_in_checks_dir_is_not_skipped_for_path(tmp_path, monkeypatch):
    """checks/X wins even when it is broken: the error says so instead of running another X."""
    bindir = tmp_path / "bin"
    exe(bindir / "noexec")
    monkeypatch.setenv("PATH", str(bindir))
    d = make_dir(tmp_path, "[local]\nnoexec\n")
    (e,) = errors_of(d)
    assert "not executable" in e and stat.S_IMODE((d / "checks" / "noexec").stat().st_mode) == 0o644


# -- precedence: Config.section_for over the 8 candidates of SPEC §5 ----------------------

ORDER = [("db1", "slave", "master"), ("db1", "any", "master"), ("db1", "slave", "any"),
         ("db1", "any", "any"), (None, "slave", "master"), (None, "any", "master"),
         (None, "slave", "any"), (None, "any", "any")]


def config_with(keys):
    sections = {k: hadaemon.config.Section(k[0], k[1], k[2], [], 60.0, "actions.conf:%d" % i)
                for i, k in enumerate(keys)}
    return hadaemon.config.Config("/nowhere", hadaemon.config.DaemonSettings(), [], [], sections)


@pytest.mark.parametrize("mask", range(256))
def test_section_for_every_subset_of_the_eight_candidates(mask):
    present = [k for i, k in enumerate(ORDER) if mask & (1 << i)]
    # sections for other hosts and states never win
    decoys = [("db2", "slave", "master"), ("db2", "any", "any"), (None, "master", "slave"),
              (None, "down", "any"), (None, "any", "up")]
    cfg = config_with(present + decoys)
    winner = cfg.section_for("db1", "slave", "master")
    if present:
        assert (winner.host, winner.from_state, winner.to_state) == present[0]
    else:
        assert winner is None


PRECEDENCE = [
    # (sections in actions.conf, transition, the section that runs)
    (["slave_to_master", "any_to_master", "db1: any_to_any"], ("db1", "slave", "master"), "db1: any_to_any"),
    (["slave_to_master", "any_to_master", "db1: any_to_any"], ("db2", "slave", "master"), "slave_to_master"),
    (["any_to_master", "slave_to_any", "any_to_any"], ("db2", "slave", "master"), "any_to_master"),
    (["slave_to_any", "any_to_any"], ("db2", "slave", "master"), "slave_to_any"),
    (["any_to_any"], ("db2", "unknown", "up"), "any_to_any"),
    (["db1: slave_to_any", "db1: any_to_master"], ("db1", "slave", "master"), "db1: any_to_master"),
    (["db1: slave_to_master", "db1: any_to_master"], ("db1", "slave", "master"), "db1: slave_to_master"),
    (["unknown_to_any", "any_to_up"], ("h", "unknown", "up"), "any_to_up"),
    (["master_to_slave"], ("db1", "slave", "master"), None),
    (["db2: any_to_any"], ("db1", "slave", "master"), None),
]


@pytest.mark.parametrize("names, transition, expected", PRECEDENCE)
def test_precedence_through_the_parser(tmp_path, names, transition, expected):
    actions = "".join("[%s]\nact\n" % n for n in names)
    cfg = hadaemon.configfiles.load_config(str(make_dir(tmp_path, VALID_CHECKS, actions)))
    section = cfg.section_for(*transition)
    assert (section.name if section else None) == expected


def test_eight_candidates_are_distinct_sections(tmp_path):
    names = ["db1: slave_to_master", "db1: any_to_master", "db1: slave_to_any", "db1: any_to_any",
             "slave_to_master", "any_to_master", "slave_to_any", "any_to_any"]
    cfg = hadaemon.configfiles.load_config(str(make_dir(tmp_path, VALID_CHECKS,
                                            "".join("[%s]\nact\n" % n for n in names))))
    assert set(cfg.sections) == set(ORDER)
    for drop in range(len(names)):
        remaining = {k: v for k, v in cfg.sections.items() if k not in ORDER[:drop]}
        cfg2 = hadaemon.config.Config(cfg.config_dir, cfg.daemon, [], [], remaining)
        assert cfg2.section_for("db1", "slave", "master").name == names[drop]
