"""Cron fields and durations: CronSpec parsing, next_after, parse_duration, format_duration.

Table-driven, naive local datetimes, no processes.  2024-01-01 is a Monday.
"""

import datetime

import pytest
from hypothesis import given, settings, strategies as st

import hadaemon.base
import hadaemon.cron

D = datetime.datetime

NEXT = [
    # (spec, now, the next run strictly after now)
    ("* * * * *", D(2024, 1, 1, 10, 0, 30), D(2024, 1, 1, 10, 1)),
    ("* * * * *", D(2024, 1, 1, 10, 1), D(2024, 1, 1, 10, 2)),
    ("* * * * *", D(2023, 12, 31, 23, 59, 59, 999999), D(2024, 1, 1, 0, 0)),
    ("*/15 * * * *", D(2024, 1, 1, 10, 7), D(2024, 1, 1, 10, 15)),
    ("*/15 * * * *", D(2024, 1, 1, 10, 45), D(2024, 1, 1, 11, 0)),
    ("*/15 * * * *", D(2024, 1, 1, 23, 50), D(2024, 1, 2, 0, 0)),
    ("10-50/20 * * * *", D(2024, 1, 1, 10, 31), D(2024, 1, 1, 10, 50)),
    ("10-50/20 * * * *", D(2024, 1, 1, 10, 50), D(2024, 1, 1, 11, 10)),
    ("5/10 * * * *", D(2024, 1, 1, 10, 0), D(2024, 1, 1, 10, 5)),
    ("5/10 * * * *", D(2024, 1, 1, 10, 55), D(2024, 1, 1, 11, 5)),
    ("0,30 8 * * *", D(2024, 1, 1, 7, 59), D(2024, 1, 1, 8, 0)),
    ("0,30 8 * * *", D(2024, 1, 1, 8, 0), D(2024, 1, 1, 8, 30)),
    ("0,30 8 * * *", D(2024, 1, 1, 8, 30), D(2024, 1, 2, 8, 0)),
    ("15 3,9-11 * * *", D(2024, 1, 1, 4, 0), D(2024, 1, 1, 9, 15)),
    ("0 9-17 * * mon-fri", D(2024, 1, 5, 17, 0), D(2024, 1, 8, 9, 0)),        # Fri evening -> Mon
    ("0 9-17 * * MON-Fri", D(2024, 1, 6, 12, 0), D(2024, 1, 8, 9, 0)),        # names ignore case
    ("0 0 * * 0", D(2024, 1, 1), D(2024, 1, 7)),                               # Sunday
    ("0 0 * * 7", D(2024, 1, 1), D(2024, 1, 7)),                               # 7 is Sunday too
    ("0 0 * * sun", D(2024, 1, 1), D(2024, 1, 7)),
    ("0 0 * * 5-7", D(2024, 1, 1), D(2024, 1, 5)),
    ("0 0 * * 6,7", D(2024, 1, 6, 1), D(2024, 1, 7)),
    ("0 12 1 jan,jul *", D(2024, 2, 10), D(2024, 7, 1, 12, 0)),
    ("0 12 1 JUL *", D(2024, 7, 1, 12, 0), D(2025, 7, 1, 12, 0)),
    ("0 0 * feb-apr/2 *", D(2024, 2, 29, 0, 0), D(2024, 4, 1)),                # Feb, Apr
    # month and year rollover
    ("0 0 1 * *", D(2024, 1, 31, 12, 0), D(2024, 2, 1)),
    ("0 0 1 1 *", D(2024, 6, 1), D(2025, 1, 1)),
    ("59 23 31 12 *", D(2024, 12, 31, 23, 59), D(2025, 12, 31, 23, 59)),
    ("0 0 31 * *", D(2024, 1, 31, 0, 0), D(2024, 3, 31)),                      # skips February
    ("0 0 30 * *", D(2024, 1, 30, 0, 0), D(2024, 3, 30)),
    # Feb 29: the next leap year
    ("0 0 29 2 *", D(2024, 2, 28, 23, 59), D(2024, 2, 29)),
    ("0 0 29 2 *", D(2024, 3, 1), D(2028, 2, 29)),
    ("0 0 29 2 *", D(2096, 3, 1), D(2104, 2, 29)),                             # 2100 is not leap
    # cron(8): both day fields restricted -> a day matches if EITHER does
    ("0 0 13 * fri", D(2024, 1, 1), D(2024, 1, 5)),                            # a Friday first
    ("0 0 13 * fri", D(2024, 1, 12), D(2024, 1, 13)),                          # the 13th (a Saturday)
    ("0 0 13 * fri", D(2024, 1, 13), D(2024, 1, 19)),
    ("30 4 1,15 * 5", D(2024, 1, 1, 5, 0), D(2024, 1, 5, 4, 30)),              # the man page example
    ("0 0 31 2 mon", D(2024, 1, 1), D(2024, 2, 5)),                            # Feb 31 never, Mondays do
    # only one restricted: that one alone decides
    ("0 0 13 * *", D(2024, 1, 1), D(2024, 1, 13)),
    ("0 0 * * fri", D(2024, 1, 6), D(2024, 1, 12)),
    # a field starting with * counts as unrestricted (as cron(8) sets DOM_STAR): AND
    ("0 0 */2 * mon", D(2024, 1, 1), D(2024, 1, 15)),                          # odd day AND Monday
    ("0 0 1 * */7", D(2024, 1, 2), D(2024, 9, 1)),                             # the 1st AND a Sunday
]


