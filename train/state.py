"""Resumable training state without pickle: RNG states, optimizer-style state dicts, atomic checkpoint directories.

Notable choices:
* A nested state dict (optimizer, scheduler, scaler, RNG) is split in two files: every tensor goes to
  ``train_state.safetensors`` under its dotted path, everything else to ``train_state.json`` with a
  ``{"tensor": path}`` stub in the tensor's place. JSON turns int keys into strings; the optimizer's are restored.
* A checkpoint directory is filled as a hidden sibling, then swapped in with two renames
  (target -> .target.old, tmp -> target; both siblings hidden, so a glob for checkpoints never sees them);
  :func:`recover` completes a swap that a kill -9 cut in half.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

STATE_FORMAT = "freqmedclip-train-state-v1"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch and CUDA generator states (``set_rng_state`` takes them back)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), position, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def pack(tree: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """JSON-able copy of a nested state dict; each tensor moves to ``tensors`` and leaves a {"tensor": key} stub."""
    if isinstance(tree, Tensor):
        tensors[prefix] = tree.detach().cpu().contiguous()
        return {"tensor": prefix}
    if isinstance(tree, dict):
        return {str(k): pack(v, f"{prefix}.{k}", tensors) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [pack(v, f"{prefix}.{i}", tensors) for i, v in enumerate(tree)]
    return tree


def unpack(tree: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(tree, dict):
        if tree.keys() == {"tensor"}:
            return tensors[tree["tensor"]]
        return {k: unpack(v, tensors) for k, v in tree.items()}
    return [unpack(v, tensors) for v in tree] if isinstance(tree, list) else tree


def save_train_state(directory: Path, progress: dict[str, Any], objects: dict[str, Any]) -> None:
    """``train_state.safetensors`` (every tensor) + ``train_state.json`` (the rest, with stubs for the tensors)."""
    tensors: dict[str, Tensor] = {}
    state = dict(progress, format=STATE_FORMAT, **{k: pack(v, k, tensors) for k, v in objects.items()})
    save_file(tensors, str(directory / "train_state.safetensors"))
    (directory / "train_state.json").write_text(json.dumps(state, indent=1))


def load_train_state(directory: Path) -> dict[str, Any]:
    state = json.loads((directory / "train_state.json").read_text())
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{directory}/train_state.json: unknown format {state.get('format')!r}")
    state = unpack(state, load_file(str(directory / "train_state.safetensors")))
    state["optimizer"]["state"] = {int(k): v for k, v in state["optimizer"]["state"].items()}  # JSON keys are str
    return state


@contextmanager
def publishing(directory: Path) -> Iterator[Path]:
    """Write a directory atomically: fill the yielded temporary sibling, which is swapped in when the block ends
    without an exception (see :func:`recover`)."""
    tmp, old = directory.with_name(f".{directory.name}.tmp"), directory.with_name(f".{directory.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def recover(directory: Path) -> None:
    """Finish a swap that a crash interrupted between its two renames."""
    old = directory.with_name(f".{directory.name}.old")
    if not directory.exists() and old.exists():
        os.replace(old, directory)
