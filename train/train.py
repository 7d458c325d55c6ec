"""Train FreqMedCLIP (paper Section 4, Table 2): one trainer for every preset, variant and baseline.

    python -m train.train --config train/configs/mini.yaml                         # CPU or one GPU
    python -m train.train --config train/configs/mini_no_ffbi.yaml --epochs 5      # flags override the YAML
    torchrun --standalone --nproc_per_node 4 -m train.train --config train/configs/full.yaml
    torchrun --nnodes 2 --node-rank R --rdzv-endpoint HOST:29500 --nproc_per_node 4 -m train.train ...

Notable choices:
* A YAML file only sets argparse defaults; the resolved arguments are saved to ``<run-dir>/args.yaml``.
* ``--batch-size`` is per process: the effective batch is batch_size x world_size x grad_accum (Table 2:
  4 x 4 GPUs x 2). Gradients are all-reduced on the last micro-step only (``no_sync``).
* Rerunning the same command resumes from ``<run-dir>/latest`` at epoch granularity (weights, optimizer,
  scheduler, scaler, sampler epoch, every rank's RNG, best Dice, patience); progress inside an interrupted
  epoch is discarded; a finished run returns at once, before its model is built. Nothing is pickled: tensors
  go to safetensors, the rest to JSON, and a checkpoint directory is written beside its target and swapped in,
  so a kill -9 never leaves a torn one (``train/state.py``). Multi-node runs need ``--run-dir`` on a shared filesystem.
* The text tower is frozen; the model caches each prompt's features (encoded alone, in fp32, so they never
  depend on batch composition) and every prompt is encoded once before training starts.
* Validation: Dice of the thresholded fused mask per record (both empty = 1, as ``freqmedclip.evaluation.metrics``),
  averaged per dataset; model selection and early stopping use the mean over datasets. Records are grouped by
  image, so each image's prompt-independent features are computed once (``ImageGroups``). Under DDP each rank
  takes a strided, unpadded share of the images and the sums are all-reduced: no record counts twice.
* A non-finite loss skips its optimizer step on every rank; ``--nonfinite-patience`` consecutive ones stop
  the run and leave the last good checkpoint untouched.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from freqmedclip.modeling.backbone import BackboneNotFoundError, ClipBackbone, resolve_backbone_files, sha256_file
from freqmedclip.inference.checkpoint import WEIGHTS, atomic_write, code_version, read_checkpoint_header, save_checkpoint
from freqmedclip.inference import precision
from freqmedclip.modeling.config import PRESETS, VARIANTS, FreqMedCLIPConfig
from freqmedclip.data.dataset import UNRELATED_TRAIN_PROMPTS, SegmentationDataset, sampling_weights
from freqmedclip.modeling.losses import segmentation_loss
from freqmedclip.evaluation.metrics import dice
from freqmedclip.modeling.model import FreqMedCLIP, build_model, parameter_report
from freqmedclip.inference.precision import autocast
from train import distributed, state

LOSS_TERMS = ("loss", "dice", "bce", "semantic_dice", "frequency_dice")
# Arguments that change what a run computes: resuming a run directory with other values is refused.
RESUME_ARGS = ("data", "datasets", "balanced", "augment", "unrelated_prompts", "seed", "batch_size", "grad_accum",
               "lr", "warmup_steps", "weight_decay", "t_max", "bce_weight", "bce_pos_weight", "alpha", "beta",
               "branch_bce", "clip_grad")


# ------------------------------------------------------------------------------------------------------- args
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file whose keys set the defaults of the flags below")
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="data/phantoms", help="dataset root (manifest.jsonl, images/, masks/)")
    data.add_argument("--datasets", nargs="+", default=None, help="train and validate on these datasets only")
    data.add_argument("--balanced", action=argparse.BooleanOptionalAction, default=True,
                      help="draw every (dataset, positive/negative) group equally often")
    data.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                      help="paired flips/rotation/scale + intensity jitter on train items")
    data.add_argument("--unrelated-prompts", type=float, default=0.0, metavar="P",
                      help="share of train items whose prompt is replaced by an unrelated phrase (target emptied)")
    model = parser.add_argument_group("model")
    model.add_argument("--preset", default="mini", help=f"one of {list(PRESETS)}")
    model.add_argument("--variant", default="full", help=f"one of {list(VARIANTS)}")
    model.add_argument("--backbone", default=None, help="override config.backbone: local-dir:PATH | hf-hub:ID")
    model.add_argument("--random-backbone", action="store_true", help="random CLIP weights (tests only)")
    model.add_argument("--frequency-weights", default=None, help="override config.frequency_weights: auto|none|PATH")
    optim = parser.add_argument_group("optim (defaults: Table 2)")
    optim.add_argument("--epochs", type=int, default=100, help="maximum")
    optim.add_argument("--batch-size", type=int, default=4, help="per process")
    optim.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    optim.add_argument("--lr", type=float, default=1e-4, help="AdamW, trainable parameters only")
    optim.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's default (not in the paper)")
    optim.add_argument("--t-max", type=int, default=100, help="cosine period, in epochs (the schedule moves per step)")
    optim.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up, optimizer steps")
    optim.add_argument("--patience", type=int, default=10, help="validations without a better Dice (0: never stop)")
    optim.add_argument("--bce-weight", type=float, default=1.0, help="lambda")
    optim.add_argument("--bce-pos-weight", type=float, default=1.0,
                       help="weight of target pixels in every BCE (tiny targets: 1 lets the model answer empty)")
    optim.add_argument("--alpha", type=float, default=0.4, help="semantic branch Dice weight")
    optim.add_argument("--beta", type=float, default=0.4, help="frequency branch Dice weight")
    optim.add_argument("--branch-bce", action=argparse.BooleanOptionalAction, default=False,
                       help="also lambda * BCE on each branch (keeps a branch from going silent)")
    optim.add_argument("--amp", default="none", help=f"autocast dtype, one of {list(precision.CHOICES)} "
                       "(auto: bf16 on CUDA and on CPUs with AMX/AVX512-BF16, else fp32)")
    optim.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm (0: no clipping)")
    system = parser.add_argument_group("system")
    system.add_argument("--workers", type=int, default=2, help="DataLoader worker processes per rank")
    system.add_argument("--seed", type=int, default=0, help="rank r seeds with seed * world_size + r")
    system.add_argument("--run-dir", default=None, help="default: runs/<config name>")
    system.add_argument("--max-steps", type=int, default=0, help="optimizer steps per epoch (0: all; smoke tests)")
    system.add_argument("--val-every", type=int, default=1, help="validate every N epochs (and after the last)")
    system.add_argument("--val-images-per-dataset", type=int, default=0, metavar="N",
                        help="validate on N evenly spaced images of each dataset (0: every image)")
    system.add_argument("--nonfinite-patience", type=int, default=3, help="consecutive non-finite steps to stop")
    system.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (torchrun: LOCAL_RANK's GPU)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    config_parser = argparse.ArgumentParser(add_help=False)  # first pass: find --config (timm's two-pass parse)
    config_parser.add_argument("--config", default=None)
    known, _ = config_parser.parse_known_args(argv)
    parser = build_parser()
    if known.config:
        defaults = {k.replace("-", "_"): v for k, v in (yaml.safe_load(Path(known.config).read_text()) or {}).items()}
        unknown = sorted(set(defaults) - set(vars(parser.parse_args([]))))
        if unknown:
            parser.error(f"{known.config}: unknown keys {unknown}")
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    for name, allowed in (("preset", PRESETS), ("variant", VARIANTS), ("amp", precision.CHOICES)):
        if getattr(args, name) not in allowed:
            parser.error(f"--{name} {getattr(args, name)!r}: expected one of {list(allowed)}")
    if args.run_dir is None:
        name = Path(args.config).stem if args.config else f"{args.preset}-{args.variant}"
        args.run_dir = str(Path("runs") / f"{name}-seed{args.seed}")
    return args


# ------------------------------------------------------------------------------------------------------- model, data
def model_config(args: argparse.Namespace) -> FreqMedCLIPConfig:
    """The config of the model named by the args."""
    overrides = {k: v for k, v in (("backbone", args.backbone), ("frequency_weights", args.frequency_weights)) if v}
    return FreqMedCLIPConfig.from_preset(args.preset, args.variant, bce_weight=args.bce_weight,
                                         semantic_aux_weight=args.alpha, frequency_aux_weight=args.beta,
                                         branch_bce=args.branch_bce, bce_pos_weight=args.bce_pos_weight, **overrides)


def make_model(args: argparse.Namespace, backbone: ClipBackbone | None = None) -> FreqMedCLIP:
    """The model named by the args; ``backbone`` shares an already loaded CLIP (tests)."""
    return build_model(model_config(args), backbone, random_backbone=args.random_backbone and backbone is None)


class DistributedWeightedSampler(Sampler[int]):
    """Balanced sampling under DDP: one weighted draw (with replacement) over the whole dataset per epoch from a
    generator seeded from (seed, epoch), sharded rank::world, so the ranks together see one balanced epoch."""

    def __init__(self, weights: Tensor, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        self.weights, self.num_replicas, self.rank, self.seed = weights.double(), num_replicas, rank, seed
        self.epoch = 0
        self.num_samples = math.ceil(len(weights) / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)  # seeds never share epochs
        draw = torch.multinomial(self.weights, self.num_samples * self.num_replicas, True, generator=generator)
        return iter(draw[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


def lr_factor(step: int, steps_per_epoch: int, t_max: int, warmup_steps: int) -> float:
    """Learning rate of optimizer step ``step`` over the base: a linear warm-up over ``warmup_steps``, times a
    cosine from 1 to 0 over ``t_max`` epochs (held at 0 after)."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    progress = min(step / (steps_per_epoch * t_max), 1.0)
    return warm * 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------------- resume
