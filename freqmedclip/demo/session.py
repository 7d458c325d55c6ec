"""The demo's logic, everything but the layout: ``app.py`` only converts these results to Gradio values.

A :class:`DemoSession` wraps a :class:`~freqmedclip.inference.predictor.Predictor` (one model or an ensemble) and computes:

* :meth:`DemoSession.update`: one full update of every panel for an image and a prompt: the ensemble mean
  mask with its uncertainty and a verdict, both streams' Grad-CAMs, the Haar sub-bands the frequency encoder
  sees, the branch outputs sigma(L_s) and sigma(L_f), the prompt-sensitivity workbench and the mask exports;
* :meth:`DemoSession.workbench`: up to ``MAX_PROMPTS`` prompts and a control prompt in one batched forward;
* :meth:`DemoSession.explore`: FFBI attention from one bottleneck token, both directions;
* :meth:`DemoSession.segment`: the ``/segment`` API (file, prompt) -> mask and overlay.

Notable choices:
* Model work is serialised by one lock per session: the text-feature cache lives on shared modules, and parallel
  forwards would only compete for the same cores (results equal sequential ones).
* The workbench and the main prediction share one batched forward (main prompt, workbench prompts, control),
  and Grad-CAM reuses its encoder features: only the main prompt's decoding runs again, with gradients.
  Statistics are computed on the model's 224x224 grid; the main mask and its exports at the input's size.
* Text reliance = 1 - mean_i IoU(M_i, M_control) over the user's prompts i, where M_control is the mask of a
  nonsense control prompt. 0: every prompt gives the control's mask (the text is ignored); 1: no prompt's mask
  overlaps the control's (the text decides). Two empty masks count as identical (IoU 1).
* Explanations cannot mislead: the default Grad-CAM (ours, ``explain.features_gradcam``) is drawn in logit units
  on the fixed scale ``explain.GRADCAM_SCALE`` (averaged over the ensemble in those units), its raw maximum
  printed; the pytorch-grad-cam methods (``CAM_METHODS``) are min-max normalised per image and say so; an empty
  prediction draws no heat map at all ("nothing to explain"). FFBI attention is shown as its ratio to uniform
  attention (1/196) on a diverging log scale centred on uniform, with the maximum ratio printed.
* The workbench always contains the main prompt (first), and every update says when the image does not look like
  the selected models' training domains (:mod:`freqmedclip.inference.domain`) or when the checkpoints disagree.
* Model sets (``MODEL_SETS``: the real-data ensemble, the phantom one) are named folders of checkpoints; the page
  opens on the first that holds any (or on ``--checkpoint``) and :class:`ModelSets` loads the others on demand,
  once. The header says what the serving set was trained on: real patients (with the datasets and any
  non-commercial licence their weights inherit) or synthetic phantoms.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from freqmedclip.data.format import MANIFEST, read_manifest
from freqmedclip.data.public.common import LICENCES
from freqmedclip.demo import render
from freqmedclip.demo.uploads import (
    AUTO_WINDOW,
    Limits,
    LoadedImage,
    export_dir,
    export_mask_nifti,
    export_mask_png,
    load_upload,
    prune,
)
from freqmedclip.inference.domain import DomainCheck, DomainReference, caption_for, check_domain
from freqmedclip.inference.explain import (
    GRADCAM_SCALE,
    GRID_TOKENS,
    LIBRARY_CAM_METHODS,
    attention_ratio,
    library_cams,
    mean_cams,
)
from freqmedclip.inference import (
    ALL_ON,
    BANDS,
    HF_PREFIX,
    OPERATING_POINT_FILE,
    REPO_ROOT,
    BackboneMismatchError,
    InputError,
    Predictor,
    StreamCAMs,
    Switches,
    ffbi_attention,
    load_clip_backbone,
    load_ensemble,
    read_operating_point,
    resize_to,
    wavelet_bands,
)

MAX_PROMPTS = 6
CONTROL_PROMPT = "a purple elephant riding a bicycle"
EXPORT_MAX_AGE_S = 3600.0
ASSETS = REPO_ROOT / "assets"
REAL_MODELS = "Real public data (brain MRI, breast ultrasound, lung CT crops)"
PHANTOM_MODELS = "Synthetic phantoms"
COMMAND_LINE_MODELS = "Checkpoints from the command line"
# The model sets the page offers: name -> folder whose */config.json subfolders are one ensemble. Order matters:
# the first set whose folder holds checkpoints opens by default, so a clone without the real assets opens on the
# phantoms. Each set's baselines lie beside its checkpoints (<set>/baselines), for the out-of-distribution hints.
MODEL_SETS: dict[str, Path] = {
    REAL_MODELS: ASSETS / "public" / "checkpoints",
    PHANTOM_MODELS: ASSETS / "phantom" / "checkpoints",
}


def set_roots(sets: Mapping[str, Path]) -> tuple[Path, ...]:
    """Every set's checkpoint folder and the baselines beside it: where other models may be suggested from."""
    return tuple(root for folder in sets.values() for root in (Path(folder), Path(folder).parent / "baselines"))


MODEL_ROOTS = set_roots(MODEL_SETS)
DEFAULT_BACKBONE = "local-dir:assets/backbones/mini-clip-real"
DOMAIN_REFERENCES = ASSETS / "domains"
FAST_GRADCAM = "Grad-CAM (fast, fixed scale)"
CAM_METHODS = (FAST_GRADCAM, *LIBRARY_CAM_METHODS)
EMPTY_EXPLANATION = "Nothing to explain: the prediction is empty"
DISAGREEMENT_IOU = 0.5      # mean pairwise IoU of the members' masks below which the ensemble is said to disagree
RESULTS_SECTION = "README.md, section \"Results on the phantom benchmark\""
REAL_RESULTS_SECTION = "README.md, section \"Results on real public data\""
# Short source names of the public datasets (their licences: freqmedclip.data.public.common.LICENCES).
PUBLIC_SOURCES = {"lgg": "LGG, TCGA-LGG via TCIA", "busbra": "BUS-BRA", "lidc": "LIDC-IDRI"}
LOG = logging.getLogger("freqmedclip.demo")

BAND_TITLES = {"LL": "LL: local mean", "LH": "LH: horizontal edges", "HL": "HL: vertical edges",
               "HH": "HH: diagonal detail"}
