"""Image preprocessing against the reference processor's pixel values and hand-computed images.

Golden: `images_pixel_values` of each BLIP-2 case are transformers' `BlipImageProcessor` (PIL
backend) outputs for skimage photos. Hand-checked: constant-colour images in every PIL mode,
where a bicubic resize keeps the colour, so the expected output is (rgb / 255 - mean) / std.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from blip2_jax.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    ImageProcessor,
    InputError,
    load_image,
    to_rgb,
)
from tests.conftest import GOLDEN

skimage_data = pytest.importorskip("skimage.data")
CASES = ("blip2_opt", "blip2_t5", "blip2_itm")
SIZE = 12


def photos(case):
    names = json.loads((GOLDEN / case / "reference.json").read_text())["images"]
    return [getattr(skimage_data, n)() for n in names]


@pytest.mark.parametrize("case", CASES)
def test_golden_photos_match_reference_pixels(case):
    proc = ImageProcessor.from_dir(GOLDEN / case)
    ref = np.load(GOLDEN / case / "reference.npz")["images_pixel_values"]
    ours = proc(photos(case)).transpose(0, 3, 1, 2)  # ours NHWC, reference NCHW
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_paths_and_pil_images_equal_arrays(tmp_path):
    proc = ImageProcessor.from_dir(GOLDEN / "blip2_opt")
    photo = photos("blip2_opt")[0]
    path = tmp_path / "photo.png"
    Image.fromarray(photo).save(path)
    expected = proc([photo])
    np.testing.assert_array_equal(proc([str(path)]), expected)
    np.testing.assert_array_equal(proc([Image.open(path)]), expected)


def expected_constant(rgb, size=SIZE):
    x = (np.asarray(rgb, np.float32) / 255.0 - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return np.broadcast_to(x, (size, size, 3))


def constant(mode, value, size=(16, 10)):
    """A constant image in `mode`; `value` is one pixel's bands."""
    bands = len(Image.new(mode, (1, 1)).getbands())
    arr = np.tile(np.asarray(value, np.uint8).reshape(1, 1, bands), (size[1], size[0], 1))
    return Image.frombytes(mode, size, arr.tobytes())


def palette_image(index, transparency=None):
    im = Image.new("P", (16, 10), index)
    im.putpalette([200, 10, 30, 20, 120, 220] + [0, 0, 0] * 254)
    if transparency is not None:
        im.info["transparency"] = transparency
    return im


def i16_image(value):
    return Image.fromarray(np.full((10, 16), value, np.uint16))


WHITE = (255, 255, 255)
MODES = [
    ("RGB", lambda: constant("RGB", (200, 10, 30)), (200, 10, 30)),
    ("L", lambda: constant("L", (77,)), (77, 77, 77)),
    ("LA opaque", lambda: constant("LA", (77, 255)), (77, 77, 77)),
    ("LA transparent", lambda: constant("LA", (77, 0)), WHITE),  # composited onto white
    ("RGBA opaque", lambda: constant("RGBA", (200, 10, 30, 255)), (200, 10, 30)),
    ("RGBA transparent", lambda: constant("RGBA", (200, 10, 30, 0)), WHITE),
    ("P", lambda: palette_image(1), (20, 120, 220)),
    ("P transparent index", lambda: palette_image(0, transparency=0), WHITE),
    ("P other index opaque", lambda: palette_image(1, transparency=0), (20, 120, 220)),
    # PIL's CMYK -> RGB: (255 - c) * (255 - k) / 255, rounded
    ("CMYK", lambda: constant("CMYK", (200, 100, 0, 100)), (33, 94, 155)),
    # 16-bit greyscale is scaled to 8 bits (0 -> 0, 65535 -> 255), not clipped at 255
    ("I;16 max", lambda: i16_image(65535), WHITE),
    ("I;16 mid", lambda: i16_image(32896), (128, 128, 128)),
    ("I;16 zero", lambda: i16_image(0), (0, 0, 0)),
]


@pytest.mark.parametrize("name,make,rgb", MODES, ids=[m[0] for m in MODES])
def test_every_pil_mode(name, make, rgb):
    im = make()
    assert im.mode == name.split()[0]
    out = ImageProcessor(size=SIZE)([im])[0]
    np.testing.assert_allclose(out, expected_constant(rgb), rtol=0, atol=1e-5)
    assert to_rgb(im).mode == "RGB"


def test_exif_orientation_applied(tmp_path):
    """A landscape JPEG stored with EXIF Orientation 6 (display rotated 90 degrees clockwise):
    its left half (red) must end up on top, its right half (blue) at the bottom."""
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :32] = (255, 0, 0)
    arr[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, exif=exif.tobytes(), quality=95)
    im = load_image(str(path))
    assert im.size == (32, 64)  # (width, height): portrait after the rotation
    out = ImageProcessor(size=16)([str(path)])[0]
    top, bottom = out[2, 8], out[13, 8]
    red, blue = expected_constant((255, 0, 0), 1)[0, 0], expected_constant((0, 0, 255), 1)[0, 0]
    np.testing.assert_allclose(top, red, atol=0.1)
    np.testing.assert_allclose(bottom, blue, atol=0.1)


def test_bad_files(tmp_path):
    (tmp_path / "note.jpg").write_text("not an image")
    with pytest.raises(InputError, match="cannot read image"):
        load_image(str(tmp_path / "note.jpg"))
    with pytest.raises(InputError, match="not found"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(InputError, match="directory"):
        load_image(str(tmp_path))