def resume(directory: Path, args: argparse.Namespace, model: FreqMedCLIP, optimizer: torch.optim.Optimizer,
           scheduler: Any, scaler: torch.amp.GradScaler) -> dict[str, Any]:
    """Load weights, optimizer, scheduler and scaler from ``directory``; return its train state."""
    header = read_checkpoint_header(directory)
    saved_config, config = FreqMedCLIPConfig.from_dict(header["config"]).to_dict(), model.config.to_dict()
    changed = sorted(k for k in config if config[k] != saved_config[k])
    if changed:
        raise SystemExit(f"{directory} holds a model with other {changed}; use another --run-dir")
    if model.backbone_sha256 == "random" or header["backbone"]["sha256"] != model.backbone_sha256:
        raise SystemExit(f"{directory} was trained with the CLIP backbone {header['backbone']['source']}, not "
                         f"{model.backbone_source} (a --random-backbone run cannot resume: its backbone is not saved)")
    saved_args = header["metadata"].get("args", {})
    differing = sorted(k for k in RESUME_ARGS if k in saved_args and saved_args[k] != getattr(args, k))
    if differing:
        raise SystemExit(f"{directory} was trained with other {differing} "
                         f"({', '.join(f'{k}={saved_args[k]!r}' for k in differing)}); use another --run-dir")
    saved = state.load_train_state(directory)
    device = next(model.parameters()).device
    weights = load_file(str(directory / WEIGHTS), device=str(device))
    if weights.keys() != model.trainable_state_dict().keys():
        raise SystemExit(f"{directory / WEIGHTS} does not match this model's trainable weights")
    model.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler.is_enabled() and saved["scaler"]:
        scaler.load_state_dict(saved["scaler"])
    return saved


