"""Medical file I/O for the demo: uploads in, masks out.

``load_upload(path)`` reads PNG, JPEG, TIFF (8/16-bit, gray, RGB, RGBA), DICOM and NIfTI into a
:class:`LoadedImage`: the raw pixel values the :class:`~freqmedclip.inference.predictor.Predictor` normalises, the modality
and CT window to normalise with, the display image (exactly what the model sees) and, for DICOM and NIfTI, the
geometry needed to export the mask back into the input's space.

Notable choices:
* The format comes from the file's magic bytes, not its name (a ``.png`` that is really a DICOM still loads).
* Every size limit is checked from the header before any pixel is decoded: PIL's lazy ``open`` (its own
  decompression-bomb guard included), DICOM read with ``stop_before_pixels``, NIfTI's header shape.
* DICOM: ``RescaleSlope``/``RescaleIntercept`` give Hounsfield units for CT; MONOCHROME1 is inverted so that bright
  means dense, and the file's own window is mirrored with it. The window is one of ``WINDOW_CHOICES``.
* NIfTI slices are shown rotated by 90 degrees (``np.rot90``: the first voxel axis runs left to right, the second
  bottom to top, the usual radiological view of an axial slice); :func:`export_mask_nifti` undoes the rotation and
  writes a volume with the input's shape and affine, the mask at the chosen slice.
* Every export is written to a temp file in the destination folder and moved into place (``os.replace``).
"""

from __future__ import annotations

import gzip
import math
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from freqmedclip.inference.preprocess import DEFAULT_MAX_PIXELS, WINDOW_PRESETS, InputError, normalize, validate_image

AUTO_WINDOW = "auto"          # the DICOM file's own window (CT without one: full range)
FULL_RANGE = "full range"     # min-max of the slice
WINDOW_CHOICES = (AUTO_WINDOW, *WINDOW_PRESETS, FULL_RANGE)
AXIS_NAMES = ("sagittal (axis 0)", "coronal (axis 1)", "axial (axis 2)")
DICOM_MODALITIES = {"CT": "CT", "MR": "MRI", "MG": "MG", "US": "US"}
HU_THRESHOLD = -500.0         # a NIfTI volume reaching below this is taken as CT in Hounsfield units

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


@dataclass(frozen=True)
class Limits:
    """Upload limits; each is checked before the pixels are decoded.

    max_upload_mb: file size. max_pixels: pixels of one 2-D image or slice. max_voxels: voxels of a whole
    NIfTI volume or multi-frame DICOM.
    """

    max_upload_mb: float = 200.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_voxels: int = 512 * 512 * 1024

    def check_pixels(self, height: int, width: int, what: str = "image") -> None:
        if height * width > self.max_pixels:
            raise InputError(f"{what} is {height}x{width} = {height * width:,} px, over the limit of "
                             f"{self.max_pixels:,} px (--max-pixels)")


