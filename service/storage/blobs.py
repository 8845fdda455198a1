"""Content-addressed store of reference image bytes: ``<root>/<sha[:2]>/<sha>``.

The original bytes of every catalog image are kept so that a ``reindex`` with a new model can embed
them again. Writes are atomic (a temporary file in the same folder, fsynced, then renamed), so a crash
leaves either the whole blob or nothing; a half-written temporary file is never read as a blob.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from service.storage import validate
from service.storage.errors import NotFoundError, StorageError

_TMP_PREFIX = ".tmp-"


class BlobNotFoundError(NotFoundError):
    """No blob with that content hash."""


class CorruptBlobError(StorageError):
    """The stored bytes no longer hash to their name (disk corruption or tampering)."""


class BlobStore:
    """Bytes by sha256 under one root folder (created if missing)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def relative_path(sha256: str) -> str:
        """``<sha[:2]>/<sha>``: the key stored in ``reference_images.blob_path``. The hash is checked
        first, which is also what keeps every path inside the root."""
        sha = validate.sha256(sha256)
        return f"{sha[:2]}/{sha}"

    def path_for(self, sha256: str) -> Path:
        return self.root / self.relative_path(sha256)

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def put(self, data: bytes, sha256: str | None = None) -> str:
        """Stores ``data`` and returns its sha256 (checked against ``sha256`` when given). Storing bytes
        that are already there (checked by hash) is a no-op; a corrupt copy is replaced."""
        digest = hashlib.sha256(data).hexdigest()
        if sha256 is not None and validate.sha256(sha256) != digest:
            raise StorageError(f"sha256 {sha256} does not match the data (which hashes to {digest})",
                               "sha256")
        final = self.path_for(digest)
        if self._holds(final, digest, len(data)):
            return digest
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=final.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._fsync_dir(final.parent)
        return digest

    def get(self, sha256: str, *, verify: bool = True) -> bytes:
        """The bytes stored under ``sha256``; with ``verify`` (default) they are hashed again, so a
        corrupt file raises :class:`CorruptBlobError` instead of being embedded."""
        path = self.path_for(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobNotFoundError(f"no blob {sha256}", "sha256") from None
        if verify and hashlib.sha256(data).hexdigest() != sha256:
            raise CorruptBlobError(f"blob {sha256} is corrupt: its bytes hash differently", "sha256")
        return data

    def delete(self, sha256: str) -> bool:
        try:
            self.path_for(sha256).unlink()
        except FileNotFoundError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        """The sha256 of every stored blob (temporary files of unfinished writes are skipped)."""
        for sub in sorted(self.root.iterdir()):
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for f in sorted(sub.iterdir()):
                if not f.name.startswith(_TMP_PREFIX) and f.name.startswith(sub.name) and f.is_file():
                    yield f.name

    def remove_stale_temporaries(self) -> int:
        """Deletes temporary files left by writes that were killed; returns how many. Call it only
        while nothing writes to the store (at start), or it may take a write in progress with it."""
        n = 0
        for tmp in self.root.glob(f"??/{_TMP_PREFIX}*"):
            tmp.unlink(missing_ok=True)
            n += 1
        return n

    @staticmethod
    def _holds(path: Path, digest: str, size: int) -> bool:
        """Whether ``path`` already holds these bytes (a corrupt copy is rewritten, not kept)."""
        try:
            if path.stat().st_size != size:
                return False
            return hashlib.sha256(path.read_bytes()).hexdigest() == digest
        except FileNotFoundError:
            return False

    @staticmethod
    def _fsync_dir(folder: Path) -> None:
        # The rename is durable only once the folder's entry is on disk (POSIX); not possible on Windows.
        if os.name != "posix":
            return
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
