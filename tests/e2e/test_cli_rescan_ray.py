"""``counterlens rescan --engine ray`` on a local Ray instance gives the local engine's results."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.container import build_container
from tests.usecases.rescan_world import (
    World,
    assert_same_results,
    engine_rows,
    env,
    fresh_data_dir,
    listing,
    listings_dir,
    read_jsonl,
    settings,
    write_jsonl,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import logging

    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


def test_the_ray_engine_gives_the_local_engines_results(rescan_world: World, local_ray: None,
                                                        tmp_path: Path) -> None:
    w = rescan_world
    folder = listings_dir(w, tmp_path / "in")
    rows = [*engine_rows(w, instore=6), "{broken", listing("missing", "nope.jpg")]
    src = write_jsonl(folder / "listings.jsonl", rows)

    results = {}
    for engine in ("local", "ray"):
        data = fresh_data_dir(w, tmp_path / f"data-{engine}")
        out = tmp_path / f"{engine}.jsonl"
        r = CliRunner().invoke(app, ["rescan", str(src), "--out", str(out), "--engine", engine],
                               env=env(data), catch_exceptions=False)
        assert r.exit_code == 0, r.output
        results[engine] = read_jsonl(out)
        errors = read_jsonl(tmp_path / f"{engine}.errors.jsonl")
        assert sorted((e["line"], e["code"]) for e in errors) == [(11, "invalid_line"), (12, "fetch_failed")]
        # The actors stored their scores in the data dir's database, as the local engine does.
        c = build_container(settings(data), embedders=w.embedders, reconcile=False)
        try:
            stored = c.listings.get_listing("store-0")
            assert stored is not None and c.listings.history("store-0")[0].source.value == "rescan"
        finally:
            c.close()

    assert [r["listing_id"] for r in results["ray"]] == [r["listing_id"] for r in results["local"]]
    assert len(results["ray"]) == 10
    assert any(r["verdict"] != "clear" for r in results["ray"])
    assert_same_results(results["local"], results["ray"])


def test_each_actor_sizes_its_models_by_the_cores_it_reserved(tmp_path: Path) -> None:
    """An actor's ONNX Runtime threads are the cores it reserved, its shared model threads as many as those
    hold; a GPU actor runs its models on CUDA (a thread of its own each); numbers set hold."""
    from service.settings import Settings
    from service.usecases.rescan_ray import RayEngine

    s = Settings(data_dir=tmp_path, models={"ocr": "never"})
    got = [(m.provider, m.intra_op_threads, m.shared_threads) for m in (
        RayEngine(s, tmp_path, actor_cpus=cpus, actor_gpus=gpus).settings.models
        for cpus, gpus in ((1.0, 0.0), (0.5, 0.0), (4.0, 0.0), (1.0, 1.0)))]
    assert got == [("cpu", 1, 1), ("cpu", 1, 1), ("cpu", 4, 1), ("cuda", 1, "auto")]
    fixed = Settings(data_dir=tmp_path, models={"ocr": "never", "intra_op_threads": 2, "shared_threads": 3})
    m = RayEngine(fixed, tmp_path, actor_cpus=1.0).settings.models
    assert (m.intra_op_threads, m.shared_threads, m.process_cores) == (2, 3, 1)
