"""Several captions per image: the four existing losses with every caption of image i a positive for i
(against literal references written here), the emoji source's perspectives, the decode stage's
`data.captions: one | all`, and the experiment keys. (Holistic CLIP's own model and loss:
tests/test_holistic.py.)"""
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from llip_core.losses import build_loss, llip_pair_logits_literal

TAU = 2.0


# ------------------------------------------------------------------------------------------ losses
def _features(kind, B, M, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, K, d = 2, 3, 4
    D = H * d
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    mask = torch.rand(B, M, generator=g) < 0.7
    mask[:, 0] = True
    if kind == "dot":
        img, txt, params = {"image_emb": F.normalize(r(B, D), dim=-1)}, {"text_emb": F.normalize(r(B * M, D), dim=-1)}, {}
    else:
        img = {"keys": r(B, H, K, d), "values": r(B, H, K, d)}
        txt = {"queries": r(B * M, H, d), "text_emb": F.normalize(r(B * M, D), dim=-1)}
        params = {"out_proj": r(D, D) * D ** -0.5}
    return img, txt, params, mask


def _cosines(img, txt, params):
    """(B, B*M) cosine of image i with text row j, the paper's literal formulation for Llip."""
    if "image_emb" in img:
        return img["image_emb"] @ txt["text_emb"].T
    return llip_pair_logits_literal(img["keys"], img["values"], txt["queries"], txt["text_emb"],
                                    params["out_proj"], TAU)


def literal_infonce(S, mask, s):
    """Every real caption c of image i: image->text -log e^{l_ic} / (e^{l_ic} + sum over real captions
    of other images), text->image -log e^{l_ic} / sum_j e^{l_jc}; averaged over real captions, then the
    two directions."""
    B, M = mask.shape
    terms = []
    for i in range(B):
        for m in range(M):
            if not mask[i, m]:
                continue
            c = i * M + m
            negs = [s * S[i, j * M + n] for j in range(B) if j != i for n in range(M) if mask[j, n]]
            i2t = torch.logsumexp(torch.stack([s * S[i, c]] + negs), 0) - s * S[i, c]
            t2i = torch.logsumexp(torch.stack([s * S[j, c] for j in range(B)]), 0) - s * S[i, c]
            terms.append((i2t + t2i) / 2)
    return torch.stack(terms).mean()


def literal_sigmoid(S, mask, s, b):
    """-sum over images i and real captions c of log sigmoid(y (s S_ic + b)), y = +1 iff c is i's; / B."""
    B, M = mask.shape
    total = 0
    for i in range(B):
        for j in range(B):
            for n in range(M):
                if mask[j, n]:
                    y = 1.0 if i == j else -1.0
                    total = total - F.logsigmoid(y * (s * S[i, j * M + n] + b))
    return total / B


CASES = [("clip", "dot", "infonce"), ("siglip", "dot", "sigmoid"),
         ("llip", "llip", "sigmoid"), ("llip_infonce", "llip", "infonce")]


@pytest.mark.parametrize("loss_type,kind,family", CASES)
def test_multi_caption_losses_match_literal(loss_type, kind, family):
    img, txt, params, mask = _features(kind, B=5, M=3, seed=len(loss_type))
    log_s = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    bias = torch.tensor(-2.0, dtype=torch.float64)

    def run(fn):
        leaves = {**{f"i.{k}": v for k, v in img.items()}, **{f"t.{k}": v for k, v in txt.items()}, **params,
                  "log_s": log_s, "bias": bias}
        leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
        loss = fn(leaves)
        loss.backward()
        return loss.detach(), {k: v.grad for k, v in leaves.items() if v.grad is not None}

    def ours(L):
        fn = build_loss(loss_type, tau=TAU, chunk_size=2, multi_caption=True)
        return fn({k[2:]: v for k, v in L.items() if k.startswith("i.")},
                  {k[2:]: v for k, v in L.items() if k.startswith("t.")},
                  logit_scale=L["log_s"].exp(), logit_bias=L["bias"] if family == "sigmoid" else None,
                  caption_mask=mask, **({"out_proj": L["out_proj"]} if "out_proj" in L else {}))["loss"]

    def ref(L):
        S = _cosines({k[2:]: v for k, v in L.items() if k.startswith("i.")},
                     {k[2:]: v for k, v in L.items() if k.startswith("t.")}, L)
        if family == "infonce":
            return literal_infonce(S, mask, L["log_s"].exp())
        return literal_sigmoid(S, mask, L["log_s"].exp(), L["bias"])

    (lo, go), (lr, gr) = run(ours), run(ref)
    torch.testing.assert_close(lo, lr)
    assert go.keys() == gr.keys()
    for k in gr:
        torch.testing.assert_close(go[k], gr[k], msg=k)


@pytest.mark.parametrize("loss_type,kind,family", CASES)
def test_one_caption_per_image_is_the_single_caption_loss(loss_type, kind, family):
    img, txt, params, _ = _features(kind, B=6, M=1, seed=3)
    kw = dict(logit_scale=torch.tensor(14.0, dtype=torch.float64),
              logit_bias=torch.tensor(-3.0, dtype=torch.float64) if family == "sigmoid" else None, **params)
    single = build_loss(loss_type, tau=TAU, chunk_size=2)(img, txt, **kw)["loss"]
    multi = build_loss(loss_type, tau=TAU, chunk_size=2, multi_caption=True)(img, txt, **kw)["loss"]
    torch.testing.assert_close(multi, single)


def test_task_takes_tokens_with_a_caption_axis_only_with_a_multi_caption_loss():
    from llip_core.config import SIZES
    from llip_core.task import build_task

    tokens = torch.zeros(2, 3, 8, dtype=torch.long)
    tokens[..., 0], tokens[..., 1] = 1, 2
    with pytest.raises(ValueError, match="multi_caption"):
        build_task(SIZES["micro"].replace(pooling="cls"), "clip")(torch.randn(2, 3, 16, 16), tokens)
    out = build_task(SIZES["micro"], "llip", multi_caption=True)(torch.randn(2, 3, 16, 16), tokens,
                                                                  torch.tensor([[1, 1, 0], [1, 0, 0]]).bool())
    assert torch.isfinite(out["loss"])


# ------------------------------------------------------------------------------------------ emoji source
def test_emoji_records_carry_group_and_subgroup_from_unicode():
    from orchestrator.data.sources import EMOJI_TEST, emoji_groups, emoji_records

    groups = emoji_groups()
    if not groups:
        pytest.skip(f"{EMOJI_TEST} not installed (Debian unicode-data; the Makefile installs it)")
    dog = next(r for r in emoji_records() if r["captions"][0] == "dog face")
    assert dog["captions"] == ["dog face", "dog"]  # default captions unchanged: name, aliases
    assert (dog["group"], dog["subgroup"]) == ("animals & nature", "animal mammal")
    assert dog["perspectives"] == ["name", "alias"]
    assert emoji_groups("/nonexistent") == {}


def test_encode_sample_json_keeps_the_default_draw_apart():
    from orchestrator.data.decode import parse_captions, default_captions
    from orchestrator.data.tars import encode_sample

    members = dict(encode_sample("k", b"img", "png", ["dog face", "dog"], ["name", "alias"],
                                 [("group", "animals & nature"), ("subgroup", "animal mammal")]))
    obj = json.loads(members["k.json"])
    assert members["k.txt"] == b"dog face"
    assert obj["captions"] == ["dog face", "animals & nature", "animal mammal", "dog"]
    assert obj["perspectives"] == ["name", "group", "subgroup", "alias"]
    caps = parse_captions(members["k.txt"], members["k.json"])
    assert caps == obj["captions"]
    assert default_captions(caps, members["k.json"]) == ["dog face", "dog"]
    # shards written before perspectives existed: every caption is a default one
    old = json.dumps({"captions": ["a", "b"]}).encode()
    assert default_captions(["a", "b"], old) == ["a", "b"]
    # one caption and no extra perspective: no json at all, as before
    assert [n for n, _ in encode_sample("k", b"i", "png", ["x"], ["name"])] == ["k.png", "k.txt"]


# ------------------------------------------------------------------------------------------ decode stage
def _png():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _batch(rows):
    """rows: (key, json obj or None, txt or None)."""
    cols = {k: [] for k in ("key", "url", "image", "txt", "json", "error")}
    for key, obj, txt in rows:
        cols["key"].append(key)
        cols["url"].append("/x/train-00000.tar")
        cols["image"].append(_png())
        cols["txt"].append(txt.encode() if txt else None)
        cols["json"].append(json.dumps(obj).encode() if obj else None)
        cols["error"].append(None)
    return {k: np.array(v, dtype=object) for k, v in cols.items()}


PERSPECTIVE = {"captions": ["dog face", "animals & nature", "animal mammal", "dog"],
               "perspectives": ["name", "group", "subgroup", "alias"], "default": [0, 3]}


def _decoder(**kw):
    from orchestrator.data.decode import Decoder

    return Decoder(image_size=16, vocab_size=512, context_length=8, augment=False, seed=0, **{"stats": None, **kw})


def test_one_caption_draw_never_picks_a_non_default_perspective(monkeypatch):
    import orchestrator.data.decode as data

    batch = _batch([(f"k{i}", PERSPECTIVE, "dog face") for i in range(16)])
    ref = {c: _decoder()(_batch([("r", None, c)]))["tokens"][0] for c in PERSPECTIVE["captions"]}
    seen = set()
    for epoch in range(6):
        monkeypatch.setattr(data, "current_epoch", lambda e=epoch: e)
        for row in _decoder()(batch)["tokens"]:
            seen.add(next(c for c, t in ref.items() if (t == row).all()))
    assert seen == {"dog face", "dog"}  # both defaults drawn, group/subgroup never


def test_all_captions_padded_with_a_mask_and_no_caption_skipped_and_counted():
    counted = []

    class Stats:
        def add(self, c):
            counted.append(c)

    rows = [("a", PERSPECTIVE, "dog face"), ("b", None, "cat"), ("c", None, None),
            ("d", {"captions": ["x", "y", "z", "w", "v"]}, "x")]
    out = _decoder(captions="all", max_captions=4, stats=Stats())(_batch(rows))
    assert out["tokens"].shape == (3, 4, 8) and out["caption_mask"].shape == (3, 4)
    np.testing.assert_array_equal(out["caption_mask"], [[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]])
    one = lambda c: _decoder()(_batch([("r", None, c)]))["tokens"][0]  # noqa: E731
    for k, c in enumerate(PERSPECTIVE["captions"]):  # stored order, the pipeline's own tokenizer
        np.testing.assert_array_equal(out["tokens"][0, k], one(c))
    np.testing.assert_array_equal(out["tokens"][2, 3], one("w"))  # first max_captions of five
    np.testing.assert_array_equal(out["tokens"][1, 1], out["tokens"][1, 3])
    assert (out["tokens"][1, 1] != 0).sum() == 2  # padding: the empty caption, start and end tokens only
    assert counted[0]["data/skipped_no_caption"] == 1 and counted[0]["data/skipped"] == 1
    ev = _decoder(captions="all", max_captions=4, with_caption=True)(_batch(rows))
    assert ev["tokens"].shape == (3, 8) and "caption_mask" not in ev  # eval rows: one caption each


# ------------------------------------------------------------------------------------------ experiment keys
def _parse(raw):
    from orchestrator.config.schema import parse_config

    return parse_config({"name": "x", **raw})


def test_experiment_keys_and_pooling_following_the_loss():
    cfg = _parse({"loss": {"type": "holistic", "diversity_weight": 0.5}, "model": {"branches": 3},
                  "data": {"captions": "all", "max_captions": 3}})
    m = cfg.resolved_model()
    assert (m.pooling, m.branches, cfg.loss.diversity_margin) == ("multi_cls", 3, 0.7)
    # a sweep over all five loss types: pooling follows each, branches matter to multi_cls only
    for lt, pooling in [("clip", "cls"), ("siglip", "cls"), ("llip", "llip"), ("llip_infonce", "llip"),
                        ("holistic", "multi_cls")]:
        assert cfg.with_overrides({"loss.type": lt}).resolved_model().pooling == pooling


@pytest.mark.parametrize("raw,words", [
    ({"model": {"branches": 0}}, ["model.branches"]),
    ({"loss": {"type": "clip"}, "model": {"pooling": "multi_cls", "branches": 2}}, ["loss.type", "model.branches"]),
    ({"loss": {"type": "holistic"}, "model": {"pooling": "cls"}}, ["loss.type", "model.pooling"]),
    ({"data": {"captions": "some"}}, ["data.captions"]),
    ({"data": {"max_captions": 0}}, ["data.max_captions"]),
])
def test_bad_keys_fail_in_one_line_naming_them(raw, words):
    from orchestrator.config.schema import ConfigError

    with pytest.raises(ConfigError) as e:
        _parse(raw)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
