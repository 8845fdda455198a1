"""The files of a rescan, without models: reading JSONL/CSV/Parquet with line numbers, validating rows
(errors name the field), confining image paths to the listings folder, and the crash-safe journals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.domain.model import Money, SellerInfo
from service.intake.errors import IntakeError, IntakeErrorCode
from service.usecases.rescan import FileRescan, default_errors_path
from service.usecases.rescan_io import (
    JsonlJournal,
    ListingRow,
    RawRow,
    RescanInputError,
    RowError,
    check_input,
    count_rows,
    image_source,
    iter_raw_rows,
    parse_row,
)


def row(**data: object) -> RawRow:
    return RawRow(7, dict(data))


# ---------------------------------------------------------------------------------------------- validation


def test_a_full_row_becomes_a_listing_row() -> None:
    r = parse_row(row(listing_id="L-1", title="Milk", description="1 l", price=12.5, currency="eur",
                      seller_id="s9", account_age_days=3, units_sold_30d="40", stock=5.0,
                      images=["a.jpg", " https://x.test/b.jpg "], shop_url="ignored"))
    assert r == ListingRow(line=7, listing_id="L-1", title="Milk", description="1 l", price=Money(12.5, "EUR"),
                           seller=SellerInfo("s9", 3, 40, 5), images=("a.jpg", "https://x.test/b.jpg"),
                           unknown_fields=("shop_url",))
    assert ListingRow.from_json(json.loads(json.dumps(r.to_json()))) == \
        ListingRow(line=7, listing_id="L-1", title="Milk", description="1 l", price=Money(12.5, "EUR"),
                   seller=SellerInfo("s9", 3, 40, 5), images=("a.jpg", "https://x.test/b.jpg"))


def test_the_api_shapes_of_price_and_seller_are_accepted() -> None:
    r = parse_row(row(listing_id=42, price={"amount": "3", "currency": "SEK"},
                      seller={"id": "s1", "stock": 2}))
    assert (r.listing_id, r.price, r.seller) == ("42", Money(3.0, "SEK"), SellerInfo("s1", None, None, 2))
    assert parse_row(row(listing_id="x", images="a.jpg|b.jpg")).images == ("a.jpg", "b.jpg")
    assert parse_row(row(listing_id="x", images='["a.jpg"]')).images == ("a.jpg",)
    assert parse_row(row(listing_id="x")).price is None


@pytest.mark.parametrize(("data", "field", "words"), [
    ({"title": "no id"}, "listing_id", "required"),
    ({"listing_id": "../etc"}, "listing_id", "must be"),
    ({"listing_id": "a", "price": "abc"}, "price", "number"),
    ({"listing_id": "a", "price": -1}, "price", ">= 0"),
    ({"listing_id": "a", "price": float("nan")}, "price", "finite"),
    ({"listing_id": "a", "price": True}, "price", "boolean"),
    ({"listing_id": "a", "price": 1, "currency": "euro"}, "currency", "ISO 4217"),
    ({"listing_id": "a", "price": {"amount": 1, "cur": "EUR"}}, "price", "unknown"),
    ({"listing_id": "a", "stock": 3}, "seller_id", "required"),
    ({"listing_id": "a", "seller_id": "s", "stock": -2}, "stock", "whole number"),
    ({"listing_id": "a", "seller_id": "s", "account_age_days": 1.5}, "account_age_days", "whole number"),
    ({"listing_id": "a", "title": 5}, "title", "string"),
    ({"listing_id": "a", "title": "x" * 2001}, "title", "at most"),
    ({"listing_id": "a", "images": "[not json"}, "images", "JSON"),
    ({"listing_id": "a", "images": ["ok.jpg", ""]}, "images[1]", "non-empty"),
    ({"listing_id": "a", "images": 3}, "images", "list"),
])
def test_a_bad_row_names_its_field(data: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(RowError) as err:
        parse_row(RawRow(3, data))
    assert err.value.field == field
    assert words in err.value.message


def test_an_unparsed_line_keeps_its_reason() -> None:
    with pytest.raises(RowError, match="not valid JSON"):
        parse_row(RawRow(2, None, "not valid JSON: x"))


# ---------------------------------------------------------------------------------------------- formats


def test_jsonl_rows_keep_their_physical_line_numbers(tmp_path: Path) -> None:
    p = tmp_path / "l.jsonl"
    p.write_text('{"listing_id": "a"}\n\n{broken\n[1, 2]\n{"listing_id": "b"}\n')
    rows = list(iter_raw_rows(p))
    assert [(r.line, r.data is not None) for r in rows] == [(1, True), (3, False), (4, False), (5, True)]
    assert "JSON" in (rows[1].error or "") and "object" in (rows[2].error or "")
    assert count_rows(p) == 4


def test_csv_rows_number_lines_from_the_header(tmp_path: Path) -> None:
    p = tmp_path / "l.csv"
    p.write_text("listing_id, title,price,currency,images\n"
                 "a,Milk,3.5,EUR,x.jpg|y.jpg\n"
                 "b,,,,\n"
                 "c,too,many,values,here,extra\n")
    rows = list(iter_raw_rows(p))
    assert [r.line for r in rows] == [2, 3, 4]
    assert parse_row(rows[0]) == ListingRow(2, "a", "Milk", "", Money(3.5, "EUR"), None, ("x.jpg", "y.jpg"))
    assert rows[1].data == {"listing_id": "b"}  # empty cells are absent values
    assert rows[2].data is None and "more values" in (rows[2].error or "")
    assert count_rows(p) == 3 and check_input(p) == "csv"


def test_parquet_rows_with_list_columns(tmp_path: Path) -> None:
    p = tmp_path / "l.parquet"
    pq.write_table(pa.table({"listing_id": ["a", "b"], "price": [1.0, None], "images": [["x.jpg"], []],
                             "seller_id": ["s", None]}), p)
    rows = [parse_row(r) for r in iter_raw_rows(p)]
    assert rows[0] == ListingRow(1, "a", "", "", Money(1.0, "USD"), SellerInfo("s"), ("x.jpg",))
    assert rows[1] == ListingRow(2, "b", "", "", None, None, ())
    assert count_rows(p) == 2 and check_input(p) == "parquet"


@pytest.mark.parametrize(("name", "content", "words"), [
    ("l.txt", "x", "unknown listings format"),
    ("l.csv", "id,title\n1,x\n", "no listing_id column"),
    ("l.parquet", "not parquet", "not a readable Parquet"),
    ("missing.jsonl", None, "no such listings file"),
])
def test_unusable_inputs_are_refused_up_front(tmp_path: Path, name: str, content: str | None,
                                              words: str) -> None:
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    with pytest.raises(RescanInputError, match=words):
        check_input(p)


# ---------------------------------------------------------------------------------------------- image paths


def test_image_paths_stay_inside_the_listings_folder(tmp_path: Path) -> None:
    base = (tmp_path / "in").resolve()
    (base / "photos").mkdir(parents=True)
    (tmp_path / "secret.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "secret.jpg", base / "photos" / "link.jpg")
    inside = image_source("photos/a.jpg", base, 0)
    assert inside.path == base / "photos" / "a.jpg" and inside.field == "images[0]"
    assert image_source(str(base / "photos" / "a.jpg"), base, 0).path == base / "photos" / "a.jpg"
    assert image_source("https://cdn.example/a.jpg", base, 1).url == "https://cdn.example/a.jpg"
    for bad in ("../secret.jpg", "photos/../../secret.jpg", str(tmp_path / "secret.jpg"), "/etc/passwd",
                "photos/link.jpg", "file:///etc/passwd", "ftp://x/y.jpg", "data:image/png;base64,AAAA"):
        with pytest.raises(IntakeError) as err:
            image_source(bad, base, 2)
        assert err.value.code is IntakeErrorCode.URL_FORBIDDEN and err.value.field == "images[2]", bad


# ---------------------------------------------------------------------------------------------- journals


def test_a_journal_commits_whole_lines_and_recovery_cuts_a_torn_tail(tmp_path: Path) -> None:
    p = tmp_path / "out.jsonl"
    j = JsonlJournal(p, append=False)
    j.append({"listing_id": "a", "risk": 0.5})
    assert p.read_bytes() == b""  # buffered until commit
    j.commit()
    j.append({"listing_id": "b"})
    j.close()
    assert p.read_text().splitlines() == ['{"listing_id":"a","risk":0.5}', '{"listing_id":"b"}']
    with p.open("ab") as fh:  # what a kill -9 in the middle of a write can leave
        fh.write(b'{"listing_id":"c","ri')
    assert [r["listing_id"] for r in JsonlJournal.recover(p)] == ["a", "b"]
    assert p.read_bytes().endswith(b'{"listing_id":"b"}\n')
    j = JsonlJournal(p, append=True)
    j.append({"listing_id": "c"})
    j.close()
    assert [r["listing_id"] for r in JsonlJournal.recover(p)] == ["a", "b", "c"]


def test_recovery_refuses_a_file_that_is_not_a_journal(tmp_path: Path) -> None:
    p = tmp_path / "out.jsonl"
    p.write_text('{"listing_id": "a"}\nhello\n')
    with pytest.raises(RescanInputError, match="line 2"):
        JsonlJournal.recover(p)


def test_prepare_refuses_to_overwrite_results_without_resume_or_overwrite(tmp_path: Path) -> None:
    listings = tmp_path / "l.jsonl"
    listings.write_text('{"listing_id": "a"}\n')
    out = tmp_path / "r.jsonl"
    out.write_text('{"listing_id": "a"}\n')
    assert default_errors_path(out) == tmp_path / "r.errors.jsonl"
    with pytest.raises(RescanInputError, match="--resume"):
        FileRescan(listings, out).prepare()
    with pytest.raises(RescanInputError, match="exclude"):
        FileRescan(listings, out, resume=True, overwrite=True)
    with pytest.raises(RescanInputError, match="different files"):
        FileRescan(listings, listings, resume=True).prepare()
    default_errors_path(out).write_text('{"line": 4, "error": "x"}\n{"line": 9, "err')
    point = FileRescan(listings, out, resume=True).prepare()
    assert point.done_ids == {"a"} and point.handled_lines == {4}
    assert FileRescan(listings, out, overwrite=True).prepare().count == 0
