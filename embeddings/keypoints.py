"""Local features of a photo: SIFT keypoints and descriptors (OpenCV), for geometric verification.

A global embedding (SSCD, EfficientNet) describes the whole photo, so a product cut out and pasted on a
new scene, or another photo of the same packaging on a shelf, moves it far from the official photo.
SIFT keypoints describe small patches (a corner of a letter, an edge of a logo) that survive those
changes; :class:`index.keypoint_index.FaissKeypointIndex` finds the references whose patches reappear in
the photo under one geometric transform. Measured on the quality benchmark (docs/quality.md): edited
copies on a new background and natural photos of the packaging match their reference with 8-490
inliers, unrelated photos reach 4-9.
"""

from __future__ import annotations

import hashlib

import cv2
import numpy as np

from service.domain.model import KeypointSet, RGBImage


def set_opencv_threads(threads: int) -> None:
    """OpenCV's thread count for the whole process (0: OpenCV's default, one per core)."""
    cv2.setNumThreads(threads if threads > 0 else -1)


class SiftExtractor:
    """SIFT on the grey image, resized so its longer side is at most ``max_side`` (and upscaled to at
    least ``min_side``: a small photo has too few keypoints at its own size); the ``max_features``
    strongest keypoints are kept. Thread-safe: a detector per call (creating one costs microseconds)."""

    def __init__(self, max_side: int = 480, min_side: int = 256, max_features: int = 400) -> None:
        if not 0 < min_side <= max_side:
            raise ValueError(f"need 0 < min_side <= max_side, got {min_side} and {max_side}")
        if max_features < 8:
            raise ValueError(f"max_features must be >= 8, got {max_features}")
        self.max_side = max_side
        self.min_side = min_side
        self.max_features = max_features
        params = f"sift|{max_side}|{min_side}|{max_features}|opencv{cv2.__version__}"
        self._id = "sift@" + hashlib.sha256(params.encode()).hexdigest()[:8]

    @property
    def extractor_id(self) -> str:
        """Names the extractor and its parameters: stored features are keyed by it, like embeddings."""
        return self._id

    def extract(self, image: RGBImage) -> KeypointSet:
        h, w = image.shape[:2]
        longer = max(h, w)
        scale = min(1.0, self.max_side / longer) if longer > self.max_side else max(1.0, self.min_side / longer)
        grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
        if scale != 1.0:
            interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_CUBIC
            grey = cv2.resize(grey, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interp)
        detector = cv2.SIFT.create(nfeatures=self.max_features)
        kps, desc = detector.detectAndCompute(grey, None)
        if desc is None or not kps:
            return KeypointSet(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8),
                               grey.shape[1], grey.shape[0], scale)
        # nfeatures keeps the strongest, but OpenCV may return a few more on ties; SIFT's descriptor
        # values are integers in 0..255 stored as float32, so uint8 loses nothing.
        keep = np.argsort([-k.response for k in kps], kind="stable")[: self.max_features]
        points = np.array([kps[i].pt for i in keep], np.float32).reshape(-1, 2)
        descriptors = np.clip(np.rint(desc[keep]), 0, 255).astype(np.uint8)
        return KeypointSet(points, descriptors, grey.shape[1], grey.shape[0], scale)
