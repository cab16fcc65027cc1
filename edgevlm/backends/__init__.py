"""Backends run a model's forward passes; everything else (prompts, sampling, stages) is shared.

A backend model implements `base.Model`. `torch_ref` is the PyTorch reference every exported
backend is tested against; it is imported only when used.
"""
