"""Untrusted images: safe fetching (no private, loopback, link-local or metadata targets, also after DNS
and redirects), type sniffing, byte/pixel limits, EXIF, decoding to RGB, content and perceptual hashes."""

from service.intake.errors import IntakeError, IntakeErrorCode
from service.intake.fetch import FetchResult, SafeFetcher
from service.intake.hashing import hamming, phash
from service.intake.images import DecodedImage, ImageLimits, decode_base64, decode_image, sniff_format
from service.intake.loader import ImageLoader
from service.intake.urlpolicy import HostPolicy, TargetUrl, address_problem

__all__ = [
    "DecodedImage",
    "FetchResult",
    "HostPolicy",
    "ImageLimits",
    "ImageLoader",
    "IntakeError",
    "IntakeErrorCode",
    "SafeFetcher",
    "TargetUrl",
    "address_problem",
    "decode_base64",
    "decode_image",
    "hamming",
    "phash",
    "sniff_format",
]
