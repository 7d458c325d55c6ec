"""The shipped assets: the pretrained mini backbone and the published checkpoints are complete, consistent with
each other, within the size budget, documented (command, metrics, fp16 check), and segment the bundled examples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

from freqmedclip.modeling.backbone import sha256_file
from freqmedclip.inference.checkpoint import read_checkpoint_header
from freqmedclip.demo.session import (
    MODEL_SETS,
    PHANTOM_MODELS,
    REAL_MODELS,
    default_model_set,
    find_checkpoints,
    load_session,
)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
BACKBONE = ASSETS / "backbones" / "mini-clip-real"   # the one backbone of the phantom and the real-data checkpoints
ENSEMBLE = sorted((ASSETS / "phantom" / "checkpoints").glob("*/config.json"))
REAL_ENSEMBLE = sorted((ASSETS / "public" / "checkpoints").glob("*/config.json"))
BASELINES = sorted((ASSETS / "phantom" / "baselines").glob("*/config.json"))
REAL_BASELINES = sorted((ASSETS / "public" / "baselines").glob("*/config.json"))
EXAMPLES = json.loads((ASSETS / "examples" / "examples.json").read_text())
SIZE_BUDGET_MB = 120          # everything shipped in assets/, phantom and real together


def _float_dtypes(path: Path) -> set[torch.dtype]:
    with safe_open(str(path), "pt") as weights:
        return {t.dtype for t in map(weights.get_tensor, weights.keys()) if t.is_floating_point()}


def test_shipped_weights_fit_the_budget_in_each_recipes_dtype():
    assert len(ENSEMBLE) == len(REAL_ENSEMBLE) == 3 and len(BASELINES) == len(REAL_BASELINES) == 2
    assert [p.name for p in (ASSETS / "backbones").iterdir()] == [BACKBONE.name]
    assert sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file()) / 2**20 <= SIZE_BUDGET_MB
    # train/recipes/*.sh PUBLISH_DTYPE: phantom fp16; real fp32, where fp16 flips pixels of 20-pixel nodules
    half = [BACKBONE / "open_clip_model.safetensors", *(c.parent / "model.safetensors" for c in ENSEMBLE + BASELINES)]
    for path in half:
        assert _float_dtypes(path) == {torch.float16}, path
    for config in REAL_ENSEMBLE + REAL_BASELINES:
        assert _float_dtypes(config.parent / "model.safetensors") == {torch.float32}, config.parent


def test_backbone_was_pretrained_on_the_real_train_split_and_the_phantoms_and_records_how():
    metrics = json.loads((BACKBONE / "pretrain_metrics.json").read_text())
    assert metrics["finished"] and metrics["args"]["data"] == ["data/public", "data/phantoms"]
    assert metrics["command"].startswith("python -m train.pretrain_clip --data data/public data/phantoms")
    assert metrics["args"]["save_dtype"] == "fp16" and metrics["args"]["epochs"] == 6   # train/recipes/common.sh
    per_root = metrics["val"]["per_root"]
    assert set(per_root) == {"data/public", "data/phantoms"}
    assert per_root["data/phantoms"]["domain_accuracy"] > 0.9      # zero-shot "brain MRI" / "mammogram" / "lung CT"


@pytest.mark.parametrize("config", REAL_ENSEMBLE + REAL_BASELINES, ids=lambda c: c.parent.name)
def test_real_checkpoint_is_tied_to_the_real_backbone_and_names_its_data_and_licences(config):
    header = read_checkpoint_header(config.parent)
    assert header["backbone"] == {"source": "local-dir:assets/backbones/mini-clip-real",
                                  "sha256": sha256_file(BACKBONE / "open_clip_model.safetensors")}
    metadata = header["metadata"]
    assert metadata["args"]["config"] == "train/configs/public.yaml" and metadata["args"]["data"] == "data/public"
    recipe = yaml.safe_load((ASSETS.parent / "train" / "configs" / "public.yaml").read_text())
    assert header["config"]["bce_pos_weight"] == recipe["bce_pos_weight"]   # trained with today's recipe
    assert (metadata["args"]["epochs"], metadata["args"]["t_max"]) == (recipe["epochs"], recipe["t_max"])
    assert metadata["metrics"]["val"]["dice"] == metadata["metrics"]["best_dice"]
    assert metadata["export"]["dtype"] == "fp32"      # train/recipes/public.sh: fp16 flips pixels of tiny nodules
    assert metadata["export"]["check"]["max_abs_dice_change"] <= 0.005
    trained_on = metadata["training_data"]
    assert trained_on["datasets"] == ["busbra", "lgg", "lidc"]
    assert trained_on["licences"]["lgg"].startswith("CC BY-NC-SA 4.0")
    assert (config.parent / "metrics.jsonl").is_file() and (config.parent / "curves.png").is_file()


@pytest.mark.parametrize("config", ENSEMBLE + BASELINES, ids=lambda c: c.parent.name)
def test_phantom_checkpoint_is_tied_to_the_same_backbone_and_documented(config):
    header = read_checkpoint_header(config.parent)
    assert header["backbone"] == {"source": "local-dir:assets/backbones/mini-clip-real",
                                  "sha256": sha256_file(BACKBONE / "open_clip_model.safetensors")}
    metadata = header["metadata"]
    variant, seed = header["config"]["variant"], metadata["args"]["seed"]
    assert metadata["command"][3:] == ["--config", "train/configs/phantom.yaml", "--variant", variant,
                                       "--seed", str(seed), "--run-dir", f"runs/phantom_{variant}-seed{seed}"]
    assert metadata["metrics"]["val"]["dice"] == metadata["metrics"]["best_dice"]      # best/ = the best validation
    export = metadata["export"]
    assert export["dtype"] == "fp16" and export["command"].startswith("python -m train.export runs/phantom_")
    assert export["check"]["split"] == "test" and export["check"]["max_abs_dice_change"] <= 0.005
    assert metadata["training_data"]["datasets"] == ["brain", "breast", "lung"]
    assert (config.parent / "metrics.jsonl").is_file() and (config.parent / "curves.png").is_file()


def test_demo_default_is_the_real_three_seed_ensemble_and_the_phantoms_stay_a_choice():
    assert default_model_set() == REAL_MODELS and find_checkpoints() == [c.parent for c in REAL_ENSEMBLE]
    assert find_checkpoints(MODEL_SETS[PHANTOM_MODELS]) == [c.parent for c in ENSEMBLE]
    for ensemble in (REAL_ENSEMBLE, ENSEMBLE):
        variants = [read_checkpoint_header(c.parent)["config"]["variant"] for c in ensemble]
        seeds = [read_checkpoint_header(c.parent)["metadata"]["args"]["seed"] for c in ensemble]
        assert variants == ["full"] * len(ensemble) and seeds == [0, 1, 2]


@pytest.fixture(scope="module")
def shipped():
    """Each set's session, loaded on first use (the real examples go to the real set, the phantoms' to theirs)."""
    sessions = {}

    def get(name: str):
        if name not in sessions:
            sessions[name] = load_session(search=MODEL_SETS[name])
        return sessions[name]
    return get


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e["dataset"])
def test_shipped_ensemble_segments_each_example_and_ignores_the_other_domains(shipped, example):
    """As the gallery does it: the stored PNG with modality "auto" (/ 255, as in training), its own set's models at
    the set's threshold chosen on validation; the other prompts are those of the same set's other domains. (At 0.5
    the phantom ensemble answered 'breast mass' on the brain example with the tumour: at 0.7 it does not.)"""
    real = "credit" in example
    session = shipped(REAL_MODELS if real else PHANTOM_MODELS)
    assert session.operating_point is not None and session.threshold == session.operating_point["threshold"]
    image = np.asarray(Image.open(ASSETS / "examples" / example["image"]))
    others = [e["prompt"] for e in EXAMPLES if ("credit" in e) == real and e["dataset"] != example["dataset"]]
    assert len(others) == 2
    found = session.predictor.predict(image, example["prompt"])
    assert found.found and 0.001 < found.area_fraction < 0.3
    for prompt in others:
        assert session.predictor.predict(image, prompt).area_fraction < 0.01
