"""The KV cache of one generation on ONNX Runtime: preallocated buffers the decoder graph reads and writes by
pointer (IO binding), so no tensor is allocated or copied through Python per token. numpy only."""

from __future__ import annotations

import mmap

import numpy as np


def _reserve(shape: tuple[int, int]) -> np.ndarray:
    """An fp32 array whose pages become resident only as they are written, in 4 KB pages. (numpy asks
    for transparent huge pages on large arrays: a shared cache fills each head's rows from the start of
    its own region, so 2 MB pages would make some 2 MB per head and tensor resident at once: for SmolLM2's
    8192-position reservation, all 380 MB of it after one short prompt.)"""
    size = max(int(np.prod(shape)) * 4, 1)
    region = mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        region.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(region, np.float32, count=int(np.prod(shape))).reshape(shape)


class KVCache:
    """The KV tensors of one generation, preallocated and bound to the decoder graph by pointer.

    `shared`: one buffer per tensor, [1, kv_heads, capacity, head_dim]; the graph (GroupQueryAttention)
    reads the filled prefix and writes the new positions in place, so a step moves nothing but the new
    keys and values. The capacity is the whole planned context up front: pages are only touched (resident)
    as positions fill, so the reservation costs address space, not memory.
    Otherwise (graphs that concatenate past and new): two buffer sets used in turn, each tensor
    [1, kv_heads, length, head_dim] contiguous at the start of its row; the capacity grows by doubling.
    Never past `limit` (the model's planned context: edgevlm.memory).
    """

    def __init__(self, tensors: int, kv_heads: int, head_dim: int, capacity: int, limit: int | None = None,
                 shared: bool = False):
        self.tensors, self.kv_heads, self.head_dim, self.shared = tensors, kv_heads, head_dim, shared
        self.length, self.limit = 0, limit
        self.binding, self.binding_capacity = None, 0  # the decoder's IO binding of a shared cache
        self.step_bound = False  # whether that binding reads a step's token and position from step_*
        self.logits: np.ndarray | None = None  # the generation's logits buffer, [1, 1, vocab], written each run
        self._alloc(limit if shared and limit else capacity if limit is None else min(capacity, limit))

    def _alloc(self, capacity: int) -> None:
        self.capacity = capacity
        shape = (self.tensors, self.kv_heads * capacity * self.head_dim)
        if self.shared:
            self._read = self._write = _reserve(shape)
            # A decode step's inputs, bound by pointer with the buffers: the step writes them in place.
            self.step_token, self.step_position = np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64)
        else:
            self._read, self._write = np.empty(shape, np.float32), np.empty(shape, np.float32)

    def _rows(self, n: int) -> np.ndarray:
        """The first n positions as a [tensors, kv_heads, n, head_dim] view."""
        width = self.capacity if self.shared else self.length
        rows = self._read[:, :self.kv_heads * width * self.head_dim]
        return rows.reshape(self.tensors, self.kv_heads, width, self.head_dim)[:, :, :n]

    def _fill(self, rows: np.ndarray) -> None:
        """Make `rows` ([tensors, kv_heads, n, head_dim]) the cache's contents."""
        n = rows.shape[2]
        self.length = n
        self._rows(n)[...] = rows

    def reserve(self, length: int) -> None:
        if length <= self.capacity:
            return
        old = self._rows(self.length).copy()
        grown = max(length, 2 * self.capacity)
        self._alloc(grown if self.limit is None else max(length, min(grown, self.limit)))
        self._fill(old)

    def past_shape(self, length: int) -> list[int]:
        return [1, self.kv_heads, self.capacity if self.shared else length, self.head_dim]

    def read_pointers(self) -> list[int]:
        return [row.ctypes.data for row in self._read]

    def write_pointers(self) -> list[int]:
        return [row.ctypes.data for row in self._write]

    def nbytes(self) -> tuple[int, int]:
        """(allocated, used): the buffers reserved (both sets, unless shared), and the cache's contents."""
        per_position = self.tensors * self.kv_heads * self.head_dim * 4
        return (1 if self.shared else 2) * per_position * self.capacity, per_position * self.length

    def snapshot(self, n: int) -> tuple[np.ndarray, int]:
        """A copy of the first n positions, and n."""
        return np.ascontiguousarray(self._rows(n)).reshape(self.tensors, -1), n

    def load(self, snapshot: tuple[np.ndarray, int], n: int) -> None:
        """Start from the first n positions of a snapshot."""
        data, length = snapshot
        self.reserve(n)
        self._fill(data.reshape(self.tensors, self.kv_heads, length, self.head_dim)[:, :, :n])

    def advance(self, new: int) -> None:
        """The graph has written length + new positions into the write set: it becomes the read set."""
        self._read, self._write = self._write, self._read
        self.length += new
