"""The export cache: a model folder under ``models_dir`` is (re)built only when its source fingerprint
changes.

Each exported model lives in its own folder with a ``manifest.json`` recording the fingerprint of what it
was built from (source weight digests, exporter and library versions, preprocessing).  On start the
fingerprint is recomputed -- cheaply, without importing torch -- and compared; only a mismatch (or a
missing file) runs the export, into a temporary sibling folder that is swapped in when complete, so a
crash mid-export never leaves a half-written model behind.  A file lock serialises concurrent starts
(API workers and the CLI) so a model is exported once.

Where the export's sources are not installed (a serving image without torch: the Dockerfile's runtime
stage), the fingerprint cannot be made: an existing export is then served as it is, and a missing one is
an error that says where to make it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

from embeddings.preprocess import atomic_write_text

log = logging.getLogger(__name__)

try:  # POSIX; on other systems concurrent exports are simply not serialised.
    import fcntl
except ImportError:  # pragma: no cover - not reached on Linux
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    import torch

MANIFEST_FILE = "manifest.json"
ONNX_OPSET = 17
_CHUNK = 1 << 20
# An export is checked by running ONNX Runtime on the export's own sample inputs.
MIN_EXPORT_COSINE = 0.999


class FileStat(BaseModel):
    """What a remembered digest is valid for: the file's size and modification time."""

    model_config = ConfigDict(frozen=True)

    size: int
    mtime_ns: int
    sha256: str


class ExportManifest(BaseModel):
    """``manifest.json`` of one exported model folder."""

    fingerprint: dict[str, Any]
    files: list[str]
    exported_at: str
    # sha256 of (large) source files keyed by absolute path, so a restart need not re-read gigabytes of
    # weights to recompute the fingerprint; an entry is used only while size and mtime still match.
    digest_cache: dict[str, FileStat] = {}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class SourceDigests:
    """sha256 of source files, remembered across starts in the manifest's ``digest_cache``."""

    def __init__(self, cache: Mapping[str, FileStat] | None = None) -> None:
        self._cache: dict[str, FileStat] = dict(cache or {})
        self._used: dict[str, FileStat] = {}

    def sha256(self, path: Path) -> str:
        resolved = str(path.resolve())
        st = path.stat()
        hit = self._cache.get(resolved)
        if hit is not None and hit.size == st.st_size and hit.mtime_ns == st.st_mtime_ns:
            self._used[resolved] = hit
            return hit.sha256
        entry = FileStat(size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=file_sha256(path))
        self._used[resolved] = entry
        return entry.sha256

    @property
    def used(self) -> dict[str, FileStat]:
        """The entries consulted during this start (stale ones are dropped from the next manifest)."""
        return dict(self._used)


def package_version(dist: str) -> str:
    """A distribution's version from its metadata, without importing it (torch stays out of serving)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


class ExportSourcesUnavailableError(RuntimeError):
    """The packages an export is made from (torch and the model's own) are not installed: a serving
    install such as the Docker image's runtime stage. An export made elsewhere is used as it is."""


def require_packages(*dists: str) -> None:
    """Raise :class:`ExportSourcesUnavailableError` naming those of ``dists`` that are not installed."""
    missing = [d for d in dists if package_version(d) == "absent"]
    if missing:
        raise ExportSourcesUnavailableError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                                            "not installed")


