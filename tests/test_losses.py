"""Losses, task and optimiser against literal implementations written here from the formulas."""
import math

import pytest
import torch

from llip_core.config import SIZES
from llip_core.losses import build_loss
from llip_core.optim import build_optimizer, cosine_lr, param_groups
from llip_core.task import build_task

torch.set_num_threads(1)
DT = torch.float64


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def ref_llip_scores(keys, values, queries, text_emb, W, tau):
    """score_ij = <z_ij, t_j / |t_j|> / |z_ij|, z_ij = concat_h(sum_k a[h,k] V_i[h,k]) @ W, pair by pair."""
    Bi, H, K, d = keys.shape
    Bt = queries.shape[0]
    rows = []
    for i in range(Bi):
        row = []
        for j in range(Bt):
            heads = []
            for h in range(H):
                logit = torch.stack([keys[i, h, k] @ queries[j, h] for k in range(K)]) / tau
                a = torch.exp(logit - logit.max())
                a = a / a.sum()
                heads.append(sum(a[k] * values[i, h, k] for k in range(K)))
            z = torch.cat(heads) @ W
            row.append(z @ text_emb[j] / (z.norm() * text_emb[j].norm()))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def ref_infonce(S, s):
    B = S.shape[0]
    li = -sum(torch.log(torch.exp(s * S[i, i]) / torch.exp(s * S[i]).sum()) for i in range(B)) / B
    lt = -sum(torch.log(torch.exp(s * S[i, i]) / torch.exp(s * S[:, i]).sum()) for i in range(B)) / B
    return (li + lt) / 2


def ref_sigmoid(S, s, b):
    B = S.shape[0]
    total = 0
    for i in range(B):
        for j in range(S.shape[1]):
            y = 1.0 if i == j else -1.0
            total = total - torch.log(1 / (1 + torch.exp(-y * (s * S[i, j] + b))))
    return total / B


def _features(kind, B=5, H=2, K=3, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=DT).requires_grad_()
    D = H * d
    if kind == "dot":
        img = {"image_emb": _unit(torch.randn(B, D, generator=g, dtype=DT)).requires_grad_()}
        txt = {"text_emb": _unit(torch.randn(B, D, generator=g, dtype=DT)).requires_grad_()}
        return img, txt, {}
    img = {"keys": r(B, H, K, d), "values": r(B, H, K, d)}
    txt = {"queries": r(B, H, d), "text_emb": _unit(torch.randn(B, D, generator=g, dtype=DT)).requires_grad_()}
    return img, txt, {"out_proj": r(D, D)}


def _leaves(img, txt, extra, scale, bias):
    return [*img.values(), *txt.values(), *extra.values(), scale] + ([bias] if bias is not None else [])


