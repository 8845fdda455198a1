"""The benchmarks' reading of a server's /metrics: the text the app's own registry writes, parsed back."""

from __future__ import annotations

from prometheus_client import generate_latest

from scripts.benchlib import server_counters
from service.api.metrics import Metrics, ModelTimeCollector, ScoreQueueCollector
from service.usecases.embedding import ModelTime
from service.usecases.score_queue import QueueStats


def test_server_counters_reads_the_signals_and_each_models_time_from_the_apps_metrics() -> None:
    metrics = Metrics()
    metrics.registry.register(ModelTimeCollector(lambda: {"sscd_distilled": ModelTime(busy_s=12.5, cpu_s=10.25),
                                                          "effnet": ModelTime(busy_s=9.0, cpu_s=8.5)}))
    metrics.signals_run.labels("ocr").inc(3)
    metrics.signals_run.labels("keypoints").inc(7)
    # Same label name, other metrics: not to be mixed in.
    metrics.embedded_images.labels("sscd_distilled@abc").inc(99)
    metrics.cache_hits.labels("effnet@def").inc(5)

    got = server_counters(generate_latest(metrics.registry).decode())

    assert got.signals == {"ocr": 3.0, "keypoints": 7.0}
    assert got.model_busy_s == {"sscd_distilled": 12.5, "effnet": 9.0}
    assert got.model_cpu_s == {"sscd_distilled": 10.25, "effnet": 8.5}
    assert got.model_cpu_total_s == 18.75


def test_server_counters_of_a_server_that_has_scored_nothing_yet() -> None:
    metrics = Metrics()
    metrics.registry.register(ModelTimeCollector(lambda: None))  # models not loaded yet

    got = server_counters(generate_latest(metrics.registry).decode())

    assert got.signals == {} and got.model_busy_s == {} and got.model_cpu_s == {}
    assert got.model_cpu_total_s == 0.0
    assert got.score_batches == 0.0 and got.score_listings == 0.0


def test_server_counters_reads_the_scoring_queues_batches_and_listings() -> None:
    metrics = Metrics()
    metrics.registry.register(ScoreQueueCollector(
        lambda: QueueStats(batches=40, listings=170, refused=2, waiting=5, slow_backlog=1)))

    got = server_counters(generate_latest(metrics.registry).decode())

    assert (got.score_batches, got.score_listings) == (40.0, 170.0)  # 4.25 listings a batch
