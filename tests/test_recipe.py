"""train/recipes/phantom.sh and public.sh: the steps they run, in order, with a stand-in `python` that only records its calls."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "train" / "recipes" / "phantom.sh"
ENSEMBLE = "assets/phantom/checkpoints/mini-seed0,assets/phantom/checkpoints/mini-seed1,assets/phantom/checkpoints/mini-seed2"


@pytest.fixture
def recorded(tmp_path):
    """Run the recipe from a copy of the repository (so nothing real is touched) with a recording `python`."""
    if shutil.which("bash") is None:
        pytest.skip("needs bash")   # the recipes are bash scripts; a machine without it cannot run them at all
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "train", repo / "train", ignore=shutil.ignore_patterns("__pycache__"))
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    # records its call; a training call leaves runs/<config>-seed<seed>/best/config.json unless one exists
    # (or $NO_RUNS is set: a training that produced nothing)
    (bin_dir / "python").write_text(f"""#!/bin/sh
echo "$* [threads=$OMP_NUM_THREADS]" >> "{log}"
run=$(echo "$*" | sed -n 's/.*configs\\/\\([^ ]*\\)\\.yaml --seed \\([0-9]*\\).*/\\1-seed\\2/p')
case "$*" in *--run-dir*) run=$(echo "$*" | sed -n 's/.*--run-dir runs\\/\\([^ ]*\\).*/\\1/p');; esac
case "$*" in *train.pretrain_clip*) out=$(echo "$*" | sed -n 's/.*--out \\([^ ]*\\).*/\\1/p'); mkdir -p "$out"
    echo weights > "$out/open_clip_model.safetensors";; esac
if [ -n "$run" ] && [ -z "$NO_RUNS" ] && [ ! -f "runs/$run/best/config.json" ]; then
    mkdir -p "runs/$run/best" && echo {{}} > "runs/$run/best/config.json"
