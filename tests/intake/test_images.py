"""Decoding untrusted bytes: real grocery photos and files derived from them in every colour layout the
decoder promises to handle, bombs refused from the header, and base64 / data URL payloads."""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from service.intake.errors import IntakeError, IntakeErrorCode
from service.intake.images import DecodedImage, decode_base64, decode_image, probe_image, sniff_format
from service.settings import IntakeSettings
from tests.intake.conftest import PHOTO

LIMITS = IntakeSettings()


@pytest.fixture(scope="module")
def photo(photo_bytes: bytes) -> DecodedImage:
    return decode_image(photo_bytes, LIMITS, "images[0]")


@pytest.fixture(scope="module")
def rgb(photo: DecodedImage) -> np.ndarray:
    return photo.pixels


def _encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _refused(data: bytes, code: IntakeErrorCode, limits: IntakeSettings = LIMITS) -> IntakeError:
    with pytest.raises(IntakeError) as info:
        decode_image(data, limits, "images[2].data")
    assert info.value.code == code, info.value
    assert info.value.field == "images[2].data"
    return info.value


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png(width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes) -> bytes:
    """A PNG written by hand, for layouts Pillow cannot write (16-bit RGB) or headers that lie."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw_rows))
            + _png_chunk(b"IEND", b""))


# -- real photos ---------------------------------------------------------------------------------------------


def test_real_jpeg_decodes_with_shape_and_sha256(grocery_dir: Path, photo_bytes: bytes,
                                                 photo: DecodedImage) -> None:
    reference = np.asarray(Image.open(grocery_dir / PHOTO).convert("RGB"))
    assert photo.pixels.shape == reference.shape == (photo.height, photo.width, 3)
    assert photo.pixels.dtype == np.uint8 and photo.pixels.flags.c_contiguous
    assert np.array_equal(photo.pixels, reference)
    assert photo.sha256 == hashlib.sha256(photo_bytes).hexdigest()
    assert (photo.format, photo.byte_size) == ("jpeg", len(photo_bytes))
    listing_image = photo.listing_image()
    assert listing_image.sha256 == photo.sha256 and listing_image.pixels is photo.pixels


def test_every_catalogue_photo_decodes(grocery_dir: Path) -> None:
    for path in sorted((grocery_dir / "catalogue").glob("*.jpg")):
        decoded = decode_image(path.read_bytes(), LIMITS)
        assert decoded.pixels.ndim == 3 and decoded.pixels.shape[2] == 3, path


@pytest.mark.parametrize(("fmt", "params"), [("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {}),
                                             ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"})])
def test_lossless_formats_round_trip_exactly(rgb: np.ndarray, fmt: str, params: dict[str, object]) -> None:
    data = _encode(Image.fromarray(rgb), fmt, **params)
    decoded = decode_image(data, LIMITS)
    assert decoded.format == fmt.lower()
    assert np.array_equal(decoded.pixels, rgb)


# -- EXIF orientation ----------------------------------------------------------------------------------------


def _with_orientation(rgb: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(Image.fromarray(rgb), "JPEG", quality=90, exif=exif.tobytes())


def test_exif_rotated_jpeg_comes_out_rotated(rgb: np.ndarray) -> None:
    tall = np.ascontiguousarray(rgb[:, :200])  # not square, so a rotation shows in the shape
    upright = decode_image(_with_orientation(tall, 1), LIMITS)
    rotated = decode_image(_with_orientation(tall, 6), LIMITS)  # "rotate 90 CW to display"
    assert (rotated.width, rotated.height) == (200, 256)  # as stored
    assert rotated.pixels.shape == (200, 256, 3)
    # Same JPEG scan data, only the tag differs: the pixels are exactly the upright ones turned.
    assert np.array_equal(rotated.pixels, np.rot90(upright.pixels, -1))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_all_orientations_match_pillows_exif_transpose(rgb: np.ndarray, orientation: int) -> None:
    data = _with_orientation(np.ascontiguousarray(rgb[:, :180]), orientation)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert np.array_equal(decode_image(data, LIMITS).pixels, expected)


def test_broken_exif_is_ignored_not_fatal(rgb: np.ndarray) -> None:
    data = bytearray(_with_orientation(rgb, 6))
    start = data.index(b"Exif\x00\x00")
    data[start + 6 : start + 14] = b"XX\x00\x2a\xff\xff\xff\xff"  # a TIFF header no parser accepts
    decoded = decode_image(bytes(data), LIMITS)
    assert decoded.pixels.shape == rgb.shape


# -- colour layouts ------------------------------------------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb(rgb: np.ndarray) -> None:
    data = _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    decoded = decode_image(data, LIMITS)
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape == rgb.shape
    assert np.abs(decoded.pixels.astype(int) - rgb.astype(int)).mean() < 6


def test_cmyk_jpeg_with_a_broken_icc_profile_falls_back(rgb: np.ndarray) -> None:
    data = _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95,
                   icc_profile=b"not a profile" * 10)
    assert Image.open(io.BytesIO(data)).info.get("icc_profile")
    decoded = decode_image(data, LIMITS)
    assert np.abs(decoded.pixels.astype(int) - rgb.astype(int)).mean() < 6


def test_16_bit_greyscale_png_is_scaled_not_clipped(rgb: np.ndarray) -> None:
    grey8 = np.asarray(Image.fromarray(rgb).convert("L"))
    grey16 = grey8.astype(np.uint16) * 257  # full 16-bit range: 255 -> 65535
    data = _encode(Image.fromarray(grey16), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    decoded = decode_image(data, LIMITS)
    assert np.array_equal(decoded.pixels, np.repeat(grey8[:, :, None], 3, axis=2))


def test_16_bit_rgb_png_is_scaled(rgb: np.ndarray) -> None:
    rgb16 = rgb.astype(np.uint16) * 257
    rows = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(rgb16.shape[0]))
    data = _png(rgb.shape[1], rgb.shape[0], 16, 2, rows)
    assert np.array_equal(decode_image(data, LIMITS).pixels, rgb)


def test_rgba_png_is_composited_on_white(rgb: np.ndarray) -> None:
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, :64] = 0
    alpha[:, 64:128] = 128
    data = _encode(Image.fromarray(np.dstack([rgb, alpha])), "PNG")
    out = decode_image(data, LIMITS).pixels
    assert np.all(out[:, :64] == 255)
    assert np.array_equal(out[:, 128:], rgb[:, 128:])
    half = (rgb[:, 64:128].astype(int) * 128 + 255 * 127 + 127) // 255
    assert np.array_equal(out[:, 64:128], half)


def test_palette_png_decodes_to_its_colours(rgb: np.ndarray) -> None:
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    data = _encode(pal, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode_image(data, LIMITS).pixels
    assert np.array_equal(out, np.asarray(pal.convert("RGB")))


def test_palette_png_transparency_becomes_white(rgb: np.ndarray) -> None:
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    index = np.asarray(pal)
    transparent = int(index[0, 0])
    data = _encode(pal, "PNG", transparency=transparent)
    out = decode_image(data, LIMITS).pixels
    mask = index == transparent
    assert mask.any() and np.all(out[mask] == 255)
    assert np.array_equal(out[~mask], np.asarray(pal.convert("RGB"))[~mask])


def test_greyscale_and_bilevel_images_become_three_channels(rgb: np.ndarray) -> None:
    grey = Image.fromarray(rgb).convert("L")
    assert np.array_equal(decode_image(_encode(grey, "PNG"), LIMITS).pixels[:, :, 1], np.asarray(grey))
    bilevel = decode_image(_encode(grey.convert("1"), "PNG"), LIMITS).pixels
    assert set(np.unique(bilevel)) <= {0, 255} and bilevel.shape == rgb.shape


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_images_give_their_first_frame(rgb: np.ndarray, fmt: str) -> None:
    first = Image.fromarray(rgb)
    second = Image.fromarray(255 - rgb)
    params: dict[str, object] = {"save_all": True, "append_images": [second], "duration": 100, "loop": 0}
    if fmt == "WEBP":
        params["lossless"] = True
    data = _encode(first, fmt, **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    out = decode_image(data, LIMITS).pixels.astype(int)
    assert out.shape == rgb.shape
    to_first = np.abs(out - rgb.astype(int)).mean()
    to_second = np.abs(out - (255 - rgb).astype(int)).mean()
    assert to_first < 8 < to_second  # GIF's 256-colour palette costs a little accuracy


# -- limits and bombs ----------------------------------------------------------------------------------------


def test_header_claiming_100000_squared_pixels_is_refused_without_decoding() -> None:
    # The IDAT holds 3 bytes: any attempt to decode would fail as decode_failed, not too_many_pixels, and
    # the 30 GB the header implies would be allocated first.
    data = _png(100_000, 100_000, 8, 2, b"\x00\x00\x00")
    tracemalloc.start()
    try:
        err = _refused(data, IntakeErrorCode.TOO_MANY_PIXELS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * 1024 * 1024
    assert "large" in err.message


def test_pixel_and_side_limits_apply_below_pillows_own_guard() -> None:
    limits = IntakeSettings(max_pixels=1_000_000, max_side=4000)
    err = _refused(_png(2000, 2000, 8, 2, b"\x00"), IntakeErrorCode.TOO_MANY_PIXELS, limits)
    assert "2000x2000" in err.message and "1000000" in err.message
    err = _refused(_png(5000, 10, 8, 2, b"\x00"), IntakeErrorCode.TOO_MANY_PIXELS, limits)
    assert "4000" in err.message
    # Within both limits the same lying header gets as far as the decoder, which finds no pixel data.
    _refused(_png(900, 900, 8, 2, b"\x00"), IntakeErrorCode.DECODE_FAILED, limits)


def test_jpeg_header_dimensions_are_checked_before_decoding(rgb: np.ndarray) -> None:
    data = _encode(Image.fromarray(rgb), "JPEG")
    limits = IntakeSettings(max_pixels=10_000, max_side=64)
    _refused(data, IntakeErrorCode.TOO_MANY_PIXELS, limits)


def test_more_bytes_than_the_limit_is_too_large(photo_bytes: bytes) -> None:
    limits = IntakeSettings(max_image_bytes=len(photo_bytes) - 1)
    _refused(photo_bytes, IntakeErrorCode.TOO_LARGE, limits)


# -- broken and unsupported input ----------------------------------------------------------------------------


def test_truncated_jpeg_is_decode_failed(photo_bytes: bytes) -> None:
    _refused(photo_bytes[: len(photo_bytes) // 2], IntakeErrorCode.DECODE_FAILED)


@pytest.mark.parametrize("data", [
    b"",
    b"\xff\xd8\xff" + bytes(range(256)) * 4,
    b"\x89PNG\r\n\x1a\n" + b"\x00" * 100,
    b"GIF89a\x01",
    b"RIFF\x10\x00\x00\x00WEBPVP8 garbage",
])
def test_garbage_behind_a_valid_signature_is_decode_failed(data: bytes) -> None:
    _refused(data, IntakeErrorCode.DECODE_FAILED)


@pytest.mark.parametrize(("data", "named"), [
    (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>', "SVG"),
    (b'  <svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', "SVG"),
    (b"<!DOCTYPE html><html><body><img src=x></body></html>", "HTML"),
    (b"%PDF-1.7\n...", "PDF"),
    (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00", "AVIF"),
    (b'{"image": "nope"}', "JSON"),
    (bytes(range(256)), "not a recognised image"),
])
def test_other_types_are_unsupported_whatever_is_declared(data: bytes, named: str) -> None:
    err = _refused(data, IntakeErrorCode.UNSUPPORTED_TYPE)
    assert named in err.message


def test_sniffing_ignores_file_names_and_declared_types(photo_bytes: bytes) -> None:
    assert sniff_format(photo_bytes) == "jpeg"
    assert sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8L") == "webp"
    assert sniff_format(b"RIFF\x00\x00\x00\x00AVI ") is None
    assert sniff_format(b"MM\x00*") == "tiff"


# -- base64 and data URLs ------------------------------------------------------------------------------------


def test_base64_forms_all_decode_to_the_same_bytes(photo_bytes: bytes) -> None:
    b64 = base64.b64encode(photo_bytes).decode()
    forms: list[str | bytes] = [
        b64,
        f"data:image/jpeg;base64,{b64}",
        f"DATA:image/jpeg;name=x.jpg;base64,{b64}",
        "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)),  # MIME line breaks
        base64.urlsafe_b64encode(photo_bytes).decode().rstrip("="),  # URL-safe, unpadded
        b64.encode(),
    ]
    for form in forms:
        assert decode_base64(form, "images[0].data", len(photo_bytes)) == photo_bytes


def test_base64_over_the_limit_is_refused_from_its_length(photo_bytes: bytes) -> None:
    b64 = base64.b64encode(photo_bytes).decode()
    with pytest.raises(IntakeError) as info:
        decode_base64(b64, "images[0].data", len(photo_bytes) - 1)
    assert info.value.code == IntakeErrorCode.TOO_LARGE and info.value.field == "images[0].data"
    # 50 MB of characters outside the alphabet: refused as too large before anything looks at them.
    with pytest.raises(IntakeError) as huge:
        decode_base64("!" * 50_000_000, "images[0].data", 1024 * 1024)
    assert huge.value.code == IntakeErrorCode.TOO_LARGE


@pytest.mark.parametrize(("payload", "code"), [
    ("", IntakeErrorCode.BAD_BASE64),
    ("   ", IntakeErrorCode.BAD_BASE64),
    ("abc$def", IntakeErrorCode.BAD_BASE64),
    ("QUJD=", IntakeErrorCode.BAD_BASE64),
    ("QUJDR", IntakeErrorCode.BAD_BASE64),
    ("QU=JD", IntakeErrorCode.BAD_BASE64),
    ("QUJD===", IntakeErrorCode.BAD_BASE64),
    ("QUJD====", IntakeErrorCode.BAD_BASE64),  # whole quads, yet surplus padding
    ("QUJDRA=A", IntakeErrorCode.BAD_BASE64),
    ("QUJ=QUJD", IntakeErrorCode.BAD_BASE64),
    ("data:image/png,rawbytes", IntakeErrorCode.BAD_BASE64),
    ("data:image/png;base64", IntakeErrorCode.BAD_BASE64),
    ("data:text/html;base64,PGh0bWw+", IntakeErrorCode.UNSUPPORTED_TYPE),
    ("data:image/svg+xml;utf8,<svg/>", IntakeErrorCode.BAD_BASE64),
    ("QUJDRA==\u00e9", IntakeErrorCode.BAD_BASE64),
    (b"\xff\xfe", IntakeErrorCode.BAD_BASE64),
])
def test_malformed_base64_is_a_clear_error(payload: str | bytes, code: IntakeErrorCode) -> None:
    with pytest.raises(IntakeError) as info:
        decode_base64(payload, "images[1].data", 1024)
    assert info.value.code == code, info.value
    assert info.value.field == "images[1].data"
    assert info.value.http_status == (400 if code == IntakeErrorCode.BAD_BASE64 else 422)


def test_data_url_svg_is_refused_after_decoding_by_sniffing() -> None:
    svg = base64.b64encode(b"<svg xmlns='http://www.w3.org/2000/svg'/>").decode()
    data = decode_base64(f"data:image/svg+xml;base64,{svg}", "f", 1024)
    err = _refused(data, IntakeErrorCode.UNSUPPORTED_TYPE)
    assert "SVG" in err.message


def test_canonical_base64_of_every_length_decodes_exactly_at_and_over_the_limit() -> None:
    rng = np.random.default_rng(3)
    for n in [1, 2, 3, 4, 5, 97, 1000, 4096]:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        b64 = base64.b64encode(data).decode()
        assert decode_base64(b64, "f", n) == data
        assert decode_base64(b64.encode(), "f", n) == data
        with pytest.raises(IntakeError) as info:
            decode_base64(b64, "f", n - 1)
        assert info.value.code == IntakeErrorCode.TOO_LARGE and str(n) in info.value.message


# -- a smaller decode for the whole-photo models (``at_least``) ----------------------------------------------


@pytest.fixture(scope="module")
def large(rgb: np.ndarray) -> np.ndarray:
    """The real photo at a marketplace size: 1200 x 900."""
    return np.asarray(Image.fromarray(rgb).resize((1200, 900), Image.Resampling.LANCZOS))


@pytest.mark.parametrize(("at_least", "shape"), [(300, (450, 600, 3)), (200, (225, 300, 3)),
                                                 (100, (113, 150, 3)), (450, (450, 600, 3)),
                                                 (451, (900, 1200, 3))])
def test_a_large_jpeg_decodes_at_the_smallest_scale_that_keeps_at_least(large: np.ndarray, at_least: int,
                                                                         shape: tuple[int, int, int]) -> None:
    data = _encode(Image.fromarray(large), "JPEG", quality=90)
    got = decode_image(data, LIMITS, at_least=at_least)
    assert got.pixels.shape == shape  # 1/2, 1/4, 1/8 (never below 1/8); none when 1/2 would go below
    assert (got.width, got.height) == (1200, 900)  # the file's size, as without at_least
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    # The same picture: against the whole decode resized to the same size, within JPEG's noise.
    whole = Image.fromarray(decode_image(data, LIMITS).pixels).resize(shape[1::-1], Image.Resampling.BOX)
    assert np.abs(got.pixels.astype(int) - np.asarray(whole, dtype=int)).mean() < 5  # another photo: ~50


def test_png_and_small_jpegs_are_decoded_whole(large: np.ndarray, rgb: np.ndarray) -> None:
    assert decode_image(_encode(Image.fromarray(large), "PNG"), LIMITS, at_least=100).pixels.shape == (900, 1200, 3)
    # 256 px: half of it (128) would be below 129.
    assert decode_image(_encode(Image.fromarray(rgb), "JPEG"), LIMITS, at_least=129).pixels.shape == rgb.shape


def test_a_reduced_decode_is_turned_upright_and_cmyk_comes_out_rgb(large: np.ndarray) -> None:
    upright = decode_image(_encode(Image.fromarray(large), "JPEG", quality=90), LIMITS, at_least=300).pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned 90 degrees anticlockwise: turn clockwise to view
    turned = np.ascontiguousarray(np.rot90(large, 1))
    got = decode_image(_encode(Image.fromarray(turned), "JPEG", quality=90, exif=exif.tobytes()), LIMITS,
                       at_least=300).pixels
    assert got.shape == upright.shape == (450, 600, 3)
    assert np.abs(got.astype(int) - upright.astype(int)).mean() < 3
    cmyk = decode_image(_encode(Image.fromarray(large).convert("CMYK"), "JPEG", quality=95), LIMITS, at_least=300)
    assert cmyk.pixels.shape == (450, 600, 3)
    assert np.abs(cmyk.pixels.astype(int) - upright.astype(int)).mean() < 6


def test_a_truncated_large_jpeg_fails_the_reduced_decode_too(large: np.ndarray) -> None:
    data = _encode(Image.fromarray(large), "JPEG", quality=90)
    with pytest.raises(IntakeError) as info:
        decode_image(data[: len(data) // 2], LIMITS, "images[0].file", at_least=300)
    assert (info.value.code, info.value.field) == (IntakeErrorCode.DECODE_FAILED, "images[0].file")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "I;16"])
def test_wide_conversions_of_a_large_photo_stay_within_a_few_bytes_a_pixel(mode: str) -> None:
    """Transparency compositing and 16-bit scaling work a band of rows at a time: over a whole 40-megapixel
    photo their temporaries took 48 (compositing) and 17 (16-bit) bytes a pixel, 2 GB for a 169 KB PNG; in
    bands 11.1 and 6.1 (a plain RGB photo: 6.0).
    Measured with tracemalloc, which sees numpy's buffers (not Pillow's own)."""
    import tracemalloc

    side = 2000
    ramp = np.tile(np.arange(side, dtype=np.uint32) * 65535 // (side - 1), (side, 1))
    if mode == "I;16":
        img = Image.fromarray(ramp.astype(np.uint16))
    else:
        grey = (ramp // 257).astype(np.uint8)
        bands = [grey, grey[::-1], grey.T, grey] if mode == "RGBA" else [grey, grey.T]
        img = Image.fromarray(np.dstack(bands), mode)
    data = _encode(img, "PNG")
    tracemalloc.start()
    try:
        pixels = decode_image(data, LIMITS).pixels
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pixels.shape == (side, side, 3)
    # The result (3 bytes a pixel), the mode's own array and a band's temporaries.
    assert peak / side**2 < 12, f"{peak / side**2:.1f} bytes a pixel"


def _tiff_with_strips(strips: int) -> bytes:
    """An 8x8 greyscale TIFF written by hand, its StripOffsets and StripByteCounts listing ``strips`` (>= 2)
    strips: the first eight hold a row each, the rest repeat the last row."""
    n_entries = 9
    offsets_at = 8 + 2 + 12 * n_entries + 4
    counts_at = offsets_at + 4 * strips
    pixels_at = counts_at + 4 * strips
    entries = [(256, 4, 1, 8), (257, 4, 1, 8), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, strips, offsets_at), (277, 3, 1, 1), (278, 4, 1, 1), (279, 4, strips, counts_at)]
    ifd = struct.pack("<H", n_entries)
    for tag, kind, count, value in entries:  # (a SHORT value sits left-justified in its 4 bytes)
        ifd += struct.pack("<HHI", tag, kind, count)
        ifd += struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
    ifd += struct.pack("<I", 0)
    offsets = struct.pack(f"<{strips}I", *(pixels_at + 8 * min(k, 7) for k in range(strips)))
    counts = struct.pack(f"<{strips}I", *([8] * strips))
    return b"II*\x00" + struct.pack("<I", 8) + ifd + offsets + counts + bytes(range(64))


def test_a_png_of_too_many_chunks_is_refused_before_pillow_walks_them() -> None:
    """Pillow reads a PNG's chunks one by one in Python (the API probes on its event loop): 833,000 empty
    chunks in 10 MB took 1.5 s to probe. More than MAX_PNG_CHUNKS are refused, counted at once."""
    from service.intake.images import MAX_PNG_CHUNKS

    plain = _png(4, 4, 8, 2, b"".join(b"\x00" + bytes(12) for _ in range(4)))
    ihdr_end = 8 + 25
    padded = plain[:ihdr_end] + _png_chunk(b"prIv", b"") * 100 + plain[ihdr_end:]
    assert decode_image(padded, LIMITS).pixels.shape == (4, 4, 3)  # a hundred chunks: read as ever
    flood = plain[:ihdr_end] + _png_chunk(b"prIv", b"") * (MAX_PNG_CHUNKS + 1) + plain[ihdr_end:]
    err = _refused(flood, IntakeErrorCode.DECODE_FAILED)
    assert f"more than {MAX_PNG_CHUNKS} chunks" in err.message
    with pytest.raises(IntakeError, match="chunks"):
        probe_image(flood, LIMITS)


def test_a_tiff_of_too_many_strips_is_refused_before_pillow_reads_them() -> None:
    from service.intake.images import MAX_TIFF_SEGMENTS

    assert decode_image(_tiff_with_strips(8), LIMITS).pixels.shape == (8, 8, 3)
    err = _refused(_tiff_with_strips(MAX_TIFF_SEGMENTS + 1), IntakeErrorCode.DECODE_FAILED)
    assert f"{MAX_TIFF_SEGMENTS + 1} strips" in err.message
