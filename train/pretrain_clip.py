"""Contrastive pretraining of the offline ``mini`` CLIP (BiomedCLIP's stand-in) on image-caption pairs.

    python -m train.pretrain_clip --data DIR [DIR ...] --out runs/mini-clip [--epochs N] [--batch-size B]
        [--lr LR] [--seed S] [--amp auto|bf16|fp32] [--workers N] [--max-steps N] [--save-dtype fp16|fp32] [--force]

The ``mini`` preset's CLIP (ViT-Tiny/16 + a 4-layer BERT with a character-fallback WordPiece vocabulary,
``freqmedclip.modeling.backbone.create_clip_model``) is trained from scratch with open_clip's ``ClipLoss`` and a learnable
temperature on the train split of a dataset root (``freqmedclip.data.format``), then written in BiomedCLIP's
directory layout (``open_clip_config.json``, ``open_clip_model.safetensors``, BERT ``config.json``, tokenizer files)
so ``load_clip_backbone("local-dir:OUT")`` loads it; segmentation then keeps it frozen, as the paper keeps
BiomedCLIP frozen.

Notable choices:
* One image per ``sample_id``; each step pairs it with ONE text, drawn (with probability ``CAPTION_P``) as the
  image's caption, otherwise as a phrasing of a structure present in it (the segmentation prompts, so the frozen
  text tower later embeds them next to the images they describe). Cross-domain negative prompts are never used.
* ``ClipLoss`` treats every other text of the batch as a negative, so identical strings in one batch would be false
  negatives (phantom captions repeat, e.g. "lung CT without nodule"). :class:`UniqueTextBatches` fills every batch
  with ``batch_size`` images whose texts are all different (an image whose texts are taken waits for the next
  batch), so steps have constant shapes and the loss is open_clip's, unchanged.
* The text tower mean-pools its token states (open_clip ``mean_pooler``) instead of BiomedCLIP's [CLS] state:
  trained from scratch, a random BERT gives nearly the same [CLS] state for every text (cosine >= 0.89 between
  our captions at init), and the loss then sits at log(batch) for many steps; measured on 4 fixed pairs at lr 1e-4,
  mean pooling reaches a loss of 0.37 in 12 steps where [CLS] pooling is still at 1.40 (log 4 = 1.39). The pooler has no
  parameters; ``open_clip_config.json`` records it, and the segmentation model uses whichever pooler it names.
* Gradient-norm clipping (1.0) and a 25-step warm-up: without them the first AdamW steps collapse all image
  embeddings onto one direction (cosine 0.99 between different images after 6 steps at 5e-4).
* Light augmentation (small affine, horizontal flip, mild intensity jitter): captions name no laterality.
* Resumable: after each epoch the weights and AdamW moments go to ``pretrain_state.safetensors`` and the
  progress to ``pretrain_state.json`` (atomic; no pickle). Randomness is re-seeded from (seed, epoch), so a
  resumed run continues exactly as an uninterrupted one would (up to nondeterministic kernels). The final
  weights are written atomically, then ``pretrain_metrics.json``; the state files are removed. A finished
  directory is skipped.
* ``open_clip_config.json`` names the text tower by the output path relative to the repository when the output
  is inside it, never by this machine's absolute path; our loader ignores that name anyway and reads the BERT
  config and tokenizer from the directory itself (``freqmedclip.modeling.backbone.load_clip_backbone``).
* Budget: the defaults (30 epochs x 9 steps of 32 on the 504 train images of the default phantom set = 270 steps)
  were measured at 3.1 s/step on 2 idle cores of an AVX512 Xeon without AMX (fp32; ~14 min in all) and ~3.8 s of
  CPU per step on one core (~17 min); on a shared machine set OMP_NUM_THREADS=1, as 2 threads on busy cores run
  several times slower.
* Evaluation (validation split): image->text top-1/top-5 among the distinct captions, text->image top-1, and
  zero-shot classification of the domain among ``DOMAIN_PROMPTS``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.hf_model import MeanPooler
from open_clip.loss import ClipLoss
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from freqmedclip.modeling.backbone import CLIP_MEAN, CLIP_STD, create_clip_model, save_clip_dir
from freqmedclip.inference.checkpoint import atomic_write
from freqmedclip.data.dataset import IMAGE_SIZE, Augment, _affine_theta, intensity_jitter, paired_transform
from freqmedclip.data.format import load_image, read_manifest
from freqmedclip.inference import precision
from freqmedclip.inference.precision import autocast

REPO_ROOT = Path(__file__).resolve().parent.parent
STATE_WEIGHTS = "pretrain_state.safetensors"
STATE_JSON = "pretrain_state.json"
METRICS = "pretrain_metrics.json"
CAPTION_P = 0.5
CONTEXT_LENGTH = 77
MAX_LOGIT_SCALE = math.log(100.0)   # open_clip clamps the learnable temperature at 100
TEXT_POOLER = "mean_pooler"           # open_clip's name; see the module docstring
DOMAIN_PROMPTS = {"MRI": "brain MRI", "MG": "mammogram", "CT": "lung CT", "US": "breast ultrasound"}  # by record modality
LIGHT_AUGMENT = Augment(hflip=0.5, vflip=0.0, rotate_deg=10.0, scale=(0.9, 1.1), translate=0.04,
                        brightness=0.05, contrast=0.1, gamma=(0.9, 1.1), noise_std=0.01)
# What create_clip_model writes before the first state file: a run interrupted then may simply be restarted.
OWN_FILES = {"open_clip_config.json", "config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"}
# Arguments that change the result: a resumed or finished run must have been started with the same values.
RESULT_ARGS = ("data", "train_split", "preset", "epochs", "batch_size", "lr", "weight_decay", "warmup_steps",
               "grad_clip", "seed", "max_steps", "save_dtype")
SAVE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


@dataclass
class ImageText:
    """One training image and the texts that may describe it."""

    sample_id: str
    image: str                 # path relative to ``root``
    caption: str
    phrasings: list[str]       # prompts of the structures present in the image
    modality: str
    root: Path                 # the dataset root the image belongs to


def image_texts(roots: Path | Sequence[Path], split: str) -> list[ImageText]:
    """One :class:`ImageText` per sample of ``split`` of every root, roots in order, each in manifest order."""
    roots = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]
    samples: dict[tuple[Path, str], ImageText] = {}
    for root in roots:
        for rec in read_manifest(root):
            if rec.split != split:
                continue
            item = samples.setdefault((root, rec.sample_id), ImageText(rec.sample_id, rec.image, rec.caption or "",
                                                                       [], rec.modality, root))
            if rec.positive:
                item.phrasings.extend(p for p in rec.prompts if p not in item.phrasings)
    items = list(samples.values())
    for item in items:
        if not item.caption:
            item.caption = item.phrasings[0] if item.phrasings else DOMAIN_PROMPTS.get(item.modality, item.modality)
    if not items:
        raise ValueError(f"{', '.join(map(str, roots))}: no samples in split {split!r}")
    return items


class ImageFolder(Dataset):
    """Images of ``items`` as (3, 224, 224) float in [0, 1] (augmented when ``augment``).

    Indexed by ``(index, text)`` pairs from :class:`UniqueTextBatches` (returns ``(image, text)``) or by a plain
    index (returns ``(image, index)``).
    """

    def __init__(self, items: Sequence[ImageText], augment: Augment | None) -> None:
        self.items, self.augment = list(items), augment

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, str]) -> tuple[Tensor, int | str]:
        index, label = key if isinstance(key, tuple) else (key, key)
        item = self.items[index]
        pixels = np.array(load_image(item.root, item))                 # writable copy (H, W, 3)
        image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
        theta = _affine_theta(self.augment)[0] if self.augment is not None else None
        image, _ = paired_transform(image, torch.zeros_like(image[:1]), theta, IMAGE_SIZE)
        if self.augment is not None:
            image = intensity_jitter(image, self.augment)
        return image, label


def pick_text(item: ImageText, used: set[str], generator: torch.Generator) -> str | None:
    """One text for ``item`` not in ``used``: the caption with probability ``CAPTION_P`` (else a phrasing of a
    present structure), falling back to its other texts in random order; None when all are used."""
    others = [p for p in item.phrasings if p != item.caption]
    caption_first = not others or torch.rand((), generator=generator).item() < CAPTION_P
    shuffled = [others[i] for i in torch.randperm(len(others), generator=generator).tolist()]
    candidates = [item.caption, *shuffled] if caption_first else [*shuffled, item.caption]
    return next((t for t in candidates if t not in used), None)


class UniqueTextBatches(Sampler[list[tuple[int, str]]]):
    """Batches of exactly ``batch_size`` (image index, text) pairs, no text twice in a batch.

    Each epoch walks a fresh permutation (seeded by (seed, epoch)); an image whose texts are all taken in the
    current batch is deferred to the next one. Every image is used at most once per epoch; the epoch ends when
    no full batch can be formed any more, so every step has the same shapes (oneDNN/cuDNN build kernels per
    shape) and the same number of contrastive negatives.
    """

    def __init__(self, items: Sequence[ImageText], batch_size: int, seed: int) -> None:
        if batch_size < 2:
            raise ValueError(f"contrastive batches need at least 2 pairs, got batch_size={batch_size}")
        self.items, self.batch_size, self.seed, self.epoch = list(items), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items) // self.batch_size

    def count_batches(self, epochs: Sequence[int]) -> list[int]:
        """Number of batches of each epoch in ``epochs`` (a dry run: no images are read)."""
        current, counts = self.epoch, []
        for epoch in epochs:
            self.set_epoch(epoch)
            counts.append(sum(1 for _ in self))
        self.set_epoch(current)
        return counts

    def __iter__(self) -> Iterator[list[tuple[int, str]]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        pending = torch.randperm(len(self.items), generator=generator).tolist()
        for _ in range(len(self)):
            batch, used, deferred = [], set(), []
            while pending and len(batch) < self.batch_size:
                index = pending.pop(0)
                text = pick_text(self.items[index], used, generator)
                if text is None:
                    deferred.append(index)
                else:
                    batch.append((index, text))
                    used.add(text)
            pending = deferred + pending
            if len(batch) < self.batch_size:
                return
            yield batch


def tokenize(tokenizer: Any, texts: Sequence[str], device: torch.device) -> Tensor:
    """Token ids (B, L) padded to the longest text (at most ``CONTEXT_LENGTH``)."""
    return tokenizer(list(texts), padding="longest", truncation=True, max_length=CONTEXT_LENGTH,
                     return_tensors="pt")["input_ids"].to(device)


def normalize_images(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [0, 1] -> CLIP-normalised."""
    mean = images.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def learning_rate(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's split: no weight decay on gains, biases, norms and the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


# ---- resumable state (safetensors + JSON) ----

def save_state(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, progress: dict[str, Any]) -> None:
    """Weights, AdamW moments and ``progress`` (plus param groups, in the safetensors metadata) to ``STATE_WEIGHTS``
    in one atomic write, so a kill can never pair new weights with old progress; ``STATE_JSON`` is a readable copy."""
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    optim = optimizer.state_dict()
    for index, entry in optim["state"].items():
        for key, value in entry.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in optim["param_groups"]]
    progress_text = json.dumps(progress | {"param_groups": groups}, indent=2)
    atomic_write(out / STATE_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"progress": progress_text}))
    atomic_write(out / STATE_JSON, lambda tmp: tmp.write_text(progress_text))


