"""ONNX Runtime sessions: execution-provider choice, session options, and the image embedder that every
image backend (sscd, effnet, open_clip) runs through.

The serving path imports nothing heavier than onnxruntime and numpy: no torch.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from embeddings.preprocess import PreprocessConfig, preprocess_batch, validate_batch
from service.domain.model import RGBImage, Vectors

log = logging.getLogger(__name__)

ProviderRequest = Literal["cpu", "cuda", "auto"]

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"

_ORT_INPUT_TYPES = {"float32": "tensor(float)", "uint8": "tensor(uint8)", "int64": "tensor(int64)"}


class ProviderUnavailableError(RuntimeError):
    """The execution provider asked for (settings.models.provider) cannot be used on this machine."""


def select_providers(requested: str) -> list[str]:
    """ONNX Runtime execution providers, in priority order, for ``cpu`` | ``cuda`` | ``auto``.

    ``cuda`` fails loudly when this onnxruntime build has no CUDA provider (install ``onnxruntime-gpu``);
    ``auto`` takes CUDA when it is there and the CPU otherwise.
    """
    available = ort.get_available_providers()
    if requested == "cpu":
        return [CPU_EP]
    if requested == "cuda":
        if CUDA_EP not in available:
            raise ProviderUnavailableError(
                f"models.provider is 'cuda' but this onnxruntime ({ort.__version__}) offers only "
                f"{available}; install onnxruntime-gpu with a matching CUDA, or set it to 'cpu' or 'auto'"
            )
        return [CUDA_EP, CPU_EP]
    if requested == "auto":
        return [CUDA_EP, CPU_EP] if CUDA_EP in available else [CPU_EP]
    raise ValueError(f"models.provider must be 'cpu', 'cuda' or 'auto', not {requested!r}")


_cuda_libraries_loaded = False
_cuda_libraries_lock = threading.Lock()


def load_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries of the ``nvidia-*`` pip packages (what ``pip install
    "onnxruntime-gpu[cuda,cudnn]"`` puts beside onnxruntime) before the first CUDA session, once per process.

    ONNX Runtime's CUDA provider looks for them on the system's library path only, and where it does not
    find them it runs the model on the CPU without a word (:func:`open_session` then refuses). Measured on
    an H100 with the system's CUDA and cuDNN hidden and the libraries only as pip packages: a plain session
    fell back to the CPU, and ``OnnxEmbedder(provider="cuda")`` refused without this preload and ran both
    models on CUDA with it. ``onnxruntime.preload_dlls`` (1.21+) does the finding; on an older onnxruntime
    nothing is done here, and system libraries (an ``nvidia/cuda`` image) are found as before."""
    global _cuda_libraries_loaded
    with _cuda_libraries_lock:
        if _cuda_libraries_loaded:
            return
        _cuda_libraries_loaded = True
        preload = getattr(ort, "preload_dlls", None)
        if preload is None:
            return
        try:
            preload(cuda=True, cudnn=True, msvc=False)
        except Exception as exc:  # only a help: the session start below says what is missing
            log.warning("could not preload the CUDA libraries of the nvidia pip packages: %s", exc)


def provider_short_name(ep: str) -> str:
    """``CUDAExecutionProvider`` -> ``cuda``: the vocabulary of settings.models.provider."""
    return ep.removesuffix("ExecutionProvider").lower()


