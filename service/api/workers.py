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
gracefully), and gives up when workers keep dying right after they start (bad settings, a port taken by
another user's socket), exiting with their status.

Only where the platform has ``SO_REUSEPORT`` (Linux, the BSDs, macOS); elsewhere ``serve`` falls back to
uvicorn's own supervisor.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

log = logging.getLogger("counterlens.workers")

APP = "service.api.main:app_factory"
_QUICK_DEATH_S = 10.0  # a worker that dies this soon after its start counts towards giving up
_MAX_QUICK_DEATHS = 5


def reuse_port_supported() -> bool:
    return hasattr(socket, "SO_REUSEPORT")


def bind_reuse_port(host: str, port: int) -> socket.socket:
    """A bound, not yet listening TCP socket that shares ``port`` with the other workers' sockets."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _worker_main(app: str, host: str, port: int, uvicorn_options: dict[str, Any]) -> None:  # a child process
    import uvicorn

    try:
        sock = bind_reuse_port(host, port)
    except OSError as exc:
        logging.getLogger("counterlens.workers").error("cannot bind %s:%d: %s", host, port, exc)
        raise SystemExit(3) from None
    config = uvicorn.Config(app, factory=True, host=host, port=port, **uvicorn_options)
    uvicorn.Server(config).run(sockets=[sock])


@dataclass
class _Slot:
    process: BaseProcess
    started: float = field(default_factory=time.monotonic)


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
        self._slots: list[_Slot] = []

    def _start(self) -> _Slot:
        p = self._ctx.Process(target=_worker_main, args=(self.app, self.host, self.port, self.uvicorn_options),
                              name="counterlens-worker", daemon=False)
        p.start()
        return _Slot(p)

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("stopping the workers (signal %d)", signum)
        self._stop.set()

    def run(self) -> int:
        """Start the workers, keep them running, and answer the exit status."""
        # Fails here, in the supervisor, when the port cannot be had at all (taken by another program).
        bind_reuse_port(self.host, self.port).close()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        quick_deaths, status = 0, 0
        try:
            self._slots = [self._start() for _ in range(self.workers)]
            while not self._stop.wait(0.5):
                for i, slot in enumerate(self._slots):
                    code = slot.process.exitcode
                    if code is None:
                        continue
                    quick = time.monotonic() - slot.started < _QUICK_DEATH_S
                    quick_deaths = quick_deaths + 1 if quick else 0
                    log.warning("worker %d (pid %s) exited with status %s%s", i, slot.process.pid, code,
                                "; restarting it" if quick_deaths < _MAX_QUICK_DEATHS else "")
                    if quick_deaths >= _MAX_QUICK_DEATHS:
                        status = code or 1
                        self._stop.set()
                        break
                    self._slots[i] = self._start()
        finally:
            self._shutdown()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return status

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
