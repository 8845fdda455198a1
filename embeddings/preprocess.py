"""How a model wants its pixels: the preprocessing config written beside each ONNX model, and the function
that turns decoded RGB photos into that model's input tensor.

The config is written once, at export time, as ``preprocess.json`` in the model's folder and read back from
there by the serving code, so the resize, crop and normalisation of a model are never typed twice.  The
resize and crop reproduce torchvision's behaviour on PIL images (which is what open_clip and the ImageNet
recipes run at training/evaluation time), so an exported model sees the same pixels its PyTorch original
saw.

One exception, for speed: a bilinear resize that only enlarges (a photo smaller than the model input,
as SSCD's 320 px from a 256 px listing photo) runs in OpenCV, 15x faster than Pillow here (0.06 ms
against 0.85 ms a photo). Enlarging, the two compute the same interpolation (no antialiasing filter is
involved) and differ by rounding only: at most 1 of 255 in a channel. Shrinking stays with Pillow, whose
antialiasing OpenCV's bilinear lacks.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.domain.model import RGBImage

PREPROCESS_FILE = "preprocess.json"

ResizeMode = Literal["shortest_crop", "squash"]
Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos", "box"]

_PIL_FILTERS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


class PreprocessError(ValueError):
    """An image (or batch) that the model cannot take: wrong type, dtype, shape or size."""


class PreprocessConfig(BaseModel):
    """Everything between a decoded RGB photo and the model's input tensor.

    ``size`` is the (height, width) the model sees.  ``resize_mode``:

    - ``shortest_crop``: resize so the shorter side is ``resize_shortest`` (aspect kept), then take the
      centred ``size`` crop -- the classification/CLIP recipe.
    - ``squash``: resize straight to ``size`` (aspect not kept) -- what SSCD recommends for copy
      detection, since a crop would throw away the edges where edits often are.

    With ``input_dtype="float32"`` the pixels are scaled to [0, 1] and normalised with ``mean``/``std``
    (per RGB channel); with ``input_dtype="uint8"`` the raw pixels are passed and the model normalises
    them inside its graph (``mean``/``std`` must then be absent).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    input_name: str = Field(min_length=1)
    output_name: str = Field(min_length=1)
    dim: int = Field(ge=1, description="length of one output vector")
    size: tuple[int, int] = Field(description="(height, width) of the model input")
    resize_mode: ResizeMode
    resize_shortest: int | None = Field(
        default=None, ge=1, description="shorter side before the centre crop (shortest_crop only)"
    )
    interpolation: Interpolation = "bilinear"
    input_dtype: Literal["float32", "uint8"] = "float32"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> PreprocessConfig:
        if min(self.size) < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        if self.resize_mode == "shortest_crop":
            if self.resize_shortest is None:
                raise ValueError("resize_shortest is required when resize_mode is 'shortest_crop'")
            if self.resize_shortest < min(self.size):
                raise ValueError(
                    f"resize_shortest ({self.resize_shortest}) must be at least the crop's shorter side "
                    f"({min(self.size)})"
                )
        elif self.resize_shortest is not None:
            raise ValueError("resize_shortest only applies to resize_mode 'shortest_crop'")
        if self.input_dtype == "float32":
            if self.mean is None or self.std is None:
                raise ValueError("mean and std are required when input_dtype is 'float32'")
            if any(s <= 0 for s in self.std):
                raise ValueError(f"std must be positive, got {self.std}")
        elif self.mean is not None or self.std is not None:
            raise ValueError("mean/std must be absent when input_dtype is 'uint8' (the graph normalises)")
        return self

    # -- persistence -------------------------------------------------------------------------------

    def to_json(self) -> str:
        """Canonical JSON (sorted keys), so equal configs have equal bytes and equal hashes."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=2) + "\n"

    def write(self, model_dir: Path) -> Path:
        """Write ``preprocess.json`` into ``model_dir`` atomically (readers never see half a file)."""
        model_dir.mkdir(parents=True, exist_ok=True)
        path = model_dir / PREPROCESS_FILE
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def read(cls, model_dir: Path) -> PreprocessConfig:
        path = model_dir / PREPROCESS_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"no {PREPROCESS_FILE} in {model_dir}: model not exported") from None
        return cls.model_validate_json(text)

    # -- the transform -----------------------------------------------------------------------------

    def input_shape(self, batch: int) -> tuple[int, int, int, int]:
        h, w = self.size
        return (batch, 3, h, w) if self.layout == "NCHW" else (batch, h, w, 3)

    @property
    def source_side(self) -> int:
        """The shorter side a photo needs for this preprocessing to only shrink it: a photo decoded at a
        smaller scale (JPEG's 1/2, 1/4, 1/8) but not below this loses nothing the model would have seen
        beyond resampling noise (see ``service.intake.images.decode_image``)."""
        if self.resize_mode == "squash":
            return max(self.size)
        assert self.resize_shortest is not None  # guaranteed by the validator
        return self.resize_shortest

    def resize_one(self, image: RGBImage) -> npt.NDArray[np.uint8]:
        """Resize/crop one validated image to ``size``; returns (h, w, 3) uint8, possibly a view of ``image``
        (the caller copies it into the batch)."""
        target_h, target_w = self.size
        h, w = image.shape[:2]
        if self.resize_mode == "squash":
            new_w, new_h = target_w, target_h
        else:
            assert self.resize_shortest is not None  # guaranteed by the validator
            new_w, new_h = _shortest_side_size(w, h, self.resize_shortest, target_w, target_h)
        if self._enlarges(image, new_w, new_h):
            resized = _enlarge(image, new_w, new_h)
        elif (new_w, new_h) != (w, h):
            pil = Image.fromarray(np.ascontiguousarray(image))
            resized = np.asarray(pil.resize((new_w, new_h), _PIL_FILTERS[self.interpolation]), dtype=np.uint8)
        else:
            resized = image
        if self.resize_mode == "squash":
            return resized
        # torchvision's CenterCrop: offsets rounded half-to-even, as Python's round() does.
        top = round((new_h - target_h) / 2.0)
        left = round((new_w - target_w) / 2.0)
        return resized[top:top + target_h, left:left + target_w]

    def _enlarges(self, image: RGBImage, new_w: int, new_h: int) -> bool:
        """A bilinear resize to (new_w, new_h) that enlarges the image in one side at least and shrinks
        it in none (see the module doc)."""
        h, w = image.shape[:2]
        return self.interpolation == "bilinear" and new_w >= w and new_h >= h and (new_w, new_h) != (w, h)


def _enlarge(image: RGBImage, new_w: int, new_h: int) -> npt.NDArray[np.uint8]:
    # OpenCV's pixel centres and bilinear weights are Pillow's when enlarging; one OpenCV thread (the
    # caller's), as the service sets for the whole process (keypoints.opencv_threads).
    return np.asarray(cv2.resize(np.ascontiguousarray(image), (new_w, new_h), interpolation=cv2.INTER_LINEAR))


def _shortest_side_size(w: int, h: int, shortest: int, crop_w: int, crop_h: int) -> tuple[int, int]:
    """torchvision ``Resize(int)`` on a PIL image: the shorter side becomes ``shortest``, the longer one is
    scaled and truncated.  Grown further where needed so that a non-square crop always fits."""
    if w <= h:
        new_w, new_h = shortest, int(shortest * h / w)
    else:
        new_w, new_h = int(shortest * w / h), shortest
    if new_w < crop_w or new_h < crop_h:
        scale = max(crop_w / w, crop_h / h)
        new_w, new_h = max(crop_w, round(w * scale)), max(crop_h, round(h * scale))
    return new_w, new_h


def validate_image(image: object, where: str) -> RGBImage:
    """Check one image is an (H, W, 3) uint8 array; the error names the offending item."""
    if not isinstance(image, np.ndarray):
        raise PreprocessError(f"{where}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise PreprocessError(f"{where}: expected dtype uint8 (RGB pixels 0-255), got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise PreprocessError(f"{where}: expected shape (H, W, 3) RGB, got {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise PreprocessError(f"{where}: empty image of shape {image.shape}")
    return image


def validate_batch(images: Sequence[RGBImage] | npt.NDArray[np.uint8]) -> list[RGBImage]:
    """Check a batch of images (a sequence, not a single stacked array); returns them as a list."""
    if isinstance(images, np.ndarray):
        # A stacked (n, H, W, 3) array is accepted: its rows are the images.
        if images.ndim != 4:
            raise PreprocessError(
                f"images: expected a sequence of (H, W, 3) arrays or an (n, H, W, 3) array, "
                f"got an array of shape {images.shape}"
            )
        seq: Sequence[object] = list(images)
    elif isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise PreprocessError(f"images: expected a sequence of RGB arrays, got {type(images).__name__}")
    else:
        seq = images
    return [validate_image(img, f"images[{i}]") for i, img in enumerate(seq)]


def preprocess_batch(
    config: PreprocessConfig, images: Sequence[RGBImage] | npt.NDArray[np.uint8]
) -> npt.NDArray[np.generic]:
    """RGB uint8 photos of any size -> the model's input tensor (float32 normalised or uint8 raw, in the
    config's layout).  Raises :class:`PreprocessError` naming the bad item."""
    batch = validate_batch(images)
    out_dtype = np.float32 if config.input_dtype == "float32" else np.uint8
    out = np.empty(config.input_shape(len(batch)), dtype=out_dtype)
    if config.input_dtype == "float32":
        assert config.mean is not None and config.std is not None
        # Folding /255, -mean and /std into one multiply-add per channel.
        mean = np.asarray(config.mean, dtype=np.float32)
        std = np.asarray(config.std, dtype=np.float32)
        scale = (1.0 / (255.0 * std)).astype(np.float32)
        shift = (-mean / std).astype(np.float32)
    for i, image in enumerate(batch):
        pixels = config.resize_one(image)
        if config.input_dtype == "uint8":
            out[i] = pixels if config.layout == "NHWC" else pixels.transpose(2, 0, 1)
            continue
        # Written in place, a channel at a time: no float temporaries and no transposed copy. The same
        # float32 operations as ``pixels.astype(np.float32) * scale + shift``, so the same values, at a
        # quarter of the time (effnet, 224 px: 0.08 against 0.34 ms a photo). On a GPU this was most of
        # effnet's cost a photo: 1.1-1.3 ms of preprocessing against 0.18 ms in the model (H100).
        if config.layout == "NCHW":
            for c in range(3):
                np.multiply(pixels[:, :, c], scale[c], out=out[i, c])
                out[i, c] += shift[c]
        else:
            np.multiply(pixels, scale, out=out[i])
            out[i] += shift
    return out


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file via a temporary sibling and a rename, so a crash leaves the old file or the new
    one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates the file private (0600); these are plain readable configs.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
