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
* Grad-CAM is averaged over the ensemble (each member's map is min-max normalised first).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import Tensor

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
from freqmedclip.inference import (
    ALL_ON,
    BANDS,
    HF_PREFIX,
    REPO_ROOT,
    BackboneMismatchError,
    InputError,
    Predictor,
    StreamCAMs,
    Switches,
    ffbi_attention,
    load_clip_backbone,
    load_ensemble,
    resize_to,
    wavelet_bands,
)

MAX_PROMPTS = 6
CONTROL_PROMPT = "a purple elephant riding a bicycle"
EXPORT_MAX_AGE_S = 3600.0
DEFAULT_CHECKPOINTS = REPO_ROOT / "assets" / "checkpoints"
DEFAULT_BACKBONE = "local-dir:assets/backbones/mini-clip"

Progress = Callable[[float, str], None]


class SetupError(RuntimeError):
    """The demo cannot start (no checkpoint, wrong backbone); the message says what to do."""


def _no_progress(fraction: float, message: str) -> None:
    return None


# ---------------------------------------------------------------- prompt-sensitivity workbench (pure functions)

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

    def iou_rows(self) -> tuple[list[str], list[list[str | float]]]:
        """The IoU matrix as a table: headers and rows (first column = prompt)."""
        labels = self.labels()
        rounded = np.round(self.iou.astype(np.float64), 3)
        return ["prompt", *labels], [[labels[i], *rounded[i].tolist()] for i in range(len(labels))]

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

    def __init__(self, predictor: Predictor, limits: Limits | None = None, exports: Path | None = None) -> None:
        self.predictor = predictor
        self.limits = limits or Limits(max_pixels=predictor.max_pixels)
        self.exports = Path(exports) if exports is not None else export_dir()
        self.lock = threading.Lock()

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
                  threshold: float = 0.5, switches: Switches = ALL_ON) -> Workbench:
        """Up to ``MAX_PROMPTS`` prompts and the control on one image, in one batched forward."""
        loaded = _require(loaded)
        prompt_list = parse_prompts(prompts)
        if not prompt_list:
            raise InputError("enter at least one prompt for the workbench (one per line)")
        control = _clean(control, "control prompt")
        batch = list(dict.fromkeys([*prompt_list, control]))
        maps = self._forward(self.prepare(loaded), batch, switches)
        return self._workbench_from(maps["probability"], batch, prompt_list, control, threshold, self.view(loaded))

    def _workbench_from(self, probability: Tensor, batch: list[str], prompts: list[str], control: str,
                        threshold: float, view: np.ndarray) -> Workbench:
        order = [batch.index(p) for p in [*prompts, control]]
        maps = probability[order, 0].float().cpu().numpy()
        bench = Workbench.from_maps([*prompts, control], maps, threshold)
        base = render.resize_rgb(view, render.view_size(*view.shape[:2], 256))
        bench.gallery = [(render.mask_overlay(base, bench.masks[i]),
                          f"{label}: {100 * bench.area_fraction[i]:.1f}% area")
                         for i, label in enumerate(bench.labels())]
        return bench

    def update(self, loaded: LoadedImage | None, prompt: str, *, threshold: float = 0.5,
               switches: Switches = ALL_ON, workbench_prompts: str | Sequence[str] = (),
               control: str = CONTROL_PROMPT, progress: Progress = _no_progress) -> Panels:
        """One full update of every panel for ``loaded`` and ``prompt``."""
        timings: dict[str, float] = {}
        start = clock = time.perf_counter()
        loaded = _require(loaded)
        prompt = _clean(prompt, "prompt")
        bench_prompts = parse_prompts(workbench_prompts)
        control = _clean(control, "control prompt")
        progress(0.05, "preparing the image")
        tensor = self.prepare(loaded)
        view = self.view(loaded)
        size, view_hw = loaded.size, view.shape[:2]
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
        branches = {key: render.heat_panel(view, maps[key][main, 0].float().cpu().numpy(), "viridis", 0.6, "p = 1",
                                           "p = 0") for key in ("semantic", "frequency") if maps[key] is not None}
        cams = [None if cam is None else render.heat_panel(view, cam, "jet", 0.5, "1 (most relevant)", "0")
                for cam in maps["gradcam"]]
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
        return Panels(view=view, mask_view=mask_view, mask=mask, found=bool(mask.any()), verdict=verdict,
                      probability=render.heat_panel(view, probability_view, "viridis", 0.6, "p = 1", "p = 0"),
                      uncertainty=uncertainty, cam_semantic=cams[0], cam_frequency=cams[1], subbands=subbands,
                      branches=branches, workbench=bench, exports=exports, timings_ms=timings)

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
        panels = []
        for direction in ("semantic_to_frequency", "frequency_to_semantic"):
            attention = np.mean([getattr(m, direction) for m in maps], axis=0)
            peak = max(float(attention.max()), 1e-12)
            panel = render.heat_overlay(view, attention / peak, "jet", 0.5)
            panels.append(render.with_colorbar(render.mark(panel, x, y), "jet", f"weight {peak:.3f}", "0"))
        grid = 14
        caption = (f"Token (row {row}, col {col}) of the {grid}x{grid} bottleneck. Left: where the semantic token "
                   f"reads in the frequency stream; right: where the frequency token reads in the semantic stream.")
        return panels[0], panels[1], caption

    def segment(self, path: str | Path, prompt: str, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, dict]:
        """The ``/segment`` API: mask (H, W) uint8 0/255 and overlay (H, W, 3) uint8 at the input's size."""
        prompt = _clean(prompt, "prompt")
        loaded = self.load(path)
        tensor = self.prepare(loaded)
        maps = self._forward(tensor, [prompt], ALL_ON)
        probability = resize_to(maps["probability"].float(), loaded.size)[0, 0].cpu().numpy()
        mask = probability >= threshold
        overlay = render.mask_overlay(loaded.display, mask)
        info = {"prompt": prompt, "found": bool(mask.any()), "area_fraction": round(float(mask.mean()), 6),
                "mean_probability_in_mask": round(float(probability[mask].mean()), 4) if mask.any() else 0.0,
                "max_probability": round(float(probability.max()), 4), "size": list(loaded.size),
                "checkpoints": self.n_members, "input": loaded.describe()}
        return mask.astype(np.uint8) * 255, overlay, info


