"""The application of test_stack.py: commits numbered rows through pgbouncer and logs each acknowledged one.

    python3 stack_writer.py HOST PORT DATABASE USER FIRST STEP LOG [TIMEOUT]

Run inside the app host's network namespace.  It speaks the PostgreSQL wire
protocol (version 3, trust authentication) itself, over one connection at a time,
as an application with a connection pool would: one ``INSERT ... RETURNING`` per
transaction (autocommit), a new number for every attempt (FIRST, FIRST + STEP,
...), and on any error or lost connection a new connection at once.  A row is
acknowledged when its CommandComplete arrives: the COMMIT returned (under
synchronous replication, the standby has it).  Each event is one line of LOG,
flushed at once, wall-clock seconds:

    ack N TIME SERVER      row N acknowledged by SERVER (its cluster_name)
    err TIME WHAT          an attempt or a connection failed
    conn TIME              a connection is up (logged in, ready)

TIMEOUT (default 5) is how many seconds an answer may take before the connection
counts as lost: an application's own patience.  It stops on SIGTERM.
"""

import signal
import socket
import struct
import sys
import time

TIMEOUT = 5.0           # default seconds an answer may take before the connection counts as lost


class Failed(Exception):
    pass


def read_message(f):
    head = f.read(5)
    if len(head) < 5:
        raise Failed("connection closed")
    kind, length = head[:1], struct.unpack("!i", head[1:])[0]
    body = f.read(length - 4)
    if len(body) < length - 4:
        raise Failed("connection closed")
    return kind, body


def error_text(body):
    fields = dict((part[:1], part[1:].decode(errors="replace")) for part in body.split(b"\0") if part)
    return "%s: %s" % (fields.get(b"C", "?"), fields.get(b"M", "?"))


def connect(host, port, database, user, timeout):
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.settimeout(timeout)
    params = b"".join(k + b"\0" + v + b"\0" for k, v in (
        (b"user", user.encode()), (b"database", database.encode()),
        (b"application_name", b"stack_writer"))) + b"\0"
    body = struct.pack("!i", 196608) + params
    sock.sendall(struct.pack("!i", len(body) + 4) + body)
    f = sock.makefile("rb")
    while True:
        kind, body = read_message(f)
        if kind == b"R" and struct.unpack("!i", body[:4])[0] != 0:
            raise Failed("authentication %d asked: trust expected" % struct.unpack("!i", body[:4])[0])
        if kind == b"E":
            raise Failed(error_text(body))
        if kind == b"Z":
            return sock, f


def insert(sock, f, n):
    """One row in one transaction; (n, server) once acknowledged, else Failed."""
    sql = b"INSERT INTO ha_rows (n) VALUES (%d) RETURNING n, server\0" % n
    sock.sendall(b"Q" + struct.pack("!i", len(sql) + 4) + sql)
    row, done, error = None, False, None
    while True:
        kind, body = read_message(f)
        if kind == b"D":
            cols, pos, row = struct.unpack("!h", body[:2])[0], 2, []
            for _ in range(cols):
                size = struct.unpack("!i", body[pos:pos + 4])[0]
                row.append(body[pos + 4:pos + 4 + size].decode())
                pos += 4 + size
        elif kind == b"C":
            done = body.startswith(b"INSERT 0 1")
        elif kind == b"E":
            error = error_text(body)
        elif kind == b"Z":
            if error or not done or row is None or row[0] != str(n):
                raise Failed(error or "no acknowledgement")
            return row[1]


def main():
    host, port, database, user, first, step, log_path = sys.argv[1:8]
    timeout = float(sys.argv[8]) if len(sys.argv) > 8 else TIMEOUT
    port, n, step = int(port), int(first), int(step)

    def stop(signum, frame):
        raise SystemExit(0)     # at once, even inside a blocked read
    signal.signal(signal.SIGTERM, stop)
    log = open(log_path, "a", buffering=1)
    sock = f = None
    last_failed = 0.0
    while True:
        try:
            if sock is None:
                if time.time() - last_failed < 0.01:
                    time.sleep(0.01)        # a refused connection must not spin
                sock, f = connect(host, port, database, user, timeout)
                log.write("conn %.6f\n" % time.time())
            server = insert(sock, f, n)
            log.write("ack %d %.6f %s\n" % (n, time.time(), server))
        except (OSError, Failed, ValueError, struct.error) as exc:
            last_failed = time.time()
            log.write("err %.6f %s\n" % (last_failed, str(exc).replace("\n", " ")))
            if sock is not None:
                sock.close()
            sock = f = None
        n += step


if __name__ == "__main__":
    main()
