"""The Ray engine of ``counterlens rescan --engine ray``: the same per-listing work as the local engine
(:class:`~service.usecases.rescan.ListingRescanner`, i.e. ``ListingScorer.score``) run by a pool of Ray
Data actors, so a file of millions of listings spreads over a cluster.

Pipeline (one Ray Data dataset per chunk of ``chunk_rows`` validated rows, so the driver's memory stays
bounded whatever the file size)::

    driver: read + validate rows (bad lines -> errors journal)   # cheap, keeps line numbers exact
      -> ray.data.from_items(rows as JSON)
      -> map_batches(ScoringActor, concurrency=actors)           # each actor builds its own container
                                                                 # from the driver's Settings: models
                                                                 # load once per actor; photos decoded,
                                                                 # embedded in shared micro-batches
                                                                 # (threads inside the actor), matched,
                                                                 # fused and stored
      -> iter_batches() back in the driver, in input order      # preserve_order
    driver: results/errors journals (one merged RESULTS.jsonl, resumable like a local run)

Every actor writes its scores to the database named by the Settings: SQLite works for the actors of one
machine (WAL, busy timeout, one short transaction per listing); a cluster needs PostgreSQL and the data
dir (models, indexes) plus the listings' photos on a filesystem every node mounts at the same path.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from service.settings import Settings
from service.usecases.rescan import ListingRescanner, RowOutcome, ThreadedEngine
from service.usecases.rescan_io import ListingRow

log = logging.getLogger("counterlens.rescan.ray")


class ScoringActor:
    """A Ray Data actor: one container (models, indexes, database) per actor, built from the driver's
    Settings; scores each batch on a few threads so their photos share model batches."""

    def __init__(self, settings_json: dict[str, Any], base: str, threads: int) -> None:
        from service.container import build_container

        self.container = build_container(Settings(**settings_json), reconcile=False)
        rescanner = ListingRescanner(self.container.scorer, self.container.images, Path(base))
        self.engine = ThreadedEngine(rescanner, workers=threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = (ListingRow.from_json(json.loads(s)) for s in batch["row"])
        outcomes = [json.dumps(o.to_json()) for o in self.engine.process(rows)]
        return {"outcome": np.array(outcomes, dtype=object)}

    def __del__(self) -> None:
        container = getattr(self, "container", None)
        if container is not None:
            container.close()


class RayEngine:
    """Scores rows on a Ray cluster (``address``: ``ray://host:10001``, ``auto``, or None for the running
    instance or a new local one) with ``actors`` scoring actors of ``actor_cpus``/``actor_gpus`` each."""

    def __init__(self, settings: Settings, base: Path, *, address: str | None = None,
                 actors: int | None = None, actor_cpus: float = 1.0, actor_gpus: float = 0.0,
                 threads_per_actor: int = 4, batch_size: int = 32, chunk_rows: int = 20_000) -> None:
        if actors is not None and actors < 1:
            raise ValueError("actors must be >= 1")
        if actor_cpus <= 0 or actor_gpus < 0 or threads_per_actor < 1 or batch_size < 1 or chunk_rows < 1:
            raise ValueError("actor_cpus must be > 0, actor_gpus >= 0, the others >= 1")
        models = settings.models
        # Each actor's ONNX Runtime gets the cores the actor reserved (0 would take every core of the node
        # in every actor), and its shared model threads too; a GPU actor runs its models on CUDA.
        if actor_gpus > 0 and models.provider == "cpu":
            models = models.model_copy(update={"provider": "cuda"})
        if models.intra_op_threads == 0:
            models = models.model_copy(update={"intra_op_threads": max(1, math.ceil(actor_cpus))})
        models = models.for_cores(max(1, math.floor(actor_cpus)), 1)
        self.settings = settings.model_copy(update={"models": models})
        self.base = base.resolve()
        self.address = address
        self.actors = actors
        self.actor_cpus = actor_cpus
        self.actor_gpus = actor_gpus
        self.threads_per_actor = threads_per_actor
        self.batch_size = batch_size
        self.chunk_rows = chunk_rows
        self._started_ray = False

    def start(self) -> int:
        """Connect to (or start) Ray; returns the number of actors to use."""
        import ray

        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=True)
            else:
                ray.init(include_dashboard=False, logging_level=logging.WARNING)
            self._started_ray = True
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # results come back in input order
        ctx.enable_progress_bars = False  # the CLI draws its own bar
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        if self.actors is None:
            cpus = float(ray.cluster_resources().get("CPU", 1.0))  # type: ignore[no-untyped-call]
            self.actors = max(1, int(cpus // self.actor_cpus) - 1) if cpus > self.actor_cpus else 1
        return self.actors

    def process(self, rows: Iterator[ListingRow]) -> Iterator[RowOutcome]:
        import ray

        actors = self.start()
        settings_json = self.settings.model_dump(mode="json")
        while True:
            chunk = list(islice(rows, self.chunk_rows))
            if not chunk:
                return
            items = [{"row": json.dumps(r.to_json())} for r in chunk]
            blocks = max(1, min(len(items), math.ceil(len(items) / self.batch_size)))
            ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
                ScoringActor, batch_size=self.batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=self.actor_cpus, num_gpus=self.actor_gpus or None,
                fn_constructor_kwargs={"settings_json": settings_json, "base": str(self.base),
                                       "threads": self.threads_per_actor})
            for batch in ds.iter_batches(batch_size=self.batch_size, batch_format="numpy"):
                for s in batch["outcome"]:
                    yield RowOutcome.from_json(json.loads(s))

    def close(self) -> None:
        import ray

        if self._started_ray and ray.is_initialized():
            ray.shutdown()