# ------------------------------------------------------------------------------------------------------- report
class ImageGroups(Dataset):
    """Validation records grouped by image: one item holds every prompt asked of one image.

    The model sees the image once, expanded over its prompts (stride 0), so the prompt-independent work (the whole
    frequency stream and the ViT blocks before the first adapter) runs once per image instead of once per record,
    exactly as ``Predictor`` does. Item: {"image": (3, S, S), "mask": (k, 1, S, S), "prompt": k strings,
    "dataset": k names}.
    """

    def __init__(self, dataset: SegmentationDataset, groups: Sequence[Sequence[int]]) -> None:
        self.dataset, self.groups = dataset, [list(g) for g in groups]

    @classmethod
    def of(cls, dataset: SegmentationDataset, rank: int = 0, world: int = 1, max_prompts: int = 0,
           images_per_dataset: int = 0) -> ImageGroups:
        """This rank's strided share of the images (every record exactly once over all ranks, none padded); an
        image with more than ``max_prompts`` records (0: no limit) is split into items of at most that many.
        ``images_per_dataset`` (0: all) keeps that many images of each dataset, evenly spaced in manifest order
        (converters write a patient's images together, so the subset still spans the patients); fixed, so every
        validation of a run, and every run, scores the same records."""
        by_image: dict[str, list[int]] = {}
        for index, record in enumerate(dataset.records):
            by_image.setdefault(record.image, []).append(index)
        if images_per_dataset > 0:
            by_dataset: dict[str, list[str]] = {}
            for image, indices in by_image.items():
                by_dataset.setdefault(dataset.records[indices[0]].dataset, []).append(image)
            kept = {images[round(i * len(images) / count)] for images in by_dataset.values()
                    for count in [min(images_per_dataset, len(images))] for i in range(count)}
            by_image = {image: indices for image, indices in by_image.items() if image in kept}
        size = max_prompts if max_prompts > 0 else len(dataset)
        groups = [g[i:i + size] for g in by_image.values() for i in range(0, len(g), size)]
        return cls(dataset, groups[rank::world])

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict[str, Any]:
        items = [self.dataset[i] for i in self.groups[index]]
        return {"image": items[0]["image"], "mask": torch.stack([item["mask"] for item in items]),
                "prompt": [item["prompt"] for item in items], "dataset": [item["dataset"] for item in items]}


