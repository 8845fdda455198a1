"""The files of a rescan: reading listings (JSONL, CSV, Parquet) into validated rows with their line
numbers, resolving their image references safely, and the append-only JSONL journals (results, errors)
that make a rescan resumable after kill -9.

Input, one listing per line/row (the fields of ``POST /v1/score``, flattened so CSV and Parquet can
carry them)::

    {"listing_id": "L1", "title": "...", "description": "...", "price": 12.5, "currency": "EUR",
     "seller_id": "s1", "account_age_days": 30, "units_sold_30d": 4, "stock": 100,
     "images": ["photos/l1.jpg", "https://cdn.example/l1.jpg"]}

``price`` may also be ``{"amount", "currency"}`` and the seller a ``{"id", "account_age_days",
"units_sold_30d", "stock"}`` object, as in the API. In CSV, ``images`` is a JSON array or paths
separated by ``|``. Unknown fields are ignored (platform exports carry more columns) and counted.

Output (one object a line, :func:`result_record`)::

    {"listing_id", "risk", "verdict", "brand", "matches": [{"brand", "sku", "ref_id", "kind", "signal",
     "similarity", "image_index"}, ...best first], "reasons": [...]}
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.domain.model import Money, ScoreResult, SellerInfo
from service.intake.errors import IntakeError, IntakeErrorCode
from service.usecases.listing_input import ImageSource

# The same identifier rule as the API's ListingIn.listing_id.
_LISTING_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,199}")
_CURRENCY = re.compile(r"[A-Za-z]{3}")
MAX_TITLE = 2000
MAX_DESCRIPTION = 20000
MAX_IMAGE_REF = 4096

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
KNOWN_FIELDS = frozenset({"listing_id", "title", "description", "price", "currency", "seller_id", "seller",
                          "account_age_days", "units_sold_30d", "stock", "images"})
_SELLER_COUNTS = ("account_age_days", "units_sold_30d", "stock")


class RescanInputError(ValueError):
    """A rescan cannot start: the input or output files are unusable (the CLI exits 2 with it)."""


class RowError(ValueError):
    """One line of the input is not a valid listing; ``field`` names the offending field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.message = message
        self.field = field


# ---------------------------------------------------------------------------------------------- reading


