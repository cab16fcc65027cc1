"""Calibration and evaluation sets, the readers that feed them to quantizers, and fidelity metrics."""
