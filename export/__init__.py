"""The offline toolchain (needs torch + transformers: `pip install edgevlm[export]`).

Checkpoint conversion now; ONNX export, quantization and engine building land here next.
"""
