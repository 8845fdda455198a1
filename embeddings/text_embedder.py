"""The open_clip text tower on ONNX Runtime: strings -> torch-free CLIP tokenisation -> model ->
L2-normalised vectors in the same space as the image tower.  Implements
:class:`service.domain.ports.TextEmbedder`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from embeddings.clip_tokenizer import ClipTokenizer, TokenizerConfig
from embeddings.onnx_embedder import content_digest, l2_normalise, open_session, provider_short_name
from service.domain.model import Vectors


class OnnxTextEmbedder:
    """``model_id`` is ``<name>@<12 hex of sha256(model bytes, text.json)>``."""

    def __init__(
        self,
        name: str,
        model_path: Path,
        tokenizer: ClipTokenizer,
        config: TokenizerConfig,
        *,
        provider: str = "cpu",
        intra_op_threads: int = 0,
        max_batch: int = 64,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._name = name
        self._config = config
        self._tokenizer = tokenizer
        self._max_batch = max_batch
        self._session = open_session(model_path, provider, intra_op_threads)
        inputs = {i.name: i for i in self._session.get_inputs()}
        if config.input_name not in inputs:
            raise ValueError(f"{model_path}: input {config.input_name!r} not in {sorted(inputs)}")
        ctx = inputs[config.input_name].shape[1]
        if isinstance(ctx, int) and ctx != config.context_length:
            raise ValueError(f"{model_path}: takes {ctx} tokens, text.json says {config.context_length}")
        self._model_id = f"{name}@{content_digest(model_path, config.to_json())[:12]}"
        self._provider = provider_short_name(self._session.get_providers()[0])

    @classmethod
    def from_dir(
        cls,
        name: str,
        model_dir: Path,
        *,
        model_file: str = "text.onnx",
        provider: str = "cpu",
        intra_op_threads: int = 0,
    ) -> OnnxTextEmbedder:
        config = TokenizerConfig.read(model_dir)
        tokenizer = ClipTokenizer.from_config(model_dir, config)
        path = model_dir / model_file
        return cls(name, path, tokenizer, config, provider=provider, intra_op_threads=intra_op_threads)

    @property
    def name(self) -> str:
        return self._name

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def dim(self) -> int:
        return self._config.dim

    @property
    def provider(self) -> str:
        return self._provider

    @property
    def tokenizer(self) -> ClipTokenizer:
        return self._tokenizer

    def embed_text(self, texts: Sequence[str]) -> Vectors:
        if isinstance(texts, str):
            raise TypeError("texts: expected a sequence of strings, got a single str")
        tokens = self._tokenizer(list(texts))
        if tokens.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts = []
        for start in range(0, tokens.shape[0], self._max_batch):
            chunk = tokens[start : start + self._max_batch]
            out = self._session.run([self._config.output_name], {self._config.input_name: chunk})[0]
            parts.append(l2_normalise(np.asarray(out).reshape(chunk.shape[0], -1)))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
