"""Cron: the five fields of a schedule (``cron = */5 * * * *``), read as cron(8) does.

Owns CronSpec: parse once, then the next matching minute after a wall-clock time.

Uses: the standard library only.
"""



_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
_DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]


class CronSpec:
    """Five cron fields (minute hour day-of-month month day-of-week), read as cron(8) does.

    As in cron, when both day fields are restricted a day matches if either does.
    """

    _FIELDS = (("minute", 0, 59, None), ("hour", 0, 23, None), ("day of month", 1, 31, None),
               ("month", 1, 12, _MONTHS), ("day of week", 0, 7, _DAYS))

    def __init__(self, text):
        self.text = " ".join(str(text).split())
        fields = self.text.split()
        if len(fields) != 5:
            raise ValueError("cron needs 5 fields (minute hour day month weekday), got %d in %r"
                             % (len(fields), text))
        sets = []
        for field, (what, low, high, names) in zip(fields, self._FIELDS):
            sets.append(self._parse_field(field, what, low, high, names))
        self.minutes, self.hours, self.days, self.months, weekdays = sets
        self.weekdays = {d % 7 for d in weekdays}
        self.days_star = fields[2].startswith("*")
        self.weekdays_star = fields[4].startswith("*")
        import datetime                 # here: a daemon without cron checks does without it
        if self.next_after(datetime.datetime(2000, 1, 1)) is None:
            raise ValueError("cron %r never matches a real date" % self.text)

    @staticmethod
    def _parse_field(field, what, low, high, names):
        def number(token):
            token = token.lower()
            if names and token[:3] in names and token.isalpha():
                return names.index(token[:3]) + (1 if what == "month" else 0)
            if not token.isdigit():
                raise ValueError("bad %s %r in cron" % (what, token))
            value = int(token)
            if not low <= value <= high:
                raise ValueError("%s %d out of range %d-%d in cron" % (what, value, low, high))
            return value

        values = set()
        for part in field.split(","):
            rng, slash, step = part.partition("/")
            if slash:
                if not step.isdigit() or int(step) < 1:
                    raise ValueError("bad step %r in cron %s field" % (step, what))
            if rng == "*":
                start, end = low, high
            elif "-" in rng:
                a, _, b = rng.partition("-")
                start, end = number(a), number(b)
                if start > end:
                    raise ValueError("backwards range %r in cron %s field" % (rng, what))
            else:
                start = number(rng)
                end = high if step else start
            values.update(range(start, end + 1, int(step) if step else 1))
        return values

    def _day_matches(self, dt):
        dom = dt.day in self.days
        dow = (dt.isoweekday() % 7) in self.weekdays
        if self.days_star or self.weekdays_star:
            return dom and dow
        return dom or dow

    def matches(self, dt):
        return (dt.minute in self.minutes and dt.hour in self.hours
                and dt.month in self.months and self._day_matches(dt))

    def next_after(self, dt):
        """The first matching minute strictly after ``dt`` (naive local time), or None."""
        import datetime
        dt = dt.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1)
        limit = dt + datetime.timedelta(days=366 * 8)
        while dt < limit:
            if dt.month not in self.months:
                dt = (dt.replace(day=1) + datetime.timedelta(days=32)).replace(day=1, hour=0, minute=0)
            elif not self._day_matches(dt):
                dt = (dt + datetime.timedelta(days=1)).replace(hour=0, minute=0)
            elif dt.hour not in self.hours:
                dt = (dt + datetime.timedelta(hours=1)).replace(minute=0)
            elif dt.minute not in self.minutes:
                dt += datetime.timedelta(minutes=1)
            else:
                return dt
        return None

    def __repr__(self):
        return "CronSpec(%r)" % self.text
