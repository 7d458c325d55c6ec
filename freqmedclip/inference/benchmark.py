"""Inference benchmark: pyramid shapes, parameter counts, per-stage and end-to-end latency, peak memory.

    python -m freqmedclip.inference.benchmark --preset {mini,full} --device {cpu,cuda} --dtype {fp32,bf16} --json PATH
        [--top-ops N] [--cast-weights-once]

Beside its own times it times a plain timm ViT-B/16 forward in the same run and dtype and prints the ratio
(the project's speed targets are ratios to it). The backbone has random weights (latency does not depend on weight
values, and the full BiomedCLIP cannot be downloaded everywhere). Timings are medians after warm-up (oneDNN builds
its bf16 kernels on the first calls). End-to-end latency uses cached text features, as the Predictor does for a
repeated prompt; the text stage is timed uncached. Under autocast both our model and the yardstick cast their fp32
weights again on every call; ``--cast-weights-once`` times both without that cost.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from freqmedclip.inference.checkpoint import atomic_write
from freqmedclip.modeling.config import FreqMedCLIPConfig
from freqmedclip.modeling.backbone import plain_vit_b16
from freqmedclip.modeling.model import build_model, parameter_report
from freqmedclip.inference import precision
from freqmedclip.inference.precision import autocast


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA kernels, so wall-clock timings cover them; a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory window (CUDA allocator stats, or this process's peak RSS via
    /proc/self/clear_refs on Linux >= 4.0); False when the CPU peak cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory since the last reset, in MiB, and what was measured."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max_memory_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, "process peak RSS"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def write_json(path: Path, result: dict) -> None:
    """Write a benchmark's result dict to ``path`` (atomically; parent folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def profile_top_ops(fn: Callable[[], object], calls: int, count: int) -> list[dict]:
    """The ``count`` ops with the most self CPU time over ``calls`` calls of ``fn`` (torch.profiler): per call of
    ``fn``, each op's self time (ms), its share of all ops' self time and how often it ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(calls):
            fn()
    events = sorted(profile.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1000 / calls, 2),
             "share": round(e.self_cpu_time_total / total, 3), "calls": e.count // calls} for e in events[:count]]


@torch.inference_mode()
def run(preset: str, device_str: str, dtype: str, warmup: int = 5, repeats: int = 20, cast_once: bool = False,
        profile_ops: int = 0) -> dict:
    """Time the stages, the end-to-end forward and the ViT-B/16 yardstick. ``cast_once``: cast the frozen ViT's and
    the yardstick's linear and convolution weights to ``dtype`` once instead of on every autocast call (checked to
    leave the logits bit-identical); ``profile_ops``: also list that many top ops of the end-to-end forward."""
    device = torch.device(device_str)
    dtype = precision.resolve(dtype, device)
    config = FreqMedCLIPConfig.from_preset(preset, frequency_weights="none")
    model = build_model(config, random_backbone=True, device=device).eval()
    prompt = ["enhancing tumour in the left hemisphere"]
    image1 = torch.rand(1, 3, config.image_size, config.image_size, device=device)
    image8 = torch.rand(8, 3, config.image_size, config.image_size, device=device)
    if device.type == "cuda":
        reset_peak_memory(device)  # CUDA: memory of inference; CPU: the process's lifetime peak RSS

    with autocast(device, dtype):
        cast = {"layers": 0, "logits_identical": None}
        if cast_once and dtype != "fp32":
            # only the frozen ViT: the text encoder runs in fp32 with autocast off (text.TextEncoder)
            before = model(image1, prompt).logits
            cast["layers"] = precision.cast_weights_once(model.semantic.trunk, dtype)
            cast["logits_identical"] = bool(torch.equal(model(image1, prompt).logits, before))
        text = model.text(prompt)
        x = (image1 - model.pixel_mean) / model.pixel_std
        s1, s2, s3, s4 = model.semantic(x, text)
        f_stem, f1, f2, f3 = model.frequency(x)
        condition = text.pooled
        d_s, d_f, _, _ = model.fusion(s1, f3, condition)
        l_s = model.semantic_decoder(d_s, (s2, s3, s4), condition)
        l_f = model.frequency_decoder(d_f, (f2, f1, f_stem), condition)
        branches = torch.cat([l_s, l_f], 1)

        def text_uncached() -> None:
            model.text._cache.clear()
            model.text(prompt)

        stages = {
            "text": text_uncached,
            "semantic": lambda: model.semantic(x, text),
            "frequency": lambda: model.frequency(x),
            "ffbi": lambda: model.fusion(s1, f3, condition),
            "decoders": lambda: (model.semantic_decoder(d_s, (s2, s3, s4), condition),
                                 model.frequency_decoder(d_f, (f2, f1, f_stem), condition)),
            "head": lambda: model.head(branches),
        }
        latency = {name: median_ms(fn, device, warmup, repeats) for name, fn in stages.items()}
        model.text(prompt)
        latency["end_to_end_bs1"] = median_ms(lambda: model(image1, prompt), device, warmup, repeats)
        latency["end_to_end_bs8"] = median_ms(lambda: model(image8, prompt * 8), device, 2, max(3, repeats // 4)) / 8
        # the yardstick, in the same run, dtype and autocast: a ratio survives a change of machine, a time does not
        ops = profile_top_ops(lambda: model(image1, prompt), 5, profile_ops) if profile_ops else []
        vit = plain_vit_b16().to(device).eval()
        if cast["layers"]:
            cast["yardstick_layers"] = precision.cast_weights_once(vit, dtype)
        latency["vit_b16_bs1"] = median_ms(lambda: vit(image1), device, warmup, repeats)
        del vit

    shapes = {name: list(t.shape[1:]) for name, t in
              dict(s1=s1, s2=s2, s3=s3, s4=s4, f_stem=f_stem, f1=f1, f2=f2, f3=f3).items()}
    peak_mb, memory_kind = peak_memory_mb(device)
    return {
        "preset": preset,
        "device": device_name(device),
        "dtype": dtype,
        "cpu_bf16_instructions": precision.cpu_has_fast_bf16(),
        "torch": torch.__version__,
        "shapes": shapes,
        "params": parameter_report(model),
        "latency_ms": {k: round(v, 2) for k, v in latency.items()},
        "end_to_end_bs1_over_vit_b16": round(latency["end_to_end_bs1"] / latency["vit_b16_bs1"], 3),
        "weights_cast_once": cast,
        "top_ops_end_to_end": ops,
        "peak_memory_mb": round(peak_mb, 1),
        "peak_memory_kind": memory_kind,
    }


def format_report(result: dict) -> str:
    lines = [f"FreqMedCLIP-{result['preset']} on {result['device']} ({result['dtype']}, torch {result['torch']})",
             "shapes [C, H, W]:"]
    lines += [f"  {name:7s} {shape}" for name, shape in result["shapes"].items()]
    lines.append("parameters:            total   trainable      frozen")
    lines += [f"  {r['module']:28s} {r['total']:>11,} {r['trainable']:>11,} {r['frozen']:>11,}"
              for r in result["params"]]
    lines.append("latency (ms, median; end_to_end per image):")
    lines += [f"  {name:16s} {value:9.2f}" for name, value in result["latency_ms"].items()]
    lines.append(f"end-to-end at batch 1 / plain timm ViT-B/16 forward (same dtype, same run): "
                 f"{result['end_to_end_bs1_over_vit_b16']:.3f}x")
    cast = result["weights_cast_once"]
    if cast["layers"]:
        lines.append(f"weights cast to {result['dtype']} once: {cast['layers']} layers of the frozen ViT (logits "
                     f"bit-identical: {cast['logits_identical']}), {cast['yardstick_layers']} of the yardstick")
    if result["top_ops_end_to_end"]:
        lines.append("top ops of the end-to-end forward (self CPU time per forward):")
        lines += [f"  {o['op'][:48]:48s} {o['self_ms']:8.2f} ms {100 * o['share']:5.1f} %"
                  for o in result["top_ops_end_to_end"]]
    lines.append(f"peak memory: {result['peak_memory_mb']:.0f} MB ({result['peak_memory_kind']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("mini", "full"), default="mini")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="auto: bf16 on CUDA and on CPUs with AMX/AVX512-BF16, else fp32")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cast-weights-once", action="store_true",
                        help="cast the frozen ViT's and the yardstick's linear/conv weights to the dtype once "
                             "instead of on every autocast call (bf16/fp16 only; logits checked bit-identical)")
    parser.add_argument("--top-ops", type=int, default=0, metavar="N",
                        help="also list the N ops with the most self CPU time in the end-to-end forward")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    result = run(args.preset, args.device, args.dtype, args.warmup, args.repeats, args.cast_weights_once,
                 args.top_ops)
    print(format_report(result))
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
