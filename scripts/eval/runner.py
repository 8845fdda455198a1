"""Running the system under test the way an operator does: ``counterlens catalog import`` and
``counterlens rescan`` as subprocesses on a data dir of their own, settings given as environment
variables (``COUNTERLENS_SCORING__LOGO_SEARCH=always``), exported models re-used between runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class CommandError(RuntimeError):
    """A counterlens command exited with an error."""


@dataclass
class CommandRun:
    args: list[str]
    seconds: float
    stdout: str
    stderr: str


@dataclass
class RescanRun:
    """One rescan: its results by listing id, errors, and how fast it went."""

    name: str
    env: dict[str, str]
    results: dict[str, dict[str, Any]]
    errors: list[dict[str, Any]]
    listings: int
    wall_s: float  # the whole command, model loading included
    engine_rate: float | None  # listings/s as the rescan itself reports it (scoring only)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def listings_per_s(self) -> float:
        return self.engine_rate if self.engine_rate else self.listings / max(self.wall_s, 1e-9)


def counterlens_command() -> list[str]:
    """The installed ``counterlens`` entry point beside this interpreter (a venv's bin/)."""
    exe = Path(sys.executable).parent / "counterlens"
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-c", "from service.cli import app; app()"]


def run_command(args: Sequence[str], env: Mapping[str, str], cwd: Path, timeout: float = 3600) -> CommandRun:
    t0 = time.perf_counter()
    proc = subprocess.run([*counterlens_command(), *args], env=dict(env), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, check=False)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise CommandError(f"counterlens {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                        f"{proc.stderr[-3000:]}")
    return CommandRun(list(args), took, proc.stdout, proc.stderr)


class DataDir:
    """A data dir for one configuration of the system: its own database, indexes and blobs, with the
    exported models copied in (exporting EfficientNet-Lite0 takes a minute; copying a few MB does not)."""

    def __init__(self, path: Path, env: Mapping[str, str] | None = None) -> None:
        self.path = path
        self.overrides = dict(env or {})

    def environment(self) -> dict[str, str]:
        """This process's environment (settings exported for the whole evaluation carry over), the
        configuration's overrides, and this data dir."""
        env = dict(os.environ) | self.overrides
        env["COUNTERLENS_DATA_DIR"] = str(self.path)
        return env

    def seed_models(self, models_from: Path | None) -> None:
        """Copy exported models from ``models_from`` (a models folder or a data dir holding one)."""
        if models_from is None:
            return
        src = models_from / "models" if (models_from / "models").is_dir() else models_from
        if not src.is_dir():
            raise FileNotFoundError(f"--models-from {models_from}: no models folder there")
        dst = self.path / "models"
        if dst.exists():
            return
        self.path.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst, symlinks=True)

    def import_catalog(self, manifest: Path) -> CommandRun:
        run = run_command(["catalog", "import", str(manifest)], self.environment(), manifest.parent)
        if " 0 errors" not in run.stdout:
            raise CommandError(f"catalog import reported errors:\n{run.stdout}\n{run.stderr[-2000:]}")
        return run

    def snapshot(self, to: Path) -> DataDir:
        """A copy of this data dir (catalog imported, nothing scored) for another rescan to start from."""
        if to.exists():
            shutil.rmtree(to)
        shutil.copytree(self.path, to, symlinks=True)
        return DataDir(to, self.overrides)

    def rescan(self, name: str, listings: Path, out_dir: Path, workers: int | None = None,
               extra_env: Mapping[str, str] | None = None) -> RescanRun:
        out_dir.mkdir(parents=True, exist_ok=True)
        results_path = out_dir / f"{name}.results.jsonl"
        errors_path = out_dir / f"{name}.errors.jsonl"
        args = ["rescan", str(listings), "--out", str(results_path), "--errors", str(errors_path), "--overwrite"]
        if workers:
            args += ["--workers", str(workers)]
        env = self.environment() | dict(extra_env or {})
        run = run_command(args, env, listings.parent)
        results = {r["listing_id"]: r for r in _read_jsonl(results_path)}
        errors = _read_jsonl(errors_path) if errors_path.exists() else []
        n = sum(1 for line in listings.read_text().splitlines() if line.strip())
        return RescanRun(name=name, env={k: v for k, v in env.items() if k.startswith("COUNTERLENS_")},
                         results=results, errors=errors, listings=n, wall_s=run.seconds,
                         engine_rate=_reported_rate(run.stdout))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _reported_rate(stdout: str) -> float | None:
    m = re.search(r"listings/s\s*[│|]?\s*([0-9][0-9,]*\.?[0-9]*)", stdout)
    return float(m.group(1).replace(",", "")) if m else None
