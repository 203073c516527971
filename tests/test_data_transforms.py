"""Image decoding (bad and non-RGB inputs), the paper's augmentation, CLIP normalisation."""
import io

import numpy as np
import pytest
from PIL import Image

from blip2_jax.data import transforms


def _encode(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_normalize_is_clip():
    img = Image.new("RGB", (2, 2), (255, 0, 128))
    x = transforms.normalize(img)
    expected = (np.array([1.0, 0.0, 128 / 255]) - transforms.CLIP_MEAN) / transforms.CLIP_STD
    assert x.shape == (2, 2, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[1, 0], expected, rtol=1e-6)


@pytest.mark.parametrize("mode,value,expected", [
    ("L", 77, (77, 77, 77)),
    ("RGBA", (10, 20, 30, 0), (255, 255, 255)),  # transparent -> white
    ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
    ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
])
def test_decode_converts_to_rgb(mode, value, expected):
    img, note = transforms.decode(_encode(Image.new(mode, (3, 2), value),
                                          "JPEG" if mode == "CMYK" else "PNG"))
    assert img.mode == "RGB" and img.size == (3, 2)
    assert note == f"converted_{mode}"
    np.testing.assert_allclose(np.asarray(img)[0, 0], expected, atol=2)


def test_decode_palette_and_16bit():
    pal = Image.new("P", (2, 2), 3)
    pal.putpalette([0, 0, 0] * 3 + [200, 100, 50] + [0, 0, 0] * 252)
    img, note = transforms.decode(_encode(pal))
    assert note == "converted_P" and tuple(np.asarray(img)[0, 0]) == (200, 100, 50)
    deep = Image.fromarray(np.array([[0, 1000], [2000, 4000]], np.uint16))
    img, note = transforms.decode(_encode(deep))
    assert note.startswith("converted_I") and np.asarray(img)[1, 1, 0] == 255


@pytest.mark.parametrize("data,reason", [
    (b"", "empty_image"),
    (b"not an image at all", "undecodable_image"),
])
def test_decode_rejects_garbage(data, reason):
    with pytest.raises(transforms.BadImage) as e:
        transforms.decode(data)
    assert e.value.reason == reason


def test_decode_truncated_jpeg():
    rng = np.random.default_rng(0)
    data = _encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    with pytest.raises(transforms.BadImage) as e:
        transforms.decode(data[: len(data) // 2])
    assert e.value.reason == "truncated_image"


def test_jpeg_draft_keeps_enough_pixels():
    rng = np.random.default_rng(0)
    data = _encode(Image.fromarray(rng.integers(0, 255, (480, 640, 3), np.uint8)), "JPEG")
    img, _ = transforms.decode(data, draft_size=100)
    assert img.size == (160, 120)  # 1/4 scale: the smallest JPEG scale with short side >= 100
    assert transforms.decode(data)[0].size == (640, 480)


def test_random_resized_crop_box_ranges():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = transforms.random_resized_crop_box(200, 100, rng, (0.5, 1.0))
        assert 0 <= left and left + w <= 200 and 0 <= top and top + h <= 100
        assert 0.5 * 200 * 100 * 0.97 <= w * h <= 200 * 100
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    # impossible request (whole very wide image): central crop at the widest allowed ratio
    assert transforms.random_resized_crop_box(400, 100, rng, (1.0, 1.0)) == (133, 0, 133, 100)


def test_train_and_eval_images():
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, :30] = 255  # left half white
    img = Image.fromarray(arr)
    out = transforms.eval_image(img, 16)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img.resize((16, 16),
                                                                        Image.BICUBIC)))
    flips = []
    for seed in range(20):
        crop, flipped = transforms.train_image(img, 16, np.random.default_rng(seed))
        assert crop.size == (16, 16)
        a = np.asarray(crop).astype(int)
        if a[:, 0].mean() != a[:, -1].mean():  # a crop across the edge: its side tells the flip
            assert (a[:, 0].mean() < a[:, -1].mean()) == flipped
        flips.append(flipped)
    assert 0 < sum(flips) < 20
