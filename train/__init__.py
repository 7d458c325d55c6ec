"""Training, evaluation and benchmarking entry points: ``python -m train.<module>``."""
