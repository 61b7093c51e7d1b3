"""Image bytes -> normalised float32 CHW arrays, as CLIP trains and evaluates (pure numpy + PIL).

Eval: resize the shorter side to `size` and center-crop. Train: random resized crop (area `scale`,
aspect `ratio`) drawn from a numpy Generator the caller seeds, so the same (seed, sample) gives the
same view. No horizontal flip by default, as open_clip: a flipped "pointing left" image would be
trained as "pointing left" while showing right. `hflip=True` flips half the time, and never a
sample whose captions hold a direction word (`has_direction_word`). Both are done as ONE PIL resize with a source box, which
crops and scales in a single pass (cheaper than crop-then-resize on large images). Transparent
images (emoji PNGs are RGBA) are composited on white: dropping alpha would leave the colour of
transparent pixels, which is arbitrary (often black) and differs between encoders.

A file that cannot be decoded raises `CorruptImageError`, so callers skip and count it instead of
failing a whole batch.
"""
from __future__ import annotations

import io
import math
import re
from typing import Optional, Sequence

import numpy as np
from PIL import Image

# CLIP's (OpenAI) normalisation, used by open_clip, MetaCLIP and Llip.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_MEAN = np.asarray(CLIP_MEAN, dtype=np.float32) * 255.0
_INV_STD = 1.0 / (np.asarray(CLIP_STD, dtype=np.float32) * 255.0)

# open_clip's training defaults: mild crops keep the caption true to the image.
TRAIN_SCALE = (0.9, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)


# Words whose meaning a mirror image reverses: left/right and their derived forms (leftwards, right-facing,
# leftmost, ...), clockwise turns, and east/west compass directions (north-east arrow).
_DIRECTION = re.compile(r"(?<![a-z])(left|right|clockwise|anticlockwise|counterclockwise|counter-clockwise|"
                        r"east|west|northeast|northwest|southeast|southwest)", re.IGNORECASE)


def has_direction_word(text: str) -> bool:
    """True when mirroring the image would contradict the caption (prefix match: "leftwards", "rightmost")."""
    return _DIRECTION.search(text) is not None


class CorruptImageError(ValueError):
    """The bytes are not a decodable image (truncated, wrong format, empty)."""


def load_rgb(data: bytes, draft_size: Optional[int] = None) -> Image.Image:
    """Decode to an RGB PIL image; transparency is composited on white.

    `draft_size`: for JPEG, let the decoder downscale by a power of two while keeping both sides
    >= draft_size (much faster on large photos; no effect on PNG).
    """
    if not data:
        raise CorruptImageError("empty image data")
    try:
        img = Image.open(io.BytesIO(data))
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        img = as_rgb(img)
    except CorruptImageError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad input
        raise CorruptImageError(f"cannot decode image: {type(e).__name__}: {e}") from None
    if img.width < 1 or img.height < 1:
        raise CorruptImageError("image has zero size")
    return img


def as_rgb(img: Image.Image) -> Image.Image:
    """An opened PIL image as RGB, transparency composited on white (training's decode)."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGB" and "transparency" in img.info):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img.convert("RGB")


def center_crop_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The largest centered square: resizing it to size x size equals resize-shorter + center crop."""
    side = min(width, height)
    x0 = (width - side) / 2
    y0 = (height - side) / 2
    return (x0, y0, x0 + side, y0 + side)


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: Sequence[float] = TRAIN_SCALE,
    ratio: Sequence[float] = TRAIN_RATIO,
) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop box: 10 tries at a random area/aspect, else a center crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = math.sqrt(target * aspect)
        h = math.sqrt(target / aspect)
        if 0 < w <= width and 0 < h <= height:
            x0 = rng.uniform(0, width - w)
            y0 = rng.uniform(0, height - h)
            return (x0, y0, x0 + w, y0 + h)
    # fallback: the whole image clamped to the ratio range, centered
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, width / ratio[0]
    elif in_ratio > ratio[1]:
        w, h = height * ratio[1], height
    else:
        w, h = width, height
    x0, y0 = (width - w) / 2, (height - h) / 2
    return (x0, y0, x0 + w, y0 + h)


