"""AdamW with the authors' decay rule and a warmup + cosine schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

# open_clip's `main.py` rule, which Llip's official code keeps: a parameter is exempt from weight
# decay when it has fewer than 2 dimensions or its name holds one of these. 2-D mixture/class tokens
# and positional embeddings are therefore decayed.
NO_DECAY_NAME_PARTS = ("bn", "ln", "bias", "logit_scale")


def decay_exempt(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or any(part in name for part in NO_DECAY_NAME_PARTS)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """[decayed, exempt] parameter groups under `decay_exempt`."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if decay_exempt(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(module: nn.Module, lr: float, betas=(0.9, 0.95), eps: float = 1e-6,
                    weight_decay: float = 0.2) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(module, weight_decay), lr=lr, betas=tuple(betas), eps=eps)


def cosine_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to base_lr over `warmup_steps` (step 0 gets base_lr / warmup), then cosine to 0."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * base_lr
