"""FreqMedCLIP: text-guided medical image segmentation with a frequency and a semantic stream.

Folders: ``modeling`` (the paper's stages), ``inference`` (checkpoints, Predictor), ``evaluation``, ``demo``, ``data``."""

__version__ = "0.1.0"

from freqmedclip.modeling.config import FreqMedCLIPConfig, VARIANTS, PRESETS  # noqa: E402
from freqmedclip.modeling.frequency import haar_dwt  # noqa: E402
from freqmedclip.modeling.model import FreqMedCLIP, SegOutput, build_model, parameter_report  # noqa: E402

__all__ = ["FreqMedCLIP", "FreqMedCLIPConfig", "SegOutput", "build_model", "parameter_report", "haar_dwt",
           "VARIANTS", "PRESETS", "__version__"]
