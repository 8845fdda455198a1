"""The process engine of ``counterlens rescan LISTINGS --processes N``: the local engine's work
(:class:`~service.usecases.rescan.ListingRescanner` on a :class:`~service.usecases.rescan.ThreadedEngine`'s
threads) in N worker processes, so a file rescan uses every core for its Python too.

Why processes: scoring a listing whose photos are already embedded (a cached rescan) is Python
(probing and hashing the photos, matching, fusion, the score's write), so the threads of one process
share one core whatever their number. Each worker process builds its own container from the driver's
Settings (models, indexes, database connections) and scores the chunks of rows the driver sends it;
the driver keeps the parts that must stay single (reading and validating the file, the results and
errors journals, the checkpoint, Ctrl-C), exactly as with the threaded and the Ray engines::

    driver: read + validate rows -> chunks -> the least busy worker        (a pipe each)
    worker k: chunk -> ListingRescanner.rescan_many on its threads -> outcomes back
    driver: outcomes in input order -> journals (resumable as a local run)

Workers are started with ``spawn`` (a fresh interpreter): the driver may hold model and database
threads (the CLI reconciles the catalog first; a test process holds many), and a forked copy of a lock
one of them held would never be released. Worker 0 builds its container first and reconciles the
indexes with the database if needed; the others wait for it and then load what it left. Workers ignore
SIGINT: the driver decides when to stop and tells them. A worker that dies fails the run with
:class:`RescanWorkerError` (the journals keep what was finished: ``--resume`` continues).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, cast

from service.settings import Settings
from service.usecases.rescan import ListingRescanner, RescanWorkerError, RowOutcome, default_chunk
from service.usecases.rescan_io import ListingRow

log = logging.getLogger("counterlens.rescan.processes")


def _worker_main(conn: Connection) -> None:
    """A worker process: build a container from the settings the driver sends, then score the chunks
    that arrive until told to stop (or the driver is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    from service.container import build_container  # the slow imports, while worker 0 may still load

    try:
        config = conn.recv()
    except EOFError:
        return
    if config is None:  # stopped before it was configured (another worker failed to start)
        return
    settings, base, threads, reconcile = config
    try:
        container = build_container(settings, reconcile=reconcile)
        rescanner = ListingRescanner(container.scorer, container.images, Path(base))
    except BaseException:
        conn.send(("failed", traceback.format_exc()))
        # The driver prints the traceback in its error; raising it here printed it a second time.
        raise SystemExit(1) from None
    conn.send(("ready", os.getpid()))
    send_lock = threading.Lock()

    def score(seq: int, rows: list[ListingRow]) -> None:
        try:
            got = rescanner.rescan_many(rows)  # never raises for a listing's failure
        except BaseException as exc:
            log.exception("scoring a chunk failed")
            got = [RowOutcome.failed(r.line, r.listing_id, "internal", f"{type(exc).__name__}: {exc}", None)
                   for r in rows]
        with send_lock:
            conn.send(("done", seq, got))

    pool = ThreadPoolExecutor(threads, thread_name_prefix="rescan")
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # the driver is gone
                break
            if msg is None:
                break
            pool.submit(score, *msg)
    finally:
        # Chunks not started yet are dropped: the driver stopped and will not read their outcomes.
        pool.shutdown(wait=True, cancel_futures=True)
        container.close()


class ProcessEngine:
    """Scores rows in ``processes`` worker processes of ``threads`` scoring threads each, ``chunk`` rows a
    message (default :func:`~service.usecases.rescan.default_chunk`), at most ``window`` chunks in flight
    per worker. Outcomes leave in input order.

    ``start`` (or the first ``process``) launches the workers and waits until each has loaded its models;
    ``close`` stops them. One ``process`` call at a time."""

    def __init__(self, settings: Settings, base: Path, *, processes: int, threads: int = 4,
                 chunk: int | None = None, window: int | None = None, start_timeout: float = 600.0) -> None:
        chunk = default_chunk(processes) if chunk is None else chunk
        if processes < 1 or threads < 1 or chunk < 1:
            raise ValueError("processes, threads and chunk must be >= 1")
        # Each worker's models get its share of the cores (0 would give every worker all of them; one
        # core, one model thread).
        from service.container import process_share

        settings = process_share(settings, processes)
        self.settings = settings
        self.base = base.resolve()
        self.processes = processes
        self.threads = threads
        self.chunk = chunk
        self.window = window or threads * 2
        self.start_timeout = start_timeout
        self._procs: list[subprocess.Popen[bytes]] = []
        self._conns: list[Connection] = []

    def start(self) -> int:
        """Launch the workers (if not yet) and wait until every one is ready; returns their number.
        Worker 0 builds its container (and reconciles) first; the others import meanwhile."""
        if self._procs:
            return len(self._procs)
        try:
            for _ in range(self.processes):
                mine, theirs = socket.socketpair()
                with theirs:
                    # A fresh interpreter (not fork, not multiprocessing's spawn, which re-runs the
                    # caller's __main__): ``python -m`` this module, talking over its end of the pair.
                    proc = subprocess.Popen([sys.executable, "-m", __name__, str(theirs.fileno())],
                                            pass_fds=(theirs.fileno(),), start_new_session=True)
                self._procs.append(proc)
                self._conns.append(Connection(mine.detach()))
            self._configure(0, reconcile=True)
            self._ready(0)
            for k in range(1, self.processes):
                self._configure(k, reconcile=False)
            for k in range(1, self.processes):
                self._ready(k)
        except BaseException:
            self.close()
            raise
        return len(self._procs)

    def _configure(self, k: int, *, reconcile: bool) -> None:
        self._send(k, (self.settings, str(self.base), self.threads, reconcile))

    def _ready(self, k: int) -> None:
        if not self._conns[k].poll(self.start_timeout):
            raise RescanWorkerError(f"rescan worker {k} did not start within {self.start_timeout:.0f} s")
        msg = self._recv(k)
        if msg[0] != "ready":
            raise RescanWorkerError(f"rescan worker {k} failed to start:\n{msg[1]}")

    def _send(self, k: int, msg: Any) -> None:
        try:
            self._conns[k].send(msg)
        except OSError:  # BrokenPipeError, ConnectionResetError: it is gone
            raise self._died(k) from None

    def _recv(self, k: int) -> Any:
        try:
            return self._conns[k].recv()
        except (EOFError, OSError):
            raise self._died(k) from None

    def _died(self, k: int) -> RescanWorkerError:
        try:
            code = self._procs[k].wait(5)
        except subprocess.TimeoutExpired:
            code = None
        return RescanWorkerError(f"rescan worker {k} died (exit code {code}); the finished listings are "
                                 "journaled: --resume continues")

    def process(self, rows: Iterator[ListingRow]) -> Iterator[RowOutcome]:
        self.start()
        n = len(self._conns)
        in_flight = [0] * n
        owner: dict[int, int] = {}
        done: dict[int, list[RowOutcome]] = {}
        sent = emitted = 0
        exhausted = False
        while True:
            # Keep every worker's window full, the least busy first (a worker slowed by a big chunk
            # gets fewer).
            while not exhausted:
                k = min(range(n), key=in_flight.__getitem__)
                if in_flight[k] >= self.window:
                    break
                chunk = list(islice(rows, self.chunk))
                if not chunk:
                    exhausted = True
                    break
                self._send(k, (sent, chunk))
                owner[sent] = k
                in_flight[k] += 1
                sent += 1
            while emitted in done:
                yield from done.pop(emitted)
                emitted += 1
            if exhausted and emitted == sent:
                return
            for ready in wait(self._conns):
                k = self._conns.index(cast(Connection, ready))
                msg = self._recv(k)
                if msg[0] == "done":
                    seq, outcomes = msg[1], msg[2]
                    done[seq] = outcomes
                    in_flight[owner.pop(seq)] -= 1

    def close(self, timeout: float = 30.0) -> None:
        """Stop the workers: each finishes the chunks at hand, drops what is queued, closes its container.
        Their last outcomes are read and dropped meanwhile (a worker blocked writing to a full pipe would
        never get to stop)."""
        for conn in self._conns:
            with contextlib.suppress(OSError):  # already gone
                conn.send(None)
        open_conns = list(self._conns)
        deadline = time.monotonic() + timeout
        while open_conns and time.monotonic() < deadline:
            for ready in wait(open_conns, timeout=0.2):
                conn = cast(Connection, ready)
                try:
                    conn.recv()
                except (EOFError, OSError):  # it exited
                    open_conns.remove(conn)
        for proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("a rescan worker did not stop in time: killing it", extra={"pid": proc.pid})
                proc.kill()
                proc.wait(5)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    def __enter__(self) -> ProcessEngine:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    _worker_main(Connection(int(sys.argv[1])))
