"""The torch-free CLIP tokenizer produces exactly open_clip's ids."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from open_clip.tokenizer import SimpleTokenizer, default_bpe

from embeddings.clip_tokenizer import ClipTokenizer

TEXTS = [
    "",
    "a photo of a cat",
    "Nike Air Max 90 — GENUINE!!! 100% original",
    "don't  stop\n\tbelieving &amp; Hello&#39;s",
    "耐克 运动鞋 正品 包邮",
    "Ünïcödé café naïve façade",
    "emoji 👟🔥 sneakers",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ",
    "<start_of_text> literal special tokens <end_of_text>",
    "model no. AB-1234/x 3.5mm 12,99€",
    "word " * 100,
]


@pytest.fixture(scope="module")
def ours() -> ClipTokenizer:
    return ClipTokenizer(Path(default_bpe()))


@pytest.mark.parametrize("clean", ["lower", "whitespace"])
@pytest.mark.parametrize("context_length", [77, 16])
def test_ids_equal_open_clips(clean: str, context_length: int) -> None:
    mine = ClipTokenizer(Path(default_bpe()), context_length=context_length, clean=clean)
    theirs = SimpleTokenizer(context_length=context_length, clean=clean)
    got = mine(TEXTS)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, theirs(TEXTS).numpy())


def test_long_text_is_cut_and_still_ends_with_the_end_token(ours: ClipTokenizer) -> None:
    ids = ours(["word " * 200])[0]
    assert ids[0] == ours.sot_id
    assert ids[-1] == ours.eot_id
    assert (ids != 0).all()


def test_vocabulary_has_clips_size(ours: ClipTokenizer) -> None:
    assert ours.vocab_size == 49408
    assert (ours.sot_id, ours.eot_id) == (49406, 49407)


def test_bad_input_is_named(ours: ClipTokenizer, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="single str"):
        ours("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"texts\[1\]: expected str, got int"):
        ours(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="clean must be"):
        ClipTokenizer(Path(default_bpe()), clean="canonicalize")
    bogus = tmp_path / "vocab.txt.gz"
    with gzip.open(bogus, "wt") as fh:
        fh.write("header\na b\n")
    with pytest.raises(ValueError, match="not a CLIP BPE merges file"):
        ClipTokenizer(bogus)
