"""Caches that let a robot ask several questions about one frame without paying for the frame again.

`FeatureCache` keeps vision-tower outputs keyed by a hash of the decoded pixels, least recently used
first out, within a byte budget. A repeated frame (or a second question on the same image) skips the
vision tower entirely. `PrefixCache` keeps the KV of recent prompts, so a prompt that starts like an
earlier one (every planner prompt starts with the same few-shot block) prefills only what differs.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
from PIL import Image


def image_key(image: Image.Image) -> str:
    """A digest of the decoded pixels (and their layout): the same frame from any file or array matches."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def nbytes(value: Any) -> int:
    """Bytes held by arrays/tensors inside `value` (numpy arrays, torch tensors, model outputs, containers)."""
    if hasattr(value, "nbytes") and not isinstance(value, (dict, list, tuple)):
        return int(value.nbytes)
    if hasattr(value, "element_size") and hasattr(value, "numel"):  # torch.Tensor
        return int(value.element_size() * value.numel())
    if isinstance(value, dict) or hasattr(value, "values") and callable(value.values):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0


class FeatureCache:
    """A bounded LRU map from image keys to vision features; `max_bytes` is never exceeded."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:  # a look that counts neither a hit nor a miss
        return key in self._entries

    def get(self, key: str) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: str, value: Any) -> bool:
        """Store `value` (evicting the least recently used); False when it alone exceeds the budget."""
        size = nbytes(value)
        with self._lock:
            if key in self._entries:
                self.bytes -= self._entries.pop(key)[1]
            if size > self.max_bytes:
                return False
            while self.bytes + size > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.bytes -= evicted
                self.evictions += 1
            self._entries[key] = (value, size)
            self.bytes += size
            return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0


class PrefixCache(FeatureCache):
    """KV caches of recent prompts keyed by their token ids, within a byte budget (LRU).

    A prompt that starts like a stored one (the planner's few-shot block, a system prompt) reuses the
    stored KV of the shared tokens and prefills only the rest: a causal model's KV at position i depends
    on tokens 0..i alone. Matches shorter than `min_tokens` are not worth a copy.
    """

    def __init__(self, max_bytes: int, min_tokens: int = 16):
        super().__init__(max_bytes)
        self.min_tokens = min_tokens

    def match(self, ids: list[int], limit: int) -> tuple[Any, int] | None:
        """(stored value, shared length) for the stored prompt sharing the longest prefix with ids[:limit]."""
        query = np.asarray(ids[:limit])
        with self._lock:
            best_key, best_n = None, 0
            for key in self._entries:
                n = min(len(key), len(query))
                differ = np.flatnonzero(np.asarray(key[:n]) != query[:n])
                n = int(differ[0]) if differ.size else n
                if n > best_n:
                    best_key, best_n = key, n
            if best_key is None or best_n < self.min_tokens:
                self.misses += 1
                return None
            self._entries.move_to_end(best_key)
            self.hits += 1
            return self._entries[best_key][0], best_n
