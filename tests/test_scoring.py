"""The memory-efficient Llip scorer equals the literal formulation (values and gradients)."""
import pytest
import torch

from llip_core.losses import llip_pair_logits, llip_pair_logits_literal

torch.set_num_threads(1)


def literal(keys, values, queries, text_emb, W, tau):
    """Written here from the formula: all pairs' z_ij = concat_h(softmax_K(<K,Q>/tau) V) @ W."""
    Bi, H, K, d = keys.shape
    logits = (keys[:, None] * queries[None, :, :, None, :]).sum(-1) / tau  # (Bi, Bt, H, K)
    a = torch.softmax(logits, dim=-1)
    u = (a[..., None] * values[:, None]).sum(3).reshape(Bi, queries.shape[0], H * d)
    z = u @ W
    z = z / z.norm(dim=-1, keepdim=True)
    t = text_emb / text_emb.norm(dim=-1, keepdim=True)
    return (z * t[None]).sum(-1)


def _inputs(Bi=7, Bt=5, H=4, K=6, d=8, dtype=torch.float32, seed=0, key_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    D = H * d
    r = lambda *s, sc=1.0: (sc * torch.randn(*s, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    return [r(Bi, H, K, d, sc=key_scale), r(Bi, H, K, d), r(Bt, H, d), r(Bt, D), r(D, D, sc=D ** -0.5)]


def _value_and_grads(fn, inputs, weight):
    out = fn(*inputs)
    grads = torch.autograd.grad((out * weight).sum(), inputs)
    return out, grads


@pytest.mark.parametrize("case", ["default", "tau_large", "tau_small", "K1", "H1", "chunk1", "chunk_big", "paper_shape",
                                  "HK_gt_D", "HK_gt_D_tau_large"])
@pytest.mark.parametrize("route", ["gram", "direct"])
def test_efficient_equals_literal_float32(case, route):
    kw, tau, chunk = {}, 5.0, 3
    if case == "tau_large":
        tau = 1e8  # attention becomes uniform over K
    elif case == "tau_small":
        tau = 0.5
    elif case == "K1":
        kw = {"K": 1}
    elif case == "H1":
        kw = {"H": 1, "d": 16}
    elif case == "chunk1":
        chunk = 1
    elif case == "chunk_big":
        chunk = 1000
    elif case.startswith("HK_gt_D"):  # large-K ablation shapes: the direct (checkpointed) path
        kw, tau = {"H": 4, "K": 16, "d": 4}, (1e8 if case.endswith("large") else 5.0)
    elif case == "paper_shape":
        kw, chunk = {"Bi": 12, "Bt": 10, "H": 8, "K": 32, "d": 64}, 5  # D = 512, K = 32, H = 8
    inputs = _inputs(**kw)
    weight = torch.randn(inputs[0].shape[0], inputs[2].shape[0], generator=torch.Generator().manual_seed(1))
    ours, g_ours = _value_and_grads(lambda *x: llip_pair_logits(*x, tau, chunk_size=chunk, route=route), inputs, weight)
    lit, g_lit = _value_and_grads(lambda *x: literal(*x, tau), inputs, weight)
    assert ours.shape == (inputs[0].shape[0], inputs[2].shape[0])
    torch.testing.assert_close(ours, lit, atol=1e-5, rtol=0)
    for name, a, b in zip(["keys", "values", "queries", "text_emb", "out_proj"], g_ours, g_lit):
        scale = max(1.0, b.abs().max().item())  # 1e-5 relative to the gradient's magnitude when it exceeds 1
        torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=0, msg=name)
    # and the library's literal path is the same formulation
    torch.testing.assert_close(llip_pair_logits(*inputs, tau, literal=True), lit, atol=1e-6, rtol=0)
    if case == "tau_large":
        K = inputs[0].shape[2]
        uniform = literal(inputs[0] * 0, *inputs[1:], 1.0)  # zero keys: exactly uniform attention
        torch.testing.assert_close(ours, uniform, atol=1e-5, rtol=0)
        assert torch.allclose(g_ours[0], torch.zeros_like(g_ours[0]), atol=1e-7)  # no signal through keys
        assert K > 1


@pytest.mark.parametrize("route", ["gram", "direct"])
def test_efficient_equals_literal_float64_tight(route):
    inputs = _inputs(dtype=torch.float64, seed=3)
    weight = torch.randn(7, 5, dtype=torch.float64)
    ours, g_ours = _value_and_grads(lambda *x: llip_pair_logits(*x, 2.0, chunk_size=2, route=route), inputs, weight)
    lit, g_lit = _value_and_grads(lambda *x: literal(*x, 2.0), inputs, weight)
    torch.testing.assert_close(ours, lit, atol=1e-12, rtol=1e-10)
    for a, b in zip(g_ours, g_lit):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("route", ["gram", "direct"])
def test_gradcheck_float64(route):
    inputs = _inputs(Bi=3, Bt=2, H=2, K=3, d=2, dtype=torch.float64, seed=5)
    assert torch.autograd.gradcheck(lambda *x: llip_pair_logits(*x, 1.5, chunk_size=2, route=route), inputs)


@pytest.mark.parametrize("H,K,d,route", [(2, 2, 32, "gram"), (2, 32, 4, "direct")])  # HK < D and HK > D
def test_no_pair_by_d_tensor_is_built_or_saved(H, K, d, route):
    """Neither the forward nor the tensors kept for backward reach (B_img, B_txt, max(D, HK)) elements:
    only chunk-sized per-pair tensors exist (chunk 2 of 32 images: 1/16 of that)."""
    Bi, Bt = 32, 32
    inputs = _inputs(Bi=Bi, Bt=Bt, H=H, K=K, d=d)
    pair_d = Bi * Bt * max(H * d, H * K)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(o, torch.Tensor):
                    Largest.biggest = max(Largest.biggest, o.numel())
            return out

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), Largest():
        out = llip_pair_logits(*inputs, 5.0, chunk_size=2, route=route)
        out.sum().backward()
    limit = max(pair_d // 16, inputs[0].numel())  # gradients of keys/values are input-sized
    assert max(saved) <= limit and Largest.biggest <= limit
    # the literal formulation does build it
    Largest.biggest = 0
    with Largest():
        llip_pair_logits(*inputs, 5.0, literal=True)
    assert Largest.biggest >= pair_d


@pytest.mark.parametrize("route", ["gram", "direct"])
def test_autocast_bf16_runs_in_float32(route):
    inputs = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = llip_pair_logits(*inputs, 5.0, route=route)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, literal(*inputs, 5.0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("route", ["gram", "direct"])
def test_zero_value_norm_matches_normalize_eps(route):
    """An image whose values are all zero: F.normalize's eps path, score 0 and finite gradients."""
    inputs = _inputs()
    with torch.no_grad():
        inputs[1][0].zero_()
    ours = llip_pair_logits(*inputs, 5.0, route=route)
    lit = llip_pair_logits_literal(*inputs, 5.0)
    torch.testing.assert_close(ours, lit, atol=1e-5, rtol=0)
    assert ours[0].abs().max() == 0
    ours.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in inputs)


def test_text_emb_need_not_be_normalised():
    inputs = _inputs()
    scaled = inputs[:3] + [inputs[3] * 3.0, inputs[4]]
    torch.testing.assert_close(llip_pair_logits(*scaled, 5.0), llip_pair_logits(*inputs, 5.0))


def _cancelling(seed, noise=1e-6):
    """Image 0's values cancel under its (uniform) attention up to `noise` of their size, so z_0j is
    rounding-level: opposite values on pairs of mixture tokens with identical keys."""
    g = torch.Generator().manual_seed(seed)
    Bi, Bt, H, K, d = 4, 6, 8, 8, 16
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    keys, values, q, t, W = r(Bi, H, K, d), 3 * r(Bi, H, K, d), r(Bt, H, d), r(Bt, H * d), r(H * d, H * d) / (H * d) ** 0.5
    keys[0] = keys[0, :, :1].expand(H, K, d)
    values[0, :, 1::2] = -values[0, :, 0::2]
    values[0] += noise * r(H, K, d)
    return keys, values, q, t, W


def test_rounding_level_embedding_scores_zero_not_huge(monkeypatch):
    import llip_core.losses as L

    for seed in range(5):
        inputs = [x.requires_grad_() for x in _cancelling(seed)]
        ours = llip_pair_logits(*inputs, 5.0, route="gram")
        assert ours[0].abs().max() < 1e-3, seed  # ||z_0j||^2 under REL_NORM_EPS tr(G_0): treated as 0
        torch.testing.assert_close(ours[1:], literal(*[x.detach() for x in inputs], 5.0)[1:], atol=1e-5, rtol=0)
        ours.sum().backward()
        assert all(torch.isfinite(x.grad).all() for x in inputs)
    # without the relative floor the Gram route divides rounding noise by its own square root
    monkeypatch.setattr(L, "REL_NORM_EPS", 0.0)
    worst = max(float(llip_pair_logits(*_cancelling(seed), 5.0, route="gram")[0].abs().max()) for seed in range(5))
    assert worst > 0.5


def test_scores_stay_in_unit_interval_and_tiny_images_score_zero():
    inputs = [x.detach() for x in _inputs(Bi=9, Bt=7, H=4, K=4, d=8, key_scale=30.0)]
    for chunk in (None, 2):
        s = llip_pair_logits(*inputs, 0.5, chunk_size=chunk, route="gram")
        assert s.abs().max() <= 1.0
    big_k = [x.detach() for x in _inputs(H=4, K=16, d=4)]  # HK > D: the direct path is clamped too
    assert llip_pair_logits(*big_k, 5.0).abs().max() <= 1.0
    assert llip_pair_logits(*inputs, 5.0, literal=True).abs().max() <= 1.0
    # a near-zero image embedding (values 1e-20 of normal, below fp32's normal range once squared): 0
    tiny = list(inputs)
    tiny[1] = inputs[1].clone()
    tiny[1][0] *= 1e-20
    assert llip_pair_logits(*tiny, 5.0, route="gram")[0].abs().max() < 1e-6
    # the floor is relative: a merely small image keeps its scores (cosines do not depend on scale)
    small = list(inputs)
    small[1] = inputs[1] * 1e-3
    torch.testing.assert_close(llip_pair_logits(*small, 5.0, route="gram"), llip_pair_logits(*inputs, 5.0, route="gram"),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("dims", [(128, 8, 8), (512, 32, 8)])
def test_zero_shot_scoring_peak_stays_under_a_training_batch(dims):
    """10 class prompts x 4,096 images (forward, no grad) against one training batch of 256 (forward +
    backward), at tiny shapes and at B/16's (D=512, K=32, H=8), peak RSS measured in fresh subprocesses
    by the benchmark. Sized by per-pair tensors alone, the zero-shot chunk was all 4,096 images: 4,096
    Gram matrices at once, about 3x the training batch's peak; on the direct route (which 10 prompts
    take), the einsums' copies of the chunk's keys and values made it 1.4x at B/16's shapes."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from llip_core.losses import PAIR_BUDGET, auto_chunk_size

    hk = 8 * 8
    c = auto_chunk_size(10, hk, torch.device("cpu"), 2 * hk * hk)
    assert c * (10 * hk + 2 * hk * hk) <= PAIR_BUDGET["cpu"] < (c + 1) * (10 * hk + 2 * hk * hk)
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "llip_scoring.py"

    def peak(variant, n):
        out = subprocess.run([sys.executable, str(bench), "--worker", variant, "--B", str(n), "--dims", *map(str, dims)],
                             capture_output=True, text=True, check=True, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]

    zero_shot, train = peak("zeroshot", 4096), peak("ours", 256)
    print(f"peak RSS: zero-shot 10 x 4096 {zero_shot:.1f} MB, training batch 256 {train:.1f} MB")
    assert zero_shot < train
