"""Converters from public datasets (BraTS, CBIS-DDSM, LUNA16) and from any image/mask folder into the on-disk format,
all on one parallel, resumable runner (``runner``). Import only ``freqmedclip.data.format``."""
