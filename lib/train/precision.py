"""Mixed precision the way fastai 2.8.12's `to_fp16()`/`to_bf16()` do it: native PyTorch AMP, weights kept in fp32.

fp16 = autocast(float16) + a GradScaler that skips the optimizer step when the unscaled gradients overflow.
bf16 = autocast(bfloat16) without a scaler (bf16 has fp32's exponent range). Float16 autocast is a CUDA feature here:
on another device an fp16 request runs in fp32, and `Precision.effective` and `.note` tell the caller what ran and
why: the training flow says so once in its log and records it (fp16 is the recipe's default, so every CPU run would
otherwise warn in every stage).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

PRECISIONS = ("fp32", "fp16", "bf16")
_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """What was asked for, what runs, on which device type, and why they differ (None when they don't)."""

    requested: str
    effective: str
    device_type: str
    note: str | None = None

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """Return the autocast dtype, or None for fp32."""
        return _AUTOCAST_DTYPES.get(self.effective)

    @property
    def uses_grad_scaler(self) -> bool:
        """Return whether the loss is scaled: fp16 only, as fastai's MixedPrecision does."""
        return self.effective == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Return the context the forward pass and the loss run in."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Return a GradScaler, enabled only for fp16 (torch defaults: init scale 2**16, growth x2 per 2000 steps)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.uses_grad_scaler)


def resolve_precision(requested: str, device: torch.device | str) -> Precision:
    """Decide the precision that runs on this device; `note` says why it differs from the request, if it does."""
    if requested not in PRECISIONS:
        raise ValueError(f"Unknown precision {requested!r}: choose one of {', '.join(PRECISIONS)}.")
    return _precision_for(requested, torch.device(device).type)


def _precision_for(requested: str, device_type: str) -> Precision:
    if requested == "fp16" and device_type != "cuda":
        # CPU float16 autocast is slow where it exists at all; fp32 is the honest fallback.
        note = f"fp16 mixed precision needs a CUDA GPU, so this runs in fp32 on {device_type}."
        return Precision(requested, "fp32", device_type, note)
    if requested == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        # fastai raises here too: a silent fp32 run would hide a misconfigured GPU pool.
        raise RuntimeError("bf16 was requested but this GPU does not support bfloat16: use fp16.")
    if requested == "bf16" and device_type not in ("cuda", "cpu"):
        note = f"bf16 autocast is not supported on {device_type}; training runs in fp32."
        return Precision(requested, "fp32", device_type, note)
    return Precision(requested, requested, device_type)


def use_channels_last(device: torch.device | str, requested: bool | None = None) -> bool:
    """Return whether to use channels_last: by default on CUDA and on the CPU.

    cuDNN's tensor-core convolutions prefer it, and so do oneDNN's on the CPU: resnet18/34/50 trained 13-17% faster
    with it on a 2-core EPYC (BENCHMARKS.md). MPS keeps the contiguous layout.
    """
    if requested is not None:
        return requested
    return torch.device(device).type in ("cuda", "cpu")