fi
""")
    (bin_dir / "python").chmod(0o755)

    def run(*args: str, recipe: str = "phantom.sh", **env: str) -> list[str]:
        log.unlink(missing_ok=True)
        environment = {k: v for k, v in os.environ.items() if k not in ("JOBS", "OMP_NUM_THREADS", "SEEDS", "MIRROR",
                                                                           "TRAIN_FLAGS")}
        environment.update(env, PATH=f"{bin_dir}:{os.environ['PATH']}")
        subprocess.run(["bash", str(repo / "train" / "recipes" / recipe), *args], env=environment, check=True,
                       capture_output=True, text=True)
        return log.read_text().splitlines()

    run.repo = repo
    return run


PREPARE = ["-m freqmedclip.data.public --out data/public --workers 2 [threads=]",   # the copy has no ../shared mirror
           "-m freqmedclip.data.phantoms --out data/phantoms --workers 2 [threads=]",
           "-m train.pretrain_clip --data data/public data/phantoms --epochs 6 --out assets/backbones/mini-clip-real "
           "[threads=]"]


def test_main_part_runs_data_backbone_five_trainings_publishing_and_evaluation_in_order(recorded):
    calls = recorded()
    assert calls[:3] == PREPARE     # one backbone for both recipes: the shipped one is only checked
    specs = (("full", 0), ("full", 1), ("full", 2), ("semantic_only", 0), ("frequency_only", 0))
    assert calls[3:8] == [f"-m train.train --config train/configs/phantom.yaml --variant {v} --seed {s} "
                          f"--run-dir runs/phantom_{v}-seed{s} [threads=]" for v, s in specs]
    assert calls[8:13] == [f"-m train.export runs/{run} {dest} --data data/phantoms --dtype fp16 [threads=]" for run, dest in
                           (("phantom_full-seed0", "assets/phantom/checkpoints/mini-seed0"),
                            ("phantom_full-seed1", "assets/phantom/checkpoints/mini-seed1"),
                            ("phantom_full-seed2", "assets/phantom/checkpoints/mini-seed2"),
                            ("phantom_semantic_only-seed0", "assets/phantom/baselines/mini_semantic_only"),
                            ("phantom_frequency_only-seed0", "assets/phantom/baselines/mini_frequency_only"))]
    # thresholds chosen on validation, the ensemble's shipped beside its members, then the test split once with them
    assert calls[13].startswith("-m train.operating_point --data data/phantoms --split val "
                                "--out results/phantom/operating_points.json ")
    assert calls[13].endswith("--ship FreqMedCLIP-mini (3-seed ensemble)="
                              "assets/phantom/checkpoints/operating_point.json [threads=]")
    assert calls[14].startswith("-m train.evaluate --data data/phantoms --split test --out results/phantom ")
    assert "--operating-points results/phantom/operating_points.json" in calls[14] and len(calls) == 15
    runs = [call.split("--runs ")[1].split(" --")[0] for call in calls[13:15]]
    assert runs[0] == runs[1] and f"FreqMedCLIP-mini (3-seed ensemble)={ENSEMBLE}" in runs[0]
    assert "Frequency only=assets/phantom/baselines/mini_frequency_only" in runs[0]


def test_rebuilding_the_backbone_pretrains_into_runs_and_copies_it_to_assets(recorded):
    calls = recorded(REBUILD_BACKBONE="1")
    assert calls[2] == ("-m train.pretrain_clip --data data/public data/phantoms --epochs 6 --out runs/mini-clip-real "
                        "[threads=]")
    shipped = recorded.repo / "assets" / "backbones" / "mini-clip-real" / "open_clip_model.safetensors"
    assert shipped.read_text() == "weights\n"      # what the recording pretraining wrote in runs/mini-clip-real


def test_two_jobs_train_with_one_thread_each(recorded):
    trainings = [c for c in recorded(JOBS="2") if c.startswith("-m train.train")]
    assert len(trainings) == 5 and all(c.endswith("[threads=1]") for c in trainings)


def test_an_up_to_date_checkpoint_is_not_published_again(recorded):
    run = recorded.repo / "runs" / "phantom_full-seed1" / "best"
    dest = recorded.repo / "assets" / "phantom" / "checkpoints" / "mini-seed1"
    run.mkdir(parents=True)
    dest.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    os.utime(run / "config.json", (1_000_000, 1_000_000))
    (dest / "config.json").write_text("{}")
    exports = [c for c in recorded() if c.startswith("-m train.export")]
    assert len(exports) == 4 and not any("runs/phantom_full-seed1 " in c for c in exports)


def test_ablations_train_every_table_4_variant_and_compare_with_the_shipped_seeds(recorded):
    calls = recorded("ablations")
    trainings = [c.split("--variant ")[1].split(" ")[0] for c in calls if c.startswith("-m train.train")]
    assert trainings == ["no_freq", "no_ffbi", "no_lffi", "no_dual_decoder", "no_tca"]
    assert calls[-1].startswith("-m train.evaluate")
    for seed in (0, 1, 2):   # seed 0 is the reference; seeds 1-2 give the seed-to-seed spread
        assert f"FreqMedCLIP-mini (seed {seed})=assets/phantom/checkpoints/mini-seed{seed}" in calls[-1]
    assert "no_tca=runs/phantom_no_tca-seed0" in calls[-1]
    assert '--full-method FreqMedCLIP-mini (seed 0)' in calls[-1]
    assert "--out results/phantom-ablations" in calls[-1]


def test_train_flags_reach_every_training_and_nothing_else(recorded):
    calls = recorded("ablations", TRAIN_FLAGS="--amp none")
    trainings = [c for c in calls if c.startswith("-m train.train")]
    assert len(trainings) == 5 and all(c.endswith("-seed0 --amp none [threads=]") for c in trainings)
    assert not any("--amp" in c for c in calls if not c.startswith("-m train.train"))


def test_publishing_refuses_a_run_that_does_not_exist(recorded):
    with pytest.raises(subprocess.CalledProcessError) as error:
        recorded(NO_RUNS="1")
    assert "runs/phantom_full-seed0/best/config.json is missing" in error.value.stderr


@pytest.mark.parametrize("jobs", ["0", "two"])
def test_jobs_must_be_a_positive_integer(recorded, jobs):
    with pytest.raises(subprocess.CalledProcessError) as error:
        recorded(JOBS=jobs)
    assert error.value.returncode == 2 and "JOBS must be a positive integer" in error.value.stderr


def test_unknown_stage_is_refused(recorded):
    with pytest.raises(subprocess.CalledProcessError) as error:
        recorded("everything")
    assert error.value.returncode == 2 and "usage" in error.value.stderr


def test_public_recipe_runs_data_backbone_trainings_publishing_and_evaluation_in_order(recorded):
    calls = recorded(recipe="public.sh")      # the copied repository has no ../shared mirror: it downloads
    assert calls[:3] == PREPARE
    specs = (("full", 0), ("full", 1), ("full", 2), ("frequency_only", 0), ("semantic_only", 0))
    assert calls[3:8] == [f"-m train.train --config train/configs/public.yaml --variant {v} --seed {s} "
                          f"--run-dir runs/public_{v}-seed{s} [threads=]" for v, s in specs]
    assert calls[8:13] == [f"-m train.export runs/{run} {dest} --data data/public --dtype fp32 [threads=]" for run, dest in
                           (("public_full-seed0", "assets/public/checkpoints/mini-seed0"),
                            ("public_full-seed1", "assets/public/checkpoints/mini-seed1"),
                            ("public_full-seed2", "assets/public/checkpoints/mini-seed2"),
                            ("public_semantic_only-seed0", "assets/public/baselines/mini_semantic_only"),
                            ("public_frequency_only-seed0", "assets/public/baselines/mini_frequency_only"))]
    members = ",".join(f"assets/public/checkpoints/mini-seed{s}" for s in (0, 1, 2))
    assert calls[13].startswith("-m train.operating_point --data data/public --split val "
                                "--out results/public/operating_points.json ")
    assert "assets/public/checkpoints/operating_point.json --per-domain" in calls[13]   # per domain: real data only
    assert calls[14].startswith("-m train.evaluate --data data/public --split test --out results/public ")
    assert f"FreqMedCLIP-mini (3-seed ensemble)={members}" in calls[14] and len(calls) == 15


def test_public_recipe_with_two_seeds_trains_and_ensembles_two(recorded, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    calls = recorded(recipe="public.sh", SEEDS="0 1", MIRROR=str(mirror))
    assert calls[0] == f"-m freqmedclip.data.public --out data/public --mirror {mirror} --workers 2 [threads=]"
    trainings = [c for c in calls if c.startswith("-m train.train")]
    assert [t.split("--run-dir ")[1].split(" ")[0] for t in trainings] == [
        "runs/public_full-seed0", "runs/public_full-seed1", "runs/public_frequency_only-seed0",
        "runs/public_semantic_only-seed0"]
    members = "assets/public/checkpoints/mini-seed0,assets/public/checkpoints/mini-seed1"
    assert f"FreqMedCLIP-mini (2-seed ensemble)={members}" in calls[-1]
