"""The demo's model sets and examples: the set table and its default, switching sets (cached, a failed load keeps
the old set), the "Trained on" line for real-data checkpoints, and the real examples with their credits."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from _demo_support import EXAMPLES, make_checkpoints

from freqmedclip.data.format import StructureRecord, write_manifest, write_sample
from freqmedclip.data.public.common import LICENCES
from freqmedclip.demo.examples import credits_line, load_examples, median_area_record, write_real_examples
from freqmedclip.demo.session import (
    COMMAND_LINE_MODELS,
    MODEL_ROOTS,
    MODEL_SETS,
    PHANTOM_MODELS,
    REAL_MODELS,
    ModelSets,
    SetupError,
    TrainingData,
    available_models,
    default_model_set,
    open_model_sets,
    set_roots,
    training_data,
    training_line,
)
from freqmedclip.inference.domain import DomainCheck


def _fake_config(folder: Path, data: str, per_dataset: tuple[str, ...], published: dict | None = None) -> Path:
    """A checkpoint folder holding only the config.json metadata the set table and the header read."""
    folder.mkdir(parents=True)
    metadata = {"args": {"data": data, "datasets": None},
                "metrics": {"val": {"per_dataset": {d: {"dice": 0.5} for d in per_dataset}}}}
    if published is not None:
        metadata["training_data"] = published
    (folder / "config.json").write_text(json.dumps({"format": "freqmedclip-checkpoint-v1", "metadata": metadata}))
    return folder


# ---------------------------------------------------------------- the set table

def test_the_table_covers_both_sets_and_their_baselines():
    assert list(MODEL_SETS) == [REAL_MODELS, PHANTOM_MODELS]             # real first: the default when shipped
    assert MODEL_SETS[REAL_MODELS].parts[-3:] == ("assets", "public", "checkpoints")
    assert MODEL_SETS[PHANTOM_MODELS].parts[-3:] == ("assets", "phantom", "checkpoints")
    assert [p.parts[-2:] for p in MODEL_ROOTS] == [("public", "checkpoints"), ("public", "baselines"),
                                                   ("phantom", "checkpoints"), ("phantom", "baselines")]


def test_default_is_the_first_set_holding_checkpoints(tmp_path):
    sets = {"real": tmp_path / "real" / "checkpoints", "phantom": tmp_path / "phantom" / "checkpoints"}
    _fake_config(sets["phantom"] / "mini-seed0", "data/phantoms", ("brain",))
    assert default_model_set(sets) == "phantom"                         # a clone without the real assets
    (sets["real"] / "mini-seed0").mkdir(parents=True)                   # a folder without config.json: no member
    assert default_model_set(sets) == "phantom"
    _fake_config(sets["real"] / "mini-seed1", "data/public", ("lgg",))
    assert default_model_set(sets) == "real"
    assert default_model_set({"none": tmp_path / "nothing"}) is None


def test_available_models_read_every_sets_checkpoints_and_baselines(tmp_path):
    sets = {"real": tmp_path / "public" / "checkpoints", "phantom": tmp_path / "phantom" / "checkpoints"}
    _fake_config(sets["real"] / "mini-seed0", "data/public", ("busbra", "lgg", "lidc"))
    _fake_config(tmp_path / "public" / "baselines" / "mini_semantic_only", "data/public", ("lgg",))
    _fake_config(sets["phantom"] / "mini-seed0", "data/phantoms", ("brain", "breast", "lung"))
    assert set_roots(sets) == (sets["real"], tmp_path / "public" / "baselines", sets["phantom"],
                               tmp_path / "phantom" / "baselines")
    assert available_models(set_roots(sets)) == {
        str(sets["real"] / "mini-seed0"): ("busbra", "lgg", "lidc"),
        str(tmp_path / "public" / "baselines" / "mini_semantic_only"): ("lgg",),
        str(sets["phantom"] / "mini-seed0"): ("brain", "breast", "lung"),
    }


# ---------------------------------------------------------------- switching

@pytest.fixture
def two_sets(tmp_path, mini_backbone):
    """Two loadable sets (1 and 2 decisive checkpoints on the stand-in backbone) and an empty one, in that order."""
    sets = {"first": tmp_path / "first" / "checkpoints", "second": tmp_path / "second" / "checkpoints",
            "empty": tmp_path / "empty" / "checkpoints"}
    make_checkpoints(sets["first"], mini_backbone, seeds=(0,))
    make_checkpoints(sets["second"], mini_backbone, seeds=(1, 2))
    return sets


def test_switching_loads_each_set_once_and_a_failed_load_keeps_the_old_set(two_sets):
    models = open_model_sets(sets=two_sets)
    assert models.names == ["first", "second", "empty"] and models.initial == "first"
    first = models.default
    assert first.n_members == 1 and set(first.available) == {str(p) for p in [
        two_sets["first"] / "mini-seed0", two_sets["second"] / "mini-seed1", two_sets["second"] / "mini-seed2"]}
    serving, message = models.switch("second", "first")
    assert serving == "second" and "Now serving **second** (2 checkpoints)" in message
    second = models.get("second")
    assert second.n_members == 2 and models.get("second") is second and models.get("first") is first   # cached
    serving, message = models.switch("empty", "second")
    assert serving == "second" and "Could not load empty" in message and "No FreqMedCLIP checkpoint found" in message
    assert "Still serving **second**" in message
    with pytest.raises(SetupError, match="unknown model set"):
        models.get("elsewhere")


def test_explicit_checkpoints_override_the_default_and_stay_one_choice(two_sets):
    models = open_model_sets([two_sets["second"] / "mini-seed2"], sets=two_sets)
    assert models.names == [COMMAND_LINE_MODELS, "first", "second", "empty"]
    assert models.initial == COMMAND_LINE_MODELS and models.default.n_members == 1
    assert models.switch("first", COMMAND_LINE_MODELS)[0] == "first"
    with pytest.raises(SetupError, match="No FreqMedCLIP checkpoint found in .*empty"):
        open_model_sets(sets={"empty": two_sets["empty"]})


def test_a_set_whose_files_appear_later_loads_on_the_next_try(two_sets, mini_backbone):
    models = open_model_sets(sets=two_sets)
    assert models.switch("empty", "first")[0] == "first"                # not cached as a failure
    make_checkpoints(two_sets["empty"], mini_backbone, seeds=(3,))
    assert models.switch("empty", "first")[0] == "empty" and models.get("empty").n_members == 1


def test_a_set_opens_at_the_threshold_chosen_for_that_whole_ensemble(two_sets):
    """operating_point.json in a set's folder is its default threshold (segment, update, workbench); a subset of
    its members, or explicit checkpoints from elsewhere, keep 0.5; a broken file is named."""
    folder = two_sets["second"]
    (folder / "operating_point.json").write_text(json.dumps({"threshold": 0.8, "split": "val"}))
    models = open_model_sets(sets=two_sets)
    assert models.default.threshold == 0.5 and "Default mask threshold" not in models.default.header()
    second = models.get("second")
    assert second.threshold == 0.8 and "Default mask threshold **0.8**, chosen for this ensemble on the `val`" \
        in second.header()
    image = EXAMPLES / "brain_whole_tumour.png"
    mask, _, info = second.segment(image, "whole tumour")
    assert info["threshold"] == 0.8
    _, _, low = second.segment(image, "whole tumour", threshold=0.5)
    assert np.array_equal(mask, second.segment(image, "whole tumour", threshold=0.8)[0])
    assert low["area_fraction"] > info["area_fraction"] > 0           # the decisive models' masks shrink at 0.8
    subset = open_model_sets([folder / "mini-seed1"], sets=two_sets).default
    assert subset.threshold == 0.5                                    # chosen for both members, not for one
    (folder / "operating_point.json").write_text('{"threshold": 0}')
    with pytest.raises(SetupError, match="operating_point.json: threshold must be a number strictly between"):
        open_model_sets(sets={"second": folder})


def test_an_image_gets_the_threshold_chosen_for_its_nearest_training_domain(two_sets, monkeypatch):
    """With per-domain thresholds in operating_point.json an image inside the training domains gets its nearest
    domain's (segment, update, workbench; the verdict says so); any other image gets the set's single one, and
    an explicit threshold (the slider) always wins."""
    folder = two_sets["second"]
    (folder / "operating_point.json").write_text(json.dumps({"threshold": 0.5, "split": "val",
                                                             "domain_thresholds": {"brain": 0.8}}))
    session = open_model_sets(sets=two_sets).get("second")
    assert session.domain_thresholds == {"brain": 0.8} and "brain MRI **0.8**" in session.header()
    inside = DomainCheck("brain", distance=1.0, threshold=2.0, zero_shot={"brain": 1.0})
    outside = DomainCheck("brain", distance=3.0, threshold=2.0, zero_shot={"brain": 1.0})
    elsewhere = DomainCheck("lung", distance=1.0, threshold=2.0, zero_shot={"lung": 1.0})
    # the domain of its most similar training images, where known, outranks the nearest by feature statistics
    assert session.threshold_for(replace(elsewhere, most_similar="brain"))[0] == 0.8
    assert session.threshold_for(replace(inside, most_similar="lung"))[0] == 0.5
    threshold, why = session.threshold_for(inside)
    assert threshold == 0.8 and "chosen on validation for brain MRI (brain), the training domain nearest" in why
    for check, reason in ((outside, "outside every training domain"), (elsewhere, "no threshold was chosen for lung"),
                          (None, "no domain reference")):
        threshold, why = session.threshold_for(check)
        assert threshold == 0.5 and reason in why

    monkeypatch.setattr(session, "check_domain", lambda tensor: inside)
    image = EXAMPLES / "brain_whole_tumour.png"
    assert session.segment(image, "whole tumour")[2]["threshold"] == 0.8
    loaded = session.load(image)
    panels = session.update(loaded, "whole tumour")
    at_08, at_05 = (session.update(loaded, "whole tumour", threshold=t) for t in (0.8, 0.5))
    assert np.array_equal(panels.mask, at_08.mask) and not np.array_equal(panels.mask, at_05.mask)
    assert "Mask threshold 0.8: the one chosen on validation for brain MRI" in panels.verdict
    assert "Mask threshold" not in at_05.verdict                      # the slider's value: nothing to explain
    bench = session.workbench(loaded, ["whole tumour"])
    assert np.array_equal(bench.masks[0], session.workbench(loaded, ["whole tumour"], threshold=0.8).masks[0])
    monkeypatch.setattr(session, "check_domain", lambda tensor: outside)
    assert session.segment(image, "whole tumour")[2]["threshold"] == 0.5


def test_single_wraps_an_injected_session(two_sets):
    session = open_model_sets(sets=two_sets).default
    models = ModelSets.single(session)
    assert models.names == [COMMAND_LINE_MODELS] and models.default is session


# ---------------------------------------------------------------- the "Trained on" line

def _header(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_header_for_published_real_data_checkpoints_names_the_datasets_and_the_nc_licence(tmp_path):
    published = {"root": "data/public", "datasets": ["busbra", "lgg", "lidc"],
                 "licences": {d: LICENCES[d] for d in ("busbra", "lgg", "lidc")}}
    folders = [_fake_config(tmp_path / f"mini-seed{k}", "data/public", ("busbra", "lgg", "lidc"), published)
               for k in range(3)]
    trained = [training_data(_header(f)) for f in folders]
    assert trained[0] == TrainingData("data/public", ("busbra", "lgg", "lidc"),
                                      tuple(sorted(published["licences"].items())))
    assert trained[0].real
    line = training_line(trained)
    assert line.startswith("**Trained on:** real patients from public datasets: brain MRI (lgg: LGG, TCGA-LGG via "
                           "TCIA), breast ultrasound (busbra: BUS-BRA), lung CT (lidc: LIDC-IDRI) (3 of 3 checkpoint(s) "
                           "record it; data root data/public).")
    assert "**Licence:** weights trained on the brain MRI data (lgg) fall under CC BY-NC-SA 4.0" in line
    assert line.count("**Licence:**") == 1                         # BUS-BRA and CC BY 3.0 carry no such terms
    assert "Not real patients" not in line and "Results on real public data" in line


def test_header_for_a_training_run_checkpoint_reads_the_validation_datasets(tmp_path):
    run = _fake_config(tmp_path / "latest", "data/public", ("busbra", "lgg", "lidc"))   # no export record yet
    trained = training_data(_header(run))
    assert trained == TrainingData("data/public", ("busbra", "lgg", "lidc")) and trained.real
    line = training_line([trained])
    assert "real patients from public datasets" in line and "1 of 1 checkpoint(s)" in line
    assert "CC BY-NC-SA 4.0" in line                                 # from the converter's licence table


def test_header_before_the_first_validation_reads_the_data_roots_train_split(tmp_path):
    data = _public_root(tmp_path / "public")
    early = _fake_config(tmp_path / "latest", str(data), ())                # epoch 1: no validation metrics yet
    assert training_data(_header(early)) == TrainingData(str(data), ("busbra", "lgg", "lidc"))
    gone = _fake_config(tmp_path / "elsewhere", str(tmp_path / "not-here"), ())
    assert training_data(_header(gone)) == TrainingData(str(tmp_path / "not-here"), ())


def test_header_keeps_saying_phantoms_are_not_patients(tmp_path):
    phantom = training_data(_header(_fake_config(tmp_path / "p", "data/phantoms", ("brain", "breast", "lung"))))
    assert not phantom.real
    line = training_line([phantom])
    assert "synthetic phantoms" in line and "Not real patients" in line and "Licence" not in line
    own = training_data(_header(_fake_config(tmp_path / "o", "data/mine", ("liver",))))
    assert training_line([own]).startswith("**Trained on:** data/mine: liver (liver)")   # neither real nor phantom


# ---------------------------------------------------------------- examples and their credits

def test_shipped_examples_are_labelled_and_real_ones_credited():
    examples = load_examples(EXAMPLES)
    real = {e.dataset: e for e in examples if e.real}
    phantoms = [e for e in examples if not e.real]
    assert list(real) == ["lgg", "busbra", "lidc"] and [e.dataset for e in phantoms] == ["brain", "breast", "lung"]
    assert {d: (e.modality, e.prompt) for d, e in real.items()} == {
        "lgg": ("MRI", "brain tumour"), "busbra": ("US", "breast lesion"), "lidc": ("CT", "lung nodule")}
    assert real["lgg"].label == "real brain MRI (lgg): brain tumour" and phantoms[0].label.startswith("phantom brain")
    line = credits_line(examples)
    for text in ("Buda et al.", "CC BY-NC-SA 4.0", "Gómez-Flores et al.", "BUS-BRA licence", "Armato et al.",
                 "CC BY 3.0", "**Phantom examples**", "no patient data"):
        assert text in line, text
    assert (EXAMPLES / "licenses" / "BUSBRA_LICENSE.txt").is_file() and (EXAMPLES / "LICENSES.md").is_file()


def _public_root(root: Path) -> Path:
    """A tiny converted public root: per dataset 4 test positives (areas 10, 20, 30, 40 px), a train positive
    larger than all, and a test negative."""
    records = []
    for dataset, structure, modality in (("lgg", "tumour", "MRI"), ("busbra", "lesion", "US"),
                                         ("lidc", "nodule", "CT")):
        for k, (split, area) in enumerate([("test", 40), ("test", 10), ("test", 30), ("test", 20), ("train", 90),
                                           ("test", 0)]):
            mask = np.zeros((16, 16), bool)
            mask.flat[:area] = True
            sample = f"{dataset}_{k}"
            image, masks = write_sample(root, sample, np.full((16, 16), 10 * k, np.uint8),
                                        {structure: mask} if area else {})
            records.append(StructureRecord(sample, f"{dataset}-p{k}", dataset, modality, structure,
                                           [f"{dataset} {structure}", "other"], image, masks.get(structure),
                                           (1.0, 1.0), (16, 16), "fake", split))
    write_manifest(root, records)
    (root / "licenses").mkdir()
    (root / "licenses" / "BUSBRA_LICENSE.txt").write_text("notice\n")
    (root / "LICENSES.md").write_text("# licences\n")
    return root


def test_real_examples_are_the_median_area_test_positive_and_keep_the_phantoms(tmp_path):
    data = _public_root(tmp_path / "public")
    out = tmp_path / "examples"
    out.mkdir()
    phantom = {"image": "brain_whole_tumour.png", "prompt": "whole tumour", "dataset": "brain", "modality": "MRI"}
    (out / "examples.json").write_text(json.dumps([phantom, {"image": "old.png", "prompt": "x", "dataset": "lgg",
                                                             "modality": "MRI", "credit": "old"}]))
    entries = json.loads(write_real_examples(data, out).read_text())
    assert [e["dataset"] for e in entries] == ["lgg", "busbra", "lidc", "brain"] and entries[-1] == phantom
    lgg = entries[0]
    # areas 10, 20, 30, 40: the lower median is 20 px (sample 3); the train image and the negative are never chosen
    assert lgg["sample_id"] == "lgg_3" and lgg["image"] == "lgg_tumour.png" and lgg["prompt"] == "lgg tumour"
    assert lgg["rule"].endswith("(20 px of 224x224)") and "CC BY-NC-SA 4.0" in lgg["credit"]
    assert (out / "lgg_tumour.png").read_bytes() == (data / "images" / "lgg_3.png").read_bytes()   # byte for byte
    assert (out / "licenses" / "BUSBRA_LICENSE.txt").read_text() == "notice\n" and (out / "LICENSES.md").is_file()
    assert json.loads(write_real_examples(data, out).read_text()) == entries                    # idempotent
    with pytest.raises(ValueError, match="no positive test record"):
        median_area_record(data, [])
