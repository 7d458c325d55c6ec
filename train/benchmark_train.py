"""Training throughput: forward + backward + AdamW step of FreqMedCLIP on random data, after warm-up.

    python -m train.benchmark_train --preset mini|full --device cpu|cuda --dtype fp32|bf16 [--batch-size 8]
        [--variant full] [--channels-last] [--compile] [--warmup 3] [--steps 10] [--breakdown] --json PATH

``--breakdown`` also times each stage of a step on its own (forward, then backward of a random linear function of
its outputs, the way the loss reaches it) and lists the step's most expensive ops (torch.profiler), so the README's
profile can be reproduced: the stages' sum is close to the step, the rest is the loss and Python overhead.

The CLIP backbone has random weights (speed does not depend on weight values; the full BiomedCLIP is not on every
machine) and stays frozen, as in training; only the trainable modules get gradients and optimizer state. Prompts are
encoded once before timing, as ``train/train.py`` does for its frozen text tower, so the compiled graph holds no
tokenizer. Each step is timed on the wall clock (CUDA synchronised); the report gives the median step, images/s
(= batch size / median step) and peak memory: CUDA ``max_memory_allocated`` since the model was built, or the
process's peak resident set on CPU. The first steps are slow (oneDNN/cuDNN kernel selection, compilation) and are
excluded by ``--warmup``. On CPUs without AMX/AVX512-BF16, bf16 autocast is slower than fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from freqmedclip.inference.benchmark import device_name, peak_memory_mb, profile_top_ops, synchronize, write_json
from freqmedclip.modeling.config import VARIANTS, FreqMedCLIPConfig
from freqmedclip.modeling.losses import segmentation_loss
from freqmedclip.modeling.model import build_model
from freqmedclip.inference.precision import autocast

PROMPTS = ("whole tumour", "enhancing tumour", "peritumoral oedema", "tumour core", "breast mass",
           "spiculated breast lesion", "lung nodule", "pulmonary nodule on chest CT")


def random_batch(batch_size: int, image_size: int, device: torch.device, generator: torch.Generator,
                 channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, S, S) in [0, 1] and masks (B, 1, S, S) of random discs (some empty, as negative prompts)."""
    images = torch.rand(batch_size, 3, image_size, image_size, generator=generator)
    rows, cols = torch.meshgrid(torch.arange(image_size), torch.arange(image_size), indexing="ij")
    centres = torch.rand(batch_size, 2, generator=generator) * image_size
    radii = torch.rand(batch_size, generator=generator) * image_size / 6 * (torch.arange(batch_size) % 4 != 3)
    masks = ((rows - centres[:, :1, None]) ** 2 + (cols - centres[:, 1:, None]) ** 2 < radii[:, None, None] ** 2)
    images, masks = images.to(device), masks[:, None].float().to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, masks


def run(preset: str, variant: str, device_str: str, dtype: str, batch_size: int, channels_last: bool = False,
        compile_model: bool = False, warmup: int = 3, steps: int = 10) -> dict[str, Any]:
    """Benchmark one configuration; returns the report as a dict (see module docstring)."""
    device = torch.device(device_str)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True          # constant shapes: pick the fastest conv algorithms once
    config = FreqMedCLIPConfig.from_preset(preset, variant, frequency_weights="none")
    model = build_model(config, random_backbone=True, device=device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01, fused=True)
    generator = torch.Generator().manual_seed(0)
    images, masks = random_batch(batch_size, config.image_size, device, generator, channels_last)
    text = model.text([PROMPTS[i % len(PROMPTS)] for i in range(batch_size)])    # frozen tower: encoded once
    forward = torch.compile(model) if compile_model else model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            output = forward(images, text)
        loss = segmentation_loss(output, masks, **config.loss_settings).total
        loss.backward()
        optimizer.step()
        return loss.item()

    losses = [step() for _ in range(warmup)]
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step())                       # .item() synchronises; synchronize covers the optimizer kernels
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak_mb, memory_kind = peak_memory_mb(device)
    median = statistics.median(times)
    return {
        "preset": preset, "variant": variant, "device": device_name(device), "dtype": dtype,
        "batch_size": batch_size, "channels_last": channels_last, "compile": compile_model,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "trainable_params": sum(p.numel() for p in trainable),
        "warmup_steps": warmup, "timed_steps": steps,
        "step_ms_median": round(median * 1000, 2), "step_ms_mean": round(statistics.fmean(times) * 1000, 2),
        "step_ms_sd": round(statistics.stdev(times) * 1000, 2) if len(times) > 1 else 0.0,
        "images_per_s": round(batch_size / median, 3),
        "peak_memory_mb": round(peak_mb, 1), "peak_memory_kind": memory_kind,
        "loss_first": losses[0], "loss_last": losses[-1],
    }


