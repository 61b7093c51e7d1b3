"""Weights in other projects' layouts, both ways (pure torch; no ray, no mlflow).

open_clip (out): a model with one embedding per image (CLIP, SigLIP: pooling "cls") as open_clip's
own `CLIP` state dict and model config, the `local-dir:` layout that `create_model_and_transforms`,
clip_benchmark and clip-retrieval load. Our tensors map one to one (ViT blocks are open_clip's
`nn.MultiheadAttention` layout: in_proj q|k|v rows, out_proj); open_clip pools text at the argmax of
the ids, which is the first EOT only under CLIP's full BPE ids, so a compact vocabulary is expanded to
the 49,408-row table (every id unseen in training takes the unknown id's row, as our tokenizer maps
it) and open_clip's own tokenizer then gives the same text embeddings.

The official Llip release (in): the CMP model of facebookresearch/Llip's open_clip fork
(`llip/open_clip/model.py`): `visual.class_embedding` (K, width) holds the K mixture tokens,
`k_proj`/`v_proj` (K, width, D) the per-token key and value projections, `q_proj` (text_width, D)
the query projection, `pred.out_proj` (D, D), `K_norm`/`V_norm`/`Q_norm` LayerNorms in the `-norm`
configs, and the usual CLIP towers (`visual.transformer.resblocks.*`, `transformer.resblocks.*`).
Its eval loader strips `_orig_mod.` / `module.`, renames a top-level `out_proj` to `pred.out_proj`
and unsqueezes a 1-D class embedding; `official_to_llip` does the same. Sizes and K come from the
shapes; head counts are not in any shape, so they default to the released configs' rule (ViT heads =
width / 64, but 16 for the 1280- and 1664-wide H/14 and bigG/14; text heads = text width / 64; 8
cross-attention heads) unless given.
"""
from __future__ import annotations

import math
import re
from typing import Optional

import torch

from llip_core.config import ModelConfig
from llip_core.tokenizer import CLIP_EOT, CLIP_SOT, CLIP_VOCAB_SIZE, EOT, SOT, UNK


class ConvertError(ValueError):
    """A state dict that does not fit: one line naming the file, the tensor and the shapes."""


# ============================================================================ block key names
_BLOCK = re.compile(r"^(?P<tower>visual\.transformer|transformer|visual|text)\.resblocks\.(?P<i>\d+)\.(?P<rest>.+)$")
_ATTN_OURS_TO_OC = {"attn.in_proj.weight": "attn.in_proj_weight", "attn.in_proj.bias": "attn.in_proj_bias"}
_ATTN_OC_TO_OURS = {v: k for k, v in _ATTN_OURS_TO_OC.items()}


def _block_ours_to_oc(key: str) -> Optional[str]:
    m = _BLOCK.match(key)
    if not m or m["tower"] not in ("visual", "text"):
        return None
    tower = "visual.transformer" if m["tower"] == "visual" else "transformer"
    return f"{tower}.resblocks.{m['i']}.{_ATTN_OURS_TO_OC.get(m['rest'], m['rest'])}"


def _block_oc_to_ours(key: str) -> Optional[str]:
    m = _BLOCK.match(key)
    if not m or m["tower"] not in ("visual.transformer", "transformer"):
        return None
    tower = "visual" if m["tower"] == "visual.transformer" else "text"
    return f"{tower}.resblocks.{m['i']}.{_ATTN_OC_TO_OURS.get(m['rest'], m['rest'])}"


# ============================================================================ open_clip (out)
_OC_NAMES = {  # ours -> open_clip, outside the transformer blocks
    "conv1.weight": "visual.conv1.weight",
    "positional_embedding": "visual.positional_embedding",
    "ln_pre.weight": "visual.ln_pre.weight", "ln_pre.bias": "visual.ln_pre.bias",
    "ln_post.weight": "visual.ln_post.weight", "ln_post.bias": "visual.ln_post.bias",
    "proj": "visual.proj",
    "token_embedding.weight": "token_embedding.weight",
    "text_positional_embedding": "positional_embedding",
    "ln_final.weight": "ln_final.weight", "ln_final.bias": "ln_final.bias",
    "text_projection": "text_projection",
    "logit_scale": "logit_scale", "logit_bias": "logit_bias",
}


