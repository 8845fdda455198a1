"""Errors of the intake layer: every refusal of an untrusted image carries a machine code, a human message
and the request field it concerns (``images[2].url``), so the API can answer with a JSON body that names
the field and the CLI can print which line of a file was wrong."""

from __future__ import annotations

from enum import StrEnum


class IntakeErrorCode(StrEnum):
    """Why an image was refused; stable strings that clients may switch on."""

    INVALID_URL = "invalid_url"  # not a parseable absolute http(s) URL
    URL_FORBIDDEN = "url_forbidden"  # scheme, userinfo, host or resolved address not allowed
    FETCH_FAILED = "fetch_failed"  # connection, TLS, protocol error or a non-2xx answer
    TIMEOUT = "timeout"  # the whole fetch (DNS, connect, redirects, body) ran past its deadline
    TOO_MANY_REDIRECTS = "too_many_redirects"
    TOO_MANY_IMAGES = "too_many_images"  # more images in one request than max_images
    TOO_LARGE = "too_large"  # more bytes than max_image_bytes (declared, streamed or base64)
    BAD_BASE64 = "bad_base64"
    UNSUPPORTED_TYPE = "unsupported_type"  # magic bytes are not JPEG/PNG/WebP/GIF/BMP/TIFF
    TOO_MANY_PIXELS = "too_many_pixels"  # header dimensions above max_pixels or max_side
    DECODE_FAILED = "decode_failed"  # truncated or corrupt image data


# Syntax errors in the request are 400; well-formed requests naming something we refuse are 422.
_HTTP_STATUS: dict[IntakeErrorCode, int] = {
    IntakeErrorCode.INVALID_URL: 400,
    IntakeErrorCode.BAD_BASE64: 400,
}


class IntakeError(Exception):
    """An untrusted image (or its URL) was refused."""

    def __init__(self, code: IntakeErrorCode, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.code = code
        self.message = message
        self.field = field

    @property
    def http_status(self) -> int:
        """The HTTP status the API should answer with (400 for malformed input, else 422)."""
        return _HTTP_STATUS.get(self.code, 422)

    def to_dict(self) -> dict[str, str | None]:
        """The ``{"code", "message", "field"}`` shape of the API's error body."""
        return {"code": str(self.code), "message": self.message, "field": self.field}

    def __repr__(self) -> str:
        return f"IntakeError({self.code.value!r}, {self.message!r}, field={self.field!r})"