@torch.no_grad()
def evaluate(model: FreqMedCLIP, groups: DataLoader, names: list[str], device: torch.device, amp: str) -> dict:
    """Validation, sums all-reduced over ranks: mean Dice of the thresholded fused mask (logit > 0) over the
    records whose target is present, per dataset (what selects ``best/``), and the share of absent-target records
    predicted (nearly) empty, under 1 % of the image (reported; an empty prediction must not score as Dice 1).

    ``groups`` yields :class:`ImageGroups` items (one image and all its prompts per item)."""
    model.eval()
    sums = torch.zeros(len(names), 4, dtype=torch.float64)  # (datasets, [Dice sum, positives, empty, negatives])
    for group in groups:
        image = group["image"].to(device)[None].expand(len(group["prompt"]), -1, -1, -1)  # (k, 3, S, S), shared
        with autocast(device, amp):
            logits = model(image, group["prompt"]).logits                                   # (k, 1, S, S)
        for pred, gt, name in zip((logits > 0)[:, 0].cpu().numpy(), group["mask"][:, 0].numpy() > 0.5,
                                  group["dataset"]):
            row = [dice(pred, gt), 1.0, 0.0, 0.0] if gt.any() else [0.0, 0.0, float(pred.mean() < 0.01), 1.0]
            sums[names.index(name)] += torch.tensor(row, dtype=torch.float64)
    sums = distributed.all_reduce_sum(sums.to(device)).cpu()
    model.train()
    per_dataset = {n: (s[0] / s[1]).item() for n, s in zip(names, sums) if s[1] > 0}
    negatives = sums[:, 3].sum().item()
    return {"dice": sum(per_dataset.values()) / max(len(per_dataset), 1), "per_dataset": per_dataset,
            "negative_empty_rate": sums[:, 2].sum().item() / negatives if negatives else None,
            "count": {n: int(s[1] + s[3]) for n, s in zip(names, sums)}}


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """Train loss terms, val Dice (per dataset and mean) and learning rate against epochs, as a PNG."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(14, 3.8))
    axes = figure.subplots(1, 3)
    figure.subplots_adjust(left=0.05, right=0.98, bottom=0.14, wspace=0.25)
    for term in LOSS_TERMS:
        axes[0].plot([r["epoch"] for r in rows], [r["train"][term] for r in rows], label=term)
    validated = [r for r in rows if "val" in r]
    for name in sorted({n for r in validated for n in r["val"]["per_dataset"]}):
        points = [(r["epoch"], r["val"]["per_dataset"][name]) for r in validated if name in r["val"]["per_dataset"]]
        axes[1].plot(*zip(*points), marker=".", label=name)
    axes[1].plot([r["epoch"] for r in validated], [r["val"]["dice"] for r in validated], "k-", lw=2, label="mean")
    axes[2].plot([r["epoch"] for r in rows], [r["lr"] for r in rows])
    for ax, title in zip(axes, ("train loss", "val Dice", "learning rate")):
        ax.set(title=title, xlabel="epoch")
    for ax in axes[:2]:
        ax.legend(fontsize=7)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=80))


def make_logger(run_dir: Path, main: bool) -> logging.Logger:
    """DiT-style: rank 0 logs to stdout and <run-dir>/log.txt (appending across resumes); other ranks are silent."""
    logger = logging.getLogger("freqmedclip.train")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handlers = (logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "log.txt")) if main else ()
    for handler in handlers or (logging.NullHandler(),):
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
    return logger


# ------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train; returns {"best_dice", "best_epoch", "epochs_done", "stopped"} (on every rank)."""
    args = parse_args(argv)
    rank, _, world, device = distributed.setup(args.device)
    try:
        return train(args, ["python", "-m", "train.train", *(argv if argv is not None else sys.argv[1:])], rank,
                     world, device)
    finally:
        distributed.cleanup()


