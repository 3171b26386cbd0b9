"""Image loading: every bad input is an ImageLoadError with a reason; good ones come back RGB."""

from __future__ import annotations

import http.server
import io
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.core.images import (
    ImageLimits,
    ImageLoadError,
    crop,
    decode_image,
    fetch_url,
    load_image,
    read_source,
    to_rgb,
)


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def reason_of(source, **kwargs) -> str:
    with pytest.raises(ImageLoadError) as caught:
        load_image(source, **kwargs)
    return caught.value.reason


# --------------------------------------------------------------------------- bad inputs
def test_empty_bytes():
    assert reason_of(b"") == "empty"


def test_empty_file(tmp_path: Path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert reason_of(path) == "empty"


def test_not_an_image():
    assert reason_of(b"this is plain text, not a picture\n" * 10) == "not_an_image"


def test_text_file_named_png(tmp_path: Path):
    path = tmp_path / "notes.png"
    path.write_text("hello")
    assert reason_of(path) == "not_an_image"


def test_truncated_jpeg():
    data = encode(noise(64, 48), "JPEG")
    assert reason_of(data[: len(data) // 2]) == "corrupt"


def test_corrupt_png_data():
    data = bytearray(encode(noise(64, 64), "PNG"))
    start = data.index(b"IDAT") + 20
    data[start : start + 40] = bytes(40)  # zero out part of the compressed pixel stream
    assert reason_of(bytes(data)) == "corrupt"


def test_too_many_pixels():
    data = encode(noise(40, 30), "PNG")
    assert reason_of(data, limits=ImageLimits(max_pixels=40 * 30 - 1)) == "too_many_pixels"
    assert load_image(data, limits=ImageLimits(max_pixels=40 * 30)).size == (40, 30)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data is tiny (a "bomb")."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_refused_before_decoding():
    bomb = png_claiming(20_000, 20_000)
    with pytest.raises(ImageLoadError) as caught:
        load_image(bomb)
    assert caught.value.reason == "too_many_pixels"
    assert "LOOKALIKE_MAX_IMAGE_PIXELS" in str(caught.value)
    with pytest.raises(ImageLoadError) as caught:
        load_image(bomb, limits=ImageLimits(max_pixels=399_999_999))
    assert caught.value.reason == "too_many_pixels"
    assert "20000x20000" in str(caught.value)


def test_configured_pixel_limit_above_pillows_default_is_honoured():
    # Pillow refuses > 2 x 89M pixels inside Image.open; a larger configured limit must win,
    # so this header passes the pixel check and only then fails on its missing pixel data.
    claimed = png_claiming(15_000, 12_000)  # 180M pixels
    with pytest.raises(ImageLoadError) as caught:
        decode_image(claimed, ImageLimits(max_pixels=200_000_000))
    assert caught.value.reason == "corrupt"


def test_file_too_large(tmp_path: Path):
    path = tmp_path / "big.png"
    path.write_bytes(encode(noise(64, 64), "PNG"))
    size = path.stat().st_size
    assert reason_of(path, limits=ImageLimits(max_download_bytes=size - 1)) == "too_large"
    assert load_image(path, limits=ImageLimits(max_download_bytes=size)).size == (64, 64)


def test_missing_path(tmp_path: Path):
    assert reason_of(tmp_path / "nope.jpg") == "not_found"
    assert reason_of(str(tmp_path / "nope.jpg")) == "not_found"


def test_directory(tmp_path: Path):
    assert reason_of(tmp_path) == "not_a_file"


def test_error_message_names_reason_and_source(tmp_path: Path):
    with pytest.raises(ImageLoadError) as caught:
        load_image(tmp_path / "gone.png")
    assert str(caught.value).startswith("not_found: ")
    assert "gone.png" in str(caught.value)
    assert isinstance(caught.value, ValueError)


# --------------------------------------------------------------------------- HTTP
PNG_BODY = encode(noise(32, 24, seed=3), "PNG")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(self, body: bytes, length: int | None = None, chunked: bool = False) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if chunked:
            for start in range(0, len(body), 1000):
                piece = body[start : start + 1000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path
        if path == "/ok.png" or path == "/big.png":
            self._send(PNG_BODY)
        elif path == "/big-chunked.png":  # no Content-Length: caught while streaming
            self._send(PNG_BODY, chunked=True)
        elif path == "/slow-headers.png":
            time.sleep(1.5)
            self._send(PNG_BODY)
        elif path == "/slow-body.png":  # headers at once, then the body stalls
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG_BODY)))
            self.end_headers()
            self.wfile.write(PNG_BODY[:10])
            self.wfile.flush()
            time.sleep(1.5)
            self.wfile.write(PNG_BODY[10:])
        elif path == "/drip.png":  # each byte well within the socket timeout, forever overall
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG_BODY)))
            self.end_headers()
            for start in range(0, len(PNG_BODY), 8):
                self.wfile.write(PNG_BODY[start : start + 8])
                self.wfile.flush()
                time.sleep(0.1)
        else:
            self.send_error(404)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # client hung up: expected here
        pass


