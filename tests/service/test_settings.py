"""Settings: environment names, nested groups, validation with clear errors (also through the CLI)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings
from tests.conftest import REPO_ROOT


def test_env_prefix_and_nested_groups(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COUNTERLENS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("COUNTERLENS_SCORING__REVIEW_THRESHOLD", "0.4")
    monkeypatch.setenv("COUNTERLENS_MODELS__COPY_MODEL", "sscd")
    monkeypatch.setenv("COUNTERLENS_SCORING__CURRENCY_RATES", '{"usd": 1, "eur": 0.9}')
    monkeypatch.setenv("COUNTERLENS_LOGO_TEMPLATES__MODE", "always")
    s = Settings()
    assert s.logo_templates.mode == "always"
    assert s.data_dir == tmp_path
    assert s.scoring.review_threshold == 0.4 and s.models.copy_model == "sscd"
    assert s.scoring.currency_rates == {"USD": 1.0, "EUR": 0.9}
    assert s.database_url == f"sqlite:///{tmp_path / 'counterlens.sqlite3'}"


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"scoring": {"review_threshold": 0.9, "likely_threshold": 0.5}}, "must not exceed"),
    ({"scoring": {"currency_rates": {"EUR": 0.9}}}, "must contain USD"),
    ({"scoring": {"currency_rates": {"USD": 1, "EUR": 0}}}, "must be positive"),
    ({"models": {"provider": "tpu"}}, "provider"),
    ({"server": {"port": 70000}}, "port"),
    ({"logo_templates": {"min_width": 0.5, "max_width": 0.4}}, "min_width must be below"),
    ({"logo_templates": {"mode": "sometimes"}}, "mode"),
    ({"models": {"ocr_max_lines": -1}}, "ocr_max_lines"),
    ({"models": {"ocr_threads": -1}}, "ocr_threads"),
    ({"server": {"slow_waiting_listings": -1}}, "slow_waiting_listings"),
    ({"models": {"batch_wait_ms": -1}}, "batch_wait_ms"),
    ({"models": {"batch_wait_ms": "soon"}}, "batch_wait_ms"),
    ({"models": {"run_batch": 0}}, "run_batch"),
    ({"models": {"run_batch": "all"}}, "run_batch"),
    ({"models": {"shared_threads": 0}}, "shared_threads"),
    ({"models": {"semantic_model": "effnet_int9"}}, "unknown image model 'effnet_int9'"),
    ({"models": {"copy_model": ""}}, "unknown image model ''"),
    ({"models": {"logo_model": "clip"}}, "one of: sscd, sscd_distilled, effnet"),
    ({"intake": {"max_request_bytes": 100}}, "max_request_bytes"),
    ({"intake": {"max_request_bytes": "lots"}}, "max_request_bytes"),
])
def test_invalid_settings_are_refused(overrides: dict[str, object], needle: str) -> None:
    with pytest.raises(ValidationError) as err:
        Settings(**overrides)  # type: ignore[arg-type]
    assert needle in str(err.value)


def test_batch_wait_is_none_on_the_cpu_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """"auto" (the default): a model on the CPU runs what is queued at once, one on a GPU waits 2 ms for
    company; a number set in the environment holds for both."""
    s = Settings()
    assert s.models.batch_wait_ms == "auto"
    assert (s.models.wait_ms_for("cpu"), s.models.wait_ms_for("cuda")) == (0.0, 2.0)
    monkeypatch.setenv("COUNTERLENS_MODELS__BATCH_WAIT_MS", "3.5")
    s = Settings()
    assert (s.models.wait_ms_for("cpu"), s.models.wait_ms_for("cuda")) == (3.5, 3.5)


def test_run_batch_is_one_photo_on_the_cpu_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """"auto" (the default): a model on the CPU runs its batch a photo at a time, one on a GPU the whole
    batch at once; a number set in the environment holds for both."""
    s = Settings()
    assert s.models.run_batch == "auto"
    assert (s.models.run_batch_for("cpu"), s.models.run_batch_for("cuda")) == (1, s.models.max_batch)
    monkeypatch.setenv("COUNTERLENS_MODELS__RUN_BATCH", "4")
    s = Settings()
    assert (s.models.run_batch_for("cpu"), s.models.run_batch_for("cuda")) == (4, 4)
    # A model with a fixed batch runs whole batches of its own: 4 -> 4 (fixed 2), 6 (fixed 3), 8 (fixed 8).
    assert [s.models.run_batch_for("cpu", fixed) for fixed in (2, 3, 8)] == [4, 6, 8]
    monkeypatch.delenv("COUNTERLENS_MODELS__RUN_BATCH")
    assert Settings().models.run_batch_for("cpu", fixed_batch=16) == 16


def test_cli_exits_2_naming_the_variable(tmp_path: Path) -> None:
    env = dict(os.environ, COUNTERLENS_DATA_DIR=str(tmp_path), COUNTERLENS_INTAKE__MAX_IMAGES="0")
    r = subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "counterlens"), "serve"], env=env, text=True,
                       capture_output=True, timeout=60)
    assert r.returncode == 2
    assert "COUNTERLENS_INTAKE__MAX_IMAGES" in r.stderr


def test_empty_optional_models_are_allowed() -> None:
    """No lookalike model and no separate logo model are valid choices (the copy model is required)."""
    m = Settings(models={"semantic_model": "", "logo_model": ""}).models  # type: ignore[arg-type]
    assert (m.semantic_model, m.logo_model) == ("", "")


def test_cli_refuses_an_unknown_model_before_loading_anything(tmp_path: Path) -> None:
    """A misspelt model name is a settings error (exit 2, the variable named), not a traceback from the
    registry after the other models loaded."""
    env = dict(os.environ, COUNTERLENS_DATA_DIR=str(tmp_path), COUNTERLENS_MODELS__SEMANTIC_MODEL="effnet_int9")
    r = subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "counterlens"), "models", "export"], env=env,
                       text=True, capture_output=True, timeout=60)
    assert r.returncode == 2, r.stderr
    err = " ".join(r.stderr.split())
    assert "COUNTERLENS_MODELS__SEMANTIC_MODEL" in err and "unknown image model 'effnet_int9'" in err
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "models").exists()  # nothing was exported


def test_cli_names_a_union_setting_once(tmp_path: Path) -> None:
    """A setting that is a number or "auto" fails as one variable, not once per member type."""
    env = dict(os.environ, COUNTERLENS_DATA_DIR=str(tmp_path), COUNTERLENS_MODELS__BATCH_WAIT_MS="soon")
    r = subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "counterlens"), "serve"], env=env, text=True,
                       capture_output=True, timeout=60)
    assert r.returncode == 2
    err = " ".join(r.stderr.split())
    assert "COUNTERLENS_MODELS__BATCH_WAIT_MS: Input should be a valid number" in err
    assert "or Input should be 'auto'" in err and "__FLOAT" not in err


def test_a_brand_override_falls_back_to_the_configured_policy(tmp_path: Path) -> None:
    from service.container import BrandPolicyLookup, scoring_params
    from service.storage.catalog import CatalogRepository
    from service.storage.db import Database

    settings = Settings(data_dir=tmp_path, scoring={"review_threshold": 0.4, "likely_threshold": 0.9})
    db = Database(settings.database_url)
    db.migrate()
    repo = CatalogRepository(db)
    repo.create_brand("acme", "Acme", review_threshold=0.3)
    repo.create_brand("plain", "Plain")
    lookup = BrandPolicyLookup(repo, scoring_params(settings).policy)
    policy = lookup.brand_policy("acme")
    assert policy is not None and (policy.review_threshold, policy.likely_threshold) == (0.3, 0.9)
    assert lookup.brand_policy("plain") is None
    db.dispose()


def test_shared_model_threads_fill_the_cores_on_the_cpu_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """"auto": on the CPU as many shared threads as the cores hold of a model's ONNX Runtime threads, on
    a GPU none (a thread of its own per model); a number set in the environment holds everywhere."""
    m = Settings().models
    assert m.shared_threads == "auto"
    assert [m.shared_threads_for("cpu", 2, 1), m.shared_threads_for("cpu", 16, 8), m.shared_threads_for("cpu", 1, 1),
            m.shared_threads_for("cpu", 3, 1), m.shared_threads_for("cuda", 16, 8)] == [2, 2, 1, 3, None]
    monkeypatch.setenv("COUNTERLENS_MODELS__SHARED_THREADS", "3")
    m = Settings().models
    assert (m.shared_threads_for("cpu", 1, 1), m.shared_threads_for("cuda", 16, 8)) == (3, 3)


def test_the_request_limit_is_one_listings_photos_in_base64_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().intake.request_limit() == -(-8 * 10 * 2**20 * 4 // 3) + 2**20  # ~108 MiB
    assert Settings(intake={"max_images": 2, "max_image_bytes": 3000}).intake.request_limit() == 8000 + 2**20
    monkeypatch.setenv("COUNTERLENS_INTAKE__MAX_REQUEST_BYTES", "5000000")
    assert Settings().intake.request_limit() == 5_000_000


def test_models_are_sized_by_the_processes_share_of_the_cores() -> None:
    """``ModelSettings.for_cores``: what is left to us (ONNX Runtime threads 0, shared threads "auto") is
    sized by the cores one process has to itself; numbers set hold; a CUDA model keeps "auto"."""
    m = Settings().models
    assert (m.intra_op_threads, m.shared_threads) == (0, "auto")
    assert [(s.intra_op_threads, s.shared_threads) for s in (m.for_cores(c, 2) for c in (1, 2, 8))] == [
        (1, 1), (1, 2), (4, 2)]
    assert (m.for_cores(0, 2).intra_op_threads, m.for_cores(0, 2).shared_threads) == (1, 1)
    assert [m.for_cores(c, 2).process_cores for c in (0, 1, 8)] == [1, 1, 8]
    fixed = m.model_copy(update={"intra_op_threads": 3, "shared_threads": 5})
    assert fixed.for_cores(1, 2) == fixed.model_copy(update={"process_cores": 1})
    assert m.model_copy(update={"intra_op_threads": 2}).for_cores(8, 2).shared_threads == 4
    # Where the provider may be a GPU, "auto" is sized once it is known (by process_cores, on the CPU).
    for provider in ("cuda", "auto"):
        gpu = m.model_copy(update={"provider": provider}).for_cores(2, 2)
        assert (gpu.intra_op_threads, gpu.shared_threads, gpu.process_cores) == (1, "auto", 2)


@pytest.mark.parametrize(("workers", "intra", "shared"), [(1, 4, 2), (2, 2, 2), (8, 1, 1)])
def test_each_api_worker_sizes_its_models_by_its_share_of_the_cores(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, workers: int, intra: int, shared: int) -> None:
    """The worker processes' app (``service.api.main.app_factory``) on 8 cores: each of ``workers`` takes
    its share for its two models. (With the machine's cores each, two workers on 2 cores ran four model
    threads and served 0.78 of raw at c=32 where one model thread each served 0.82.)"""
    from service.api.main import app_factory

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setenv("COUNTERLENS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("COUNTERLENS_SERVER__WORKERS", str(workers))
    m = app_factory().state.cl.settings.models
    assert (m.process_cores, m.intra_op_threads, m.shared_threads) == (8 // workers, intra, shared)
    # Cores set for the whole service (a container with fewer than the machine): shared out the same.
    monkeypatch.setenv("COUNTERLENS_MODELS__PROCESS_CORES", "2")
    assert app_factory().state.cl.settings.models.process_cores == max(1, 2 // workers)
