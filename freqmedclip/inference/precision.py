"""Autocast precision: names, the "auto" choice, and one autocast context used by every script.

bf16 autocast pays off on GPUs and on CPUs with bf16 matrix instructions (AMX or AVX512-BF16). On other CPUs
(AVX512F or AVX2 only) PyTorch emulates bf16 and autocast is several times slower than fp32, so "auto"
picks fp32 there.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CHOICES = ("auto", "none", *DTYPES)   # "none" = "fp32", kept for the trainer's --amp flag


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when this CPU has bf16 matrix instructions (AMX-BF16 or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve(name: str, device: torch.device | str) -> str:
    """Map a precision name (auto, none, fp32, bf16, fp16) to one of fp32, bf16, fp16 for ``device``."""
    if name not in CHOICES:
        raise ValueError(f"precision must be one of {CHOICES}, got {name!r}")
    if name == "none":
        return "fp32"
    if name == "auto":
        return "bf16" if torch.device(device).type == "cuda" or cpu_has_fast_bf16() else "fp32"
    return name


def autocast(device: torch.device | str, name: str) -> contextlib.AbstractContextManager:
    """Autocast to ``name``'s dtype on ``device``; a no-op for fp32."""
    device = torch.device(device)
    name = resolve(name, device)
    if name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[name])


# the layers whose weights autocast runs in the lower precision (matrix products and convolutions)
AUTOCAST_LOWER_PRECISION_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def cast_weights_once(module: nn.Module, name: str) -> int:
    """Cast the weights and biases of ``module``'s linear and convolution layers to ``name``'s dtype, in place, so
    that autocast stops casting them again on every call; returns how many layers were cast (0 for fp32).

    Exact under autocast to the same dtype: autocast rounds these arguments to that dtype anyway, and norms and other
    layers it runs in fp32 keep their fp32 weights. Outside autocast the cast layers expect inputs of that dtype, so
    only for modules that are never run in fp32 afterwards.
    """
    if name == "fp32":
        return 0
    layers = [m for m in module.modules() if isinstance(m, AUTOCAST_LOWER_PRECISION_LAYERS)]
    for layer in layers:
        layer.to(DTYPES[name])
    return len(layers)
