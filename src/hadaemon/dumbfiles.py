"""dbm.dumb's two files (.dat and .dir), read and written in dbm.dumb's own format.

Owns the byte layout alone: values in 512-byte blocks of .dat, one index line per
key in .dir (a later line of a key wins), the fixed-size meta:checkpoint record.
The journal discipline that makes the files safe under kill -9 is the store's.

Uses: the standard library only.
"""

import json
import os
import re
import time


_META_KEY = "meta:checkpoint"
_META_WIDTH = 64


def _blocks(size):
    """Bytes a value of ``size`` takes in .dat: whole 512-byte blocks."""
    return -(-size // 512) * 512


def _index_line(key, pos, size):
    """One line of a dbm.dumb index (.dir), exactly as dbm.dumb writes it.

    dbm.dumb stores a key as UTF-8 and writes that in the index as Latin-1 text.
    """
    return "%r, %r\n" % (key.encode("utf-8").decode("latin-1"), (pos, size))


# Most index lines: a key with no quote, backslash or unprintable byte (repr adds none).
_INDEX_LINE_RE = re.compile(r"'([^'\\]*)', \((\d+), (\d+)\)\Z")
_INDEX_REWRITE_MIN = 4096       # appended index lines tolerated before .dir is rewritten whole


class DumbFiles:
    """The db's two files, read and written as dbm.dumb does (dbm.dumb.open reads them).

    A value starts on a 512-byte boundary of .dat (NUL padding before it); a new
    value, or one grown past its blocks, goes at the end; one that still fits is
    overwritten in place.  .dir holds one line per key, as repr((key, (pos, size))).
    Written here, each checkpoint's new values go in one write, so a checkpoint
    costs a few system calls, not two opens of a file per key.  The Store above it
    decides what is written when; this class only knows the format.
    """

    def __init__(self, base):
        self.base = base
        self.dat_fd = None      # .dat, open for writing (None: not open, or to be made anew)
        self.dat_end = 0
        self.index = {}         # key -> (pos, size): the index recovery used, then the live one
        self.sizes = {}         # key -> bytes its value takes in .dat (512-byte blocks)
        self.live = 0           # their sum: what .dat would take compacted
        self.appended = 0       # index lines appended to .dir since it was last written whole
        self.index_whole = False    # the next write of the index is whole (an append failed)

    def paths(self):
        return [self.base + s for s in (".dat", ".dir", ".bak")]

    # -- reading ---------------------------------------------------------------

    @staticmethod
    def read_index(path):
        """key -> (pos, size) from a dumb index file (None when missing).

        Only lines exactly as dbm.dumb writes them count: a line the disk had no
        room to finish, and the next line appended to it, are skipped.
        """
        import ast
        try:
            with open(path, "r", encoding="latin-1") as f:
                lines = f.read()
        except FileNotFoundError:
            return None
        index = {}
        for line in lines.splitlines():
            try:
                m = _INDEX_LINE_RE.match(line)
                if m:
                    key, pos, size = m.group(1), int(m.group(2)), int(m.group(3))
                else:
                    key, (pos, size) = ast.literal_eval(line)
                    if not isinstance(key, str) or type(pos) is not int or type(size) is not int:
                        raise ValueError("not as dbm.dumb writes it")
                key = key.encode("latin-1").decode("utf-8")
                if _index_line(key, pos, size) != line + "\n" or min(pos, size) < 0:
                    raise ValueError("not as dbm.dumb writes it")
                index[key] = (pos, size)        # a later line of a key replaces an earlier one
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
        return index

    def read_values(self, index):
        """(key -> decoded JSON value, keys whose value does not read back)."""
        values, bad = {}, []
        try:
            with open(self.base + ".dat", "rb") as f:
                end = os.fstat(f.fileno()).st_size
                for key, (pos, size) in index.items():
                    if pos + size > end:
                        bad.append(key)
                        continue
                    f.seek(pos)
                    raw = f.read(size)
                    try:
                        if len(raw) != size:
                            raise ValueError("short")
                        values[key] = json.loads(raw.decode("utf-8"))
                    except (ValueError, UnicodeDecodeError, RecursionError):
                        bad.append(key)
        except FileNotFoundError:
            return {}, list(index)
        return values, bad

    # -- writing ---------------------------------------------------------------

    def open_dat(self):
        self.dat_fd = os.open(self.base + ".dat", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.dat_end = os.fstat(self.dat_fd).st_size
        self.sizes = {key: _blocks(size) for key, (pos, size) in self.index.items()}
        self.live = sum(self.sizes.values())

    def close_dat(self):
        if self.dat_fd is not None:
            try:
                os.close(self.dat_fd)
            except OSError:
                pass
            self.dat_fd = None

    def create(self):
        """New, empty db files: .dat with meta's value, .dir with its line (meta is the
        first key, so an index cut short always lacks it or carries a count that shows
        it is short)."""
        self.close_dat()
        for path in self.paths():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.index, self.appended = {_META_KEY: (0, _META_WIDTH)}, 0
        self.open_dat()
        try:
            self.put_meta()
            self.dat_end = _META_WIDTH
            self.write_index([], True)
        except OSError:
            self.close_dat()            # half made: the next checkpoint makes them anew
            raise

    def put_meta(self):
        """The count of keys the index holds, in its fixed-size value."""
        meta = json.dumps({"keys": len(self.index), "time": int(time.time())}).encode()
        self._pwrite(meta.ljust(_META_WIDTH), self.index[_META_KEY][0])

    def _pwrite(self, data, pos):
        view = memoryview(data)
        while view:
            written = os.pwrite(self.dat_fd, view, pos)
            view, pos = view[written:], pos + written

    def put_values(self, keys, text_of):
        """Write the values of ``keys`` (``text_of(key)``: its JSON text) into .dat; returns
        the keys, whose index lines are then to be written.  New and grown values go at
        the end in one write."""
        grown = []
        for key in keys:
            value = text_of(key).encode("utf-8")
            old = self.index.get(key)
            if old is not None and _blocks(len(value)) <= _blocks(old[1]):
                self._pwrite(value, old[0])
                self.index[key] = (old[0], len(value))
                # The last value of the file may have grown within its blocks.
                self.dat_end = max(self.dat_end, old[0] + len(value))
            else:
                grown.append((key, value))
        tail, end = bytearray(), self.dat_end
        for i, (key, value) in enumerate(grown):
            pos = -(-end // 512) * 512
            tail += bytes(pos - end) + value
            end = pos + len(value)
            grown[i] = (key, (pos, len(value)))
        if tail:
            self._pwrite(tail, self.dat_end)
            self.dat_end = end
            self.index.update(grown)
        for key in keys:
            size = _blocks(self.index[key][1])
            self.live += size - self.sizes.get(key, 0)
            self.sizes[key] = size
        return list(keys)

    def write_index(self, keys, whole):
        """Make the index lines of ``keys`` durable: appended to .dir, or .dir written whole."""
        index = self.index
        whole = whole or self.index_whole or \
            self.appended + len(keys) > max(_INDEX_REWRITE_MIN, len(index))
        self.index_whole = True         # until the write below is whole
        if whole:
            lines = [_index_line(k, pos, size) for k, (pos, size) in index.items()]
            # As dbm.dumb's sync(): the old index becomes .bak, the new one is written.
            try:
                os.unlink(self.base + ".bak")
            except FileNotFoundError:
                pass
            try:
                os.rename(self.base + ".dir", self.base + ".bak")
            except FileNotFoundError:
                pass
        else:
            lines = [_index_line(k, *index[k]) for k in keys]
        text = "".join(lines).encode("latin-1")
        try:
            fd = os.open(self.base + ".dir", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC |
                         (os.O_TRUNC if whole else os.O_APPEND), 0o600)
            try:
                view = memoryview(text)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except OSError:
            if whole:
                # The whole index is in .bak and .dir is cut (disk full): put .bak
                # back, or the next rewrite would delete it for the cut one.
                try:
                    os.replace(self.base + ".bak", self.base + ".dir")
                except OSError:
                    pass
            raise
        self.index_whole = False
        self.appended = 0 if whole else self.appended + len(keys)

    def replace_index(self):
        """.dir made anew from ``index``: written beside it, then renamed over it."""
        with open(self.base + ".dir.tmp", "w", encoding="latin-1") as f:
            f.write("".join(_index_line(k, pos, size) for k, (pos, size) in self.index.items()))
        os.replace(self.base + ".dir.tmp", self.base + ".dir")
