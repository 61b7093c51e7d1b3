"""AdamW with the authors' decay rule and a warmup + cosine schedule."""
from __future__ import annotations

import math

import torch
from torch import nn


def _no_decay_names(module: nn.Module) -> set[str]:
    """Full names of >= 2-D parameters declared decay-free by a submodule's `no_weight_decay()`."""
    names = set()
    for prefix, m in module.named_modules():
        if hasattr(m, "no_weight_decay"):
            names |= {f"{prefix}.{n}" if prefix else n for n in m.no_weight_decay()}
    return names


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Decay >= 2-D weights only: not mixture/class tokens, positional embeddings, biases, norms,
    the logit scale or bias (all 0-/1-D, or named by the model's `no_weight_decay`)."""
    skip = _no_decay_names(module)
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and name not in skip else no_decay).append(p)
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
