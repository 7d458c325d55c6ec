"""Data (paper §4): the on-disk format, the torch Dataset, ``phantoms/`` and ``converters/``.
Imports nothing else of the package. Only the format API (numpy/Pillow) is re-exported; the Dataset is ``data.dataset``."""

from freqmedclip.data.format import (
    StructureRecord,
    assign_splits,
    load_image,
    load_mask,
    read_manifest,
    sample_exists,
    write_manifest,
    write_sample,
)

__all__ = [
    "StructureRecord",
    "assign_splits",
    "load_image",
    "load_mask",
    "read_manifest",
    "sample_exists",
    "write_manifest",
    "write_sample",
]
