"""Bad uploads on the Explain page: each gets a clear message or is handled correctly; the session survives."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from app_bundles import ROOT, build_app_bundles
from PIL import Image
from streamlit.testing.v1 import AppTest

APP = str(ROOT / "app.py")


@pytest.fixture(scope="module")
def bundles():
    return build_app_bundles()


def _bird(bundles) -> Image.Image:
    from lavise_core.data.dataset import ProbeDataset

    ds = ProbeDataset.open(bundles.data)
    return Image.open(bundles.data / ds.records[0].path).convert("RGB")


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _huge_png(w: int = 20000, h: int = 20000) -> bytes:
    """A valid PNG header declaring w × h pixels (the pixels are never there: only the header is read)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _explain(monkeypatch, bundles, name: str, data: bytes, mime: str = "image/png") -> AppTest:
    monkeypatch.setenv("LAVISE_BUNDLES", str(bundles.bundles))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page("app_pages/explain.py").run()
    at.file_uploader[0].upload(name, data, mime).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _explained(at: AppTest) -> bool:
    return any("because it has" in m.value for m in at.markdown)


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("notes.txt", lambda b: b"hello, I am not an image", "not an image"),
        ("empty.png", lambda b: b"", "empty"),
        ("truncated.png", lambda b: _save(_bird(b), "PNG")[:900], "truncated"),
        ("huge.png", lambda b: _huge_png(), "too large"),
    ],
)
def test_bad_upload_gets_clear_message(monkeypatch, bundles, name, make, message):
    at = _explain(monkeypatch, bundles, name, make(bundles))
    assert at.error, "an error message is shown"
    assert message in at.error[0].value and name in at.error[0].value
    assert not _explained(at)
    # the session survives: a good image right after works
    at.file_uploader[0].upload("good.png", _save(_bird(bundles), "PNG"), "image/png").run()
    assert not at.exception and _explained(at)


@pytest.mark.parametrize("side", [1, 8, 31])
def test_an_upload_too_small_to_explain_says_the_smallest_size_that_works(monkeypatch, bundles, side):
    # a 1×1 upload was explained "as a crimson-breasted robin because it has a red breast" (issue 25)
    at = _explain(monkeypatch, bundles, "dot.png", _save(Image.new("RGB", (side, side), "red"), "PNG"))
    assert at.error and not _explained(at)
    msg = at.error[0].value
    assert "too small to explain" in msg and f"({side}×{side} pixels)" in msg
    assert "32×32 pixels" in msg  # a quarter of the test network's 128 px input
    at.file_uploader[0].upload("ok.png", _save(_bird(bundles).resize((32, 32)), "PNG"), "image/png").run()
    assert not at.exception and _explained(at)  # the smallest size that works, works


def test_a_huge_upload_gets_one_limit_in_plain_words(monkeypatch, bundles):
    # 12000×12000 is over PIL's own limit too: its "decompression bomb DOS attack" text leaked (issue 25)
    for side in (9000, 12000, 20000):
        at = _explain(monkeypatch, bundles, "huge.png", _huge_png(side, side))
        msg = at.error[0].value
        mp = side * side / 1e6
        assert msg.endswith(
            f" is too large: {side}×{side} = {mp:.0f} megapixels; the limit is 64 megapixels. Downscale it first."
        ), msg
        assert "decompression" not in msg.lower() and "89478485" not in msg, msg


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("gray.png", lambda b: _save(_bird(b).convert("L"), "PNG")),
        ("cmyk.jpg", lambda b: _save(_bird(b).convert("CMYK"), "JPEG")),
        ("alpha.png", lambda b: _save(_bird(b).convert("RGBA"), "PNG")),
        ("palette.gif", lambda b: _save(_bird(b).convert("P"), "GIF")),
        (
            "animated.gif",
            lambda b: _save(
                _bird(b).convert("P"),
                "GIF",
                save_all=True,
                append_images=[Image.new("P", (128, 128))],
                duration=100,
            ),
        ),
    ],
)
def test_unusual_but_valid_images_are_explained(monkeypatch, bundles, name, make):
    at = _explain(monkeypatch, bundles, name, make(bundles))
    assert not at.error
    assert _explained(at)


def test_exif_rotated_image_is_shown_upright(monkeypatch, bundles):
    from lavise_core import views
    from lavise_core.pipeline.bundle import Bundle

    img = _bird(bundles).resize((160, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = _save(img, "JPEG", exif=exif.tobytes())
    at = _explain(monkeypatch, bundles, "rotated.jpg", data, "image/jpeg")
    assert not at.error and _explained(at)
    ws = views.Workspace(Bundle.open(bundles.full))
    a = views.analyse_image(ws, data)
    upright = Image.open(io.BytesIO(data)).convert("RGB").transpose(Image.Transpose.ROTATE_270)
    b = views.analyse_image(ws, upright)
    assert upright.size == (100, 160)
    assert abs(a.phi - b.phi).max() < 1e-5  # the network saw the upright image
