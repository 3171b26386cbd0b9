"""Image loading: bytes, a path or an http(s) URL into an RGB PIL image.

Every failure raises `ImageLoadError` with a `reason` code and a message that says what was
wrong, so callers can record it per file or per task and carry on.
"""

from __future__ import annotations

import io
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests
import urllib3
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from lookalike.errors import InputError

# Never let Pillow quietly decode half an image: a truncated file is an error here.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Pillow warns before it errors on bombs; `decode_image` applies its own pixel limit instead.
# (A module-level filter, because `warnings.catch_warnings()` is not thread-safe and images are
# decoded from several threads at once.)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)


class ImageLoadError(InputError):
    """An image could not be loaded. `reason` is a short machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.args[0]}"


@dataclass(frozen=True)
class ImageLimits:
    """Guards applied to every image we decode or download."""

    max_pixels: int = 89_478_485  # Pillow's own default bomb threshold
    max_download_bytes: int = 50 * 1024 * 1024
    download_timeout: float = 20.0

    @classmethod
    def from_settings(cls, settings) -> ImageLimits:
        return cls(
            max_pixels=settings.max_image_pixels,
            max_download_bytes=settings.max_download_bytes,
            download_timeout=settings.download_timeout,
        )


def is_url(source: object) -> bool:
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


DEFAULT_LIMITS = ImageLimits()


def _body_chunks(response: requests.Response, size: int = 64 * 1024) -> Iterator[bytes]:
    """The (decoded) body in chunks, each returned as soon as the socket has data.

    `iter_content` blocks until a whole chunk has arrived, so a server dripping bytes could
    hold a download far past its deadline; urllib3's `read1` returns after one socket read.
    """
    read1 = getattr(response.raw, "read1", None)
    if read1 is None:  # not a urllib3 2.x response (e.g. a test double)
        yield from response.iter_content(chunk_size=size)
        return
    while chunk := read1(size, decode_content=True):
        yield chunk


def read_limited(
    declared: str | None,
    chunks: Iterator[bytes],
    shown: str,
    limits: ImageLimits,
    deadline: float,
) -> bytes:
    """A response body within the download size limit and before `deadline` (monotonic)."""
    if declared and declared.isdigit() and int(declared) > limits.max_download_bytes:
        raise ImageLoadError(
            "too_large",
            f"{shown} is {int(declared)} bytes, over the "
            f"{limits.max_download_bytes}-byte download limit",
        )
    parts: list[bytes] = []
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > limits.max_download_bytes:
            raise ImageLoadError(
                "too_large", f"{shown} exceeds the {limits.max_download_bytes}-byte download limit"
            )
        parts.append(chunk)
        if time.monotonic() > deadline:
            raise too_slow_error(shown, limits)
    return b"".join(parts)


def too_slow_error(shown: str, limits: ImageLimits) -> ImageLoadError:
    return ImageLoadError("timeout", f"GET {shown} took longer than {limits.download_timeout:g}s")


def shown_url(url: str) -> str:
    """`url` for messages: never a query string (presigned URLs are secrets)."""
    return url.split("?", 1)[0] + ("?..." if "?" in url else "")


def _is_timeout(exc: BaseException) -> bool:
    """Whether a download failed by being slow, however the libraries wrap it."""
    # Not urllib3's TimeoutError base: its NewConnectionError ("connection refused") is one.
    slow = requests.Timeout | urllib3.exceptions.ReadTimeoutError | TimeoutError
    if isinstance(exc, slow):
        return True
    # requests reports a read timeout in the body as ConnectionError(ReadTimeoutError(...)).
    return any(isinstance(arg, slow) for arg in exc.args)


def fetch_url(
    url: str,
    limits: ImageLimits = DEFAULT_LIMITS,
    headers: dict[str, str] | None = None,
    session: requests.Session | None = None,
) -> bytes:
    """Download `url`, refusing bodies larger than the limit and slow servers.

    `limits.download_timeout` bounds both each socket wait and the whole download.
    """
    getter = session or requests
    shown = shown_url(url)  # messages end up in index-status
    deadline = time.monotonic() + limits.download_timeout
    try:
        with getter.get(url, stream=True, timeout=limits.download_timeout, headers=headers) as r:
            if r.status_code >= 400:
                raise ImageLoadError("http_error", f"GET {shown} returned HTTP {r.status_code}")
            declared = r.headers.get("Content-Length")
            return read_limited(declared, _body_chunks(r), shown, limits, deadline)
    except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
        if _is_timeout(exc):
            raise too_slow_error(shown, limits) from exc
        detail = str(exc).replace(url, shown)
        raise ImageLoadError("download_failed", f"GET {shown} failed: {detail}") from exc


def read_source(
    source: bytes | str | os.PathLike[str], limits: ImageLimits = DEFAULT_LIMITS
) -> bytes:
    """The raw bytes of an image source: bytes as they are, a URL downloaded, a path read."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    if is_url(source):
        return fetch_url(str(source), limits)
    path = Path(source)
    try:
        size = path.stat().st_size
        if size > limits.max_download_bytes:
            raise ImageLoadError(
                "too_large",
                f"{path} is {size} bytes, over the {limits.max_download_bytes}-byte limit",
            )
        # Bounded even when stat() lies (devices and pipes report 0 bytes).
        with path.open("rb") as handle:
            data = handle.read(limits.max_download_bytes + 1)
        if len(data) > limits.max_download_bytes:
            raise ImageLoadError(
                "too_large", f"{path} is over the {limits.max_download_bytes}-byte limit"
            )
        return data
    except FileNotFoundError as exc:
        raise ImageLoadError("not_found", f"{path} does not exist") from exc
    except IsADirectoryError as exc:
        raise ImageLoadError("not_a_file", f"{path} is a directory") from exc
    except OSError as exc:
        raise ImageLoadError("unreadable", f"{path} cannot be read: {exc}") from exc


