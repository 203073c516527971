"""Image and text preprocessing that matches the reference processor (`Blip2Processor`).

Images: any PIL mode, EXIF orientation applied, transparency composited onto white, converted
to RGB, bicubic resize to the checkpoint's size, rescale 1/255, CLIP mean/std. Output is NHWC.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from blip2_jax.data.transforms import CLIP_MEAN, CLIP_STD


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

    @classmethod
    def from_dir(cls, path: str | os.PathLike, default_size: int | None = None) -> "ImageProcessor":
        f = os.path.join(path, "preprocessor_config.json")
        if not os.path.exists(f):
            return cls(size=default_size or cls.size)
        with open(f) as fh:
            d = json.load(fh)
        d = d.get("image_processor", d)  # processor_config.json nests it
        size = d.get("size", default_size or cls.size)
        if isinstance(size, dict):
            h, w = size.get("height", size.get("shortest_edge")), size.get("width", size.get("shortest_edge"))
            if h != w:
                raise InputError(f"{f}: non-square size {size} is not supported")
            size = h
        return cls(size=int(size), resample=int(d.get("resample", 3)),
                   rescale_factor=float(d.get("rescale_factor", 1 / 255)),
                   image_mean=tuple(d.get("image_mean", CLIP_MEAN)),
                   image_std=tuple(d.get("image_std", CLIP_STD)),
                   do_resize=d.get("do_resize", True), do_rescale=d.get("do_rescale", True),
                   do_normalize=d.get("do_normalize", True))

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
        im = to_rgb(load_image(image))
        if self.do_resize:
            im = im.resize((size, size), resample=_RESAMPLE[self.resample])
        x = np.asarray(im, dtype=np.float32)
        if self.do_rescale:
            x = x * np.float32(self.rescale_factor)
        if self.do_normalize:
            x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return x.astype(np.float32)


def load_image(image: Any) -> Image.Image:
    """A path, PIL image or HWC array -> PIL image with EXIF orientation applied."""
    if isinstance(image, Image.Image):
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
        path = os.fspath(image)
        if not os.path.exists(path):
            raise InputError(f"image file not found: {path}")
        if os.path.isdir(path):
            raise InputError(f"image path is a directory: {path}")
        try:
            im = Image.open(path)
            im.load()
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise InputError(f"cannot read image {path}: {e.__class__.__name__}: {e}") from None
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
        # 16/32-bit greyscale: scale the full range to 8 bits instead of clipping at 255.
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") else max(float(a.max(initial=0)), 1.0)
        a = np.clip(np.round(a / hi * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")
