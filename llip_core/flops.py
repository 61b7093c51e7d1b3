"""FLOPs of one training step, for MFU (model FLOPs utilisation).

Convention (PaLM appendix B, as nanoGPT's `estimate_mfu`): count the matmul FLOPs of the forward
pass, 2 per multiply-add, and take the backward as twice the forward, so a training step costs
3 x forward. Elementwise work (norms, softmax, activations, the loss) is left out, and so is
recomputation (activation checkpointing, the Llip scorer's recomputing backward): MFU measures
useful model work, not what the hardware happened to execute.

Per image, with N = patches + prepended tokens (K mixture tokens, M branches, or 1 class token),
w the ViT width, f the MLP hidden size, L the depth:
    patch embedding        2 * patches * (3 p^2) * w
    per block              2 * N * (4 w^2 + 2 w f)      q/k/v/out projections and the MLP
                         + 4 * N^2 * w                   Q K^T and attention x V
    pooling (llip)         2 * K * w * D * 2            per-token k_proj and v_proj
            (avg/register) 2 * K * w * D                per-token projections
            (cls)          2 * w * D;  (multi_cls) 2 * M * w * D
Per caption, with T = context_length and the text tower's own widths: the same block formula, plus
2 * w_t * D for the text projection and, for Llip, 2 * w_t * D for q_proj.
Scoring, per (image, text) pair the step scores (every local image against every global text, on
every rank; so B x B pairs per step in total):
    clip / siglip          2 * D
    holistic (M branches)  2 * D * M / min(captions per image, M)   (branch k meets caption k)
    llip literal           4 * K * D + 2 * D^2 + 2 * D   attention logits, mix V, out_proj, cosine
    llip Gram route        4 * K * D + 2 (HK)^2              logits, <V_i, W t_j>, the norm a^T G_i a
                           + per image 2 K D^2 + 2 H K^2 D   its Gram matrix G_i (HK x HK), built from
                                                             C = W W^T one head block at a time
                           + per text 2 D^2, once 2 D^3      p_j = W t_j, and C
    The Gram route runs when these come to fewer FLOPs than the literal count for the call's shapes
    (`gram_route_cheaper`: roughly H K < D and enough texts per call); otherwise the literal count.
    What the Gram route costs is counted, not the literal formulation's work, so the efficient
    scorer's savings do not inflate MFU. tests/test_flops.py checks both against torch's counter.
"""
from __future__ import annotations

from llip_core.config import ModelConfig


def _tower(tokens: int, width: int, layers: int, mlp_hidden: int) -> int:
    per_block = 2 * tokens * (4 * width * width + 2 * width * mlp_hidden) + 4 * tokens * tokens * width
    return layers * per_block


def image_forward_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs of the image tower and its pooling, per image."""
    patches = (cfg.image_size // cfg.patch_size) ** 2
    n = patches + cfg.num_image_tokens
    mlp = int(round(cfg.width * cfg.mlp_ratio))
    f = 2 * patches * 3 * cfg.patch_size ** 2 * cfg.width
    f += _tower(n, cfg.width, cfg.layers, mlp)
    D, K = cfg.embed_dim, cfg.mixture_tokens
    if cfg.pooling == "llip":
        f += 2 * 2 * K * cfg.width * D
    elif cfg.pooling in ("avg", "register"):
        f += 2 * K * cfg.width * D
    elif cfg.pooling == "multi_cls":
        f += 2 * cfg.branches * cfg.width * D
    else:
        f += 2 * cfg.width * D
    return f


def text_forward_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs of the text tower and its projections, per caption (the whole context is run)."""
    ratio = cfg.mlp_ratio if cfg.text_mlp_ratio is None else cfg.text_mlp_ratio
    mlp = int(round(cfg.text_width * ratio))
    f = _tower(cfg.context_length, cfg.text_width, cfg.text_layers, mlp)
    f += 2 * cfg.text_width * cfg.embed_dim
    if cfg.pooling == "llip":
        f += 2 * cfg.text_width * cfg.embed_dim
    return f


