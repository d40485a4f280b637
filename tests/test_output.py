"""What a check reports and what an action gets: output parsing, report validation,
variable expansion, shell-like splitting and the wire protocol's line reader.

Table-driven, no processes.
"""

import json

import pytest

import hadaemon.base
import hadaemon.config
import hadaemon.wire
import hadaemon.children


def encodable(obj):
    """What the worker does with a parsed result: one JSON line in UTF-8."""
    line = hadaemon.wire.encode_message({"t": "result", "data": obj})
    assert hadaemon.wire.decode_message(line[:-1])["data"] == json.loads(line.decode("utf-8"))["data"]
    return True


# -- parse_check_output ------------------------------------------------------------------

OUTPUTS = [
    # (stdout bytes, the dict it parses into)
    (b'{"state": "up", "x": 1, "nested": {"a": [1, 2]}}', {"state": "up", "x": 1, "nested": {"a": [1, 2]}}),
    (b'\n  {"state": "master"}  \n\n', {"state": "master"}),
    (b'{"states": {"db1": "master", "db2": "slave"}}', {"states": {"db1": "master", "db2": "slave"}}),
    (b'{}', {}),
    # JSON that is not an object falls back to lines
    (b'[1, 2]', {"message": "[1, 2]"}),
    (b'"up"', {"message": '"up"'}),
    (b'42', {"message": "42"}),
    (b'null', {"message": "null"}),
    (b'{"a": 1} trailing', {"message": '{"a": 1} trailing'}),
    (b'{not json\nstate=up', {"state": "up", "message": "{not json"}),
    # key=value lines; other lines are joined into message
    (b'state=up\nhost=db1\n', {"state": "up", "host": "db1"}),
    (b'  state  =  up  \n', {"state": "up"}),
    (b'state = up\nhost= db1\nrole =master', {"state": "up", "host": "db1", "role": "master"}),
    (b'key = value with = signs', {"key": "value with = signs"}),
    (b'x=\n', {"x": ""}),
    (b'a.b-c_d=1', {"a.b-c_d": "1"}),
    (b'_x=1', {"_x": "1"}),
    (b'=x\n1abc=2\n-k=v', {"message": "=x\n1abc=2\n-k=v"}),
    (b'state=up\nstate=down', {"state": "down"}),
    (b'OK - all good\nstate=up\n  second line  \n', {"state": "up", "message": "OK - all good\nsecond line"}),
    (b'TCP OK - 0.001 second response time on 127.0.0.1 port 22|time=0.001s;;;0.000000;10.000000',
     {"message": "TCP OK - 0.001 second response time on 127.0.0.1 port 22|time=0.001s;;;0.000000;10.000000"}),
    # an explicit message wins over the other lines
    (b'first\nmessage = the real one\nsecond', {"message": "the real one"}),
    (b'state=up\r\nhost=db1\r\n', {"state": "up", "host": "db1"}),
    (b'', {}),
    (b'\n \n\t\n', {}),
    # NUL bytes are dropped, invalid UTF-8 replaced
    (b'sta\x00te=up\x00\n', {"state": "up"}),
    (b'state=up\nbad \xff\xfe bytes', {"state": "up", "message": "bad \ufffd\ufffd bytes"}),
    (b'{"state": "up", "m": "\xff"}', {"state": "up", "m": "\ufffd"}),
]


@pytest.mark.parametrize("raw, expected", OUTPUTS)
def test_parse_check_output(raw, expected):
    result = hadaemon.wire.parse_check_output(raw)
    assert result == expected
    assert encodable(result)


@pytest.mark.parametrize("depth", [100, 990, 1000, 5000, 100000])
def test_deeply_nested_json_is_refused_not_a_crash(depth):
    raw = b'{"state": "up", "a": ' + b"[" * depth + b"]" * depth + b"}"
    result = hadaemon.wire.parse_check_output(raw)
    assert isinstance(result, dict) and "a" not in result and "state" not in result
    assert "nested" in result["message"]
    assert encodable(result)


def test_moderately_nested_json_is_kept():
    raw = b'{"state": "up", "a": ' + b"[" * 20 + b"]" * 20 + b"}"
    result = hadaemon.wire.parse_check_output(raw)
    assert result["state"] == "up"
    assert encodable(result)


