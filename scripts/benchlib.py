"""What the benchmarks share: the raw throughput of the configured models, the yardstick every service
and rescan figure is reported against.

The service runs each model in its own batcher thread, side by side (``models.intra_op_threads`` shares
the cores out among them), so the raw figure is measured the same way: one thread per model, each
embedding the same photos in batches, for a fixed time. A photo is done when every model has embedded
it, so the figure is the slowest model's rate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np


def raw_model_rate(embedders: Sequence[Any], pixels: Sequence[np.ndarray], batch: int,
                   seconds: float = 8.0) -> float:
    """Photos per second through every model in ``embedders`` (objects with ``embed(list of RGB arrays)``),
    run side by side on one thread each, preprocessing included."""
    if not embedders or not pixels:
        raise ValueError("need at least one model and one photo")
    for e in embedders:
        e.embed(list(pixels[:batch]))  # warm-up: first calls allocate
    counts = [0] * len(embedders)
    start = threading.Barrier(len(embedders) + 1)
    stop_at = [0.0]

    def loop(k: int) -> None:
        e, done = embedders[k], 0
        start.wait()
        while time.perf_counter() < stop_at[0]:
            e.embed([pixels[(done + j) % len(pixels)] for j in range(batch)])
            done += batch
        counts[k] = done

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(len(embedders))]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return min(counts) / elapsed