@dataclass(frozen=True)
class Geometry:
    """Where the shown slice lives in the input file, for NIfTI export.

    shape: the (3-D) voxel grid of the export; affine: (4, 4) voxel -> world (RAS+, mm); axis/index: the slice;
    layout: "nifti" (slice shown as ``rot90``) or "dicom" (slice shown as stored, rows x columns).
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    axis: int
    index: int
    layout: str
    units: tuple[str, str] | None = None     # NIfTI (space, time) units of the input


@dataclass
class LoadedImage:
    """An upload ready for the model.

    array: (H, W) or (H, W, C) raw pixel values (HU for CT DICOM), what ``Predictor.prepare`` takes.
    display: (H, W, 3) uint8, the image normalised exactly as the model sees it.
    """

    array: np.ndarray
    display: np.ndarray
    kind: str                                        # png | jpeg | tiff | dicom | nifti | image
    modality: str = "auto"                           # auto | MRI | CT | MG | US (preprocess.MODALITIES)
    window: tuple[float, float] | None = None        # CT (level, width) in HU, None = no window
    spacing_mm: tuple[float, float] | None = None    # (row, col) of ``array``
    geometry: Geometry | None = None
    n_slices: int = 1                                # along the chosen axis (NIfTI) or frames (DICOM)
    slice_index: int = 0
    name: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        return self.array.shape[0], self.array.shape[1]

    def describe(self) -> str:
        """One line for the UI: format, size, modality, window, spacing, slice."""
        height, width = self.size
        parts = [f"{self.kind.upper()} {height}x{width}", f"modality {self.modality}"]
        if self.window is not None:
            parts.append(f"window L {self.window[0]:g} / W {self.window[1]:g} HU")
        if self.spacing_mm is not None:
            parts.append(f"spacing {self.spacing_mm[0]:.3g} x {self.spacing_mm[1]:.3g} mm")
        if self.n_slices > 1:
            parts.append(f"slice {self.slice_index + 1}/{self.n_slices}")
        return ", ".join(parts + self.notes)


def sniff_format(path: Path) -> str:
    """The file's format from its first bytes: png | jpeg | tiff | dicom | nifti | unknown."""
    with open(path, "rb") as f:
        head = f.read(132)
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in TIFF_MAGICS:
        return "tiff"
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x1f\x8b"):
        try:
            with gzip.open(path, "rb") as f:
                head = f.read(4)
        except (OSError, EOFError):
            return "unknown"
    header_sizes = (348, 540)                                                       # NIfTI-1, NIfTI-2
    if len(head) >= 4 and (int.from_bytes(head[:4], "little") in header_sizes
                           or int.from_bytes(head[:4], "big") in header_sizes):
        return "nifti"
    return "unknown"


def load_upload(path: str | Path, *, modality: str = "auto", window: str = AUTO_WINDOW,
                slice_index: int | None = None, axis: int = 2, limits: Limits | None = None) -> LoadedImage:
    """Read an uploaded file; raises :class:`InputError` naming the problem for anything unusable.

    Args:
        modality: "auto" (from the file: DICOM's Modality tag; NIfTI: CT if below -500, else MRI; pictures:
            the 8-bit / min-max display convention the model was trained with) or MRI / CT / MG / US.
        window: one of ``WINDOW_CHOICES`` (CT only).
        slice_index: NIfTI slice / DICOM frame (default: the middle one).
        axis: NIfTI axis to slice along (0, 1 or 2).
        limits: upload limits (default: ``Limits()``).
    """
    limits = limits or Limits()
    if path is None or not str(path):
        raise InputError("no file: upload an image first")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path.name}: file not found")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path.name} is empty (0 bytes)")
    if size > limits.max_upload_mb * 2**20:
        raise InputError(f"{path.name} is {size / 2**20:.1f} MB, over the upload limit of "
                         f"{limits.max_upload_mb:g} MB (--max-upload-mb)")
    if window not in WINDOW_CHOICES:
        raise InputError(f"unknown window {window!r}; choose one of {', '.join(WINDOW_CHOICES)}")
    kind = sniff_format(path)
    if kind == "dicom":
        loaded = _load_dicom(path, modality, window, slice_index, limits)
    elif kind == "nifti":
        loaded = _load_nifti(path, modality, window, slice_index, axis, limits)
    else:
        loaded = _load_picture(path, kind, modality, window, limits)
    loaded.name = path.name
    return loaded


def _window_for(modality: str, window: str, own: tuple[float, float] | None) -> tuple[float, float] | None:
    if modality != "CT" or window == FULL_RANGE:
        return None
    if window == AUTO_WINDOW:
        return own
    return WINDOW_PRESETS[window]


def _finish(array: np.ndarray, kind: str, modality: str, window: tuple[float, float] | None,
            limits: Limits, **fields) -> LoadedImage:
    """Validate, and render the display image the model will see."""
    array = validate_image(array, limits.max_pixels)
    unit = normalize(array, modality, window)                                     # (H, W, C) in [0, 1]
    display = np.round(unit * 255).astype(np.uint8)
    if display.shape[-1] == 1:
        display = np.repeat(display, 3, axis=-1)
    return LoadedImage(array=array, display=display, kind=kind, modality=modality, window=window, **fields)


# ---------------------------------------------------------------- pictures: PNG, JPEG, TIFF (and what PIL reads)

def _load_picture(path: Path, kind: str, modality: str, window: str, limits: Limits) -> LoadedImage:
    try:
        with Image.open(path) as image:
            width, height = image.size
            limits.check_pixels(height, width)
            bits = image.tag_v2.get(258) if kind == "tiff" else None
            if bits is not None and len(bits) > 1 and max(bits) > 8:
                array = _read_multisample_tiff(path)                                  # 16-bit RGB(A): keep 16 bits
            else:
                image.load()
                array = _pil_to_array(image)
    except InputError:
        raise
    except Image.DecompressionBombError as error:
        raise InputError(f"{path.name} is too large to decode safely: {error}") from error
    except (UnidentifiedImageError, SyntaxError) as error:
        raise InputError(f"{path.name} is not an image this demo can read (PNG, JPEG, TIFF, DICOM or NIfTI)") \
            from error
    except (OSError, ValueError, EOFError, RuntimeError) as error:
        raise InputError(f"{path.name}: the image data is corrupt or truncated ({error})") from error
    return _finish(array, "image" if kind == "unknown" else kind, modality, _window_for(modality, window, None),
                   limits)


def _pil_to_array(image: Image.Image) -> np.ndarray:
    """PIL image -> (H, W) or (H, W, C) array keeping the bit depth (16-bit gray stays uint16)."""
    if image.mode == "1":
        image = image.convert("L")
    elif image.mode == "LA":
        image = image.getchannel("L")
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA" if "transparency" in image.info or image.mode == "PA" else "RGB")
    elif image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    array = np.asarray(image)
    if image.mode.startswith("I;16"):
        array = array.astype(np.uint16)
    return array


def _read_multisample_tiff(path: Path) -> np.ndarray:
    """16-bit RGB / RGBA TIFF at full depth (PIL would reduce it to 8 bits): (H, W, C) uint16."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ---------------------------------------------------------------- DICOM

def _first(value: object) -> float:
    """A DICOM value that may be multi-valued (e.g. several windows): its first element as float."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _load_dicom(path: Path, modality: str, window: str, slice_index: int | None, limits: Limits) -> LoadedImage:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        rows, columns = int(header.Rows), int(header.Columns)
        frames = int(header.get("NumberOfFrames", 1) or 1)
    except (InvalidDicomError, AttributeError, TypeError, ValueError, EOFError, OSError) as error:
        raise InputError(f"{path.name} is a corrupt DICOM file or holds no image ({error})") from error
    limits.check_pixels(rows, columns, "DICOM image")
    if rows * columns * frames > limits.max_voxels:
        raise InputError(f"DICOM has {frames} frames of {rows}x{columns} = {rows * columns * frames:,} voxels, over "
                         f"the limit of {limits.max_voxels:,}")
    try:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array
    except Exception as error:  # pydicom raises many types for bad or unsupported pixel data
        raise InputError(f"{path.name}: could not decode the DICOM pixel data ({type(error).__name__}: {error}); "
                         "compressed transfer syntaxes need pylibjpeg or GDCM") from error
    if frames > 1:
        index = frames // 2 if slice_index is None else int(slice_index)
        if not 0 <= index < frames:
            raise InputError(f"frame {index} is outside 0..{frames - 1}")
        pixels = pixels[index]
    else:
        index = 0
    samples = int(dataset.get("SamplesPerPixel", 1))
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    notes = []
    own_window = None
    if samples == 1:
        slope, intercept = float(dataset.get("RescaleSlope", 1) or 1), float(dataset.get("RescaleIntercept", 0) or 0)
        pixels = pixels.astype(np.float32) * slope + intercept
        if "WindowCenter" in dataset and "WindowWidth" in dataset:
            own_window = (_first(dataset.WindowCenter), _first(dataset.WindowWidth))
        if photometric == "MONOCHROME1":
            mirror = float(pixels.max() + pixels.min())
            pixels = mirror - pixels
            if own_window is not None:
                own_window = (mirror - own_window[0], own_window[1])
            notes.append("MONOCHROME1 inverted")
    if modality == "auto":
        modality = DICOM_MODALITIES.get(str(dataset.get("Modality", "")).upper(), "auto")
    spacing = _dicom_spacing(dataset)
    geometry = Geometry(shape=(columns, rows, frames), affine=_dicom_affine(dataset, spacing), axis=2,
                        index=index, layout="dicom")
    return _finish(pixels, "dicom", modality, _window_for(modality, window, own_window), limits,
                   spacing_mm=spacing, geometry=geometry, n_slices=frames, slice_index=index, notes=notes)


def _dicom_spacing(dataset) -> tuple[float, float] | None:
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        if tag in dataset:
            row, col = (float(v) for v in dataset.get(tag))
            return row, col
    return None


def _dicom_affine(dataset, spacing: tuple[float, float] | None) -> np.ndarray:
    """Voxel (column, row, frame) -> RAS+ mm, from ImagePositionPatient / ImageOrientationPatient (DICOM is LPS+)."""
    row_mm, col_mm = spacing or (1.0, 1.0)
    orientation = [float(v) for v in dataset.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    position = [float(v) for v in dataset.get("ImagePositionPatient", [0, 0, 0])]
    along_row, along_col = np.array(orientation[:3]), np.array(orientation[3:])   # +column index, +row index
    normal = np.cross(along_row, along_col)
    thickness = float(dataset.get("SpacingBetweenSlices", dataset.get("SliceThickness", 1.0)) or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = along_row * col_mm
    lps[:3, 1] = along_col * row_mm
    lps[:3, 2] = normal * thickness
    lps[:3, 3] = position
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


# ---------------------------------------------------------------- NIfTI

def _in_plane_axes(axis: int) -> tuple[int, int]:
    return tuple(a for a in range(3) if a != axis)  # type: ignore[return-value]


def nifti_view(slab: np.ndarray) -> np.ndarray:
    """Voxel-order slice (A, B) -> displayed (B, A): the first in-plane axis left to right, the second upwards."""
    return np.rot90(slab)


def nifti_unview(view: np.ndarray) -> np.ndarray:
    """Inverse of :func:`nifti_view`: displayed (B, A) -> voxel order (A, B)."""
    return np.rot90(view, k=-1)


def _load_nifti(path: Path, modality: str, window: str, slice_index: int | None, axis: int,
                limits: Limits) -> LoadedImage:
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        image = nib.load(str(path))
        shape = tuple(int(s) for s in image.shape)
    except (ImageFileError, OSError, ValueError, EOFError) as error:
        raise InputError(f"{path.name} is not a readable NIfTI file ({error})") from error
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3):
        raise InputError(f"NIfTI image has shape {shape}; only 2-D and 3-D images are supported")
    voxels = math.prod(shape)
    if voxels > limits.max_voxels:
        raise InputError(f"NIfTI volume is {'x'.join(map(str, shape))} = {voxels:,} voxels, over the limit of "
                         f"{limits.max_voxels:,} voxels")
    if axis not in (0, 1, 2):
        raise InputError(f"axis must be 0, 1 or 2, got {axis}")
    if len(shape) == 2:
        shape, axis = (*shape, 1), 2
    n_slices = shape[axis]
    index = n_slices // 2 if slice_index is None else int(slice_index)
    if not 0 <= index < n_slices:
        raise InputError(f"slice {index} is outside 0..{n_slices - 1} along axis {axis}")
    first, second = _in_plane_axes(axis)
    limits.check_pixels(shape[second], shape[first], "NIfTI slice")
    selector: list[slice | int] = [slice(None)] * len(image.shape)
    if len(image.shape) >= 3:
        selector[axis] = index
        selector[3:] = [0] * (len(image.shape) - 3)                                   # trailing singleton axes
    try:
        slab = np.asarray(image.dataobj[tuple(selector)], dtype=np.float32)       # reads this slice only
    except (OSError, ValueError, EOFError, TypeError) as error:
        raise InputError(f"{path.name}: the NIfTI data is corrupt or truncated ({error})") from error
    if modality == "auto":
        modality = "CT" if float(np.nanmin(slab)) < HU_THRESHOLD else "MRI"
    zooms = [float(z) for z in image.header.get_zooms()[:3]]
    zooms += [1.0] * (3 - len(zooms))
    geometry = Geometry(shape=shape, affine=np.asarray(image.affine, dtype=np.float64), axis=axis, index=index,
                        layout="nifti", units=image.header.get_xyzt_units())
    return _finish(nifti_view(slab), "nifti", modality, _window_for(modality, window, None), limits,
                   spacing_mm=(zooms[second], zooms[first]), geometry=geometry, n_slices=n_slices,
                   slice_index=index)


# ---------------------------------------------------------------- export

def export_dir() -> Path:
    """A fresh folder under the system temp directory (Gradio serves files returned from there)."""
    return Path(tempfile.mkdtemp(prefix="freqmedclip-exports-"))


def prune(directory: Path, max_age_s: float) -> None:
    """Delete files older than ``max_age_s`` seconds from an export folder (a long-running server's exports)."""
    deadline = time.time() - max_age_s
    for path in Path(directory).glob("*"):
        try:
            if path.is_file() and path.stat().st_mtime < deadline:
                path.unlink(missing_ok=True)
        except FileNotFoundError:  # removed meanwhile by a concurrent request
            continue


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(temp)`` then ``os.replace(temp, path)``; the temp keeps the suffixes (nibabel reads them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"partial-{uuid.uuid4().hex}-{path.name}")
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def _stem(name: str) -> str:
    stem = name
    for suffix in (".nii.gz", ".nii", ".dcm", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gz"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:60]
    return cleaned or "image"


def export_mask_png(mask: np.ndarray, directory: Path, name: str = "image") -> Path:
    """mask: (H, W) bool at the input's size -> ``<name>_mask-<id>.png`` (0 / 255, 8-bit gray)."""
    path = Path(directory) / f"{_stem(name)}_mask-{uuid.uuid4().hex[:8]}.png"
    pixels = Image.fromarray(mask.astype(np.uint8) * 255)
    return _atomic(path, lambda temp: pixels.save(temp, format="PNG"))


def mask_volume(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The shown slice's mask (H, W) bool placed into a zero volume of ``geometry.shape`` (uint8)."""
    volume = np.zeros(geometry.shape, dtype=np.uint8)
    plane = nifti_unview(mask) if geometry.layout == "nifti" else mask.T                  # voxel order
    selector = [slice(None)] * 3
    selector[geometry.axis] = geometry.index
    volume[tuple(selector)] = plane.astype(np.uint8)
    return volume


def export_mask_nifti(mask: np.ndarray, loaded: LoadedImage, directory: Path) -> Path:
    """NIfTI mask with the input's voxel grid and affine (NIfTI and DICOM inputs); the mask at the shown slice."""
    import nibabel as nib

    if loaded.geometry is None:
        raise InputError("NIfTI export needs a NIfTI or DICOM input (a picture has no patient geometry)")
    geometry = loaded.geometry
    volume = mask_volume(mask, geometry)
    image = nib.Nifti1Image(volume, geometry.affine)
    image.set_qform(geometry.affine, code=1)                                                # scanner coordinates
    image.set_sform(geometry.affine, code=1)
    image.header.set_xyzt_units(*(geometry.units or ("mm", "sec")))
    path = Path(directory) / f"{_stem(loaded.name)}_mask-{uuid.uuid4().hex[:8]}.nii.gz"
    return _atomic(path, lambda temp: nib.save(image, str(temp)))
