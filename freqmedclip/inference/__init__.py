"""Inference between the model and any UI: checkpoints, precision, preprocessing, the Predictor and its explanations.
May import ``modeling`` only; this module is the API the demo and the scripts use (they import no model stage)."""

from freqmedclip.inference.checkpoint import (
    OPERATING_POINT_FILE,
    REPO_ROOT,
    BackboneMismatchError,
    load_checkpoint,
    load_ensemble,
    random_ensemble,
    read_operating_point,
)
from freqmedclip.inference.explain import StreamCAMs, ffbi_attention, wavelet_bands
from freqmedclip.inference.predictor import Prediction, Predictor
from freqmedclip.inference.preprocess import DEFAULT_MAX_PIXELS, MODALITIES, InputError, resize_to
from freqmedclip.modeling.backbone import HF_PREFIX, load_clip_backbone
from freqmedclip.modeling.frequency import BANDS
from freqmedclip.modeling.model import ALL_ON, Switches
from freqmedclip.modeling.text import PromptError

__all__ = ["ALL_ON", "BANDS", "DEFAULT_MAX_PIXELS", "HF_PREFIX", "MODALITIES", "OPERATING_POINT_FILE", "REPO_ROOT", "BackboneMismatchError",
           "InputError", "Prediction", "Predictor", "PromptError", "StreamCAMs", "Switches", "ffbi_attention",
           "load_checkpoint", "load_clip_backbone", "load_ensemble", "random_ensemble", "read_operating_point", "resize_to",
           "wavelet_bands"]
