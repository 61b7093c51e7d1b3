"""The YAML's speed switches (train.precision, grad_checkpointing, attention, compile) applied to a task.

Each switch keeps the model's math (tests/test_switches.py checks each against the default path over
a few optimiser steps). A switch that cannot run where the worker landed (bf16 on a device without
bf16 kernels, torch.compile failing to build) stops the run with one line naming the switch, or,
with `train.allow_fallback: true`, prints one warning line and trains on the default path.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from orchestrator.errors import UserError


def bf16_supported(device: torch.device) -> bool:
    """Whether the device has bf16 kernels: CUDA's own check; on CPU, oneDNN's (AVX512 or AMX), without
    which autocast still runs but emulates bf16 slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def use_bf16(precision: str, device: torch.device, allow_fallback: bool, warn: Callable[[str], None],
             supported: Optional[bool] = None) -> bool:
    """Whether to autocast to bf16. `supported` overrides the device check (tests)."""
    if precision != "bf16":
        return False
    ok = bf16_supported(device) if supported is None else supported
    if ok:
        return True
    what = f"train.precision: bf16: this {device.type} device has no bf16 kernels"
    if not allow_fallback:
        raise UserError(f"{what}; set train.precision: fp32, or train.allow_fallback: true to fall back to fp32")
    warn(f"[llip] warning: {what}; training in fp32 (train.allow_fallback: true)")
    return False


def _short(e: BaseException) -> str:
    """The innermost cause's first line (dynamo wraps a backend's error in BackendCompilerFailed)."""
    while True:
        inner = getattr(e, "inner_exception", None) or e.__cause__
        if inner is None or inner is e:
            break
        e = inner
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class _CompiledOrEager:
    """A bound method run through torch.compile, falling back to the eager method once if compiling fails.

    Compilation happens at the first call (and again for new input shapes), so failures show up there:
    when the compiled call raises and the eager call with the same inputs succeeds, the fault is the
    compiler's; a real error in the model raises from the eager call as it would uncompiled."""

    def __init__(self, eager, switch: "CompileSwitch", backend):
        self.eager = eager
        self.switch = switch
        self.compiled = torch.compile(eager, backend=backend)

    def __call__(self, *args, **kwargs):
        if self.switch.failed is None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any compiler fault; the eager rerun tells them apart
                out = self.eager(*args, **kwargs)
                self.switch.fail(e)
                return out
        return self.eager(*args, **kwargs)


class CompileSwitch:
    """train.compile for one model: its image and text towers are compiled in place (instance
    attributes), so state_dict keys, DDP and checkpoints are those of the uncompiled model."""

    def __init__(self, allow_fallback: bool, warn: Callable[[str], None]):
        self.allow_fallback = allow_fallback
        self.warn = warn
        self.failed: Optional[str] = None

    def fail(self, e: BaseException) -> None:
        self.failed = _short(e)
        what = f"train.compile: torch.compile could not build the model ({self.failed})"
        if not self.allow_fallback:
            raise UserError(f"{what}; set train.compile: false, or train.allow_fallback: true to train uncompiled")
        self.warn(f"[llip] warning: {what}; training uncompiled (train.allow_fallback: true)")

    def apply(self, model: torch.nn.Module, backend="inductor") -> None:
        try:
            for name in ("encode_image", "encode_text"):
                setattr(model, name, _CompiledOrEager(getattr(model, name), self, backend))
        except Exception as e:  # torch.compile itself refusing (e.g. an unsupported Python)
            self.fail(e)


def compile_towers(model: torch.nn.Module, allow_fallback: bool, warn: Callable[[str], None],
                   backend="inductor") -> CompileSwitch:
    switch = CompileSwitch(allow_fallback, warn)
    switch.apply(model, backend)
    return switch


def apply_switches(task: torch.nn.Module, train_cfg, device: torch.device,
                   warn: Callable[[str], None] = print, compile_backend="inductor",
                   bf16_support: Optional[bool] = None) -> bool:
    """Set the model switches of `train_cfg` (an orchestrator.config.schema.TrainSection) on `task.model`;
    returns whether to autocast to bf16. Call before DDP wraps the task. `bf16_support` overrides the
    device's bf16 check (tests cover both answers on any CPU)."""
    model = task.model
    model.set_attention(train_cfg.attention)
    model.set_grad_checkpointing(train_cfg.grad_checkpointing)
    bf16 = use_bf16(train_cfg.precision, device, train_cfg.allow_fallback, warn, supported=bf16_support)
    if train_cfg.compile:
        compile_towers(model, train_cfg.allow_fallback, warn, backend=compile_backend)
    return bf16


__all__ = ["apply_switches", "bf16_supported", "compile_towers", "use_bf16"]