def input_format(path: Path) -> str:
    """``jsonl``, ``csv`` or ``parquet`` from the file's extension; :class:`RescanInputError` otherwise."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(FORMATS))
        raise RescanInputError(f"unknown listings format {path.suffix or '(no extension)'!r} of {path}; "
                               f"use one of {known}")
    return fmt


@dataclass(frozen=True, slots=True)
class RawRow:
    """One line/row as read: ``data`` when it parsed as an object, else ``error``. ``line`` is the
    1-based line number (JSONL, CSV: the header is line 1) or row number (Parquet)."""

    line: int
    data: dict[str, Any] | None
    error: str | None = None


def check_input(path: Path) -> str:
    """The format of a listings file that exists and starts as that format should (CSV header and
    Parquet schema name ``listing_id``); :class:`RescanInputError` otherwise. Cheap: reads the head only."""
    fmt = input_format(path)
    if not path.is_file():
        raise RescanInputError(f"no such listings file: {path}")
    try:
        if fmt == "csv":
            with path.open(newline="", encoding="utf-8-sig") as fh:
                header = next(csv.reader(fh), None)
            if not header or "listing_id" not in [h.strip() for h in header]:
                raise RescanInputError(f"{path}: the CSV header has no listing_id column")
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            try:
                names = pq.ParquetFile(path).schema_arrow.names
            except Exception as exc:  # pyarrow's errors vary (ArrowInvalid, OSError): all mean unreadable
                raise RescanInputError(f"{path}: not a readable Parquet file ({exc})") from None
            if "listing_id" not in names:
                raise RescanInputError(f"{path}: the Parquet file has no listing_id column")
        else:
            with path.open("rb") as fh:
                fh.read(1)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise RescanInputError(f"cannot read {path}: {exc}") from None
    return fmt


def iter_raw_rows(path: Path) -> Iterator[RawRow]:
    """Every non-blank line/row of the listings file, in order."""
    fmt = input_format(path)
    if fmt == "jsonl":
        return _jsonl_rows(path)
    if fmt == "csv":
        return _csv_rows(path)
    return _parquet_rows(path)


def count_rows(path: Path) -> int:
    """About how many listings the file holds (for the progress bar): non-blank lines, CSV lines after the
    header, Parquet rows from the footer."""
    fmt = input_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    n = 0
    with path.open("rb") as fh:
        for raw in fh:
            if raw.strip():
                n += 1
    return max(0, n - 1) if fmt == "csv" else n


def _jsonl_rows(path: Path) -> Iterator[RawRow]:
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield RawRow(number, None, f"not valid JSON: {exc}")
                continue
            if not isinstance(value, dict):
                yield RawRow(number, None, f"a line must be a JSON object, got {type(value).__name__}")
                continue
            yield RawRow(number, value)


def _csv_rows(path: Path) -> Iterator[RawRow]:
    with path.open(newline="", encoding="utf-8-sig", errors="strict") as fh:
        reader = csv.DictReader(fh)
        try:
            if reader.fieldnames:
                reader.fieldnames = [f.strip() for f in reader.fieldnames]
            if not reader.fieldnames or "listing_id" not in reader.fieldnames:
                raise RescanInputError(f"{path}: the CSV header has no listing_id column")
            for row in reader:
                extra = row.pop(None, None)  # type: ignore[call-overload]
                if extra:
                    yield RawRow(reader.line_num, None, f"{len(extra)} more values than header columns")
                    continue
                # An empty cell is an absent value, as an absent key in JSON.
                yield RawRow(reader.line_num, {k: v for k, v in row.items() if v not in ("", None)})
        except (csv.Error, UnicodeDecodeError) as exc:
            yield RawRow(reader.line_num, None, f"unreadable CSV: {exc}")


def _parquet_rows(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...: any is "not a parquet file"
        raise RescanInputError(f"{path}: not a readable Parquet file ({exc})") from None
    if "listing_id" not in pf.schema_arrow.names:
        raise RescanInputError(f"{path}: the Parquet file has no listing_id column")
    number = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            number += 1
            yield RawRow(number, {k: v for k, v in row.items() if v is not None})


# ---------------------------------------------------------------------------------------------- validating


@dataclass(frozen=True, slots=True)
class ListingRow:
    """A validated listing of the input; ``images`` are the references as written (paths or URLs)."""

    line: int
    listing_id: str
    title: str
    description: str
    price: Money | None
    seller: SellerInfo | None
    images: tuple[str, ...]
    unknown_fields: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """A plain-JSON form (to ship a row to another process, e.g. a Ray actor)."""
        return {"line": self.line, "listing_id": self.listing_id, "title": self.title,
                "description": self.description,
                "price": None if self.price is None else [self.price.amount, self.price.currency],
                "seller": None if self.seller is None else [
                    self.seller.seller_id, self.seller.account_age_days, self.seller.units_sold_30d,
                    self.seller.stock],
                "images": list(self.images)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ListingRow:
        price = None if d["price"] is None else Money(float(d["price"][0]), str(d["price"][1]))
        seller = None if d["seller"] is None else SellerInfo(*d["seller"])
        return cls(line=int(d["line"]), listing_id=d["listing_id"], title=d["title"],
                   description=d["description"], price=price, seller=seller, images=tuple(d["images"]))


def _text(data: dict[str, Any], name: str, max_len: int) -> str:
    value = data.get(name, "")
    if not isinstance(value, str):
        raise RowError(f"must be a string, got {type(value).__name__}", name)
    if len(value) > max_len:
        raise RowError(f"must be at most {max_len} characters, got {len(value)}", name)
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise RowError("must be a number, got a boolean", name)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise RowError(f"must be a number, got {value!r}", name) from None
    if not isinstance(value, int | float):
        raise RowError(f"must be a number, got {type(value).__name__}", name)
    amount = float(value)
    if not math.isfinite(amount) or amount < 0:
        raise RowError(f"must be a finite number >= 0, got {value!r}", name)
    return amount


def _count(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise RowError(f"must be a whole number >= 0, got {value!r}", name) from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RowError(f"must be a whole number >= 0, got {value!r}", name)
    return value


def _currency(value: Any, name: str) -> str:
    if not isinstance(value, str) or not _CURRENCY.fullmatch(value.strip()):
        raise RowError(f"must be a 3-letter ISO 4217 code, got {value!r}", name)
    return value.strip().upper()


def _price(data: dict[str, Any]) -> Money | None:
    price = data.get("price")
    if price is None:
        if "currency" in data:
            _currency(data["currency"], "currency")
        return None
    if isinstance(price, dict):
        unknown = sorted(set(price) - {"amount", "currency"})
        if unknown:
            raise RowError(f"unknown field(s) {unknown}", "price")
        if "amount" not in price:
            raise RowError("is required", "price.amount")
        return Money(_number(price["amount"], "price.amount"),
                     _currency(price.get("currency", "USD"), "price.currency"))
    return Money(_number(price, "price"), _currency(data.get("currency", "USD"), "currency"))


def _seller(data: dict[str, Any]) -> SellerInfo | None:
    nested = data.get("seller")
    if nested is not None:
        if not isinstance(nested, dict):
            raise RowError(f"must be an object, got {type(nested).__name__}", "seller")
        unknown = sorted(set(nested) - {"id", *_SELLER_COUNTS})
        if unknown:
            raise RowError(f"unknown field(s) {unknown}", "seller")
        fields, prefix, sid = nested, "seller.", nested.get("id")
        if "seller_id" in data:
            raise RowError("give seller_id or a seller object, not both", "seller_id")
    else:
        fields, prefix, sid = data, "", data.get("seller_id")
    counts = [_count(fields.get(k), prefix + k) for k in _SELLER_COUNTS]
    if sid is None:
        if any(c is not None for c in counts):
            raise RowError("is required with account_age_days, units_sold_30d or stock",
                           prefix + ("id" if prefix else "seller_id"))
        return None
    if isinstance(sid, int) and not isinstance(sid, bool):
        sid = str(sid)
    name = prefix + ("id" if prefix else "seller_id")
    if not isinstance(sid, str) or not sid.strip() or len(sid) > 200:
        raise RowError(f"must be a non-empty string of at most 200 characters, got {sid!r}", name)
    return SellerInfo(sid, counts[0], counts[1], counts[2])


def _images(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                value = json.loads(s)
            except json.JSONDecodeError as exc:
                raise RowError(f"is not a JSON array: {exc}", "images") from None
        else:
            value = [p.strip() for p in s.split("|") if p.strip()]
    if not isinstance(value, list | tuple):
        raise RowError(f"must be a list of paths or URLs, got {type(value).__name__}", "images")
    out = []
    for i, ref in enumerate(value):
        if not isinstance(ref, str) or not ref.strip():
            raise RowError(f"must be a non-empty path or URL, got {ref!r}", f"images[{i}]")
        if len(ref) > MAX_IMAGE_REF:
            raise RowError(f"is longer than {MAX_IMAGE_REF} characters", f"images[{i}]")
        out.append(ref.strip())
    return tuple(out)


def parse_row(raw: RawRow) -> ListingRow:
    """The validated listing of a raw row; :class:`RowError` naming the field otherwise."""
    if raw.data is None:
        raise RowError(raw.error or "unreadable line")
    data = raw.data
    lid = data.get("listing_id")
    if lid is None:
        raise RowError("is required", "listing_id")
    if isinstance(lid, int) and not isinstance(lid, bool):
        lid = str(lid)
    if not isinstance(lid, str) or not _LISTING_ID.fullmatch(lid):
        raise RowError("must be 1-200 characters [A-Za-z0-9._:@/-] starting with a letter or digit, "
                       f"got {lid!r}", "listing_id")
    return ListingRow(line=raw.line, listing_id=lid, title=_text(data, "title", MAX_TITLE),
                      description=_text(data, "description", MAX_DESCRIPTION), price=_price(data),
                      seller=_seller(data), images=_images(data.get("images")),
                      unknown_fields=tuple(sorted(k for k in data if k not in KNOWN_FIELDS)))


# ---------------------------------------------------------------------------------------------- images


def image_source(ref: str, base: Path, index: int) -> ImageSource:
    """The intake source of one image reference of a listing: an http(s) URL (fetched by the intake's safe
    fetcher, which refuses private and metadata addresses), or a file inside ``base`` (the listings
    file's folder, already resolved). A path that leaves ``base`` — ``../``, an absolute path elsewhere,
    a symlink pointing out — is refused, so a listings file cannot make the service read ``/etc``."""
    field = f"images[{index}]"
    lowered = ref[:12].lower()
    if lowered.startswith(("http://", "https://")):
        return ImageSource(field=field, url=ref)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", ref) or lowered.startswith("data:"):
        raise IntakeError(IntakeErrorCode.URL_FORBIDDEN,
                          f"only http(s) URLs and paths inside the listings file's folder are allowed, "
                          f"got {ref[:80]!r}", field)
    if "\x00" in ref:
        raise IntakeError(IntakeErrorCode.INVALID_URL, "a path must not contain NUL", field)
    path = (base / ref).resolve()
    if not path.is_relative_to(base):
        raise IntakeError(IntakeErrorCode.URL_FORBIDDEN,
                          f"{ref[:200]!r} is outside the listings file's folder", field)
    return ImageSource(field=field, path=path)


# ---------------------------------------------------------------------------------------------- output


def result_record(result: ScoreResult) -> dict[str, Any]:
    """One line of RESULTS: the listing's risk, verdict, matches (best first) and reasons."""
    return {"listing_id": result.listing_id, "risk": float(result.risk), "verdict": result.verdict.value,
            "brand": result.brand, "matches": [m.as_contract() for m in result.matches],
            "reasons": list(result.reasons)}


def error_record(line: int, listing_id: str | None, code: str, message: str,
                 field: str | None) -> dict[str, Any]:
    """One line of ERRORS: where (line number, listing) and why (code, field, message)."""
    return {"line": line, "listing_id": listing_id, "code": code, "field": field, "error": message}


class JsonlJournal:
    """An append-only JSONL file that a kill -9 cannot corrupt.

    Records are buffered and written by :meth:`commit` as one ``write`` of whole lines followed by
    ``fsync``, so after a crash the file holds every committed record and at most a torn tail of the
    batch being written; :meth:`recover` cuts that tail off (everything after the last newline) and
    returns the complete records, which a resumed run skips.
    """

    def __init__(self, path: Path, *, append: bool) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        self._fd = os.open(path, flags, 0o644)
        self._buffer: list[bytes] = []
        self.written = 0

    @staticmethod
    def recover(path: Path) -> list[dict[str, Any]]:
        """The complete records of an existing journal, after truncating a torn last line.

        :class:`RescanInputError` when a complete line is not a JSON object: then the file is not a
        journal of ours and resuming into it would be wrong.
        """
        if not path.exists():
            return []
        with path.open("r+b") as fh:
            data = fh.read()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                fh.truncate(end)
                fh.flush()
                os.fsync(fh.fileno())
        records = []
        for number, raw in enumerate(data[:end].splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                value = None
            if not isinstance(value, dict):
                raise RescanInputError(f"{path} line {number} is not a JSON object: not a rescan journal "
                                       "(remove it or choose another file)")
            records.append(value)
        return records

    @staticmethod
    def encode(record: dict[str, Any]) -> bytes:
        """A record as the journal writes it: one line of compact JSON."""
        return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode() + b"\n"

    def append(self, record: dict[str, Any]) -> None:
        self._buffer.append(self.encode(record))

    def append_encoded(self, lines: Sequence[bytes]) -> None:
        """Records :meth:`encode` made elsewhere (a stored rescan's worker processes encode their own)."""
        self._buffer.extend(lines)

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def commit(self) -> None:
        """Write the buffered records (whole lines, one write) and fsync."""
        if not self._buffer:
            return
        # Taken out of the buffer before writing: if an exception (KeyboardInterrupt) lands after the
        # write, a second commit must not write the same records again.
        data = b"".join(self._buffer)
        self.written += len(self._buffer)
        self._buffer.clear()
        view = memoryview(data)
        while view:  # a regular file takes it all in one write; loop in case of a short write
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)

    def close(self) -> None:
        try:
            self.commit()
        finally:
            os.close(self._fd)
