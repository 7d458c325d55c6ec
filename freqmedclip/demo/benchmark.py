"""Speed of one full demo update: prediction, both Grad-CAMs, sub-bands and a 4-prompt sensitivity run.

    python -m freqmedclip.demo.benchmark [--members 1 3] [--dtype fp32|bf16] [--device cpu|cuda] [--threads N]
                                         [--repeats 10] [--checkpoint DIR ...]

Without ``--checkpoint`` the mini preset is built with random weights (speed does not depend on the values).
One update = ``DemoSession.update`` on a 224x224 example with the main prompt, 4 workbench prompts and the
control (one batched forward), Grad-CAM of both streams per member, sub-bands, rendering and the PNG export.
Reports the median and 90th percentile after warm-up, per-stage medians, the thread count and the machine's
load average (the numbers mean little on a loaded machine).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from freqmedclip.demo.session import DemoSession, load_session
from freqmedclip.demo.uploads import load_upload
from freqmedclip.inference import Predictor, random_ensemble

EXAMPLE = Path(__file__).resolve().parents[2] / "assets" / "examples" / "brain_whole_tumour.png"
PROMPT = "whole tumour"
WORKBENCH = ("whole tumour", "tumour core", "lesion", "normal tissue")


def random_session(members: int, dtype: str, device: str = "cpu") -> DemoSession:
    """A session over ``members`` randomly initialised mini models sharing one backbone."""
    return DemoSession(Predictor(random_ensemble(members, "mini", device), device=device, dtype=dtype))


def benchmark(session: DemoSession, image: Path, warmup: int, repeats: int) -> dict:
    """Median / p90 of full updates (ms) and per-stage medians."""
    loaded = load_upload(image)
    runs = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        panels = session.update(loaded, PROMPT, workbench_prompts=WORKBENCH)
        elapsed = (time.perf_counter() - start) * 1000
        if i >= warmup:
            runs.append((elapsed, panels.timings_ms))
    totals = [total for total, _ in runs]
    stages = {name: statistics.median(t[name] for _, t in runs) for name in runs[0][1] if name != "total"}
    return {"members": session.n_members, "median_ms": statistics.median(totals),
            "p90_ms": float(np.percentile(totals, 90)), "stages_ms": stages}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[1, 3], help="ensemble sizes to time")
    parser.add_argument("--checkpoint", nargs="+", default=None, help="time these checkpoints instead")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--image", type=Path, default=EXAMPLE)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with Image.open(args.image) as image:
        size = image.size
    load = os.getloadavg()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.dtype}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"one update = prediction + uncertainty + Grad-CAM (both streams) + sub-bands + {len(WORKBENCH)}-prompt "
          f"workbench with control + rendering + PNG export, on {args.image.name} ({size[0]}x{size[1]})")
    sessions = ([load_session(args.checkpoint, device=args.device, dtype=args.dtype)] if args.checkpoint
                else [random_session(m, args.dtype, args.device) for m in args.members])
    results = []
    for session in sessions:
        result = benchmark(session, args.image, args.warmup, args.repeats)
        stages = ", ".join(f"{k} {v:.0f}" for k, v in result["stages_ms"].items())
        print(f"{result['members']} member(s): median {result['median_ms']:.0f} ms, p90 {result['p90_ms']:.0f} ms "
              f"({stages} ms)")
        results.append(result)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return results


if __name__ == "__main__":
    main()