def _token(x: float, y: float, height: int, width: int, grid: int = 14) -> tuple[int, int]:
    """Display pixel (x, y) -> (row, col) of the grid x grid bottleneck."""
    row = min(grid - 1, max(0, int(y / height * grid)))
    col = min(grid - 1, max(0, int(x / width * grid)))
    return row, col


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

def load_examples(directory: Path) -> list[tuple[str, str]]:
    """(image path, prompt) of each entry of ``directory/examples.json`` (one example per domain)."""
    entries = json.loads((Path(directory) / "examples.json").read_text())
    return [(str(Path(directory) / entry["image"]), entry["prompt"]) for entry in entries]


def find_checkpoints(root: Path = DEFAULT_CHECKPOINTS) -> list[Path]:
    """The shipped ensemble: ``root/*/config.json`` folders, sorted."""
    return sorted(p.parent for p in Path(root).glob("*/config.json")) if Path(root).is_dir() else []


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
                 dtype: str = "fp32", limits: Limits | None = None, search: Path | None = None) -> DemoSession:
    """Load an ensemble for the demo; raises :class:`SetupError` with instructions when it cannot.

    Args:
        checkpoints: checkpoint folders or ``hf-hub:OWNER/REPO[/SUBFOLDER]``; by default every ``search/*/`` folder
            holding a config.json (``search`` defaults to ``assets/checkpoints``).
        backbone: ``local-dir:PATH`` or ``hf-hub:ID`` to use instead of the one recorded in the checkpoints.
    """
    search = DEFAULT_CHECKPOINTS if search is None else Path(search)
    directories = [resolve_checkpoint(c) for c in checkpoints] if checkpoints else find_checkpoints(search)
    if not directories:
        raise SetupError(
            f"No FreqMedCLIP checkpoint found in {search}.\n"
            "Train the mini ensemble (one run per seed), e.g.\n"
            "  python -m train.train --config train/configs/mini.yaml --seed 0 --run-dir runs/mini-seed0\n"
            "and copy runs/mini-seed0/best/ to assets/checkpoints/mini-seed0/ (model.safetensors + config.json),\n"
            "or point the demo at checkpoint folders: python app.py --checkpoint DIR [DIR ...]")
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
    return DemoSession(Predictor(models, device=device, dtype=dtype, max_pixels=limits.max_pixels), limits)