def train(args: argparse.Namespace, command: list[str], rank: int, world: int, device: torch.device) -> dict:
    """Set up, resume if ``<run-dir>/latest`` exists, then run the epochs; ``command`` goes into checkpoints."""
    finished = finished_run(args)
    if finished is not None:
        return finished
    run = set_up(args, command, rank, world, device)
    resume_or_seed(run)
    run.ddp = DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else run.model  # after resuming: DDP broadcasts rank 0's weights
    progress = run.progress
    for epoch in range(progress["epoch"], progress["epoch"] if progress["stopped"] else args.epochs):
        row = train_one_epoch(run, epoch)
        improved = validate(run, epoch, row)
        save_checkpoints(run, epoch, row, improved)
        log_epoch(run, row)
        if progress["stopped"]:
            run.log.info(progress["stopped"])
            break
    run.log.info("done: best val Dice %.4f at epoch %d; checkpoints in %s", progress["best_dice"],
                 progress["best_epoch"], run.run_dir)
    return run_result(progress)


def run_result(progress: dict[str, Any]) -> dict[str, Any]:
    """What ``main`` returns, from a run's progress (live, or as saved in ``latest/train_state.json``)."""
    return {"best_dice": progress["best_dice"], "best_epoch": progress["best_epoch"],
            "epochs_done": progress["epoch"], "stopped": progress["stopped"]}


