"""`llip import-official FILE.pt --out DIR`: the released Llip weights (facebookresearch/Llip's
`llip_b16_k32.pt`, `llip_G14_k64.pt`, or any checkpoint of its CMP model) as an llip export folder,
which `llip eval DIR`, `llip_core.pretrained.load(DIR)` and `train.init_from: DIR` take.

The mapping is llip_core.convert.official_to_llip: sizes and K from the shapes, every tensor checked;
a file whose shapes do not fit fails in one line naming the file, the tensor and both shapes.
"""
from __future__ import annotations

import time
from pathlib import Path

from orchestrator.errors import UserError


def add_args(p) -> None:
    p.add_argument("file", metavar="FILE.pt", help="the official checkpoint or state dict (local path)")
    p.add_argument("--out", required=True, metavar="DIR", help="the export folder, local or s3://bucket/prefix")
    p.add_argument("--heads", type=int, default=None,
                   help="ViT attention heads (not in any shape; default: the released configs' rule, width/64, "
                        "16 for the 1280- and 1664-wide H/14 and G/14)")
    p.add_argument("--text-heads", type=int, default=None, help="text attention heads (default: text width / 64)")
    p.add_argument("--cross-heads", type=int, default=8,
                   help="Llip cross-attention heads (default 8: B/16 K=32 and G/14 K=64 as released)")
    p.add_argument("--tau", type=float, default=5.0,
                   help="the softmax temperature it was trained with (weight_scale; 5 for the released B/16 and G/14)")
    p.add_argument("--activation", choices=("quick_gelu", "gelu"), default="quick_gelu",
                   help="MLP activation (every released config: quick_gelu)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights' precision (default fp32)")
    p.add_argument("--name", default=None, help="the model's name in its card (default: the file's name)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="load a file that holds more than tensors with full pickle (runs code from the file: only "
                        "for files you trust)")


def read_official(path: str, trust_pickle: bool = False) -> dict:
    import pickle

    import torch

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such file; download the released weights first (see the README)")
    try:
        try:  # mmap: a G/14 file (about 10 GB) is not read twice into memory
            return torch.load(p, map_location="cpu", weights_only=not trust_pickle, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(p, map_location="cpu", weights_only=not trust_pickle)  # the legacy format
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: holds more than tensors and plain values ({str(e).splitlines()[0][:100]}); "
                        "if you trust the file, pass --trust-pickle") from None
    except Exception as e:
        raise UserError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {str(e)[:100]})") from None


def import_official(path: str, out: str, *, heads=None, text_heads=None, cross_heads: int = 8, tau: float = 5.0,
                    activation: str = "quick_gelu", dtype: str = "fp32", name=None, trust_pickle: bool = False) -> dict:
    from llip_core.convert import ConvertError, official_to_llip
    from llip_core.pretrained import CARD_FILE, PretrainedError, export_files
    from llip_core.tokenizer import tokenizer_spec
    from orchestrator.models.export import model_card
    from orchestrator.storage.paths import Destination
    from orchestrator.tracking.store import git_commit, package_version

    t0 = time.perf_counter()
    state = read_official(path, trust_pickle)
    try:
        model_cfg, weights = official_to_llip(state, source=path, heads=heads, text_heads=text_heads,
                                              cross_heads=cross_heads, tau=tau, activation=activation)
        spec = tokenizer_spec("clip_bpe", model_cfg.context_length, model_cfg.vocab_size, "full")
        source = {"kind": "official", "file": str(Path(path).resolve()), "repository": "facebookresearch/Llip"}
        files = export_files(model_cfg, weights, spec, "llip", dtype, source=source,
                             extra={"llip_orch": {"version": package_version(), "commit": git_commit()}})
    except (ConvertError, PretrainedError) as e:
        raise UserError(str(e)) from None
    sizes = {k: len(v) for k, v in files.items()}
    files[CARD_FILE] = model_card(name or Path(path).stem, model_cfg, "llip (sigmoid)", spec, {},
                                  {"official file": Path(path).name, "from": "facebookresearch/Llip release"},
                                  "llip", dtype, sizes).encode()
    dest = Destination(out)
    for n, data in files.items():
        dest.put(n, data)
    return {"config": model_cfg, "files": {k: len(v) for k, v in files.items()}, "seconds": time.perf_counter() - t0}


def cli(args) -> int:
    r = import_official(args.file, args.out, heads=args.heads, text_heads=args.text_heads,
                        cross_heads=args.cross_heads, tau=args.tau, activation=args.activation, dtype=args.dtype,
                        name=args.name, trust_pickle=args.trust_pickle)
    m = r["config"]
    print(f"imported {args.file} to {args.out} in {r['seconds']:.1f} s: Llip K={m.mixture_tokens}, ViT {m.width}x{m.layers} "
          f"patch {m.patch_size} at {m.image_size} px, text {m.text_width}x{m.text_layers}, D={m.embed_dim}, "
          f"{m.cross_heads} cross heads, tau {m.tau:g}{', K/V/Q LayerNorm' if m.kqv_norm else ''}")
    print(f"  evaluate:  llip eval {args.out} --set PATH      train from it:  --set train.init_from={args.out}")
    return 0
