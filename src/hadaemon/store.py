"""State store: dbm.dumb with a write-ahead journal.

The db is a dbm.dumb database (the one dbm format every Python reads): values
in state.db.dat, an index of one line per key in state.db.dir.  The store writes
both itself, in dbm.dumb's format (dbm.dumb.open reads them), because dbm.dumb
is not crash-safe (values change in place, its sync() rewrites the whole index)
and opens a file twice per key written.  The discipline that makes it safe
against kill -9 at any moment:

  commit      every change is first appended to state.db.journal as one JSON
              line in one write(2); from then on it is acknowledged.
  checkpoint  every few seconds the dirty keys go into .dat (the new and grown
              ones in one write at its end), the index lines of the keys written
              are appended to .dir (a later line of a key wins), a fixed-size
              "meta:checkpoint" records how many keys the index holds, and only
              then is the journal truncated.  Soft values (last check results) are
              appended to the journal first, so that every value the db files hold
              since the last checkpoint is also in the journal: a value overwritten
              in place and cut short by a crash always has its newer copy there.
              So a checkpoint costs what changed, not what the db holds.  Once .dir
              holds more appended lines than keys, or an append failed, it is
              rewritten whole as dbm.dumb's sync() does it (the old one kept as .bak).
  recovery    the index is taken from .dir if it holds meta:checkpoint and at
              least the recorded number of keys (a .dir cut short by a kill while
              it is rewritten, maybe to nothing, does not), else from .bak (the
              .dir before that rewrite began, appended lines and all);
              only lines exactly as dbm.dumb writes them count.  Values that no
              longer decode were changed since the last checkpoint and come back
              from the journal, replayed on top; keys that do not come back are
              deleted, and the journal emptied (a torn last line would otherwise
              swallow the next commit appended to it).  A value that decodes but
              does not have the shape the master writes is dropped with a note.
  disk full   a commit that cannot be written stays in memory (and in --status)
              and is written with the next commit or checkpoint that can; the
              outage is logged once, its end too.  A failed journal write makes
              the next one start a new line; a failed rewrite of .dir puts .bak
              back (a second one would delete the last whole index); a failed
              compaction leaves every key dirty.
  compaction  the space of a value that grew is never reused, so the .dat
              file is rewritten when it is mostly dead: a full snapshot goes into
              the journal first, then the db files are recreated from memory.
              Recovery starts from the newest full snapshot when it finds one, and
              rebuilds the files from it.

Nothing is ever deleted: history lives in ring slots (tr:N, run:N modulo cap).

Uses: base, wire, records, dumbfiles.
"""

import json
import os
import time

from .base import DB_NAME, MAX_WINDOW, log, valid_name, valid_state
from .wire import _ENCODE, _shorten
from .records import Run, Transition, _is_time
from .dumbfiles import DumbFiles, _META_KEY, _META_WIDTH


def well_formed(key, value):
    """Whether ``value``, read back from the db, has the shape the master writes at ``key``.

    A value that parses as JSON but is not (a damaged or hand-edited db) would take
    the master down later; recovery drops it instead.
    """
    kind = key.split(":", 1)[0]
    if kind == "host":
        return isinstance(value, dict) and valid_state(value.get("state")) and _is_time(value.get("since")) \
            and (value.get("pending") is None or valid_state(value["pending"])) \
            and isinstance(value.get("count"), int) and _damping_well_formed(value)
    if kind == "tr":
        return Transition.well_formed(value)
    if kind == "run":
        return Run.well_formed(value)
    if key == "queue":
        return isinstance(value, list) and all(isinstance(i, int) for i in value)
    if key == "meta":
        return isinstance(value, dict) and all(isinstance(value.get(k, 1), int)
                                               for k in ("next_transition", "next_run"))
    if key == "notify":                 # the events' counter (NotifyQueue)
        return isinstance(value, dict) and all(isinstance(value.get(k), int) for k in ("next", "done"))
    if kind == "notify":                # an event waiting for its delivery, by seq % its cap
        return isinstance(value, dict) and isinstance(value.get("seq"), int) \
            and isinstance(value.get("kind"), str)
    if key == "switchover":
        return isinstance(value, dict)
    if key == "hostpause":
        return isinstance(value, list) and all(valid_name(h) for h in value)
    if kind == "report":
        return isinstance(value, dict) and _is_time(value.get("time")) and valid_state(value.get("state"))
    if kind == "check" or key in ("reports", "checks"):     # the last two: older dbs, whole dicts
        return isinstance(value, dict)
    return True


