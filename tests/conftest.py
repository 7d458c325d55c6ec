"""Shared pytest fixtures: offline, CPU-only, no committed weights.

The environment variables below must be set before the first import of huggingface_hub / transformers /
open_clip / gradio: huggingface_hub reads them once, at import time (TECH.md 1.4), and an online lookup on a
machine without network retries for ~30 s per file before failing.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # 2 cores; OMP_NUM_THREADS=1 on a shared machine

# The literal hub ids the production code uses; the fake cache below serves our stand-in under them.
BIOMEDCLIP_ID = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BIOMEDBERT_ID = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
FAKE_SHA = "0" * 40
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="session")
def mini_backbone_dir(tmp_path_factory) -> Path:
    """A self-contained ``mini`` CLIP directory in BiomedCLIP's layout, random weights, built per session."""
    from freqmedclip.modeling.backbone import create_clip_model, save_clip_dir

    directory = tmp_path_factory.mktemp("mini-clip")
    torch.manual_seed(0)
    model = create_clip_model("mini", directory)
    save_clip_dir(model, directory)
    return directory


@pytest.fixture(scope="session")
def mini_backbone(mini_backbone_dir):
    """The stand-in loaded through the production loader (``local-dir:``); frozen, shared by all tests."""
    from freqmedclip.modeling.backbone import load_clip_backbone

    return load_clip_backbone(f"local-dir:{mini_backbone_dir}")


@pytest.fixture(scope="session")
def untrained_checkpoints(mini_backbone, mini_backbone_dir, tmp_path_factory) -> list[Path]:
    """Two untrained mini checkpoints (seeds 0 and 1) on the session's mini backbone."""
    from freqmedclip.inference.checkpoint import save_checkpoint
    from freqmedclip.modeling.config import FreqMedCLIPConfig
    from freqmedclip.modeling.model import build_model

    root = tmp_path_factory.mktemp("untrained-checkpoints")
    directories = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = FreqMedCLIPConfig.from_preset("mini", backbone=f"local-dir:{mini_backbone_dir}",
                                               frequency_weights="none")
        model = build_model(config, mini_backbone, load_frequency_weights=False)
        directories.append(save_checkpoint(root / f"seed{seed}", model, {"seed": seed}))
    return directories


def write_fake_hub_cache(cache: Path, source_dir: Path, weights: bool = True) -> Path:
    """Write ``source_dir`` (a mini CLIP directory) into a HuggingFace cache under the real hub ids.

    The CLIP repo gets ``open_clip_config.json`` (text tower pointing at the real BiomedBERT id, as on the hub)
    and, if ``weights``, ``open_clip_pytorch_model.bin`` (a torch pickle, as on the hub); the BiomedBERT repo
    gets ``config.json`` and the tokenizer files. Returns the CLIP snapshot directory.
    """
    from safetensors.torch import load_file

    def repo(repo_id: str) -> Path:
        root = cache / f"models--{repo_id.replace('/', '--')}"
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(FAKE_SHA)
        snapshot = root / "snapshots" / FAKE_SHA
        snapshot.mkdir(parents=True, exist_ok=True)
        return snapshot

    clip = repo(BIOMEDCLIP_ID)
    config = json.loads((source_dir / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"].update(hf_model_name=BIOMEDBERT_ID, hf_tokenizer_name=BIOMEDBERT_ID)
    (clip / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    if weights:
        torch.save(load_file(str(source_dir / "open_clip_model.safetensors")), clip / "open_clip_pytorch_model.bin")
    bert = repo(BIOMEDBERT_ID)
    for name in ("config.json", *TOKENIZER_FILES):
        shutil.copyfile(source_dir / name, bert / name)
    return clip


def _use_hf_cache(monkeypatch, cache: Path) -> None:
    """Point huggingface_hub (and through it transformers and open_clip) at ``cache``, offline.

    Patching the constants module is what counts at runtime (TECH.md 1.4): both libraries read
    ``huggingface_hub.constants.HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` at call time; the env vars are set too for
    any subprocess.
    """
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def fake_hf_cache(tmp_path, monkeypatch, mini_backbone_dir) -> SimpleNamespace:
    """A HuggingFace cache holding the mini stand-in as ``hf-hub:microsoft/BiomedCLIP-...`` (offline)."""
    cache = tmp_path / "hf-cache"
    snapshot = write_fake_hub_cache(cache, mini_backbone_dir)
    _use_hf_cache(monkeypatch, cache)
    return SimpleNamespace(cache=cache, snapshot=snapshot, source=f"hf-hub:{BIOMEDCLIP_ID}")


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty HuggingFace cache, offline: nothing can be found, nothing is downloaded."""
    cache = tmp_path / "empty-hf-cache"
    cache.mkdir()
    _use_hf_cache(monkeypatch, cache)
    return cache


@pytest.fixture
def no_network(monkeypatch) -> None:
    """Make any socket connection fail at once, so an accidental online lookup fails the test loudly."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"test tried to open a network connection: {args[1:]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
