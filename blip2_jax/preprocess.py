"""Image and text preprocessing that matches the reference processor (`Blip2Processor`).

Images: any PIL mode, EXIF orientation applied, transparency composited onto white, converted
to RGB, bicubic resize to the checkpoint's size, rescale 1/255, CLIP mean/std. Output is NHWC.

Files are untrusted: only regular files are opened (a FIFO cannot hang us), an image's pixel
count is checked against a budget (`Limits.max_image_pixels`, 64 MP) from its header before it
is decoded, decompression bombs are one line, and 16/32-bit images are brought to 8 bits a block
of rows at a time. `preprocessor_config.json` is checked (types, sizes within
`Limits.max_image_size`) before it is used.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from blip2_jax import files
from blip2_jax.data.transforms import CLIP_MEAN, CLIP_STD
from blip2_jax.models.configs import LIMITS_ENV, Limits

_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC,
             4: Image.BOX, 5: Image.HAMMING}


class InputError(ValueError):
    """Bad user input (file, image, prompt, option): reported as one line by the CLIs."""


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """What a `preprocessor_config.json` says (HF `BlipImageProcessor` fields)."""
    size: int = 224
    resample: int = 3  # PIL bicubic
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    max_pixels: int | None = None  # decoded-image budget; None: Limits.from_env().max_image_pixels

    @classmethod
    def from_dir(cls, path: str | os.PathLike, default_size: int | None = None,
                 limits: Limits | None = None) -> "ImageProcessor":
        """The processor a model directory's preprocessor_config.json describes (checked; one-line
        InputError), or the defaults at `default_size` when it has none."""
        path = os.fspath(path)
        if not os.path.lexists(os.path.join(path, "preprocessor_config.json")):
            return cls(size=default_size or cls.size)
        f = os.path.join(path, "preprocessor_config.json")
        d = files.read_json_object(f, InputError, "preprocessor_config.json")
        try:
            return cls.from_json(d, default_size, limits or Limits.from_env())
        except ValueError as e:
            raise InputError(f"{f}: {e}") from None

    @classmethod
    def from_json(cls, d: dict, default_size: int | None, limits: Limits) -> "ImageProcessor":
        d = d.get("image_processor", d)  # processor_config.json nests it
        _need(isinstance(d, dict), "image_processor must be a JSON object")
        size = d.get("size", default_size or cls.size)
        if isinstance(size, dict):
            h, w = size.get("height", size.get("shortest_edge")), size.get("width", size.get("shortest_edge"))
            _need(h == w, f"non-square size {size} is not supported")
            size = h
        _need(_is_int(size) and 1 <= size <= limits.max_image_size,
              f"size {size!r:.40} is not an integer in [1, {limits.max_image_size}] (limit max_image_size; "
              f"see {LIMITS_ENV})")
        resample = d.get("resample", 3)
        _need(_is_int(resample) and resample in _RESAMPLE, f"resample {resample!r:.40} is not one of {sorted(_RESAMPLE)}")
        rescale = d.get("rescale_factor", 1 / 255)
        _need(_is_number(rescale), f"rescale_factor {rescale!r:.40} is not a finite number")
        mean, std = d.get("image_mean", CLIP_MEAN), d.get("image_std", CLIP_STD)
        for name, v in (("image_mean", mean), ("image_std", std)):
            _need(isinstance(v, (list, tuple)) and len(v) == 3 and all(map(_is_number, v)),
                  f"{name} {v!r:.60} is not a list of 3 numbers")
        _need(all(x != 0 for x in std), f"image_std {list(std)} has a zero")
        flags = {k: d.get(k, True) for k in ("do_resize", "do_rescale", "do_normalize")}
        for k, v in flags.items():
            _need(isinstance(v, bool), f"{k} must be true or false, got {v!r:.40}")
        return cls(size=size, resample=resample, rescale_factor=float(rescale), image_mean=tuple(map(float, mean)),
                   image_std=tuple(map(float, std)), max_pixels=limits.max_image_pixels, **flags)

    def to_dict(self) -> dict[str, Any]:
        return {"image_processor_type": "BlipImageProcessor", "size": {"height": self.size, "width": self.size},
                "resample": self.resample, "rescale_factor": self.rescale_factor,
                "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "do_resize": self.do_resize, "do_rescale": self.do_rescale,
                "do_normalize": self.do_normalize, "do_convert_rgb": True}

    def __call__(self, images: Sequence[Any], size: int | None = None) -> np.ndarray:
        """images: PIL images, paths, or uint8 HWC arrays -> float32 [B, S, S, 3]."""
        return np.stack([self.one(im, size) for im in images])

    def one(self, image: Any, size: int | None = None) -> np.ndarray:
        size = size or self.size
        im = to_rgb(load_image(image, max_pixels=self.max_pixels))
        if self.do_resize:
            im = im.resize((size, size), resample=_RESAMPLE[self.resample])
        x = np.asarray(im, dtype=np.float32)
        if self.do_rescale:
            x = x * np.float32(self.rescale_factor)
        if self.do_normalize:
            x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return x.astype(np.float32)


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_pixels(im: Image.Image, max_pixels: int | None = None, name: str = "image") -> None:
    """InputError if `im` (opened, not necessarily decoded) exceeds the pixel budget."""
    budget = max_pixels or Limits.from_env().max_image_pixels
    if im.width * im.height > budget:
        raise InputError(f"{name}: {im.width}x{im.height} image has {im.width * im.height / 1e6:.1f} MP, more than "
                         f"the {budget / 1e6:g} MP budget (limit max_image_pixels; see {LIMITS_ENV})")


def open_image_file(path: str, max_pixels: int | None = None) -> Image.Image:
    """A regular image file -> decoded PIL image, its size checked against the pixel budget
    before decoding; every failure is a one-line InputError."""
    if not os.path.lexists(path):
        raise InputError(f"image file not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"image path is a directory: {path}")
    with files.open_regular(path, InputError, "image") as fh:
        try:
            im = Image.open(fh)
            check_pixels(im, max_pixels, path)
            im.load()
        except Image.DecompressionBombError as e:
            raise InputError(f"cannot read image {path}: refused as a decompression bomb: {e}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
            if isinstance(e, InputError):
                raise
            raise InputError(f"cannot read image {path}: {e.__class__.__name__}: {e}") from None
    return im


def load_image(image: Any, max_pixels: int | None = None) -> Image.Image:
    """A path, PIL image or HWC array -> PIL image with EXIF orientation applied. Paths are
    opened with `open_image_file`; `max_pixels`: the budget (None: `Limits.from_env()`)."""
    if isinstance(image, Image.Image):
        check_pixels(image, max_pixels)
        im = image
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and arr.max(initial=0) <= 1.0:
                arr = arr * 255.0
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        im = Image.fromarray(arr)
    elif isinstance(image, (str, os.PathLike)):
        im = open_image_file(os.fspath(image), max_pixels)
    else:
        raise InputError(f"unsupported image input of type {type(image).__name__}")
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block must not lose the image
        return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited onto white as the reference does."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return high_bit_depth_to_l(im).convert("RGB")
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def high_bit_depth_to_l(im: Image.Image, block_pixels: int = 2**22) -> Image.Image:
    """16/32-bit greyscale (I;16*, I, F) -> 8-bit greyscale, the full range scaled (65535 ->
    255; I and F by their maximum) instead of clipped at 255. Read and converted a block of rows
    at a time in uint32 / float32: no full-size temporary besides the 8-bit result."""
    w, h = im.size
    out = np.empty((h, w), np.uint8)
    rows = max(1, block_pixels // max(w, 1))
    sixteen = im.mode.startswith("I;16")
    if not sixteen:
        scale = np.float32(255.0 / max(float(im.getextrema()[1]), 1.0))
    for r in range(0, h, rows):
        block = np.asarray(im.crop((0, r, w, min(h, r + rows))))
        if sixteen:  # round(v * 255 / 65535) exactly (no ties occur)
            out[r:r + rows] = (block.astype(np.uint32) * 255 + 32767) // 65535
        else:
            out[r:r + rows] = np.clip(np.rint(block.astype(np.float32) * scale), 0, 255)
    return Image.fromarray(out)
