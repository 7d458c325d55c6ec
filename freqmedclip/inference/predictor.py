"""The Predictor: between the model and the user (like SAM's ``SamPredictor``).

It takes numpy or PIL images of any size and pixel type, normalises them per modality, resizes to 224,
runs one model or an ensemble (probabilities averaged, spread reported as uncertainty), and returns maps at
the original size (bilinear, Section 3.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from freqmedclip.inference.checkpoint import load_ensemble
from freqmedclip.inference.explain import StreamCAMs, features_gradcam, mean_cams
from freqmedclip.modeling.model import ALL_ON, FreqMedCLIP, Switches
from freqmedclip.inference.precision import autocast, resolve
from freqmedclip.inference.preprocess import DEFAULT_MAX_PIXELS, normalize, resize_to, to_model_input, validate_image


@dataclass
class Prediction:
    """Maps at the original image size (H, W)."""

    prompt: str
    probability: np.ndarray                      # (H, W) float32, ensemble mean of sigma(L)
    mask: np.ndarray                             # (H, W) bool, probability >= threshold
    semantic_probability: np.ndarray | None      # (H, W) sigma(L_s), None if the model has no such branch
    frequency_probability: np.ndarray | None     # (H, W) sigma(L_f)
    uncertainty: np.ndarray | None               # (H, W) standard deviation across ensemble members

    @property
    def area_fraction(self) -> float:
        return float(self.mask.mean())

    @property
    def found(self) -> bool:
        return bool(self.mask.any())


class Predictor:
    """Run FreqMedCLIP (one model or an ensemble sharing a backbone) on user images.

    Args:
        models: one model or several (an ensemble: probabilities are averaged).
        device: "cpu" or "cuda".
        dtype: "fp32", "bf16", "fp16" or "auto" (bf16 on CUDA and on CPUs with AMX/AVX512-BF16, else fp32).
        threshold: probability at which a pixel belongs to the mask.
        max_pixels: images with more pixels are refused.
    """

    def __init__(self, models: FreqMedCLIP | Sequence[FreqMedCLIP], device: str = "cpu", dtype: str = "fp32",
                 threshold: float = 0.5, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.models = [models] if isinstance(models, FreqMedCLIP) else list(models)
        if not self.models:
            raise ValueError("a Predictor needs at least one model")
        self.device = torch.device(device)
        self.dtype = resolve(dtype, self.device)
        self.threshold = threshold
        self.max_pixels = max_pixels
        for model in self.models:
            model.to(self.device).eval()
        self.image_size = self.models[0].config.image_size

    @classmethod
    def from_checkpoints(cls, directories: Sequence[str | Path], device: str = "cpu", **kwargs) -> Predictor:
        return cls(load_ensemble(directories, device=device), device=device, **kwargs)

    def prepare(self, image: np.ndarray | Image.Image, modality: str = "auto",
                window: str | tuple[float, float] | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """Validate, normalise and resize: returns ((1, 3, 224, 224) in [0, 1], original (H, W)).

        ``modality`` is one of ``preprocess.MODALITIES`` (auto, MRI, CT, MG, US)."""
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB") if image.mode in ("P", "LA", "CMYK", "YCbCr") else image)
        array = validate_image(image, self.max_pixels)
        unit = normalize(array, modality, window)
        return to_model_input(unit, self.image_size).to(self.device), array.shape[:2]

    @torch.no_grad()
    def predict_tensor(self, image: torch.Tensor, prompts: Sequence[str], switches: Switches = ALL_ON,
                       explain: str | None = None) -> dict[str, torch.Tensor | StreamCAMs | None]:
        """Probability maps for one prepared image and several prompts, at 224.

        image: (1, 3, 224, 224). Returns "probability", "semantic", "frequency" (P, 1, 224, 224) ensemble means
        (branches None if absent) and "members" (M, P, 1, 224, 224). With ``explain`` (one of ``prompts``) also
        "gradcam": the ensemble's per-stream Grad-CAM of that prompt's fused prediction (:class:`StreamCAMs`,
        224x224), computed from this forward's encoder features (only the decoders run again).
        """
        prompts = list(prompts)
        if explain is not None and explain not in prompts:
            raise ValueError(f"the prompt to explain, {explain!r}, is not one of the prompts {prompts}")
        explained_row = None if explain is None else prompts.index(explain)
        batch = image.expand(len(prompts), -1, -1, -1)
        members, semantic, frequency, cams = [], [], [], []
        with autocast(self.device, self.dtype):
            for model in self.models:
                features = model.encode(batch, prompts, switches)
                output = model.decode(features, switches=switches)
                members.append(torch.sigmoid(output.logits.float()))
                if output.semantic_logits is not None:
                    semantic.append(torch.sigmoid(output.semantic_logits.float()))
                if output.frequency_logits is not None:
                    frequency.append(torch.sigmoid(output.frequency_logits.float()))
                if explained_row is not None:
                    cams.append(features_gradcam(model, features.row(explained_row), tuple(image.shape[-2:]),
                                                 switches))
        stacked = torch.stack(members)
        maps = {
            "probability": stacked.mean(0),
            "semantic": torch.stack(semantic).mean(0) if semantic else None,
            "frequency": torch.stack(frequency).mean(0) if frequency else None,
            "members": stacked,
        }
        if explained_row is not None:
            maps["gradcam"] = mean_cams(cams)
        return maps

    def predict(self, image: np.ndarray | Image.Image, prompts: str | Sequence[str], modality: str = "auto",
                window: str | tuple[float, float] | None = None,
                switches: Switches = ALL_ON) -> Prediction | list[Prediction]:
        """Segment ``image`` for one prompt (returns a Prediction) or several (a list, one forward batch)."""
        single = isinstance(prompts, str)
        prompt_list = [prompts] if single else list(prompts)
        tensor, size = self.prepare(image, modality, window)
        maps = self.predict_tensor(tensor, prompt_list, switches)

        def original(x: torch.Tensor | None) -> np.ndarray | None:
            return None if x is None else resize_to(x, size)[:, 0].cpu().numpy()

        probability = original(maps["probability"])
        semantic, frequency = original(maps["semantic"]), original(maps["frequency"])
        spread = original(maps["members"].std(0, unbiased=False)) if len(self.models) > 1 else None
        predictions = [
            Prediction(
                prompt=prompt,
                probability=probability[i],
                mask=probability[i] >= self.threshold,
                semantic_probability=None if semantic is None else semantic[i],
                frequency_probability=None if frequency is None else frequency[i],
                uncertainty=None if spread is None else spread[i],
            )
            for i, prompt in enumerate(prompt_list)
        ]
        return predictions[0] if single else predictions
