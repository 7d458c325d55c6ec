"""CLIP backbone loading (freqmedclip.modeling.backbone): offline, exact weights, clear errors, frozen.

The stand-in is the ``mini`` preset written at test time in BiomedCLIP's layout (conftest.py); the same files
are also served from a fake HuggingFace cache under the literal hub ids.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from conftest import BIOMEDBERT_ID, TOKENIZER_FILES, write_fake_hub_cache
from safetensors.torch import load_file, save_file

from freqmedclip.modeling.backbone import FETCH_COMMAND, BackboneNotFoundError, load_clip_backbone


def _saved_state(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "open_clip_model.safetensors"))


def _assert_same_weights(backbone, saved: dict[str, torch.Tensor]) -> None:
    ours = {f"visual.{k}": v for k, v in backbone.visual.state_dict().items()}
    ours.update({f"text.{k}": v for k, v in backbone.text.state_dict().items()})
    ours["logit_scale"] = backbone.logit_scale
    # position_ids / token_type_ids are non-persistent buffers in transformers >= 4.31 (not in the file)
    ours = {k: v for k, v in ours.items() if not k.endswith(("position_ids", "token_type_ids"))}
    assert sorted(ours) == sorted(saved)
    mismatched = [k for k in saved if not torch.equal(ours[k], saved[k])]
    assert mismatched == []


def _forbid_model_construction(monkeypatch) -> None:
    """A missing backbone must be reported before anything is built (so never a random init)."""
    import open_clip

    def refuse(*args, **kwargs):
        raise AssertionError("open_clip.create_model was called although the backbone is missing")

    monkeypatch.setattr(open_clip, "create_model", refuse)


def test_local_dir_loads_bit_identical_weights_offline(mini_backbone_dir, empty_hf_cache, no_network):
    backbone = load_clip_backbone(f"local-dir:{mini_backbone_dir}")
    saved = _saved_state(mini_backbone_dir)
    _assert_same_weights(backbone, saved)
    weights = mini_backbone_dir / "open_clip_model.safetensors"
    assert backbone.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert backbone.source == f"local-dir:{mini_backbone_dir}"
    config = json.loads((mini_backbone_dir / "open_clip_config.json").read_text())
    assert backbone.preprocess == config["preprocess_cfg"]
    # the shapes the mini preset promises: 12-block ViT-Tiny on a 14x14 grid, a 256-wide BERT
    assert len(backbone.visual.trunk.blocks) == 12
    assert backbone.visual.trunk.embed_dim == 192
    assert tuple(backbone.visual.trunk.patch_embed.grid_size) == (14, 14)
    assert backbone.text.config.hidden_size == 256


def test_literal_hub_id_loads_offline_from_the_cache(fake_hf_cache, mini_backbone_dir, no_network):
    config = json.loads((fake_hf_cache.snapshot / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"]["hf_model_name"] == BIOMEDBERT_ID          # as on the real hub
    assert not (fake_hf_cache.snapshot / "config.json").exists()
    backbone = load_clip_backbone(fake_hf_cache.source)
    assert backbone.source == "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    _assert_same_weights(backbone, _saved_state(mini_backbone_dir))
    # the BERT config and tokenizer came from the BiomedBERT repo in the cache
    assert backbone.text.config.hidden_size == 256
    assert backbone.tokenizer("left lung nodule")["input_ids"] == [2, *backbone.tokenizer.convert_tokens_to_ids(
        ["left", "lung", "nodule"]), 3]
    weights = fake_hf_cache.snapshot / "open_clip_pytorch_model.bin"
    assert backbone.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_missing_weights_in_local_dir_is_an_error_not_a_random_init(tmp_path, mini_backbone_dir, monkeypatch):
    for name in ("open_clip_config.json", "config.json", *TOKENIZER_FILES):
        (tmp_path / name).write_bytes((mini_backbone_dir / name).read_bytes())
    _forbid_model_construction(monkeypatch)
    with pytest.raises(BackboneNotFoundError, match="no weights found") as error:
        load_clip_backbone(f"local-dir:{tmp_path}")
    assert FETCH_COMMAND in str(error.value)
    assert "hf download microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224" in str(error.value)
    assert "open_clip_model.safetensors" in str(error.value)


def test_missing_weights_in_hub_cache_is_an_error(tmp_path, mini_backbone_dir, monkeypatch, no_network):
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "cache"
    write_fake_hub_cache(cache, mini_backbone_dir, weights=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    _forbid_model_construction(monkeypatch)
    with pytest.raises(BackboneNotFoundError, match="Refusing to continue with a randomly initialised") as error:
        load_clip_backbone("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
    assert FETCH_COMMAND in str(error.value)


def test_missing_config_is_a_clear_error(tmp_path, empty_hf_cache, no_network, monkeypatch):
    _forbid_model_construction(monkeypatch)
    with pytest.raises(BackboneNotFoundError, match="no open_clip_config.json in"):
        load_clip_backbone(f"local-dir:{tmp_path}")
    with pytest.raises(BackboneNotFoundError, match="neither in the HuggingFace cache nor downloadable") as error:
        load_clip_backbone("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
    assert FETCH_COMMAND in str(error.value)
    # a json that is not an open_clip config
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "open_clip_model.safetensors"))
    with pytest.raises(BackboneNotFoundError, match="has no 'model_cfg'"):
        load_clip_backbone(f"local-dir:{tmp_path}")


@pytest.mark.parametrize("source", ["microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "/tmp/mini-clip",
                                    "hf_hub:microsoft/x", "local:/tmp", ""])
def test_unknown_source_prefix_is_a_value_error(source):
    with pytest.raises(ValueError, match="must start with 'hf-hub:' or 'local-dir:'"):
        load_clip_backbone(source)


def test_legacy_text_config_keys_load(tmp_path, mini_backbone_dir):
    """Pre-2023 copies of BiomedCLIP name the keys "proj" / "pooler_type" (TECH.md 1.1)."""
    from open_clip.hf_model import ClsLastHiddenStatePooler

    for name in ("config.json", *TOKENIZER_FILES):
        (tmp_path / name).write_bytes((mini_backbone_dir / name).read_bytes())
    config = json.loads((mini_backbone_dir / "open_clip_config.json").read_text())
    text_cfg = config["model_cfg"]["text_cfg"]
    del text_cfg["hf_proj_type"], text_cfg["hf_pooler_type"]
    # "linear" differs from open_clip's default ("mlp") and "cls_last_hidden_state_pooler" from its default
    # ("mean_pooler"): the load below only succeeds (strictly) if both legacy values are honoured.
    text_cfg.update(proj="linear", pooler_type="cls_last_hidden_state_pooler")
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    state = {k: v for k, v in _saved_state(mini_backbone_dir).items() if not k.startswith("text.proj.")}
    state["text.proj.weight"] = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))

    backbone = load_clip_backbone(f"local-dir:{tmp_path}")
    assert isinstance(backbone.text.proj, torch.nn.Linear)
    assert torch.equal(backbone.text.proj.weight, state["text.proj.weight"])
    assert isinstance(backbone.text.pooler, ClsLastHiddenStatePooler)


def test_mini_tokenizer_never_needs_unk_for_ascii_letters(mini_backbone):
    tokenizer = mini_backbone.tokenizer
    unk = tokenizer.unk_token_id
    assert unk == 1
    for prompt in ["xylophone quixotic zygomatic jejunum", "Ünterschiedliche Läsion im Gehirn, naïve café",
                   "T2-weighted FLAIR hyperintensity (grade IV)!", "abcdefghijklmnopqrstuvwxyz 0123456789"]:
        ids = tokenizer(prompt)["input_ids"]
        assert unk not in ids, (prompt, tokenizer.convert_ids_to_tokens(ids))
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    # accents are stripped and case folded: these are the same token sequence
    assert tokenizer("Lésion NODULE")["input_ids"] == tokenizer("lesion nodule")["input_ids"]
    # known medical words stay whole; unseen words split into pieces
    assert tokenizer.tokenize("left lung nodule") == ["left", "lung", "nodule"]
    assert tokenizer.tokenize("zebra") == ["z", "##e", "##b", "##r", "##a"]


def test_backbone_is_frozen_and_in_eval_mode(mini_backbone):
    for tower in (mini_backbone.visual, mini_backbone.text):
        parameters = list(tower.parameters())
        assert len(parameters) > 10
        assert not any(p.requires_grad for p in parameters)
        assert not any(m.training for m in tower.modules())
    assert not mini_backbone.logit_scale.requires_grad


@pytest.mark.skipif(not os.getenv("FREQMEDCLIP_REAL_WEIGHTS"), reason="set FREQMEDCLIP_REAL_WEIGHTS=1 with the "
                    "real BiomedCLIP in the HuggingFace cache")
def test_real_biomedclip_loads():  # pragma: no cover - opt-in, needs the 784 MB download
    backbone = load_clip_backbone()
    assert backbone.visual.trunk.embed_dim == 768 and len(backbone.visual.trunk.blocks) == 12
    assert backbone.text.config.hidden_size == 768
