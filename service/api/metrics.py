"""Prometheus metrics of one app instance (its own registry, so tests can build many apps)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from service.usecases.embedding import ModelTime
from service.usecases.score_queue import QueueStats


class ModelTimeCollector(Collector):
    """The image models' time in model calls, read from their batcher threads at each scrape: how busy
    each model is, and how much of the process's CPU is the models' own work."""

    def __init__(self, read: Callable[[], Mapping[str, ModelTime] | None]) -> None:
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        busy = CounterMetricFamily("counterlens_model_busy_seconds",
                                   "Wall seconds a model's threads spent in model calls (summed over its "
                                   "threads: on the CPU the models share theirs)", labels=["model"])
        cpu = CounterMetricFamily("counterlens_model_cpu_seconds",
                                  "CPU seconds of a model's threads in model calls (preprocessing included; "
                                  "ONNX Runtime's own pool threads are not counted when it has more than one)",
                                  labels=["model"])
        prefetched = CounterMetricFamily("counterlens_model_prefetched_photos",
                                         "Photos handed to a model as their request was queued", labels=["model"])
        withdrawn = CounterMetricFamily("counterlens_model_withdrawn_photos",
                                        "Prefetched photos withdrawn unrun because the embedding store had "
                                        "them (another process embedded them)", labels=["model"])
        for name, t in (self._read() or {}).items():
            busy.add_metric([name], t.busy_s)
            cpu.add_metric([name], t.cpu_s)
            prefetched.add_metric([name], t.prefetched)
            withdrawn.add_metric([name], t.withdrawn)
        yield from (busy, cpu, prefetched, withdrawn)


class ScoreQueueCollector(Collector):
    """The scoring queue's counters and depth, read at each scrape: how large the model batches are
    (listings / batches), how many requests wait, and how many an overload refused."""

    def __init__(self, read: Callable[[], QueueStats | None]) -> None:
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        q = self._read()
        if q is None:  # not started: no request scored yet
            return
        yield CounterMetricFamily("counterlens_score_batches", "Batches the scoring queue prepared together",
                                  value=q.batches)
        yield CounterMetricFamily("counterlens_score_batched_listings", "Listings in those batches",
                                  value=q.listings)
        yield CounterMetricFamily("counterlens_score_refused", "Score requests refused with 503: the queue was full",
                                  value=q.refused)
        yield GaugeMetricFamily("counterlens_score_queue_waiting", "Listings waiting in the scoring queue",
                                value=q.waiting)
        yield GaugeMetricFamily("counterlens_score_slow_backlog",
                                "Listings in the slow pool (an expensive signal running or waiting)",
                                value=q.slow_backlog)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("counterlens_http_requests_total", "HTTP requests",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("counterlens_http_request_seconds", "HTTP request latency",
                                 ["method", "route"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.verdicts = Counter("counterlens_verdicts_total", "Scored listings by verdict", ["verdict"],
                                registry=r)
        self.embedded_images = Counter("counterlens_embedded_images_total",
                                       "Images run through a model (cache misses)", ["model"], registry=r)
        self.cache_hits = Counter("counterlens_embedding_cache_hits_total",
                                  "Images whose embedding came from the cache", ["model"], registry=r)
        # How often the cascade runs each expensive signal (keypoints, logo_crops, logo_templates, ocr):
        # what the scored traffic costs beyond the embeddings (scripts/bench_score.py reads it).
        self.signals_run = Counter("counterlens_signals_run_total",
                                   "Scored listings on which an expensive signal ran", ["signal"], registry=r)
        self.ready = Gauge("counterlens_ready", "1 once models and indexes are loaded", registry=r)
        self.index_size = Gauge("counterlens_index_vectors", "Vectors per reference index",
                                ["index"], registry=r)
