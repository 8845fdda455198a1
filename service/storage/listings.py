"""Scored listings: their latest state, score history, latest matches, and the brands' review queues.

:class:`ListingRepository` records every score (the hot path of ``/score``: one transaction of a few
statements), answers the history questions scoring asks (the domain port
:class:`~service.domain.ports.ListingHistory`: market prices, sellers' confirmed counterfeits), feeds
``rescan --stored``, and serves each brand its own review queue.

Review-queue semantics of :meth:`ListingRepository.record_score`:

* a score with a verdict other than ``clear`` and a brand opens an item in that brand's queue, or
  updates the brand's open item of the listing (risk, verdict, reasons, score) — never a duplicate;
* an item the brand already decided (``confirmed`` / ``rejected``) keeps its decision and is not touched;
* open items of the listing in *other* brands' queues (or in every queue, when the new score is
  ``clear``) become ``cleared``: nobody decided them, the newest score simply no longer flags them.
  A later score that flags the listing for that brand again re-opens the item;
* a flagged score without a brand (text-only evidence of an unknown brand) opens no item.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from service.domain.model import (
    SIMILARITY_DECIMALS,
    Listing,
    Money,
    ReferenceKind,
    ScoreResult,
    SellerInfo,
    Verdict,
)
from service.storage import validate
from service.storage._sql import chunked, dialect_insert
from service.storage.db import Database
from service.storage.errors import InvalidInputError, NotFoundError
from service.storage.models import (
    Brand,
    ListingMarket,
    ListingMatch,
    ListingScore,
    ReferenceImage,
    ReviewItem,
    UTCDateTime,
    utcnow,
)
from service.storage.models import Listing as ListingRow
from service.storage.records import (
    DECISIONS,
    ListingRecord,
    MatchRecord,
    RecordedScore,
    ReviewItemRecord,
    ReviewStatus,
    ScoreRecord,
    ScoreSource,
)

_LISTINGS = cast(sa.Table, ListingRow.__table__)
_SCORES = cast(sa.Table, ListingScore.__table__)
_MATCHES = cast(sa.Table, ListingMatch.__table__)
_MARKETS = cast(sa.Table, ListingMarket.__table__)
_REVIEWS = cast(sa.Table, ReviewItem.__table__)
_REOPENABLE = (ReviewStatus.OPEN.value, ReviewStatus.CLEARED.value)
# Columns a score from fresh platform data updates; a --stored rescan only updates the latest_* ones.
_CONTENT_COLUMNS = ("title", "description", "price", "currency", "seller_id", "seller_account_age_days",
                    "seller_units_sold_30d", "seller_stock", "image_sha256s", "last_seen_at")
_LATEST_COLUMNS = ("last_scored_at", "latest_risk", "latest_verdict", "latest_brand_id", "latest_digest")
# What a listing's score depends on of its own data (``same_as_stored`` compares them).
_STATE_COLUMNS = tuple(c for c in _CONTENT_COLUMNS if c != "last_seen_at")


def result_json(result: ScoreResult) -> dict[str, Any]:
    """The stored form of a score result (matches in their API contract shape)."""
    return {
        "listing_id": result.listing_id,
        "risk": float(result.risk),
        "verdict": Verdict(result.verdict).value,
        "brand": result.brand,
        "reasons": list(result.reasons),
        "matches": [m.as_contract() for m in result.matches],
        "signals": [{"name": s.name.value, "score": float(s.score), "ran": s.ran, "reasons": list(s.reasons),
                     "evidence": s.evidence, "skipped_because": s.skipped_because}
                    for s in result.signals],
        "model_versions": dict(result.model_versions),
    }


# Risk and similarities count to 4 decimals. The same photo searched alone (a request: FAISS's SIMD
# loop) or in a page (a rescan: one BLAS product) gets similarities ~1e-7 apart, which crossed a 1e-6
# rounding step for 157-249 of 2,000 listings in a stored rescan after a file rescan: history rows with
# nothing new in them. At 1e-4 (the precision similarities are reported at) such noise crosses a step
# for ~0.1% of the values.
_DIGEST_DECIMALS = SIMILARITY_DECIMALS


def result_digest(result: ScoreResult) -> str:
    """A digest of what a result decides: risk (to 1e-4), verdict, brand, reasons, matches (similarity to
    1e-4) and model versions. Two results with equal digests put the listing in the same place (queues,
    market statistics, latest matches); signal evidence alone (a market median moving by a cent) does not
    count, nor does floating-point noise in the similarities.
    """
    d = _DIGEST_DECIMALS
    matches = [(m.reference.image_id, m.signal.value, round(float(m.similarity), d), m.image_index, m.box)
               for m in result.matches]
    core = (round(float(result.risk), d), Verdict(result.verdict).value, result.brand, list(result.reasons),
            matches, sorted(result.model_versions.items()))
    return hashlib.sha256(repr(core).encode()).hexdigest()


def _digest_or_none(result: ScoreResult) -> str | None:
    """:func:`result_digest`, or None where the result is invalid (``_prepare`` says how)."""
    try:
        return result_digest(result)
    except (ValueError, TypeError):
        return None


@dataclass(frozen=True, slots=True)
class ScoreWrite:
    """One score to store (see :meth:`ListingRepository.record_scores`)."""

    listing: Listing
    result: ScoreResult
    source: ScoreSource | str = ScoreSource.API
    image_sha256s: Sequence[str] | None = None  # None: the hashes of listing.images
    previous_digest: str | None = None  # the listing's stored latest_digest, for skip_unchanged


@dataclass(frozen=True, slots=True)
class _Prepared:
    row: dict[str, Any]
    result: ScoreResult
    source: ScoreSource
    verdict: Verdict
    risk: float
    slugs: set[str]
    digest: str


# A score's history row and its matches' rows (each with its brand's slug), all but the ids the write
# transaction assigns.
_HistoryRows = tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]


def _history_rows(p: _Prepared) -> _HistoryRows:
    """Built before the write transaction, which holds the database's one writer: it only runs statements."""
    r = p.result
    score = {"risk": p.risk, "verdict": p.verdict.value, "result": result_json(r),
             "model_versions": dict(r.model_versions), "source": p.source.value}
    matches = [
        (m.reference.brand, {"ref_id": m.reference.ref_id, "kind": ReferenceKind(m.reference.kind).value,
                             "signal": m.signal.value, "similarity": float(m.similarity),
                             "image_index": int(m.image_index), "sku": m.reference.sku,
                             "reference_image_id": m.reference.image_id})
        for m in r.matches]
    return score, matches


