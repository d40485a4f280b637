#!/usr/bin/env python3
"""shapes.py: what a design's shape costs per check, before any of hadaemon's code.

    python3 bench/shapes.py [--rate 500] [--seconds 4] [--rounds 3]

The trivial check spawned at ``rate`` per second by bare code, four ways in turn each
round; CPU per check (ms) of each process, and the whole as a ratio to the first, the
paced bare spawn that bench.py's 1.3x target is set against:

  paced    one process spawns the check at each due time and waits for it
  shape    a master sends a job (a JSON line) at each due time, a forked worker runs
           it and sends its result back: hadaemon's shape before the check flow
           (bench.py's shape floor)
  timer    the worker keeps the schedule itself and sends each result as it comes;
           the master only reads results
  batched  the worker keeps the schedule and sends a result at once only when its
           output changed, the unchanged ones together every BATCH_EVERY seconds

``timer`` and ``batched`` keep the schedule in the worker; hadaemon's check flow
(docs/HACKING.md) keeps it in the master and hands the jobs ahead, which the worker
starts at their time, and batches what did not change: ``batched`` is its floor.
"""

import argparse
import json
import os
import resource
import select
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (bench.py beside this file)

BATCH_EVERY = 0.1       # seconds an unchanged result may wait for the master to read it


def _timer_worker(sock, script, rate, n, batch):
    """A worker that keeps the schedule: the n runs at ``rate``, each result sent at once,
    or (``batch``) only a changed one at once and the rest every BATCH_EVERY."""
    job = bench.job_message([script])
    env = dict(os.environ, **job["env"])
    start, last, waiting, sent_at = time.monotonic(), None, [], time.monotonic()
    for i in range(n):
        delay = start + i / float(rate) - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        started = time.time()
        out, status = bench.run_piped(script, env)
        waiting.append(bench.result_message(i, job["key"], out, status, started))
        now = time.monotonic()
        if not batch or out != last or now - sent_at >= BATCH_EVERY or i == n - 1:
            sock.sendall(json.dumps(waiting, separators=(",", ":")).encode() + b"\n")
            waiting, sent_at = [], now
        last = out


def _reader_master(sock, n):
    """The master of ``timer`` and ``batched``: it reads results until it has all ``n``."""
    ep = select.epoll()
    ep.register(sock.fileno(), select.EPOLLIN)
    buf, got, late = b"", 0, time.monotonic() + 60.0 + n / 100.0
    while got < n:
        if time.monotonic() > late:
            raise RuntimeError("the worker sent %d of %d results" % (got, n))
        if not ep.poll(1.0):
            continue
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("the worker ended after %d of %d results" % (got, n))
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            got += len(json.loads(line))
    ep.close()


def shape_worker_timer(script, rate, seconds, batch):
    """``timer`` (batch False) or ``batched``: CPU per check of master, worker, check."""
    n = max(1, int(rate * seconds))
    a, pid = bench.fork_peer(_timer_worker, script, rate, n, batch)
    self0, worker0 = bench.rusage_cpu(resource.RUSAGE_SELF), bench.proc_cpu(pid)
    try:
        _reader_master(a, n)
        master = bench.rusage_cpu(resource.RUSAGE_SELF) - self0
        worker, checks = bench.proc_cpu(pid) - worker0, bench.proc_times(pid)[1]
    finally:
        a.close()
        os.waitpid(pid, 0)
    return {"master_ms": bench.ms(master / n), "worker_ms": bench.ms(worker / n),
            "check_ms": bench.ms(checks / n), "cpu_ms": bench.ms((master + worker + checks) / n)}


def one_round(script, rate, seconds):
    paced = bench.bench_spawn_paced(script, rate, seconds)
    return {"paced": {"cpu_ms": paced["cpu_ms"]},
            "shape": bench.bench_shape_floor(script, rate, seconds),
            "timer": shape_worker_timer(script, rate, seconds, False),
            "batched": shape_worker_timer(script, rate, seconds, True)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=int, default=500, help="checks/s")
    p.add_argument("--seconds", type=float, default=4.0, help="seconds per shape per round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="hadaemon-shapes-")
    script = bench.write_script(os.path.join(tmp, "check_trivial"), bench.TRIVIAL_CHECK)
    bench.bench_spawn(script, 20, False)          # warm the page cache
    print("ms of CPU per check at %d checks/s; load average at start %s" % (
        args.rate, " ".join("%.2f" % x for x in bench.loadavg())))
    for i in range(args.rounds):
        r = one_round(script, args.rate, args.seconds)
        paced = r["paced"]["cpu_ms"]
        for name in ("paced", "shape", "timer", "batched"):
            f = r[name]
            parts = "" if name == "paced" else "master %.3f  worker %.3f  check %.3f  " % (
                f["master_ms"], f["worker_ms"], f["check_ms"])
            print("round %d  %-8s %s= %.3f  %.2fx paced" % (i + 1, name, parts, f["cpu_ms"], f["cpu_ms"] / paced))
    print("load average at end %s" % " ".join("%.2f" % x for x in bench.loadavg()))


if __name__ == "__main__":
    main()