@dataclass
class Run:
    """What the steps of one run share: made by ``set_up``, advanced by the other steps."""

    args: argparse.Namespace
    command: list[str]
    rank: int
    world: int
    device: torch.device
    log: logging.Logger
    model: FreqMedCLIP
    params: list[Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    amp: str
    scaler: torch.amp.GradScaler
    sampler: Any
    loader: DataLoader
    val_loader: DataLoader
    val_names: list[str]
    n_batches: int
    progress: dict[str, Any] = field(default_factory=lambda: {
        "epoch": 0, "step": 0, "best_dice": -1.0, "best_epoch": 0, "bad_validations": 0, "stopped": None})
    rows: list[dict[str, Any]] = field(default_factory=list)   # metrics.jsonl, one row per finished epoch
    ddp: Any = None                                             # the model, wrapped by DDP when world > 1
    nonfinite_streak: int = 0
    version: str = field(default_factory=code_version)

    @property
    def run_dir(self) -> Path:
        return Path(self.args.run_dir)

    @property
    def latest(self) -> Path:
        return self.run_dir / "latest"

    @property
    def main_rank(self) -> bool:
        return self.rank == 0


def set_up(args: argparse.Namespace, command: list[str], rank: int, world: int, device: torch.device) -> Run:
    """Run directory and logger, the model and its optimizer, the data loaders, and every prompt encoded once."""
    run_dir = Path(args.run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        state.recover(run_dir / "latest")
        state.recover(run_dir / "best")
        (run_dir / "args.yaml").write_text(yaml.safe_dump(vars(args), sort_keys=False))
    distributed.barrier()
    log = make_logger(run_dir, rank == 0)
    log.info("command: %s", " ".join(command))

    state.seed_everything(args.seed)  # identical initial weights on every rank
    model = make_model(args).to(device)
    log.info("backbone %s | frequency encoder initialised from %s", model.backbone_source, model.frequency_init)
    if args.preset == "full" and model.frequency_init == "random" and args.frequency_weights != "none":
        raise SystemExit("no ImageNet weights for the ConvNeXt-Tiny frequency encoder in the HuggingFace cache; fetch "
                         "them with `hf download timm/convnext_tiny.in12k_ft_in1k model.safetensors`, pass "
                         "--frequency-weights FILE, or --frequency-weights none to train it from scratch")
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for all parameters instead of a Python loop over them
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=True)
    amp = precision.resolve(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    for row in parameter_report(model):
        log.info("  %-28s total %10d  trainable %10d", row["module"], row["total"], row["trainable"])

    train_set = SegmentationDataset(args.data, "train", train=True, datasets=args.datasets, augment=args.augment,
                                    unrelated_prompts=args.unrelated_prompts)
    val_set = SegmentationDataset(args.data, "val", train=False, datasets=args.datasets)
    sampler = DistributedWeightedSampler(sampling_weights(train_set.records), world, rank, args.seed) \
        if args.balanced else DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train_set, args.batch_size, sampler=sampler, num_workers=args.workers,
                        pin_memory=device.type == "cuda")
    val_groups = ImageGroups.of(val_set, rank, world, max_prompts=args.batch_size,
                                images_per_dataset=args.val_images_per_dataset)
    val_loader = DataLoader(val_groups, batch_size=None, num_workers=args.workers)
    prompts = sorted({p for r in train_set.records + val_set.records for p in r.prompts}
                     | (set(UNRELATED_TRAIN_PROMPTS) if args.unrelated_prompts else set()))
    with torch.no_grad():
        for prompt in prompts:
            model.text([prompt])
    n_batches = len(loader) if args.max_steps <= 0 else min(len(loader), args.max_steps * args.grad_accum)
    steps_per_epoch = math.ceil(n_batches / args.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, args.t_max, args.warmup_steps))
    log.info("%s/%s on %s x %d in %s | train %d records, val %d (%d scored by this rank) | effective batch %d | "
             "%d steps/epoch | %d prompts", args.preset, args.variant, device, world, amp, len(train_set), len(val_set),
             sum(len(group) for group in val_groups.groups),
             args.batch_size * world * args.grad_accum, math.ceil(n_batches / args.grad_accum), len(prompts))
    return Run(args, command, rank, world, device, log, model, params, optimizer, scheduler, amp, scaler, sampler,
               loader, val_loader, sorted({r.dataset for r in val_set.records}), n_batches)


def finished_run(args: argparse.Namespace) -> dict[str, Any] | None:
    """The result of a run that ``<run-dir>/latest`` shows finished with these arguments, else None.

    Lets a recipe re-run skip a finished run in a second instead of building its model and data first (about a
    minute). Anything short of an exact match of the model config, the backbone's weights and the resume arguments
    returns None, so the full path resumes, or refuses with its own message."""
    latest = Path(args.run_dir) / "latest"
    if args.random_backbone or not (latest / "train_state.json").is_file() or not (latest / "config.json").is_file():
        return None
    progress = json.loads((latest / "train_state.json").read_text())
    if not (progress["stopped"] or progress["epoch"] >= args.epochs):
        return None
    header = read_checkpoint_header(latest)
    config = model_config(args)
    saved_args = header["metadata"].get("args", {})
    if (FreqMedCLIPConfig.from_dict(header["config"]) != config
            or any(saved_args.get(k) != getattr(args, k) for k in RESUME_ARGS)):
        return None
    try:
        _, weights, _ = resolve_backbone_files(config.backbone)
    except BackboneNotFoundError:
        return None
    if sha256_file(weights) != header["backbone"]["sha256"]:   # the backbone was rebuilt: train again
        return None
    why = progress["stopped"] or f"epoch {progress['epoch']} of {args.epochs}"
    print(f"{args.run_dir}: finished ({why}), best val Dice {progress['best_dice']:.4f} at epoch "
          f"{progress['best_epoch']}: nothing to do", flush=True)
    return run_result(progress)


