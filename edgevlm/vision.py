"""The extractor's image features for a call: from the cache (by image content), from the vision tower run
beside the planner (overlap), or computed when the extract stage needs them."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from PIL import Image

from edgevlm.backends.base import Model, Prepared
from edgevlm.cache import FeatureCache, image_key
from edgevlm.profiler import Profiler


class VisionFeatures:
    """Owns the feature cache (`cache_bytes`, LRU; 0 turns it off) and the overlap thread.

    A call takes its image's `key`, may `start` the tower on the overlap thread while the planner decodes,
    and `fill`s the extract (or direct) stage's prepared prompt with the features; `finish` waits out an
    overlapped run the call no longer needs, so the next call's cannot start beside it.
    """

    def __init__(self, extractor: Model, cache_bytes: int, overlap: bool):
        self.extractor, self.overlap = extractor, overlap
        self.cache = FeatureCache(cache_bytes)
        # made now (it starts no thread before its first job), so two runs in flight never race to make it
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="edgevlm-vision") if overlap else None

    def key(self, image: Image.Image) -> str | None:
        """The cache's key for `image` (None while the cache is off)."""
        return image_key(image) if self.cache.max_bytes else None

    def start(self, image: Image.Image, key: str | None) -> Future | None:
        """Encode `image` on the overlap thread, unless overlap is off or the cache holds its features."""
        if not self.overlap or (key is not None and key in self.cache):
            return None
        return self._executor.submit(self._encode, image)

    def _encode(self, image: Image.Image) -> tuple[np.ndarray, float, float]:
        """The features of `image` (the prompt around it does not matter), with the start and end of the work."""
        start = time.perf_counter()
        prompt = self.extractor.family.render(self.extractor.tokenizer, "", with_image=True)
        prepared = self.extractor.prepare(prompt, image)
        self.extractor.encode(prepared)
        return prepared.image_features, start, time.perf_counter()

    @staticmethod
    def _crops(prepared: Prepared) -> dict:
        """The crops the tower just encoded, for the stage's record (where the backend counts them)."""
        return {"vision_crops": prepared.crops} if prepared.crops else {}

    def fill(self, prepared: Prepared, key: str | None, pending: Future | None, prof: Profiler) -> dict:
        """Set `prepared.image_features`; what happened, for the stage's memory record: the cache's outcome
        ("vision_cache": "hit" or "miss") or the overlapped run's length ("vision_overlapped_ms")."""
        if pending is not None:  # encoded beside the planner
            prepared.image_features, start, end = pending.result()
            prof.add("vision (overlapped)", "vision", start, end)
            if key is not None:
                self.cache.put(key, prepared.image_features)
            return {"vision_overlapped_ms": round((end - start) * 1e3, 3), **self._crops(prepared)}
        if key is None:
            self.extractor.encode(prepared)
            return self._crops(prepared)
        features = self.cache.get(key)
        if features is not None:
            prepared.image_features = features
            return {"vision_cache": "hit"}
        self.extractor.encode(prepared)
        self.cache.put(key, prepared.image_features)
        return {"vision_cache": "miss", **self._crops(prepared)}

    @staticmethod
    def finish(pending: Future | None) -> None:
        """A run stopped during the plan: its overlapped tower ends before the next run's may start."""
        if pending is not None and not pending.cancel():
            pending.exception()
