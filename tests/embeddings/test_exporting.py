"""The export cache: export once, again only when the fingerprint changes, never leave a torn folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from embeddings.exporting import (
    MANIFEST_FILE,
    ExportSourcesUnavailableError,
    SourceDigests,
    ensure_exported,
    file_sha256,
    read_manifest,
    require_packages,
)


class Exporter:
    """Writes one file whose content is the source file's, counting the exports it performs."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.runs = 0
        self.fail = False

    def fingerprint(self, digests: SourceDigests) -> dict[str, object]:
        return {"source": digests.sha256(self.source), "version": (1, 2)}

    def __call__(self, out: Path) -> list[str]:
        self.runs += 1
        if self.fail:
            (out / "model.bin").write_bytes(b"half")
            raise RuntimeError("export crashed")
        (out / "model.bin").write_bytes(self.source.read_bytes())
        return ["model.bin"]


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Exporter]:
    source = tmp_path / "weights.bin"
    source.write_bytes(b"weights v1")
    return tmp_path / "models" / "m", Exporter(source)


def test_exports_once_then_reuses(setup: tuple[Path, Exporter]) -> None:
    folder, exporter = setup
    assert ensure_exported(folder, exporter.fingerprint, exporter)
    assert not ensure_exported(folder, exporter.fingerprint, exporter)
    assert exporter.runs == 1
    assert (folder / "model.bin").read_bytes() == b"weights v1"
    manifest = read_manifest(folder)
    assert manifest is not None and manifest.files == ["model.bin"]
    # Tuples in a fingerprint compare equal to the lists JSON gives back.
    assert manifest.fingerprint["version"] == [1, 2]


def test_a_serving_install_serves_the_existing_export_as_it_is(setup: tuple[Path, Exporter]) -> None:
    """Without the export's sources (no torch: the Docker image's runtime stage) the fingerprint cannot be
    made: an export made elsewhere is served untouched, and a missing one is an error saying where to
    make it."""
    folder, exporter = setup

    def unavailable(digests: SourceDigests) -> dict[str, object]:
        require_packages("torch", "no-such-distribution-xyz")
        return exporter.fingerprint(digests)

    with pytest.raises(ExportSourcesUnavailableError, match=r"holds no export and no-such-distribution-xyz is "
                                                             r"not installed.*counterlens models export"):
        ensure_exported(folder, unavailable, exporter)
    assert exporter.runs == 0 and not folder.exists()

    assert ensure_exported(folder, exporter.fingerprint, exporter)  # made where the sources are
    exporter.source.write_bytes(b"weights v2")  # (a serving install could not tell)
    assert not ensure_exported(folder, unavailable, exporter)
    assert exporter.runs == 1 and (folder / "model.bin").read_bytes() == b"weights v1"
    # A model file missing from the export is not served as it is.
    (folder / "model.bin").unlink()
    with pytest.raises(ExportSourcesUnavailableError, match="holds no export"):
        ensure_exported(folder, unavailable, exporter)


def test_a_changed_source_is_exported_again(setup: tuple[Path, Exporter]) -> None:
    folder, exporter = setup
    ensure_exported(folder, exporter.fingerprint, exporter)
    exporter.source.write_bytes(b"weights v2")
    assert ensure_exported(folder, exporter.fingerprint, exporter)
    assert exporter.runs == 2
    assert (folder / "model.bin").read_bytes() == b"weights v2"
    assert not ensure_exported(folder, exporter.fingerprint, exporter)


def test_a_missing_file_or_manifest_is_exported_again(setup: tuple[Path, Exporter]) -> None:
    folder, exporter = setup
    ensure_exported(folder, exporter.fingerprint, exporter)
    (folder / "model.bin").unlink()
    assert ensure_exported(folder, exporter.fingerprint, exporter)
    (folder / MANIFEST_FILE).write_text("{not json")
    assert ensure_exported(folder, exporter.fingerprint, exporter)
    assert exporter.runs == 3


def test_a_failed_export_leaves_the_previous_one_intact(setup: tuple[Path, Exporter]) -> None:
    folder, exporter = setup
    ensure_exported(folder, exporter.fingerprint, exporter)
    exporter.source.write_bytes(b"weights v2")
    exporter.fail = True
    with pytest.raises(RuntimeError, match="export crashed"):
        ensure_exported(folder, exporter.fingerprint, exporter)
    assert (folder / "model.bin").read_bytes() == b"weights v1"
    assert sorted(p.name for p in folder.parent.iterdir()) == [".m.lock", "m"]


def test_an_export_that_forgets_a_file_is_an_error(setup: tuple[Path, Exporter]) -> None:
    folder, exporter = setup
    with pytest.raises(RuntimeError, match=r"did not write \['extra.bin'\]"):
        ensure_exported(folder, exporter.fingerprint, lambda out: [*exporter(out), "extra.bin"])
    assert not folder.exists()


def test_source_digests_are_remembered_while_size_and_mtime_hold(tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(b"a" * 1000)
    first = SourceDigests()
    digest = first.sha256(source)
    assert digest == file_sha256(source)
    # A cache entry is trusted while the file's size and mtime are unchanged ...
    fake = first.used[str(source.resolve())].model_copy(update={"sha256": "remembered"})
    assert SourceDigests({str(source.resolve()): fake}).sha256(source) == "remembered"
    # ... and recomputed once they change.
    source.write_bytes(b"b" * 1001)
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000))
    assert SourceDigests({str(source.resolve()): fake}).sha256(source) == file_sha256(source)
