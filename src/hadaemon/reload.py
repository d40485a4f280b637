"""Reload: a new configuration, read in steps between the loop's other work.

SIGHUP and --reload read both files again.  Ten thousand checks take a second to
read: the reading goes a slice per pass of the loop, so due checks wait for a
slice, never for the whole of it; the new config is swapped in at once when it is
read whole (a bad one is refused whole).  What the swap replaced is freed
a slice per pass too: freed at once, it held the loop up for tens of milliseconds.

Uses: base, wire.
"""

import gc
import time

from .base import ANSWER_STEP, ConfigError, log
from .wire import encode_message


class Reload:
    """The reloads asked for and done, by number, and the reading under way."""

    def __init__(self, steps):
        self.steps = steps              # () -> generator: reads, prepares, swaps in; returns errors
        self.asked = self.done = 0
        self.reading = None             # (request number, generator)
        self.errors = []                # of the last reading done
        self.graveyard = []             # lists a swap replaced, emptied from their ends

    def want(self):
        """A reload is asked for: the reading starts now, or starts over if one is under
        way (the files may have changed since).  Returns the request's number."""
        self.asked += 1
        if self.reading is not None:
            self.reading = None
            gc.enable()
        return self.asked

    def due(self):
        """A reading asked for, or what one replaced left to free: step() and let_go()
        have work (the loop asks this, one call, instead of calling both)."""
        return self.done < self.asked or bool(self.graveyard)

    def busy(self):
        """Reading, or freeing: the loop should pass again at once."""
        return self.reading is not None or bool(self.graveyard)

    def step(self, until):
        """Read until monotonic ``until``; the steps swap the config in once it is read."""
        if self.done >= self.asked:
            return
        if self.reading is None:
            log.info("reloading the configuration")
            self.reading = (self.asked, self.steps())
            # Reading makes tens of thousands of objects that live on: the collector
            # would walk them all, again and again, while they are made.  They are
            # frozen once swapped in (settle_heap); a refused config is freed by
            # reference counts alone.
            gc.disable()
        number, steps = self.reading
        try:
            next(steps)
            while time.monotonic() < until:
                next(steps)
            return
        except StopIteration as done:
            errors = done.value
        except ConfigError as exc:
            for line in exc.errors:
                log.error("reload refused: %s", line)
            errors = exc.errors
        self.reading = None
        gc.enable()
        self.done, self.errors = number, errors

    def drop(self, why):
        """The daemon stops: a reading under way ends, refused with ``why``."""
        if self.done < self.asked:
            self.done, self.reading = self.asked, None
            gc.enable()
            self.errors = [why]

    def bury(self, *dead):
        """Lists a swap replaced, to be freed a slice at a time."""
        self.graveyard += dead

    def let_go(self, n=ANSWER_STEP):
        """Free ``n`` of the objects a reload replaced."""
        while n > 0 and self.graveyard:
            dead = self.graveyard[-1]
            k = min(n, len(dead))
            del dead[len(dead) - k:]
            n -= k
            if not dead:
                self.graveyard.pop()

    def answer(self):
        """--reload's answer, once the reading it asked for (or a later one) is done."""
        number = self.want()
        while self.done < number:
            yield None
        yield encode_message({"ok": not self.errors, "errors": self.errors})