@pytest.mark.parametrize("spec, now, expected", NEXT)
def test_next_after(spec, now, expected):
    cron = hadaemon.cron.CronSpec(spec)
    assert cron.next_after(now) == expected
    assert cron.matches(expected)


FIELDS = [
    # (spec, minutes, hours, days, months, weekdays)
    ("* * * * *", set(range(60)), set(range(24)), set(range(1, 32)), set(range(1, 13)), set(range(7))),
    ("1,2,3 4-6 7 8 1", {1, 2, 3}, {4, 5, 6}, {7}, {8}, {1}),
    ("*/20 */6 */10 */4 */2", {0, 20, 40}, {0, 6, 12, 18}, {1, 11, 21, 31}, {1, 5, 9}, {0, 2, 4, 6}),
    ("0 0 1 jan-mar,dec sat,sun", {0}, {0}, {1}, {1, 2, 3, 12}, {0, 6}),
    ("0 0 1 * 0,7", {0}, {0}, {1}, set(range(1, 13)), {0}),
    ("59 23 31 12 7", {59}, {23}, {31}, {12}, {0}),
    ("  0   0  1  1  *  ", {0}, {0}, {1}, {1}, set(range(7))),
]


@pytest.mark.parametrize("spec, minutes, hours, days, months, weekdays", FIELDS)
def test_fields(spec, minutes, hours, days, months, weekdays):
    cron = hadaemon.cron.CronSpec(spec)
    assert (cron.minutes, cron.hours, cron.days, cron.months, cron.weekdays) == \
        (minutes, hours, days, months, weekdays)
    assert cron.text == " ".join(spec.split())
    assert repr(cron) == "CronSpec(%r)" % cron.text


INVALID = [
    # (spec, words the error must contain)
    ("", ["5 fields", "got 0"]),
    ("* * * *", ["5 fields", "got 4"]),
    ("* * * * * *", ["5 fields", "got 6"]),
    ("60 * * * *", ["minute", "60", "0-59"]),
    ("* 24 * * *", ["hour", "24"]),
    ("* * 0 * *", ["day of month", "0"]),
    ("* * 32 * *", ["day of month", "32"]),
    ("* * * 0 *", ["month", "0"]),
    ("* * * 13 *", ["month", "13"]),
    ("* * * * 8", ["day of week", "8"]),
    ("30-10 * * * *", ["backwards", "30-10"]),
    ("* * * dec-jan *", ["backwards"]),
    ("*/0 * * * *", ["step", "'0'"]),
    ("*/x * * * *", ["step", "'x'"]),
    ("*/ * * * *", ["step"]),
    ("1/ * * * *", ["step"]),
    ("*/-1 * * * *", ["step"]),
    ("1,,2 * * * *", ["minute", "''"]),
    ("-5 * * * *", ["minute"]),
    ("5- * * * *", ["minute"]),
    ("foo * * * *", ["minute", "'foo'"]),
    ("mon * * * *", ["minute", "'mon'"]),
    ("* * * foo *", ["month", "'foo'"]),
    ("* * * * funday", ["day of week", "'funday'"]),
    ("* * * * 1.5", ["day of week", "'1.5'"]),
    ("0 0 31 2 *", ["never", "0 0 31 2 *"]),                                      # 31 in February only
    ("0 0 30 2 *", ["never"]),
    ("0 0 31 4,6,9,11 *", ["never"]),
]


