"""Model + loss + learnable logit scale/bias in one module (open_clip's `task/clip_task.py`).

The training loop calls `task(images, tokens)["loss"].backward()`, `optimizer.step()` and
`task.after_step()` whatever the model type; DDP can wrap the whole task.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from llip_core.config import ModelConfig
from llip_core.losses import LOSS_TYPES, build_loss, initial_logits
from llip_core.model import LlipModel

MAX_LOG_SCALE = math.log(100.0)  # log s clamped to [0, ln 100] after each step (CLIP, Llip)


def _float32(feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating features in at least float32 (bf16/fp16 up, float64 kept); masks and ids untouched."""
    return {k: v.to(torch.promote_types(v.dtype, torch.float32)) if v.is_floating_point() else v
            for k, v in feats.items()}


class Task(nn.Module):
    def __init__(self, model: LlipModel, loss: nn.Module, init_log_scale: float, init_bias: float | None):
        super().__init__()
        self.model = model
        self.loss = loss
        self.logit_scale = nn.Parameter(torch.tensor(float(init_log_scale)))
        # InfoNCE is invariant to a shared bias: registering one would leave a parameter without
        # gradient, which DDP (find_unused_parameters=False) rejects.
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias))) if init_bias is not None else None

    def forward(self, images: torch.Tensor, tokens: torch.Tensor,
                caption_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """tokens (B, L), or (B, M, L) with caption_mask (B, M) marking real captions (data.captions: all)."""
        extra = {}
        if tokens.dim() == 3:
            if not getattr(self.loss, "multi_caption", False):
                raise ValueError("tokens hold several captions per image but the loss takes one; build the "
                                 "task with multi_caption=True (data.captions: all)")
            B, M, L = tokens.shape
            tokens = tokens.reshape(B * M, L)
            extra["caption_mask"] = caption_mask if caption_mask is not None else \
                torch.ones(B, M, dtype=torch.bool, device=tokens.device)
        img = self.model.encode_image(images)
        txt = self.model.encode_text(tokens)
        # Under bf16 autocast (train.precision) only the towers run in bf16: the loss, the logit scale
        # and bias see float32 features, as open_clip does (a bf16 exp(logit_scale) alone is off by ~0.4%).
        with torch.autocast(device_type=images.device.type, enabled=False):
            img, txt = _float32(img), _float32(txt)
            return self.loss(img, txt, logit_scale=self.logit_scale.exp(), logit_bias=self.logit_bias,
                             **extra, **self.model.scoring_params())

    @torch.no_grad()
    def after_step(self) -> None:
        self.logit_scale.clamp_(0.0, MAX_LOG_SCALE)

    def logit_scale_value(self) -> float:
        return float(self.logit_scale.detach().exp())


def build_task(model_cfg: ModelConfig, loss_type: str, rank: int = 0, world_size: int = 1,
               literal_scorer: bool = False, chunk_size: int | None = None, group=None,
               multi_caption: bool = False, diversity_weight: float = 1.0, diversity_margin: float = 0.7,
               siglip_init: str = "open_clip", init_bias: float | str | None = None,
               global_batch: int | None = None) -> Task:
    """chunk_size: images per chunk of the Llip scorer; None sizes chunks from a memory budget
    (losses.PAIR_BUDGET), the better choice on CPU. init_bias: the sigmoid losses' initial bias
    instead of -10, a number or "auto" = -ln(global_batch) (losses.initial_logits)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss type {loss_type!r}; choose one of {LOSS_TYPES}")
    if loss_type == "holistic" and model_cfg.pooling != "multi_cls":
        raise ValueError(f"loss type 'holistic' needs model pooling 'multi_cls' (got {model_cfg.pooling!r}): "
                         "it scores each of the image's branch embeddings")
    if model_cfg.pooling == "multi_cls" and loss_type != "holistic" and model_cfg.branches > 1:
        raise ValueError(f"loss type {loss_type!r} takes one embedding per image but model.branches is "
                         f"{model_cfg.branches}: set model.branches 1 or loss.type holistic")
    wants_llip = loss_type in ("llip", "llip_infonce")
    if wants_llip != (model_cfg.pooling == "llip"):
        need = '"llip"' if wants_llip else 'one of "cls", "avg", "register"'
        raise ValueError(
            f"loss type {loss_type!r} needs model pooling {need}, got pooling {model_cfg.pooling!r}: "
            "the llip losses score text-conditioned image embeddings, the others one embedding per image"
        )
    loss = build_loss(loss_type, rank, world_size, tau=model_cfg.tau, literal_scorer=literal_scorer,
                      chunk_size=chunk_size, group=group, multi_caption=multi_caption,
                      diversity_weight=diversity_weight, diversity_margin=diversity_margin)
    init = initial_logits(loss_type, siglip_init, init_bias, global_batch)
    return Task(LlipModel(model_cfg), loss, *init)
