"""SPEC §12 load-balancer conditions: ``GET /hosts/HOST/STATE?COND&COND...``, one test per
sentence, on the routing's pure functions (a status document handed in, no socket); and
the Ledger keeping a report's attributes as the host's last report's.

The HAProxy read backend that uses them is in tests/test_http_daemon.py.
"""

import json

import pytest

from test_http import FakeApp, route, sample_doc
from test_ledger import World


def app():
    doc = sample_doc()
    doc["hosts"]["db2"]["last_report"]["attributes"] = {
        "lag_bytes": "1000", "role": "sync", "mode": "async", "wal.lag": "3", "lsn": "0/3000060",
        "neg": "-2.5", "exp": "1e3"}
    return FakeApp(doc)


def ask(target, method="GET"):
    """(status, body as JSON) of one request."""
    answer = route(method, target, app=app())
    return answer.status, json.loads(answer.body)


def status(target, method="GET"):
    return route(method, target, app=app()).status


# -- 200 only when the state matches and every condition holds ----------------------------------

def test_200_when_the_state_matches_and_every_condition_holds():
    assert status("/hosts/db2/slave?lag_bytes.le=16777216") == 200
    assert status("/hosts/db2/slave?lag_bytes.le=16777216&role=sync&mode=async") == 200
    code, body = ask("/hosts/db2/slave?lag_bytes.le=16777216")
    assert list(body) == ["host", "state", "since", "pending", "last_report"]
    assert body["last_report"]["attributes"]["lag_bytes"] == "1000"


def test_a_state_that_does_not_match_is_503_whatever_the_conditions():
    code, body = ask("/hosts/db2/master?lag_bytes.le=16777216")
    assert code == 503 and "failed" not in body                # as without conditions
    assert status("/hosts/db9/slave?lag_bytes.le=1") == 404     # never seen


# -- KEY=VALUE: equal as strings ---------------------------------------------------------------

@pytest.mark.parametrize("cond, code", [
    ("role=sync", 200), ("role=SYNC", 503), ("role=syn", 503), ("role=", 503),
    ("lag_bytes=1000", 200), ("lag_bytes=1000.0", 503), ("lag_bytes=1e3", 503),     # strings
    ("lsn=0/3000060", 200), ("lsn=0%2F3000060", 200),                               # %-decoded
])
def test_key_equals_value_compares_strings(cond, code):
    assert status("/hosts/db2/slave?" + cond) == code


# -- KEY.lt / .le / .gt / .ge = N: as numbers ------------------------------------------------------

@pytest.mark.parametrize("cond, code", [
    ("lag_bytes.le=1000", 200), ("lag_bytes.lt=1000", 503), ("lag_bytes.lt=1000.5", 200),
    ("lag_bytes.ge=1000", 200), ("lag_bytes.gt=1000", 503), ("lag_bytes.gt=999.9", 200),
    ("lag_bytes.le=1e3", 200), ("lag_bytes.le=999", 503), ("lag_bytes.ge=-1", 200),
    ("neg.lt=0", 200), ("neg.ge=-2.5", 200), ("neg.gt=-2.5", 503),
    ("exp.ge=1000", 200), ("exp.gt=1000", 503),               # an attribute in exponent form
])
def test_lt_le_gt_ge_compare_numbers(cond, code):
    assert status("/hosts/db2/slave?" + cond) == code


def test_a_key_may_hold_dots_and_only_a_last_lt_le_gt_ge_is_an_operator():
    assert status("/hosts/db2/slave?wal.lag=3") == 200         # the attribute wal.lag, as a string
    assert status("/hosts/db2/slave?wal.lag.le=3") == 200      # the attribute wal.lag, as a number
    assert status("/hosts/db2/slave?wal.lag.lt=3") == 503
    code, body = ask("/hosts/db2/slave?wal=3")                 # no attribute wal: fails
    assert code == 503 and body["failed"] == {"condition": "wal=3", "value": None}


# -- a missing or non-numeric attribute fails -----------------------------------------------------