def _scorer_flops(D: int, K: int, H: int, n_img: int, n_txt: int, gram: bool) -> int:
    if not gram:
        return n_img * n_txt * (4 * K * D + 2 * D * D + 2 * D)
    return (n_img * n_txt * (4 * K * D + 2 * (H * K) ** 2) + n_img * (2 * K * D * D + 2 * H * K * K * D)
            + n_txt * 2 * D * D + 2 * D ** 3)


def gram_route_cheaper(D: int, K: int, H: int, n_img: int, n_txt: int) -> bool:
    """Whether llip_core.losses.llip_pair_logits scores n_img images against n_txt texts through the
    per-image Gram matrix rather than the literal formulation: whichever counts fewer FLOPs. (With
    H K > D the Gram route never wins: its per-pair (HK)^2 alone exceeds the literal D^2.)"""
    return _scorer_flops(D, K, H, n_img, n_txt, True) < _scorer_flops(D, K, H, n_img, n_txt, False)


def scoring_forward_flops(cfg: ModelConfig, n_img: int, n_txt: int, literal: bool = False,
                          captions_per_image: int = 1, per_call: tuple[int, int] | None = None) -> int:
    """Forward FLOPs of scoring n_img images against n_txt texts. `per_call`: the (images, texts) each
    scorer call sees, which decides the Llip route (N ranks: the InfoNCE loss scores the local images
    against all texts, (n_img/N, n_txt); the sigmoid ring one rank's texts at a time, (n_img/N,
    n_txt/N)); default one call with everything."""
    D, K, H = cfg.embed_dim, cfg.mixture_tokens, cfg.cross_heads
    pairs = n_img * n_txt
    if cfg.pooling == "multi_cls":
        # Holistic: with M captions per image, branch k meets caption k of every image (M B^2 logits);
        # with fewer captions every branch meets every caption (free matching)
        return pairs * 2 * D * cfg.branches // max(1, min(captions_per_image, cfg.branches))
    if cfg.pooling != "llip":
        return pairs * 2 * D
    ci, ct = per_call or (n_img, n_txt)
    gram = not literal and gram_route_cheaper(D, K, H, ci, ct)
    return pairs * _scorer_flops(D, K, H, ci, ct, gram) // (ci * ct)  # (pairs / per-call pairs) calls


def train_step_flops(cfg: ModelConfig, global_batch: int, captions_per_image: int = 1, literal: bool = False,
                     world_size: int = 1, ring: bool = False) -> int:
    """Model FLOPs of one optimiser step over the whole global batch (all ranks together): 3 x forward.
    With world_size ranks, each scores its local images against all texts, gathered (InfoNCE) or one
    rank's at a time around a ring (`ring`: the sigmoid losses)."""
    n_txt = global_batch * captions_per_image
    per_call = (global_batch // world_size, n_txt // world_size if ring else n_txt)
    fwd = (global_batch * image_forward_flops(cfg) + n_txt * text_forward_flops(cfg)
           + scoring_forward_flops(cfg, global_batch, n_txt, literal=literal, captions_per_image=captions_per_image,
                                   per_call=per_call))
    return 3 * fwd


def mfu(flops_per_step: float, step_seconds: float, peak_flops_per_device: float, devices: int) -> float:
    """Achieved model FLOP/s over the peak of all devices, in [0, 1] for a sane peak."""
    return flops_per_step / step_seconds / (peak_flops_per_device * devices)


# Dense bf16 peak FLOP/s per device (vendor datasheets, without sparsity), for `train.peak_flops: auto`.
PEAK_FLOPS_BF16 = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is 756e12
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "V100": 125e12,  # fp16 tensor cores (no bf16)
}


def peak_flops_for(device_name: str) -> float | None:
    """The table's peak for a CUDA device name such as 'NVIDIA H100 80GB HBM3'; None when unknown."""
    name = device_name.upper()
    if "H100" in name and "PCIE" in name:
        return 756e12
    for key, value in PEAK_FLOPS_BF16.items():
        if key in name:
            return value
    return None
