"""Review leftovers: an upload over the server's pixel cap is a 413 whatever its format, ..."""

import io
import json
import uuid

import pytest
from PIL import Image

import alignsearch
from alignsearch.errors import BadImageError, ImageTooLarge
from alignsearch.media.images import open_rgb
from alignsearch.surfaces.server import ServerConfig, start_in_thread
from helpers import call, indexed_corpus, png_bomb

UPLOAD_CAP = 40_000  # pixels: 200x200 passes, 300x300 does not


@pytest.fixture(scope="module")
def small_cap_server(tmp_path_factory, tiny_model):
    """A server in this process on a real socket, decoding uploads of at most UPLOAD_CAP pixels."""
    ix = indexed_corpus(tmp_path_factory.mktemp("tidy-served"), tiny_model, 3)
    engine = alignsearch.open(ix, device="cpu")
    server = start_in_thread(engine, ServerConfig(port=0, token="s3cret", max_upload_pixels=UPLOAD_CAP))
    yield server.url
    server.shutdown()
    engine.close()


def upload(url: str, image: bytes) -> tuple[int, str]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n1\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    status, _, answer = call(url, "/api/search", data=body,
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return status, json.loads(answer).get("error", "")


def encoded(fmt: str, side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["WEBP", "GIF", "TIFF", "BMP", "AVIF"])
def test_an_upload_over_the_pixel_cap_is_413_in_any_format(small_cap_server, fmt):
    assert upload(small_cap_server, encoded(fmt, 200))[0] == 200
    status, error = upload(small_cap_server, encoded(fmt, 300))
    assert status == 413 and f"at most {UPLOAD_CAP:,} pixels" in error, (status, error)


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_an_upload_over_pillows_warning_size_is_413_with_warnings_as_errors(small_cap_server):
    """The server read an upload's header a second time, without open_rgb's warning filter, to tell a large
    image from an unreadable one: where Pillow's DecompressionBombWarning (above 200 MP) is an error (python -W
    error), that second read failed and a 225 MP image was answered 400 `unreadable image`, not 413."""
    status, error = upload(small_cap_server, png_bomb(15_000, 15_000))
    assert status == 413 and "too large" in error, (status, error)


def test_open_rgb_says_too_large_with_its_own_class():
    with pytest.raises(ImageTooLarge, match="image too large: 300x300 pixels"):
        open_rgb(encoded("PNG", 300), max_pixels=UPLOAD_CAP)
    with pytest.raises(ImageTooLarge, match="decompression bomb guard"):  # Pillow's own guard, far above ours
        open_rgb(png_bomb(30_000, 30_000), max_pixels=10**12)
    with pytest.raises(BadImageError) as refused:
        open_rgb(b"not an image")
    assert not isinstance(refused.value, ImageTooLarge)

