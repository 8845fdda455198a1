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

    def __init__(self, *, intra_op_threads: int = 0, min_confidence: float = 0.5, detect_side: int = 480) -> None:
        if intra_op_threads < 0:
            raise ValueError(f"intra_op_threads must be >= 0, got {intra_op_threads}")
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be within [0, 1], got {min_confidence}")
        if not 64 <= detect_side <= 4096:
            raise ValueError(f"detect_side must be within [64, 4096], got {detect_side}")
        self._threads = intra_op_threads
        self._min_confidence = min_confidence
        self._detect_side = detect_side
        self._engine: Any = None
        self._load_lock = threading.Lock()
        self._call_lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def _get_engine(self) -> Any:
        if self._engine is None:
            with self._load_lock:
                if self._engine is None:
                    from rapidocr_onnxruntime import RapidOCR

                    # -1 is rapidocr's "let ONNX Runtime decide", our 0.
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
            result, _ = engine(bgr)
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