def _market_of(matches: Sequence[tuple[str, dict[str, Any]]]) -> list[tuple[str, str]]:
    """The (brand, sku) markets a listing is in, from its stored matches (:func:`_history_rows`): the skus
    that one of its photos shows best, the photo's top copy or lookalike match (ties all count). Its weaker
    matches name other products (up to five lookalikes a photo), and counting them put a listing's price
    into the markets of products it is not: a listing at its own reference price was then "6 deviations
    below the market" of a dearer product (docs/quality.md, run-to-run variation)."""
    best: dict[tuple[str, int], float] = {}
    for _, m in matches:
        key = (m["signal"], m["image_index"])
        best[key] = max(best.get(key, m["similarity"]), m["similarity"])
    out: dict[tuple[str, str], None] = {}
    for brand, m in matches:
        if (m["signal"] in ("copy", "lookalike") and m["sku"] is not None
                and m["similarity"] >= best[(m["signal"], m["image_index"])]):
            out[(brand, m["sku"])] = None
    return list(out)


def _money(amount: float | None, currency: str | None) -> Money | None:
    return None if amount is None or currency is None else Money(float(amount), currency)


def _listing_record(row: ListingRow, brand: str | None) -> ListingRecord:
    seller = None
    if row.seller_id is not None:
        seller = SellerInfo(seller_id=row.seller_id, account_age_days=row.seller_account_age_days,
                            units_sold_30d=row.seller_units_sold_30d, stock=row.seller_stock)
    return ListingRecord(id=row.id, listing_id=row.listing_id, title=row.title, description=row.description,
                         price=_money(row.price, row.currency), seller=seller,
                         image_sha256s=tuple(row.image_sha256s or ()), first_seen=row.first_seen,
                         last_seen_at=row.last_seen_at, last_scored_at=row.last_scored_at,
                         latest_risk=row.latest_risk, latest_verdict=Verdict(row.latest_verdict),
                         latest_brand=brand, latest_digest=row.latest_digest)


def _listing_query() -> sa.Select[ListingRow, str]:
    return sa.select(ListingRow, Brand.slug).outerjoin(Brand, Brand.id == ListingRow.latest_brand_id)


# The same as plain rows (no ORM identity map or instance state): what a stored rescan pages through by
# the thousand. A row has the listing's columns as attributes, as the ORM object does.
_BRANDS = cast(sa.Table, Brand.__table__)
_STORED_QUERY = sa.select(_LISTINGS, _BRANDS.c.slug.label("latest_brand_slug")).outerjoin(
    _BRANDS, _BRANDS.c.id == _LISTINGS.c.latest_brand_id)


def _review_query() -> sa.Select[ReviewItem, str, ListingRow]:
    return (sa.select(ReviewItem, Brand.slug, ListingRow)
            .join(Brand, Brand.id == ReviewItem.brand_id)
            .join(ListingRow, ListingRow.id == ReviewItem.listing_pk))


def _review_record(item: ReviewItem, brand: str, listing: ListingRow,
                   result: dict[str, Any] | None = None) -> ReviewItemRecord:
    return ReviewItemRecord(id=item.id, brand=brand, listing_id=listing.listing_id,
                            status=ReviewStatus(item.status), risk=item.risk, verdict=Verdict(item.verdict),
                            reasons=tuple(item.reasons or ()), created_at=item.created_at,
                            updated_at=item.updated_at, decided_at=item.decided_at,
                            decided_by=item.decided_by, score_id=item.score_id, title=listing.title,
                            price=_money(listing.price, listing.currency), seller_id=listing.seller_id,
                            result=result)


def _source(value: ScoreSource | str) -> ScoreSource:
    try:
        return ScoreSource(value)
    except ValueError:
        allowed = ", ".join(s.value for s in ScoreSource)
        raise InvalidInputError(f"source must be one of {allowed}, got {value!r}", "source") from None