@pytest.mark.parametrize("loss_type", ["clip", "siglip", "llip", "llip_infonce"])
@pytest.mark.parametrize("literal", [False, True])
def test_loss_matches_formula(loss_type, literal):
    if loss_type in ("clip", "siglip") and literal:
        pytest.skip("no scorer choice for single-embedding losses")
    tau = 1.7
    img, txt, extra = _features("dot" if loss_type in ("clip", "siglip") else "llip")
    scale = torch.tensor(math.log(1 / 0.07), dtype=DT, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=DT, requires_grad=True) if loss_type in ("siglip", "llip") else None
    loss = build_loss(loss_type, tau=tau, literal_scorer=literal, chunk_size=2)
    out = loss(img, txt, logit_scale=scale.exp(), logit_bias=bias, **extra)
    leaves = _leaves(img, txt, extra, scale, bias)
    got = torch.autograd.grad(out["loss"], leaves)

    if loss_type in ("clip", "siglip"):
        S = torch.stack([torch.stack([img["image_emb"][i] @ txt["text_emb"][j] for j in range(5)]) for i in range(5)])
    else:
        S = ref_llip_scores(img["keys"], img["values"], txt["queries"], txt["text_emb"], extra["out_proj"], tau)
    ref = ref_infonce(S, scale.exp()) if bias is None else ref_sigmoid(S, scale.exp(), bias)
    want = torch.autograd.grad(ref, leaves)
    torch.testing.assert_close(out["loss"], ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    if bias is None:
        torch.testing.assert_close(out["loss"], (out["loss_i2t"] + out["loss_t2i"]) / 2)


def test_task_inits_and_clamp():
    cfg = SIZES["micro"]
    t = build_task(cfg.replace(pooling="cls"), "siglip")  # open_clip / Llip's SigLIP baseline
    assert t.logit_scale_value() == pytest.approx(1 / 0.07) and float(t.logit_bias.detach()) == -10.0
    t = build_task(cfg.replace(pooling="cls"), "siglip", siglip_init="siglip_paper")
    assert t.logit_scale_value() == pytest.approx(10.0) and float(t.logit_bias.detach()) == -10.0
    with pytest.raises(ValueError, match="unknown siglip_init 'paper'"):
        build_task(cfg.replace(pooling="cls"), "siglip", siglip_init="paper")
    t = build_task(cfg, "llip")
    assert t.logit_scale_value() == pytest.approx(1 / 0.07) and float(t.logit_bias.detach()) == -10.0
    t = build_task(cfg.replace(pooling="cls"), "clip")
    assert t.logit_scale_value() == pytest.approx(1 / 0.07) and t.logit_bias is None
    with torch.no_grad():
        t.logit_scale.fill_(7.0)
    t.after_step()
    assert t.logit_scale_value() == pytest.approx(100.0)
    with torch.no_grad():
        t.logit_scale.fill_(-1.0)
    t.after_step()
    assert t.logit_scale_value() == pytest.approx(1.0)


@pytest.mark.parametrize("loss_type,pooling", [("llip", "cls"), ("llip_infonce", "avg"), ("clip", "llip"),
                                                ("siglip", "llip")])
def test_task_rejects_mismatched_pooling(loss_type, pooling):
    with pytest.raises(ValueError, match="pooling"):
        build_task(SIZES["micro"].replace(pooling=pooling), loss_type)


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown loss type"):
        build_task(SIZES["micro"], "triplet")


def test_param_groups_decay_rule():
    """open_clip's main.py rule: exempt iff ndim < 2 or the name holds bn/ln/bias/logit_scale."""
    t = build_task(SIZES["micro"].replace(kqv_norm=True), "llip")
    decay, no_decay = param_groups(t, 0.2)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    named = dict(t.named_parameters())
    for name in ["logit_scale", "logit_bias", "model.ln_post.weight", "model.k_norm.weight", "model.q_norm.bias",
                 "model.visual.resblocks.0.attn.in_proj.bias", "model.visual.resblocks.0.ln_1.weight"]:
        assert id(named[name]) in ids(no_decay["params"]), name
    # 2-D tokens and positional embeddings ARE decayed (the seed's design notes once said otherwise)
    for name in ["model.mixture_tokens", "model.positional_embedding", "model.text_positional_embedding",
                 "model.k_proj", "model.v_proj", "model.q_proj", "model.out_proj", "model.text_projection",
                 "model.conv1.weight", "model.visual.resblocks.0.mlp.c_fc.weight", "model.token_embedding.weight"]:
        assert id(named[name]) in ids(decay["params"]), name
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)
    # the rule, independently: by dimension and by name part, over every parameter of the task
    want = {n for n, p in named.items() if p.ndim < 2 or any(k in n for k in ("bn", "ln", "bias", "logit_scale"))}
    assert ids(no_decay["params"]) == {id(named[n]) for n in want}
    cls = build_task(SIZES["micro"].replace(pooling="cls"), "clip")
    assert id(cls.model.class_embedding) in ids(param_groups(cls, 0.2)[0]["params"])

    class Odd(torch.nn.Module):  # >= 2-D tensors exempted by name alone, and a 1-D one by its shape
        def __init__(self):
            super().__init__()
            self.bn_table, self.some_bias_matrix = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2, 2))
            self.ln_gain, self.logit_scale_per_head = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(4, 1))
            self.weight, self.vector = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(3))
            self.frozen = torch.nn.Parameter(torch.ones(2, 2), requires_grad=False)

    odd = Odd()
    d, nd = param_groups(odd, 0.1)
    assert ids(d["params"]) == {id(odd.weight)}
    assert ids(nd["params"]) == {id(odd.bn_table), id(odd.some_bias_matrix), id(odd.ln_gain),
                                 id(odd.logit_scale_per_head), id(odd.vector)}
    opt = build_optimizer(t, 5e-4, (0.9, 0.95), 1e-6, 0.2)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)


def test_cosine_lr():
    assert cosine_lr(0, 1.0, 10, 110) == pytest.approx(0.1)
    assert cosine_lr(9, 1.0, 10, 110) == pytest.approx(1.0)
    assert cosine_lr(10, 1.0, 10, 110) == pytest.approx(1.0)
    assert cosine_lr(60, 1.0, 10, 110) == pytest.approx(0.5)
    assert cosine_lr(110, 1.0, 10, 110) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(500, 1.0, 10, 110) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(5, 2.0, 0, 10) == pytest.approx(1.0)


@pytest.mark.parametrize("loss_type,pooling", [("clip", "cls"), ("siglip", "cls"), ("llip", "llip"),
                                                ("llip_infonce", "llip"), ("clip", "avg"), ("siglip", "register")])
def test_few_steps_reduce_loss(loss_type, pooling):
    torch.manual_seed(0)
    cfg = SIZES["micro"]
    task = build_task(cfg.replace(pooling=pooling), loss_type)
    images = torch.randn(8, 3, cfg.image_size, cfg.image_size)
    tokens = torch.zeros(8, cfg.context_length, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:4], tokens[:, 4] = 1, torch.randint(3, cfg.vocab_size, (8, 3)), 2
    opt = build_optimizer(task, 1e-3, (0.9, 0.95), 1e-6, 0.2)
    losses = []
    for _ in range(6):
        out = task(images, tokens)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        task.after_step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < losses[0], losses