@pytest.mark.parametrize("raw", [
    b'{"state": "up", "x": "\\ud800"}',
    b'{"state": "up", "\\udfff": 1}',
    b'{"state": "up", "x": ["a\\ud83d"]}',
])
def test_lone_surrogate_in_json_is_replaced(raw):
    """Valid JSON, but no UTF-8: it used to kill the worker at every run of the check."""
    result = hadaemon.wire.parse_check_output(raw)
    assert result["state"] == "up"
    assert encodable(result)
    assert "\ufffd" in json.dumps(result, ensure_ascii=False)


def test_surrogate_pair_is_kept():
    assert hadaemon.wire.parse_check_output(b'{"x": "\\ud83d\\ude00"}') == {"x": "\U0001F600"}


def test_huge_output_is_parsed():
    raw = b"state=up\n" + b"x" * (64 * 1024) + b"\n"
    result = hadaemon.wire.parse_check_output(raw)
    assert result["state"] == "up" and len(result["message"]) == 64 * 1024


# -- reports_from_result -----------------------------------------------------------------

REPORTS = [
    # (data, exit code, [(host, state)])
    ({}, 0, [("dflt", "up")]),
    ({}, 1, [("dflt", "warning")]),
    ({}, 2, [("dflt", "down")]),
    ({}, 3, [("dflt", "unknown")]),
    ({}, 255, [("dflt", "unknown")]),
    ({}, -1, [("dflt", "unknown")]),
    ({}, None, [("dflt", "unknown")]),
    ({"message": "OK"}, 0, [("dflt", "up")]),
    ({"state": "master"}, 2, [("dflt", "master")]),          # state overrides the exit code
    ({"state": "MASTER"}, 0, [("dflt", "master")]),          # states compare lower-cased
    ({"state": "Hot-Standby.2:x"}, 0, [("dflt", "hot-standby.2:x")]),
    ({"state": None}, 1, [("dflt", "warning")]),             # null is no state
    ({"host": "db9"}, 0, [("db9", "up")]),
    ({"host": "DB9", "state": "up"}, 0, [("DB9", "up")]),    # host names keep their case
    ({"host": "db1.example.com:5432", "state": "up"}, 0, [("db1.example.com:5432", "up")]),
    ({"states": {"db1": "master", "db2": "Slave"}}, 0, [("db1", "master"), ("db2", "slave")]),
    ({"states": {"db1": "master"}, "state": "down", "host": "x"}, 2, [("db1", "master")]),
    ({"states": {}}, 0, []),
]


@pytest.mark.parametrize("data, exit_code, expected", REPORTS)
def test_reports(data, exit_code, expected):
    reports, problems = hadaemon.wire.reports_from_result(data, exit_code, "dflt")
    assert (reports, problems) == (expected, [])


REJECTED = [
    # (data, what the problem must show)
    ({"host": "db1;rm -rf /"}, "'db1;rm -rf /'"),
    ({"host": "../x"}, "'../x'"),
    ({"host": ""}, "''"),
    ({"host": 5}, "5"),
    ({"host": None}, "None"),
    ({"host": ["db1"]}, "['db1']"),
    ({"host": "-db1"}, "'-db1'"),
    ({"host": "db 1"}, "'db 1'"),
    ({"host": "db1\n"}, "'db1\\n'"),
    ({"host": "d\u00e9b1"}, "'d\u00e9b1'"),
    ({"state": "slave_to_master"}, "'slave_to_master'"),
    ({"state": "SLAVE_TO_MASTER"}, "'SLAVE_TO_MASTER'"),
    ({"state": "a_To_b"}, "'a_To_b'"),
    ({"state": ""}, "''"),
    ({"state": 1}, "1"),
    ({"state": True}, "True"),
    ({"state": {"x": 1}}, "{'x': 1}"),
    ({"state": "up;reboot"}, "'up;reboot'"),
    ({"state": "../up"}, "'../up'"),
    ({"states": ["db1", "master"]}, "['db1', 'master']"),
    ({"states": "master"}, "'master'"),
    ({"states": None}, "None"),
]


