"""Image processing: robust decoding, the paper's augmentation, CLIP normalisation.

Training (paper §3.4 / LAVIS `blip2_image_train`): RandomResizedCrop (area scale 0.5-1, aspect
3/4-4/3, bicubic) then a horizontal flip with probability 1/2. Evaluation: bicubic resize of the
whole image to a square (the reference image processor). Then x/255, minus the CLIP mean,
over the CLIP std. All on PIL + numpy; images come out float32 [H, W, 3] (NHWC).
"""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default aspect range


class BadImage(Exception):
    """An image that cannot be used; `reason` names why (a stats counter key)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode(data: bytes, *, draft_size: int | None = None) -> tuple[Image.Image, str | None]:
    """Encoded bytes -> (RGB PIL image, conversion note or None). Raises BadImage.

    Grey, palette, CMYK, 16-bit and alpha images are converted to RGB (alpha composited on
    white) and reported as "converted_<mode>". `draft_size` lets JPEG decode at a reduced
    scale that still covers that many pixels on the short side (much faster for big images).
    """
    if not data:
        raise BadImage("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if draft_size and img.format == "JPEG":
                short = min(img.size)
                if short > 2 * draft_size:
                    scale = draft_size / short
                    img.draft("RGB", (math.ceil(img.size[0] * scale),
                                      math.ceil(img.size[1] * scale)))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("too_large", str(e)) from None
    except OSError as e:  # PIL: unidentified / truncated / broken data
        reason = "truncated_image" if "truncated" in str(e) else "undecodable_image"
        raise BadImage(reason, str(e)) from None
    except Exception as e:  # noqa: BLE001  anything else a broken file may raise in a codec
        raise BadImage("undecodable_image", repr(e)) from None
    if img.width < 1 or img.height < 1:
        raise BadImage("empty_image")
    if img.mode == "RGB":
        return img, None
    note = f"converted_{img.mode}"
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), note
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, np.float32)
        arr = arr * (255.0 / max(float(arr.max()), 1.0))
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB"), note
    return img.convert("RGB"), note


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float], ratio: tuple[float, float] = CROP_RATIO):
    """torchvision's RandomResizedCrop.get_params: (left, top, w, h) of the crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height  # fallback: central crop at the nearest allowed aspect
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def normalize(img: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """uint8 RGB -> float32 [H, W, 3], (x / 255 - mean) / std."""
    x = np.asarray(img, np.float32)
    scale = np.asarray(std, np.float32) * 255.0
    return (x - np.asarray(mean, np.float32) * 255.0) / scale


def train_image(img: Image.Image, size: int, rng: np.random.Generator, *,
                scale: tuple[float, float] = (0.5, 1.0), flip: bool = True):
    """RandomResizedCrop(size, scale, bicubic) + random horizontal flip.

    Returns (uint8 PIL image size x size, flipped?)."""
    left, top, w, h = random_resized_crop_box(img.width, img.height, rng, scale)
    out = img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    flipped = bool(flip and rng.random() < 0.5)
    if flipped:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out, flipped


def eval_image(img: Image.Image, size: int) -> Image.Image:
    """Bicubic resize of the whole image to size x size."""
    return img.resize((size, size), Image.BICUBIC)