# One or two lines under each panel: what it shows and how to read it.
PANEL_NOTES = {
    "cam-semantic": "Grad-CAM on **S1**, the semantic stream's 14×14 bottleneck (the ViT's last FPN level, the "
                    "token grid FFBI receives): where S1 raises the fused logit L of the predicted region.",
    "cam-frequency": "Grad-CAM on **F3**, the frequency stream's 14×14 stage-3 ConvNeXt features of the Haar "
                     "sub-bands (what FFBI receives): where F3 raises the fused logit L of the predicted region.",
    "branches": "σ(L_s) and σ(L_f): each decoder's own prediction (branch logits L_s, L_f). The fusion head "
                "(Eq. 18) combines them per pixel, L = head([L_s, L_f]), a learned two-layer 1×1 convolution.",
    "subbands": "One-level Haar DWT of the input, as the frequency encoder receives it: **LL** the local mean "
                "(2×2 average), **LH / HL / HH** the horizontal / vertical / diagonal detail (signed, one scale).",
    "ffbi": "FFBI cross-attention of the clicked 14×14 token, as a ratio to uniform attention (1/196 per token): "
            "white = uniform, red = more, blue = less (log scale, 1/8× to 8×). A flat panel means it reads "
            "everywhere alike.",
}

Progress = Callable[[float, str], None]


class SetupError(RuntimeError):
    """The demo cannot start (no checkpoint, wrong backbone); the message says what to do."""


def _no_progress(fraction: float, message: str) -> None:
    return None


# ---------------------------------------------------------------- prompt-sensitivity workbench (pure functions)

def with_main_prompt(prompts: Sequence[str], main: str, limit: int = MAX_PROMPTS) -> list[str]:
    """The workbench's prompts with the main prompt first (added when missing, the last one dropped if the list
    would exceed ``limit``)."""
    main = " ".join(main.split())
    rest = [p for p in prompts if p != main]
    return [main, *rest][:limit]


def parse_prompts(text: str | Sequence[str], limit: int = MAX_PROMPTS) -> list[str]:
    """Prompts from one-per-line (or ';'-separated) text: stripped, de-duplicated, at most ``limit``."""
    items = text.replace(";", "\n").splitlines() if isinstance(text, str) else list(text)
    prompts = list(dict.fromkeys(" ".join(p.split()) for p in items if p and p.strip()))
    if len(prompts) > limit:
        raise InputError(f"{len(prompts)} prompts given; the workbench compares at most {limit}")
    return prompts


def pairwise_iou(masks: np.ndarray) -> np.ndarray:
    """masks: (N, H, W) bool -> (N, N) IoU; two empty masks have IoU 1."""
    flat = masks.reshape(len(masks), -1).astype(np.float32)
    intersection = flat @ flat.T
    area = flat.sum(1)
    union = area[:, None] + area[None, :] - intersection
    return np.where(union > 0, intersection / np.maximum(union, 1.0), 1.0)


def text_reliance(iou: np.ndarray, control: int) -> float:
    """1 - mean IoU between each prompt's mask and the control prompt's mask (row/column ``control`` of iou)."""
    others = [i for i in range(len(iou)) if i != control]
    if not others:
        raise ValueError("text reliance needs at least one prompt besides the control")
    return float(1.0 - iou[others, control].mean())


@dataclass
class Workbench:
    """Prompt-sensitivity results on the 224x224 grid; the control prompt is last."""

    prompts: list[str]
    probabilities: np.ndarray       # (P + 1, 224, 224) float32
    masks: np.ndarray               # (P + 1, 224, 224) bool
    iou: np.ndarray                 # (P + 1, P + 1)
    area_fraction: np.ndarray       # (P + 1,)
    mean_probability: np.ndarray    # (P + 1,) mean probability inside the mask (0 where empty)
    text_reliance: float
    gallery: list[tuple[np.ndarray, str]] = field(default_factory=list)   # mask overlays with captions

    @classmethod
    def from_maps(cls, prompts: Sequence[str], probabilities: np.ndarray, threshold: float) -> Workbench:
        """prompts: P + 1 (control last); probabilities: (P + 1, H, W)."""
        masks = probabilities >= threshold
        iou = pairwise_iou(masks)
        area = masks.reshape(len(masks), -1).mean(1)
        inside = (probabilities * masks).reshape(len(masks), -1).sum(1)
        mean_probability = np.where(masks.any((1, 2)), inside / np.maximum(masks.reshape(len(masks), -1).sum(1), 1),
                                    0.0)
        return cls(list(prompts), probabilities, masks, iou, area, mean_probability,
                   text_reliance(iou, len(prompts) - 1))

    def labels(self) -> list[str]:
        return [*self.prompts[:-1], f"control: {self.prompts[-1]}"]

    def short_labels(self) -> list[str]:
        """Column headers that fit: "#1" .. "#P" and "control"."""
        return [*(f"#{i + 1}" for i in range(len(self.prompts) - 1)), "control"]

    def iou_rows(self) -> tuple[list[str], list[list[str | float]]]:
        """The IoU matrix as a table: short headers, rows named "#k prompt" (first column)."""
        names = [*(f"{short} {label}" for short, label in zip(self.short_labels(), self.labels()[:-1])),
                 self.labels()[-1]]
        rounded = np.round(self.iou.astype(np.float64), 3)
        return ["prompt", *self.short_labels()], [[names[i], *rounded[i].tolist()] for i in range(len(names))]

    def stats_rows(self) -> tuple[list[str], list[list[str | float]]]:
        """Per prompt: area (% of image), mean probability inside the mask, IoU with the control."""
        control = len(self.prompts) - 1
        headers = ["prompt", "area %", "mean p in mask", "IoU vs control"]
        rows = [[label, round(100 * float(self.area_fraction[i]), 2), round(float(self.mean_probability[i]), 3),
                 round(float(self.iou[i, control]), 3)] for i, label in enumerate(self.labels())]
        return headers, rows

    def summary(self) -> str:
        return (f"**Text reliance {self.text_reliance:.2f}** (1 - mean IoU between each prompt's mask and the "
                f"control's; 0 = the prompt is ignored, 1 = the prompt decides the mask).")


# ---------------------------------------------------------------- results of one update

