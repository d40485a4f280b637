"""Notify queue: the events waiting for their delivery, kept in the state db (docs/notify.md).

Owns the numbering of events (``seq``: one more per event, across restarts) and
the events not delivered yet, oldest first, at most NOTIFY_CAP of them.  Each
event is committed to the state db (a Store: one journal line) before anyone
may deliver it, so after a kill -9 every event not known to be delivered is
delivered again (at least once).  Keys:

  notify        {"next": the seq of the next event, "done": every seq up to it is
                delivered, given up or dropped}
  notify:N      the event of seq S at N = S % NOTIFY_CAP (a ring, as tr:N and run:N:
                nothing is deleted from the db)

A full queue drops its oldest event for the new one, counted, and says so in the
log once until it has room again.  No process and no clock here: the master's
part (notify.py) hands the head to the notify child and says how it ended.

Uses: base.
"""

import collections

from .base import log

NOTIFY_CAP = 1000               # events waiting at most; past that the oldest are dropped
NOTIFY_RESULTS = ("ok", "failed", "dropped")


class NotifyQueue:
    """The events waiting, in seq order, committed to ``store`` (a Store) as they change."""

    def __init__(self, store, cap=NOTIFY_CAP):
        self.store = store
        self.cap = cap
        self.next = 1                   # the seq of the next event
        self.done = 0                   # every seq up to this one has left the queue
        self.waiting = collections.deque()
        self.counts = collections.Counter()     # since this process started: NOTIFY_RESULTS
        self.full = 0                   # dropped since the queue last had room (for the log)
        self.opened = False

    def open(self):
        """The queue as the state db holds it (once, before the first use)."""
        self.opened = True
        data = self.store.data
        meta = data.get("notify") or {}
        self.next = max(1, meta.get("next", 1))
        self.done = max(0, min(meta.get("done", 0), self.next - 1))
        lost = 0
        for seq in range(max(self.done + 1, self.next - self.cap), self.next):
            event = data.get(self.slot(seq))
            if isinstance(event, dict) and event.get("seq") == seq:
                self.waiting.append(event)
            else:
                lost += 1
        if lost:
            log.error("notify: %d waiting events could not be read back from the state db; "
                      "they are lost", lost)
        if self.waiting:
            log.info("notify: %d events from before the restart wait for their delivery (seq %d-%d)",
                     len(self.waiting), self.waiting[0]["seq"], self.waiting[-1]["seq"])

    def slot(self, seq):
        return "notify:%d" % (seq % self.cap)

    def _meta(self):
        return {"notify": {"next": self.next, "done": self.done}}

    def push(self, event):
        """Number ``event`` (a dict: kind, time, node, its keys), store it, queue it; returns it."""
        if not self.opened:
            self.open()
        seq = self.next
        self.next += 1
        event = dict(event, seq=seq)
        if len(self.waiting) >= self.cap:
            dropped = self.waiting.popleft()
            self.done = dropped["seq"]
            self.counts["dropped"] += 1
            if not self.full:
                log.error("notify: %d events wait, the most kept; the oldest are dropped from now "
                          "on (first: seq %d, %s)", self.cap, dropped["seq"], dropped.get("kind"))
            self.full += 1
        self.waiting.append(event)
        changes = self._meta()
        changes[self.slot(seq)] = event
        self.store.commit(changes)
        return event

    def head(self):
        """The oldest event waiting, or None."""
        if not self.opened:
            self.open()
        return self.waiting[0] if self.waiting else None

    def finish(self, seq, result):
        """Event ``seq`` left the queue: ``ok`` (delivered) or ``failed`` (given up).  False
        when it is no longer the head (the full queue dropped it meanwhile)."""
        if not self.waiting or self.waiting[0]["seq"] != seq:
            return False
        self.waiting.popleft()
        self.done = seq
        self.counts[result] += 1
        if self.full and len(self.waiting) < self.cap:
            log.warning("notify: the queue has room again; %d events were dropped", self.full)
            self.full = 0
        self.store.commit(self._meta())
        return True

    def status(self):
        """Counters since the start and what waits (daemon.counters of --status --json)."""
        return {"notify_events": [{"result": r, "count": self.counts[r]} for r in NOTIFY_RESULTS],
                "notify_waiting": len(self.waiting)}