def make_session_options(
    intra_op_threads: int = 0,
    optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> ort.SessionOptions:
    """Session options with full graph optimisation; ``intra_op_threads`` 0 lets ORT use one per core."""
    if intra_op_threads < 0:
        raise ValueError(f"intra_op_threads must be >= 0, got {intra_op_threads}")
    options = ort.SessionOptions()
    options.graph_optimization_level = optimization
    options.intra_op_num_threads = intra_op_threads
    # One model call at a time per session is the micro-batcher's job; a single inter-op thread avoids
    # oversubscribing the cores with a second pool.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    # Idle pool threads sleep instead of spinning: the cores are shared with the other model's session,
    # image decoding and scoring, and a spinning pool only burns what they need (measured: two models
    # with two threads each, run side by side, 39 -> 60 photos/s each).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def open_session(
    model_path: Path,
    provider: str = "cpu",
    intra_op_threads: int = 0,
    optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> ort.InferenceSession:
    """An inference session on the requested provider; fails if ``cuda`` was asked for and ORT fell back
    to the CPU (it does so silently when the CUDA libraries cannot be loaded)."""
    providers = select_providers(provider)
    if not model_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {model_path}")
    options = make_session_options(intra_op_threads, optimization)
    if CUDA_EP in providers:
        load_cuda_libraries()
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
    active = session.get_providers()
    if provider == "cuda" and CUDA_EP not in active:
        raise ProviderUnavailableError(
            f"models.provider is 'cuda' but ONNX Runtime could not start CUDA for {model_path.name} "
            f"(active providers: {active}); check the CUDA/cuDNN libraries"
        )
    return session


def content_digest(model_path: Path, *extra: str) -> str:
    """sha256 over the model bytes and the given texts (its preprocessing/tokeniser config)."""
    h = hashlib.sha256()
    with model_path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    for text in extra:
        h.update(b"\0")
        h.update(text.encode("utf-8"))
    return h.hexdigest()


def l2_normalise(x: npt.NDArray[np.floating]) -> Vectors:
    """Rows scaled to unit length, float32; a (degenerate) all-zero row stays zero instead of NaN."""
    out = np.asarray(x, dtype=np.float32)
    if out.ndim != 2:
        raise RuntimeError(f"model returned an array of shape {out.shape}, expected (n, d)")
    if not np.isfinite(out).all():
        raise RuntimeError("model returned non-finite values")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    result: Vectors = np.ascontiguousarray(out / np.maximum(norms, 1e-12), dtype=np.float32)
    return result


def static_batch(session: ort.InferenceSession) -> int | None:
    """The batch size baked into the model's first input, or None when the batch axis is dynamic."""
    first = session.get_inputs()[0].shape[0]
    return first if isinstance(first, int) and first > 0 else None


class OnnxEmbedder:
    """An image embedder on ONNX Runtime: photos -> preprocessing (from ``preprocess.json``) -> model ->
    L2-normalised float32 rows.  Implements :class:`service.domain.ports.ImageEmbedder`.

    ``model_id`` is ``<name>@<first 12 hex of sha256(model bytes, preprocess json)>``, so it changes
    whenever the weights or the preprocessing do.  Batches larger than ``max_batch`` are split; a model
    exported with a fixed batch size is fed exactly that many rows at a time (the last chunk padded).
    """

    def __init__(
        self,
        name: str,
        model_path: Path,
        config: PreprocessConfig,
        *,
        provider: str = "cpu",
        intra_op_threads: int = 0,
        max_batch: int = 16,
        optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._name = name
        self._config = config
        self._model_path = model_path
        self._session = open_session(model_path, provider, intra_op_threads, optimization)
        self._check_graph()
        fixed = static_batch(self._session)
        self._fixed_batch = fixed
        self._chunk = fixed if fixed is not None else max_batch
        self._model_id = f"{name}@{content_digest(model_path, config.to_json())[:12]}"
        self._provider = provider_short_name(self._session.get_providers()[0])
        log.info("loaded %s from %s on %s", self._model_id, model_path, self._provider)

    @classmethod
    def from_dir(
        cls,
        name: str,
        model_dir: Path,
        *,
        model_file: str = "model.onnx",
        provider: str = "cpu",
        intra_op_threads: int = 0,
        max_batch: int = 16,
    ) -> OnnxEmbedder:
        """The model exported into ``model_dir`` with the ``preprocess.json`` beside it."""
        return cls(
            name,
            model_dir / model_file,
            PreprocessConfig.read(model_dir),
            provider=provider,
            intra_op_threads=intra_op_threads,
            max_batch=max_batch,
        )

    def _check_graph(self) -> None:
        cfg = self._config
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        where = f"{self._model_path} vs its preprocess.json"
        if cfg.input_name not in inputs:
            raise ValueError(f"{where}: input {cfg.input_name!r} not in model inputs {sorted(inputs)}")
        if cfg.output_name not in outputs:
            raise ValueError(f"{where}: output {cfg.output_name!r} not in model outputs {sorted(outputs)}")
        inp = inputs[cfg.input_name]
        if inp.type != _ORT_INPUT_TYPES[cfg.input_dtype]:
            raise ValueError(f"{where}: model input is {inp.type}, config says {cfg.input_dtype}")
        expected = cfg.input_shape(1)
        for axis, (got, want) in enumerate(zip(inp.shape[1:], expected[1:], strict=True), start=1):
            if isinstance(got, int) and got != want:
                raise ValueError(f"{where}: input axis {axis} is {got} in the model, {want} in the config")
        out_dim = outputs[cfg.output_name].shape[-1]
        if isinstance(out_dim, int) and out_dim != cfg.dim:
            raise ValueError(f"{where}: model output has {out_dim} dimensions, config says {cfg.dim}")

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
    def source_side(self) -> int:
        """The shorter side a photo needs for this model (:attr:`PreprocessConfig.source_side`)."""
        return self._config.source_side

    @property
    def provider(self) -> str:
        """The execution provider actually running the model (``cpu``, ``cuda``, ...)."""
        return self._provider

    @property
    def config(self) -> PreprocessConfig:
        return self._config

    @property
    def model_path(self) -> Path:
        return self._model_path

    @property
    def fixed_batch(self) -> int | None:
        return self._fixed_batch

    def embed(self, images: Sequence[RGBImage]) -> Vectors:
        batch = validate_batch(images)
        if not batch:
            return np.zeros((0, self.dim), dtype=np.float32)
        parts = [
            self.run_preprocessed(preprocess_batch(self._config, batch[start : start + self._chunk]))
            for start in range(0, len(batch), self._chunk)
        ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def run_preprocessed(self, tensor: npt.NDArray[np.generic]) -> Vectors:
        """Run the model on an already preprocessed tensor (n rows) and normalise the output."""
        n = tensor.shape[0]
        if self._fixed_batch is not None and n != self._fixed_batch:
            rows = [
                self._run_padded(tensor[start : start + self._fixed_batch])
                for start in range(0, n, self._fixed_batch)
            ]
            return l2_normalise(np.concatenate(rows, axis=0))
        out = self._session.run([self._config.output_name], {self._config.input_name: tensor})[0]
        return l2_normalise(np.asarray(out).reshape(n, -1))

    def _run_padded(self, chunk: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
        assert self._fixed_batch is not None
        k = chunk.shape[0]
        if k < self._fixed_batch:
            pad = np.zeros((self._fixed_batch - k, *chunk.shape[1:]), dtype=chunk.dtype)
            chunk = np.concatenate([chunk, pad], axis=0)
        out = self._session.run([self._config.output_name], {self._config.input_name: chunk})[0]
        return np.asarray(out, dtype=np.float32).reshape(self._fixed_batch, -1)[:k]
