"""FreqMedCLIP demo (Gradio 6): a thin view over :mod:`freqmedclip.demo.session`, which holds all the logic.

    python app.py [--checkpoint DIR ...] [--backbone local-dir:PATH|hf-hub:ID] [--device cpu|cuda] [--port N]
                  [--max-upload-mb N] [--max-pixels N]

Opens on the first model set of ``freqmedclip.demo.session.MODEL_SETS`` that holds checkpoints (the real-data
ensemble, else the phantoms), or on ``--checkpoint``; the "Models" selector switches sets per browser tab.

API: ``Client(url).predict(handle_file("scan.dcm"), "lung nodule", api_name="/segment")`` -> (mask PNG,
overlay PNG, info dict).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import argparse  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from functools import wraps  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

from freqmedclip.demo.session import (  # noqa: E402
    BAND_TITLES,
    CAM_METHODS,
    CONTROL_PROMPT,
    FAST_GRADCAM,
    LOG,
    MAX_PROMPTS,
    PANEL_NOTES,
    DemoSession,
    ModelSets,
    SetupError,
    Workbench,
    controls_for,
    open_model_sets,
)
from freqmedclip.demo.examples import credits_line, load_examples  # noqa: E402
from freqmedclip.demo.uploads import AUTO_WINDOW, AXIS_NAMES, WINDOW_CHOICES, Limits, LoadedImage  # noqa: E402
from freqmedclip.inference import DEFAULT_MAX_PIXELS, MODALITIES, InputError, Predictor, PromptError, Switches  # noqa: E402

EXAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "examples"
ALTERNATIVE_PROMPTS = ("lesion", "normal tissue", "background")
PRIVATE = {"api_visibility": "private"}  # UI events; the one public endpoint is /segment


def readable(fn: Callable, clear: Callable[[str], tuple] | None = None) -> Callable:
    """Bad uploads and prompts become a message in the UI (the server keeps serving; the log gets one line, no
    traceback): a Gradio error, or with ``clear`` every output emptied and one message (``clear(message)``) instead
    of an error badge on each panel over the previous results."""
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (InputError, PromptError) as error:
            LOG.warning("%s: %s", fn.__name__, error)
            if clear is None:
                raise gr.Error(str(error), print_exception=False) from error
            return clear(f"### Cannot do that\n{error}")
    return wrapper


def bench_outputs(bench: Workbench | None) -> tuple:
    """Workbench -> (gallery, IoU table, per-prompt table, summary)."""
    if bench is None:
        return [], None, None, "Add prompts to the workbench (one per line) to compare them."
    tables = [pd.DataFrame(rows, columns=headers) for headers, rows in (bench.iou_rows(), bench.stats_rows())]
    return bench.gallery, *tables, bench.summary()


def build_demo(models: ModelSets | DemoSession | Predictor) -> gr.Blocks:
    """The UI around the model sets (tests inject one session built from small models)."""
    if isinstance(models, Predictor):
        models = DemoSession(models)
    sets = models if isinstance(models, ModelSets) else ModelSets.single(models)
    default = sets.default          # serves uploads' limits (the same for every set) and the /segment API

    def cleared(message: str = "") -> tuple:
        """Every output of run() emptied (in run_outputs' order), ``message`` in the verdict: a new upload or an
        error leaves nothing of the previous image on screen."""
        return (None, message, "", None, None, None, None, "", "", None, None, None, None, None, None, [], None, None,
                "", None, "", None, "Click a location on the input image.", None)

    def load_image(file: str | None, modality: str, window: str, slice_index: float | None, axis: str) -> tuple:
        if not file:
            return None, "", gr.Slider(visible=False), None, gr.update(visible=False), gr.update(visible=False)
        index = None if slice_index is None else int(slice_index)
        loaded = default.load(file, modality, window, index, AXIS_NAMES.index(axis))
        slider = gr.Slider(maximum=max(loaded.n_slices - 1, 1), value=loaded.slice_index, visible=loaded.n_slices > 1)
        show_window, show_axis = controls_for(loaded)
        return (default.view(loaded), loaded.describe(), slider, loaded, gr.update(visible=show_window),
                gr.update(visible=show_axis))

    def load(*args: Any) -> tuple:
        """A new image (or slice, window, axis): the input panels, and every previous result cleared."""
        try:
            return (*load_image(*args), *cleared())
        except (InputError, PromptError) as error:
            LOG.warning("load: %s", error)
            return (None, f"**Cannot read this file:** {error}", gr.Slider(visible=False), None,
                    gr.update(visible=False), gr.update(visible=False), *cleared())

    def chosen_threshold(active: str, threshold: float, per_domain: bool) -> float | None:
        """None (the session picks the image's domain threshold) while "per domain" is ticked and the set has them."""
        return None if per_domain and sets.get(active).domain_thresholds else threshold

    def run_update(active: str, loaded: LoadedImage | None, prompt: str, bench_text: str, control: str,
                   threshold: float, per_domain: bool, frequency: bool, ffbi: bool, film: bool, cam_method: str,
                   progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008
        threshold = chosen_threshold(active, threshold, per_domain)
        p = sets.get(active).update(loaded, prompt, threshold=threshold, switches=Switches(frequency, ffbi, film),
                                    workbench_prompts=bench_text, control=control, cam_method=cam_method,
                                    progress=lambda fraction, message: progress(fraction, desc=message))
        return (p.overlay, p.verdict, p.domain_note, p.probability, p.uncertainty, p.cam_semantic, p.cam_frequency,
                p.cam_notes.get("semantic", ""), p.cam_notes.get("frequency", ""),
                *(p.subbands[band] for band in BAND_TITLES), p.branches.get("semantic"), p.branches.get("frequency"),
                *bench_outputs(p.workbench), [str(path) for path in p.exports],
                " · ".join(f"{k} {v:.0f} ms" for k, v in p.timings_ms.items()), None, "Click a location on the "
                "input image.", None)

    run = readable(run_update, cleared)

    def compare_prompts(active: str, loaded: LoadedImage | None, prompt: str, bench_text: str, control: str,
                        threshold: float, per_domain: bool, frequency: bool, ffbi: bool, film: bool) -> tuple:
        return bench_outputs(sets.get(active).workbench(loaded, bench_text, control,
                                                        chosen_threshold(active, threshold, per_domain),
                                                        Switches(frequency, ffbi, film), main_prompt=prompt))

    compare = readable(compare_prompts, lambda message: ([], None, None, message))

    def explore_token(active: str, loaded: LoadedImage | None, prompt: str, evt: gr.SelectData) -> tuple:
        return sets.get(active).explore(loaded, prompt, *evt.index[:2])

    explore = readable(explore_token, lambda message: (None, None, message))

    @readable
    def segment(file: str, prompt: str) -> tuple:
        return default.segment(file, prompt)

    def switch_models(name: str, active: str) -> tuple:
        """The selector changed: serve that set in this tab (previous results cleared, they came from the other
        models); when it cannot load, keep serving the old one and say why, leaving the panels as they are."""
        serving, message = sets.switch(name, active)
        if serving != name:
            return (serving, gr.update(value=serving), gr.skip(), message, gr.skip(),
                    *(gr.skip() for _ in run_outputs), gr.skip())
        session = sets.get(serving)     # its own default threshold: the one chosen for it on validation, else 0.5
        return (serving, gr.skip(), session.header(), message, gr.update(value=session.threshold), *cleared(),
                per_domain_update(session))

    def per_domain_update(session: DemoSession) -> dict:
        return gr.update(value=bool(session.domain_thresholds), visible=bool(session.domain_thresholds))

    def image(label: str, elem_id: str) -> gr.Image:
        return gr.Image(label=label, format="png", elem_id=elem_id)

    with gr.Blocks(title="FreqMedCLIP", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# FreqMedCLIP: text-guided segmentation with a semantic and a frequency stream\n"
                    "Upload PNG, JPEG, TIFF, DICOM or NIfTI, type what to segment, press **Segment**. Click the "
                    "input image to explore FFBI attention.")
        with gr.Row():
            model_choice = gr.Dropdown(sets.names, value=sets.initial, label="Models", scale=1, elem_id="models")
            with gr.Column(scale=3):
                header = gr.Markdown(default.header(), elem_id="training-data")
                model_status = gr.Markdown(elem_id="model-status")
        active = gr.State(sets.initial)     # the set serving this tab (the selector may show a failed choice)
        examples = load_examples(EXAMPLES_DIR)
        example_gallery = gr.Gallery([(e.path, e.label) for e in examples], label="Examples (click one)", columns=8,
                                     fit_columns=False, height=190, object_fit="contain", allow_preview=False,
                                     interactive=False, format="png", elem_id="examples")
        gr.Markdown(credits_line(examples), elem_id="example-credits")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                file = gr.File(label="Image (PNG, JPEG, TIFF, DICOM, NIfTI)", type="filepath")
                preview = gr.Image(label="Input as the model sees it (click: FFBI explorer)", interactive=False,
                                   format="png", elem_id="input-preview")
                info = gr.Markdown(elem_id="input-info")
                with gr.Row():
                    modality = gr.Dropdown(list(MODALITIES), value="auto", label="Modality")
                    window = gr.Dropdown(list(WINDOW_CHOICES), value=AUTO_WINDOW, label="CT window", visible=False,
                                         elem_id="ct-window")
                axis = gr.Radio(list(AXIS_NAMES), value=AXIS_NAMES[2], label="NIfTI axis", visible=False,
                                elem_id="nifti-axis")
                slice_index = gr.Slider(0, 1, step=1, label="Slice / frame", visible=False)
                first_prompt = examples[0].prompt if examples else "whole tumour"   # the gallery's first example
                prompt = gr.Textbox(label="Prompt", value=first_prompt, elem_id="prompt")
                threshold = gr.Slider(0.05, 0.95, value=default.threshold, step=0.05, label="Mask threshold",
                                      elem_id="threshold")
                # ticked: each image gets the threshold chosen on validation for its likeliest training domain (the
                # verdict names it); moving the slider unticks it
                per_domain = gr.Checkbox(bool(default.domain_thresholds), visible=bool(default.domain_thresholds),
                                         label="Threshold per domain (chosen on validation)",
                                         elem_id="per-domain-threshold")
                with gr.Row():
                    switches = [gr.Checkbox(True, label=name) for name in ("Frequency stream", "FFBI", "FiLM")]
                run_button = gr.Button("Segment", variant="primary", elem_id="segment-button")
            with gr.Column(scale=2):
                with gr.Tab("Segmentation"):
                    verdict = gr.Markdown(elem_id="verdict")
                    domain_warning = gr.Markdown(elem_id="domain-warning")
                    with gr.Row():
                        overlay = image("Fused mask (contour)", "fused-mask")
                        probability = image("Fused probability σ(L)", "probability")
                        uncertainty = image("Ensemble spread (≥ 2 checkpoints)", "uncertainty")
                    exports = gr.File(label="Mask (PNG; NIfTI for NIfTI/DICOM inputs)", file_count="multiple",
                                      height=140, elem_id="exports")
                    timing = gr.Markdown(elem_id="timing")
                with gr.Tab("Explanations"):
                    cam_method = gr.Dropdown(list(CAM_METHODS), value=FAST_GRADCAM, elem_id="cam-method",
                                             label="CAM method (press Segment again after changing it)")
                    with gr.Row():
                        cams, cam_notes = [], []
                        for stream, title in (("semantic", "semantic stream (S1)"), ("frequency", "frequency "
                                                                                                   "stream (F3)")):
                            with gr.Column():
                                cams.append(image(f"CAM, {title}", f"cam-{stream}"))
                                gr.Markdown(PANEL_NOTES[f"cam-{stream}"], elem_classes=["panel-note"])
                                cam_notes.append(gr.Markdown(elem_id=f"cam-{stream}-note"))
                    with gr.Row():
                        branches = [image("Semantic branch σ(L_s)", "branch-semantic"),
                                    image("Frequency branch σ(L_f)", "branch-frequency")]
                    gr.Markdown(PANEL_NOTES["branches"], elem_classes=["panel-note"], elem_id="branches-note")
                    with gr.Row():
                        subbands = [gr.Image(show_label=False, format="png", elem_id=f"band-{band}")
                                    for band in BAND_TITLES]
                    gr.Markdown(PANEL_NOTES["subbands"], elem_classes=["panel-note"], elem_id="subbands-note")
                with gr.Tab("Prompt workbench"):
                    bench_text = gr.Textbox(label=f"Prompts (one per line, at most {MAX_PROMPTS})", lines=4,
                                            value="\n".join([first_prompt, *ALTERNATIVE_PROMPTS]))
                    control = gr.Textbox(label="Control (nonsense) prompt", value=CONTROL_PROMPT)
                    compare_button = gr.Button("Compare prompts")
                    reliance = gr.Markdown(elem_id="reliance")
                    bench_gallery = gr.Gallery(label="Masks", columns=4, format="png", elem_id="bench-masks")
                    iou, stats = gr.Dataframe(label="Pairwise IoU", elem_id="iou"), gr.Dataframe(label="Per prompt",
                                                                                                  elem_id="stats")
                with gr.Tab("FFBI explorer"):
                    explore_caption = gr.Markdown("Click a location on the input image.", elem_id="ffbi-caption")
                    with gr.Row():
                        attention = [image("semantic token → frequency stream", "ffbi-to-frequency"),
                                     image("frequency token → semantic stream", "ffbi-to-semantic")]
                    gr.Markdown(PANEL_NOTES["ffbi"], elem_classes=["panel-note"], elem_id="ffbi-note")

        def pick_example(evt: gr.SelectData) -> tuple:
            example = examples[evt.index]
            return example.path, example.prompt, "\n".join([example.prompt, *ALTERNATIVE_PROMPTS])

        example_gallery.select(pick_example, None, [file, prompt, bench_text], **PRIVATE)
        run_outputs = [overlay, verdict, domain_warning, probability, uncertainty, *cams, *cam_notes, *subbands,
                       *branches, bench_gallery, iou, stats, reliance, exports, timing, attention[0], explore_caption,
                       attention[1]]
        load_inputs = [file, modality, window, slice_index, axis]
        load_outputs = [preview, info, slice_index, state, window, axis, *run_outputs]
        for trigger in (file.change, axis.input):  # a new file or axis starts at the middle slice
            trigger(lambda *a: load(*a[:3], None, a[4]), load_inputs, load_outputs, **PRIVATE)
        for trigger in (modality.input, window.input, slice_index.release):
            trigger(load, load_inputs, load_outputs, **PRIVATE)
        run_button.click(run, [active, state, prompt, bench_text, control, threshold, per_domain, *switches,
                               cam_method], run_outputs, **PRIVATE)
        compare_button.click(compare, [active, state, prompt, bench_text, control, threshold, per_domain, *switches],
                             [bench_gallery, iou, stats, reliance], **PRIVATE)
        threshold.input(lambda: False, None, per_domain, **PRIVATE)
        preview.select(explore, [active, state, prompt], [*attention, explore_caption], **PRIVATE)
        model_choice.input(switch_models, [model_choice, active], [active, model_choice, header, model_status,
                                                                   threshold, *run_outputs, per_domain], **PRIVATE)

        api_inputs = [gr.File(label="image", visible=False), gr.Textbox(label="prompt", visible=False)]
        api_outputs = [gr.Image(label=name, visible=False, format="png") for name in ("mask", "overlay")]
        gr.Button(visible=False).click(segment, api_inputs, [*api_outputs, gr.JSON(label="info", visible=False)],
                                       api_name="segment",
                                       api_description="(image file, prompt) -> mask PNG (0/255), overlay PNG, info")
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="FreqMedCLIP Gradio demo")
    parser.add_argument("--checkpoint", nargs="+", default=os.environ.get("FREQMEDCLIP_CHECKPOINT", "").split() or None,
                        help="checkpoint folders or hf-hub:OWNER/REPO/SUBFOLDER (an ensemble); default: "
                             "$FREQMEDCLIP_CHECKPOINT (space-separated), else the first model set holding "
                             "checkpoints: assets/public/checkpoints/*/, assets/phantom/checkpoints/*/ (the page's "
                             "Models selector offers the others)")
    parser.add_argument("--backbone", default=os.environ.get("FREQMEDCLIP_BACKBONE"),
                        help="local-dir:PATH | hf-hub:ID for the initial checkpoints (default: "
                             "$FREQMEDCLIP_BACKBONE, else the checkpoints')")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--port", type=int, default=None, help="default: 7860 or $GRADIO_SERVER_PORT")
    parser.add_argument("--max-upload-mb", type=float, default=Limits.max_upload_mb)
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    parser.add_argument("--concurrency", type=int, default=2,
                        help="requests handled at once (model work is serialised)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    limits = Limits(max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels)
    try:
        models = open_model_sets(args.checkpoint, args.backbone, args.device, args.dtype, limits)
    except SetupError as error:
        sys.exit(f"FreqMedCLIP demo cannot start:\n{error}")
    demo = build_demo(models)
    demo.queue(default_concurrency_limit=args.concurrency)
    demo.launch(server_port=args.port, allowed_paths=[str(EXAMPLES_DIR)], max_file_size=int(args.max_upload_mb * 2**20),
                show_error=True, ssr_mode=False, footer_links=["api", "gradio"])


if __name__ == "__main__":
    main()
