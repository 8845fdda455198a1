"""``counterlens rescan`` end to end: the real CLI (in-process through Typer's runner, and as a
subprocess killed with SIGKILL) on real models, photos, indexes and SQLite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.container import build_container
from service.usecases.rescan import FileRescan, ListingRescanner, ThreadedEngine
from tests.usecases.rescan_world import (
    REFERENCE_PRICE,
    World,
    assert_same_results,
    env,
    fresh_data_dir,
    listing,
    listings_dir,
    read_jsonl,
    settings,
    write_jsonl,
)

REPO = Path(__file__).resolve().parents[2]


def cli(data_dir: Path, *args: str) -> Any:
    return CliRunner().invoke(app, ["rescan", *args], env=env(data_dir), catch_exceptions=False)


# ---------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(("args", "words"), [
    (["missing.jsonl", "--out", "r.jsonl"], "no such listings file"),
    (["l.txt", "--out", "r.jsonl"], "unknown listings format"),
    (["l.jsonl"], "--out RESULTS.jsonl is required"),
    ([], "give a LISTINGS file"),
    (["l.jsonl", "--out", "r.jsonl", "--brand", "arla"], "use them with --stored"),
    (["l.jsonl", "--out", "r.jsonl", "--resume", "--overwrite"], "exclude each other"),
    (["l.jsonl", "--out", "done.jsonl"], "pass --resume"),
    (["l.jsonl", "--out", "l.jsonl", "--overwrite"], "different files"),
    (["l.jsonl", "--out", "r.jsonl", "--address", "ray://x:1"], "--address needs --engine ray"),
    (["l.jsonl", "--out", "nowhere/r.jsonl"], "does not exist"),
    (["l.jsonl", "--stored"], "give no LISTINGS"),
    (["--stored", "--resume"], "--resume is not available"),
    (["--stored", "--since", "last tuesday"], "neither an ISO date"),
    (["--stored", "--brand", "Not A Slug"], "not a brand slug"),
    (["l.jsonl", "--out", "r.jsonl", "--engine", "spark"], "spark"),
    (["l.jsonl", "--out", "r.jsonl", "--workers", "0"], "--workers"),
    (["l.jsonl", "--out", "r.jsonl", "--chunk", "0"], "--chunk"),
    (["--stored", "--chunk", "32"], "--chunk is not available with --stored"),
    (["--stored", "--chunk", "16"], "--chunk is not available with --stored"),  # the default, given
    (["l.jsonl", "--out", "r.jsonl", "--engine", "ray", "--chunk", "16"], "--chunk is for the local engine"),
    (["l.jsonl", "--out", "r.jsonl", "--engine", "ray", "--processes", "2"], "--processes is for the local engine"),
    (["l.jsonl", "--out", "r.jsonl", "--processes", "0"], "--processes"),
    (["--stored", "--processes", "0"], "--processes"),
])
def test_bad_arguments_exit_2_with_a_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             args: list[str], words: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "l.jsonl").write_text('{"listing_id": "a"}\n')
    (tmp_path / "l.txt").write_text("x")
    (tmp_path / "done.jsonl").write_text('{"listing_id": "a"}\n')
    result = cli(tmp_path / "data", *args)
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split()), result.output
    assert not (tmp_path / "data").exists()  # refused before anything was built


# ---------------------------------------------------------------------------------------------- one run


@pytest.mark.slow
def test_broken_lines_and_unreadable_images_are_reported_not_fatal(rescan_world: World, tmp_path: Path) -> None:
    w = rescan_world
    folder = listings_dir(w, tmp_path / "in")
    (folder / "photos" / "not-an-image.jpg").write_bytes(b"this is text, not a JPEG")
    lines: list[dict[str, Any] | str] = [
        listing("ok-1", w.copies["Arla-Standard-Milk"], price=3.0),  # line 1
        "{this is not json",  # 2
        {"title": "no id", "images": []},  # 3
        listing("bad-price", w.instore[0][1], price="cheap"),  # type: ignore[arg-type]  # 4
        listing("missing-image", "nope.jpg"),  # 5
        listing("escape", None, images=["../../etc/passwd"]),  # 6
        listing("broken-image", "not-an-image.jpg"),  # 7
        listing("ok-2", w.instore[1][1]),  # 8
        listing("ok-1", w.instore[2][1]),  # 9: a duplicate id
        listing("bad-currency", w.instore[3][1], currency="XYZ"),  # 10
    ]
    src = write_jsonl(folder / "listings.jsonl", lines)
    data = fresh_data_dir(w, tmp_path / "data")
    # Chunks of 3 over two worker processes: the good, bad and duplicate lines fall into different
    # scoring chunks and still come out in input order.
    result = cli(data, str(src), "--out", str(tmp_path / "results.jsonl"), "--errors", str(tmp_path / "errors.jsonl"),
                 "--chunk", "3", "--processes", "2")
    assert result.exit_code == 0, result.output
    assert [r["listing_id"] for r in read_jsonl(tmp_path / "results.jsonl")] == ["ok-1", "ok-2"]
    errors = {e["line"]: e for e in read_jsonl(tmp_path / "errors.jsonl")}
    assert {n: (e["listing_id"], e["field"], e["code"]) for n, e in errors.items()} == {
        2: (None, None, "invalid_line"),
        3: (None, "listing_id", "invalid_line"),
        4: ("bad-price", "price", "invalid_line"),
        5: ("missing-image", "images[0]", "fetch_failed"),
        6: ("escape", "images[0]", "url_forbidden"),
        7: ("broken-image", "images[0]", "unsupported_type"),
        9: ("ok-1", "listing_id", "duplicate"),
        10: ("bad-currency", "currency", "unknown_currency"),
    }
    assert "line 1" in errors[9]["error"] and "JSON" in errors[2]["error"]
    summary = " ".join(result.stdout.split())
    assert "errors │ 8" in summary and "listings/s" in summary
    assert "likely_counterfeit" in summary and "clear" in summary


@pytest.mark.slow
def test_a_file_where_nothing_can_be_processed_exits_1(rescan_world: World, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "l.jsonl", ["not json", '{"no": "id"}'])
    result = cli(fresh_data_dir(rescan_world, tmp_path / "data"), str(src), "--out", str(tmp_path / "r.jsonl"))
    assert result.exit_code == 1, result.output
    assert "not one listing could be processed" in " ".join(result.output.split())
    assert len(read_jsonl(tmp_path / "r.errors.jsonl")) == 2


@pytest.mark.slow
def test_stored_rescan_from_the_cli(rescan_world: World, tmp_path: Path) -> None:
    w = rescan_world
    folder = listings_dir(w, tmp_path / "in")
    rows = [listing("c-1", w.copies["Alpro-Shelf-Soy-Milk"], price=2.0)]
    rows += [listing(f"s-{i}", name) for i, (_, name) in enumerate(w.instore[:3])]
    data = fresh_data_dir(w, tmp_path / "data")
    assert cli(data, str(write_jsonl(folder / "l.jsonl", rows)), "--out", str(tmp_path / "r.jsonl")).exit_code == 0

    result = cli(data, "--stored", "--since", "1h", "--out", str(tmp_path / "stored.jsonl"))
    assert result.exit_code == 0, result.output
    assert_same_results(read_jsonl(tmp_path / "r.jsonl"), read_jsonl(tmp_path / "stored.jsonl"))
    assert "newly flagged │ 0" in " ".join(result.stdout.split())
    scoped = cli(data, "--stored", "--brand", "alpro", "--processes", "2")
    assert scoped.exit_code == 0, scoped.output
    assert "stored rescan (brand alpro)" in scoped.stdout
    assert cli(data, "--stored", "--brand", "nosuch").exit_code == 2
    future = cli(data, "--stored", "--since", "2999-01-01")
    assert future.exit_code == 0 and "(0 in" in " ".join(future.stdout.split())


# ---------------------------------------------------------------------------------------------- kill -9


def complete_lines(path: Path) -> int:
    if not path.exists():
        return 0
    return path.read_bytes().count(b"\n")


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_results(rescan_world: World, tmp_path: Path) -> None:
    w = rescan_world
    folder = listings_dir(w, tmp_path / "in")
    # One price for every listing, equal to the reference price: the market statistic (which depends on
    # which other listings happen to be stored already) cannot differ between the runs compared.
    # Each photo three times (photos re-used across listings, as on marketplaces): a Ctrl-C drains the
    # listings in flight (17-33 lines written here, more on a loaded machine) and a resumed run re-uses
    # the cached embeddings, so the rows must outlast both by far for the kill -9 to land mid-run (with
    # 69 rows it once landed after the last line, in CI).
    rows = [listing(f"L{i:03d}", name, price=REFERENCE_PRICE) for i, (_, name) in enumerate(w.instore * 3)]
    rows += [listing(f"C-{sku}", name, price=REFERENCE_PRICE) for sku, name in w.copies.items()]
    src = write_jsonl(folder / "listings.jsonl", rows)

    # The reference: one uninterrupted run (in-process, on the session's models).
    ref_out = tmp_path / "reference.jsonl"
    c = build_container(settings(fresh_data_dir(w, tmp_path / "ref-data")), embedders=w.embedders)
    try:
        job = FileRescan(src, ref_out)
        job.prepare()
        assert job.run(ThreadedEngine(ListingRescanner(c.scorer, c.images, job.base), workers=4)).scored == len(rows)
    finally:
        c.close()

    data = fresh_data_dir(w, tmp_path / "data")
    out = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "service.cli", "rescan", str(src), "--out", str(out), "--checkpoint-every",
               "4", "--workers", "2"]

    def start_and_stop_at(lines: int, sig: signal.Signals, *extra: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([*command, *extra], cwd=REPO, env={**os.environ, **env(data)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240
        # Polled every 2 ms: a resumed run finds most embeddings cached and can write the ~180 lines
        # left in ~60 ms on a fast machine, so a 20 ms poll once saw the run finish before the kill.
        while complete_lines(out) < lines and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert proc.stderr is not None
        assert proc.poll() is None, f"the run ended before it could be stopped: {proc.stderr.read()!r}"
        os.kill(proc.pid, sig)
        proc.wait(timeout=120)
        return proc

    # Ctrl-C: the run stops cleanly, saying how to continue.
    stopped = start_and_stop_at(8, signal.SIGINT)
    assert stopped.returncode == 130 and stopped.stderr is not None
    assert b"--resume" in stopped.stderr.read()
    interrupted_at = complete_lines(out)
    assert 8 <= interrupted_at < len(rows) and out.read_bytes().endswith(b"\n")

    # kill -9 of the resumed run: nothing finished is lost, no line is corrupt.
    killed = start_and_stop_at(interrupted_at + 8, signal.SIGKILL, "--resume")
    assert killed.returncode == -signal.SIGKILL
    killed_at = complete_lines(out)
    assert interrupted_at + 8 <= killed_at < len(rows)
    ids = [json.loads(raw)["listing_id"] for raw in out.read_bytes().split(b"\n")[:killed_at]]
    assert len(ids) == len(set(ids)) == killed_at  # whole records, none twice

    result = cli(data, str(src), "--out", str(out), "--resume")
    assert result.exit_code == 0, result.output
    skipped = int(result.stdout.split("skipped (done before)")[1].split("│")[1])
    assert skipped >= killed_at
    final = read_jsonl(out)
    assert len(final) == len(rows) == len({r["listing_id"] for r in final})
    assert_same_results(read_jsonl(ref_out), final)
    assert read_jsonl(tmp_path / "results.errors.jsonl") == []
    # Finished listings were not redone: the resumed run wrote exactly the ones missing.
    assert f"({len(rows) - skipped} in" in " ".join(result.stdout.split())