def resume_or_seed(run: Run) -> None:
    """Continue from ``<run-dir>/latest`` when it exists (weights, optimizer, progress, RNG), else seed per rank."""
    args, progress, metrics_path = run.args, run.progress, run.run_dir / "metrics.jsonl"
    if (run.latest / "train_state.json").is_file():
        saved = resume(run.latest, args, run.model, run.optimizer, run.scheduler, run.scaler)
        progress.update({k: saved[k] for k in progress})
        if len(saved["rng"]) == run.world:
            state.set_rng_state(saved["rng"][run.rank])
        else:
            state.seed_everything(args.seed * run.world + run.rank + progress["epoch"])
            run.log.info("world size changed from %d to %d: RNG streams reseeded", len(saved["rng"]), run.world)
        run.log.info("resumed from %s after epoch %d (progress inside an interrupted epoch is discarded)%s",
                     run.latest, progress["epoch"],
                     f"; nothing to do: {progress['stopped']}" if progress["stopped"] else "")
    else:
        state.seed_everything(args.seed * run.world + run.rank)  # per-rank augmentation streams
    if len(set(distributed.all_gather_objects(progress["epoch"]))) > 1:
        raise SystemExit("ranks found different checkpoints: put --run-dir on a shared filesystem")
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.is_file() else []
    run.rows = [r for r in rows if r["epoch"] <= progress["epoch"]]  # drop rows of an epoch whose checkpoint was lost


