"""The YAML's speed switches keep the math: each is run for a few AdamW steps on CPU beside the default
path, from the same init and batches, and compared within a stated tolerance.

  train.attention: math       vs fused SDPA        losses and weights within 1e-5 (float32 rounding);
                                                   both against softmax(QK^T/sqrt(d))V written here
  train.grad_checkpointing    vs none              within 1e-6 (the recompute is the same arithmetic)
  train.precision: bf16       vs fp32              losses within 2% relative (bf16 keeps 8 mantissa
                                                   bits, ~0.4% per rounding, over 3 steps); loss in fp32
  train.compile               vs eager             losses within 1e-4 (inductor reorders float32 sums)

Weights after the steps are compared more loosely than losses (see `train`).
"""
import math

import pytest
import torch

from llip_core.config import model_config
from llip_core.model import SelfAttention
from llip_core.optim import build_optimizer
from llip_core.task import build_task
from llip_core.tokenizer import eot_id
from orchestrator.config.schema import parse_config
from orchestrator.errors import UserError
from orchestrator.training.switches import apply_switches, compile_towers, use_bf16

STEPS = 3


def batches(cfg, n=STEPS, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    eot = eot_id(cfg.tokenizer, cfg.vocab)
    out = []
    for _ in range(n):
        images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
        tokens = torch.randint(4, cfg.vocab_size, (batch, cfg.context_length), generator=g)
        ends = torch.randint(2, cfg.context_length, (batch,), generator=g)
        for i, e in enumerate(ends.tolist()):  # captions of different lengths: the causal mask matters
            tokens[i, e] = eot
            tokens[i, e + 1:] = 0
        out.append((images, tokens))
    return out


def train(cfg, loss_type, setup=None, bf16=False, steps=STEPS):
    """Losses of `steps` AdamW steps and the final weights, from seed 0.

    Weights are compared loosely on purpose: AdamW divides each gradient by its own running RMS, so a
    rounding-level gradient difference on a parameter whose gradient is ~0 moves it by up to lr per
    step. Losses (which see every weight) are compared tightly."""
    torch.manual_seed(0)
    task = build_task(cfg, loss_type)
    if setup is not None:
        setup(task)
    opt = build_optimizer(task, 1e-3, (0.9, 0.95), 1e-6, 0.2)
    losses = []
    for images, tokens in batches(cfg, steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            terms = task(images, tokens)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        task.after_step()
        losses.append(terms["loss"])
    return losses, {k: v.detach().clone() for k, v in task.state_dict().items()}


def max_weight_diff(a, b):
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def initial_weights(cfg, loss_type):
    """The weights `train` starts from (same seed, same construction)."""
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in build_task(cfg, loss_type).state_dict().items()}


def update_diff(w, base_w, init):
    """||w - base_w|| / ||base_w - init|| over all weights: how far the switch's training moved from the
    default's, relative to how far the default moved. An elementwise maximum is the wrong measure
    here: AdamW turns a rounding-level gradient difference on a parameter whose gradient is ~0 into a
    difference of up to lr per step, and where that happens depends on the CPU's kernels (measured on
    AVX512, AVX2 and SSE4.1 kernels: see the bounds below), while this ratio moves by far less."""
    num = sum(float((w[k].float() - base_w[k].float()).pow(2).sum()) for k in w) ** 0.5
    den = sum(float((base_w[k].float() - init[k].float()).pow(2).sum()) for k in w) ** 0.5
    return num / den


CASES = [("micro", "llip", {}), ("micro", "clip", {"pooling": "cls"}), ("micro", "siglip", {"pooling": "cls"}),
         ("micro", "holistic", {"pooling": "multi_cls", "branches": 2})]


def cfg_for(size, extra):
    return model_config(size, **extra)


# ---------------------------------------------------------------------------------------- attention
def reference_attention(q, k, v, allowed):
    """softmax_j(q_i . k_j / sqrt(d)) v_j over allowed j, one (batch, head, query) at a time."""
    B, H, n, d = q.shape
    out = torch.zeros_like(q, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(n):
                js = [j for j in range(n) if allowed[i, j]]
                s = torch.tensor([float(q[b, h, i].double() @ k[b, h, j].double()) / math.sqrt(d) for j in js],
                                 dtype=torch.float64)
                w = torch.softmax(s, 0)
                out[b, h, i] = sum(w[t] * v[b, h, j].double() for t, j in enumerate(js))
    return out


@pytest.mark.parametrize("kind", ["full", "causal", "branches"])
@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_self_attention_matches_the_softmax_equation(kind, impl):
    torch.manual_seed(0)
    n, w, heads = 7, 16, 2
    attn = SelfAttention(w, heads, causal=kind == "causal")
    attn.impl = impl
    x = torch.randn(2, n, w)
    mask = None
    allowed = torch.ones(n, n, dtype=torch.bool)
    if kind == "causal":
        allowed = allowed.tril()
    if kind == "branches":  # Holistic CLIP: the first 3 tokens see themselves and the patches only
        allowed[:3, :3] = torch.eye(3, dtype=torch.bool)
        mask = allowed
    with torch.no_grad():
        q, k, v = attn.in_proj(x).view(2, n, 3, heads, w // heads).permute(2, 0, 3, 1, 4)
    ref = reference_attention(q, k, v, allowed)
    want = attn.out_proj(ref.float().transpose(1, 2).reshape(2, n, w))
    torch.testing.assert_close(attn(x, mask), want.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size,loss,extra", CASES)
def test_math_attention_trains_like_sdpa(size, loss, extra):
    cfg = cfg_for(size, extra)
    base_losses, base_w = train(cfg, loss)
    losses, w = train(cfg, loss, setup=lambda t: t.model.set_attention("math"))
    torch.testing.assert_close(torch.stack(losses), torch.stack(base_losses), atol=1e-5, rtol=1e-5)
    # measured 2e-4..1.1e-3 with AVX512, AVX2 and SSE4.1 kernels (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA)
    assert update_diff(w, base_w, initial_weights(cfg, loss)) < 1e-2
    # the switch reaches every attention layer of both towers
    model = build_task(cfg, loss).model
    model.set_attention("math")
    assert [m.impl for m in model.visual.modules() if isinstance(m, SelfAttention)] == ["math"] * cfg.layers
    assert [m.impl for m in model.text.modules() if isinstance(m, SelfAttention)] == ["math"] * cfg.text_layers


def test_unknown_attention_is_rejected():
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        build_task(model_config("micro"), "llip").model.set_attention("flash")
    with pytest.raises(Exception, match="train.attention"):
        parse_config({"name": "x", "train": {"attention": "flash"}})


# ---------------------------------------------------------------------------- gradient checkpointing
def saved_bytes(task, images, tokens) -> int:
    """Bytes autograd keeps for the backward of one forward pass."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        task(images, tokens)["loss"]
    return total


@pytest.mark.parametrize("size,loss,extra", CASES[:2] + [("tiny", "llip", {})])
def test_grad_checkpointing_trains_like_the_default(size, loss, extra):
    cfg = cfg_for(size, extra)
    base_losses, base_w = train(cfg, loss)
    losses, w = train(cfg, loss, setup=lambda t: t.model.set_grad_checkpointing(True))
    torch.testing.assert_close(torch.stack(losses), torch.stack(base_losses), atol=1e-6, rtol=1e-6)
    assert max_weight_diff(w, base_w) < 1e-6


def test_grad_checkpointing_keeps_less_for_the_backward():
    cfg = model_config("tiny")
    (images, tokens), = batches(cfg, 1)
    torch.manual_seed(0)
    task = build_task(cfg, "llip")
    plain = saved_bytes(task, images, tokens)
    task.model.set_grad_checkpointing(True)
    assert task.model.visual.grad_checkpointing and task.model.text.grad_checkpointing
    ckpt = saved_bytes(task, images, tokens)
    assert ckpt < 0.5 * plain, (ckpt, plain)  # only block inputs are kept (4 blocks per tower)


# ------------------------------------------------------------------------------------------- bf16
@pytest.mark.parametrize("size,loss,extra", CASES[:2])
def test_bf16_autocast_trains_like_fp32_with_the_loss_in_fp32(size, loss, extra):
    cfg = cfg_for(size, extra)
    base_losses, base_w = train(cfg, loss)
    losses, w = train(cfg, loss, bf16=True)
    assert all(x.dtype == torch.float32 for x in losses)
    torch.testing.assert_close(torch.stack(losses), torch.stack(base_losses), atol=0, rtol=2e-2)
    # measured 0.07..0.094 with AVX512, AVX2 and SSE4.1 kernels; a wrong bf16 path moves as far as training
    assert update_diff(w, base_w, initial_weights(cfg, loss)) < 0.25
    # the towers do run in bf16 (else this test would pass trivially)
    torch.manual_seed(0)
    task = build_task(cfg, loss)
    images, tokens = batches(cfg, 1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = task.model.encode_text(tokens)
    assert feats["text_emb"].dtype == torch.bfloat16


def test_bf16_loss_sees_float32_features():
    """The loss and logit scale run in fp32 under autocast: equal to the loss computed by hand in fp32
    from the same (bf16) tower outputs."""
    cfg = model_config("micro", pooling="cls")
    torch.manual_seed(0)
    task = build_task(cfg, "clip")
    images, tokens = batches(cfg, 1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = task(images, tokens)["loss"]
        img = task.model.encode_image(images)["image_emb"]
        txt = task.model.encode_text(tokens)["text_emb"]
    logits = task.logit_scale.exp() * img.float() @ txt.float().T
    labels = torch.arange(len(logits))
    want = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_bf16_where_unsupported_fails_in_one_line_or_falls_back_when_allowed():
    cpu = torch.device("cpu")
    with pytest.raises(UserError) as e:
        use_bf16("bf16", cpu, allow_fallback=False, warn=print, supported=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("train.precision: bf16") and "train.allow_fallback" in msg
    warned = []
    assert use_bf16("bf16", cpu, allow_fallback=True, warn=warned.append, supported=False) is False
    assert len(warned) == 1 and "train.precision" in warned[0] and "fp32" in warned[0]
    assert use_bf16("fp32", cpu, allow_fallback=False, warn=print, supported=False) is False
    assert use_bf16("bf16", cpu, allow_fallback=False, warn=print, supported=True) is True


@pytest.mark.parametrize("supported", [True, False])
def test_apply_switches_from_the_yaml(supported):
    """Both answers of the device's bf16 check, injected: the result must not depend on this CPU."""
    cfg = parse_config({"name": "x", "train": {"attention": "math", "grad_checkpointing": True, "precision": "bf16"}})
    task = build_task(model_config("micro"), "llip")
    if supported:
        assert apply_switches(task, cfg.train, torch.device("cpu"), bf16_support=True) is True
    else:
        with pytest.raises(UserError, match="^train.precision: bf16: this cpu device has no bf16 kernels"):
            apply_switches(task, cfg.train, torch.device("cpu"), bf16_support=False)
        fallback = cfg.with_overrides({"train.allow_fallback": True}).train
        warned = []
        assert apply_switches(task, fallback, torch.device("cpu"), warned.append, bf16_support=False) is False
        assert len(warned) == 1 and "training in fp32" in warned[0]
    assert task.model.visual.grad_checkpointing and task.model.text.grad_checkpointing
    assert {m.impl for m in task.model.modules() if isinstance(m, SelfAttention)} == {"math"}


def test_apply_switches_on_this_cpu_trains_bf16_or_says_why_in_one_line():
    """The real device check, whichever answer this CPU gives: bf16 where it has kernels, else the
    one-line error (or the fallback when allowed)."""
    from orchestrator.training.switches import bf16_supported

    cpu = torch.device("cpu")
    cfg = parse_config({"name": "x", "train": {"precision": "bf16"}})
    task = build_task(model_config("micro"), "llip")
    if bf16_supported(cpu):
        assert apply_switches(task, cfg.train, cpu) is True
        return
    with pytest.raises(UserError) as e:
        apply_switches(task, cfg.train, cpu)
    assert "\n" not in str(e.value) and "train.allow_fallback" in str(e.value)
    warned = []
    assert apply_switches(task, cfg.with_overrides({"train.allow_fallback": True}).train, cpu, warned.append) is False
    assert len(warned) == 1


# ----------------------------------------------------------------------------------------- compile
def failing_backend(gm, example_inputs):
    raise RuntimeError("C++ compile error: cc1plus: fatal error (test backend)")


def test_compile_failure_is_one_line_naming_the_switch():
    cfg = model_config("micro")
    torch.manual_seed(0)
    task = build_task(cfg, "llip")
    compile_towers(task.model, allow_fallback=False, warn=print, backend=failing_backend)
    images, tokens = batches(cfg, 1)[0]
    with pytest.raises(UserError) as e:
        task(images, tokens)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("train.compile:") and "train.allow_fallback: true" in msg
    assert "cc1plus" in msg  # the compiler's own first line, so the user can see why


def test_compile_failure_falls_back_when_allowed_and_trains_like_eager():
    cfg = model_config("micro")
    base_losses, base_w = train(cfg, "llip")
    warned = []
    losses, w = train(cfg, "llip", setup=lambda t: compile_towers(t.model, True, warned.append, backend=failing_backend))
    assert len(warned) == 1 and warned[0].startswith("[llip] warning: train.compile:")
    torch.testing.assert_close(torch.stack(losses), torch.stack(base_losses), atol=0, rtol=0)
    assert max_weight_diff(w, base_w) == 0


def test_compile_does_not_hide_a_real_model_error():
    cfg = model_config("micro")
    task = build_task(cfg, "llip")
    compile_towers(task.model, allow_fallback=False, warn=print, backend=failing_backend)
    _, tokens = batches(cfg, 1)[0]
    wrong = torch.randn(8, 3, 2 * cfg.image_size, 2 * cfg.image_size)  # more patches than positional embeddings
    with pytest.raises(RuntimeError) as e:
        task(wrong, tokens)
    assert not isinstance(e.value, UserError)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_inductor_compile_trains_like_eager(tmp_path, monkeypatch):
    # A cache of its own: inductor's shared cache (/tmp/torchinductor_$USER) may hold kernels built
    # under another CPU capability (seen: AVX512 kernels reused under ATEN_CPU_CAPABILITY=avx2 gave NaN)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    cfg = model_config("micro")
    base_losses, base_w = train(cfg, "llip")
    warned = []
    switch = {}

    def setup(t):
        switch["s"] = compile_towers(t.model, allow_fallback=True, warn=warned.append)

    losses, w = train(cfg, "llip", setup=setup)
    assert switch["s"].failed is None and not warned, warned  # inductor built here (gcc is installed)
    torch.testing.assert_close(torch.stack(losses), torch.stack(base_losses), atol=1e-4, rtol=1e-4)
    assert update_diff(w, base_w, initial_weights(cfg, "llip")) < 1e-2  # as the math attention above
    assert any((tmp_path / "inductor").iterdir())  # it did build, into its own cache
