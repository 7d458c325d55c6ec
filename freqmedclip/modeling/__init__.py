"""The model, stage by stage as in the paper's Figure 1 (§3): prompt, semantic and frequency streams, FFBI, decoders,
fusion head, loss. Imports nothing else of the package: inference, evaluation, demo and data are built on top of it."""
