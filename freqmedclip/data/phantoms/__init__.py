"""The phantom benchmark: three synthetic domains (brain MRI, mammography, lung CT) written in the on-disk format.
``python -m freqmedclip.data.phantoms --out DIR``; imports only ``freqmedclip.data.format``."""
