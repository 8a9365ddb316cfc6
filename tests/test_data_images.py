"""Image opening and conversion: every odd format becomes the RGB a user expects; bad files become ImageProblems."""

import io

import numpy as np
import pytest
from PIL import Image

from krea2_train.data.images import ImageProblem, open_image


def _bytes(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    data = _bytes(img, "JPEG", exif=exif, quality=95)
    out = open_image(data)
    assert out.size == (20, 40)
    # After a 90 degree clockwise turn the red (left) half is on top.
    top, bottom = np.asarray(out)[5, 10], np.asarray(out)[35, 10]
    assert top[0] > 200 and top[1] < 60 and bottom[0] < 60
    assert open_image(data, decode=False).size_oriented == (20, 40)


def test_cmyk_converted_to_rgb():
    img = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = open_image(_bytes(img, "JPEG", quality=100))
    assert out.mode == "RGB"
    r, g, b = np.asarray(out)[4, 4]
    assert r > 220 and g < 40 and b < 40


def test_palette_with_transparency_composited_on_background():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([10, 20, 30] + [200, 100, 50] * 255)
    img.putpixel((0, 0), 1)
    img.info["transparency"] = 0  # index 0 is transparent
    out = open_image(_bytes(img), background=(0, 255, 0))
    arr = np.asarray(out)
    assert tuple(arr[3, 3]) == (0, 255, 0)  # transparent -> background
    assert tuple(arr[0, 0]) == (200, 100, 50)


def test_16bit_greyscale_scaled_not_clipped():
    arr = np.array([[0, 32896, 65535, 1000]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    out = np.asarray(open_image(_bytes(img)))
    assert out.shape == (1, 4, 3)
    assert list(out[0, :, 0]) == [0, 128, 255, 4]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_greyscale_and_alpha_on_chosen_background():
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (100, 255))
    la.putpixel((1, 0), (100, 0))
    out = np.asarray(open_image(_bytes(la), background=(255, 0, 0)))
    assert tuple(out[0, 0]) == (100, 100, 100)
    assert tuple(out[0, 1]) == (255, 0, 0)
    rgba = Image.new("RGBA", (1, 1), (0, 0, 255, 128))
    px = np.asarray(open_image(_bytes(rgba), background=(255, 255, 255)))[0, 0]
    assert abs(int(px[0]) - 127) <= 2 and px[2] == 255


def test_truncated_image_is_reported():
    data = _bytes(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with pytest.raises(ImageProblem) as err:
        open_image(data[: len(data) // 2], name="cut.jpg")
    assert err.value.kind == "truncated" and "cut.jpg" in str(err.value)


def test_non_image_and_bomb():
    with pytest.raises(ImageProblem) as err:
        open_image(b"this is text, not a png", name="notes.png")
    assert err.value.kind == "not_image" and "notes.png" in str(err.value)
    with pytest.raises(ImageProblem) as err:
        open_image(_bytes(Image.new("L", (200, 200))), name="big.png", max_pixels=10_000)
    assert err.value.kind == "bomb" and "data.max_image_pixels" in str(err.value)
