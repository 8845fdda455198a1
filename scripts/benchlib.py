"""What the benchmarks share: the raw throughput of the configured models, the yardstick every service
and rescan figure is reported against.

The raw figure is the highest of two arrangements, each at batches of 1, 4 and 16 photos, for a fixed
time on the same photos:

- ``side by side``: one thread per model, each embedding the photos (the service's arrangement with a
  thread a model). A photo is done when every model has embedded it, so this is the slowest model's rate,
  and a faster model's core idles part of the time.
- ``a thread a core``: one thread per core, each running every model on its photos in turn. No core
  idles whatever the models cost, so where one model costs much more than another (sscd_distilled
  5.1 ms a photo, effnet_int8 2.3 ms) this is the higher figure: 270 against 200 photos/s on the 2-core VM.

A service or rescan is held to the highest: what the models alone can do on this machine.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families


def _side_by_side(loop: Callable[[int, Callable[[], bool]], int], threads: int,
                  seconds: float) -> tuple[list[int], float]:
    """Run ``loop(k, running)`` in ``threads`` threads started together, for ``seconds``: each loop
    works while ``running()`` and answers how many photos it did. Answers the counts and the time."""
    counts = [0] * threads
    start = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def run(k: int) -> None:
        start.wait()
        counts[k] = loop(k, lambda: time.perf_counter() < stop_at[0])

    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for t in workers:
        t.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    start.wait()
    for t in workers:
        t.join()
    return counts, time.perf_counter() - t0


SIDE_BY_SIDE = "side by side"
A_THREAD_A_CORE = "a thread a core"
RAW_ARRANGEMENTS = (SIDE_BY_SIDE, A_THREAD_A_CORE)


def raw_model_rate(embedders: Sequence[Any], pixels: Sequence[np.ndarray], batch: int,
                   seconds: float = 8.0, arrangement: str = SIDE_BY_SIDE, cores: int | None = None) -> float:
    """Photos per second through every model in ``embedders`` (objects with ``embed(list of RGB arrays)``),
    preprocessing included, in batches of ``batch``: ``side by side`` (a thread per model) or ``a thread
    a core`` (``cores`` threads, default one per CPU this process may run on, each running every model in
    turn); see the module docstring. The models are used as built: the service's own (ONNX Runtime
    threads = cores / models) suit both arrangements on two cores; on more, a thread a core oversubscribes
    them and reads low, and the side-by-side figure is then the higher one."""
    if not embedders or not pixels:
        raise ValueError("need at least one model and one photo")
    if arrangement not in RAW_ARRANGEMENTS:
        raise ValueError(f"arrangement must be one of {RAW_ARRANGEMENTS}, got {arrangement!r}")
    for e in embedders:
        e.embed(list(pixels[:batch]))  # warm-up: first calls allocate

    def photos(k: int, done: int) -> list[np.ndarray]:
        return [pixels[(k * 7919 + done + j) % len(pixels)] for j in range(batch)]

    def one_model(k: int, running: Callable[[], bool]) -> int:
        done = 0
        while running():
            embedders[k].embed(photos(0, done))
            done += batch
        return done

    def every_model(k: int, running: Callable[[], bool]) -> int:
        done = 0
        while running():
            ims = photos(k, done)  # (threads start apart in the photos: not all on the same one)
            for e in embedders:
                e.embed(ims)
            done += batch
        return done

    if arrangement == SIDE_BY_SIDE:
        counts, elapsed = _side_by_side(one_model, len(embedders), seconds)
        return min(counts) / elapsed
    counts, elapsed = _side_by_side(every_model, cores or len(os.sched_getaffinity(0)), seconds)
    return sum(counts) / elapsed


def raw_model_rates(embedders: Sequence[Any], pixels: Sequence[np.ndarray], batches: Sequence[int],
                    seconds: float = 4.0) -> dict[str, float]:
    """:func:`raw_model_rate` in each arrangement at each batch size in ``batches``, by a label such as
    ``"a thread a core, batch 4"``. The best of them is what the models can do: on a small CPU, batches
    are not cheaper a photo (effnet 4.4 ms alone, 5.6 ms in batches of 16 on the 2-core VM: its
    activations outgrow the caches), so a fixed large batch understates it, and so does one arrangement."""
    return {f"{how}, batch {b}": raw_model_rate(embedders, pixels, b, seconds, how)
            for how in RAW_ARRANGEMENTS for b in batches}


RAW_BATCHES = (1, 4, 16)


def best_raw_model_rate(embedders: Sequence[Any], pixels: Sequence[np.ndarray],
                        batches: Sequence[int] = RAW_BATCHES, seconds: float = 4.0) -> tuple[float, str]:
    """The highest of :func:`raw_model_rates` and the label of the arrangement and batch that gave it: the
    figure a benchmark holds the service or a rescan to (the strictest one)."""
    rates = raw_model_rates(embedders, pixels, batches, seconds)
    how = max(rates, key=lambda k: rates[k])
    return rates[how], how


def raw_work_rate(work: Callable[[], Callable[[np.ndarray], object]], pixels: Sequence[np.ndarray],
                  threads: int = 2, seconds: float = 4.0) -> float:
    """Photos per second through one piece of per-photo work (keypoint verification, OCR) alone, on
    ``threads`` threads at once (the service runs the cascade's expensive signals on a pool of two).
    ``work()`` is called once per thread and answers the function that thread runs on each photo (a
    reader per thread, where the work is not thread-safe)."""
    if not pixels or threads < 1:
        raise ValueError("need at least one photo and one thread")
    fns = [work() for _ in range(threads)]
    fns[0](pixels[0])  # warm-up: the first call loads and allocates

    def loop(k: int, running: Callable[[], bool]) -> int:
        done = 0
        while running():
            fns[k](pixels[(k + done * threads) % len(pixels)])
            done += 1
        return done

    counts, elapsed = _side_by_side(loop, threads, seconds)
    return sum(counts) / elapsed


@dataclass(frozen=True, slots=True)
class ServerCounters:
    """The counters of a counterlens server's ``/metrics`` that a benchmark takes the difference of over a
    phase (one worker process's, where it has several)."""

    signals: dict[str, float]  # expensive signals run (counterlens_signals_run_total), by signal
    model_busy_s: dict[str, float]  # wall seconds each model's thread spent in model calls, by model
    model_cpu_s: dict[str, float]  # CPU seconds of each model's thread in those calls, by model
    # The scoring queue's batches and the listings in them (counterlens_score_batches_total,
    # counterlens_score_batched_listings_total): a batch's storage and search cost is largely per batch.
    score_batches: float = 0.0
    score_listings: float = 0.0

    @property
    def model_cpu_total_s(self) -> float:
        return sum(self.model_cpu_s.values())


def server_counters(metrics_text: str) -> ServerCounters:
    """:class:`ServerCounters` from the Prometheus text of ``/metrics`` (prometheus_client's own parser)."""
    got = ServerCounters(signals={}, model_busy_s={}, model_cpu_s={})
    wanted = {"counterlens_signals_run_total": ("signal", got.signals),
              "counterlens_model_busy_seconds_total": ("model", got.model_busy_s),
              "counterlens_model_cpu_seconds_total": ("model", got.model_cpu_s)}
    queue = {"counterlens_score_batches_total": 0.0, "counterlens_score_batched_listings_total": 0.0}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in wanted:
                label, into = wanted[sample.name]
                into[sample.labels[label]] = float(sample.value)
            elif sample.name in queue:
                queue[sample.name] = float(sample.value)
    return replace(got, score_batches=queue["counterlens_score_batches_total"],
                   score_listings=queue["counterlens_score_batched_listings_total"])
