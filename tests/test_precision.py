"""Precision names and the "auto" choice (bf16 only where the hardware has bf16 matrix instructions)."""

from __future__ import annotations

import pytest
import torch

from freqmedclip.inference import precision


@pytest.fixture
def fast_bf16(monkeypatch):
    def set_flag(value: bool) -> None:
        monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: value)
    return set_flag


def test_auto_picks_bf16_only_on_cuda_or_bf16_capable_cpus(fast_bf16):
    fast_bf16(False)
    assert precision.resolve("auto", "cpu") == "fp32"
    assert precision.resolve("auto", "cuda") == "bf16"
    fast_bf16(True)
    assert precision.resolve("auto", "cpu") == "bf16"


def test_explicit_names_pass_through_and_none_means_fp32():
    assert [precision.resolve(n, "cpu") for n in ("none", "fp32", "bf16", "fp16")] == ["fp32", "fp32", "bf16", "fp16"]
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.resolve("int8", "cpu")


def test_autocast_runs_matmuls_in_the_resolved_dtype(fast_bf16):
    a = torch.randn(4, 4)
    with precision.autocast("cpu", "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with precision.autocast("cpu", "fp32"):
        assert (a @ a).dtype == torch.float32
    fast_bf16(False)   # AVX2 / AVX-512F only: "auto" is fp32
    with precision.autocast("cpu", "auto"):
        assert (a @ a).dtype == torch.float32
    fast_bf16(True)    # AVX512-BF16 or AMX: "auto" is bf16 (both branches on every machine)
    with precision.autocast("cpu", "auto"):
        assert (a @ a).dtype == torch.bfloat16


@pytest.mark.parametrize("flags, expected", [("fpu avx2 avx512f", False), ("fpu avx512f avx512_bf16", True),
                                             ("fpu amx_tile amx_bf16", True), ("fpu avx2", False)])
def test_the_capability_probe_reads_cpuinfo_flags(monkeypatch, flags, expected):
    from pathlib import Path
    monkeypatch.setattr(Path, "read_text", lambda self, *args, **kwargs: f"processor : 0\nflags : {flags}\n")
    precision.cpu_has_fast_bf16.cache_clear()
    try:
        assert precision.cpu_has_fast_bf16() is expected
    finally:
        precision.cpu_has_fast_bf16.cache_clear()
