"""Training (needs torch + transformers: `pip install edgevlm[export]`): visual extraction tuning (tune), the
demo models' recipe (demo), the training loop both use (loop) and tiny-model builders (tiny). Neither export
nor runtime; the runtime never imports it.
"""
