"""The domain's value objects: how matches are ranked and reported."""

from __future__ import annotations

import numpy as np

from service.domain.model import ListingImage, Match, SignalName, match_rank
from tests.domain.builders import match


def _listed(matches: list[Match]) -> list[tuple[str, int, float]]:
    return [(m.signal.value, m.reference.image_id, m.as_contract()["similarity"]) for m in
            sorted(matches, key=match_rank)]


def test_matches_equal_at_the_reported_precision_are_listed_in_a_fixed_order() -> None:
    # A re-used official photo: its copy and lookalike matches both read 1.0, and two searches of the
    # same vectors (a batch of one, a page of 256) differ in the last bits, either way round.
    one_run = [match(SignalName.LOOKALIKE, 1.0000001), match(SignalName.COPY, 0.99999994)]
    other_run = [match(SignalName.COPY, 1.0000001), match(SignalName.LOOKALIKE, 0.99999994)]
    assert _listed(one_run) == _listed(other_run) == [("copy", 12, 1.0), ("lookalike", 12, 1.0)]


def test_stronger_matches_come_first_and_ties_go_by_signal_then_reference() -> None:
    ms = [match(SignalName.LOOKALIKE, 0.61, image_id=5),
          match(SignalName.LOGO, 0.8),
          match(SignalName.LOOKALIKE, 0.61, image_id=3),
          match(SignalName.KEYPOINTS, 0.61, image_id=9),
          match(SignalName.COPY, 0.90004),
          match(SignalName.LOOKALIKE, 0.90001, image_id=4)]
    assert _listed(ms) == [("copy", 12, 0.9), ("lookalike", 4, 0.9), ("logo", 12, 0.8), ("keypoints", 9, 0.61),
                           ("lookalike", 3, 0.61), ("lookalike", 5, 0.61)]
    assert _listed(list(reversed(ms))) == _listed(ms)


def test_model_pixels_come_from_the_smaller_decode_once_and_leave_the_photo_undecoded() -> None:
    calls: list[str] = []
    full, small = np.zeros((40, 60, 3), np.uint8), np.zeros((10, 15, 3), np.uint8)

    def decode(which: str, pixels: np.ndarray) -> np.ndarray:
        calls.append(which)
        return pixels

    im = ListingImage("ab" * 32, decode=lambda: decode("full", full), model_decode=lambda: decode("small", small))
    assert not im.model_decoded
    assert im.model_pixels is small and im.model_pixels is small
    assert (calls, im.model_decoded, im.decoded) == (["small"], True, False)
    assert im.pixels is full  # crops, keypoints, OCR: the whole photo
    assert im.model_pixels is small  # never the whole photo because it was decoded meanwhile
    assert calls == ["small", "full"]


def test_without_a_smaller_decode_the_models_see_the_photo() -> None:
    lazy = ListingImage("cd" * 32, decode=lambda: np.ones((4, 4, 3), np.uint8))
    assert not lazy.model_decoded
    assert lazy.model_pixels is lazy.pixels and lazy.model_decoded
    given = np.zeros((4, 4, 3), np.uint8)
    assert ListingImage("ef" * 32, given).model_pixels is given