@dataclass
class Panels:
    """Every panel of one update; images are uint8 (h[+bar], w, 3) at the display size (longer side <= 512)."""

    view: np.ndarray                          # (h, w, 3) the input as the model sees it
    overlay: np.ndarray                       # (h, w, 3) the fused mask as a two-tone contour over the view
    mask_view: np.ndarray                     # (h, w) bool fused mask
    mask: np.ndarray                          # (H, W) bool fused mask at the input's size
    found: bool
    verdict: str
    probability: np.ndarray                   # fused sigma(L) with colour bar
    uncertainty: np.ndarray | None            # ensemble spread with colour bar (None for one model)
    cam_semantic: np.ndarray | None
    cam_frequency: np.ndarray | None
    subbands: dict[str, np.ndarray]           # "LL", "LH", "HL", "HH" with colour bars (detail bands share a scale)
    branches: dict[str, np.ndarray]           # "semantic": sigma(L_s), "frequency": sigma(L_f) (if present)
    workbench: Workbench | None
    exports: list[Path]
    timings_ms: dict[str, float]
    cam_notes: dict[str, str] = field(default_factory=dict)   # "semantic", "frequency": what the panel shows
    explained: bool = True                    # False: empty prediction, no heat map drawn
    domain_note: str = ""                     # out-of-distribution / disagreement warning ("" when none)
    domain: DomainCheck | None = None


@dataclass(frozen=True)
class TrainingData:
    """What a checkpoint was trained on, from its config.json metadata (``train.train`` records the arguments,
    ``train.export`` the train split's datasets and their licences under ``training_data``)."""

    data: str | None                 # the data root (``--data``)
    domains: tuple[str, ...]         # the datasets (``--datasets``, else the validation metrics' per-dataset keys)
    licences: tuple[tuple[str, str], ...] = ()   # (dataset, licence line) as published with the weights

    @property
    def real(self) -> bool:
        """Trained on real patients: every dataset is one of the public sources (phantoms are not)."""
        return bool(self.domains) and all(d in LICENCES for d in self.domains)


def training_data(header: dict | None) -> TrainingData | None:
    """TrainingData from a checkpoint header (``model.checkpoint_header``); None when it records none."""
    metadata = (header or {}).get("metadata") or {}
    args = metadata.get("args") or {}
    published = metadata.get("training_data") or {}   # written by train.export; absent on training-run checkpoints
    domains = (published.get("datasets") or args.get("datasets")
               or list(((metadata.get("metrics") or {}).get("val") or {}).get("per_dataset") or {}))
    data = published.get("root") or args.get("data")
    if not data and not domains:
        return None
    if not domains and data:       # a training run's checkpoint before its first validation: ask the data root
        domains = _train_datasets(data)
    return TrainingData(data, tuple(sorted(domains)), tuple(sorted((published.get("licences") or {}).items())))


def _train_datasets(root: str) -> list[str]:
    """The datasets of ``root``'s train split (relative roots from the repository), [] when it is not here."""
    path = Path(root) if Path(root).is_absolute() else REPO_ROOT / root
    if not (path / MANIFEST).is_file():
        return []
    return sorted({r.dataset for r in read_manifest(path) if r.split == "train"})


def _licence_notes(known: Sequence[TrainingData], domains: Sequence[str]) -> list[str]:
    """The share-alike / non-commercial terms that weights trained on these datasets inherit, one per dataset:
    the licence recorded with the weights, else the one the converter publishes for that source."""
    recorded = {d: text for t in known for d, text in t.licences}
    notes = []
    for domain in domains:
        licence = recorded.get(domain) or LICENCES.get(domain, "")
        if "NC" in licence.split("(")[0]:         # CC BY-NC(-SA): the licence's name, not its citation, says so
            notes.append(f"**Licence:** weights trained on the {caption_for(domain)} data ({domain}) fall under "
                         f"{licence}.")
    return notes


def training_line(trained: Sequence[TrainingData | None]) -> str:
    """One line for the header: what the selected checkpoints were trained on (real patients or phantoms)."""
    known = [t for t in trained if t is not None]
    if not known:
        return f"Training data: not recorded in the {len(trained)} checkpoint(s)' config.json."
    roots = sorted({t.data for t in known if t.data})
    domains = sorted({d for t in known for d in t.domains})
    phantom = any("phantom" in root for root in roots)
    real = not phantom and all(t.real for t in known)
    record = f"({len(known)} of {len(trained)} checkpoint(s) record it; data root {', '.join(roots) or '?'})"
    if real:
        domains = sorted(domains, key=caption_for)              # brain, breast, lung: as the selector names them
        what = ", ".join(f"{caption_for(d)} ({d}: {PUBLIC_SOURCES.get(d, d)})" for d in domains)
        return " ".join([f"**Trained on:** real patients from public datasets: {what} {record}.",
                         *_licence_notes(known, domains), f"Results in {REAL_RESULTS_SECTION}."])
    what = ", ".join(f"{caption_for(d)} ({d})" for d in domains) or "unrecorded datasets"
    line = (f"**Trained on:** {'synthetic phantoms' if phantom else ', '.join(roots) or 'unrecorded data'}: {what}"
            f" {record}.")
    if phantom:
        line += f" Not real patients; results in {RESULTS_SECTION}."
    return line


def available_models(roots: Sequence[Path] = MODEL_ROOTS) -> dict[str, tuple[str, ...]]:
    """Checkpoint folders under ``roots`` (``*/config.json``) and the domains each was trained on."""
    found = {}
    for root in roots:
        for config in sorted(Path(root).glob("*/config.json")) if Path(root).is_dir() else []:
            trained = training_data(json.loads(config.read_text()))
            found[str(config.parent)] = trained.domains if trained else ()
    return found


def _outside_evidence(check: DomainCheck) -> str:
    """Every signal's value beside its validation threshold, the ones that fired first: what the warning rests on."""
    parts = {"distance": f"its CLIP feature distance to the nearest, {caption_for(check.nearest)}, is "
                         f"{check.distance:.2f} (outside above {check.threshold:.2f})"}
    if check.similarity is not None and check.similarity_threshold is not None:
        parts["similarity"] = (f"its CLIP embedding's similarity to the nearest training images is "
                               f"{check.similarity:.2f} (outside below {check.similarity_threshold:.2f})")
    if check.pixel_distance is not None and check.pixel_threshold is not None:
        parts["pixels"] = (f"its pixel statistics (sharpness, colour, contrast) are at distance "
                           f"{check.pixel_distance:.2f} from the nearest training images (outside above "
                           f"{check.pixel_threshold:.2f})")
    fired = [parts[r] for r in check.reasons]
    rest = [text for name, text in parts.items() if name not in check.reasons]
    return ("; ".join(fired) + (f" (within range: {'; '.join(rest)})" if rest else "")
            + "; thresholds set from held-out validation images")


