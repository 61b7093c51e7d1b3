"""The sigmoid losses' initial bias as a choice (loss.init_bias: a number, or auto = -ln of the global
batch, SigLIP's prior argument) and Llip's cross-attention heads as released (model.cross_heads; for
the paper sizes the released config's value per K)."""
import math

import pytest
import torch

from llip_core.config import RELEASED_CROSS_HEADS, SIZES, model_config, released_cross_heads
from llip_core.losses import initial_logits, prior_bias
from llip_core.task import build_task
from orchestrator.config.schema import ConfigError, load_config

torch.set_num_threads(1)


def test_initial_logits_per_loss_and_choice():
    s = math.log(1 / 0.07)
    assert initial_logits("siglip") == (s, -10.0) and initial_logits("llip") == (s, -10.0)
    assert initial_logits("siglip", "siglip_paper") == (math.log(10.0), -10.0)
    assert initial_logits("siglip", init_bias=-3.5) == (s, -3.5)
    assert initial_logits("llip", init_bias="auto", global_batch=128) == (s, -math.log(128))
    assert initial_logits("siglip", "siglip_paper", "auto", 32768) == (math.log(10.0), -math.log(32768))
    assert prior_bias(22026) == pytest.approx(-10.0, abs=1e-4)  # -10 is the prior of a ~22k batch
    for infonce in ("clip", "llip_infonce", "holistic"):  # no bias to start: the choice does not apply
        assert initial_logits(infonce, init_bias="auto", global_batch=128) == (s, None)
    with pytest.raises(ValueError, match="global_batch"):
        initial_logits("siglip", init_bias="auto")
    with pytest.raises(ValueError, match="at least 2"):
        initial_logits("siglip", init_bias="auto", global_batch=1)


def test_build_task_starts_the_bias_where_asked():
    cfg = SIZES["micro"]
    assert build_task(cfg.replace(pooling="cls"), "siglip").logit_bias.item() == -10.0
    t = build_task(cfg, "llip", init_bias="auto", global_batch=128)
    assert t.logit_bias.item() == pytest.approx(-math.log(128), abs=1e-6)
    assert build_task(cfg.replace(pooling="cls"), "siglip", init_bias=-2.0).logit_bias.item() == -2.0
    assert build_task(cfg.replace(pooling="cls"), "clip", init_bias="auto", global_batch=128).logit_bias is None


def _write(tmp_path, text):
    p = tmp_path / "x.yaml"
    p.write_text(text)
    return p


def test_yaml_init_bias_resolves_and_is_recorded_in_the_params(tmp_path):
    cfg = load_config(_write(tmp_path, "name: x\nloss: {type: siglip, init_bias: auto}\ndata: {batch_size: 128}\n"
                                       "scaling: {num_workers: 1}\n"))
    flat = cfg.flat()
    assert flat["loss.init_bias"] == "auto"
    assert flat["loss.init_logit_bias"] == pytest.approx(-math.log(128), abs=1e-6)
    assert flat["loss.init_logit_scale"] == pytest.approx(1 / 0.07, abs=1e-5)
    assert load_config(_write(tmp_path, "name: x\nloss: {type: llip, init_bias: -7}\n")).flat()["loss.init_logit_bias"] == -7.0
    assert load_config(_write(tmp_path, "name: x\nloss: {type: llip}\n")).flat()["loss.init_logit_bias"] == -10.0
    assert load_config(_write(tmp_path, "name: x\nloss: {type: clip, init_bias: auto}\n")).flat()["loss.init_logit_bias"] is None


@pytest.mark.parametrize("text", [
    "name: x\nloss: {type: siglip, init_bias: autoo}\n",
    "name: x\nloss: {type: siglip, init_bias: true}\n",
    "name: x\nloss: {type: siglip, init_bias: .inf}\n",
    "name: x\nloss: {type: siglip, init_bias: auto}\ndata: {batch_size: 1}\nscaling: {num_workers: 1}\n",
])
def test_bad_init_bias_is_one_line_naming_the_key(tmp_path, text):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, text))
    assert "loss.init_bias" in str(e.value) and "\n" not in str(e.value)


def test_released_heads_per_config():
    # facebookresearch/Llip, llip/open_clip/model_configs/ViT-B-32-quickgelu-siglip-ncls:K.json "num_heads"
    assert RELEASED_CROSS_HEADS == {("B/32", 8): 1, ("B/32", 16): 2}
    assert [released_cross_heads("B/32", k) for k in (4, 8, 16, 32, 64, 128, 256)] == [8, 1, 2, 8, 8, 8, 8]
    assert released_cross_heads("G/14", 64) == 8 and released_cross_heads("tiny", 8) is None
    assert model_config("B/32", mixture_tokens=8).cross_heads == 1
    assert model_config("B/32", mixture_tokens=16).cross_heads == 2
    assert model_config("B/32", mixture_tokens=8, cross_heads=8).cross_heads == 8  # an explicit choice wins
    assert model_config("B/16").cross_heads == 8
    assert model_config("tiny").cross_heads == 8  # chosen from measurement (README, "Many captions per image")


def test_yaml_cross_heads_reaches_the_model(tmp_path):
    cfg = load_config(_write(tmp_path, "name: x\nmodel: {cross_heads: 1}\n"))
    m = cfg.resolved_model()
    assert m.cross_heads == 1 and cfg.flat()["model.cross_heads"] == 1
    from llip_core.model import LlipModel

    feats = LlipModel(m.replace(width=32, layers=1, text_width=32, text_layers=1, embed_dim=32,
                                heads=2, text_heads=2)).encode_text(torch.ones(2, m.context_length, dtype=torch.long))
    assert feats["queries"].shape[1] == 1  # one head
    with pytest.raises(ConfigError, match="cross_heads"):
        load_config(_write(tmp_path, "name: x\nmodel: {cross_heads: 3}\n"))  # embed_dim 128 % 3