def train_one_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """One pass of optimizer steps (grad accumulation, clipping, non-finite skip); returns the epoch's metrics row."""
    args, model, ddp, optimizer, scaler, device = run.args, run.model, run.ddp, run.optimizer, run.scaler, run.device
    run.sampler.set_epoch(epoch)
    ddp.train()
    totals = torch.zeros(len(LOSS_TERMS) + 3, device=device)     # loss terms, grad norm, steps, images
    window = torch.zeros(len(LOSS_TERMS) + 1, device=device)     # one step's loss terms + non-finite count
    start = time.perf_counter()
    n_batches = run.n_batches
    bar = tqdm(total=n_batches, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not run.main_rank, leave=False)
    for i, batch in zip(range(n_batches), run.loader):
        micro = min(args.grad_accum, n_batches - i // args.grad_accum * args.grad_accum)  # last step may be short
        last = (i + 1) % args.grad_accum == 0 or i + 1 == n_batches
        image, mask = batch["image"].to(device, non_blocking=True), batch["mask"].to(device, non_blocking=True)
        with ddp.no_sync() if run.world > 1 and not last else nullcontext():
            with autocast(device, run.amp):
                output = ddp(image, batch["prompt"])
            config = model.config
            terms = segmentation_loss(output, mask, **config.loss_settings)
            scaler.scale(terms.total / micro).backward()
        window += torch.stack([*(t.detach().float() for t in terms), (~torch.isfinite(terms.total)).float()])
        totals[-1] += len(image)
        bar.update()
        if not last:
            continue
        nonfinite = distributed.all_reduce_sum(window[-1:].clone()).item() > 0
        if not nonfinite:
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(run.params, args.clip_grad if args.clip_grad > 0 else math.inf)
            norm_finite = torch.isfinite(norm).item()
            nonfinite = not norm_finite and not scaler.is_enabled()  # fp16 overflow: scaler.step skips itself
        if nonfinite:
            optimizer.zero_grad(set_to_none=True)
            run.nonfinite_streak += 1
            run.log.warning("non-finite loss or gradient at epoch %d, batch %d: step skipped (%d in a row)",
                            epoch + 1, i + 1, run.nonfinite_streak)
            if run.nonfinite_streak >= args.nonfinite_patience:
                message = (f"stopped: {run.nonfinite_streak} consecutive non-finite steps (--nonfinite-patience "
                           f"{args.nonfinite_patience}); the last good checkpoint in {run.latest} is kept")
                run.log.error(message)
                raise SystemExit(message)
        else:
            scaler.step(optimizer)
            scaler.update()
            run.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            totals[:len(LOSS_TERMS)] += window[:-1] / micro
            totals[len(LOSS_TERMS)] += norm.float() if norm_finite else 0.0
            totals[-2] += 1
            run.progress["step"] += 1
            run.nonfinite_streak = 0
        window.zero_()
    bar.close()
    seconds = time.perf_counter() - start
    totals = distributed.all_reduce_sum(totals).tolist()
    steps = max(totals[-2], 1.0)
    row: dict[str, Any] = {"epoch": epoch + 1, "step": run.progress["step"], "lr": optimizer.param_groups[0]["lr"],
                           "train": {t: v / steps for t, v in zip(LOSS_TERMS, totals)},
                           "grad_norm": totals[len(LOSS_TERMS)] / steps, "time_s": round(seconds, 2),
                           "images_per_s": round(totals[-1] / seconds, 2), "world_size": run.world,
                           # what --amp resolved to on this machine: "auto" alone does not say (bf16 or fp32)
                           "precision": run.amp}
    run.progress["epoch"] = epoch + 1
    return row


def validate(run: Run, epoch: int, row: dict[str, Any]) -> bool:
    """Validate when due (every ``--val-every`` epochs and after the last), track the best Dice and early stopping;
    True when this epoch is the new best."""
    args, progress = run.args, run.progress
    improved = False
    if (epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs:
        start = time.perf_counter()
        row["val"] = evaluate(run.model, run.val_loader, run.val_names, run.device, run.amp)
        row["val_time_s"] = round(time.perf_counter() - start, 2)
        improved = row["val"]["dice"] > progress["best_dice"]
        if improved:
            progress.update(best_dice=row["val"]["dice"], best_epoch=epoch + 1, bad_validations=0)
        else:
            progress["bad_validations"] += 1
        if 0 < args.patience <= progress["bad_validations"]:
            progress["stopped"] = (f"early stopping after epoch {epoch + 1}: no better val Dice in "
                                   f"{args.patience} validations (best {progress['best_dice']:.4f} at epoch "
                                   f"{progress['best_epoch']})")
    row["best_dice"] = progress["best_dice"]
    return improved


def save_checkpoints(run: Run, epoch: int, row: dict[str, Any], improved: bool) -> None:
    """Rank 0 appends the metrics row, redraws the curves, publishes ``best/`` when improved and always ``latest/``
    (weights + optimizer, scheduler, scaler, every rank's RNG), each swapped in whole."""
    rng = distributed.all_gather_objects(state.rng_state())
    if run.main_rank:
        run.rows.append(row)
        rows = run.rows
        atomic_write(run.run_dir / "metrics.jsonl",
                     lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))
        plot_curves(rows, run.run_dir / "curves.png")
        metadata = {"args": vars(run.args), "epoch": epoch + 1, "metrics": row, "command": run.command,
                    "code_version": run.version, "world_size": run.world}
        if improved:
            with state.publishing(run.run_dir / "best") as tmp:
                save_checkpoint(tmp, run.model, metadata)
        with state.publishing(run.latest) as tmp:
            save_checkpoint(tmp, run.model, metadata)
            objects = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                       "scaler": run.scaler.state_dict(), "rng": rng}
            state.save_train_state(tmp, dict(run.progress, sampler_epoch=epoch + 1, world_size=run.world), objects)
    distributed.barrier()


def log_epoch(run: Run, row: dict[str, Any]) -> None:
    progress = run.progress
    val = " ".join(f"{k} {v:.3f}" for k, v in row["val"]["per_dataset"].items()) if "val" in row else "-"
    if "val" in row and row["val"]["negative_empty_rate"] is not None:
        val += f"; absent targets left empty {row['val']['negative_empty_rate']:.1%}"
    run.log.info("epoch %d/%d | loss %.4f (dice %.4f bce %.4f sem %.4f freq %.4f) | val Dice (targets present) %s [%s]"
                 " | best %.4f @%d | lr %.2e | %.1f s, %.1f img/s", row["epoch"], run.args.epochs,
                 *row["train"].values(), f"{row['val']['dice']:.4f}" if "val" in row else "-", val,
                 progress["best_dice"], progress["best_epoch"], row["lr"], row["time_s"], row["images_per_s"])


if __name__ == "__main__":
    main()
