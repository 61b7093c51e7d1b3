"""LlipModel against a literal re-implementation of its equations, written here from the formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from llip_core.config import SIZES
from llip_core.model import LlipModel, count_parameters
from llip_core.tokenizer import EOT, SOT

torch.set_num_threads(1)
MICRO = SIZES["micro"]


def _tokens(b, ctx=8, vocab=512, seed=0, lengths=None):
    g = torch.Generator().manual_seed(seed)
    toks = torch.zeros(b, ctx, dtype=torch.long)
    for i in range(b):
        n = lengths[i] if lengths else 2 + i % (ctx - 2)  # words between SOT and EOT
        toks[i, 0] = SOT
        toks[i, 1:1 + n] = torch.randint(3, vocab, (n,), generator=g)
        toks[i, 1 + n] = EOT
    return toks


def _act(x, activation):
    return x * torch.sigmoid(1.702 * x) if activation == "quick_gelu" else F.gelu(x)


def _ref_block(blk, x, heads, causal, activation="quick_gelu"):
    """x + MHA(LN(x)); x + MLP(LN(x)) with attention written out: softmax(q k^T / sqrt(d)) v."""
    b, n, w = x.shape
    d = w // heads
    y = F.layer_norm(x, (w,), blk.ln_1.weight, blk.ln_1.bias)
    qkv = y @ blk.attn.in_proj.weight.T + blk.attn.in_proj.bias
    q, k, v = qkv.split(w, dim=-1)
    out = torch.zeros_like(y)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        s = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)
        if causal:
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out[..., sl] = s.softmax(-1) @ v[..., sl]
    x = x + out @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
    y = F.layer_norm(x, (w,), blk.ln_2.weight, blk.ln_2.bias)
    hid = _act(y @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias, activation)
    return x + hid @ blk.mlp.c_proj.weight.T + blk.mlp.c_proj.bias


def _ref_image_tokens(m, images):
    cfg = m.cfg
    p = cfg.patch_size
    b = images.shape[0]
    # patchify: each patch flattened (c, ph, pw) and multiplied by the conv kernel
    patches = images.unfold(2, p, p).unfold(3, p, p)  # b, c, gh, gw, p, p
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3 * p * p)
    x = patches @ m.conv1.weight.reshape(cfg.width, -1).T
    lead = m.class_embedding if cfg.pooling == "cls" else m.mixture_tokens
    x = torch.cat([lead.unsqueeze(0).expand(b, -1, -1), x], 1) + m.positional_embedding
    x = F.layer_norm(x, (cfg.width,), m.ln_pre.weight, m.ln_pre.bias)
    for blk in m.visual.resblocks:
        x = _ref_block(blk, x, cfg.heads, causal=False, activation=cfg.activation)
    n = lead.shape[0]
    return F.layer_norm(x[:, :n], (cfg.width,), m.ln_post.weight, m.ln_post.bias)


def _ref_text_state(m, tokens):
    cfg = m.cfg
    x = m.token_embedding.weight[tokens] + m.text_positional_embedding[: tokens.shape[1]]
    for blk in m.text.resblocks:
        x = _ref_block(blk, x, cfg.text_heads, causal=True, activation=cfg.activation)
    x = F.layer_norm(x, (cfg.text_width,), m.ln_final.weight, m.ln_final.bias)
    eot = [int((row == EOT).nonzero()[0]) for row in tokens]  # first EOT, by a loop
    return torch.stack([x[i, e] for i, e in enumerate(eot)])


def _ln(x):
    """LayerNorm without the learned affine, written out (the test sets a non-trivial affine below)."""
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / ((x - mu).pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()


@pytest.mark.parametrize("pooling,kqv_norm,activation", [
    ("llip", False, "quick_gelu"), ("llip", True, "quick_gelu"), ("llip", False, "gelu"),
    ("cls", False, "quick_gelu"), ("avg", False, "quick_gelu"), ("register", False, "gelu")])
def test_towers_match_literal_reference(pooling, kqv_norm, activation):
    torch.manual_seed(0)
    cfg = MICRO.replace(pooling=pooling, layers=2, text_layers=2, kqv_norm=kqv_norm, activation=activation)
    m = LlipModel(cfg).double()
    with torch.no_grad():  # non-trivial affine on every LayerNorm, so a skipped norm shows
        for mod in m.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
    nk = (lambda x: _ln(x) * m.k_norm.weight + m.k_norm.bias) if kqv_norm else (lambda x: x)
    nv = (lambda x: _ln(x) * m.v_norm.weight + m.v_norm.bias) if kqv_norm else (lambda x: x)
    nq = (lambda x: _ln(x) * m.q_norm.weight + m.q_norm.bias) if kqv_norm else (lambda x: x)
    images = torch.randn(3, 3, cfg.image_size, cfg.image_size, dtype=torch.float64)
    tokens = _tokens(3)
    img, txt = m.encode_image(images), m.encode_text(tokens)
    h = _ref_image_tokens(m, images)
    ht = _ref_text_state(m, tokens)
    D, H = cfg.embed_dim, cfg.cross_heads
    torch.testing.assert_close(txt["text_emb"], F.normalize(ht @ m.text_projection, dim=-1))
    if pooling == "llip":
        d = D // H
        assert img["keys"].shape == img["values"].shape == (3, H, cfg.mixture_tokens, d)
        assert txt["queries"].shape == (3, H, d)
        for b in range(3):
            for k in range(cfg.mixture_tokens):
                key_k, val_k = nk(h[b, k] @ m.k_proj[k]), nv(h[b, k] @ m.v_proj[k])  # token k's own matrix
                for hh in range(H):
                    torch.testing.assert_close(img["keys"][b, hh, k], key_k[hh * d:(hh + 1) * d])
                    torch.testing.assert_close(img["values"][b, hh, k], val_k[hh * d:(hh + 1) * d])
            q = nq(ht[b] @ m.q_proj)
            for hh in range(H):
                torch.testing.assert_close(txt["queries"][b, hh], q[hh * d:(hh + 1) * d])
        assert "image_emb" not in img
    else:
        if pooling == "cls":
            pooled = h[:, 0] @ m.proj
        else:  # as released: token k's own projection, averaged after projecting (avg) or the first (register)
            per_token = torch.stack([h[:, k] @ m.proj[k] for k in range(cfg.mixture_tokens)], 1)
            pooled = per_token.mean(1) if pooling == "avg" else per_token[:, 0]
        torch.testing.assert_close(img["image_emb"], F.normalize(pooled, dim=-1))
        assert h.shape[1] == (1 if pooling == "cls" else cfg.mixture_tokens)
        assert "queries" not in txt


def test_text_pools_at_first_eot_and_is_causal():
    torch.manual_seed(0)
    m = LlipModel(MICRO).eval()
    tokens = _tokens(4)
    base = m.encode_text(tokens)["text_emb"]
    # tokens after the first EOT (padding, a second EOT, large ids) cannot change the embedding
    t2 = tokens.clone()
    for i in range(4):
        e = int((t2[i] == EOT).nonzero()[0])
        t2[i, e + 1:] = torch.randint(3, 512, (t2.shape[1] - e - 1,))
    torch.testing.assert_close(m.encode_text(t2)["text_emb"], base)
    # a word before the EOT does change it
    t3 = tokens.clone()
    t3[:, 1] = (t3[:, 1] + 1 - 3) % 509 + 3
    assert not torch.allclose(m.encode_text(t3)["text_emb"], base)


def test_pair_scores_for_every_pooling():
    torch.manual_seed(0)
    for pooling in ["llip", "cls", "avg", "register"]:
        m = LlipModel(MICRO.replace(pooling=pooling))
        img = m.encode_image(torch.randn(5, 3, 16, 16))
        txt = m.encode_text(_tokens(3))
        s = m.pair_scores(img, txt)
        assert s.shape == (5, 3) and s.abs().max() <= 1 + 1e-5
        if pooling == "llip":
            torch.testing.assert_close(s, m.pair_scores(img, txt, literal=True), atol=1e-5, rtol=0)


# open_clip's parameter counts for its CLIP models (ViT-B-32/B-16/L-14/H-14/bigG-14).
OPEN_CLIP_M = {"B/32": 151.28, "B/16": 149.62, "L/14": 427.62, "H/14": 986.11, "G/14": 2539.57}


@pytest.mark.parametrize("size", list(OPEN_CLIP_M))
def test_meta_device_clip_parameter_counts(size):
    with torch.device("meta"):
        clip = LlipModel(SIZES[size].replace(pooling="cls"))
    assert next(clip.parameters()).is_meta
    assert abs(count_parameters(clip) / 1e6 - OPEN_CLIP_M[size]) < 0.01


# The official Llip configs (facebookresearch/Llip, llip/open_clip/model_configs/*.json), as released.
_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}
OFFICIAL = {
    "ViT-B-16-quickgelu-siglip-ncls:32": {
        "embed_dim": 512, "num_heads": 8, "init_logit_bias": -10,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16, "ncls": 32},
        "text_cfg": _TEXT},
    "ViT-B-32-quickgelu-siglip-ncls:64": {
        "embed_dim": 512, "num_heads": 8, "init_logit_bias": -10,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32, "ncls": 64},
        "text_cfg": _TEXT},
    "ViT-B-32-quickgelu-siglip-ncls:64-avg": {
        "embed_dim": 512, "init_logit_bias": -10,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32, "ncls": 64, "pool_type": "avg"},
        "text_cfg": _TEXT},
    "ViT-B-32-quickgelu-siglip-ncls:64-register": {
        "embed_dim": 512, "init_logit_bias": -10,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32, "ncls": 64, "pool_type": "first"},
        "text_cfg": _TEXT},
    "ViT-B-32-quickgelu-siglip": {
        "embed_dim": 512, "init_logit_bias": -10,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
        "text_cfg": _TEXT},
    "ViT-H-14-quickgelu-siglip-ncls:64-norm": {
        "embed_dim": 1024, "num_heads": 8, "init_logit_bias": -10, "use_norm": True,
        "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14, "ncls": 64},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}},
    "ViT-bigG-14-quickgelu-siglip-ncls:64-norm": {
        "embed_dim": 1280, "num_heads": 8, "init_logit_bias": -10, "use_norm": True,
        "vision_cfg": {"image_size": 224, "layers": 48, "width": 1664, "head_width": 104, "mlp_ratio": 4.9231,
                       "patch_size": 14, "ncls": 64},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1280, "heads": 20, "layers": 32}},
}


def _official_count(c: dict) -> int:
    """Parameters of the official model from its config, by the shapes in the official model.py:
    CLIP (VisualTransformer with ncls tokens, proj (ncls, width, D) when ncls > 1) or, with num_heads,
    CMP (visual.proj dropped; k_proj/v_proj (ncls, width, D), q_proj, xAttnPred.out_proj (D, D), and
    LayerNorm(D) on K, V, Q when use_norm)."""
    D, v, t = c["embed_dim"], c["vision_cfg"], c["text_cfg"]
    block = lambda w, hidden: 2 * w + 3 * w * w + 3 * w + w * w + w + 2 * w + w * hidden + hidden + hidden * w + w  # noqa: E731
    w, ncls, p = v["width"], v.get("ncls", 1), v["patch_size"]
    grid = v["image_size"] // p
    n = 3 * p * p * w + ncls * w + (grid * grid + ncls) * w + 2 * w
    n += v["layers"] * block(w, int(w * v.get("mlp_ratio", 4.0))) + 2 * w
    tw = t["width"]
    n += t["vocab_size"] * tw + t["context_length"] * tw + t["layers"] * block(tw, int(tw * 4.0)) + 2 * tw + tw * D
    n += 1 + (c.get("init_logit_bias") is not None)  # logit scale and bias
    if "num_heads" in c:  # CMP
        n += 2 * ncls * w * D + tw * D + D * D + (3 * 2 * D if c.get("use_norm") else 0)
    else:
        n += ncls * w * D if ncls > 1 else w * D
    return n


OURS = {  # (named size, overrides, loss type) for each official config
    "ViT-B-16-quickgelu-siglip-ncls:32": ("B/16", {}, "llip"),
    "ViT-B-32-quickgelu-siglip-ncls:64": ("B/32", {}, "llip"),
    "ViT-B-32-quickgelu-siglip-ncls:64-avg": ("B/32", {"pooling": "avg"}, "siglip"),
    "ViT-B-32-quickgelu-siglip-ncls:64-register": ("B/32", {"pooling": "register"}, "siglip"),
    "ViT-B-32-quickgelu-siglip": ("B/32", {"pooling": "cls"}, "siglip"),
    "ViT-H-14-quickgelu-siglip-ncls:64-norm": ("H/14", {}, "llip"),
    "ViT-bigG-14-quickgelu-siglip-ncls:64-norm": ("G/14", {}, "llip"),
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_parameter_counts_equal_the_official_configs(name):
    from llip_core.task import build_task

    size, over, loss = OURS[name]
    cfg = SIZES[size].replace(**over)
    assert cfg.activation == "quick_gelu" and cfg.vocab == "full" and cfg.vocab_size == 49408
    assert cfg.kqv_norm == bool(OFFICIAL[name].get("use_norm"))
    with torch.device("meta"):
        task = build_task(cfg, loss)  # model + logit scale and bias, as the official model holds them
    ours, theirs = count_parameters(task), _official_count(OFFICIAL[name])
    print(f"{name}: ours {ours:,} official {theirs:,}")
    assert ours == theirs


def test_clip_width_scaled_init_and_override():
    torch.manual_seed(0)
    cfg = SIZES["tiny"].replace(layers=8)
    m = LlipModel(cfg)
    w, L = cfg.width, cfg.layers
    blk = m.visual.resblocks[0]
    assert blk.mlp.c_proj.weight.std().item() == pytest.approx(w ** -0.5 * (2 * L) ** -0.5, rel=0.05)
    assert blk.attn.in_proj.weight.std().item() == pytest.approx(w ** -0.5, rel=0.05)
    assert blk.mlp.c_fc.weight.std().item() == pytest.approx((2 * w) ** -0.5, rel=0.05)
    assert m.k_proj.std().item() == pytest.approx(w ** -0.5, rel=0.05)
    m2 = LlipModel(cfg.replace(init_std=0.02))
    assert m2.visual.resblocks[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
