"""hadaemon: watch a master / hot-standby pair and run ordered actions on a role change.

One self-contained file, the standard library only, Python 3.8 or newer.  Copy the
folder that holds it to a host and run ``python3 hadaemon.py --start``.

Developed as the modules of the package src/hadaemon/, one job each; the shipped
hadaemon.py is made from them by tools/amalgamate.py (docs/HACKING.md).

Process model
-------------
master      one thread, one ``selectors`` loop over the UNIX socket, its client
            connections and a self-pipe fed by ``signal.set_wakeup_fd``.  It owns
            the state db alone, schedules checks, applies reports (docs/configuration.md) and
            queues action runs.  Every pass of the loop reaps children, fires due
            timers and keeps the worker pool full, so a lost signal never matters.
            Its parts, each a class of its own: the Ledger (states, transitions,
            runs, the queue), the Scheduler (when checks run), the Pool (every
            forked child), the ControlServer (the socket), the HttpServer (the
            status page, JSON, load-balancer checks and metrics, when ``http`` is
            set: its connections in the same loop), ActionRuns (the queue's head
            to the action run) and Reload (a config read in steps); the Master
            wires them.
worker      ``workers`` processes forked up front.  Each connects to the socket,
            says hello, then runs one check at a time as the master hands them out:
            the check gets its own session (process group), its output is parsed
            into a dict and sent back as one JSON line.
action run  one forked child per action sequence, at most one at a time.  It is
            forked ahead of need and waits, connected, for its sequence (so a
            transition's first command starts without a fork on the way); it runs
            the (already expanded) commands serially, reports each start and end
            over the socket, and exits.  The master records them.
            A worker keeps the pid of the check it runs in a page it shares with
            the master, an action run sends the pid of each command it starts: if
            either dies (SIGKILL, OOM) the master kills that process group.
            In a cluster's leader it asks the master before each command and
            keeps its command's deadlines by the leader's lease clock itself.
cluster     with ``[cluster]`` (docs/cluster.md): one forked agent that makes every etcd
agent       call (lease, campaign, guarded ledger writes, a watch of the cluster's
            keys) on the master's request, so a call etcd never answers blocks
            nothing but the next etcd call.  The master decides; the agent only
            talks.  It leaves when the master goes (the lease then expires).

Modules (src/hadaemon/, in the order of hadaemon.py: each uses only those above it)
---------------------------------------------------------------------------------
(made from each module's docstring by tools/amalgamate.py, into hadaemon.py)

Signals (master)
----------------
SIGHUP      re-read both config files; an invalid config is refused, the old kept
SIGTERM     graceful stop (SIGINT too): no new checks, the running sequence may
            finish within its timeout, workers end, pid file and socket removed;
            a cluster's leader steps down (its command ended) and resigns
SIGUSR1     reopen the log file (logrotate)
SIGCHLD     only wakes the loop; reaping is level-triggered

Files (in the state dir, default CONFIGDIR/var, or /var/lib/hadaemon; mode 0700)
-----------------------------------------------------------
hadaemon.pid       pid of the master; its flock is the one-daemon-per-state-dir lock
hadaemon.sock      the UNIX socket (mode 0600; peers of another uid are refused)
state.db.dat/.dir  the state db (``dbm.dumb``; values are JSON)
state.db.journal   the write-ahead journal that makes the db survive kill -9
hadaemon.log       the log, when daemonized with no ``log`` setting

Exit codes
----------
0 ok   1 failure or invalid config   2 usage   3 not running (``--status``, ``--rerun``)
"""