def normalise_fingerprint(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """JSON round trip (tuples become lists, keys sorted) so a fresh fingerprint compares equal to the one
    read back from a manifest."""
    out: dict[str, Any] = json.loads(json.dumps(fingerprint, sort_keys=True))
    return out


def read_manifest(model_dir: Path) -> ExportManifest | None:
    try:
        return ExportManifest.model_validate_json((model_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:
        # A manifest we cannot parse is treated as absent: the model is exported again.
        return None


def _write_manifest(model_dir: Path, manifest: ExportManifest) -> None:
    atomic_write_text(model_dir / MANIFEST_FILE, manifest.model_dump_json(indent=2) + "\n")


@contextlib.contextmanager
def _export_lock(model_dir: Path) -> Iterator[None]:
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = model_dir.parent / f".{model_dir.name}.lock"
    with lock_path.open("a+") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_exported(
    model_dir: Path,
    fingerprint: Callable[[SourceDigests], Mapping[str, Any]],
    export: Callable[[Path], list[str]],
) -> bool:
    """Make ``model_dir`` hold an export matching ``fingerprint``; returns True when it (re)exported.

    ``fingerprint(digests)`` describes the sources (use ``digests.sha256(path)`` for weight files);
    ``export(tmp_dir)`` writes the model files into an empty folder and returns their names.
    """
    with _export_lock(model_dir):
        manifest = read_manifest(model_dir)
        digests = SourceDigests(manifest.digest_cache if manifest else None)
        try:
            wanted = normalise_fingerprint(fingerprint(digests))
        except ExportSourcesUnavailableError as exc:
            # A serving install (no torch): nothing here could export again or tell whether the export
            # is stale, so the one made where the sources were is served as it is.
            if manifest is not None and all((model_dir / name).is_file() for name in manifest.files):
                log.info("%s: %s; serving the export of %s as it is", model_dir.name, exc, manifest.exported_at)
                return False
            raise ExportSourcesUnavailableError(
                f"{model_dir} holds no export and {exc}: export the models where they are installed "
                "(pip install '.[export]', then counterlens models export) and copy the models folder here"
            ) from None
        if (
            manifest is not None
            and manifest.fingerprint == wanted
            and all((model_dir / name).is_file() for name in manifest.files)
        ):
            if manifest.digest_cache != digests.used:
                _write_manifest(model_dir, manifest.model_copy(update={"digest_cache": digests.used}))
            return False

        tmp = model_dir.parent / f".{model_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            files = export(tmp)
            missing = [name for name in files if not (tmp / name).is_file()]
            if missing:
                raise RuntimeError(f"export of {model_dir.name} did not write {missing}")
            _write_manifest(
                tmp,
                ExportManifest(
                    fingerprint=wanted,
                    files=sorted(files),
                    exported_at=datetime.now(UTC).isoformat(timespec="seconds"),
                    digest_cache=digests.used,
                ),
            )
            old = model_dir.parent / f".{model_dir.name}.old-{uuid.uuid4().hex[:8]}"
            if model_dir.exists():
                os.replace(model_dir, old)
            os.replace(tmp, model_dir)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return True


def check_export(
    onnx_path: Path, input_name: str, sample: npt.NDArray[np.generic], expected: npt.NDArray[np.floating]
) -> None:
    """Fail the export if ONNX Runtime's output on ``sample`` is not (cosine >= 0.999, row by row) what
    PyTorch computed for it."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = np.asarray(session.run(None, {input_name: sample})[0], dtype=np.float64).reshape(len(sample), -1)
    ref = np.asarray(expected, dtype=np.float64).reshape(len(sample), -1)
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
    if float(cos.min()) < MIN_EXPORT_COSINE:
        raise RuntimeError(f"ONNX export {onnx_path.name} disagrees with PyTorch (cosine {cos.min():.5f})")


def export_torch_module(
    module: torch.nn.Module, sample: torch.Tensor, path: Path, input_name: str, output_name: str
) -> None:
    """``torch.onnx.export`` with a dynamic batch axis, then :func:`check_export` against PyTorch's own
    output on ``sample``.  torch is imported by the caller's export function, never by serving code."""
    import warnings

    import torch

    module.eval()
    with torch.inference_mode():
        reference = module(sample).numpy()
    # Exported with autograd left on: under no_grad/inference_mode nn.MultiheadAttention switches to its
    # fused fast path, which has no ONNX symbolic.  The TorchScript exporter is deprecated in favour of
    # dynamo (which needs onnxscript, not a dependency) but handles these models; its warnings are noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (sample,),
            str(path),
            dynamo=False,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
        )
    check_export(path, input_name, sample.numpy(), reference)
