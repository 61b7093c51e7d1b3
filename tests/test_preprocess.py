"""llip_core.preprocess: decode, CLIP normalisation, eval crop, seeded train augmentation, corrupt input."""
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from llip_core.preprocess import (
    CLIP_MEAN, CLIP_STD, CorruptImageError, load_rgb, normalize, preprocess, preprocess_batch,
    random_resized_crop_box,
)

MEAN = np.asarray(CLIP_MEAN, dtype=np.float32)[:, None, None]
STD = np.asarray(CLIP_STD, dtype=np.float32)[:, None, None]


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def expected(rgb) -> np.ndarray:
    return (np.asarray(rgb, dtype=np.float32)[:, None, None] / 255.0 - MEAN) / STD


def test_shape_dtype_and_clip_normalisation():
    x = preprocess(encode(Image.new("RGB", (50, 40), (128, 64, 200))), 16)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_allclose(x, np.broadcast_to(expected((128, 64, 200)), x.shape), atol=1e-5)


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (72, 72), (0, 0, 0, 0))  # fully transparent black
    img.paste((255, 0, 0, 255), (24, 24, 48, 48))  # opaque red square in the middle
    x = preprocess(encode(img), 72)
    np.testing.assert_allclose(x[:, 0, 0], expected((255, 255, 255))[:, 0, 0], atol=1e-5)  # corner: white
    np.testing.assert_allclose(x[:, 36, 36], expected((255, 0, 0))[:, 0, 0], atol=1e-5)
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))  # half-transparent black -> mid grey
    assert abs(np.asarray(load_rgb(encode(half)))[0, 0, 0] - 127) <= 1


def test_palette_and_grey_images_with_transparency():
    p = Image.new("P", (10, 10), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.info["transparency"] = 0
    assert load_rgb(encode(p, transparency=0)).getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (10, 10), (0, 0))
    assert load_rgb(encode(la)).getpixel((5, 5)) == (255, 255, 255)
    assert load_rgb(encode(Image.new("L", (4, 4), 7))).getpixel((0, 0)) == (7, 7, 7)


def test_eval_is_resize_shorter_side_then_center_crop():
    img = Image.new("RGB", (90, 30), (255, 0, 0))  # red | green | blue thirds; the center square is green
    img.paste((0, 255, 0), (30, 0, 60, 30))
    img.paste((0, 0, 255), (60, 0, 90, 30))
    x = preprocess(encode(img), 10)
    np.testing.assert_allclose(x[:, 2:8, 2:8], np.broadcast_to(expected((0, 255, 0)), (3, 6, 6)), atol=0.05)
    tall = preprocess(encode(img.rotate(90, expand=True)), 10)  # same on a portrait image
    np.testing.assert_allclose(tall[:, 2:8, 2:8], x[:, 2:8, 2:8], atol=0.05)


def _asymmetric() -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)))


def test_train_augmentation_is_seeded():
    data = _asymmetric()
    a = preprocess(data, 24, np.random.default_rng(5), augment=True)
    b = preprocess(data, 24, np.random.default_rng(5), augment=True)
    c = preprocess(data, 24, np.random.default_rng(6), augment=True)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    with pytest.raises(ValueError):
        preprocess(data, 24, None, augment=True)


def _flips(captions=(), hflip=True, n=200):
    """How many of n seeded training views of an asymmetric image are its mirror image."""
    from llip_core.preprocess import transform

    img = load_rgb(_asymmetric())
    # scale 1 at the image's own aspect (64/48) is the whole image, either as is or mirrored
    full = np.asarray(img.resize((16, 16), Image.BICUBIC, box=(0, 0, 64, 48), reducing_gap=3.0))
    flips = 0
    for s in range(n):
        out = transform(img, 16, np.random.default_rng(s), augment=True, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3),
                        hflip=hflip, captions=captions)
        if np.array_equal(out, full[:, ::-1]):
            flips += 1
        else:
            np.testing.assert_array_equal(out, full)
    return flips


def test_no_flip_by_default_as_open_clip():
    assert _flips(hflip=False) == 0
    assert _flips(["a red apple"], hflip=False) == 0


def test_flip_option_flips_about_half_and_never_a_direction_caption():
    assert 70 < _flips(["grinning face"]) < 130
    assert _flips(["backhand index pointing left"]) == 0
    assert _flips(["grinning face", "arrow pointing Rightwards"]) == 0  # any of the sample's captions


