"""RapidOCR on a real product photo with a word drawn on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from embeddings.ocr import RapidOcrReader
from embeddings.preprocess import PreprocessError
from service.domain.ports import OcrLine


@pytest.fixture(scope="module")
def reader() -> RapidOcrReader:
    return RapidOcrReader()


@pytest.fixture(scope="module")
def labelled_photo(grocery_dir: Path) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A catalogue photo, enlarged, with a white band below it carrying the word COUNTERFEIT."""
    with Image.open(grocery_dir / "catalogue" / "Bravo-Orange-Juice.jpg") as im:
        photo = im.convert("RGB").resize((im.width * 2, im.height * 2), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (max(photo.width, 480), photo.height + 90), "white")
    canvas.paste(photo, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=48)
    origin = (20, photo.height + 20)
    draw.text(origin, "COUNTERFEIT", fill="black", font=font)
    x0, y0, x1, y1 = (int(v) for v in draw.textbbox(origin, "COUNTERFEIT", font=font))
    return np.asarray(canvas), (x0, y0, x1, y1)


@pytest.mark.slow
def test_reads_the_drawn_word_with_its_box(
    reader: RapidOcrReader, labelled_photo: tuple[np.ndarray, tuple[int, int, int, int]]
) -> None:
    image, (x0, y0, x1, y1) = labelled_photo
    assert not reader.loaded  # models load on first use
    lines = reader.read(image)
    assert reader.loaded
    hits = [line for line in lines if "COUNTERFEIT" in line.text.upper().replace(" ", "")]
    assert hits, [line.text for line in lines]
    hit = hits[0]
    assert hit.confidence >= 0.8
    bx0, by0, bx1, by1 = hit.box
    # The detected box covers the drawn text (detection pads it a little).
    assert bx0 <= x0 + 8 and by0 <= y0 + 8 and bx1 >= x1 - 8 and by1 >= y1 - 8
    assert 0 <= bx0 < bx1 <= image.shape[1] and 0 <= by0 < by1 <= image.shape[0]


@pytest.mark.slow
def test_a_large_photo_is_read_at_the_detection_size_with_boxes_in_its_own_pixels(
    reader: RapidOcrReader, labelled_photo: tuple[np.ndarray, tuple[int, int, int, int]]
) -> None:
    """Text is detected on the photo resized to ``detect_side`` (480) on its longer side; the boxes come
    back in the photo's own pixels."""
    image, box = labelled_photo
    k = 2.5
    big = np.asarray(Image.fromarray(image).resize((round(image.shape[1] * k), round(image.shape[0] * k)),
                                                   Image.Resampling.BICUBIC))
    x0, y0, x1, y1 = (round(v * k) for v in box)
    hits = [line for line in reader.read(big) if "COUNTERFEIT" in line.text.upper().replace(" ", "")]
    assert hits
    bx0, by0, bx1, by1 = hits[0].box
    pad = 8 * k  # detection pads a little, at the detection's scale
    assert bx0 <= x0 + pad and by0 <= y0 + pad and bx1 >= x1 - pad and by1 >= y1 - pad
    assert bx1 - bx0 <= (x1 - x0) * 1.3  # in the large photo's pixels, not the detection's
    assert 0 <= bx0 < bx1 <= big.shape[1] and 0 <= by0 < by1 <= big.shape[0]


def test_a_blank_image_has_no_lines(reader: RapidOcrReader) -> None:
    assert reader.read(np.full((200, 300, 3), 255, dtype=np.uint8)) == []


def test_bad_input_is_named(reader: RapidOcrReader) -> None:
    with pytest.raises(PreprocessError, match="image: expected dtype uint8"):
        reader.read(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="min_confidence"):
        RapidOcrReader(min_confidence=2.0)
    with pytest.raises(ValueError, match="detect_side"):
        RapidOcrReader(detect_side=10)


@pytest.fixture(scope="module")
def lettered_sheet() -> np.ndarray:
    """Four words on white, one per line, at four sizes: the largest lettering is the second line."""
    canvas = Image.new("RGB", (640, 400), "white")
    draw = ImageDraw.Draw(canvas)
    for y, word, size in ((20, "REPLICA", 30), (80, "TROPICANA", 64), (190, "ORIGINAL", 44), (290, "COPY", 24)):
        draw.text((30, y), word, fill="black", font=ImageFont.load_default(size=size))
    return np.asarray(canvas)


def _words(lines: list[OcrLine]) -> list[str]:
    return [line.text.upper().replace(" ", "") for line in lines]


@pytest.mark.slow
def test_only_the_lines_with_the_largest_lettering_are_recognised(lettered_sheet: np.ndarray) -> None:
    """``max_lines`` keeps the lines whose letters are largest, answered in reading order (top to
    bottom); 0 recognises every line."""
    every = _words(RapidOcrReader(max_lines=0).read(lettered_sheet))
    assert every == ["REPLICA", "TROPICANA", "ORIGINAL", "COPY"]
    capped = RapidOcrReader(max_lines=2).read(lettered_sheet)
    assert _words(capped) == ["TROPICANA", "ORIGINAL"]
    assert capped[0].box[1] < capped[1].box[1] and capped[0].confidence >= 0.8
    assert _words(RapidOcrReader(max_lines=4).read(lettered_sheet)) == every


def test_max_lines_is_validated() -> None:
    with pytest.raises(ValueError, match="max_lines"):
        RapidOcrReader(max_lines=-1)
