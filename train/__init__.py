"""Training (needs torch + transformers: `pip install edgevlm[export]`): visual extraction tuning (tune), the
demo models' recipe (demo) and tiny-model builders (tiny). Neither export nor runtime; the runtime never
imports it.
"""