def _mlp_ratio(hidden: int, width: int) -> float:
    """A ratio that open_clip's int(width * ratio) turns back into `hidden`."""
    r = hidden / width
    while int(width * r) < hidden:
        r = math.nextafter(r, math.inf)
    return r


def full_vocab_embedding(table: torch.Tensor, spec: dict) -> torch.Tensor:
    """A compact vocabulary's (4 + n, w) embedding -> CLIP BPE's (49408, w): row i of the result is the
    row our tokenizer maps BPE id i to (SOT, EOT, a seen id's own row, else the unknown id's)."""
    index = torch.full((CLIP_VOCAB_SIZE,), UNK, dtype=torch.long)
    seen = [int(i) for i in spec.get("ids", []) if int(i) not in (CLIP_SOT, CLIP_EOT)]
    index[torch.as_tensor(sorted(set(seen)), dtype=torch.long)] = torch.arange(4, 4 + len(set(seen)))
    index[CLIP_SOT], index[CLIP_EOT] = SOT, EOT
    return table[index].clone()


def to_open_clip(model_cfg: ModelConfig, weights: dict[str, torch.Tensor],
                 tokenizer_spec: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(open_clip_config.json's content, open_clip state dict) for a model with one embedding per image."""
    one_branch = model_cfg.pooling == "multi_cls" and model_cfg.branches == 1
    if model_cfg.pooling != "cls" and not one_branch:
        raise ConvertError(
            f"open_clip's layout holds one embedding per image; a {model_cfg.pooling!r} model "
            f"({'text-conditioned mixture tokens' if model_cfg.pooling == 'llip' else 'several tokens per image'}) "
            "has no open_clip equivalent: export it with --format llip")
    if tokenizer_spec.get("name") != "clip_bpe":
        raise ConvertError(f"open_clip tokenizes with CLIP's BPE; this model was trained with "
                           f"{tokenizer_spec.get('name')!r}: export it with --format llip")
    out: dict[str, torch.Tensor] = {}
    for k, v in weights.items():
        if k == "class_embedding":
            out["visual.class_embedding"] = v.reshape(-1)  # (1, w) -> open_clip's (w,)
        elif k in _OC_NAMES:
            out[_OC_NAMES[k]] = v
        else:
            name = _block_ours_to_oc(k)
            if name is None:
                raise ConvertError(f"tensor {k} has no open_clip equivalent")
            out[name] = v
    if tokenizer_spec.get("vocab") == "compact":
        out["token_embedding.weight"] = full_vocab_embedding(weights["token_embedding.weight"], tokenizer_spec)
    heads, text_heads = model_cfg.heads, model_cfg.text_heads
    hidden = weights["visual.resblocks.0.mlp.c_fc.weight"].shape[0]
    text_hidden = weights["text.resblocks.0.mlp.c_fc.weight"].shape[0]
    cfg = {
        "embed_dim": model_cfg.embed_dim,
        "quick_gelu": model_cfg.activation == "quick_gelu",
        "vision_cfg": {"image_size": model_cfg.image_size, "layers": model_cfg.layers, "width": model_cfg.width,
                       "head_width": model_cfg.width // heads, "mlp_ratio": _mlp_ratio(hidden, model_cfg.width),
                       "patch_size": model_cfg.patch_size},
        "text_cfg": {"context_length": model_cfg.context_length, "vocab_size": CLIP_VOCAB_SIZE,
                     "width": model_cfg.text_width, "heads": text_heads, "layers": model_cfg.text_layers,
                     "mlp_ratio": _mlp_ratio(text_hidden, model_cfg.text_width)},
    }
    if "logit_bias" in weights:  # a sigmoid loss (SigLIP): open_clip then keeps a logit_bias parameter
        cfg["init_logit_bias"] = float(weights["logit_bias"])
    from llip_core.preprocess import CLIP_MEAN, CLIP_STD

    preprocess = {"size": model_cfg.image_size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    return {"model_cfg": cfg, "preprocess_cfg": preprocess}, out


# ============================================================================ official Llip (in)
_PREFIXES = ("_orig_mod.", "module.")


def clean_official(sd: dict) -> dict[str, torch.Tensor]:
    """The official eval loader's fixes: checkpoint dict -> state dict, torch.compile / DDP prefixes
    stripped, `out_proj` -> `pred.out_proj`, a 1-D class embedding made (1, width)."""
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConvertError("not a state dict of tensors (nor a checkpoint with a 'state_dict')")
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    if "out_proj" in out and "pred.out_proj" not in out:
        out["pred.out_proj"] = out.pop("out_proj")
    if "visual.class_embedding" in out and out["visual.class_embedding"].dim() == 1:
        out["visual.class_embedding"] = out["visual.class_embedding"][None]
    return out


_OFFICIAL_NAMES = {  # official -> ours, outside the transformer blocks
    "visual.conv1.weight": "conv1.weight",
    "visual.class_embedding": "mixture_tokens",
    "visual.positional_embedding": "positional_embedding",
    "visual.ln_pre.weight": "ln_pre.weight", "visual.ln_pre.bias": "ln_pre.bias",
    "visual.ln_post.weight": "ln_post.weight", "visual.ln_post.bias": "ln_post.bias",
    "k_proj": "k_proj", "v_proj": "v_proj", "q_proj": "q_proj", "pred.out_proj": "out_proj",
    "K_norm.weight": "k_norm.weight", "K_norm.bias": "k_norm.bias",
    "V_norm.weight": "v_norm.weight", "V_norm.bias": "v_norm.bias",
    "Q_norm.weight": "q_norm.weight", "Q_norm.bias": "q_norm.bias",
    "token_embedding.weight": "token_embedding.weight",
    "positional_embedding": "text_positional_embedding",
    "ln_final.weight": "ln_final.weight", "ln_final.bias": "ln_final.bias",
    "text_projection": "text_projection",
    "logit_scale": "logit_scale", "logit_bias": "logit_bias",
}
_REQUIRED = ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "k_proj", "v_proj",
             "q_proj", "pred.out_proj", "token_embedding.weight", "positional_embedding", "ln_final.weight",
             "text_projection")


def _default_heads(width: int) -> int:
    # the released configs: head_width 64, except ViT-H/14 (1280 wide, 80) and ViT-bigG/14 (1664, 104)
    return {1280: 16, 1664: 16}.get(width, width // 64)


def official_config(sd: dict[str, torch.Tensor], source: str, heads: Optional[int] = None,
                    text_heads: Optional[int] = None, cross_heads: int = 8, tau: float = 5.0,
                    activation: str = "quick_gelu") -> ModelConfig:
    """Our ModelConfig for a cleaned official CMP state dict, sizes and K read from the shapes."""
    if "k_proj" not in sd and "visual.proj" in sd:
        raise ConvertError(f"{source}: a CLIP/SigLIP state dict (visual.proj, no k_proj), not Llip's CMP model; "
                           "import-official reads the released Llip files (llip_b16_k32.pt, llip_G14_k64.pt)")
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        raise ConvertError(f"{source}: tensor {missing[0]} is missing; not a state dict of the official Llip CMP model")

    def dims(k, n):
        if sd[k].dim() != n:
            raise ConvertError(f"{source}: tensor {k} has shape {tuple(sd[k].shape)}, expected {n} dimensions")
        return tuple(sd[k].shape)

    width, _, patch, patch2 = dims("visual.conv1.weight", 4)
    K, w2 = dims("visual.class_embedding", 2)
    n_pos, w3 = dims("visual.positional_embedding", 2)
    if patch != patch2:
        raise ConvertError(f"{source}: tensor visual.conv1.weight has non-square patches {patch}x{patch2}")
    grid = math.isqrt(max(n_pos - K, 0))
    if grid * grid != n_pos - K or grid == 0:
        raise ConvertError(f"{source}: tensor visual.positional_embedding has shape {(n_pos, w3)}, expected "
                           f"(K + grid^2, {width}) with K = {K} from visual.class_embedding; {n_pos - K} is not a square")
    layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    text_layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    if not layers or not text_layers:
        raise ConvertError(f"{source}: no {'visual.' if not layers else ''}transformer.resblocks.* tensors; "
                           "not the official Llip CMP model")
    hidden = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    vocab, text_width = dims("token_embedding.weight", 2)
    context = sd["positional_embedding"].shape[0]
    text_hidden = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    embed_dim = dims("text_projection", 2)[1]
    if vocab != CLIP_VOCAB_SIZE:
        raise ConvertError(f"{source}: tensor token_embedding.weight has shape {(vocab, text_width)}, expected "
                           f"({CLIP_VOCAB_SIZE}, {text_width}): the released models use CLIP's BPE ids")
    heads = heads or _default_heads(width)
    text_heads = text_heads or text_width // 64
    for what, w, h, flag in (("ViT", width, heads, "--heads"), ("text", text_width, text_heads, "--text-heads")):
        if h < 1 or w % h:
            raise ConvertError(f"{source}: {what} width {w} is not divisible into {h} heads; give the head count "
                               f"with {flag}")
    if embed_dim % cross_heads:
        raise ConvertError(f"{source}: embed_dim {embed_dim} (text_projection) is not divisible by {cross_heads} "
                           "cross-attention heads; give --cross-heads")
    return ModelConfig(
        image_size=grid * patch, patch_size=patch, width=width, layers=layers, heads=heads,
        mlp_ratio=hidden / width, context_length=context, vocab_size=vocab, tokenizer="clip_bpe", vocab="full",
        text_width=text_width, text_layers=text_layers, text_heads=text_heads, text_mlp_ratio=text_hidden / text_width,
        embed_dim=embed_dim, pooling="llip", mixture_tokens=K, cross_heads=cross_heads, tau=tau,
        activation=activation, kqv_norm="K_norm.weight" in sd,
    )


def _ours_to_official(key: str) -> str:
    inverse = {v: k for k, v in _OFFICIAL_NAMES.items()}
    if key in inverse:
        return inverse[key]
    m = _BLOCK.match(key)
    tower = "visual.transformer" if m["tower"] == "visual" else "transformer"
    return f"{tower}.resblocks.{m['i']}.{_ATTN_OURS_TO_OC.get(m['rest'], m['rest'])}"


def official_to_llip(state: dict, source: str = "state dict", **settings) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, weights under our names) from the official CMP state dict or checkpoint; every
    tensor's shape is checked, under the official file's names, against the model the config builds."""
    from llip_core.pretrained import PretrainedError, check_fits, model_shapes

    try:
        sd = clean_official(state)
    except ConvertError as e:
        raise ConvertError(f"{source}: {e}") from None
    cfg = official_config(sd, source, **settings)
    # CMP sets visual.proj to None; a stray copy, or the causal mask saved as a buffer, carries no weights
    sd = {k: v for k, v in sd.items() if k not in ("visual.proj", "attn_mask")}
    for k in ("logit_scale", "logit_bias"):
        if k in sd:
            sd[k] = sd[k].reshape(())  # some open_clip versions keep them as (1,)
    ours = list(model_shapes(cfg).items())
    expected = {_ours_to_official(k): v for k, v in ours}
    expected.update({"logit_scale": (), "logit_bias": ()})
    try:
        check_fits(expected, sd, source)
    except PretrainedError as e:
        raise ConvertError(str(e).replace("the config asks for", "the other tensors imply")) from None
    names = {_ours_to_official(k): k for k, _ in ours}
    names.update(logit_scale="logit_scale", logit_bias="logit_bias")
    return cfg, {names[k]: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