@pytest.mark.parametrize("spec, needles", INVALID)
def test_invalid(spec, needles):
    with pytest.raises(ValueError) as info:
        hadaemon.cron.CronSpec(spec)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


# -- next_after against an independent search ------------------------------------------

def reference_next(cron, now):
    """Walk day by day (cron(8)'s day rule written out again), then hour and minute."""
    day = now.date()
    times = sorted((h, m) for h in cron.hours for m in cron.minutes)
    for _ in range(366 * 9):
        dom = day.day in cron.days
        dow = day.isoweekday() % 7 in cron.weekdays
        either = not cron.days_star and not cron.weekdays_star
        if day.month in cron.months and ((dom or dow) if either else (dom and dow)):
            for h, m in times:
                candidate = D(day.year, day.month, day.day, h, m)
                if candidate > now:
                    return candidate
        day += datetime.timedelta(days=1)
    return None


def field(low, high, names=()):
    number = st.integers(low, high).map(str)
    name = st.sampled_from(names) if names else number
    single = st.one_of(number, name)
    rng = st.tuples(st.integers(low, high), st.integers(low, high)).map(
        lambda t: "%d-%d" % (min(t), max(t)))
    step = st.integers(1, high - low + 1).map(str)
    part = st.one_of(
        st.just("*"), single, rng,
        st.tuples(st.sampled_from(["*"]) | rng | number, step).map("/".join))
    return st.lists(part, min_size=1, max_size=3).map(",".join)


SPECS = st.tuples(field(0, 59), field(0, 23), field(1, 31), field(1, 12, hadaemon.cron._MONTHS),
                  field(0, 7, hadaemon.cron._DAYS)).map(" ".join)
NOWS = st.datetimes(min_value=D(1999, 1, 1), max_value=D(2099, 12, 31))


@settings(max_examples=300, deadline=None)
@given(SPECS, NOWS)
def test_next_after_matches_an_independent_search(spec, now):
    try:
        cron = hadaemon.cron.CronSpec(spec)
    except ValueError as exc:
        assert "never matches" in str(exc)
        return
    got = cron.next_after(now)
    assert got == reference_next(cron, now)
    if got is not None:
        assert got > now and got.second == got.microsecond == 0 and cron.matches(got)


# -- durations ---------------------------------------------------------------------------

DURATIONS = [
    ("250ms", 0.25), ("5s", 5.0), ("1.5s", 1.5), ("2m", 120.0), ("1h", 3600.0), ("10", 10.0),
    ("0.5", 0.5), (".5", 0.5), ("5.", 5.0), (" 3s ", 3.0), ("1.5m", 90.0), ("5 s", 5.0),
    ("1ms", 0.001), ("8760h", 365 * 86400.0),
]


@pytest.mark.parametrize("text, seconds", DURATIONS)
def test_parse_duration(text, seconds):
    assert hadaemon.base.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [
    "", " ", "s", "ms", "5x", "5 sec", "5S", "-1", "-1s", "0", "0ms", "0.0s", "1e3", "1h30m", "abc",
    "nan", "inf", "1..5s", "5 5", "8761h", "99999999999", "9" * 400,
])
def test_parse_duration_invalid(text):
    with pytest.raises(ValueError) as info:
        hadaemon.base.parse_duration(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("seconds, text", [
    (0.25, "250ms"), (0.001, "1ms"), (5, "5s"), (1.5, "1.5s"), (120, "2m"), (3600, "1h"), (7200, "2h"),
    (90, "90s"), (59.5, "59.5s"), (1.25, "1.25s"), (10.0, "10s"), (1, "1s"), (61, "61s"),
])
def test_format_duration(seconds, text):
    assert hadaemon.base.format_duration(seconds) == text


@pytest.mark.parametrize("text", ["250ms", "5s", "1.5s", "2m", "1h", "90s", "0.75s", "3h"])
def test_format_parse_round_trip(text):
    seconds = hadaemon.base.parse_duration(text)
    assert hadaemon.base.parse_duration(hadaemon.base.format_duration(seconds)) == pytest.approx(seconds)
