"""A trained model leaving llip-orch (issue 25), without Ray: `llip export` of a real checkpoint file,
loading it in a fresh process that never imports ray or mlflow, open_clip's own loader on the
`--format open_clip` layout, and the refusals. (The smoke run's export, init_from and the MLflow
model of a real run: tests/test_models_e2e.py.)"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from orchestrator.cli import main as llip_main

pytestmark = pytest.mark.timeout(300)

WORDS = ("a red circle blue square green star yellow heart drawing of thing number item photo cat dog "
         "smiling face emoji one two three")
TEXTS = ["a red circle", "a blue square", "a drawing of a cat", "an emoji of a smiling face", "words never seen"]


def make_checkpoint(tmp_path: Path, loss: str = "llip", pooling=None, step: int = 5, seed: int = 0,
                    vocab: str = "compact", **model) -> tuple[Path, object]:
    """A checkpoint folder as the worker writes it (state.pt with model, optimizer, step, config and
    tokenizer spec), holding a micro model whose every tensor is random (LayerNorms included, so a
    tensor mapped to the wrong place changes the scores)."""
    from llip_core.task import build_task
    from llip_core.tokenizer import build_compact_spec
    from orchestrator.config.schema import parse_config, yaml_spec
    from orchestrator.training.tokenization import with_vocab_size

    m = {"size": "micro", "vocab": vocab, **({"pooling": pooling} if pooling else {}), **model}
    if vocab == "full":
        m["vocab_size"] = 49408
    cfg = parse_config({"name": f"toy_{loss}", "model": m, "loss": {"type": loss}})
    spec = build_compact_spec(yaml_spec(cfg), WORDS.split()) if vocab == "compact" else yaml_spec(cfg)
    cfg = with_vocab_size(cfg, spec)
    torch.manual_seed(seed)
    core = build_task(cfg.resolved_model(), cfg.loss.type)
    with torch.no_grad():
        for name, p in core.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.dim() > 1 else 0.3))
    d = tmp_path / f"ckpt_{loss}_{seed}" / "checkpoint_000001"
    d.mkdir(parents=True)
    opt = torch.optim.AdamW(core.parameters())
    torch.save({"model": core.state_dict(), "optimizer": opt.state_dict(), "step": step, "epoch": 0,
                "config": cfg.model_dump(mode="json"), "tokenizer": spec}, d / "state.pt")
    return d, core


def images(n: int = 4, size: int = 20) -> list[bytes]:
    """PNG bytes of distinct images (one with transparency), not at the model's size."""
    from PIL import Image

    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        a = rng.integers(0, 256, size=(size, size + 3 * i, 4 if i == 0 else 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def reference_scores(core, imgs: list[bytes], texts: list[str], spec: dict, tau=None) -> torch.Tensor:
    """Scores of the checkpoint's own model, through the training pipeline's decode and eval code."""
    from llip_core.evaluate import pair_scores
    from llip_core.preprocess import preprocess
    from llip_core.tokenizer import build_tokenizer

    model = core.model.eval()
    x = torch.from_numpy(np.stack([preprocess(b, model.cfg.image_size) for b in imgs]))
    t = torch.as_tensor(build_tokenizer(spec)(texts))
    with torch.no_grad():
        return pair_scores(model, model.encode_image(x), model.encode_text(t), tau=tau)


FRESH = r"""
import io, json, sys
import numpy as np
from PIL import Image
import llip_core.pretrained as pretrained
folder, blobs, texts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
m = pretrained.load(folder)
imgs = [bytes.fromhex(b) for b in blobs]
pil = [Image.open(io.BytesIO(b)) for b in imgs]
arrays = [np.asarray(p.convert("RGBA") if p.mode == "RGBA" else p.convert("RGB")) for p in pil]
s = m.score(pil, texts)
s_arr = m.score(arrays, texts)
zs = m.zero_shot(pil, ["cat", "dog", "star"], ["a photo of a {c}.", "a drawing of a {}"])
print(json.dumps({"scores": s.tolist(), "scores_from_arrays": s_arr.tolist(), "zero_shot": zs.tolist(),
                  "training": m.model.training, "pooling": m.pooling,
                  "modules": sorted(k for k in sys.modules if k.split(".")[0] in ("ray", "mlflow", "orchestrator"))}))
"""


def load_fresh(folder: Path, imgs: list[bytes], texts: list[str]) -> dict:
    """Load the export in a new interpreter that has only llip_core on its path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["PYTHONPATH"] = str(ROOT)  # llip_core from this checkout, not the venv's editable install
    r = subprocess.run([sys.executable, "-c", FRESH, str(folder), json.dumps([b.hex() for b in imgs]), json.dumps(texts)],
                       capture_output=True, text=True, env=env, cwd=folder, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("loss", ["llip", "siglip"])
def test_export_then_load_in_a_fresh_process_gives_the_checkpoints_scores(tmp_path, capsys, loss):
    ckpt, core = make_checkpoint(tmp_path, loss)
    out = tmp_path / "export"
    assert llip_main(["export", str(ckpt), "--out", str(out), "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"]) == 0
    assert "no MLflow run found" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "bpe_simple_vocab_16e6.txt.gz", "config.json",
                                                      "model.safetensors"]
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        assert all(f.get_slice(k).get_dtype() in ("F32", "I64") for k in names)
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert names == {k[len("model."):] if k.startswith("model.") else k for k in state["model"]}  # weights only
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tokenizer"]["vocab"] == "compact" and cfg["tokenizer"]["ids"] == state["tokenizer"]["ids"]
    assert cfg["preprocess"]["size"] == 16 and cfg["preprocess"]["mean"][0] == pytest.approx(0.48145466)
    assert cfg["source"]["step"] == 5 and cfg["model"]["pooling"] == ("llip" if loss == "llip" else "cls")

    imgs = images()
    got = load_fresh(out, imgs, TEXTS)
    assert got["modules"] == [] and got["training"] is False
    ref = reference_scores(core, imgs, TEXTS, state["tokenizer"])
    assert ref.std() > 0.05  # the scores tell pairs apart, so agreeing means something
    assert np.abs(np.asarray(got["scores"]) - ref.numpy()).max() <= 1e-6
    assert np.abs(np.asarray(got["scores_from_arrays"]) - ref.numpy()).max() <= 1e-6

    # zero-shot: per class, normalised text embeddings averaged over templates and renormalised
    from llip_core.evaluate import class_text_features, pair_scores
    from llip_core.preprocess import preprocess
    from llip_core.tokenizer import build_tokenizer

    model = core.model.eval()
    x = torch.from_numpy(np.stack([preprocess(b, 16) for b in imgs]))
    with torch.no_grad():
        cls = class_text_features(model, ["cat", "dog", "star"], ["a photo of a {c}.", "a drawing of a {}"],
                                  build_tokenizer(state["tokenizer"]))
        zs = pair_scores(model, model.encode_image(x), cls)
    assert np.abs(np.asarray(got["zero_shot"]) - zs.numpy()).max() <= 1e-6


def test_llip_score_takes_tau_and_bf16_halves_the_file(tmp_path):
    import llip_core.pretrained as pretrained

    ckpt, core = make_checkpoint(tmp_path, "llip")
    out32, out16 = tmp_path / "e32", tmp_path / "e16"
    assert llip_main(["export", str(ckpt / "state.pt"), "--out", str(out32)]) == 0
    assert llip_main(["export", str(ckpt), "--out", str(out16), "--dtype", "bf16"]) == 0
    m32, m16 = pretrained.load(out32), pretrained.load(out16)
    imgs = images(3)
    spec = json.loads((out32 / "config.json").read_text())["tokenizer"]
    for tau in (1.0, 10.0):
        ref = reference_scores(core, imgs, TEXTS, spec, tau=tau)
        assert (m32.score(imgs, TEXTS, tau=tau) - ref).abs().max() <= 1e-6
    assert (m32.score(imgs, TEXTS, tau=1.0) - m32.score(imgs, TEXTS, tau=10.0)).abs().max() > 1e-3
    size32, size16 = (out32 / "model.safetensors").stat().st_size, (out16 / "model.safetensors").stat().st_size
    assert size16 < 0.55 * size32
    assert (m16.score(imgs, TEXTS) - m32.score(imgs, TEXTS)).abs().max() < 0.05  # bf16 rounding, not a new model
    feats = m32.encode_image(imgs)
    assert set(feats) == {"keys", "values"} and feats["keys"].shape == (3, 4, 4, 8)  # (N, H, K, D/H)
    txt = m32.encode_text(TEXTS)
    assert (m32.score_features(feats, txt) - m32.score(imgs, TEXTS)).abs().max() <= 1e-6
    assert m32.logit_scale == pytest.approx(float(core.logit_scale.detach().exp()), rel=1e-6)
    assert m32.logit_bias == pytest.approx(float(core.logit_bias.detach()), rel=1e-6)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_open_clip_format_loads_in_open_clips_own_code_with_the_same_embeddings(tmp_path, loss):
    ckpt, core = make_checkpoint(tmp_path, loss, seed=1)
    out = tmp_path / "oc"
    assert llip_main(["export", str(ckpt), "--out", str(out), "--format", "open_clip"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "open_clip_config.json", "open_clip_model.safetensors"]
    x = torch.randn(3, 3, 16, 16)
    np.save(tmp_path / "x.npy", x.numpy())
    (tmp_path / "texts.json").write_text(json.dumps(TEXTS))
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "open_clip_reference.py"), str(out), str(tmp_path / "x.npy"),
                        str(tmp_path / "texts.json")], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    oc = json.loads(r.stdout.strip().splitlines()[-1])
    assert oc["class"] == "CLIP"

    from llip_core.tokenizer import build_tokenizer

    state = torch.load(ckpt / "state.pt", weights_only=False)
    model = core.model.eval()
    with torch.no_grad():
        ours_img = model.encode_image(x)["image_emb"]
        ours_txt = model.encode_text(torch.as_tensor(build_tokenizer(state["tokenizer"])(TEXTS)))["text_emb"]
    assert np.abs(np.asarray(oc["image"]) - ours_img.numpy()).max() <= 1e-5
    # open_clip's tokenizer gives full BPE ids; the expanded table maps them as our compact vocabulary does,
    # so even the unseen words ("never seen") embed alike
    assert np.abs(np.asarray(oc["text"]) - ours_txt.numpy()).max() <= 1e-5
    assert (ours_txt @ ours_txt.T).fill_diagonal_(0).abs().max() < 0.99  # distinct texts stay distinct
    assert oc["logit_scale"] == pytest.approx(float(core.logit_scale.detach().exp()), rel=1e-6)
    assert (oc["logit_bias"] is None) == (loss == "clip")
    if loss == "siglip":
        assert oc["logit_bias"] == pytest.approx(float(core.logit_bias), rel=1e-6)
    oc_cfg = json.loads((out / "open_clip_config.json").read_text())
    assert oc_cfg["preprocess_cfg"]["size"] == 16 and oc_cfg["model_cfg"]["text_cfg"]["vocab_size"] == 49408


def test_bad_input_is_one_line(tmp_path, capsys):
    import llip_core.pretrained as pretrained

    ckpt, _ = make_checkpoint(tmp_path, "llip")
    assert llip_main(["export", str(ckpt), "--out", str(tmp_path / "oc"), "--format", "open_clip"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "open_clip's layout holds one embedding per image" in err[0] and "--format llip" in err[0]

    (tmp_path / "notexport").mkdir()
    with pytest.raises(pretrained.PretrainedError, match=r"notexport: not an llip export \(no config.json\)"):
        pretrained.load(tmp_path / "notexport")
    with pytest.raises(pretrained.PretrainedError, match="no such folder"):
        pretrained.load(tmp_path / "missing")

    # a model.safetensors of another model than config.json describes names the tensor and both shapes
    out = tmp_path / "e"
    assert llip_main(["export", str(ckpt), "--out", str(out)]) == 0
    other, _ = make_checkpoint(tmp_path, "llip", seed=2, mixture_tokens=6)
    (tmp_path / "e6").mkdir()
    assert llip_main(["export", str(other), "--out", str(tmp_path / "e6")]) == 0
    (out / "model.safetensors").write_bytes((tmp_path / "e6" / "model.safetensors").read_bytes())
    with pytest.raises(pretrained.PretrainedError, match=r"tensor mixture_tokens has shape \(6, 32\), expected \(4, 32\)"):
        pretrained.load(out)

    assert llip_main(["export", "no-such-run", "--out", str(tmp_path / "x"),
                      "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-run: neither a checkpoint path nor an MLflow run" in err[0]
    assert not (tmp_path / "m.db").exists()  # looking a run up created no store
