"""Training-step throughput: our CLIP, SigLIP and Llip (K = 8, 32, 64) against a literal reference.

One training step = forward of both towers, the loss, backward, AdamW step, as `orchestrator.training.worker`
runs it (llip_core.task.Task). All variants share one model size (below) and batch, float32 on the
CPU (or bf16 autocast on a GPU with --device cuda). The "literal reference" is the same model
scored as the official Llip code formulates it: every (image, text) pair's conditioned embedding
z_ij = concat_h(softmax_K(<K_i, Q_j>/tau) V_i) @ out_proj materialised (`loss.literal_scorer: true`).

How it measures: every variant is built once, warmed up for 2 steps, then the variants take turns,
one step each, for --rounds rounds; a variant's time is its fastest step (the machine is shared:
the minimum is the least disturbed), and its samples/s = batch / that time. MFU is printed against
--peak-flops when given (llip_core.flops counts the model FLOPs). The last line is one JSON object
with the headline ratios: `llip_k32_vs_clip` (samples/s of our Llip K=32 over our CLIP; target
>= 0.85) and `llip_vs_literal_reference` (ours over the literal reference at K=32; target >= 1.3),
and `flop_bounds`: the same ratios as the FLOP counts (llip_core.flops) would have them if every
variant ran at the same FLOP/s, at this size and at B/16 (one GPU; 128 GPUs at the paper's batch), so
a measured ratio can be read against what the arithmetic allows.

Run: python benchmarks/train_step.py                         (about 3 minutes on 2 idle cores)
     make bench-gpu   (= --device cuda --size B/16 --batch 256 --rounds 10 --peak-flops auto
                       --only clip llip_k32 literal_k32; add --compile for train.compile)
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from llip_core import flops
from llip_core.config import model_config
from llip_core.task import build_task

# The CPU size: small enough for 2 cores, with B/16's token counts (14 x 14 = 196 patches; K = 32
# mixture tokens add the same share of tokens as on B/16) and B/16's joint space (D = 512, H = 8), so
# the Llip scorer runs the paper's shapes (H*K <= D up to K = 64). Narrow towers keep a step short.
# (At 32 px with 64 patches, 32 mixture tokens would make the image tower 1.5x CLIP's by itself.)
CPU_SIZE = dict(image_size=56, patch_size=4, width=128, layers=4, heads=4, text_width=128, text_layers=4,
                text_heads=4, context_length=16, vocab_size=4096, vocab="compact", embed_dim=512, cross_heads=8)


def variants(ks):
    out = [("clip", "clip", {}, False), ("siglip", "siglip", {}, False)]
    out += [(f"llip_k{k}", "llip", {"mixture_tokens": k}, False) for k in ks]
    out += [(f"literal_k{k}", "llip", {"mixture_tokens": k}, True) for k in ks]
    return out


def build(size: str, loss: str, extra: dict, literal: bool, device: str, compile_: bool = False,
          grad_checkpointing: bool = False):
    base = dict(CPU_SIZE) if size == "cpu" else {}
    cfg = model_config("tiny" if size == "cpu" else size, pooling="llip" if loss.startswith("llip") else "cls",
                       **{**base, **extra})
    task = build_task(cfg, loss, literal_scorer=literal).to(device)
    # the YAML's switches (train.grad_checkpointing, train.compile), applied as a run applies them
    task.model.set_grad_checkpointing(grad_checkpointing)
    if compile_:
        from orchestrator.training.switches import compile_towers

        compile_towers(task.model, allow_fallback=True, warn=print)
    opt = torch.optim.AdamW(task.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.2)
    return cfg, task, opt


def _ratios(cfg, batch: int, world: int = 1) -> dict:
    """FLOP ratios of one step: CLIP over Llip (ours), the literal reference over ours, and CLIP over
    Llip's towers alone (a scorer that cost nothing)."""
    clip = flops.train_step_flops(cfg.replace(pooling="cls"), batch, world_size=world)
    ours = flops.train_step_flops(cfg, batch, world_size=world, ring=True)
    lit = flops.train_step_flops(cfg, batch, world_size=world, ring=True, literal=True)
    towers = 3 * batch * (flops.image_forward_flops(cfg) + flops.text_forward_flops(cfg))
    return {"llip_k32_vs_clip": round(clip / ours, 3), "llip_vs_literal_reference": round(lit / ours, 3),
            "llip_k32_vs_clip_free_scorer": round(clip / towers, 3)}


def flop_bounds(cfg, batch: int) -> dict:
    """Where the targets sit against the FLOP arithmetic: the ratios at this size, and at B/16 (K = 32)
    on one GPU (global batch 256) and at the paper's scale (32,768 over 128 GPUs, a sigmoid ring)."""
    b16 = model_config("B/16", pooling="llip", mixture_tokens=cfg.mixture_tokens)
    return {**_ratios(cfg, batch), "at_b16": {"1 GPU, batch 256": _ratios(b16, 256),
                                              "128 GPUs, batch 32768": _ratios(b16, 32768, 128)}}


