"""scripts/check_gpu.py on the exported models: bad arguments, and what it says where ONNX Runtime has no
CUDA (CI, the development machine) or has it (a GPU machine: both models on CUDA, docs/performance.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import onnxruntime as ort

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "check_gpu.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO)


def test_bad_arguments_exit_2_naming_the_option(tmp_path: Path, grocery_dir: Path) -> None:
    missing = _run("--models", str(tmp_path / "nowhere"), "--photos", str(grocery_dir))
    assert missing.returncode == 2 and "--models: no folder" in missing.stderr
    empty = _run("--models", str(tmp_path), "--photos", str(grocery_dir / "instore"))
    assert empty.returncode == 2 and "no model folder" in empty.stderr
    no_photos = _run("--models", str(tmp_path), "--photos", str(tmp_path))
    assert no_photos.returncode == 2 and "--photos" in no_photos.stderr
    assert _run("--models", str(tmp_path), "--photos", str(tmp_path), "--batches", "x").returncode == 2


def test_every_served_model_is_checked_on_cuda(shared_models: tuple[Path, dict[str, Any]],
                                               grocery_dir: Path) -> None:
    models_dir, embedders = shared_models
    got = _run("--models", str(models_dir), "--photos", str(grocery_dir / "instore"), "--n", "8",
               "--batches", "1", "--seconds", "0.2")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert got.returncode == 0, got.stdout + got.stderr
        for name in embedders:
            assert f"{name} (" in got.stdout and "runs on cuda" in got.stdout
        assert "agree with the CPU" in got.stdout
    else:
        assert got.returncode == 1, got.stdout + got.stderr
        for name in embedders:
            assert f"{name}: CUDA refused" in got.stdout
        assert "install onnxruntime-gpu" in got.stdout and "FAILED" in got.stdout