def transform(
    img: Image.Image, size: int, rng: Optional[np.random.Generator] = None, augment: bool = False,
    scale: Sequence[float] = TRAIN_SCALE, ratio: Sequence[float] = TRAIN_RATIO, hflip: bool = False,
    captions: Sequence[str] = (),
) -> np.ndarray:
    """PIL RGB image -> uint8 HWC (size, size, 3): eval crop, or a random crop when augmenting, plus a
    flip half the time with `hflip` unless one of `captions` holds a direction word."""
    if augment:
        if rng is None:
            raise ValueError("augment=True needs a numpy Generator (seed it for reproducible views)")
        box = random_resized_crop_box(img.width, img.height, rng, scale, ratio)
        # the coin is drawn either way, so switching hflip on changes flips only, not the crops
        flip = rng.random() < 0.5 and hflip and not any(has_direction_word(c) for c in captions)
    else:
        box = center_crop_box(img.width, img.height)
        flip = False
    # reducing_gap: a cheap box pre-shrink before the bicubic pass when downscaling a lot
    out = img.resize((size, size), Image.BICUBIC, box=box, reducing_gap=3.0)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


def normalize(hwc_uint8: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) with CLIP mean/std."""
    # channels first while still uint8, then per-channel ops over whole planes: the same float32
    # operations element by element as (x - mean) * inv_std on (..., 3), a few times faster
    x = np.ascontiguousarray(np.moveaxis(hwc_uint8, -1, -3), dtype=np.float32)
    x -= _MEAN[:, None, None]
    x *= _INV_STD[:, None, None]
    return x


def normalize_torch(hwc_uint8, dtype=None):
    """`normalize` for a torch uint8 tensor (..., H, W, 3) on any device: the same float32 ops, so
    the result is bit-identical to normalizing with numpy before the transfer."""
    import torch

    mean = torch.as_tensor(_MEAN, device=hwc_uint8.device).view(3, 1, 1)
    inv_std = torch.as_tensor(_INV_STD, device=hwc_uint8.device).view(3, 1, 1)
    # channels first in the conversion from uint8 (one pass), then in-place per-channel ops over
    # whole planes: 4x faster on a CPU than the same ops on (..., 3) then a transposing copy, which
    # took most of a small model's training step at 224 px
    x = hwc_uint8.movedim(-1, -3).to(torch.float32, memory_format=torch.contiguous_format)
    x.sub_(mean).mul_(inv_std)
    return x if dtype is None else x.to(dtype)


def preprocess(
    data: bytes, size: int, rng: Optional[np.random.Generator] = None, augment: bool = False,
) -> np.ndarray:
    """Image bytes -> float32 (3, size, size). Raises CorruptImageError on undecodable bytes."""
    img = load_rgb(data, draft_size=size)
    return normalize(transform(img, size, rng, augment))


def preprocess_batch(
    datas: Sequence[Optional[bytes]], size: int, rng: Optional[np.random.Generator] = None,
    augment: bool = False, rngs: Optional[Sequence[np.random.Generator]] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Many images at once: (float32 (M, 3, size, size) for the decodable ones, bool mask (N,)).

    `rngs`: one Generator per image (order-independent, reproducible per sample); else `rng` is
    shared in order. Missing (None) or corrupt images are False in the mask and left out.
    """
    ok = np.zeros(len(datas), dtype=bool)
    out = np.empty((len(datas), size, size, 3), dtype=np.uint8)
    n = 0
    for i, data in enumerate(datas):
        if data is None:
            continue
        try:
            img = load_rgb(data, draft_size=size)
        except CorruptImageError:
            continue
        g = rngs[i] if rngs is not None else rng
        out[n] = transform(img, size, g, augment)
        ok[i] = True
        n += 1
    return normalize(out[:n]), ok