def domain_note(check: DomainCheck | None, trained: Sequence[str], members_iou: float | None,
                available: dict[str, tuple[str, ...]]) -> str:
    """Markdown warning beside the verdict when the image looks like none of the training domains, lies nearest a
    domain the selected models were not trained on, or the checkpoints disagree; "" when none applies."""
    lines = []
    if check is not None and check.outside:
        others = sorted({d for domains in available.values() for d in domains} - set(trained))
        suggestion = (f"Checkpoints trained on {', '.join(others)} exist: " + ", ".join(
            f"`{path}`" for path, domains in available.items() if set(domains) & set(others)) if others else
            "No available checkpoint was trained on other images, so none would be better; treat the masks as "
            "meaningless.")
        lines.append(f"### Outside the training data\nThis image does not look like anything the selected models "
                     f"were trained on ({', '.join(caption_for(d) for d in trained) or 'unknown'}): "
                     f"{_outside_evidence(check)}. {suggestion}")
    elif check is not None and trained and check.nearest not in trained:
        lines.append(f"### Different domain\nThe image looks like {caption_for(check.nearest)}, which the selected "
                     f"models were not trained on.")
    if members_iou is not None and members_iou < DISAGREEMENT_IOU:
        lines.append(f"**The checkpoints disagree:** mean pairwise IoU of their masks {members_iou:.2f} "
                     f"(below {DISAGREEMENT_IOU}); the ensemble mean is unreliable here.")
    return "\n\n".join(lines)


def controls_for(loaded: LoadedImage | None) -> tuple[bool, bool]:
    """(show the CT window, show the NIfTI axis): the window for DICOM/NIfTI CT, the axis for NIfTI volumes."""
    if loaded is None:
        return False, False
    return loaded.kind in ("dicom", "nifti") and loaded.modality == "CT", loaded.kind == "nifti"


def _timed(timings: dict[str, float], name: str, start: float) -> float:
    now = time.perf_counter()
    timings[name] = round((now - start) * 1000, 1)
    return now


