"""Real public scans (LGG brain MRI, BUS-BRA ultrasound, LIDC-IDRI CT crops): pinned files, checksums, conversion.
Imports only ``freqmedclip.data.format`` and ``freqmedclip.data.converters.runner``."""