@pytest.mark.parametrize("data, shown", REJECTED)
def test_rejected_reports_show_the_bad_value(data, shown):
    reports, problems = hadaemon.wire.reports_from_result(data, 0, "dflt")
    assert reports == []
    assert len(problems) == 1 and shown in problems[0], problems


def test_one_bad_entry_of_states_rejects_only_itself():
    reports, problems = hadaemon.wire.reports_from_result(
        {"states": {"db1": "master", "db;2": "slave", "db3": "a_to_b", "db4": 7}}, 0, "dflt")
    assert reports == [("db1", "master")]
    assert len(problems) == 3
    assert "'db;2'" in problems[0] and "'a_to_b'" in problems[1] and "7" in problems[2]


def test_problem_text_is_bounded():
    _, problems = hadaemon.wire.reports_from_result({"host": "x;" * 10000}, 0, "dflt")
    assert len(problems[0]) < 200


def test_deep_value_in_a_report_does_not_raise():
    deep = []
    for _ in range(100000):
        deep = [deep]
    reports, problems = hadaemon.wire.reports_from_result({"host": deep}, 0, "dflt")
    assert reports == [] and len(problems) == 1


# -- expansion -----------------------------------------------------------------------------

STATES = {"db1": "slave", "db2": "master", "db3": "master", "db4": "down", "web": "up"}


def test_action_variables():
    v = hadaemon.children.action_variables("db2", "slave", "master", STATES)
    assert v == {"HOST": "db2", "FROM": "slave", "TO": "master", "MASTER": "db2,db3",
                 "SLAVE": "db1", "DOWN": "db4", "UP": "web"}


def test_action_variables_sorted_and_never_shadowing_host_from_to():
    v = hadaemon.children.action_variables("h", "a", "b", {"z9": "master", "a1": "master", "m": "master",
                                                  "x": "host", "y": "from", "w": "to"})
    assert v["MASTER"] == "a1,m,z9"
    assert (v["HOST"], v["FROM"], v["TO"]) == ("h", "a", "b")


VARS = hadaemon.children.action_variables("db2", "slave", "master", STATES)
EXPANSIONS = [
    # (argument, expanded, names of empty variables)
    ("%MASTER%", "db2,db3", []),
    ("--master=%MASTER%", "--master=db2,db3", []),
    ("%HOST%:%FROM%->%TO%", "db2:slave->master", []),
    ("%SLAVE%/%DOWN%/%UP%", "db1/db4/web", []),
    ("100%%", "100%", []),
    ("%%", "%", []),
    ("%%MASTER%%", "%MASTER%", []),
    ("%%%MASTER%%%", "%db2,db3%", []),
    ("%foo%", "%foo%", []),                     # lowercase is not a variable
    ("%Master%", "%Master%", []),
    ("%MASTER", "%MASTER", []),
    ("50% off", "50% off", []),
    ("%", "%", []),
    ("", "", []),
    ("%WARNING%", "", ["WARNING"]),             # a state no host is in: empty
    ("x%UNKNOWN%y%PRIMARY%", "xy", ["UNKNOWN", "PRIMARY"]),
]


@pytest.mark.parametrize("arg, expanded, empty", EXPANSIONS)
def test_expand_argument(arg, expanded, empty):
    assert hadaemon.children.expand_argument(arg, VARS) == (expanded, empty)


def section(*lines, timeout=60.0):
    commands = [hadaemon.config.Command(tuple(words), ignore, "/c/actions.conf:%d" % (i + 2))
                for i, (words, ignore) in enumerate(lines)]
    return hadaemon.config.Section(None, "slave", "master", commands, timeout, "/c/actions.conf:1")


def test_expand_commands():
    s = section((("/c/actions/move", "%MASTER%", "a%%b"), False),
                (("/c/actions/%HOST%", "%HOST% went %FROM% to %TO%"), True), timeout=20.0)
    assert hadaemon.children.expand_commands(s, VARS) == [
        {"argv": ["/c/actions/move", "db2,db3", "a%b"], "ignore": False, "timeout": 20.0,
         "where": "/c/actions.conf:2"},
        {"argv": ["/c/actions/%HOST%", "db2 went slave to master"], "ignore": True, "timeout": 20.0,
         "where": "/c/actions.conf:3"}]


