"""CLIP's byte-level BPE tokeniser without torch, and the tokeniser config written beside an exported
open_clip text tower.

open_clip's own tokeniser returns torch tensors (and its module imports torch), which the serving path
must not load.  This is an independent implementation of the same published scheme -- text cleaning,
the word-splitting pattern, bytes mapped to printable characters, greedy merges by rank from the BPE
vocabulary file -- producing int64 numpy ids.  The test suite checks it against open_clip's tokeniser
on a range of strings, so the two cannot drift apart silently.
"""

from __future__ import annotations

import gzip
import html
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Literal

import ftfy
import numpy as np
import numpy.typing as npt
import regex
from pydantic import BaseModel, ConfigDict, Field

TOKENIZER_FILE = "text.json"
SOT = "<start_of_text>"
EOT = "<end_of_text>"
# CLIP's vocabulary: 256 byte symbols, their 256 end-of-word forms, 48894 merges and 2 special tokens.
_N_MERGES = 49152 - 256 - 2


class TokenizerConfig(BaseModel):
    """``text.json``: how the text tower's input ids are made (and what the ONNX graph is called)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    input_name: str = Field(min_length=1)
    output_name: str = Field(min_length=1)
    dim: int = Field(ge=1)
    context_length: int = Field(ge=3)
    vocab_file: str = Field(min_length=1, description="BPE merges (gzip text), relative to the model folder")
    clean: Literal["lower", "whitespace"] = "lower"

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    @classmethod
    def read(cls, model_dir: Path) -> TokenizerConfig:
        path = model_dir / TOKENIZER_FILE
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {model_dir}: no text tower exported") from None


@lru_cache(maxsize=1)
def byte_symbols() -> dict[int, str]:
    """Each byte value -> one printable character.  Printable Latin-1 bytes stand for themselves; the
    rest (controls, space, soft hyphen ...) are moved to code points from 256 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(keep)
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in kept:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# Words are contractions, runs of letters, single digits, or runs of other non-space symbols.
_WORD_PATTERN = regex.compile(
    rf"""{regex.escape(SOT)}|{regex.escape(EOT)}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+""",
    regex.IGNORECASE,
)


def _clean(text: str, mode: str) -> str:
    text = ftfy.fix_text(text)
    # Captions scraped from the web are often escaped twice.
    text = html.unescape(html.unescape(text)).strip()
    text = " ".join(text.split())
    return text.lower() if mode == "lower" else text


class ClipTokenizer:
    """Strings -> (n, context_length) int64 ids: start token, BPE ids, end token, zero padding; text too
    long is cut and its last kept id replaced by the end token (as CLIP does)."""

    def __init__(self, vocab_path: Path, context_length: int = 77, clean: str = "lower") -> None:
        if clean not in ("lower", "whitespace"):
            raise ValueError(f"clean must be 'lower' or 'whitespace', not {clean!r}")
        if context_length < 3:
            raise ValueError(f"context_length must be at least 3, got {context_length}")
        with gzip.open(vocab_path, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        # The first line is a version header; only the first _N_MERGES merges belong to the vocabulary.
        merges = [tuple(line.split()) for line in lines[1 : 1 + _N_MERGES]]
        if len(merges) != _N_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{vocab_path} is not a CLIP BPE merges file ({len(merges)} merges)")
        symbols = list(byte_symbols().values())
        vocab = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [SOT, EOT]
        self._ids = {tok: i for i, tok in enumerate(vocab)}
        self._rank = {(a, b): r for r, (a, b) in enumerate(merges)}
        self._bytes = byte_symbols()
        self._word_cache: dict[str, list[int]] = {}
        self.context_length = context_length
        self.clean = clean
        self.sot_id = self._ids[SOT]
        self.eot_id = self._ids[EOT]
        self.vocab_size = len(vocab)

    @classmethod
    def from_config(cls, model_dir: Path, config: TokenizerConfig) -> ClipTokenizer:
        return cls(model_dir / config.vocab_file, config.context_length, config.clean)

    def _merge(self, word: str) -> list[str]:
        """Apply merges to one word (already byte-mapped), lowest rank first, until none applies."""
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            best_rank, best_at = None, -1
            for i in range(len(parts) - 1):
                r = self._rank.get((parts[i], parts[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best_at = r, i
            if best_rank is None:
                break
            left, right = parts[best_at], parts[best_at + 1]
            # Merge every non-overlapping occurrence of this pair, left to right.
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == left and parts[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _word_ids(self, word: str) -> list[int]:
        cached = self._word_cache.get(word)
        if cached is not None:
            return cached
        if word in (SOT, EOT):
            ids = [self._ids[word]]
        else:
            mapped = "".join(self._bytes[b] for b in word.encode("utf-8"))
            ids = [self._ids[p] for p in self._merge(mapped)]
        if len(self._word_cache) < 100_000:
            self._word_cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without start/end tokens."""
        ids: list[int] = []
        for word in _WORD_PATTERN.findall(_clean(text, self.clean)):
            ids.extend(self._word_ids(word))
        return ids

    def __call__(self, texts: Sequence[str]) -> npt.NDArray[np.int64]:
        if isinstance(texts, str):
            raise TypeError("texts: expected a sequence of strings, got a single str")
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{row}]: expected str, got {type(text).__name__}")
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.eot_id
            out[row, : len(ids)] = ids
        return out
