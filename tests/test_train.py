"""The trainer (train/train.py): configs, crash + resume = an unbroken run, non-finite stop, torchrun with 2 ranks.

Runs use the ``semantic_only`` variant (the cheapest trainable model) at batch 1 on 8 train and 5 val phantom
records, fp32, no DataLoader workers, so every run takes seconds and is bit-reproducible on CPU.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from freqmedclip.data.dataset import SegmentationDataset
from freqmedclip.data.format import write_manifest
from freqmedclip.data.phantoms.generate import generate
from train import state
from train import train as trainer

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO_ROOT / "train" / "configs").glob("*.yaml"))


class Crash(Exception):
    """Stands in for a kill -9 in the middle of an epoch."""


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny batches gain nothing from a second thread, and on a loaded machine lose a lot to it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """Phantoms (3 subjects per domain) cut to 8 train records (brain +/-, other domains -) and 5 val records
    spanning all three datasets (an odd count, so 2 ranks get unequal shares)."""
    root = tmp_path_factory.mktemp("phantoms")
    records = generate(root, n_subjects=3, seed=0, workers=1)

    def pick(split: str, dataset: str, positive: bool, n: int) -> list:
        return [r for r in records if (r.split, r.dataset, r.positive) == (split, dataset, positive)][:n]

    train = pick("train", "brain", True, 2) + pick("train", "brain", False, 2) + pick("train", "lung", False, 2) \
        + pick("train", "breast", False, 2)
    val = pick("val", "brain", True, 1) + pick("val", "brain", False, 1) + pick("val", "lung", True, 1) \
        + pick("val", "lung", False, 1) + pick("val", "breast", True, 1)
    assert len(train) == 8 and len(val) == 5
    write_manifest(root, train + val)
    return root


def run_args(data: Path, backbone_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO_ROOT / "train/configs/mini_semantic_only.yaml"), "--data", str(data),
            "--backbone", f"local-dir:{backbone_dir}", "--run-dir", str(run_dir), "--workers", "0", "--amp", "none",
            "--batch-size", "1", "--grad-accum", "2", "--max-steps", "2", "--val-every", "1", "--device", "cpu", *extra]


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_and_builds(config, mini_backbone):
    args = trainer.parse_args(["--config", str(config)])
    assert args.variant == (config.stem[len("mini_"):] if config.stem.startswith("mini_") else "full")
    assert args.preset == ("mini" if config.stem in ("public", "phantom") else config.stem.split("_")[0])
    assert args.run_dir == str(Path("runs") / f"{config.stem}-seed{args.seed}")   # seeds never share a run
    model = trainer.make_model(args, mini_backbone)
    assert (model.config.preset, model.config.variant) == (args.preset, args.variant)
    assert (model.config.bce_weight, model.config.semantic_aux_weight) == (args.bce_weight, args.alpha)
    assert model.config.loss_settings["bce_pos_weight"] == args.bce_pos_weight
    assert any(p.requires_grad for p in model.parameters())


def test_parser_defaults_and_full_config_are_table_2(tmp_path):
    table_2 = {"batch_size": 4, "grad_accum": 2, "lr": 1e-4, "t_max": 100, "epochs": 100, "patience": 10,
               "bce_weight": 1.0, "alpha": 0.4, "beta": 0.4, "bce_pos_weight": 1.0}
    for args in (trainer.parse_args([]), trainer.parse_args(["--config", str(REPO_ROOT / "train/configs/full.yaml")])):
        assert {k: getattr(args, k) for k in table_2} == table_2
    assert trainer.parse_args(["--config", str(REPO_ROOT / "train/configs/mini.yaml"), "--epochs", "3"]).epochs == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(SystemExit):
        trainer.parse_args(["--config", str(bad)])
    bad.write_text("variant: no_such_variant\n")
    with pytest.raises(SystemExit):
        trainer.parse_args(["--config", str(bad)])


def test_distributed_weighted_sampler_shards_one_balanced_draw():
    weights = torch.tensor([1.0] * 90 + [9.0] * 10)  # two groups of equal total mass
    shards = [trainer.DistributedWeightedSampler(weights, 3, rank, seed=7) for rank in range(3)]
    single = trainer.DistributedWeightedSampler(weights, 1, 0, seed=7)
    for sampler in (*shards, single):
        sampler.set_epoch(4)
    draws = [list(s) for s in shards]
    assert [len(d) for d in draws] == [34, 34, 34]
    full_draw = torch.multinomial(weights.double(), 102, True, generator=torch.Generator().manual_seed(7 * 1_000_003 + 4)).tolist()
    assert [x for triple in zip(*draws) for x in triple] == full_draw      # one draw, interleaved over ranks
    first = list(single)
    single.set_epoch(5)
    assert list(single) != first and len(first) == 100
    picks = []
    for epoch in range(20):
        single.set_epoch(epoch)
        picks += list(single)
    assert 0.42 < sum(i >= 90 for i in picks) / len(picks) < 0.58


def test_validation_grouped_by_image_counts_every_record_once_and_scores_like_one_record_at_a_time(
        tmp_path, mini_backbone):
    root = tmp_path / "phantoms"
    generate(root, n_subjects=3, seed=0, workers=1)
    val_set = SegmentationDataset(root, "val", train=False)
    images = {r.image for r in val_set.records}
    assert len(val_set) > len(images)        # several prompts per image, or grouping would prove nothing
    shards = [trainer.ImageGroups.of(val_set, rank, 2) for rank in range(2)]
    indices = [i for shard in shards for group in shard.groups for i in group]
    assert sorted(indices) == list(range(len(val_set)))                      # every record exactly once over ranks
    assert sum(len(s) for s in shards) == len(images)                        # one item per image
    for shard in shards:
        for group in shard.groups:
            assert len({val_set.records[i].image for i in group}) == 1
    capped = trainer.ImageGroups.of(val_set, max_prompts=2)             # a forward never exceeds --batch-size
    assert max(len(g) for g in capped.groups) == 2
    assert sorted(i for g in capped.groups for i in g) == list(range(len(val_set)))

    args = trainer.parse_args(["--config", str(REPO_ROOT / "train/configs/mini.yaml")])
    torch.manual_seed(0)
    model = trainer.make_model(args, mini_backbone).eval()
    names = sorted({r.dataset for r in val_set.records})
    grouped = trainer.evaluate(model, trainer.ImageGroups.of(val_set), names, torch.device("cpu"), "fp32")
    # the reference: each record alone through the model, batch 1, no shared image
    sums = {n: [0.0, 0, 0, 0] for n in names}
    with torch.no_grad():
        for item in val_set:
            pred = (model(item["image"][None], [item["prompt"]]).logits[0, 0] > 0).numpy()
            gt = item["mask"][0].numpy() > 0.5
            row = sums[item["dataset"]]
            if gt.any():
                row[0] += trainer.dice(pred, gt)
                row[1] += 1
            else:
                row[2] += float(pred.mean() < 0.01)
                row[3] += 1
    assert grouped["count"] == {n: s[1] + s[3] for n, s in sums.items()}
    for name, (dice_sum, positives, _, _) in sums.items():
        # shared and single forwards may take other kernels: a few of 224 x 224 pixels may flip at logit 0
        assert grouped["per_dataset"][name] == pytest.approx(dice_sum / positives, abs=0.005)
    negatives = sum(s[3] for s in sums.values())
    assert grouped["negative_empty_rate"] == pytest.approx(sum(s[2] for s in sums.values()) / negatives, abs=1e-9)


def test_publishing_swaps_directories_atomically(tmp_path):
    target = tmp_path / "latest"
    for text in ("1", "2"):
        with state.publishing(target) as tmp:
            (tmp / "weights").write_text(text)
    with pytest.raises(Crash), state.publishing(target) as tmp:
        (tmp / "weights").write_text("half")
        raise Crash
    assert (target / "weights").read_text() == "2"
    os.replace(target, tmp_path / ".latest.old")                             # killed between the two renames
    state.recover(target)
    assert (target / "weights").read_text() == "2"


def test_rerun_of_a_finished_run_returns_at_once_and_anything_else_takes_the_full_path(tiny_data, mini_backbone_dir,
                                                                                       tmp_path, monkeypatch):
    backbone = tmp_path / "backbone"
    shutil.copytree(mini_backbone_dir, backbone)
    run_dir = tmp_path / "run"
    first = trainer.main(run_args(tiny_data, backbone, run_dir, "--epochs", "1"))

    def set_up_again(*args, **kwargs):
        raise AssertionError("set up again")

    monkeypatch.setattr(trainer, "set_up", set_up_again)
    assert trainer.main(run_args(tiny_data, backbone, run_dir, "--epochs", "1")) == first   # nothing built
    for changed in (["--epochs", "2"], ["--epochs", "1", "--lr", "1e-3"], ["--epochs", "1", "--variant", "no_tca"]):
        with pytest.raises(AssertionError, match="set up again"):
            trainer.main(run_args(tiny_data, backbone, run_dir, *changed))
    weights = next(backbone.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b" ")            # the backbone rebuilt: its run must train again
    assert trainer.finished_run(trainer.parse_args(run_args(tiny_data, backbone, run_dir, "--epochs", "1"))) is None


def test_crash_and_rerun_matches_uninterrupted_run(tiny_data, mini_backbone_dir, tmp_path, monkeypatch):
    unbroken, crashed = tmp_path / "unbroken", tmp_path / "crashed"
    result = trainer.main(run_args(tiny_data, mini_backbone_dir, unbroken, "--epochs", "2"))
    assert result["epochs_done"] == 2

    calls, loss = 0, trainer.segmentation_loss

    def crash_in_epoch_2(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 8:  # epoch 1 has 2 steps x 2 micro-batches: this is epoch 2, after its first optimizer step
            raise Crash
        return loss(*args, **kwargs)

    monkeypatch.setattr(trainer, "segmentation_loss", crash_in_epoch_2)
    with pytest.raises(Crash):
        trainer.main(run_args(tiny_data, mini_backbone_dir, crashed, "--epochs", "2"))
    assert json.loads((crashed / "latest/train_state.json").read_text())["epoch"] == 1
    monkeypatch.setattr(trainer, "segmentation_loss", loss)
    assert trainer.main(run_args(tiny_data, mini_backbone_dir, crashed, "--epochs", "2"))["epochs_done"] == 2

    assert "resumed from" in (crashed / "log.txt").read_text()
    for name in ("model.safetensors", "train_state.safetensors"):
        a, b = load_file(str(unbroken / "latest" / name)), load_file(str(crashed / "latest" / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name                  # bit-exact, optimizer + RNG too
    states = [json.loads((run / "latest/train_state.json").read_text()) for run in (unbroken, crashed)]
    assert states[0] == states[1] and states[0]["epoch"] == 2                 # scheduler, Python/NumPy RNG, ...
    a, b = read_rows(unbroken), read_rows(crashed)
    assert [r["epoch"] for r in b] == [1, 2]
    same = ("train", "val", "lr", "step", "grad_norm")
    assert [[r[k] for k in same] for r in a] == [[r[k] for k in same] for r in b]
    header = json.loads((crashed / "best/config.json").read_text())
    assert header["metadata"]["command"][:3] == ["python", "-m", "train.train"]
    assert (crashed / "curves.png").stat().st_size > 0 and (crashed / "args.yaml").is_file()


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_data, mini_backbone_dir, tmp_path,
                                                                          monkeypatch):
    calls, loss = 0, trainer.segmentation_loss

    def nan_from_epoch_2(*args, **kwargs):
        nonlocal calls
        calls += 1
        terms = loss(*args, **kwargs)
        return terms._replace(total=terms.total * float("nan")) if calls > 2 else terms

    monkeypatch.setattr(trainer, "segmentation_loss", nan_from_epoch_2)
    run = tmp_path / "nan"
    with pytest.raises(SystemExit, match="2 consecutive non-finite steps"):
        trainer.main(run_args(tiny_data, mini_backbone_dir, run, "--grad-accum", "1", "--epochs", "3",
                              "--val-every", "5", "--nonfinite-patience", "2"))
    assert json.loads((run / "latest/train_state.json").read_text())["epoch"] == 1
    log = (run / "log.txt").read_text()
    assert "step skipped (1 in a row)" in log and "the last good checkpoint" in log
    assert [r["epoch"] for r in read_rows(run)] == [1]


def test_torchrun_two_processes_on_cpu(tiny_data, mini_backbone_dir, tmp_path):
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "train.train", *run_args(tiny_data, mini_backbone_dir, run, "--epochs", "1")]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    (row,) = read_rows(run)
    assert row["world_size"] == 2 and row["step"] == 2 and row["precision"] == "fp32"   # run_args: --amp none
    assert row["val"]["count"] == {"brain": 2, "breast": 1, "lung": 2}      # 5 records, none counted twice
    state = json.loads((run / "latest/train_state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert result.stdout.count("epoch 1/1 |") == 1                          # rank 0 logs, rank 1 is silent


def test_lr_factor_warms_up_then_follows_a_cosine_per_step():
    # 10 steps per epoch, t_max 2 epochs (20 steps), 5 warm-up steps: values by hand
    assert trainer.lr_factor(0, 10, 2, 5) == pytest.approx(1 / 5 * 1.0)
    assert trainer.lr_factor(4, 10, 2, 5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 20)))
    assert trainer.lr_factor(10, 10, 2, 0) == pytest.approx(0.5)                  # half-way: cos(pi / 2) = 0
    assert trainer.lr_factor(20, 10, 2, 0) == pytest.approx(0.0, abs=1e-12)
    assert trainer.lr_factor(35, 10, 2, 0) == pytest.approx(0.0, abs=1e-12)       # held at 0 after t_max


def test_validation_subset_keeps_evenly_spaced_images_of_each_dataset_with_all_their_prompts(tmp_path):
    root = tmp_path / "phantoms"
    generate(root, n_subjects=3, seed=0, workers=1)
    val_set = SegmentationDataset(root, "val", train=False)
    by_dataset: dict[str, list[str]] = {}
    for record in val_set.records:
        images = by_dataset.setdefault(record.dataset, [])
        if record.image not in images:
            images.append(record.image)
    assert all(len(images) == 4 for images in by_dataset.values())     # 1 val subject x 4 images per domain
    subset = trainer.ImageGroups.of(val_set, images_per_dataset=2)
    kept = [val_set.records[group[0]].image for group in subset.groups]
    assert sorted(kept) == sorted(images[i] for images in by_dataset.values() for i in (0, 2))   # round(i * 4 / 2)
    for group in subset.groups:                                          # each kept image keeps every prompt
        image = val_set.records[group[0]].image
        assert sorted(group) == [i for i, r in enumerate(val_set.records) if r.image == image]
    assert len(trainer.ImageGroups.of(val_set, images_per_dataset=10).groups) == len(trainer.ImageGroups.of(val_set))