def test_expand_commands_refuses_an_empty_variable_naming_it_and_where():
    s = section((("/c/actions/ok", "%HOST%"), False), (("/c/actions/promote", "%PRIMARY%"), False))
    with pytest.raises(ValueError) as info:
        hadaemon.children.expand_commands(s, VARS)
    assert "%PRIMARY%" in str(info.value) and "/c/actions.conf:3" in str(info.value)


def test_expand_commands_refuses_an_empty_state_variable():
    variables = hadaemon.children.action_variables("db1", "master", "down", {"db1": "down", "db2": "slave"})
    s = section((("/c/actions/promote", "%MASTER%"), False))
    with pytest.raises(ValueError) as info:
        hadaemon.children.expand_commands(s, variables)
    assert "%MASTER%" in str(info.value) and "no host is master" in str(info.value)


# -- split_words -------------------------------------------------------------------------------

SPLITS = [
    # (line, words, where a comment starts)
    ("a b  c", ["a", "b", "c"], 6),
    ("  a\tb  ", ["a", "b"], 7),
    ("", [], 0),
    ("   ", [], 3),
    ("'a b' c", ["a b", "c"], 7),
    ('"a \\" b"', ['a " b'], 8),
    ('"\\$x \\` \\\\"', ["$x ` \\"], 11),
    ('"a\\nb"', ["a\\nb"], 6),                    # in double quotes only \" \\ \$ \` escape
    ("'a\\nb'", ["a\\nb"], 6),                    # nothing escapes in single quotes
    ("a\\ b", ["a b"], 4),
    ("a\\", ["a"], 2),
    ("''", [""], 2),
    ('a""b', ["ab"], 4),
    ("a'b c'd", ["ab cd"], 7),
    ('"$HOME" `id`', ["$HOME", "`id`"], 12),      # nothing is expanded or run
    ("a # c", ["a"], 2),
    ("a ; c", ["a"], 2),
    ("# all", [], 0),
    ("a#b c;d", ["a#b", "c;d"], 7),
    ("'#x' \"; y\"", ["#x", "; y"], 10),
    ("a\\#b \\# c", ["a#b", "#", "c"], 9),
]


@pytest.mark.parametrize("line, words, end", SPLITS)
def test_split_words(line, words, end):
    assert hadaemon.config.split_words(line) == (words, end)


@pytest.mark.parametrize("line", ["'open", 'say "hi', "a 'b' 'c", '"a\\"'])
def test_split_words_unterminated(line):
    with pytest.raises(ValueError) as info:
        hadaemon.config.split_words(line)
    assert "unterminated" in str(info.value)


# -- the wire protocol ----------------------------------------------------------------------

def test_line_reader_splits_messages_across_chunks():
    r = hadaemon.wire.LineReader()
    assert r.feed(b'{"a": 1}\n{"b"') == [{"a": 1}]
    assert r.feed(b': 2}') == []
    assert r.feed(b'\n\n  \n{"c": [3]}\n') == [{"b": 2}, {"c": [3]}]
    assert r.buf == b""


@pytest.mark.parametrize("line", [b"[1, 2]", b"42", b'"x"', b"null", b"{bad", b"\xff\xfe",
                                  b"{" * 100000, b"[" * 100000, b'{"a": 1} x'])
def test_line_reader_refuses_anything_but_a_json_object(line):
    with pytest.raises(hadaemon.base.ProtocolError):
        hadaemon.wire.LineReader().feed(line + b"\n")


def test_line_reader_refuses_an_endless_line():
    r = hadaemon.wire.LineReader(limit=100)
    r.feed(b"x" * 60)
    with pytest.raises(hadaemon.base.ProtocolError) as info:
        r.feed(b"x" * 60)
    assert "longer than 100" in str(info.value)


def test_encode_decode_round_trip():
    msg = {"t": "result", "data": {"message": "caf\u00e9 \U0001F600", "n": [1, 2.5, None, True]}}
    line = hadaemon.wire.encode_message(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert hadaemon.wire.decode_message(line[:-1]) == msg
