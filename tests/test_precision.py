"""Precision names and the "auto" choice (bf16 only where the hardware has bf16 matrix instructions)."""

from __future__ import annotations

import copy
import json

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


def test_weights_cast_once_give_bit_identical_outputs_under_autocast():
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=2).eval()
    reference = copy.deepcopy(vit)
    image = torch.rand(2, 3, 32, 32)
    with torch.inference_mode(), precision.autocast("cpu", "bf16"):
        before = vit(image).float()
        assert precision.cast_weights_once(vit, "bf16") == 1 + 2 * 4     # patch conv; qkv, proj, fc1, fc2 per block
        after = vit(image).float()
    assert torch.equal(before, after)
    assert vit.patch_embed.proj.weight.dtype == vit.blocks[0].mlp.fc1.bias.dtype == torch.bfloat16
    assert vit.norm.weight.dtype == vit.blocks[0].norm1.weight.dtype == torch.float32   # autocast runs norms in fp32
    # the control: weights rounded any other way (here through fp16) are not what autocast computes with
    reference.blocks[0].mlp.fc1.half()
    with torch.inference_mode(), precision.autocast("cpu", "bf16"):
        assert not torch.equal(reference(image).float(), before)


def test_casting_weights_once_is_a_no_op_in_fp32():
    layer = torch.nn.Linear(3, 2)
    assert precision.cast_weights_once(layer, "fp32") == 0 and layer.weight.dtype == torch.float32


def test_inference_benchmark_lists_top_ops_and_casts_nothing_in_fp32(tmp_path):
    from freqmedclip.inference import benchmark

    result = benchmark.main(["--preset", "mini", "--dtype", "fp32", "--warmup", "0", "--repeats", "1",
                             "--top-ops", "4", "--cast-weights-once", "--json", str(tmp_path / "bench.json")])
    ops = result["top_ops_end_to_end"]
    assert len(ops) == 4 and all(o["op"].startswith("aten::") for o in ops)
    shares = [o["share"] for o in ops]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1
    assert result["weights_cast_once"] == {"layers": 0, "logits_identical": None}    # fp32: nothing to cast
    assert json.loads((tmp_path / "bench.json").read_text())["top_ops_end_to_end"] == ops


def test_inference_benchmark_times_everything_in_inference_mode(monkeypatch):
    from freqmedclip.inference import benchmark

    modes = []

    def record(fn, device, warmup, repeats):
        modes.append(torch.is_inference_mode_enabled())
        return 1.0

    monkeypatch.setattr(benchmark, "median_ms", record)
    benchmark.run("mini", "cpu", "fp32", warmup=0, repeats=1)
    assert len(modes) == 9 and all(modes)     # 6 stages, batch 1 and 8, the yardstick: no autograd graph timed