@pytest.fixture(scope="module")
def http_base() -> Iterator[str]:
    server = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_loads(http_base: str):
    image = load_image(f"{http_base}/ok.png")
    assert image.mode == "RGB"
    assert image.size == (32, 24)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(PNG_BODY))))


def test_url_404(http_base: str):
    assert reason_of(f"{http_base}/missing.png") == "http_error"


def test_url_too_large_declared(http_base: str):
    limits = ImageLimits(max_download_bytes=len(PNG_BODY) - 1)
    assert reason_of(f"{http_base}/big.png", limits=limits) == "too_large"


def test_url_too_large_streamed(http_base: str):
    limits = ImageLimits(max_download_bytes=len(PNG_BODY) - 1)
    assert reason_of(f"{http_base}/big-chunked.png", limits=limits) == "too_large"
    assert fetch_url(f"{http_base}/big-chunked.png") == PNG_BODY


def test_url_timeout_before_headers(http_base: str):
    limits = ImageLimits(download_timeout=0.3)
    assert reason_of(f"{http_base}/slow-headers.png", limits=limits) == "timeout"


def test_url_timeout_in_body(http_base: str):
    limits = ImageLimits(download_timeout=0.3)
    assert reason_of(f"{http_base}/slow-body.png", limits=limits) == "timeout"


def test_url_timeout_is_a_total_deadline(http_base: str):
    # Every read returns within the socket timeout; the download as a whole must not.
    limits = ImageLimits(download_timeout=0.5)
    started = time.monotonic()
    assert reason_of(f"{http_base}/drip.png", limits=limits) == "timeout"
    assert time.monotonic() - started < 1.5


def test_url_connection_refused():
    with socket.socket() as sock:  # bound but not listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert reason_of(f"http://127.0.0.1:{port}/x.png") == "download_failed"


# --------------------------------------------------------------------------- good inputs
def pixel(image: Image.Image, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in image.getpixel((x, y)))


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(p - q) <= tol for p, q in zip(a, b, strict=True))