@pytest.mark.parametrize("text,directional", [
    ("backhand index pointing left", True), ("LEFTWARDS ARROW", True), ("right-facing fist", True),
    ("left-right arrow", True), ("clockwise vertical arrows", True), ("counterclockwise arrows button", True),
    ("north-east arrow", True), ("south west arrow", True), ("rightmost", True),
    ("bright button", False), ("copyright", False), ("feast", False), ("grinning face", False), ("", False),
])
def test_direction_words(text, directional):
    from llip_core.preprocess import has_direction_word

    assert has_direction_word(text) is directional


def test_real_emoji_direction_samples_are_never_flipped(monkeypatch):
    """Real Twemoji samples through the data pipeline's decoder, with the flip option on."""
    import json

    import orchestrator.data.decode as data
    from llip_core.preprocess import has_direction_word
    from orchestrator.data.sources import _read_file, emoji_records

    records = emoji_records()
    directional = [r for r in records if any(has_direction_word(c) for c in r["captions"])]
    plain = [r for r in records if not any(has_direction_word(c) for c in r["captions"])]
    assert len(directional) > 100  # the issue counted 184 of 3,972 captions
    picked = directional[::max(1, len(directional) // 24)][:24] + plain[:24]
    cols = {k: [] for k in ("key", "url", "image", "txt", "json", "error")}
    for r in picked:
        cols["key"].append(r["code"])
        cols["url"].append("/x/train-00000.tar")
        cols["image"].append(_read_file(r["path"])()[0])
        cols["txt"].append(r["captions"][0].encode())
        cols["json"].append(json.dumps({"captions": r["captions"]}).encode() if len(r["captions"]) > 1 else None)
        cols["error"].append(None)
    batch = {k: np.array(v, dtype=object) for k, v in cols.items()}
    n_dir = min(24, len(directional))
    flipped_plain = 0
    for epoch in range(6):
        monkeypatch.setattr(data, "current_epoch", lambda e=epoch: e)
        on = data.Decoder(32, 512, 16, augment=True, seed=0, stats=None, hflip=True)(batch)["image"]
        off = data.Decoder(32, 512, 16, augment=True, seed=0, stats=None, hflip=False)(batch)["image"]
        np.testing.assert_array_equal(on[:n_dir], off[:n_dir])  # same crops; direction samples never flipped
        changed = (on[n_dir:] != off[n_dir:]).any((1, 2, 3))
        flipped_plain += int(changed.sum())
        np.testing.assert_array_equal(on[n_dir:][changed], off[n_dir:][changed][..., ::-1])  # a mirror, nothing else
    assert 0.3 < flipped_plain / (6 * (len(picked) - n_dir)) < 0.7


def test_random_resized_crop_box_stays_inside_and_respects_scale():
    rng = np.random.default_rng(0)
    for _ in range(500):
        x0, y0, x1, y1 = random_resized_crop_box(100, 60, rng, scale=(0.5, 1.0))
        assert 0 <= x0 < x1 <= 100 + 1e-9 and 0 <= y0 < y1 <= 60 + 1e-9
        assert (x1 - x0) * (y1 - y0) >= 0.5 * 6000 - 1e-6 or (x1 - x0, y1 - y0) in ((80, 60), (100, 60))


def test_jpeg_including_large_one_decoded_with_draft():
    rng = np.random.default_rng(1)
    big = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
    x = preprocess(encode(big, "JPEG", quality=90), 32)
    assert x.shape == (3, 32, 32) and np.isfinite(x).all()


@pytest.mark.parametrize("data", [
    b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 20,
    encode(Image.new("RGB", (64, 64), (1, 2, 3)))[:60],  # truncated PNG
    encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")[:100],  # truncated JPEG
])
def test_corrupt_images_raise_the_specific_error(data):
    with pytest.raises(CorruptImageError):
        preprocess(data, 16)


def test_batch_skips_missing_and_corrupt():
    good = encode(Image.new("RGB", (20, 20), (10, 20, 30)))
    x, ok = preprocess_batch([good, None, b"junk", good], 8)
    assert ok.tolist() == [True, False, False, True] and x.shape == (2, 3, 8, 8)
    rngs = [np.random.default_rng(i) for i in range(4)]
    x2, ok2 = preprocess_batch([good, None, b"junk", good], 8, augment=True, rngs=rngs)
    assert x2.shape == (2, 3, 8, 8) and ok2.tolist() == ok.tolist()


def test_normalize_batches_channels_last_to_first():
    hwc = np.zeros((2, 4, 5, 3), dtype=np.uint8)
    hwc[..., 1] = 255
    out = normalize(hwc)
    assert out.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(out[0, :, 0, 0], expected((0, 255, 0))[:, 0, 0], atol=1e-5)


def test_llip_core_preprocess_imports_neither_ray_nor_mlflow():
    code = "import sys, llip_core.preprocess; print(any(m.split('.')[0] in ('ray', 'mlflow') for m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr
