"""Helpers shared by the demo, app, browser and figure tests: decisive mini models, checkpoints, medical files.

No test data is committed: every DICOM, NIfTI, TIFF and oversized header is written here, in the test's tmp dir.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from freqmedclip.inference.checkpoint import save_checkpoint
from freqmedclip.modeling.config import FreqMedCLIPConfig
from freqmedclip.modeling.model import FreqMedCLIP, build_model

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "assets" / "examples"


def decisive_model(backbone, seed: int = 0, variant: str = "full", empty: bool = False) -> FreqMedCLIP:
    """A mini model whose zero-initialised layers (TCA, FiLM, gate, fusion head) carry random values and whose
    logits spread far from 0, so masks are non-trivial and depend on the prompt; ``empty``: never any target."""
    torch.manual_seed(seed)
    config = FreqMedCLIPConfig.from_preset("mini", variant, backbone=backbone.source, frequency_weights="none")
    model = build_model(config, backbone)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
        if model.head is not None:
            model.head.skip.weight.mul_(40.0)
            if empty:
                model.head.skip.bias.fill_(-1000.0)
    return model.eval()


def make_checkpoints(root: Path, backbone, seeds: tuple[int, ...] = (0,)) -> list[Path]:
    """Save decisive models as checkpoint folders ``root/mini-seed<k>`` (model.safetensors + config.json)."""
    return [save_checkpoint(root / f"mini-seed{seed}", decisive_model(backbone, seed), {"test": True})
            for seed in seeds]


def write_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width x height (8-bit gray) with a token of pixel data: never decodable."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def write_dicom(path: Path, pixels: np.ndarray, *, modality: str = "CT", slope: float = 1.0,
                intercept: float = -1024.0, window: tuple[float, float] | None = (40.0, 400.0),
                photometric: str = "MONOCHROME2", spacing: tuple[float, float] = (0.7, 0.8),
                position: tuple[float, float, float] = (-100.0, -120.0, 30.0)) -> Path:
    """A single-frame uncompressed DICOM of ``pixels`` (H, W) uint16 with geometry, rescale and window tags."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = 2.5
    ds.ImagePositionPatient = list(position)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_nifti(path: Path, volume: np.ndarray, affine: np.ndarray | None = None) -> Path:
    import nibabel as nib

    if affine is None:
        affine = np.array([[-0.9, 0, 0, 90.0], [0, 1.1, 0, -120.0], [0, 0, 2.5, -60.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    return path


def write_nifti_header(path: Path, shape: tuple[int, ...]) -> Path:
    """A NIfTI-1 header declaring ``shape`` (float32) followed by no data at all."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    with open(path, "wb") as f:
        header.write_to(f)
        f.write(b"\0" * 4)
    return path


def phantom_image(size: int = 96, seed: int = 0) -> np.ndarray:
    """(size, size) uint8: a bright disc on a noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size * 0.45) ** 2 + (xx - size * 0.55) ** 2 < (size * 0.2) ** 2
    return np.clip(60 + 120 * disc + rng.normal(0, 10, (size, size)), 0, 255).astype(np.uint8)
