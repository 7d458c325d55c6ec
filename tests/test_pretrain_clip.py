"""Contrastive pretraining of the mini CLIP (train/pretrain_clip.py) on a tiny phantom set: a few steps, CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from freqmedclip.modeling.backbone import create_clip_model, load_clip_backbone
from freqmedclip.modeling.text import TextEncoder
from train import pretrain_clip

ARGS = ["--epochs", "1", "--batch-size", "4", "--max-steps", "2", "--workers", "0", "--log-every", "0"]


@pytest.fixture(scope="module")
def tiny_phantoms(tmp_path_factory) -> Path:
    """3 subjects per domain (train/val/test one each, 4 images per subject)."""
    from freqmedclip.data.phantoms.generate import generate

    root = tmp_path_factory.mktemp("phantoms")
    generate(root, n_subjects=3, seed=0)
    return root


@pytest.fixture(scope="module")
def pretrained(tiny_phantoms, tmp_path_factory) -> tuple[Path, dict]:
    """A finished 2-step run whose output sits "inside the repository" (REPO_ROOT patched to a temp dir)."""
    repo = tmp_path_factory.mktemp("repo")
    out = repo / "assets" / "backbones" / "mini-clip"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretrain_clip, "REPO_ROOT", repo)
        metrics = pretrain_clip.main(["--data", str(tiny_phantoms), "--out", str(out), *ARGS])
    return out, metrics


def test_pretraining_writes_a_loadable_backbone_with_trained_weights(pretrained, tmp_path):
    out, metrics = pretrained
    assert metrics["finished"] and metrics["steps"] == 2
    for name in ("open_clip_config.json", "open_clip_model.safetensors", "config.json", "vocab.txt",
                 "tokenizer_config.json", "special_tokens_map.json", "pretrain_metrics.json"):
        assert (out / name).is_file(), name
    assert not (out / pretrain_clip.STATE_WEIGHTS).exists() and not (out / pretrain_clip.STATE_JSON).exists()
    text_cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == text_cfg["hf_tokenizer_name"] == "assets/backbones/mini-clip"
    assert text_cfg["hf_pooler_type"] == pretrain_clip.TEXT_POOLER

    backbone = load_clip_backbone(f"local-dir:{out}")          # our loader ignores the relative name
    torch.manual_seed(0)                                        # the run's --seed: same initialisation
    init = create_clip_model("mini", tmp_path).state_dict()
    trained = load_file(str(out / "open_clip_model.safetensors"))
    assert trained.keys() == init.keys()
    changed = [k for k in init if not torch.equal(init[k], trained[k])]
    assert any(k.startswith("visual.") for k in changed) and any(k.startswith("text.") for k in changed)
    assert torch.equal(backbone.visual.head.proj.weight, trained["visual.head.proj.weight"])
    assert type(backbone.text.pooler).__name__ == "MeanPooler"

    val = json.loads((out / "pretrain_metrics.json").read_text())["val"]
    assert val["n_images"] == 12 and val["domain_prompts"] == ["brain MRI", "mammogram", "lung CT"]
    for key in ("image_to_text_top1", "image_to_text_top5", "text_to_image_top1", "domain_accuracy"):
        assert 0.0 <= val[key] <= 1.0


def test_finished_run_is_skipped_and_other_arguments_are_refused(pretrained, tiny_phantoms):
    out, metrics = pretrained
    stamp = (out / "open_clip_model.safetensors").stat().st_mtime_ns
    again = pretrain_clip.main(["--data", str(tiny_phantoms), "--out", str(out), *ARGS])
    assert again["val"] == metrics["val"]
    assert (out / "open_clip_model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="already finished with other arguments"):
        pretrain_clip.main(["--data", str(tiny_phantoms), "--out", str(out), *ARGS, "--lr", "1e-3"])


def test_interrupted_run_resumes_from_its_state_files(tiny_phantoms, tmp_path, monkeypatch):
    out = tmp_path / "clip"

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_clip, "retrieval_metrics", interrupt)   # dies after the last epoch's state
    with pytest.raises(KeyboardInterrupt):
        pretrain_clip.main(["--data", str(tiny_phantoms), "--out", str(out), *ARGS])
    progress = json.loads((out / pretrain_clip.STATE_JSON).read_text())
    assert progress["epoch"] == 1 and progress["step"] == 2
    state = load_file(str(out / pretrain_clip.STATE_WEIGHTS))
    assert any(k.startswith("optim.") and k.endswith(".exp_avg_sq") for k in state)
    assert not (out / "open_clip_model.safetensors").exists()

    monkeypatch.undo()
    metrics = pretrain_clip.main(["--data", str(tiny_phantoms), "--out", str(out), *ARGS])
    assert metrics["steps"] == 2 and len(metrics["history"]) == 1           # nothing was trained twice
    final = load_file(str(out / "open_clip_model.safetensors"))
    assert {v.dtype for v in final.values() if v.is_floating_point()} == {torch.float16}   # --save-dtype fp16
    assert all(torch.equal(final[k], state[f"model.{k}"].to(final[k].dtype)) for k in final)


def test_foreign_directory_is_not_overwritten(tiny_phantoms, tmp_path):
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"someone else's weights")
    with pytest.raises(SystemExit, match="did not write"):
        pretrain_clip.main(["--data", str(tiny_phantoms), "--out", str(tmp_path), *ARGS])


def test_batches_never_repeat_a_text_and_keep_their_size(tiny_phantoms):
    items = pretrain_clip.image_texts(tiny_phantoms, "train")
    sampler = pretrain_clip.UniqueTextBatches(items, batch_size=4, seed=3)
    epochs = [list(sampler) for _ in range(1)]
    sampler.set_epoch(0)
    assert list(sampler) == epochs[0]                                       # deterministic for (seed, epoch)
    assert sampler.count_batches([0]) == [len(epochs[0])] and len(epochs[0]) >= 1
    seen = []
    for batch in epochs[0]:
        texts = [text for _, text in batch]
        assert len(batch) == 4 and len(set(texts)) == 4
        for index, text in batch:
            assert text == items[index].caption or text in items[index].phrasings
            seen.append(index)
    assert len(seen) == len(set(seen))                                      # each image at most once an epoch


def test_tokenizer_handles_unseen_words(mini_backbone):
    """The mini vocabulary falls back to sub-words and single characters: unseen Latin words never become [UNK]."""
    tokenizer = mini_backbone.tokenizer
    prompt = "Xylophone-shaped pneumatocele near the café, 28 mm (T2w)"
    ids = tokenizer(prompt)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == \
        "xylophone-shapedpneumatocelenearthecafe,28mm(t2w)"
    assert "lung" in tokenizer.convert_ids_to_tokens(tokenizer("lung nodule")["input_ids"])   # known words stay whole
    encoder = TextEncoder(mini_backbone.text, tokenizer)
    features = encoder([prompt, "肺结节 ≥ 3 μm"])        # scripts outside the vocabulary map to [UNK], no error
    assert torch.isfinite(features.pooled).all() and features.tokens.shape[0] == 2


def test_several_roots_are_pooled_and_each_image_read_from_its_own_root(tiny_phantoms, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_phantoms, other)
    one = pretrain_clip.image_texts(tiny_phantoms, "train")
    both = pretrain_clip.image_texts([tiny_phantoms, other], "train")
    assert len(both) == 2 * len(one)                      # the same sample ids in two roots stay two images
    assert [i.root for i in both] == [tiny_phantoms] * len(one) + [other] * len(one)
    (other / one[0].image).unlink()                       # the copy's file is gone: its item must fail, not fall back
    folder = pretrain_clip.ImageFolder(both, None)
    assert folder[0][0].shape == (3, 224, 224)
    with pytest.raises(FileNotFoundError):
        folder[len(one)]


def test_a_one_root_run_of_an_older_version_still_counts_as_the_same_data(tiny_phantoms, tmp_path):
    args = pretrain_clip.parse_args(["--data", str(tiny_phantoms), "--out", str(tmp_path), *ARGS])
    saved = {**pretrain_clip._result_args(args), "data": str(tiny_phantoms)}     # written as a string before
    pretrain_clip._check_same_run(saved, args, "already finished")               # no SystemExit
    with pytest.raises(SystemExit, match="other arguments"):
        pretrain_clip._check_same_run({**saved, "data": str(tmp_path)}, args, "already finished")
