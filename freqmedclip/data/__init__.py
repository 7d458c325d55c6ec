"""Data pipeline (paper §4): on-disk format, phantom benchmark, folder importer and torch Dataset.

Only the format API (numpy/Pillow only) is re-exported here; the torch Dataset lives in
``freqmedclip.data.dataset``.
"""

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