def test_exif_orientation_applied():
    # 60 wide x 30 high: left half red, right half blue, tagged "rotate 90 CW to display".
    image = Image.new("RGB", (60, 30), (255, 0, 0))
    image.paste((0, 0, 255), (30, 0, 60, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    loaded = load_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert loaded.size == (30, 60)
    assert close(pixel(loaded, 15, 5), (255, 0, 0), tol=40)  # the left edge is now the top
    assert close(pixel(loaded, 15, 55), (0, 0, 255), tol=40)


def test_palette_with_transparency_flattened_on_white():
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    for x in range(4):
        for y in range(8):
            image.putpixel((x, y), 0)  # index 0: transparent
    loaded = load_image(encode(image, "PNG", transparency=0))
    assert loaded.mode == "RGB"
    assert pixel(loaded, 0, 0) == (255, 255, 255)
    assert pixel(loaded, 7, 7) == (255, 0, 0)


def test_palette_without_transparency():
    image = Image.new("P", (4, 4), 2)
    image.putpalette([0, 0, 0, 0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 9))
    loaded = load_image(encode(image, "GIF"))
    assert loaded.mode == "RGB"
    assert pixel(loaded, 1, 1) == (10, 200, 30)


def test_rgba_flattened_on_white():
    image = Image.new("RGBA", (10, 10), (0, 255, 0, 255))
    image.paste((0, 0, 0, 0), (0, 0, 5, 10))
    loaded = load_image(encode(image, "PNG"))
    assert loaded.mode == "RGB"
    assert pixel(loaded, 0, 0) == (255, 255, 255)
    assert pixel(loaded, 9, 9) == (0, 255, 0)


def test_la_flattened_on_white():
    image = Image.new("LA", (4, 4), (0, 255))
    image.putpixel((0, 0), (0, 0))
    loaded = load_image(encode(image, "PNG"))
    assert pixel(loaded, 0, 0) == (255, 255, 255)
    assert pixel(loaded, 3, 3) == (0, 0, 0)


def test_cmyk_jpeg():
    image = Image.new("RGB", (16, 16), (220, 30, 30)).convert("CMYK")
    loaded = load_image(encode(image, "JPEG", quality=95))
    assert loaded.mode == "RGB"
    assert close(pixel(loaded, 8, 8), (220, 30, 30), tol=25)


def test_greyscale():
    loaded = load_image(encode(Image.new("L", (5, 5), 128), "PNG"))
    assert loaded.mode == "RGB"
    assert pixel(loaded, 2, 2) == (128, 128, 128)


def test_bilevel():
    image = Image.new("1", (4, 4), 0)
    image.putpixel((3, 3), 1)
    loaded = load_image(encode(image, "PNG"))
    assert pixel(loaded, 0, 0) == (0, 0, 0)
    assert pixel(loaded, 3, 3) == (255, 255, 255)


def test_16_bit_greyscale_png_uses_its_range():
    ramp = np.linspace(1000, 60000, 64, dtype=np.uint16)[None, :].repeat(8, axis=0)
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    loaded = np.asarray(load_image(data))
    assert loaded.dtype == np.uint8 and loaded.shape == (8, 64, 3)
    row = loaded[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255  # stretched, not clipped to 255 or shifted to 0
    assert np.all(np.diff(row) >= 0)
    assert len(np.unique(row)) > 50


def test_float_image_to_rgb():
    array = np.linspace(-1.0, 1.0, 20, dtype=np.float32)[None, :].repeat(3, axis=0)
    rgb = np.asarray(to_rgb(Image.fromarray(array, mode="F")))
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255


def test_rgb_passes_through_unchanged():
    image = noise(20, 10)
    assert np.array_equal(np.asarray(load_image(encode(image, "PNG"))), np.asarray(image))


def test_path_and_str_and_bytes_agree(tmp_path: Path):
    data = encode(noise(12, 9), "PNG")
    path = tmp_path / "n.png"
    path.write_bytes(data)
    arrays = [np.asarray(load_image(s)) for s in (data, path, str(path), bytearray(data))]
    for array in arrays[1:]:
        assert np.array_equal(array, arrays[0])


def test_jpeg_draft_mode_keeps_short_side():
    large = encode(noise(1600, 1200).resize((1600, 1200)), "JPEG", quality=90)
    full = load_image(large)
    drafted = load_image(large, draft_size=224)
    assert full.size == (1600, 1200)
    assert drafted.width < full.width and drafted.height < full.height
    assert min(drafted.size) >= 224
    assert abs(drafted.width / drafted.height - 4 / 3) < 0.01


def test_jpeg_draft_mode_never_goes_below_request():
    large = encode(noise(1000, 700), "JPEG")
    for size in (100, 224, 300, 349, 351, 700):
        assert min(load_image(large, draft_size=size).size) >= size


def test_png_is_box_reduced_by_a_whole_factor_keeping_the_request():
    png = encode(noise(900, 600), "PNG")
    assert load_image(png, draft_size=224).size == (450, 300)  # 600 // 224 = 2
    assert load_image(png, draft_size=301).size == (900, 600)  # halving would go below
    assert load_image(png).size == (900, 600)  # no request: full size
    assert load_image(png, draft_size=(200, 100)).size == (225, 150)  # min(900//200, 600//100)
    # a palette image is converted before reducing (averaging palette indices is nonsense)
    palette = noise(900, 600).convert("P", palette=Image.Palette.ADAPTIVE)
    reduced = load_image(encode(palette, "PNG"), draft_size=224)
    assert reduced.mode == "RGB" and reduced.size == (450, 300)
    # the reduced image is the full one averaged in 2x2 blocks
    full = np.asarray(load_image(png), dtype=np.float32)
    blocks = full.reshape(300, 2, 450, 2, 3).mean(axis=(1, 3))
    assert np.abs(np.asarray(load_image(png, draft_size=224), np.float32) - blocks).max() <= 1


# --------------------------------------------------------------------------- crop
def test_crop_pixels():
    image = noise(100, 80)
    region = crop(image, (10, 20, 30, 40))
    assert region.size == (30, 40)
    assert np.array_equal(np.asarray(region), np.asarray(image)[20:60, 10:40])


def test_crop_percent():
    image = noise(200, 100)
    region = crop(image, (25, 50, 50, 50), unit="%")
    assert region.size == (100, 50)
    assert np.array_equal(np.asarray(region), np.asarray(image)[50:100, 50:150])


def test_crop_clipped_to_image():
    image = noise(50, 40)
    assert crop(image, (-10, -10, 30, 30)).size == (20, 20)
    assert crop(image, (40, 30, 100, 100)).size == (10, 10)


@pytest.mark.parametrize(
    ("box", "unit"),
    [
        ((10, 10, 0, 5), "px"),
        ((10, 10, 5, 0), "px"),
        ((60, 0, 10, 10), "px"),
        ((0, 0, 0.1, 50), "%"),
    ],
)
def test_empty_box_raises(box, unit):
    with pytest.raises(ImageLoadError) as caught:
        crop(noise(50, 40), box, unit)
    assert caught.value.reason == "empty_box"


def test_crop_unknown_unit():
    with pytest.raises(ValueError, match="unit"):
        crop(noise(10, 10), (0, 0, 5, 5), unit="cm")


def test_a_device_that_reports_zero_bytes_is_still_bounded():
    # /dev/zero stats as 0 bytes and never ends: the read must stop at the limit.
    with pytest.raises(ImageLoadError) as info:
        read_source("/dev/zero", ImageLimits(max_download_bytes=1024))
    assert info.value.reason == "too_large"