def _timed(fn, repeats: int) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls (after one untimed call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def breakdown(preset: str, variant: str, dtype: str, batch_size: int, repeats: int = 5,
              top_ops: int = 8) -> dict[str, Any]:
    """Per-stage forward / backward time (ms) of one training step, each stage run alone, plus the top ops.

    Each stage's backward starts from a fixed random cotangent on its outputs; inputs that carry a gradient in the
    real step (the decoders' features) carry one here too, so every stage pays for exactly the work it does there.
    """
    device = torch.device("cpu")
    torch.manual_seed(0)
    config = FreqMedCLIPConfig.from_preset(preset, variant, frequency_weights="none")
    model = build_model(config, random_backbone=True, device=device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01, fused=True)
    images, masks = random_batch(batch_size, config.image_size, device, torch.Generator().manual_seed(0), False)
    text = model.text([PROMPTS[i % len(PROMPTS)] for i in range(batch_size)])
    x = (images - model.pixel_mean) / model.pixel_std

    def stage(run_forward) -> dict[str, float]:
        outputs = run_forward()
        cotangents = [torch.randn_like(o) for o in outputs]

        def forward_only() -> None:
            with autocast(device, dtype):
                run_forward()

        def forward_backward() -> None:
            with autocast(device, dtype):
                outs = run_forward()
            torch.autograd.backward([o.float() for o in outs], cotangents)

        forward_ms = _timed(forward_only, repeats) * 1000
        total_ms = _timed(forward_backward, repeats) * 1000
        model.zero_grad(set_to_none=True)
        return {"forward_ms": round(forward_ms, 1), "backward_ms": round(total_ms - forward_ms, 1)}

    stages: dict[str, dict[str, float]] = {}
    with torch.no_grad(), autocast(device, dtype):
        features = model.encode(images, text)
    if model.semantic is not None:
        stages["semantic stream (frozen ViT + TCA + FPN)"] = stage(lambda: model.semantic(x, text))
    if model.frequency is not None:
        stages["frequency stream (Haar + ConvNeXt)"] = stage(lambda: model.frequency(x))
    leaves = type(features)(*(None if f is None or isinstance(f, Tensor) else tuple(m.float().requires_grad_()
                                                                                   for m in f)
                              for f in features[:2]), features.condition)
    stages["FFBI + decoders + fusion head"] = stage(lambda: [o for o in model.decode(leaves)[:3] if o is not None])

    def optimizer_step() -> None:
        for p in trainable:
            p.grad = torch.zeros_like(p)
        optimizer.step()

    stages["AdamW step"] = {"forward_ms": 0.0, "backward_ms": 0.0,
                            "step_ms": round(_timed(optimizer_step, repeats) * 1000, 1)}
    optimizer.zero_grad(set_to_none=True)

    def training_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            output = model(images, text)
        segmentation_loss(output, masks, **config.loss_settings).total.backward()
        optimizer.step()

    step_ms = _timed(training_step, repeats) * 1000
    return {"preset": preset, "variant": variant, "dtype": dtype, "batch_size": batch_size,
            "device": device_name(device), "threads": torch.get_num_threads(), "step_ms": round(step_ms, 1),
            "stages": stages,
            "top_ops": profile_top_ops(training_step, 1, top_ops)}


def print_breakdown(report: dict[str, Any]) -> None:
    print(f"one training step, {report['preset']}/{report['variant']}, batch {report['batch_size']}, {report['dtype']},"
          f" {report['device']}: {report['step_ms']:.0f} ms")
    for name, row in report["stages"].items():
        extra = f"  step {row['step_ms']:7.1f} ms" if "step_ms" in row else ""
        print(f"  {name:44s} forward {row['forward_ms']:7.1f} ms  backward {row['backward_ms']:7.1f} ms{extra}")
    print("  most expensive ops (self time, one profiled step):")
    for op in report["top_ops"]:
        print(f"    {op['op']:40s} {op['self_ms']:8.1f} ms  {op['share']:6.1%}  ({op['calls']} calls)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("mini", "full"), default="mini")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="full")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (compilation is warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--breakdown", action="store_true", help="time each stage alone and list the top ops (CPU)")
    parser.add_argument("--json", type=Path, help="also write the report to this JSON file")
    args = parser.parse_args(argv)
    if args.breakdown:
        report = breakdown(args.preset, args.variant, args.dtype, args.batch_size, repeats=args.steps)
        print_breakdown(report)
        if args.json:
            write_json(args.json, report)
        return report
    result = run(args.preset, args.variant, args.device, args.dtype, args.batch_size, args.channels_last,
                 args.compile, args.warmup, args.steps)
    print(f"FreqMedCLIP-{result['preset']} ({result['variant']}) training on {result['device']}, {result['dtype']}, "
          f"batch {result['batch_size']}{', channels_last' if args.channels_last else ''}"
          f"{', compiled' if args.compile else ''}: {result['step_ms_median']:.1f} ms/step (median of "
          f"{result['timed_steps']}), {result['images_per_s']:.2f} images/s, peak {result['peak_memory_mb']:.0f} MiB "
          f"({result['peak_memory_kind']})")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