def make_batch(cfg, batch: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    from llip_core.tokenizer import eot_id

    # word ids (above the compact specials pad/SOT/EOT/UNK, below CLIP BPE's SOT/EOT); EOT mid-row, padding after it (the text tower runs the whole row)
    eot = eot_id(cfg.tokenizer, cfg.vocab)
    tokens = torch.randint(4, cfg.vocab_size if eot < 4 else eot, (batch, cfg.context_length), generator=g)
    tokens[:, cfg.context_length // 2] = eot
    tokens[:, cfg.context_length // 2 + 1:] = 0
    return images.to(device), tokens.to(device)


def step(task, opt, images, tokens, device: str, bf16: bool) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
        loss = task(images, tokens)["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    task.after_step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="cpu", help="'cpu' (the small size above) or a named size, e.g. B/16")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--ks", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (default on cuda)")
    ap.add_argument("--peak-flops", default=None, help="peak FLOP/s of the device for MFU, or 'auto' (GPU table)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these variants (e.g. llip_k32 clip)")
    ap.add_argument("--compile", action="store_true", help="torch.compile both towers (train.compile)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="train.grad_checkpointing")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device cuda: torch {torch.__version__} sees no CUDA GPU here; install a CUDA build of torch "
                 "on a GPU machine, or drop --device cuda")
    names = [v[0] for v in variants(args.ks)]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        ap.error(f"--only {' '.join(unknown)}: no such variant; choose from {' '.join(names)} (K from --ks)")
    bf16 = args.bf16 or args.device == "cuda"
    peak = None
    if args.peak_flops == "auto" and args.device == "cuda":
        peak = flops.peak_flops_for(torch.cuda.get_device_name())
        if peak is None:
            print(f"--peak-flops auto: no peak known for {torch.cuda.get_device_name()!r}; MFU not shown "
                  "(give --peak-flops FLOP/s)")
    elif args.peak_flops not in (None, "auto"):
        peak = float(args.peak_flops)
    torch.manual_seed(0)

    todo = [v for v in variants(args.ks) if args.only is None or v[0] in args.only]
    built = {}
    for name, loss, extra, literal in todo:
        cfg, task, opt = build(args.size, loss, extra, literal, args.device, args.compile, args.grad_checkpointing)
        images, tokens = make_batch(cfg, args.batch, args.device)
        for _ in range(2):
            step(task, opt, images, tokens, args.device, bf16)
        built[name] = (cfg, task, opt, images, tokens, literal)
    best = {name: float("inf") for name in built}
    for _ in range(args.rounds):
        for name, (cfg, task, opt, images, tokens, _lit) in built.items():
            best[name] = min(best[name], step(task, opt, images, tokens, args.device, bf16))

    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads"
    switches = "".join(f", {n}" for n, on in (("compile", args.compile), ("grad checkpointing", args.grad_checkpointing)) if on)
    print(f"size {args.size}, batch {args.batch}, {args.device}{' bf16' if bf16 else ' fp32'}{switches}, "
          f"{where}, best of {args.rounds} steps; {time.strftime('%Y-%m-%d')}")
    print(f"{'variant':<12} {'step s':>8} {'samples/s':>10} {'GFLOP/step':>11} {'vs clip':>8}" + ("   MFU" if peak else ""))
    res = {}
    for name, (cfg, *_rest, literal) in built.items():
        sps = args.batch / best[name]
        f = flops.train_step_flops(cfg, args.batch, literal=literal)  # what the variant's scorer route counts
        res[name] = sps
        line = f"{name:<12} {best[name]:>8.3f} {sps:>10.1f} {f / 1e9:>11.1f} {sps / res.get('clip', sps):>8.2f}"
        if peak:
            line += f"  {flops.mfu(f, best[name], peak, 1):6.1%}"
        print(line)
    summary = {}
    for k in args.ks:
        if f"llip_k{k}" in res and f"literal_k{k}" in res:
            print(f"K={k}: ours / literal reference = {res[f'llip_k{k}'] / res[f'literal_k{k}']:.2f}x")
    if "llip_k32" in res and "clip" in res:
        summary["llip_k32_vs_clip"] = round(res["llip_k32"] / res["clip"], 3)
    if "llip_k32" in res and "literal_k32" in res:
        summary["llip_vs_literal_reference"] = round(res["llip_k32"] / res["literal_k32"], 3)
    summary["samples_per_s"] = {k: round(v, 1) for k, v in res.items()}
    if "llip_k32" in built:
        summary["flop_bounds"] = flop_bounds(built["llip_k32"][0], args.batch)
        b = summary["flop_bounds"]
        print(f"FLOP bounds at this size and batch (samples/s ratios if every variant ran at the same FLOP/s): "
              f"llip_k32/clip {b['llip_k32_vs_clip']:.2f} ({b['llip_k32_vs_clip_free_scorer']:.2f} with a free "
              f"scorer), ours/literal {b['llip_vs_literal_reference']:.2f}")
        for name, p in b["at_b16"].items():
            print(f"  B/16, {name}: llip_k32/clip {p['llip_k32_vs_clip']:.2f}, ours/literal {p['llip_vs_literal_reference']:.2f}")
    if peak and "llip_k32" in built:
        cfg = built["llip_k32"][0]
        summary["mfu_llip_k32"] = round(flops.mfu(flops.train_step_flops(cfg, args.batch), best["llip_k32"], peak, 1), 4)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
