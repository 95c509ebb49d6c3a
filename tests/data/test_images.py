import io

import numpy as np
import pytest
from PIL import Image

from lavise_core.data.images import ImageLoadError, load_image


def _png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_rgb_roundtrip():
    img = load_image(_png(Image.new("RGB", (5, 4), (1, 2, 3))))
    assert img.mode == "RGB" and img.size == (5, 4)
    assert img.getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "I;16", "1"])
def test_other_modes_become_rgb(mode):
    src = Image.new("RGB", (6, 6), (200, 10, 10)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode == "I;16" else "PNG"
    img = load_image(_png(src, fmt))
    assert img.mode == "RGB" and img.size == (6, 6)


def test_alpha_composited_on_white():
    src = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(_png(src)).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_applied():
    src = Image.new("RGB", (8, 4), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img = load_image(_png(src, "JPEG", exif=exif))
    assert img.size == (4, 8)


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (5, 5), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    img = load_image(buf.getvalue())
    r, _g, b = img.getpixel((2, 2))
    assert r > 200 and b < 50


def test_not_an_image():
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(b"hello, this is text")


def test_empty_file(tmp_path):
    p = tmp_path / "e.png"
    p.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(p)


def test_truncated():
    data = _png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(data[: len(data) // 2])


def test_huge_refused_before_decoding():
    # a 20000×20000 PNG header is refused from its size alone (the pixels are never decoded)
    data = _png(Image.new("L", (20000, 20000)), optimize=False)
    with pytest.raises(ImageLoadError, match="megapixels"):
        load_image(data)


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "nope.png")


def test_gif_with_a_cut_frame_header_is_corrupt_not_a_crash():
    # found by bench/fuzz (image target): PIL raised struct.error while counting the GIF's frames
    data = b"GIF87a\x07\x00\x05\x00\x80\x00\x00\x00\x00F87a\x07\x00\x05\x00\x80\x00\x00\x00\x00\x00\x00,\x00\x00\x00\x00\x07\x00\x05\x007\x00\x00\x00\x01a\x07\x00\x05\x00\x80,\x07\x03\x02\x00;"
    with pytest.raises(ImageLoadError, match="truncated or corrupt \\(error: unpack_from"):
        load_image(data)
