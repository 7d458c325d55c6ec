"""Checkpoints: safetensors + JSON, bit-exact round trip, backbone checks, ensembles sharing one backbone."""

from __future__ import annotations

import json

import pytest
import torch
from _demo_support import decisive_model
from safetensors.torch import load_file

from freqmedclip.modeling.backbone import random_clip_backbone
from freqmedclip.inference.checkpoint import (BackboneMismatchError, load_checkpoint, load_ensemble, read_checkpoint_header,
                                    save_checkpoint)


@pytest.mark.parametrize("variant", ["full", "no_dual_decoder", "unet_clip"])
def test_round_trip_is_bit_exact(tmp_path, mini_backbone, variant):
    model = decisive_model(mini_backbone, variant=variant)
    save_checkpoint(tmp_path, model, {"epoch": 3, "metrics": {"val_dice": 0.5}})
    loaded = load_checkpoint(tmp_path, mini_backbone)
    original, restored = model.trainable_state_dict(), loaded.trainable_state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    image = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(image, ["tumour", "nodule"]).logits, loaded(image, ["tumour", "nodule"]).logits)


def test_checkpoint_holds_only_trainable_weights_and_metadata(tmp_path, mini_backbone):
    model = decisive_model(mini_backbone)
    save_checkpoint(tmp_path, model, {"command": "python -m train.train", "metrics": {"dice": 0.9}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert not [k for k in stored if k.startswith(("text.clip_text.", "semantic.trunk."))]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(v.numel() for k, v in stored.items() if "running" not in k) >= trainable
    header = json.loads((tmp_path / "config.json").read_text())
    assert header["backbone"] == {"source": mini_backbone.source, "sha256": mini_backbone.weights_sha256}
    assert header["frequency_init"] == "random"
    assert header["metadata"]["metrics"] == {"dice": 0.9}
    assert header["config"]["variant"] == "full" and header["code_version"].startswith("0.")


def test_load_without_flags_reads_backbone_from_config(tmp_path, mini_backbone):
    model = decisive_model(mini_backbone)
    save_checkpoint(tmp_path, model)
    loaded = load_checkpoint(tmp_path)  # loads the backbone named in config.json by itself
    assert loaded.backbone_sha256 == mini_backbone.weights_sha256
    image = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(image, ["mass"]).logits, loaded(image, ["mass"]).logits, atol=1e-6)


def test_backbone_mismatch_is_reported(tmp_path, mini_backbone):
    save_checkpoint(tmp_path, decisive_model(mini_backbone))
    other = random_clip_backbone("mini")
    with pytest.raises(BackboneMismatchError, match="sha256"):
        load_checkpoint(tmp_path, other)
    with pytest.warns(UserWarning, match="sha256"):
        load_checkpoint(tmp_path, other, allow_backbone_mismatch=True)


def test_fp16_storage_round_trips_within_half_precision(tmp_path, mini_backbone):
    model = decisive_model(mini_backbone)
    save_checkpoint(tmp_path, model, dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in load_file(str(tmp_path / "model.safetensors")).values()
               if v.is_floating_point())
    loaded = load_checkpoint(tmp_path, mini_backbone)
    for name, value in model.trainable_state_dict().items():
        restored = loaded.trainable_state_dict()[name]
        assert restored.dtype == value.dtype
        assert torch.allclose(restored, value, rtol=1e-3, atol=1e-4), name


def test_bad_checkpoints_are_refused(tmp_path, mini_backbone):
    with pytest.raises(FileNotFoundError, match="not a FreqMedCLIP checkpoint"):
        read_checkpoint_header(tmp_path)
    save_checkpoint(tmp_path, decisive_model(mini_backbone))
    header = json.loads((tmp_path / "config.json").read_text())
    header["config"]["fusion"] = "concat"  # config no longer matches the stored weights
    (tmp_path / "config.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match="does not match its config"):
        load_checkpoint(tmp_path, mini_backbone)


def test_ensemble_shares_one_backbone(tmp_path, mini_backbone):
    for seed in (0, 1):
        save_checkpoint(tmp_path / f"seed{seed}", decisive_model(mini_backbone, seed))
    members = load_ensemble([tmp_path / "seed0", tmp_path / "seed1"])
    assert members[0].semantic.trunk is members[1].semantic.trunk
    assert members[0].text.clip_text is members[1].text.clip_text
    assert not torch.equal(members[0].head.skip.weight, members[1].head.skip.weight)