def _damping_well_formed(value):
    """A host record's ``window`` and ``recent`` (ledger.confirm_step), when it has them."""
    window, recent = value.get("window"), value.get("recent")
    return (window is None or (isinstance(window, int) and 1 <= window)) \
        and (recent is None or (isinstance(recent, list) and len(recent) <= MAX_WINDOW
                                and all(word is None or valid_state(word) for word in recent)))


class Store:
    """Every durable thing the master knows, as key -> JSON value."""

    def __init__(self, state_dir):
        self.base = os.path.join(state_dir, DB_NAME)
        self.journal_path = self.base + ".journal"
        self.data = {}
        self.dirty = set()
        self.files = DumbFiles(self.base)
        self.jfd = None
        self.notes = []         # what recovery did, for the log
        self.torn = False       # the journal may end in part of a line
        self.unjournaled = set()    # keys whose value is in ``data`` but not the journal
        self.owed = set()           # of those, the committed ones (their write failed: disk full)
        self.encoded = {}           # dirty values as JSON text, made by a checkpoint for its two writes
        self.error = None           # the write error of an outage (disk full), logged once
        self.damage = None          # why the db files cannot be used, when they cannot
        self.created = False        # open() found no db and started a new one

    # -- reading ---------------------------------------------------------------

    def _load_db(self):
        """(values, undecodable keys, index file used or None); damage leaves values empty.

        When neither index is usable, ``self.damage`` says why.
        """
        self.damage = None
        for suffix in (".dir", ".bak"):
            index = self.files.read_index(self.base + suffix)
            if index is None:
                continue
            values, bad = self.files.read_values(index)
            meta = values.get(_META_KEY)
            if not isinstance(meta, dict):
                # Not our index, or a .dir cut (maybe to nothing) by sync(), or damage.
                self.damage = self.damage or ("its data file does not read back" if _META_KEY in bad
                                              else "its index does not parse")
                continue
            if suffix == ".dir" and len(index) < meta.get("keys", 0):
                self.damage = self.damage or "its index is incomplete"
                continue        # a .dir cut short while sync() rewrote it
            # .bak may lack keys whose index line found the disk full: those came
            # after the last checkpoint, so the journal has them.
            self.files.index = index
            return values, [key for key in bad if key != _META_KEY], suffix
        return {}, [], None

    def _read_journal(self):
        try:
            with open(self.journal_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return [], False
        entries, full = [], False
        lines = raw.split(b"\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                entry = json.loads(line.decode("utf-8"))
                if not isinstance(entry["s"], dict):
                    raise TypeError("not an object")
                if entry.get("full"):
                    entries, full = [], True    # a full snapshot replaces all before it
                entries.append(entry["s"])
            except (ValueError, UnicodeDecodeError, KeyError, TypeError, RecursionError):
                if i != len(lines) - 1:
                    self.notes.append("journal line %d is damaged and was skipped" % (i + 1))
        return entries, full

    def load(self):
        """Read db and journal into ``data``.

        Returns (index suffix used or None, journal entries, keys lost, whether the
        journal held a full snapshot).
        """
        values, bad, suffix = self._load_db()
        entries, full = self._read_journal()
        if full:
            values, bad = {}, []        # a compaction was cut short: the snapshot rules
        for entry in [values] + entries:
            for key, value in list(entry.items()):
                if not well_formed(key, value):
                    self.notes.append("%s holds %s, not what hadaemon writes there; dropped"
                                      % (key, _shorten(value)))
                    del entry[key]
        for entry in entries:
            values.update(entry)
        lost = [key for key in bad if key not in values]
        if lost:
            self.notes.append("values of %d keys could not be read and are lost: %s"
                              % (len(lost), ", ".join(sorted(lost)[:10])))
        values.pop(_META_KEY, None)
        self.data = values
        return suffix, entries, lost, full

    @classmethod
    def read(cls, state_dir):
        """A read-only snapshot of the db (for --status when no daemon runs)."""
        store = cls(state_dir)
        store.load()
        return store.data

    # -- opening for writing ---------------------------------------------------

    def _move_aside(self, why):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moved = []
        for path in self.files.paths():
            if os.path.exists(path):
                target = "%s.corrupt-%s%s" % (self.base, stamp, path[len(self.base):])
                os.rename(path, target)
                moved.append(target)
        self.notes.append("state db is damaged (%s); moved aside as %s and recreated"
                          % (why, ", ".join(moved) or "nothing"))

    def open(self):
        """Recover (see above), then open for writing and checkpoint what the journal held."""
        try:
            dat_size = os.path.getsize(self.base + ".dat")
        except OSError:
            dat_size = 0
        # A .dat with no index and nothing past the meta value is a new db whose
        # creation a crash cut short, not a damaged one; so is an empty .dir beside
        # it (dbm.dumb creates the file, then writes meta's line into it).
        try:
            dir_size = os.path.getsize(self.base + ".dir")
        except OSError:
            dir_size = 0
        exists = dat_size > _META_WIDTH or dir_size > 0 or os.path.exists(self.base + ".bak")
        suffix, entries, lost, full = self.load()
        self.jfd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           0o600)
        if full:
            # A compaction was cut short: its snapshot is the state, the files are
            # half-written leftovers.  The db is rebuilt from the snapshot.
            self.notes.append("state db was being rebuilt (compaction, repair) when the daemon "
                              "died; rebuilding it from its snapshot")
            self.checkpoint()
            return
        damage = (self.damage or "its index does not parse") if exists and suffix is None else \
            "unreadable values" if lost and suffix == ".dir" else None
        if damage:
            # What could be read is the state from now on.  It goes into the journal
            # as a full snapshot before the files are moved aside: a crash while the
            # new db is written must not leave only the journal's last few commits.
            self.torn = True            # after a torn last line, start a new one
            self._append({"full": True, "s": self.data})
            self._move_aside(damage)
            self.files.close_dat()           # the next checkpoint writes new files
            self.checkpoint()
            return
        index = dict(self.files.index) if suffix is not None else {}
        # Keys the index holds that recovery did not take: torn by a crash, or behind
        # a full snapshot.  The count in meta goes down first: an index that holds
        # more keys than it says is whole, one that holds fewer is not.
        stale = [key for key in index if key != _META_KEY and key not in self.data]
        for key in stale:
            del index[key]
        self.created = not exists and not entries
        if suffix is None:
            self.files.create()
        else:
            self.files.index = index
            self.files.open_dat()
            if stale:
                self.files.put_meta()
            if suffix == ".bak":
                self.notes.append("state db index was cut short by a crash; using its backup")
            # The lines recovery used, whole (dbm.dumb reads .dir strictly, and the
            # lines appended since it was last written whole go).
            self.files.replace_index()
        if entries or suffix != ".dir" or lost:
            self.dirty = set(self.data) if suffix != ".dir" or lost else \
                {k for e in entries for k in e}
            self.checkpoint()
        if os.fstat(self.jfd).st_size:
            # Only damaged lines are left (a torn last write): the next commit would be
            # glued to one of them and be lost with it.
            os.ftruncate(self.jfd, 0)

    def _append(self, entry):
        self._append_text(_ENCODE(entry))

    def _append_text(self, text):
        line = text.encode("utf-8")
        if self.torn:           # the last append failed part-way (disk full): end that line first
            line = b"\n" + line
        view = memoryview(line + b"\n")
        self.torn = True
        while view:
            written = os.write(self.jfd, view)
            view = view[written:]
        self.torn = False

    def _trouble(self, exc):
        if self.error is None:
            log.error("state db: cannot write in %s: %s; changes are kept in memory and "
                      "written as soon as it can", os.path.dirname(self.base), exc.strerror or exc)
        self.error = exc

    def commit(self, changes):
        """Make ``changes`` (key -> JSON value) durable against a crash of this process.

        If the journal cannot be written (disk full), the changes stay in memory and
        go to disk with the next commit or checkpoint that can write.
        """
        self.data.update(changes)
        self.dirty.update(changes)
        self.unjournaled.update(changes)
        self.owed.update(changes)
        for key in changes:
            self.encoded.pop(key, None)
        try:
            # Only what was committed: the soft values wait for the checkpoint, which
            # journals them before it writes (a transition's commit would otherwise
            # encode every check's last since the checkpoint, and its action wait).
            self._journal(self.owed)
        except OSError as exc:
            self._trouble(exc)
            return
        self.unjournaled.difference_update(self.owed)
        self.owed.clear()

    def soft(self, key, value):
        """Keep ``value`` at the next checkpoint; a crash may lose it (last check results).

        It is encoded by the checkpoint, not as it comes: a check that runs ten times
        between two checkpoints costs one encoding, not ten.  So ``value`` must not be
        changed after (every caller passes a new one).
        """
        self.data[key] = value
        self.encoded.pop(key, None)
        self.dirty.add(key)
        self.unjournaled.add(key)

    def _text(self, key):
        """The JSON text of ``key``'s value."""
        text = self.encoded.get(key)
        return _ENCODE(self.data[key]) if text is None else text

    def _journal(self, keys):
        """Append the values of ``keys`` to the journal, one line."""
        self._append_text('{"s":{%s}}' % ",".join(_ENCODE(key) + ":" + self._text(key) for key in keys))

    def checkpoint(self):
        """Write dirty keys into the dumb db, sync its index, then empty the journal.

        An OSError (disk full) is logged once per outage and raised; everything
        stays dirty and in memory for the next try.
        """
        try:
            self._checkpoint()
        except OSError as exc:
            self._trouble(exc)
            raise
        if self.error is not None:
            log.warning("state db: writing again; everything kept in memory is on disk")
            self.error = None

    def _checkpoint(self):
        rebuild = self.files.dat_fd is None
        if rebuild:
            # New files, from memory: after a compaction cut short by a crash, or
            # after a damaged db was moved aside.  (Even with nothing in them, the
            # index write below ends with the journal and its snapshot emptied.)
            self.dirty = set(self.data)     # first: whatever fails below, all are written later
            self.files.create()
        if not self.dirty and not rebuild:
            return
        try:
            self._write_dirty(rebuild)
        finally:
            self.encoded.clear()
        if self.files.dat_end > max(1 << 20, 4 * self.files.live):
            self.compact()

    def _write_dirty(self, rebuild):
        # Each dirty value encoded once, for the journal and the db files alike.
        self.encoded = {key: _ENCODE(self.data[key]) for key in self.dirty}
        if self.unjournaled:
            # Values are about to change in the db files in place: each must have
            # its copy in the journal until the index is written.
            self._journal(self.unjournaled)
            self.unjournaled.clear()
            self.owed.clear()
        try:
            self.files.write_index(self.files.put_values(sorted(self.dirty), self._text), rebuild)
            # The count of keys last: a .dir that holds fewer is one cut short.
            self.files.put_meta()
        except OSError:
            # .dir may end in part of a line: an append would be glued to it.  The
            # next checkpoint writes it whole.
            self.files.index_whole = True
            raise
        os.ftruncate(self.jfd, 0)
        self.dirty.clear()

    def compact(self):
        """Recreate the db files from memory, the journal holding a full snapshot meanwhile."""
        before = self.files.dat_end
        self._append({"full": True, "s": self.data})
        self.unjournaled.clear()
        self.owed.clear()
        # From here every key is dirty, so whatever fails below (the disk full), the
        # next checkpoint writes them all before it drops the snapshot from the journal.
        self.dirty = set(self.data)
        self.files.close_dat()               # the next checkpoint makes the files anew
        self.checkpoint()
        self.notes.append("state db compacted: %d -> %d bytes" % (before, self.files.dat_end))

    def close(self):
        if self.jfd is not None:
            try:
                if self.files.dat_fd is not None:
                    self.checkpoint()
                    # As dbm.dumb's close(): .dir whole, the one before kept as .bak.
                    self.files.write_index([], True)
            finally:
                self.files.close_dat()
                os.close(self.jfd)
                self.jfd = None