def load_state(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore what :func:`save_state` wrote; returns the progress dict."""
    with safe_open(str(out / STATE_WEIGHTS), "pt") as handle:
        progress = json.loads(handle.metadata()["progress"])
    tensors = load_file(str(out / STATE_WEIGHTS))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": progress.pop("param_groups")})
    return progress


def finalize_text_config(out: Path, model: nn.Module) -> None:
    """Mean-pool the text tower and name it without this machine's absolute path (see module doc).

    Rewrites ``open_clip_config.json`` (``hf_pooler_type``, ``hf_model_name``, ``hf_tokenizer_name``) and swaps the
    parameter-free pooler of ``model`` to match, so the weights load into the architecture the file describes.
    """
    path = out / "open_clip_config.json"
    config = json.loads(path.read_text())
    resolved = out.resolve()
    name = str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(resolved)
    config["model_cfg"]["text_cfg"].update(hf_model_name=name, hf_tokenizer_name=name, hf_pooler_type=TEXT_POOLER)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    model.text.pooler = MeanPooler()


# ---- evaluation ----

@torch.no_grad()
def embed_images(model: nn.Module, items: Sequence[ImageText], device: torch.device, amp: str,
                 batch_size: int) -> Tensor:
    """L2-normalised image embeddings (N, D), float32, no augmentation."""
    loader = DataLoader(ImageFolder(items, None), batch_size=batch_size, shuffle=False)
    chunks = []
    for images, _ in loader:
        with autocast(device, amp):
            chunks.append(model.encode_image(normalize_images(images.to(device))).float())
    return F.normalize(torch.cat(chunks), dim=-1)


@torch.no_grad()
def embed_texts(model: nn.Module, tokenizer: Any, texts: Sequence[str], device: torch.device, amp: str) -> Tensor:
    """L2-normalised text embeddings (T, D), float32."""
    chunks = []
    for start in range(0, len(texts), 256):
        with autocast(device, amp):
            chunks.append(model.encode_text(tokenize(tokenizer, texts[start:start + 256], device)).float())
    return F.normalize(torch.cat(chunks), dim=-1)


def retrieval_metrics(model: nn.Module, tokenizer: Any, items: Sequence[ImageText], device: torch.device,
                      amp: str, batch_size: int = 64) -> dict[str, Any]:
    """Zero-shot retrieval and domain classification on ``items`` (their captions are the text gallery).

    Image->text: is the image's own caption the most similar (top-1) / among the 5 most similar (top-5) of the
    distinct captions. Text->image: is the most similar image one the caption describes (several images may share
    a caption). Domain: argmax over ``DOMAIN_PROMPTS`` of the modalities present equals the image's modality.
    """
    was_training = model.training
    model.eval()
    images = embed_images(model, items, device, amp, batch_size)                 # (N, D)
    captions = list(dict.fromkeys(item.caption for item in items))
    caption_index = torch.tensor([captions.index(item.caption) for item in items])
    texts = embed_texts(model, tokenizer, captions, device, amp)                        # (C, D)
    similarity = (images @ texts.T).cpu()                                              # (N, C)
    ranks = similarity.argsort(dim=1, descending=True)
    top1 = (ranks[:, 0] == caption_index).float().mean().item()
    top5 = (ranks[:, :5] == caption_index[:, None]).any(1).float().mean().item()
    text_to_image = (caption_index[similarity.argmax(dim=0)] == torch.arange(len(captions))).float().mean().item()

    modalities = [m for m in DOMAIN_PROMPTS if any(item.modality == m for item in items)]
    domain_accuracy, per_domain = None, {}
    if len(modalities) > 1:
        domain_texts = embed_texts(model, tokenizer, [DOMAIN_PROMPTS[m] for m in modalities], device, amp)
        predicted = (images @ domain_texts.T).argmax(1).cpu()
        truth = torch.tensor([modalities.index(item.modality) if item.modality in modalities else -1 for item in items])
        domain_accuracy = (predicted == truth).float().mean().item()
        per_domain = {DOMAIN_PROMPTS[m]: (predicted[truth == i] == i).float().mean().item()
                      for i, m in enumerate(modalities)}
    model.train(was_training)
    return {
        "n_images": len(items),
        "n_captions": len(captions),
        "image_to_text_top1": top1,
        "image_to_text_top5": top5,
        "text_to_image_top1": text_to_image,
        "chance_image_to_text_top1": 1 / len(captions),
        "domain_prompts": [DOMAIN_PROMPTS[m] for m in modalities],
        "domain_accuracy": domain_accuracy,
        "domain_accuracy_per_class": per_domain,
    }


@torch.no_grad()
def round_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every floating-point parameter and buffer to ``dtype``'s precision, in place (dtype unchanged)."""
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            tensor.copy_(tensor.to(dtype))


# ---- main ----

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("data")
    group.add_argument("--data", type=Path, nargs="+", required=True,
                       help="one or more dataset roots (freqmedclip.data.format), pooled")
    group.add_argument("--out", type=Path, default=Path("runs/mini-clip"))   # the shipped one: train/recipes/common.sh
    group.add_argument("--train-split", default="train")
    group.add_argument("--val-split", default="val")
    group = parser.add_argument_group("model")
    group.add_argument("--preset", choices=("mini",), default="mini", help="only the offline stand-in is pretrained")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int, default=30,
                       help="default: 270 steps of 32 on the 504 default phantom images (~17 min on one idle core)")
    group.add_argument("--batch-size", type=int, default=32)
    group.add_argument("--lr", type=float, default=2e-4)
    group.add_argument("--weight-decay", type=float, default=0.1)
    group.add_argument("--warmup-steps", type=int, default=25)
    group.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    group.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke tests, timing)")
    group = parser.add_argument_group("system")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--amp", choices=("auto", "bf16", "fp32"), default="auto",
                       help="auto: bf16 on CUDA and on CPUs with AMX/AVX512-BF16, else fp32")
    group.add_argument("--device", default="auto", help="auto | cpu | cuda")
    group.add_argument("--workers", type=int, default=1)
    group.add_argument("--log-every", type=int, default=10, help="print loss and seconds per step every N steps")
    group.add_argument("--eval-every", type=int, default=0, help="also evaluate on --val-split every N epochs")
    group.add_argument("--force", action="store_true", help="start over, replacing a finished or foreign --out")
    group.add_argument("--save-dtype", choices=sorted(SAVE_DTYPES), default="fp16",
                       help="dtype of the written weights (fp16 halves the shipped file; the final retrieval metrics "
                            "are measured on the rounded weights)")
    return parser.parse_args(argv)


