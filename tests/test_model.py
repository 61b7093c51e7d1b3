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


def _ref_block(blk, x, heads, causal):
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
    hid = F.gelu(y @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias)
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
        x = _ref_block(blk, x, cfg.heads, causal=False)
    n = lead.shape[0]
    return F.layer_norm(x[:, :n], (cfg.width,), m.ln_post.weight, m.ln_post.bias)


def _ref_text_state(m, tokens):
    cfg = m.cfg
    x = m.token_embedding.weight[tokens] + m.text_positional_embedding[: tokens.shape[1]]
    for blk in m.text.resblocks:
        x = _ref_block(blk, x, cfg.text_heads, causal=True)
    x = F.layer_norm(x, (cfg.text_width,), m.ln_final.weight, m.ln_final.bias)
    eot = [int((row == EOT).nonzero()[0]) for row in tokens]  # first EOT, by a loop
    return torch.stack([x[i, e] for i, e in enumerate(eot)])


@pytest.mark.parametrize("pooling", ["llip", "cls", "avg", "register"])
def test_towers_match_literal_reference(pooling):
    torch.manual_seed(0)
    cfg = MICRO.replace(pooling=pooling, layers=2, text_layers=2)
    m = LlipModel(cfg).double()
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
                key_k, val_k = h[b, k] @ m.k_proj[k], h[b, k] @ m.v_proj[k]  # token k's own matrix
                for hh in range(H):
                    torch.testing.assert_close(img["keys"][b, hh, k], key_k[hh * d:(hh + 1) * d])
                    torch.testing.assert_close(img["values"][b, hh, k], val_k[hh * d:(hh + 1) * d])
            q = ht[b] @ m.q_proj
            for hh in range(H):
                torch.testing.assert_close(txt["queries"][b, hh], q[hh * d:(hh + 1) * d])
        assert "image_emb" not in img
    else:
        pooled = h.mean(1) if pooling == "avg" else h[:, 0]
        torch.testing.assert_close(img["image_emb"], F.normalize(pooled @ m.proj, dim=-1))
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
def test_meta_device_parameter_counts(size):
    cfg = SIZES[size]
    with torch.device("meta"):
        clip, llip = LlipModel(cfg.replace(pooling="cls")), LlipModel(cfg)
    assert next(llip.parameters()).is_meta
    n_clip = count_parameters(clip)
    assert abs(n_clip / 1e6 - OPEN_CLIP_M[size]) < 0.01, n_clip
    K, W, D, T = cfg.mixture_tokens, cfg.width, cfg.embed_dim, cfg.text_width
    # Llip swaps the class token (W) and image proj (W x D) for K tokens (with positions),
    # per-token k/v projections, the query projection and out_proj
    extra = (K - 1) * W * 2 + 2 * K * W * D - W * D + T * D + D * D
    assert count_parameters(llip) - n_clip == extra
    if size == "B/16":
        assert 140e6 < n_clip < 160e6 and 160e6 < count_parameters(llip) < 190e6


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