DraftSize = int | tuple[int, int]
"""A draft request: at least N pixels on the shorter side, or at least (width, height)."""

_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap the axes


def decode_image(
    data: bytes,
    limits: ImageLimits = DEFAULT_LIMITS,
    draft_size: DraftSize | None = None,
    name: str = "image",
) -> Image.Image:
    """Decode bytes into an RGB image with EXIF orientation applied.

    `draft_size` lets JPEG decode at a reduced scale (Pillow draft mode) and other formats be
    box-reduced by a whole factor right after decoding, when the model only needs a small
    input: the result keeps at least `draft_size` pixels on its shorter side, or, given
    (width, height), at least that width and height (as displayed, after EXIF rotation).
    """
    if not data:
        raise ImageLoadError("empty", f"{name} is empty (0 bytes)")
    if limits.max_pixels > (Image.MAX_IMAGE_PIXELS or limits.max_pixels):
        # Pillow refuses anything over twice its own limit inside `open`, before our check;
        # raise it (never lower it: it is process-wide) so a larger configured limit works.
        Image.MAX_IMAGE_PIXELS = limits.max_pixels
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > limits.max_pixels:
            raise ImageLoadError(
                "too_many_pixels",
                f"{name} is {width}x{height} = {width * height} pixels, over the "
                f"{limits.max_pixels}-pixel limit (LOOKALIKE_MAX_IMAGE_PIXELS)",
            )
        if draft_size and image.format == "JPEG":
            _draft(image, draft_size)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # returns a full-size copy otherwise
        if draft_size:
            image = _reduce(image, draft_size)
        return to_rgb(image)
    except ImageLoadError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageLoadError("not_an_image", f"{name} is not an image Pillow can read") from exc
    except Image.DecompressionBombError as exc:  # Pillow's own check, inside Image.open
        raise ImageLoadError(
            "too_many_pixels",
            f"{name} is over the {limits.max_pixels}-pixel limit "
            f"(LOOKALIKE_MAX_IMAGE_PIXELS): {exc}",
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncated or corrupt data as OSError/SyntaxError from load().
        raise ImageLoadError("corrupt", f"{name} is corrupt or truncated: {exc}") from exc


def _draft(image: Image.Image, draft_size: DraftSize) -> None:
    """Let a JPEG decode at the largest DCT scale (1/2, 1/4, 1/8) that keeps the request."""
    width, height = image.size
    if isinstance(draft_size, tuple):
        want_w, want_h = (max(1, int(v)) for v in draft_size)
        if image.getexif().get(0x0112) in _TRANSPOSING_ORIENTATIONS:
            want_w, want_h = want_h, want_w  # the request is for the image as displayed
        scale = min(width // want_w, height // want_h)
    else:
        scale = min(width, height) // draft_size
    if scale >= 2:
        # Pillow picks the largest scale <= this one; it rounds sizes up, never below.
        image.draft("RGB", (width // scale, height // scale))


_REDUCIBLE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "I", "F"})


def _reduce(image: Image.Image, draft_size: DraftSize) -> Image.Image:
    """Box-reduce by the largest whole factor that keeps the request (a 4K PNG for a 224-px
    model: 9x fewer rows and columns to convert and resample). JPEGs are mostly drafted."""
    width, height = image.size
    if isinstance(draft_size, tuple):
        scale = min(width // max(1, int(draft_size[0])), height // max(1, int(draft_size[1])))
    else:
        scale = min(width, height) // draft_size
    if scale < 2:
        return image
    if image.mode not in _REDUCIBLE_MODES:  # palette, 1-bit, 16-bit, CMYK: convert first
        image = to_rgb(image)
    return image.reduce(scale)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is flattened onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in {"I;16", "I;16B", "I;16L", "I;16N", "I"}:
        # 16/32-bit greyscale: scale the actual range into 8 bits instead of clipping.
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) * (255.0 / (high - low)) if high > low else array * 0
        return Image.fromarray(scaled.astype("uint8"), mode="L").convert("RGB")
    if image.mode == "F":
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) * (255.0 / (high - low)) if high > low else array * 0
        return Image.fromarray(scaled.astype("uint8"), mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in {"RGBA", "LA", "PA", "RGBa", "La"}:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(
    source: bytes | str | os.PathLike[str],
    limits: ImageLimits = DEFAULT_LIMITS,
    draft_size: DraftSize | None = None,
) -> Image.Image:
    """Load bytes, a path or an http(s) URL as an RGB image (see `decode_image`)."""
    name = "image bytes" if isinstance(source, bytes | bytearray | memoryview) else str(source)
    return decode_image(read_source(source, limits), limits, draft_size=draft_size, name=name)


Box = tuple[float, float, float, float]


def crop(image: Image.Image, box: Box, unit: str = "px") -> Image.Image:
    """Crop `box` = (x, y, width, height) in pixels (`unit="px"`) or percent (`unit="%"`)."""
    x, y, w, h = (float(v) for v in box)
    if unit == "%":
        x, w = x * image.width / 100.0, w * image.width / 100.0
        y, h = y * image.height / 100.0, h * image.height / 100.0
    elif unit != "px":
        raise ValueError(f"box unit must be 'px' or '%', not {unit!r}")
    left, top = max(0, round(x)), max(0, round(y))
    right, bottom = min(image.width, round(x + w)), min(image.height, round(y + h))
    if right - left < 1 or bottom - top < 1:
        raise ImageLoadError(
            "empty_box", f"box {box} ({unit}) is empty inside a {image.width}x{image.height} image"
        )
    return image.crop((left, top, right, bottom))