def _result_args(args: argparse.Namespace) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        return [str(v) for v in value] if isinstance(value, list) else str(value) if isinstance(value, Path) else value

    return {k: plain(v) for k, v in vars(args).items() if k in RESULT_ARGS}


def _check_same_run(saved: dict[str, Any], args: argparse.Namespace, what: str) -> None:
    current = _result_args(args)
    saved_roots = saved.get("data", [])
    saved_roots = [saved_roots] if isinstance(saved_roots, str) else saved_roots   # written by one-root versions
    same_data = [Path(r).resolve() for r in saved_roots] == [r.resolve() for r in args.data]
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v and not (k == "data" and same_data)}
    if diff:
        raise SystemExit(f"{args.out}: {what} with other arguments {diff} (saved, now); pass --force to start over")


def _prepare_out(args: argparse.Namespace) -> str:
    """'finished', 'resume' or 'fresh' for ``args.out``; refuses to overwrite a directory it did not write."""
    out = args.out
    if args.force and out.exists():
        for name in (STATE_WEIGHTS, STATE_JSON, METRICS, "open_clip_model.safetensors"):
            (out / name).unlink(missing_ok=True)
    if (out / METRICS).is_file() and (out / "open_clip_model.safetensors").is_file():
        _check_same_run(json.loads((out / METRICS).read_text())["args"], args, "already finished")
        return "finished"
    if (out / STATE_JSON).is_file() and (out / STATE_WEIGHTS).is_file():
        _check_same_run(json.loads((out / STATE_JSON).read_text())["args"], args, "was started")
        return "resume"
    foreign = [p.name for p in out.iterdir() if p.name not in OWN_FILES] if out.is_dir() else []
    if foreign and not args.force:
        raise SystemExit(f"{out} holds files this script did not write ({', '.join(sorted(foreign)[:5])}); "
                         f"pass --force to overwrite it")
    return "fresh"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    amp = precision.resolve(args.amp, device)
    status = _prepare_out(args)
    if status == "finished":
        metrics = json.loads((args.out / METRICS).read_text())
        print(f"{args.out}: pretraining already finished; nothing to do")
        print(json.dumps(metrics["val"], indent=2))
        return metrics

    train_items = image_texts(args.data, args.train_split)
    val_items = image_texts(args.data, args.val_split)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model = create_clip_model(args.preset, args.out).to(device)   # writes config, BERT config, tokenizer files
    finalize_text_config(args.out, model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(args.out))
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()

    sampler = UniqueTextBatches(train_items, args.batch_size, args.seed)
    steps_per_epoch = sampler.count_batches(range(args.epochs))   # exact, so the cosine schedule ends at zero
    total_steps = sum(steps_per_epoch)
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    if total_steps == 0:
        raise SystemExit(f"--batch-size {args.batch_size} exceeds the {len(train_items)} training images")
    progress: dict[str, Any] = {"args": _result_args(args), "epoch": 0, "step": 0, "history": [],
                                "train_seconds": 0.0, "cpu_seconds": 0.0}
    if status == "resume":
        progress = load_state(args.out, model, optimizer)
        print(f"resuming {args.out} after epoch {progress['epoch']} (step {progress['step']})")
    print(f"pretraining {args.preset} CLIP on {len(train_items)} images ({steps_per_epoch[0]} steps/epoch of "
          f"{args.batch_size}, {total_steps} steps) on {device} ({amp}, {torch.get_num_threads()} threads)", flush=True)

    dataset = ImageFolder(train_items, LIGHT_AUGMENT)
    model.train()
    step = progress["step"]
    for epoch in range(progress["epoch"], args.epochs):
        if step >= total_steps:
            break
        seed = args.seed * 100_003 + epoch       # augmentation and worker seeds depend only on (seed, epoch)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        sampler.set_epoch(epoch)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers)
        start, cpu_start, losses = time.perf_counter(), time.process_time(), []
        tick, cpu_tick = start, cpu_start
        for images, texts in loader:
            if step >= total_steps:
                break
            lr = learning_rate(step, total_steps, args.lr, args.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ids = tokenize(tokenizer, texts, device)
            with autocast(device, amp):
                image_features = model.encode_image(normalize_images(images.to(device)), normalize=True)
                text_features = model.encode_text(ids, normalize=True)
            loss = loss_fn(image_features.float(), text_features.float(), model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            losses.append(loss.item())
            step += 1
            if args.log_every and step % args.log_every == 0:
                now, cpu_now = time.perf_counter(), time.process_time()
                print(f"  step {step}/{total_steps} loss {losses[-1]:.4f} lr {lr:.2e} "
                      f"{(now - tick) / args.log_every:.2f} s/step (cpu {(cpu_now - cpu_tick) / args.log_every:.2f} s)",
                      flush=True)
                tick, cpu_tick = now, cpu_now
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        progress["train_seconds"] += seconds
        progress["cpu_seconds"] += cpu_seconds
        n = max(1, len(losses))
        record = {"epoch": epoch + 1, "step": step, "loss": float(np.mean(losses)) if losses else None,
                  "logit_scale": model.logit_scale.exp().item(), "seconds": round(seconds, 2),
                  "seconds_per_step": round(seconds / n, 3), "cpu_seconds_per_step": round(cpu_seconds / n, 3)}
        if args.eval_every and (epoch + 1) % args.eval_every == 0:
            record["val"] = retrieval_metrics(model, tokenizer, val_items, device, amp)
        progress["history"].append(record)
        progress.update(epoch=epoch + 1, step=step)
        save_state(args.out, model, optimizer, progress)
        summary = "".join(f" {k} {record['val'][k]:.3f}" for k in ("image_to_text_top1", "domain_accuracy")
                          if record.get("val", {}).get(k) is not None)
        print(f"epoch {epoch + 1}/{args.epochs} step {step}/{total_steps} loss {record['loss']:.4f} "
              f"scale {record['logit_scale']:.1f} {record['seconds_per_step']:.2f} s/step{summary}", flush=True)

    round_weights(model, SAVE_DTYPES[args.save_dtype])  # segmentation is trained on exactly the shipped weights
    val = retrieval_metrics(model, tokenizer, val_items, device, amp)
    if len(args.data) > 1:   # each root's own figures too: pooled retrieval mixes easy and hard domains
        val["per_root"] = {str(root): retrieval_metrics(model, tokenizer, [i for i in val_items if i.root == root],
                                                        device, amp) for root in args.data}
    save_clip_dir(model, args.out, SAVE_DTYPES[args.save_dtype])
    metrics = {
        "args": progress["args"],
        "finished": True,
        "steps": step,
        "epochs_completed": progress["epoch"],
        "train_images": len(train_items),
        "train_seconds": round(progress["train_seconds"], 1),
        "cpu_seconds": round(progress["cpu_seconds"], 1),
        "amp": amp,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "history": progress["history"],
        "val": val,
        "command": " ".join(["python -m train.pretrain_clip", *(argv if argv is not None else sys.argv[1:])]),
    }
    atomic_write(args.out / METRICS, lambda tmp: tmp.write_text(json.dumps(metrics, indent=2)))
    for name in (STATE_WEIGHTS, STATE_JSON):
        (args.out / name).unlink(missing_ok=True)
    for path in args.out.iterdir():
        path.chmod(0o644)   # temp files are created 0600; the directory is a shared, read-only asset
    print(json.dumps(val, indent=2))
    return metrics


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
