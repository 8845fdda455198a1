"""OCR over the ONNX models packaged in ``rapidocr_onnxruntime`` (PP-OCRv4 detection and recognition,
Chinese + Latin script): the lines of text in a listing photo.  Implements
:class:`service.domain.ports.TextReader`.

The three models load on first use (about a second), under a lock, so a process that never needs OCR
never pays for it.  Calls are serialised per reader: recognition is CPU-bound and the engine's
parameters are mutable state.

Text is looked for on the photo resized to ``detect_side`` pixels on its longer side (up or down):
rapidocr's own default enlarges every photo until its *shorter* side is 736 px, 8x the pixels of a
256 px thumbnail, and detection is most of OCR's cost.  ``scripts/bench_ocr.py`` chose 480: words at
3-14 % of the photo's height are read as often as at rapidocr's default (0.97-0.98 against 0.97-1.00;
0.93 of the words under 6 %) at a quarter to a third of the time (48 against 146-182 ms a photo).

Only the ``max_lines`` lines with the largest lettering are recognised.  Recognition costs ~11 ms a
line on one thread, and a packaging photo can hold 15-21 lines (a fifth of the grocery in-store photos
hold more than 4): reading them all took up to 270 ms a photo, which set the service's slowest answers.
A brand name is most often the largest lettering on a product; ``scripts/bench_ocr.py`` measures what
the cap loses on words printed over real packaging.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import cv2
import numpy as np

from embeddings.preprocess import validate_image
from service.domain.model import RGBImage
from service.domain.ports import OcrLine

log = logging.getLogger(__name__)


class RapidOcrReader:
    """``read(image)`` -> lines with text, recognition confidence and an axis-aligned box (x0, y0, x1, y1)
    in the image's pixels, top to bottom.  Lines below ``min_confidence`` are dropped."""

    def __init__(self, *, intra_op_threads: int = 1, min_confidence: float = 0.5, detect_side: int = 480,
                 max_lines: int = 6) -> None:
        if intra_op_threads < 0:
            raise ValueError(f"intra_op_threads must be >= 0, got {intra_op_threads}")
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be within [0, 1], got {min_confidence}")
        if not 64 <= detect_side <= 4096:
            raise ValueError(f"detect_side must be within [64, 4096], got {detect_side}")
        if max_lines < 0:
            raise ValueError(f"max_lines must be >= 0 (0: every line), got {max_lines}")
        self._max_lines = max_lines
        self._threads = intra_op_threads
        self._min_confidence = min_confidence
        self._detect_side = detect_side
        self._engine: Any = None
        self._load_lock = threading.Lock()
        self._call_lock = threading.Lock()

    @property
    def threads(self) -> int:
        return self._threads

    @property
    def detect_side(self) -> int:
        return self._detect_side

    @property
    def max_lines(self) -> int:
        return self._max_lines

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def _get_engine(self) -> Any:
        if self._engine is None:
            with self._load_lock:
                if self._engine is None:
                    from rapidocr_onnxruntime import RapidOCR

                    # -1 is rapidocr's "let ONNX Runtime decide", our 0: a pool of one thread per
                    # core that spins while it waits (rapidocr leaves ONNX Runtime's default), so the
                    # default is one thread: in the service each OCR'd listing cost ~210 ms of CPU with
                    # the pool against ~65 with one thread (bench_score, docs/performance.md).
                    threads = self._threads or -1
                    # The photo comes resized (``read``); "min" with a side under rapidocr's multiple
                    # of 32 never enlarges it again.
                    self._engine = RapidOCR(
                        intra_op_num_threads=threads, inter_op_num_threads=1, text_score=self._min_confidence,
                        det_limit_type="min", det_limit_side_len=32,
                    )
                    log.info("loaded RapidOCR models")
        return self._engine

    def read(self, image: RGBImage) -> list[OcrLine]:
        pixels = validate_image(image, "image")
        height, width = pixels.shape[:2]
        scale = self._detect_side / max(height, width)
        # rapidocr takes numpy arrays as OpenCV does: BGR.
        bgr: np.ndarray = np.ascontiguousarray(pixels[:, :, ::-1])
        if scale != 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
        engine = self._get_engine()
        with self._call_lock:
            if self._max_lines == 0:
                result, _ = engine(bgr)
            else:
                result = self._read_largest(engine, bgr)
        lines: list[OcrLine] = []
        for points, text, score in result or []:
            confidence = float(score)
            if not text or confidence < self._min_confidence:
                continue
            pts = np.asarray(points, dtype=np.float64).reshape(-1, 2) / scale  # back to the photo's pixels
            x0 = int(np.clip(np.floor(pts[:, 0].min()), 0, width))
            y0 = int(np.clip(np.floor(pts[:, 1].min()), 0, height))
            x1 = int(np.clip(np.ceil(pts[:, 0].max()), 0, width))
            y1 = int(np.clip(np.ceil(pts[:, 1].max()), 0, height))
            lines.append(OcrLine(text=str(text), confidence=confidence, box=(x0, y0, x1, y1)))
        return lines

    def _read_largest(self, engine: Any, bgr: np.ndarray) -> list[tuple[np.ndarray, str, float]]:
        """Detect every line, recognise the ``max_lines`` with the largest lettering (in reading order):
        (corner points, text, confidence) as rapidocr answers a whole read."""
        boxes, _ = engine(bgr, use_det=True, use_cls=False, use_rec=False)
        quads = [np.asarray(b, dtype=np.float32).reshape(4, 2) for b in boxes or []]
        largest = sorted(range(len(quads)), key=lambda i: -_lettering(quads[i]))[: self._max_lines]
        out: list[tuple[np.ndarray, str, float]] = []
        for i in sorted(largest):  # detection answers top to bottom, left to right
            crop = _line_crop(bgr, quads[i])
            if crop is None:
                continue
            # One line per call: no detection, the angle classifier turns an upside-down line round.
            res, _ = engine(crop, use_det=False, use_cls=True, use_rec=True)
            if res:
                out.append((quads[i], str(res[0][0]), float(res[0][1])))
        return out


def _sides(quad: np.ndarray) -> tuple[float, float]:
    """A detected line's length and height: its corners run clockwise from the top left."""
    length = max(float(np.linalg.norm(quad[1] - quad[0])), float(np.linalg.norm(quad[2] - quad[3])))
    height = max(float(np.linalg.norm(quad[3] - quad[0])), float(np.linalg.norm(quad[2] - quad[1])))
    return length, height


def _lettering(quad: np.ndarray) -> float:
    """The size of a line's letters: its shorter side (a vertical line of text is taller than long)."""
    return min(_sides(quad))


def _line_crop(bgr: np.ndarray, quad: np.ndarray) -> np.ndarray | None:
    """The line straightened onto its own rectangle; a line standing upright is laid down to read
    left to right. None for a degenerate box."""
    length, height = _sides(quad)
    w, h = round(length), round(height)
    if w < 2 or h < 2:
        return None
    target = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float32)
    warp = cv2.getPerspectiveTransform(quad, target)
    crop = cv2.warpPerspective(bgr, warp, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    if h >= 1.5 * w:
        crop = np.ascontiguousarray(np.rot90(crop))
    return crop
