#!/usr/bin/env python3
"""Run hadaemon under cProfile: ``profiled.py DIR hadaemon.py ARGS...``.

The master's stats go to DIR/master.prof when it exits; each check worker writes
DIR/worker-PID.prof and each action run DIR/action-PID.prof as it leaves.  Read
them with ``python3 -m pstats DIR/master.prof`` (``sort tottime``, ``stats 25``).
``bench.py --profile DIR`` starts every daemon of the bench this way.  With
``PROFILE_CPU=1`` the profiles count each process's CPU time, not the wall
clock: a wait for the CPU on a busy machine is then not charged to the call
that waited, and the figures add up to what the bench's CPU per check counts.
"""

import cProfile
import importlib.util
import os
import sys
import time

TIMER = (time.process_time,) if os.environ.get("PROFILE_CPU") else ()


def main():
    out, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    spec = importlib.util.spec_from_file_location("hadaemon", script)
    hadaemon = importlib.util.module_from_spec(spec)
    sys.modules["hadaemon"] = hadaemon
    spec.loader.exec_module(hadaemon)
    master = cProfile.Profile(*TIMER)

    def profiled(name, target):
        def run(*a):
            master.disable()            # a forked child inherits the master's profiler
            prof = cProfile.Profile(*TIMER)
            prof.enable()
            try:
                return target(*a)
            finally:
                prof.disable()
                prof.dump_stats(os.path.join(out, "%s-%d.prof" % (name, os.getpid())))
        return run

    hadaemon.worker_main = profiled("worker", hadaemon.worker_main)
    hadaemon.action_main = profiled("action", hadaemon.action_main)
    sys.argv = [script] + args
    master.enable()
    try:
        code = hadaemon.main(args)
    finally:
        master.disable()
        master.dump_stats(os.path.join(out, "master.prof"))
    sys.exit(code)


if __name__ == "__main__":
    main()
