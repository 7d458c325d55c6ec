"""Checkpoints: safetensors weights + a JSON config, nothing pickled.

A checkpoint directory holds::

    model.safetensors   the trainable weights only (the frozen CLIP backbone is never copied)
    config.json         {"format", "config", "backbone": {"source", "sha256"}, "frequency_init",
                         "code_version", "metadata": {training args, metrics, command, ...}}

Loading rebuilds the model from ``config.json`` alone and checks that the CLIP backbone found on this
machine is the one the checkpoint was trained on (SHA-256 of its weights file).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

from freqmedclip import __version__
from freqmedclip.modeling.backbone import REPO_ROOT, ClipBackbone, load_clip_backbone, random_clip_backbone
from freqmedclip.modeling.config import FreqMedCLIPConfig
from freqmedclip.modeling.model import FreqMedCLIP, build_model

FORMAT = "freqmedclip-checkpoint-v1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
# A model set's folder (one subfolder per ensemble member) may hold the mask threshold chosen for that ensemble on
# validation (``python -m train.operating_point``): {"threshold": float in (0, 1), "split": ..., ...}.
OPERATING_POINT_FILE = "operating_point.json"


def read_operating_point(folder: str | Path) -> dict[str, Any] | None:
    """The operating point stored in a model set's folder, or None if it has none: {"threshold", optionally
    "domain_thresholds": {domain: threshold}, and how they were chosen}.

    Raises ValueError naming the file when it is not JSON or a threshold is not a number strictly in (0, 1).
    """
    path = Path(folder) / OPERATING_POINT_FILE
    if not path.is_file():
        return None
    try:
        point = json.loads(path.read_text())
        threshold = point["threshold"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not an operating point (JSON with a 'threshold'): {error}") from None
    if not is_threshold(threshold):
        raise ValueError(f"{path}: threshold must be a number strictly between 0 and 1, got {threshold!r}")
    domains = point.get("domain_thresholds", {})
    if not isinstance(domains, dict) or not all(isinstance(d, str) and is_threshold(t) for d, t in domains.items()):
        raise ValueError(f"{path}: domain_thresholds must map domain names to numbers strictly between 0 and 1, "
                         f"got {domains!r}")
    return point


def is_threshold(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value < 1


class BackboneMismatchError(RuntimeError):
    """The CLIP backbone on this machine is not the one a checkpoint was trained with."""


def code_version() -> str:
    """Package version plus the git commit of the source tree, when there is one."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def atomic_write(path: Path, write) -> None:
    """Call ``write(temp_path)``, then move the temp file onto ``path`` (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_checkpoint(directory: str | Path, model: FreqMedCLIP, metadata: dict[str, Any] | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write ``model``'s trainable weights and config to ``directory`` (weights first, config last).

    Each file is replaced atomically; to replace a whole directory as one unit (weights and config always from
    the same step), write it beside the target and swap it in, as the trainer does (``train.state.publishing``).

    Args:
        dtype: store floating-point weights in this dtype (e.g. torch.float16 for shipped checkpoints).
    """
    directory = Path(directory)
    state = {}
    for name, tensor in model.trainable_state_dict().items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.contiguous()
    header = {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "backbone": {"source": model.backbone_source, "sha256": model.backbone_sha256},
        "frequency_init": getattr(model, "frequency_init", "unknown"),
        "code_version": code_version(),
        "metadata": metadata or {},
    }
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": FORMAT}))
    atomic_write(directory / CONFIG, lambda tmp: tmp.write_text(json.dumps(header, indent=2, default=str)))
    return directory


def read_checkpoint_header(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a FreqMedCLIP checkpoint (no {CONFIG})")
    header = json.loads(path.read_text())
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {header.get('format')!r} (expected {FORMAT})")
    return header


def load_checkpoint(directory: str | Path, backbone: ClipBackbone | None = None, device: str | torch.device = "cpu",
                    allow_backbone_mismatch: bool = False) -> FreqMedCLIP:
    """Rebuild a model from a checkpoint directory; no other flags needed.

    Args:
        backbone: an already loaded backbone to share (ensembles, or a backbone at another location);
            by default the one named in the checkpoint is loaded.
        allow_backbone_mismatch: warn instead of raising when the backbone's weights differ.
    Raises:
        BackboneMismatchError: the backbone's SHA-256 differs from the one recorded at training time.
    """
    directory = Path(directory)
    header = read_checkpoint_header(directory)
    config = FreqMedCLIPConfig.from_dict(header["config"])
    expected = header["backbone"]
    if backbone is None:
        if expected["source"].startswith("random:"):
            raise BackboneMismatchError(
                f"{directory} was trained on a randomly initialised backbone; pass that backbone explicitly")
        backbone = load_clip_backbone(expected["source"])
    if backbone.weights_sha256 != expected["sha256"]:
        message = (f"{directory} was trained with backbone {expected['source']} (sha256 {expected['sha256'][:12]}), "
                   f"but the loaded backbone {backbone.source} has sha256 {backbone.weights_sha256[:12]}")
        if not allow_backbone_mismatch:
            raise BackboneMismatchError(message + "; pass allow_backbone_mismatch=True to use it anyway")
        warnings.warn(message, stacklevel=2)
    model = build_model(config, backbone, load_frequency_weights=False)
    model.frequency_init = header.get("frequency_init", "unknown")
    state = load_file(str(directory / WEIGHTS))
    reference = model.trainable_state_dict()
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    if missing or unexpected:
        raise ValueError(f"{directory / WEIGHTS} does not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    state = {k: v.to(reference[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False)
    model.checkpoint_header = header
    return model.to(device).eval()


def load_ensemble(directories: Sequence[str | Path], backbone: ClipBackbone | None = None,
                  device: str | torch.device = "cpu") -> list[FreqMedCLIP]:
    """Load several checkpoints sharing one backbone (loaded once)."""
    models = []
    for directory in directories:
        models.append(load_checkpoint(directory, backbone, device))
        backbone = models[-1].clip_backbone
    return models


def random_ensemble(members: int, preset: str = "mini", device: str | torch.device = "cpu") -> list[FreqMedCLIP]:
    """``members`` UNTRAINED models of a preset sharing one random backbone: for speed benchmarks only."""
    backbone = random_clip_backbone(preset)
    config = FreqMedCLIPConfig.from_preset(preset, frequency_weights="none")
    return [build_model(config, backbone, device=device) for _ in range(members)]
