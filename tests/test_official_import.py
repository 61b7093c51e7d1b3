"""`llip import-official`: the official Llip CMP state dict onto our model, checked against scores the
official model code computed (tests/fixtures/make_official_llip_fixture.py made the fixtures with
facebookresearch/Llip's `llip/open_clip/model.py`)."""
from __future__ import annotations

import argparse
import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.cli import main as llip_main

pytestmark = pytest.mark.timeout(300)
FIXTURES = Path(__file__).parent / "fixtures"
VARIANTS = ["official_llip_micro", "official_llip_micro_norm"]


def fixture(stem: str) -> tuple[dict, dict]:
    meta = json.loads((FIXTURES / f"{stem}.json").read_text())
    ckpt = torch.load(io.BytesIO(gzip.decompress((FIXTURES / f"{stem}.pt.gz").read_bytes())), weights_only=True)
    return meta, ckpt


def heads_args(meta: dict) -> list[str]:
    return ["--heads", str(meta["heads"]), "--text-heads", str(meta["text_heads"]), "--cross-heads", str(meta["cross_heads"])]


def imported_scores(tmp_path: Path, meta: dict, ckpt, name: str = "imp", extra=()) -> tuple[dict, object]:
    import llip_core.pretrained as pretrained

    f = tmp_path / f"{name}.pt"
    torch.save(ckpt, f)
    out = tmp_path / name
    assert llip_main(["import-official", str(f), "--out", str(out), *heads_args(meta), *extra]) == 0
    m = pretrained.load(out)
    imgs = np.asarray(meta["images_uint8_hwc"], dtype=np.uint8)
    return {tau: m.score(imgs, meta["captions"], tau=float(tau)) for tau in meta["scores"]}, m


@pytest.mark.parametrize("stem", VARIANTS)
def test_imported_official_model_gives_the_official_codes_scores(tmp_path, stem):
    meta, ckpt = fixture(stem)
    assert next(iter(ckpt["state_dict"])).startswith("module.")  # as llip/main.py saves a DDP model
    scores, m = imported_scores(tmp_path, meta, ckpt)
    assert m.tokenize(meta["captions"]).tolist() == meta["tokens"]  # our BPE = the official tokenizer
    assert m.config.kqv_norm == stem.endswith("norm") and m.config.mixture_tokens == 4
    assert m.config.image_size == 16 and m.config.context_length == 77 and m.tau == 5.0
    for tau, official in meta["scores"].items():
        official = torch.tensor(official)
        assert official.std() > 0.05
        assert (scores[tau] - official).abs().max() <= 1e-5, tau
    assert m.logit_bias == pytest.approx(-9.5) and m.logit_scale == pytest.approx(np.exp(np.log(1 / 0.07) + 0.3), rel=1e-5)
    card = (tmp_path / "imp" / "README.md").read_text()
    assert "facebookresearch/Llip" in card and "K=4 mixture tokens" in card


def test_other_saved_forms_load_alike_and_a_wrong_mapping_would_show(tmp_path):
    meta, ckpt = fixture(VARIANTS[1])
    reference, _ = imported_scores(tmp_path, meta, ckpt)
    # a bare state dict without prefixes, with the older top-level `out_proj` (the eval loader renames it)
    bare = {k[len("module."):]: v for k, v in ckpt["state_dict"].items()}
    bare["out_proj"] = bare.pop("pred.out_proj")
    scores, _ = imported_scores(tmp_path, meta, bare, "bare")
    assert all((scores[t] - reference[t]).abs().max() <= 1e-7 for t in reference)
    # the check has teeth: keys and values (or their norms) swapped give other scores
    for a, b in (("k_proj", "v_proj"), ("K_norm.weight", "V_norm.weight")):
        swapped = dict(bare)
        swapped[a], swapped[b] = bare[b], bare[a]
        scores, _ = imported_scores(tmp_path, meta, swapped, f"swap_{a[0]}")
        assert (scores["5.0"] - reference["5.0"]).abs().max() > 1e-3, a


def test_shapes_that_do_not_fit_fail_in_one_line_naming_the_tensor(tmp_path, capsys):
    meta, ckpt = fixture(VARIANTS[0])
    sd = dict(ckpt["state_dict"])
    sd["module.k_proj"] = sd["module.k_proj"][:3]  # K=3 keys for K=4 mixture tokens
    f = tmp_path / "bad.pt"
    torch.save({"epoch": 1, "state_dict": sd}, f)
    assert llip_main(["import-official", str(f), "--out", str(tmp_path / "o"), *heads_args(meta)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(f) in err[0] and "tensor k_proj has shape (3, 32, 32), expected (4, 32, 32)" in err[0]
    assert not (tmp_path / "o").exists()  # nothing half-written

    torch.save(ckpt, f)  # the released configs' head rule does not fit a 32-wide micro model: say which flag
    assert llip_main(["import-official", str(f), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "ViT width 32 is not divisible into 0 heads; give the head count with --heads" in err

    clip_like = {k: v for k, v in ckpt["state_dict"].items() if "k_proj" not in k}
    clip_like["module.visual.proj"] = torch.zeros(32, 32)
    torch.save(clip_like, f)
    assert llip_main(["import-official", str(f), "--out", str(tmp_path / "o"), *heads_args(meta)]) == 2
    assert "not Llip's CMP model" in capsys.readouterr().err

    torch.save({"args": argparse.Namespace(lr=1), "state_dict": ckpt["state_dict"]}, f)
    assert llip_main(["import-official", str(f), "--out", str(tmp_path / "o"), *heads_args(meta)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trust-pickle" in err[0]
    assert llip_main(["import-official", str(f), "--out", str(tmp_path / "o"), *heads_args(meta), "--trust-pickle"]) == 0

    assert llip_main(["import-official", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_released_shapes_resolve_to_the_named_sizes():
    """The shapes of the released files (facebookresearch/Llip model configs ViT-B-16-quickgelu-siglip-
    ncls:32 and ViT-bigG-14-quickgelu-siglip-ncls:64-norm) give our B/16 and G/14 configs with the
    release's head counts, checked on shapes alone (no 10 GB download)."""
    from llip_core.config import model_config
    from llip_core.convert import _ours_to_official, official_config
    from llip_core.pretrained import model_shapes

    for size, K in (("B/16", 32), ("G/14", 64)):
        ours = model_config(size, mixture_tokens=K)
        shapes = {_ours_to_official(k): torch.empty(s, device="meta") for k, s in model_shapes(ours).items()}
        cfg = official_config(shapes, size)
        assert (cfg.mixture_tokens, cfg.heads, cfg.text_heads, cfg.cross_heads, cfg.kqv_norm) == \
            (K, ours.heads, ours.text_heads, 8, size == "G/14")
        assert model_shapes(cfg) == model_shapes(ours)