def _aware(value: datetime, field: str) -> datetime:
    if value.tzinfo is None:
        raise InvalidInputError(f"{field} must be a time-zone aware datetime", field)
    return value


class _Statements:
    """The hot-path statements, built once per dialect: building a statement (above all ON CONFLICT's
    ``excluded`` alias) costs more than running it on SQLite."""

    def __init__(self, dialect: str) -> None:
        listing = dialect_insert(dialect, _LISTINGS)

        # Many listing rows in one statement (SQLAlchemy's "insertmanyvalues"), each answering its id and
        # its last_seen_at as stored now (in no particular order: mapped back by listing_id).
        def upsert_listing_many(columns: Sequence[str]) -> sa.Executable:
            return listing.on_conflict_do_update(index_elements=["listing_id"],
                                                 set_={c: listing.excluded[c] for c in columns}).returning(
                _LISTINGS.c.id, _LISTINGS.c.listing_id, _LISTINGS.c.last_seen_at)

        self.upsert_listing_many = upsert_listing_many(_LATEST_COLUMNS + _CONTENT_COLUMNS)
        self.upsert_listing_latest_many = upsert_listing_many(_LATEST_COLUMNS)
        self.stored_state = sa.select(_LISTINGS.c.listing_id, _LISTINGS.c.latest_digest,
                                      *(_LISTINGS.c[col] for col in _STATE_COLUMNS)).where(
            _LISTINGS.c.listing_id.in_(sa.bindparam("p_lids", expanding=True)))
        now = sa.bindparam("p_now", type_=UTCDateTime())
        self.mark_seen = (sa.update(_LISTINGS).where(_LISTINGS.c.listing_id == sa.bindparam("p_lid"))
                          .values(last_seen_at=now, last_scored_at=now))
        self.mark_seen_markets = (
            sa.update(_MARKETS)
            .where(_MARKETS.c.listing_pk == sa.select(_LISTINGS.c.id)
                   .where(_LISTINGS.c.listing_id == sa.bindparam("p_lid")).scalar_subquery())
            .values(last_seen_at=now))
        # Many rows in one statement, each answering its id with its listing_pk (the rows of one write
        # round have distinct listings): the ids are mapped back by listing. (Asking for the ids in the
        # order of the parameters instead made SQLAlchemy send a statement per row to SQLite, whose
        # RETURNING promises no order.)
        self.insert_score_many = sa.insert(_SCORES).returning(_SCORES.c.id, _SCORES.c.listing_pk)
        self.delete_matches_many = sa.delete(_MATCHES).where(
            _MATCHES.c.listing_pk.in_(sa.bindparam("p_listings", expanding=True)))
        self.insert_matches = sa.insert(_MATCHES)
        self.delete_markets_many = sa.delete(_MARKETS).where(
            _MARKETS.c.listing_pk.in_(sa.bindparam("p_listings", expanding=True)))
        self.insert_markets = sa.insert(_MARKETS)
        review = dialect_insert(dialect, _REVIEWS)
        self.upsert_review = review.on_conflict_do_update(
            index_elements=["brand_id", "listing_pk"],
            set_={"status": ReviewStatus.OPEN.value, "risk": review.excluded.risk,
                  "verdict": review.excluded.verdict, "reasons": review.excluded.reasons,
                  "score_id": review.excluded.score_id, "updated_at": review.excluded.updated_at},
            # A brand's decision is never overwritten. (Not IN: an expanding list cannot run many times.)
            where=sa.or_(*(_REVIEWS.c.status == s for s in _REOPENABLE)),
        )
        # After the upserts of a batch: the items of its listings. An item the batch opened or refreshed
        # carries the batch's score id; one a brand already decided kept its own.
        self.reviews_of_listings = sa.select(_REVIEWS.c.id, _REVIEWS.c.brand_id, _REVIEWS.c.listing_pk,
                                             _REVIEWS.c.score_id).where(
            _REVIEWS.c.listing_pk.in_(sa.bindparam("p_listings", expanding=True)))
        self.clear_reviews = (
            sa.update(_REVIEWS)
            .where(_REVIEWS.c.listing_pk == sa.bindparam("p_listing"),
                   _REVIEWS.c.status == ReviewStatus.OPEN.value, _REVIEWS.c.id != sa.bindparam("p_keep"))
            .values(status=ReviewStatus.CLEARED.value, updated_at=sa.bindparam("p_now", type_=UTCDateTime())))
        brand = sa.bindparam("p_brand", type_=sa.Integer())
        confirmed = (sa.select(_REVIEWS.c.id)
                     .where(_REVIEWS.c.listing_pk == _LISTINGS.c.id, _REVIEWS.c.brand_id == brand,
                            _REVIEWS.c.status == ReviewStatus.CONFIRMED.value).exists())
        # The sku's market, newest first (listing_markets: written with the matches, see
        # ``_market_of``): one index walked from its newest end, stopping at the limit.
        prices = (sa.select(_LISTINGS.c.listing_id, _LISTINGS.c.price, _LISTINGS.c.currency)
                  .select_from(_MARKETS.join(_LISTINGS, _LISTINGS.c.id == _MARKETS.c.listing_pk))
                  .where(_MARKETS.c.brand_id == brand, _MARKETS.c.sku == sa.bindparam("p_sku"),
                         _LISTINGS.c.price.is_not(None), ~confirmed)
                  .order_by(_MARKETS.c.last_seen_at.desc(), _MARKETS.c.listing_pk.desc())
                  # A literal LIMIT: with a parameter, PostgreSQL's generic plan (psycopg prepares
                  # repeated statements) assumes a small limit and walks every listing by date.
                  .limit(sa.bindparam("p_limit", type_=sa.Integer(), literal_execute=True)))
        self.market_prices = prices
        self.confirmed_by_seller = (
            sa.select(_LISTINGS.c.seller_id, sa.func.count(sa.distinct(_LISTINGS.c.id)))
            .select_from(_REVIEWS.join(_LISTINGS, _LISTINGS.c.id == _REVIEWS.c.listing_pk))
            .where(_LISTINGS.c.seller_id.in_(sa.bindparam("p_sellers", expanding=True)),
                   _REVIEWS.c.status == ReviewStatus.CONFIRMED.value)
            .group_by(_LISTINGS.c.seller_id))
        self.brand_ids = sa.select(Brand.id, Brand.slug).where(
            Brand.slug.in_(sa.bindparam("p_slugs", expanding=True)))
        self.brand_id = sa.select(Brand.id).where(Brand.slug == sa.bindparam("p_slug"))
        self.existing_refs = sa.select(ReferenceImage.id).where(
            ReferenceImage.id.in_(sa.bindparam("p_ids", expanding=True)))


class ListingRepository:
    """Scores, history, latest matches and review queues; also the ``ListingHistory`` port."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._sql = _Statements(db.dialect)
        # slug -> id. Brands are never deleted or renamed, so an id once seen stays right; this saves a
        # query on every record_score / market_sample call.
        self._brand_ids: dict[str, int] = {}

    # ------------------------------------------------------------------ recording

    def record_score(self, listing: Listing, result: ScoreResult,
                     source: ScoreSource | str = ScoreSource.API, *,
                     image_sha256s: Sequence[str] | None = None,
                     scored_at: datetime | None = None) -> RecordedScore:
        """Stores one score of a listing in one transaction: the listing row (created or updated by
        ``listing_id``), a history row, the listing's latest matches, and its review items (see the
        module docstring). Pixels are never stored: the image hashes come from ``image_sha256s`` or,
        when it is None, from ``listing.images``.

        A ``stored-rescan`` score leaves the listing's content and ``last_seen_at`` as they are.
        """
        got = self.record_scores([ScoreWrite(listing, result, source, image_sha256s)], scored_at=scored_at)[0]
        assert got is not None  # only skip_unchanged skips
        return got

    def record_scores(self, writes: Sequence[ScoreWrite], *, scored_at: datetime | None = None,
                      skip_unchanged: bool = False, same_as_stored: bool = False) -> list[RecordedScore | None]:
        """Stores many scores in one transaction (each exactly as :meth:`record_score` would): a batch
        shares one commit, which is most of a score's write cost on SQLite and a round trip on PostgreSQL.

        Every write is validated before anything is written (but those ``skip_unchanged`` leaves out:
        nothing of them is written); one invalid write raises :class:`InvalidInputError` naming it
        (``writes[i]...``) and nothing is stored.

        ``skip_unchanged``: a write whose result has the digest the listing's latest result already has
        (``ScoreWrite.previous_digest``, as read with the listing) is left out and answered None: its
        history row would repeat the latest one and nothing else would move. A ``--stored`` rescan after
        a catalog change rewrites only the listings whose result changed.

        ``same_as_stored``: the same for writes that carry no digest, against what is stored now: a
        listing stored with the same content (title, description, price, seller, photos) whose latest
        result has the new result's digest is only marked seen and scored (``last_seen_at``,
        ``last_scored_at``) and answered None. A file rescan of listings whose results did not change
        adds no history rows that repeat the latest ones, nor rewrites their matches and review items.
        """
        now = _aware(scored_at, "scored_at") if scored_at is not None else utcnow()
        prepared: list[_Prepared | None] = []
        for i, w in enumerate(writes):
            digest = _digest_or_none(w.result) if skip_unchanged and w.previous_digest is not None else None
            if digest is not None and digest == w.previous_digest:
                # (Not validated either: nothing of it is written. A stored rescan writes a few of its
                # listings and checked every other one's fields for nothing.)
                prepared.append(None)
                continue
            try:
                prepared.append(self._prepare(w, now, digest))
            except InvalidInputError as exc:
                field = f"writes[{i}].{exc.field}" if exc.field and len(writes) > 1 else exc.field
                raise InvalidInputError(exc.message, field) from None
        seen: list[str] = []
        if same_as_stored:
            same = self._same_as_stored([p for p in prepared if p is not None])
            seen = [p.row["listing_id"] for p in prepared if p is not None and id(p) in same]
            prepared = [None if p is None or id(p) in same else p for p in prepared]
        todo = [p for p in prepared if p is not None]
        if not todo and not seen:
            return [None] * len(prepared)
        rows = [_history_rows(p) for p in todo]
        try:
            done = self._write(todo, rows, now, check_refs=False, only_seen=seen)
        except sa.exc.IntegrityError:
            # A matched reference was deleted from the catalog after the index returned it: store the
            # match without its reference id (as the FK's ON DELETE SET NULL would have done).
            done = self._write(todo, rows, now, check_refs=True, only_seen=seen)
        it = iter(done)
        return [None if p is None else next(it) for p in prepared]

    def _same_as_stored(self, todo: Sequence[_Prepared]) -> set[int]:
        """``id()`` of the writes whose listing is stored with the same content and latest digest (read
        before the write transaction: a score stored in between is newer, and is kept). A listing_id
        written twice in the batch is always written."""
        counts = Counter(p.row["listing_id"] for p in todo)
        once = {p.row["listing_id"]: p for p in todo if counts[p.row["listing_id"]] == 1}
        if not once:
            return set()
        same: set[int] = set()
        with self._db.reading() as conn:
            for chunk in chunked(list(once)):
                for row in conn.execute(self._sql.stored_state, {"p_lids": chunk}):
                    p = once[row.listing_id]
                    # (A price with more decimals than the column keeps reads back different: written.)
                    if row.latest_digest == p.digest and all(
                            getattr(row, col) == p.row[col] for col in _STATE_COLUMNS):
                        same.add(id(p))
        return same

    def _prepare(self, w: ScoreWrite, now: datetime, digest: str | None = None) -> _Prepared:
        """``digest``: the result's, where the caller made it already."""
        listing, result = w.listing, w.result
        src = _source(w.source)
        lid = validate.text(listing.listing_id, "listing_id", 255)
        if result.listing_id != lid:
            raise InvalidInputError(f"result.listing_id {result.listing_id!r} is not listing_id {lid!r}",
                                    "result.listing_id")
        hashes = [im.sha256 for im in listing.images] if w.image_sha256s is None else list(w.image_sha256s)
        shas = [validate.sha256(h, f"images[{i}].sha256") for i, h in enumerate(hashes)]
        title = validate.text(listing.title, "title", 10_000, allow_empty=True)
        description = validate.text(listing.description, "description", 200_000, allow_empty=True)
        price, currency = validate.money(listing.price, "price")
        seller = listing.seller
        seller_id = validate.text(seller.seller_id, "seller.seller_id", 255) if seller else None
        risk = float(result.risk)
        if not math.isfinite(risk):
            raise InvalidInputError(f"result.risk must be finite, got {result.risk!r}", "result.risk")
        try:
            verdict = Verdict(result.verdict)
        except ValueError:
            raise InvalidInputError(f"result.verdict {result.verdict!r} is not a verdict",
                                    "result.verdict") from None
        # (The stored JSON is made in _write: a --stored rescan leaves most results unchanged, unwritten.)
        digest = digest if digest is not None else result_digest(result)
        slugs = {m.reference.brand for m in result.matches}
        if result.brand is not None:
            slugs.add(result.brand)
        seller_counts = (
            validate.optional_count(seller.account_age_days if seller else None, "seller.account_age_days"),
            validate.optional_count(seller.units_sold_30d if seller else None, "seller.units_sold_30d"),
            validate.optional_count(seller.stock if seller else None, "seller.stock"),
        )
        row = {
            "listing_id": lid, "title": title, "description": description, "price": price,
            "currency": currency, "seller_id": seller_id, "seller_account_age_days": seller_counts[0],
            "seller_units_sold_30d": seller_counts[1], "seller_stock": seller_counts[2],
            "image_sha256s": shas, "first_seen": now, "last_seen_at": now, "last_scored_at": now,
            "latest_risk": risk, "latest_verdict": verdict.value, "latest_digest": digest,
        }
        return _Prepared(row, result, src, verdict, risk, slugs, digest)

    def _write(self, todo: Sequence[_Prepared], rows: Sequence[_HistoryRows], now: datetime, check_refs: bool,
               only_seen: Sequence[str] = ()) -> list[RecordedScore]:
        """One transaction; statements run once per batch (``executemany``) wherever their rows do not
        depend on each other. A listing scored twice in one batch is written in a later round, so its
        second score lands after its first exactly as two calls would have it. ``rows``: each write's
        :func:`_history_rows` (built once: a retry reuses them). ``only_seen``: listing_ids only marked
        seen and scored now (see ``same_as_stored``)."""
        out: list[RecordedScore | None] = [None] * len(todo)
        rounds: list[list[int]] = []
        seen: dict[str, int] = {}  # listing_id -> rounds it already appears in
        for i, p in enumerate(todo):
            r = seen.get(p.row["listing_id"], 0)
            seen[p.row["listing_id"]] = r + 1
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(i)
        with self._db.writing() as conn:
            if only_seen:
                seen_rows = [{"p_lid": lid, "p_now": now} for lid in only_seen]
                conn.execute(self._sql.mark_seen, seen_rows)
                conn.execute(self._sql.mark_seen_markets, seen_rows)
            bids = self._resolve_brands(conn, set().union(*(p.slugs for p in todo)))
            live: set[int] | None = None
            if check_refs:
                wanted = list({m.reference.image_id for p in todo for m in p.result.matches})
                live = {rid for chunk in chunked(wanted) for rid in conn.scalars(self._sql.existing_refs,
                                                                              {"p_ids": chunk})}
            for idx in rounds:
                got = self._write_round(conn, [todo[i] for i in idx], [rows[i] for i in idx], bids, now, live)
                for i, rec in zip(idx, got, strict=True):
                    out[i] = rec
        return [o for o in out if o is not None]

    def _write_round(self, conn: Connection, todo: Sequence[_Prepared], history: Sequence[_HistoryRows],
                     bids: dict[str, int], now: datetime, live: set[int] | None) -> list[RecordedScore]:
        """Write listings with distinct listing_ids (see :meth:`_write`)."""
        st = self._sql
        flagged = [bids.get(p.result.brand) if p.result.brand is not None else None for p in todo]
        pk_of: dict[str, tuple[int, datetime]] = {}  # listing_id -> (pk, last_seen_at as stored)
        for stored, stmt in ((True, st.upsert_listing_latest_many), (False, st.upsert_listing_many)):
            rows = [{**p.row, "latest_brand_id": bid} for p, bid in zip(todo, flagged, strict=True)
                    if (p.source is ScoreSource.STORED_RESCAN) == stored]
            if rows:
                pk_of.update((lid, (pk, seen)) for pk, lid, seen in conn.execute(stmt, rows))
        pks = [pk_of[p.row["listing_id"]][0] for p in todo]
        seen_at = [pk_of[p.row["listing_id"]][1] for p in todo]
        score_of = {pk: sid for sid, pk in conn.execute(st.insert_score_many, [
            {**score, "listing_pk": pk, "scored_at": now, "brand_id": bid}
            for (score, _), pk, bid in zip(history, pks, flagged, strict=True)])}
        score_ids = [score_of[pk] for pk in pks]
        for chunk in chunked(pks):
            conn.execute(st.delete_matches_many, {"p_listings": chunk})
            conn.execute(st.delete_markets_many, {"p_listings": chunk})
        match_rows = [
            {**m, "listing_pk": pk, "brand_id": bids[brand],
             "reference_image_id": (m["reference_image_id"] if live is None or m["reference_image_id"] in live
                                    else None)}
            for (_, matches), pk in zip(history, pks, strict=True) for brand, m in matches]
        if match_rows:
            conn.execute(st.insert_matches, match_rows)
        market_rows = [{"listing_pk": pk, "brand_id": bids[brand], "sku": sku, "last_seen_at": seen}
                       for (_, matches), pk, seen in zip(history, pks, seen_at, strict=True)
                       for brand, sku in _market_of(matches)]
        if market_rows:
            conn.execute(st.insert_markets, market_rows)
        # Flagged listings open (or refresh) their brand's review item: one statement for the batch, then
        # one read of which items now carry the batch's scores (a statement per listing was a round trip
        # each on PostgreSQL, and most of a batch's writes when every listing is flagged).
        reviews = [{"brand_id": bid, "listing_pk": pk, "score_id": score_id, "status": ReviewStatus.OPEN.value,
                    "risk": p.risk, "verdict": p.verdict.value, "reasons": list(p.result.reasons),
                    "created_at": now, "updated_at": now}
                   for p, pk, bid, score_id in zip(todo, pks, flagged, score_ids, strict=True)
                   if p.verdict is not Verdict.CLEAR and bid is not None]
        items: dict[tuple[int, int, int], int] = {}
        if reviews:
            conn.execute(st.upsert_review, reviews)
            flagged_pks = [r["listing_pk"] for r in reviews]
            items = {(bid, pk, sid): rid for chunk in chunked(flagged_pks)
                     for rid, bid, pk, sid in conn.execute(st.reviews_of_listings, {"p_listings": chunk})}
        out = []
        clear = []
        for pk, bid, score_id in zip(pks, flagged, score_ids, strict=True):
            item_id = items.get((bid, pk, score_id)) if bid is not None else None
            clear.append({"p_listing": pk, "p_keep": item_id or 0, "p_now": now})
            out.append(RecordedScore(score_id=score_id, listing_pk=pk, review_item_id=item_id))
        conn.execute(st.clear_reviews, clear)
        return out

    # ------------------------------------------------------------------ listings

    def get_listing(self, listing_id: str) -> ListingRecord | None:
        with self._db.read() as s:
            row = s.execute(_listing_query().where(ListingRow.listing_id == listing_id)).one_or_none()
            return None if row is None else _listing_record(row[0], row[1])

    def history(self, listing_id: str, limit: int = 100) -> list[ScoreRecord]:
        """The listing's scores, newest first (empty for an unknown listing)."""
        limit, _ = validate.page(limit, 0)
        q = (sa.select(ListingScore, Brand.slug)
             .join(ListingRow, ListingRow.id == ListingScore.listing_pk)
             .outerjoin(Brand, Brand.id == ListingScore.brand_id)
             .where(ListingRow.listing_id == listing_id)
             .order_by(ListingScore.scored_at.desc(), ListingScore.id.desc()).limit(limit))
        with self._db.read() as s:
            return [ScoreRecord(id=sc.id, listing_id=listing_id, scored_at=sc.scored_at, risk=sc.risk,
                                verdict=Verdict(sc.verdict), brand=slug, source=ScoreSource(sc.source),
                                result=sc.result, model_versions=dict(sc.model_versions))
                    for sc, slug in s.execute(q)]

    def latest_matches(self, listing_id: str) -> list[MatchRecord]:
        q = (sa.select(ListingMatch, Brand.slug)
             .join(Brand, Brand.id == ListingMatch.brand_id)
             .join(ListingRow, ListingRow.id == ListingMatch.listing_pk)
             .where(ListingRow.listing_id == listing_id).order_by(ListingMatch.id))
        with self._db.read() as s:
            return [MatchRecord(brand=slug, sku=m.sku, reference_image_id=m.reference_image_id,
                                ref_id=m.ref_id, kind=ReferenceKind(m.kind), signal=m.signal,
                                similarity=m.similarity, image_index=m.image_index)
                    for m, slug in s.execute(q)]

    def iter_stored(self, brand: str | None = None, since: datetime | None = None,
                    batch_size: int = 500, shard: tuple[int, int] | None = None) -> Iterator[ListingRecord]:
        """Stored listings in id order, for ``rescan --stored``: all of them, or those whose latest
        matches or review items involve ``brand``, and/or those the platform sent at or after ``since``
        (``last_seen_at``). Read in pages of short transactions, so a long rescan holds no snapshot.
        ``shard=(k, n)``: only the listings whose id is k modulo n (n processes share a rescan).
        An unknown brand is :class:`NotFoundError` (raised at the first ``next``)."""
        where = self._stored_filter(brand, since)
        if shard is not None:
            k, n = shard
            if not 0 <= k < n:
                raise ValueError(f"shard must be (k, n) with 0 <= k < n, got {shard}")
            where.append(_LISTINGS.c.id % n == k)
        last = 0
        while True:
            with self._db.reading() as conn:
                rows = [_listing_record(cast(ListingRow, r), r.latest_brand_slug) for r in conn.execute(
                    _STORED_QUERY.where(_LISTINGS.c.id > last, *where)
                    .order_by(_LISTINGS.c.id).limit(batch_size)).all()]
            yield from rows
            if len(rows) < batch_size:
                return
            last = rows[-1].id

    def count_stored(self, brand: str | None = None, since: datetime | None = None) -> int:
        """How many listings :meth:`iter_stored` would yield (for progress reporting)."""
        where = self._stored_filter(brand, since)
        with self._db.read() as s:
            return int(s.scalar(sa.select(sa.func.count()).select_from(ListingRow).where(*where)) or 0)

    # ------------------------------------------------------------------ ListingHistory port

    def market_prices(self, brand: str, sku: str, exclude_listing_id: str | None = None,
                      limit: int = 1000) -> list[Money]:
        """Prices of other listings whose latest matches include the brand's ``sku``, most recently
        seen first; listings the brand confirmed as counterfeit are left out of the sample. (Scoring
        reads :meth:`market_sample` once per product and leaves each listing out itself.)"""
        rows = self.market_sample(brand, sku, limit + 1)
        return [m for lid, m in rows if lid != exclude_listing_id][:limit]

    def market_sample(self, brand: str, sku: str, limit: int = 1001) -> list[tuple[str, Money]]:
        """The prices of every listing in the sku's market (as :meth:`market_prices`, none left out),
        each with its listing_id: one sample that a scorer narrows to each listing's others
        (:meth:`MarketSample.others`)."""
        with self._db.reading() as conn:
            bid = self._brand_id(conn, brand)
            if bid is None:
                return []
            params = {"p_brand": bid, "p_sku": sku, "p_limit": int(limit)}
            return [(lid, Money(float(p), c)) for lid, p, c in conn.execute(self._sql.market_prices, params).all()]

    def confirmed_counterfeits(self, seller_id: str) -> int:
        """How many of the seller's listings some brand confirmed as counterfeit."""
        return self.confirmed_counterfeits_many([seller_id]).get(seller_id, 0)

    def confirmed_counterfeits_many(self, seller_ids: Iterable[str]) -> dict[str, int]:
        """:meth:`confirmed_counterfeits` of many sellers in one query per 500 (absent: none)."""
        out: dict[str, int] = {}
        keys = list(dict.fromkeys(seller_ids))
        with self._db.reading() as conn:
            for chunk in chunked(keys):
                out.update((sid, int(n)) for sid, n in conn.execute(self._sql.confirmed_by_seller,
                                                                     {"p_sellers": chunk}))
        return out

    # ------------------------------------------------------------------ review queues (brand-scoped)

    def review_queue(self, brand: str, status: ReviewStatus | str | None = ReviewStatus.OPEN,
                     limit: int = 50, offset: int = 0) -> list[ReviewItemRecord]:
        """One page of the brand's review items: open ones riskiest first, otherwise most recently
        changed first; ``status=None`` lists every status."""
        limit, offset = validate.page(limit, offset)
        st = self._status(status) if status is not None else None
        with self._db.read() as s:
            bid = self._require_brand_id(s, brand)
            q = _review_query().where(ReviewItem.brand_id == bid)
            if st is not None:
                q = q.where(ReviewItem.status == st.value)
            if st is ReviewStatus.OPEN:
                q = q.order_by(ReviewItem.risk.desc(), ReviewItem.id)
            else:
                q = q.order_by(ReviewItem.updated_at.desc(), ReviewItem.id.desc())
            return [_review_record(item, slug, row) for item, slug, row in s.execute(q.limit(limit)
                                                                                     .offset(offset))]

    def review_counts(self, brand: str) -> dict[ReviewStatus, int]:
        """Items per status in the brand's queue (every status present, zero when none)."""
        with self._db.read() as s:
            bid = self._require_brand_id(s, brand)
            counts = {ReviewStatus(st): int(n) for st, n in s.execute(
                sa.select(ReviewItem.status, sa.func.count()).where(ReviewItem.brand_id == bid)
                .group_by(ReviewItem.status))}
        return {st: counts.get(st, 0) for st in ReviewStatus}

    def review_item(self, brand: str, item_id: int) -> ReviewItemRecord | None:
        """One of the brand's items with the full result of the score behind it; None when the brand
        has no such item (another brand's item included)."""
        with self._db.read() as s:
            bid = self._require_brand_id(s, brand)
            row = s.execute(_review_query().where(ReviewItem.brand_id == bid,
                                                  ReviewItem.id == int(item_id))).one_or_none()
            if row is None:
                return None
            item, slug, listing = row
            result = None
            if item.score_id is not None:
                result = s.scalar(sa.select(ListingScore.result).where(ListingScore.id == item.score_id))
            return _review_record(item, slug, listing, result)

    def decide(self, brand: str, item_id: int, status: ReviewStatus | str,
               decided_by: str | None = None) -> ReviewItemRecord:
        """Records the brand's decision (``confirmed`` or ``rejected``) on one of its own items; a
        decision may be changed later. :class:`NotFoundError` when the brand has no such item."""
        st = self._status(status)
        if st not in DECISIONS:
            raise InvalidInputError(f"status must be confirmed or rejected, got {st.value!r}", "status")
        who = validate.optional_text(decided_by, "decided_by", 255)
        now = utcnow()
        with self._db.write() as s:
            bid = self._require_brand_id(s, brand)
            res = s.execute(sa.update(_REVIEWS)
                            .where(_REVIEWS.c.id == int(item_id), _REVIEWS.c.brand_id == bid)
                            .values(status=st.value, decided_at=now, decided_by=who, updated_at=now))
            if not res.rowcount:  # type: ignore[attr-defined]
                raise NotFoundError(f"brand {brand!r} has no review item {item_id}", "item_id")
            item, slug, listing = s.execute(_review_query().where(ReviewItem.id == int(item_id))).one()
            return _review_record(item, slug, listing)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _status(value: ReviewStatus | str) -> ReviewStatus:
        try:
            return ReviewStatus(value)
        except ValueError:
            allowed = ", ".join(s.value for s in ReviewStatus)
            raise InvalidInputError(f"status must be one of {allowed}, got {value!r}", "status") from None

    def _stored_filter(self, brand: str | None, since: datetime | None) -> list[sa.ColumnElement[bool]]:
        """WHERE clauses of iter_stored/count_stored (an unknown brand is :class:`NotFoundError`)."""
        where: list[sa.ColumnElement[bool]] = []
        if since is not None:
            where.append(ListingRow.last_seen_at >= _aware(since, "since"))
        if brand is not None:
            with self._db.read() as s:
                bid = self._require_brand_id(s, brand)
            where.append(sa.or_(
                sa.select(_MATCHES.c.id).where(_MATCHES.c.listing_pk == ListingRow.id,
                                               _MATCHES.c.brand_id == bid).exists(),
                sa.select(_REVIEWS.c.id).where(_REVIEWS.c.listing_pk == ListingRow.id,
                                               _REVIEWS.c.brand_id == bid).exists()))
        return where

    def _resolve_brands(self, conn: Connection, slugs: Iterable[str]) -> dict[str, int]:
        wanted = set(slugs)
        missing = [x for x in wanted if x not in self._brand_ids]
        if missing:
            for bid, slug in conn.execute(self._sql.brand_ids, {"p_slugs": missing}):
                self._brand_ids[slug] = bid
            unknown = sorted(x for x in missing if x not in self._brand_ids)
            if unknown:
                raise InvalidInputError(f"result names unknown brand(s) {unknown}", "result.brand")
        return {x: self._brand_ids[x] for x in wanted}

    def _brand_id(self, conn: Connection | Session, slug: str) -> int | None:
        bid = self._brand_ids.get(slug)
        if bid is None:
            bid = conn.scalar(self._sql.brand_id, {"p_slug": slug})
            if bid is not None:
                self._brand_ids[slug] = bid
        return bid

    def _require_brand_id(self, conn: Connection | Session, slug: str) -> int:
        bid = self._brand_id(conn, validate.slug(slug))
        if bid is None:
            raise NotFoundError(f"brand {slug!r} not found", "brand")
        return bid
