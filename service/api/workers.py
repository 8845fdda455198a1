"""Several server processes on one port, each accepting on its own ``SO_REUSEPORT`` socket.

Why not uvicorn's ``--workers``: its workers share one listening socket, and whichever worker's loop is
idle when connections arrive accepts them. Platform clients and load balancers keep a few connections
open and re-use them, so the connections opened together at start all landed on one worker: with two
workers on this 2-core machine one did 80 % of the work (``scripts/bench_score.py``: 17 s of CPU against
4 s), and two workers served cached listings no faster than one. With a socket per worker the kernel
spreads connections over the workers by a hash of their addresses.

A worker binds its socket at start but listens only once its app has started (uvicorn creates the server
after the lifespan's start), so the kernel never hands it a connection before then. Like uvicorn's
supervisor, this one restarts a worker that dies, stops them all on SIGINT/SIGTERM (each shuts down
gracefully), restarts them one at a time on SIGHUP (the others keep serving), and gives up when workers
keep dying before their app has started (bad settings, an app that cannot load), exiting with their
status. A worker whose supervisor is gone (killed with SIGKILL) stops by itself within a second.

The port must be free when the supervisor starts: it is probed without ``SO_REUSEPORT``, so a second
supervisor, or orphans of an earlier one, are refused rather than silently sharing the connections.

Only where the platform has ``SO_REUSEPORT`` (Linux, the BSDs, macOS); elsewhere ``serve`` falls back to
uvicorn's own supervisor.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

log = logging.getLogger("counterlens.workers")

APP = "service.api.main:app_factory"
_MAX_FAILED_STARTS = 5  # workers in a row that die before their app started: give up


def reuse_port_supported() -> bool:
    return hasattr(socket, "SO_REUSEPORT")


def bind_reuse_port(host: str, port: int, *, reuse_port: bool = True) -> socket.socket:
    """A bound, not yet listening TCP socket that shares ``port`` with the other workers' sockets
    (``reuse_port=False``: one that conflicts with every listener on the port, a probe)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _exit_with_parent(parent: int) -> None:
    """Stop this worker (gracefully, SIGTERM) once its supervisor is gone: it is then re-parented."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _report_started(server: Any, started: Any) -> None:
    while not server.should_exit:
        if server.started:
            started.set()
            return
        time.sleep(0.05)


def _worker_main(app: str, host: str, port: int, uvicorn_options: dict[str, Any], parent: int,
                 started: Any, workers: int) -> None:  # a child process
    import uvicorn

    # The app's Settings read the environment: whoever built this supervisor, each worker knows how many
    # share the machine (its models take its share of the cores: service.api.main).
    os.environ["COUNTERLENS_SERVER__WORKERS"] = str(workers)

    threading.Thread(target=_exit_with_parent, args=(parent,), name="exit-with-parent", daemon=True).start()
    try:
        sock = bind_reuse_port(host, port)
    except OSError as exc:
        logging.getLogger("counterlens.workers").error("cannot bind %s:%d: %s", host, port, exc)
        raise SystemExit(3) from None
    config = uvicorn.Config(app, factory=True, host=host, port=port, **uvicorn_options)
    server = uvicorn.Server(config)
    threading.Thread(target=_report_started, args=(server, started), name="report-started", daemon=True).start()
    server.run(sockets=[sock])


@dataclass
class _Slot:
    process: BaseProcess
    started: Any  # a multiprocessing Event, set once the worker's app has started


class ReusePortSupervisor:
    """Runs ``workers`` server processes on ``host:port`` until SIGINT or SIGTERM (see the module). ``app``
    is the import path of an app factory (every worker builds its own app)."""

    def __init__(self, host: str, port: int, workers: int, *, app: str = APP, **uvicorn_options: Any) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.app, self.host, self.port, self.workers = app, host, port, workers
        self.uvicorn_options = uvicorn_options
        self._ctx = mp.get_context("spawn")  # a fresh interpreter: no threads or locks carried over
        self._stop = threading.Event()
        self._restart = threading.Event()
        self._slots: list[_Slot] = []

    def _start(self) -> _Slot:
        started = self._ctx.Event()
        p = self._ctx.Process(target=_worker_main, name="counterlens-worker", daemon=False,
                              args=(self.app, self.host, self.port, self.uvicorn_options, os.getpid(), started,
                                    self.workers))
        p.start()
        return _Slot(p, started)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            log.info("restarting the workers one at a time (SIGHUP)")
            self._restart.set()
        else:
            log.info("stopping the workers (signal %d)", signum)
            self._stop.set()

    def run(self) -> int:
        """Start the workers, keep them running, and answer the exit status."""
        # Fails (OSError) when anything listens on the port already: bound without SO_REUSEPORT, the
        # probe conflicts with every listener, ours included.
        bind_reuse_port(self.host, self.port, reuse_port=False).close()
        signals = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
        previous = {s: signal.signal(s, self._on_signal) for s in signals}
        failed_starts, status = 0, 0
        try:
            self._slots = [self._start() for _ in range(self.workers)]
            while not self._stop.wait(0.2):
                if self._restart.is_set():
                    self._restart.clear()
                    self._rolling_restart()
                for i, slot in enumerate(self._slots):
                    code = slot.process.exitcode
                    if code is None:
                        continue
                    # Dying before the app started is what bad settings or a broken app do: restarting
                    # cannot help, so after a few in a row the supervisor gives up.
                    failed_starts = 0 if slot.started.is_set() else failed_starts + 1
                    give_up = failed_starts >= _MAX_FAILED_STARTS
                    log.warning("worker %d (pid %s) exited with status %s%s", i, slot.process.pid, code,
                                "" if give_up else "; restarting it")
                    if give_up:
                        status = code if code > 0 else 1
                        self._stop.set()
                        break
                    self._slots[i] = self._start()
        finally:
            self._shutdown()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return status

    def _rolling_restart(self, timeout: float = 120.0) -> None:
        """Replace each worker in turn, starting the new one before stopping the old one (both listen on
        the port meanwhile), so some worker always accepts connections."""
        for i, old in enumerate(list(self._slots)):
            if self._stop.is_set():
                return
            new = self._start()
            deadline = time.monotonic() + timeout
            while not new.started.wait(0.2):
                if new.process.exitcode is not None or time.monotonic() > deadline or self._stop.is_set():
                    log.warning("a replacement worker did not start; keeping the old one")
                    if new.process.exitcode is None:
                        new.process.terminate()
                    new.process.join(10)
                    return
            self._slots[i] = new
            old.process.terminate()
            old.process.join(30)
            if old.process.exitcode is None:
                old.process.kill()

    def _shutdown(self, timeout: float = 30.0) -> None:
        for slot in self._slots:
            if slot.process.exitcode is None:
                slot.process.terminate()  # SIGTERM: uvicorn finishes in-flight requests
        deadline = time.monotonic() + timeout
        for slot in self._slots:
            slot.process.join(max(0.0, deadline - time.monotonic()))
            if slot.process.exitcode is None:
                slot.process.kill()
                slot.process.join(5)

    def pids(self) -> list[int]:
        return [s.process.pid for s in self._slots if s.process.pid is not None]
