"""edgevlm: small vision-language systems on edge devices.

The Extract->Think runtime: a small VLM extracts the question-relevant visual
details as text, a small LLM reasons over that text.

    >>> import edgevlm
    >>> pipe = edgevlm.Pipeline.from_pretrained(extractor="...", reasoner="...")
    >>> result = pipe("photo.jpg", "How many people are in the picture?")
    >>> result.answer

Importing this package never imports torch or transformers; only the PyTorch
reference backend does, and only when it is used.
"""

__version__ = "0.1.0"

__all__ = ["Pipeline", "Result", "EdgeVLMError", "__version__"]


def __getattr__(name: str):
    # Lazy: `import edgevlm` stays cheap for CLI start-up and for robot processes.
    if name in ("Pipeline", "Result"):
        from edgevlm import pipeline

        return getattr(pipeline, name)
    if name == "EdgeVLMError":
        from edgevlm.errors import EdgeVLMError

        return EdgeVLMError
    raise AttributeError(f"module 'edgevlm' has no attribute {name!r}")