class DemoSession:
    """The demo's model and limits; thread-safe (one lock serialises model work).

    Args:
        predictor: a Predictor over one model or an ensemble.
        limits: upload limits.
        exports: folder for mask exports (default: a fresh folder under the system temp directory).
    """

    def __init__(self, predictor: Predictor, limits: Limits | None = None, exports: Path | None = None,
                 domain_reference: DomainReference | None = None,
                 available: dict[str, tuple[str, ...]] | None = None,
                 operating_point: dict[str, Any] | None = None) -> None:
        self.predictor = predictor
        # the ensemble's threshold chosen on validation (train.operating_point): the page's default mask threshold
        self.operating_point = operating_point
        if operating_point is not None:
            predictor.threshold = float(operating_point["threshold"])
        self.limits = limits or Limits(max_pixels=predictor.max_pixels)
        self.exports = Path(exports) if exports is not None else export_dir()
        self.lock = threading.Lock()
        self.trained = [training_data(getattr(m, "checkpoint_header", None)) for m in predictor.models]
        backbone = predictor.models[0].clip_backbone
        if domain_reference is not None and domain_reference.backbone_sha256 != backbone.weights_sha256:
            domain_reference = None          # built on another backbone's features: meaningless here
        self.domain_reference = domain_reference
        self.available = available if available is not None else {}

    @property
    def training_domains(self) -> list[str]:
        return sorted({d for t in self.trained if t is not None for d in t.domains})

    @property
    def threshold(self) -> float:
        """The default mask threshold: the operating point's, else the Predictor's (0.5)."""
        return self.predictor.threshold

    @property
    def domain_thresholds(self) -> dict[str, float]:
        """Thresholds chosen on validation per training domain (``train.operating_point --per-domain``), if any."""
        point = self.operating_point or {}
        return {domain: float(t) for domain, t in point.get("domain_thresholds", {}).items()}

    def threshold_for(self, domain: DomainCheck | None) -> tuple[float, str]:
        """The default threshold for an image, and a line saying why: the threshold of its likeliest training domain
        (:attr:`DomainCheck.likeliest`) when one was chosen for it and the image lies inside the training domains,
        else the set's single one."""
        thresholds = self.domain_thresholds
        if not thresholds:
            return self.threshold, ""
        if domain is not None and not domain.outside and domain.likeliest in thresholds:
            chosen = thresholds[domain.likeliest]
            return chosen, (f"Mask threshold {chosen:g}: the one chosen on validation for "
                            f"{caption_for(domain.likeliest)} ({domain.likeliest}), the training domain nearest "
                            "this image.")
        why = ("no domain reference for these models" if domain is None else
               "the image is outside every training domain" if domain.outside else
               f"no threshold was chosen for {domain.likeliest}")
        return self.threshold, f"Mask threshold {self.threshold:g}: this set's single threshold ({why})."

    def default_threshold(self, tensor: Tensor) -> float:
        """:meth:`threshold_for` the (1, 3, 224, 224) image; the domain check runs only where it matters."""
        return self.threshold_for(self.check_domain(tensor) if self.domain_thresholds else None)[0]

    def header(self) -> str:
        line = training_line(self.trained)
        if self.operating_point is None:
            return line
        point = self.operating_point
        line = (f"{line} Default mask threshold **{self.threshold:g}**, chosen for this ensemble on the "
                f"`{point.get('split', '?')}` split ({OPERATING_POINT_FILE})")
        if not self.domain_thresholds:
            return line + "."
        per_domain = ", ".join(f"{caption_for(d)} **{t:g}**" for d, t in self.domain_thresholds.items())
        return f"{line}; per domain, for an image of that domain: {per_domain}."

    def check_domain(self, tensor: Tensor) -> DomainCheck | None:
        """The image's relation to the training domains; None without a domain reference for this backbone."""
        if self.domain_reference is None:
            return None
        with self.lock:
            return check_domain(self.predictor.models[0].clip_backbone, self.domain_reference, tensor,
                                self.training_domains or None)

    @property
    def n_members(self) -> int:
        return len(self.predictor.models)

    @property
    def has_ffbi(self) -> bool:
        config = self.predictor.models[0].config
        return config.streams == "both" and config.fusion == "ffbi"

    def load(self, path: str | Path, modality: str = "auto", window: str = AUTO_WINDOW,
             slice_index: int | None = None, axis: int = 2) -> LoadedImage:
        return load_upload(path, modality=modality, window=window, slice_index=slice_index, axis=axis,
                           limits=self.limits)

    def view(self, loaded: LoadedImage) -> np.ndarray:
        """The display copy (h, w, 3) uint8 of the input, longer side <= 512."""
        return render.resize_rgb(loaded.display, render.view_size(*loaded.size))

    def prepare(self, loaded: LoadedImage) -> Tensor:
        """(1, 3, 224, 224) model input in [0, 1] on the predictor's device."""
        tensor, _ = self.predictor.prepare(loaded.array, loaded.modality, loaded.window)
        return tensor

    def _forward(self, tensor: Tensor, prompts: list[str], switches: Switches,
                 explain: str | None = None) -> dict[str, Tensor | StreamCAMs | None]:
        with self.lock:
            return self.predictor.predict_tensor(tensor, prompts, switches, explain)

    def workbench(self, loaded: LoadedImage | None, prompts: str | Sequence[str], control: str = CONTROL_PROMPT,
                  threshold: float | None = None, switches: Switches = ALL_ON,
                  main_prompt: str | None = None) -> Workbench:
        """Up to ``MAX_PROMPTS`` prompts and the control on one image, in one batched forward; ``main_prompt``
        (the demo's Prompt box) is always among them, first."""
        loaded = _require(loaded)
        prompt_list = parse_prompts(prompts)
        if main_prompt and main_prompt.strip():
            prompt_list = with_main_prompt(prompt_list, main_prompt)
        if not prompt_list:
            raise InputError("enter at least one prompt for the workbench (one per line)")
        control = _clean(control, "control prompt")
        batch = list(dict.fromkeys([*prompt_list, control]))
        tensor = self.prepare(loaded)
        if threshold is None:
            threshold = self.default_threshold(tensor)
        maps = self._forward(tensor, batch, switches)
        return self._workbench_from(maps["probability"], batch, prompt_list, control, threshold, self.view(loaded))

    def _workbench_from(self, probability: Tensor, batch: list[str], prompts: list[str], control: str,
                        threshold: float, view: np.ndarray) -> Workbench:
        order = [batch.index(p) for p in [*prompts, control]]
        maps = probability[order, 0].float().cpu().numpy()
        bench = Workbench.from_maps([*prompts, control], maps, threshold)
        base = render.resize_rgb(view, render.view_size(*view.shape[:2], 256))
        bench.gallery = [(render.halo_outline(base, bench.masks[i]),
                          f"{short} {_shorten(text, 16)} · {100 * bench.area_fraction[i]:.1f}%")
                         for i, (short, text) in enumerate(zip(bench.short_labels(), bench.prompts, strict=True))]
        return bench

    def update(self, loaded: LoadedImage | None, prompt: str, *, threshold: float | None = None,
               switches: Switches = ALL_ON, workbench_prompts: str | Sequence[str] = (),
               control: str = CONTROL_PROMPT, progress: Progress = _no_progress,
               cam_method: str = FAST_GRADCAM) -> Panels:
        """One full update of every panel for ``loaded`` and ``prompt``; ``cam_method`` one of ``CAM_METHODS``;
        ``threshold`` None = :meth:`threshold_for` the image (its domain's, where chosen, else :attr:`threshold`)."""
        timings: dict[str, float] = {}
        start = clock = time.perf_counter()
        loaded = _require(loaded)
        prompt = _clean(prompt, "prompt")
        if cam_method not in CAM_METHODS:
            raise InputError(f"unknown CAM method {cam_method!r}; choose one of {', '.join(CAM_METHODS)}")
        bench_prompts = parse_prompts(workbench_prompts)
        bench_prompts = with_main_prompt(bench_prompts, prompt) if bench_prompts else []
        control = _clean(control, "control prompt")
        progress(0.05, "preparing the image")
        tensor = self.prepare(loaded)
        view = self.view(loaded)
        size, view_hw = loaded.size, view.shape[:2]
        domain = self.check_domain(tensor)
        threshold, threshold_note = (threshold, "") if threshold is not None else self.threshold_for(domain)
        clock = _timed(timings, "prepare", clock)

        progress(0.15, "segmenting (all prompts in one batch) and Grad-CAM of both streams")
        batch = list(dict.fromkeys([prompt, *bench_prompts, control]))
        maps = self._forward(tensor, batch, switches, explain=prompt)
        clock = _timed(timings, "forward+gradcam", clock)
        main = batch.index(prompt)
        probability = maps["probability"][main:main + 1].float()                        # (1, 1, 224, 224)
        full = resize_to(probability, size)[0, 0].cpu().numpy()
        mask = full >= threshold
        probability_view = render.resize_map(probability[0, 0].cpu().numpy(), view_hw)
        mask_view = probability_view >= threshold
        spread = maps["members"][:, main:main + 1].float().std(0, unbiased=False) if self.n_members > 1 else None
        inside = probability[0, 0] >= threshold                                         # the mask at 224
        spread_inside = None if spread is None or not inside.any() else float(spread[0, 0][inside].mean())
        verdict = self._verdict(prompt, full, mask, loaded, threshold, spread_inside)
        if threshold_note:
            verdict += "\n\n" + threshold_note
        if switches != ALL_ON:
            reference = self._forward(tensor, [prompt], ALL_ON)["probability"][0, 0].float().cpu().numpy()
            verdict += "\n\n" + _ablation_note(switches, probability[0, 0].cpu().numpy() >= threshold,
                                               reference >= threshold)

        progress(0.75, "sub-bands, branches, workbench")
        bands = wavelet_bands(tensor)
        # one colour scale for the three detail bands (their relative energy is the point), robust to a few edges
        detail_scale = max(float(np.percentile(np.abs(np.stack([bands[b] for b in BANDS[1:]])), 99.5)), 1e-6)
        band_size = render.view_size(*view_hw, 224)
        subbands = {"LL": render.gray_panel(bands["LL"], band_size)}
        subbands |= {name: render.signed_panel(bands[name], detail_scale, band_size) for name in BANDS[1:]}
        subbands = {name: render.titled(panel, BAND_TITLES[name]) for name, panel in subbands.items()}
        branches = {key: render.heat_panel(view, maps[key][main, 0].float().cpu().numpy(), "viridis", 0.6, "p = 1",
                                           "p = 0") for key in ("semantic", "frequency") if maps[key] is not None}
        explained = bool(mask.any())
        cams, cam_notes = self._cam_panels(maps["gradcam"], tensor, prompt, switches, cam_method, view, explained,
                                           threshold)
        members_masks = (maps["members"][:, main, 0] >= threshold).cpu().numpy()
        members_iou = None
        if self.n_members > 1 and members_masks.any():
            iou = pairwise_iou(members_masks)
            members_iou = float(iou[np.triu_indices(len(iou), 1)].mean())
        warning = domain_note(domain, self.training_domains, members_iou, self.available)
        bench = None
        if bench_prompts:
            bench = self._workbench_from(maps["probability"], batch, bench_prompts, control, threshold, view)
        uncertainty = None
        if spread is not None:
            scale = max(float(spread.max()), 1e-6)
            uncertainty = render.heat_panel(view, spread[0, 0].cpu().numpy() / scale, "magma", 0.6,
                                            high=f"std {scale:.3f}", low="0 (members agree)")
        clock = _timed(timings, "render", clock)

        progress(0.9, "writing the mask files")
        prune(self.exports, EXPORT_MAX_AGE_S)
        exports = [export_mask_png(mask, self.exports, loaded.name)]
        if loaded.geometry is not None:
            exports.append(export_mask_nifti(mask, loaded, self.exports))
        _timed(timings, "export", clock)
        timings["total"] = round((time.perf_counter() - start) * 1000, 1)
        return Panels(view=view, overlay=render.halo_outline(view, mask_view), mask_view=mask_view, mask=mask,
                      found=bool(mask.any()), verdict=verdict,
                      probability=render.heat_panel(view, probability_view, "viridis", 0.6, "p = 1", "p = 0"),
                      uncertainty=uncertainty, cam_semantic=cams[0], cam_frequency=cams[1], subbands=subbands,
                      branches=branches, workbench=bench, exports=exports, timings_ms=timings, cam_notes=cam_notes,
                      explained=explained, domain_note=warning, domain=domain)

    def _cam_panels(self, fast: StreamCAMs, tensor: Tensor, prompt: str, switches: Switches, method: str,
                    view: np.ndarray, explained: bool,
                    threshold: float) -> tuple[list[np.ndarray | None], dict[str, str]]:
        """Both streams' CAM panels and their captions: the empty state, our Grad-CAM on the fixed logit scale,
        or a pytorch-grad-cam method (min-max per image)."""
        streams = ("semantic", "frequency")
        present = {name: getattr(fast, name) is not None for name in streams}
        if not explained or fast.empty:   # fast.empty: no member predicts p > 0.5, the Grad-CAM target's region
            level = max(threshold, 0.5) if explained else threshold
            lines = [EMPTY_EXPLANATION, f"(no pixel reaches p >= {level:.2f})"]
            note = f"**{EMPTY_EXPLANATION}** (no pixel reaches p ≥ {level:.2f}); no heat map is drawn."
            return ([render.notice_panel(view, lines) if present[n] else None for n in streams],
                    {n: note if present[n] else "This model has no such stream." for n in streams})
        if method == FAST_GRADCAM:
            panels, notes = [], {}
            for name in streams:
                raw = getattr(fast, f"{name}_logit")
                if raw is None:
                    panels.append(None)
                    notes[name] = "This model has no such stream."
                    continue
                panels.append(render.scaled_heat_panel(view, raw, GRADCAM_SCALE, "logit"))
                notes[name] = (f"Max {float(raw.max()):.4f} logit per token (colour bar fixed at 0–{GRADCAM_SCALE:g} "
                               f"for every image; target: the mean fused logit in the predicted region).")
            return panels, notes
        with self.lock:
            cams = mean_cams([library_cams(model, tensor, prompt, method, switches) for model in
                              self.predictor.models])
        panels = [None if cam is None else render.heat_panel(view, cam, "jet", 0.5, "per-image max", "min")
                  for cam in cams]
        notes = {name: (f"{method} (pytorch-grad-cam), min-max normalised per image: shows where, not how much; "
                        f"not comparable across images." if getattr(cams, name) is not None else
                        "This model has no such stream.") for name in streams}
        return panels, notes

    def _verdict(self, prompt: str, probability: np.ndarray, mask: np.ndarray, loaded: LoadedImage,
                 threshold: float, spread_inside: float | None) -> str:
        """Markdown: "No target found" or the mask's area (px, mm² when the spacing is known) and confidence."""
        members = f"{self.n_members} checkpoint{'s' if self.n_members > 1 else ''}"
        if not mask.any():
            return (f"### No target found\nNo pixel reaches p >= {threshold:.2f} for **{prompt}** "
                    f"(highest p = {float(probability.max()):.2f}; {members}).")
        area = f"{100 * float(mask.mean()):.2f}% of the image ({int(mask.sum()):,} px"
        if loaded.spacing_mm is not None:
            area += f", {float(mask.sum()) * loaded.spacing_mm[0] * loaded.spacing_mm[1]:.1f} mm²"
        lines = [f"### Found: {prompt}",
                 f"Area {area}); mean p inside {float(probability[mask].mean()):.2f}; {members}."]
        if spread_inside is not None:
            lines.append(f"Mean ensemble spread inside the mask: {spread_inside:.3f} (std of p across checkpoints).")
        return "\n\n".join(lines)

    def explore(self, loaded: LoadedImage | None, prompt: str, x: float,
                y: float) -> tuple[np.ndarray, np.ndarray, str]:
        """FFBI attention from the bottleneck token under display pixel (x, y), both directions.

        Returns two overlays (h + bar, w, 3) uint8 (semantic -> frequency, frequency -> semantic) and a caption.
        """
        loaded = _require(loaded)
        if not self.has_ffbi:
            raise InputError("this checkpoint has no FFBI cross-attention (it is an ablation without it)")
        prompt = _clean(prompt, "prompt")
        view = self.view(loaded)
        height, width = view.shape[:2]
        tensor = self.prepare(loaded)
        with self.lock:
            maps = [ffbi_attention(model, tensor, prompt, *_token(x, y, height, width)) for model in
                    self.predictor.models]
        row, col = _token(x, y, height, width)
        panels, peaks = [], []
        for direction in ("semantic_to_frequency", "frequency_to_semantic"):
            ratio = attention_ratio(np.mean([getattr(m, direction) for m in maps], axis=0))
            peaks.append(float(ratio.max()))
            panels.append(render.mark(render.ratio_panel(view, ratio), x, y))
        grid = 14
        caption = (f"Token (row {row}, col {col}) of the {grid}x{grid} bottleneck. Left: where the semantic token "
                   f"reads in the frequency stream, **max ratio {peaks[0]:.2f}** × uniform (weight "
                   f"{peaks[0] / GRID_TOKENS:.4f} vs 1/{GRID_TOKENS} = {1 / GRID_TOKENS:.4f}); right: where the "
                   f"frequency token reads in the semantic stream, **max ratio {peaks[1]:.2f}** × uniform. The full "
                   f"model's attention: the Frequency stream / FFBI / FiLM switches do not apply here.")
        return panels[0], panels[1], caption

    def segment(self, path: str | Path, prompt: str,
                threshold: float | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
        """The ``/segment`` API: mask (H, W) uint8 0/255 and overlay (H, W, 3) uint8 at the input's size, at
        ``threshold`` (None = :meth:`threshold_for` the image, as the page)."""
        prompt = _clean(prompt, "prompt")
        loaded = self.load(path)
        tensor = self.prepare(loaded)
        if threshold is None:
            threshold = self.default_threshold(tensor)
        maps = self._forward(tensor, [prompt], ALL_ON)
        probability = resize_to(maps["probability"].float(), loaded.size)[0, 0].cpu().numpy()
        mask = probability >= threshold
        overlay = render.mask_overlay(loaded.display, mask)
        info = {"prompt": prompt, "threshold": threshold, "found": bool(mask.any()),
                "area_fraction": round(float(mask.mean()), 6),
                "mean_probability_in_mask": round(float(probability[mask].mean()), 4) if mask.any() else 0.0,
                "max_probability": round(float(probability.max()), 4), "size": list(loaded.size),
                "checkpoints": self.n_members, "input": loaded.describe()}
        return mask.astype(np.uint8) * 255, overlay, info


def _token(x: float, y: float, height: int, width: int, grid: int = 14) -> tuple[int, int]:
    """Display pixel (x, y) -> (row, col) of the grid x grid bottleneck."""
    row = min(grid - 1, max(0, int(y / height * grid)))
    col = min(grid - 1, max(0, int(x / width * grid)))
    return row, col


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _require(loaded: LoadedImage | None) -> LoadedImage:
    if loaded is None:
        raise InputError("upload an image (or pick an example) first")
    return loaded


def _clean(text: str | None, what: str) -> str:
    cleaned = " ".join((text or "").split())
    if not cleaned:
        raise InputError(f"the {what} is empty: describe the structure to segment, e.g. 'brain tumour'")
    return cleaned


def _ablation_note(switches: Switches, mask: np.ndarray, reference: np.ndarray) -> str:
    off = [name for name, on in zip(("frequency stream", "FFBI", "FiLM"), switches, strict=True) if not on]
    agree = float(pairwise_iou(np.stack([mask, reference]))[0, 1])
    return (f"**Ablation** ({', '.join(off)} off): IoU with the full model's mask = {agree:.2f}; area "
            f"{100 * float(mask.mean()):.1f}% vs {100 * float(reference.mean()):.1f}% with everything on.")


# ---------------------------------------------------------------- start-up

def find_checkpoints(root: Path | None = None) -> list[Path]:
    """An ensemble's members: the ``root/*/config.json`` folders, sorted; by default the default model set's."""
    if root is None:
        name = default_model_set()
        if name is None:
            return []
        root = MODEL_SETS[name]
    return sorted(p.parent for p in Path(root).glob("*/config.json")) if Path(root).is_dir() else []


def default_model_set(sets: Mapping[str, Path] | None = None) -> str | None:
    """The first set (``MODEL_SETS`` order) whose folder holds checkpoints; None when none does."""
    sets = MODEL_SETS if sets is None else sets
    return next((name for name, folder in sets.items() if find_checkpoints(folder)), None)


def _relative(path: Path) -> str:
    """A path as the user would type it from the repository root (absolute when it lies elsewhere)."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _no_checkpoint(folders: Sequence[Path]) -> SetupError:
    return SetupError(
        f"No FreqMedCLIP checkpoint found in {', '.join(_relative(f) for f in folders)}.\n"
        "Train the mini ensemble (one run per seed), e.g.\n"
        "  python -m train.train --config train/configs/mini.yaml --seed 0 --run-dir runs/mini-seed0\n"
        "and copy runs/mini-seed0/best/ to assets/phantom/checkpoints/mini-seed0/ (model.safetensors + config.json)\n"
        "(bash train/recipes/phantom.sh and bash train/recipes/public.sh do it all for the phantom and real sets),\n"
        "or point the demo at checkpoint folders: python app.py --checkpoint DIR [DIR ...]")


def resolve_checkpoint(spec: str | Path) -> Path:
    """A checkpoint folder from a path or ``hf-hub:OWNER/REPO[/SUBFOLDER]`` (fetched into the HuggingFace cache
    with ``snapshot_download``; offline, only the cache is read)."""
    text = str(spec)
    if not text.startswith(HF_PREFIX):
        return Path(text)
    from huggingface_hub import snapshot_download

    owner, repo, *subfolder = text[len(HF_PREFIX):].strip("/").split("/")
    sub = "/".join(subfolder)
    try:
        root = snapshot_download(f"{owner}/{repo}", allow_patterns=[f"{sub}/*"] if sub else None)
    except Exception as error:  # huggingface_hub raises many types (offline, missing repo, auth)
        raise SetupError(f"{text}: could not fetch the checkpoint from the HuggingFace Hub ({error})") from error
    return Path(root) / sub


def load_session(checkpoints: Sequence[str | Path] | None = None, backbone: str | None = None, device: str = "cpu",
                 dtype: str = "fp32", limits: Limits | None = None, search: Path | None = None,
                 available: dict[str, tuple[str, ...]] | None = None) -> DemoSession:
    """Load an ensemble for the demo; raises :class:`SetupError` with instructions when it cannot.

    Args:
        checkpoints: checkpoint folders or ``hf-hub:OWNER/REPO[/SUBFOLDER]``; by default every ``search/*/`` folder
            holding a config.json (``search`` defaults to the default model set's folder, ``default_model_set``).
        backbone: ``local-dir:PATH`` or ``hf-hub:ID`` to use instead of the one recorded in the checkpoints.
        available: checkpoints the out-of-distribution warning may suggest (default: every set's, ``MODEL_ROOTS``).
    """
    if checkpoints:
        directories = [resolve_checkpoint(c) for c in checkpoints]
    else:
        folders = [Path(search)] if search is not None else list(MODEL_SETS.values())
        directories = next((found for found in map(find_checkpoints, folders) if found), [])
        if not directories:
            raise _no_checkpoint(folders)
    missing = [str(d) for d in directories if not (d / "config.json").is_file()]
    if missing:
        raise SetupError(f"not a FreqMedCLIP checkpoint folder (no config.json): {', '.join(missing)}")
    try:
        shared = load_clip_backbone(backbone) if backbone else None
        models = load_ensemble(directories, shared, device=device)
    except BackboneMismatchError as error:
        raise SetupError(f"{error}\nPass the backbone the checkpoints were trained with: --backbone "
                         f"local-dir:PATH or --backbone hf-hub:ID") from error
    except (OSError, ValueError) as error:
        raise SetupError(f"could not load the backbone or checkpoints: {error}\nThe mini backbone lives in "
                         f"{DEFAULT_BACKBONE[len('local-dir:'):]}; pass --backbone local-dir:PATH or "
                         f"hf-hub:ID") from error
    limits = limits or Limits()
    session = DemoSession(Predictor(models, device=device, dtype=dtype, max_pixels=limits.max_pixels), limits,
                          available=available_models() if available is None else available,
                          operating_point=set_operating_point(directories))
    # the reference that knows these models' training domains (both sets share one backbone)
    session.domain_reference = find_domain_reference(models[0].clip_backbone.weights_sha256, session.training_domains)
    return session


def set_operating_point(directories: Sequence[Path]) -> dict[str, Any] | None:
    """The operating point of the folder holding exactly these members (a model set), if it has one; a subset or a
    mix of folders gets none (the threshold was chosen for that whole ensemble). Raises :class:`SetupError` naming
    a broken file."""
    parents = {Path(d).resolve().parent for d in directories}
    if len(parents) != 1:
        return None
    folder = parents.pop()
    if sorted(p.resolve() for p in find_checkpoints(folder)) != sorted(Path(d).resolve() for d in directories):
        return None
    try:
        return read_operating_point(folder)
    except ValueError as error:
        raise SetupError(f"{error}\nRerun `python -m train.operating_point ... --ship NAME={folder}/"
                         f"{OPERATING_POINT_FILE}` or delete the file (the demo then thresholds at 0.5)") from error


class ModelSets:
    """The model sets one page offers, by name: each loaded on first use and kept, so switching back is instant.

    The page's own choice of set lives in each browser tab (``app.py`` keeps the name in a ``gr.State``), so one
    visitor's switch never changes another's results; loading is serialised by a lock, so two tabs asking for the
    same set load it once, while sets already loaded keep serving. The initial set is loaded at construction: a broken default stops the app at start-up.
    """

    def __init__(self, loaders: Mapping[str, Callable[[], DemoSession]], initial: str,
                 session: DemoSession | None = None) -> None:
        if initial not in loaders:
            raise ValueError(f"initial set {initial!r} is not one of {list(loaders)}")
        self.loaders = dict(loaders)
        self.initial = initial
        self._loaded: dict[str, DemoSession] = {} if session is None else {initial: session}
        self._lock = threading.Lock()
        self.get(initial)

    @classmethod
    def single(cls, session: DemoSession, name: str = COMMAND_LINE_MODELS) -> ModelSets:
        """One set: an already built session (tests, embedding)."""
        return cls({name: lambda: session}, name, session)

    @property
    def names(self) -> list[str]:
        return list(self.loaders)

    @property
    def default(self) -> DemoSession:
        return self.get(self.initial)

    def get(self, name: str) -> DemoSession:
        """The set's session, loaded now if it is not yet; raises :class:`SetupError` (nothing is cached then, so
        a set whose files appear later loads on the next try)."""
        if name not in self.loaders:
            raise SetupError(f"unknown model set {name!r}; choose one of: {', '.join(self.loaders)}")
        if name in self._loaded:        # no lock: a loaded set serves while another tab waits for a slow load
            return self._loaded[name]
        with self._lock:
            if name not in self._loaded:
                self._loaded[name] = self.loaders[name]()
            return self._loaded[name]

    def switch(self, name: str, current: str) -> tuple[str, str]:
        """Try to serve ``name`` instead of ``current``: (the set now serving, a Markdown message). A set that
        fails to load leaves ``current`` serving, and the message says why."""
        try:
            session = self.get(name)
        except SetupError as error:
            LOG.warning("model set %r: %s", name, str(error).splitlines()[0])
            lines = str(error).replace("\n", "  \n")                # Markdown: keep the message's line breaks
            return current, f"**Could not load {name}:** {lines}\n\nStill serving **{current}**."
        return name, (f"Now serving **{name}** ({session.n_members} checkpoint{'s' * (session.n_members > 1)}); "
                      f"press **Segment** to run them.")


def open_model_sets(checkpoints: Sequence[str | Path] | None = None, backbone: str | None = None,
                    device: str = "cpu", dtype: str = "fp32", limits: Limits | None = None,
                    sets: Mapping[str, Path] | None = None) -> ModelSets:
    """The demo's model sets: the table ``sets`` (default ``MODEL_SETS``), preceded by ``checkpoints`` when given
    (explicit checkpoints override the default). Opens on the explicit checkpoints, else on the first set that
    holds checkpoints; ``backbone`` applies to that initial set only (the others use their recorded backbones)."""
    sets = MODEL_SETS if sets is None else dict(sets)

    def from_folder(folder: Path, override: str | None = None) -> Callable[[], DemoSession]:
        # every set's checkpoints and baselines, read when the set loads (a set added since start-up is suggested)
        return lambda: load_session(None, override, device, dtype, limits, search=folder,
                                    available=available_models(set_roots(sets)))

    loaders: dict[str, Callable[[], DemoSession]] = {}
    if checkpoints:
        loaders[COMMAND_LINE_MODELS] = lambda: load_session(checkpoints, backbone, device, dtype, limits,
                                                            available=available_models(set_roots(sets)))
    loaders |= {name: from_folder(folder) for name, folder in sets.items()}
    initial = COMMAND_LINE_MODELS if checkpoints else default_model_set(sets)
    if initial is None:
        raise _no_checkpoint(list(sets.values()))
    if backbone and not checkpoints:
        loaders[initial] = from_folder(sets[initial], backbone)
    return ModelSets(loaders, initial)


def find_domain_reference(backbone_sha256: str, domains: Sequence[str] = (),
                          root: Path = DOMAIN_REFERENCES) -> DomainReference | None:
    """The domain reference (``root/*.safetensors``) built on this backbone's features and knowing every one of
    ``domains`` (the models' training domains), if any. One backbone serves the phantom and the real-data sets,
    each with its own reference: its thresholds come from its own domains' validation images."""
    for path in sorted(Path(root).glob("*.safetensors")) if Path(root).is_dir() else []:
        reference = DomainReference.load(path)
        if reference.backbone_sha256 == backbone_sha256 and set(domains) <= set(reference.domains):
            return reference
    return None

