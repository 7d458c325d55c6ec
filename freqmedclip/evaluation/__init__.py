"""Evaluation: segmentation metrics in millimetres (Dice, IoU, HD95, ASSD, NSD) and the paper's result tables.
Pure numpy/scipy: imports nothing else of the package, so anything may use it."""