@pytest.mark.parametrize("cond, value", [
    ("nope.le=1", None), ("nope=x", None),                   # missing
    ("mode.le=1", "async"), ("role.gt=0", "sync"), ("lsn.ge=0", "0/3000060"),   # not numbers
])
def test_a_missing_or_non_numeric_attribute_fails(cond, value):
    code, body = ask("/hosts/db2/slave?" + cond)
    assert code == 503 and body["failed"] == {"condition": cond, "value": value}


def test_a_host_whose_last_report_has_no_attributes_fails_every_condition():
    code, body = ask("/hosts/db1/master?lag_bytes.le=1")       # db1's report printed none
    assert code == 503 and body["failed"] == {"condition": "lag_bytes.le=1", "value": None}
    assert status("/hosts/db1/master") == 200


# -- the body's ``failed``: the first condition that failed, and the value it saw --------------------

def test_failed_names_the_first_failed_condition_and_its_value():
    code, body = ask("/hosts/db2/slave?role=sync&lag_bytes.le=10&mode=sync&nope.ge=1")
    assert code == 503 and body["failed"] == {"condition": "lag_bytes.le=10", "value": "1000"}
    assert list(body) == ["host", "state", "since", "pending", "last_report", "failed"]
    # A repeated key is two conditions, in their order.
    code, body = ask("/hosts/db2/slave?role=sync&role=async")
    assert body["failed"] == {"condition": "role=async", "value": "sync"}
    # HEAD and OPTIONS answer the same status (HAProxy's default check is OPTIONS).
    for method in ("HEAD", "OPTIONS"):
        assert status("/hosts/db2/slave?lag_bytes.le=10", method) == 503
        assert status("/hosts/db2/slave?lag_bytes.le=1000", method) == 200


# -- an unknown suffix or a bad number: 400 ---------------------------------------------------------

@pytest.mark.parametrize("cond", [
    "lag_bytes.lte=5", "lag_bytes.eq=1000", "lag_bytes.LE=5",     # a suffix of lag_bytes, not an operator
    "lag_bytes.le=16MB", "lag_bytes.le=", "lag_bytes.le=abc", "lag_bytes.gt=1_000",   # bad numbers
    "lag_bytes.lt=nan", "lag_bytes.ge=inf", "lag_bytes.le=0x10",
    ".le=5", "=5",                                                # no attribute
])
def test_an_unknown_suffix_or_a_bad_number_is_400(cond):
    code, body = ask("/hosts/db2/slave?" + cond)
    assert code == 400 and set(body) == {"error"}, body
    assert cond.split("=")[0] in body["error"] or cond.startswith(("=", ".")), body


def test_400_comes_before_404_and_503():
    assert status("/hosts/db9/slave?lag_bytes.le=16MB") == 400     # a bad number, whatever the host
    assert status("/hosts/db2/master?lag_bytes.le=16MB") == 400    # whatever the state
    assert status("/hosts/db2/master?lag_bytes.lte=5") == 400      # a typo, whatever the state
    assert status("/hosts/db2/slave?nope.lte=5") == 503           # no nope: no typo to tell, it fails


def test_the_query_of_other_resources_is_still_ignored():
    assert status("/hosts/db2?lag_bytes.le=16MB") == 200
    assert status("/status?lag_bytes.le=1") == 200


# -- the Ledger: a report's attributes are the host's last report's -------------------------------

def test_the_last_report_carries_the_attributes_the_check_printed(tmp_path):
    w = World(tmp_path, confirm=1)
    check = w.checks["db1"]
    w.ledger.report("db1", "slave", check, 1.0, {"lag_bytes": "5"})
    assert w.ledger.host_status("db1")["last_report"] == {
        "time": 1.0, "check": check.name, "state": "slave", "attributes": {"lag_bytes": "5"}}
    w.ledger.report("db1", "slave", check, 2.0, {})
    assert w.ledger.host_status("db1")["last_report"] == {"time": 2.0, "check": check.name, "state": "slave"}
    w.ledger.report("db1", "slave", check, 3.0, {"lag_bytes": "7"})
    w.store.checkpoint()                # kept as the last report is (soft: a kill -9 may lose it)
    assert w.reopen().host_status("db1")["last_report"]["attributes"] == {"lag_bytes": "7"}
