"""GPTQ in numpy: int4 weights that correct each other's rounding error, at ONNX Runtime's fast kernel format.

For each MatMul y = x @ W with a constant W [K, N], the calibration prompts give H = X^T X over its input
rows. The K input channels are quantized one at a time (asymmetric blocks of `block_size` along K, uint4
zero points: the format MatMulNBits' CPU kernel runs at full speed), and each channel's rounding error is
spread over the channels not yet quantized through the inverse Hessian's Cholesky factor, so that x @ W
changes least on the calibration inputs (Frantar et al. 2022: blocked, lazy batch updates). The
quantized integers are written straight into MatMulNBits nodes, so nothing re-rounds them.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, MutableMapping
from pathlib import Path

import numpy as np

from edgevlm.errors import ModelError

DAMP = 0.01  # of the mean Hessian diagonal, added to it: keeps the inverse finite for rarely-used channels
BATCH = 128  # channels per lazy update of the rest of the matrix
SHRINK = np.linspace(1.0, 0.8, 5)  # a block's range may be narrowed to these fractions if that errs less


class SpilledGrams(MutableMapping):
    """Inputs' X^T X (what `quantize_graph(grams=)` keeps across a fidelity target's steps) held on disk, each a
    float64 .npy in a directory of this object's own, read back memory-mapped: between GPTQ runs the target
    loads the fp32 reference and the candidate to measure them, and the grams must not sit in memory beside
    them (SmolLM2-135M's are 0.8 GB; a 1.7B model's over 10 GB). The directory (under TMPDIR) goes when this
    object does, or at exit. Loading never unpickles."""

    def __init__(self):
        try:
            self.dir = Path(tempfile.mkdtemp(prefix="edgevlm-grams-"))
        except OSError as e:
            raise ModelError(f"GPTQ cannot make a scratch directory under {tempfile.gettempdir()}: "
                             f"{e.strerror or e}; point TMPDIR at a writable disk") from None
        self._files: dict[str, tuple[Path, int]] = {}  # name -> (its file, its bytes)
        self._written = 0
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.dir), True)

    def __setitem__(self, name: str, gram: np.ndarray) -> None:
        if name in self._files:
            del self[name]
        path = self.dir / f"{self._written}.npy"  # tensor names may hold '/': files are numbered
        self._written += 1
        gram = np.asarray(gram, np.float64)
        try:
            np.save(path, gram)
        except OSError as e:
            path.unlink(missing_ok=True)
            held = sum(n for _, n in self._files.values()) + gram.nbytes
            raise ModelError(f"GPTQ cannot keep its X^T X in {self.dir} ({held / 1e9:.1f} GB needed so far): "
                             f"{e.strerror or e}; point TMPDIR at a disk with room") from None
        self._files[name] = path, gram.nbytes

    def __getitem__(self, name: str) -> np.ndarray:
        return np.load(self._files[name][0], mmap_mode="r", allow_pickle=False)

    def __delitem__(self, name: str) -> None:
        self._files.pop(name)[0].unlink()

    def __iter__(self):
        return iter(list(self._files))

    def __len__(self) -> int:
        return len(self._files)

    def close(self) -> None:
        self._files.clear()
        self._cleanup()


def activation_grams(src: Path, names: list[str], feeds: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """X^T X (float64) of each named tensor's rows over the feeds, from one run of the graph per feed."""
    from edgevlm.export.quantize import activation_probe

    grams: dict[str, np.ndarray] = {}
    with activation_probe(src, names, "gptq") as session:
        for feed in feeds:
            for name, x in zip(names, session.run(names, feed), strict=True):
                rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
                grams[name] = grams.get(name, 0.0) + rows.T @ rows
    return grams


def _block_params(w: np.ndarray, shrink: np.ndarray = SHRINK,
                  offsets: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scale and integer zero point (0..15) per row of w [N, block], the range always holding 0 (a uint4 zero
    point cannot leave it), narrowed by the `shrink` factor with the least squared rounding error. `offsets`: the
    zero point is any float (the block's own range, narrowed about its middle)."""
    if offsets:
        lo, hi = w.min(axis=1), w.max(axis=1)
    else:
        lo, hi = np.minimum(w.min(axis=1), 0.0), np.maximum(w.max(axis=1), 0.0)
    best_err = np.full(len(w), np.inf)
    best_scale, best_zero = np.ones(len(w), np.float32), np.zeros(len(w), np.float32)
    for f in shrink:
        scale = (hi - lo) * f / 15.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        if offsets:  # a constant block (scale 1) lands on a level, 8, as a uint4 zero point puts 0 on one
            zero = np.where(hi > lo, 7.5 - (hi + lo) / 2 / scale, 8.0 - lo / scale)
            q = np.clip(np.round(w / scale[:, None] + zero[:, None]), 0, 15)
        else:
            zero = np.clip(np.round(-lo * f / scale), 0, 15)
            q = np.clip(np.round(w / scale[:, None]) + zero[:, None], 0, 15)
        err = np.square((q - zero[:, None]) * scale[:, None] - w).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale, best_zero = np.where(better, scale, best_scale), np.where(better, zero, best_zero)
    return best_scale, best_zero


def gptq(w: np.ndarray, gram: np.ndarray, block_size: int = 32, act_order: bool = True,
         offsets: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ of W [K, N] (K a multiple of block_size) given its inputs' X^T X [K, K]. Returns the uint4 values
    q [N, K], scales [N, K/block] and zero points [N, K/block]: W[k, n] ~ (q[n, k] - zero) * scale.
    `act_order` quantizes the channels with the most input energy first, each block's scale and zero point
    then set from the original weights. `offsets`: float zero points (see quantize_graph)."""
    k, n = w.shape
    assert k % block_size == 0 and BATCH % block_size == 0
    W = w.T.astype(np.float32).copy()  # [N, K]: one row per output, channels quantized left to right
    H = gram.astype(np.float64).copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices(k)] += DAMP * np.mean(np.diag(H))
    scales = np.empty((n, k // block_size), np.float32)
    zeros = np.empty((n, k // block_size), np.float32)
    perm = np.arange(k)
    if act_order:
        for b in range(k // block_size):
            scales[:, b], zeros[:, b] = _block_params(W[:, b * block_size:(b + 1) * block_size], offsets=offsets)
        perm = np.argsort(-np.diag(H), kind="stable")
        W, H = W[:, perm], H[perm][:, perm]
    hinv = np.linalg.cholesky(np.linalg.inv(H)).T.astype(np.float32)  # upper factor
    q = np.empty((n, k), np.uint8)
    for start in range(0, k, BATCH):
        end = min(start + BATCH, k)
        w1, err = W[:, start:end].copy(), np.empty((n, end - start), np.float32)
        h1 = hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if act_order:
                b = perm[col] // block_size
                scale, zero = scales[:, b], zeros[:, b]
            elif col % block_size == 0:
                b = col // block_size
                scales[:, b], zeros[:, b] = _block_params(w1[:, i:i + block_size], offsets=offsets)
                scale, zero = scales[:, b], zeros[:, b]
            qi = np.clip(np.round(w1[:, i] / scale + zero) if offsets else np.round(w1[:, i] / scale) + zero, 0, 15)
            q[:, perm[col]] = qi
            e = (w1[:, i] - (qi - zero) * scale) / h1[i, i]
            w1[:, i + 1:] -= np.outer(e, h1[i, i + 1:])
            err[:, i] = e
        W[:, end:] -= err @ hinv[start:end, end:]
    return q, scales, zeros


def dequantize(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, block_size: int) -> np.ndarray:
    """W [K, N] back from gptq's output."""
    s = np.repeat(scales, block_size, axis=1)
    z = np.repeat(zeros, block_size, axis=1)
    return ((q.astype(np.float32) - z) * s).T


def _pack(values: np.ndarray) -> np.ndarray:
    """uint4 values [..., 2m] -> bytes [..., m], the first of each pair in the low nibble (MatMulNBits' order)."""
    v = values.astype(np.uint8)
    return v[..., 0::2] | (v[..., 1::2] << 4)


def matmul_nbits(node, q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, k: int, block_size: int,
                 accuracy_level: int = 4, input_name: str | None = None):
    """The MatMulNBits node (4 bits, uint4 zero points) and its initializers replacing MatMul `node` (reading
    `input_name` instead of the MatMul's input, if given)."""
    from onnx import helper, numpy_helper

    n, blocks = scales.shape
    base = node.input[1]
    packed = _pack(q.reshape(n, blocks, block_size))
    zp = _pack(np.pad(zeros, ((0, 0), (0, blocks % 2))).astype(np.uint8))
    inits = [numpy_helper.from_array(packed, f"{base}_Q4"), numpy_helper.from_array(scales, f"{base}_scales"),
             numpy_helper.from_array(zp, f"{base}_zero_points")]
    new = helper.make_node("MatMulNBits", [input_name or node.input[0], *(i.name for i in inits)], list(node.output),
                           name=f"{node.name}_Q4", domain="com.microsoft", K=k, N=n, bits=4, block_size=block_size,
                           accuracy_level=accuracy_level)
    return new, inits


def with_offsets(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, block_size: int):
    """Float zero points in the fast format: W = (q - z) * s, z any float, is (q - z0) * s + r with z0 = z rounded
    into 0..15 and r = (z0 - z) * s one float per block, so x @ W = x @ ((q - z0) * s) + blocksum(x) @ r. Both
    terms fit one MatMulNBits over [x, blocksum(x)]: r's rows (one per block of x, padded to whole blocks) are
    extra blocks of the weight, quantized like any (integer zero points; their error is a fraction of one step of
    r, itself at most half a step of the weights). Returns q, scales and zero points of that [N, K + extra]
    weight, extra = the blocksum's width."""
    n, blocks = scales.shape
    z0 = np.clip(np.round(zeros), 0, 15)
    extra = _blocksum_width(blocks, block_size)
    r = np.zeros((n, extra), np.float32)
    r[:, :blocks] = (z0 - zeros) * scales
    rows = r.reshape(-1, block_size)  # each extra block of each output, as _block_params takes them
    rs, rz = _block_params(rows)
    rq = np.clip(np.round(rows / rs[:, None]) + rz[:, None], 0, 15).reshape(n, extra)
    return (np.concatenate([q, rq.astype(q.dtype)], axis=1),
            np.concatenate([scales, rs.reshape(n, -1)], axis=1).astype(np.float32),
            np.concatenate([z0, rz.reshape(n, -1)], axis=1))


BLOCKSUMS = ".with_blocksums"  # the suffix of an input augmented with its block sums (with_offsets)
GRID_SHARE = 0.99  # of a weight's blocks on a float-minimum 4-bit grid, for on_float_grid


def on_float_grid(w: np.ndarray, block_size: int) -> bool:
    """Whether W [K, N] sits on a 4-bit grid with a float minimum per block of `block_size` input channels (GGUF's
    Q4_1: w = d * q + m, q in 0..15 spanning its block, d and m any floats), where GPTQ with offsets reproduces it
    and a uint4 zero point cannot: at least GRID_SHARE of its blocks are d * q + m within 1% of a step (those of
    up to 256 of its output columns, evenly spaced: a quantized model's are all alike), and in most of them -m / d
    is not an integer (GGUF's Q4_0, (q - 8) * d, is a uint4 zero point's grid already). A weight of continuous
    values has no such block (30 values each a hundredth of a step from a level)."""
    k, n = w.shape
    if k % block_size:
        return False
    w = w[:, ::max(1, n // 256)]
    blocks = w.reshape(k // block_size, block_size, w.shape[1]).astype(np.float64)
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)
    step = np.where(hi > lo, (hi - lo) / 15.0, 1.0)
    levels = (blocks - lo[:, None]) / step[:, None]
    on = np.abs(levels - np.round(levels)).max(axis=1) < 0.01
    zero = -lo / step
    integral = (np.abs(zero - np.round(zero)) < 0.01) & (np.round(zero) >= 0) & (np.round(zero) <= 15)
    return bool(on.mean() >= GRID_SHARE and (on & ~integral).sum() > on.sum() / 2)


def offset_matmuls(path: Path) -> list[str]:
    """The MatMuls of graph `path` that quantize_graph gave offsets (they read their input's block sums)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name.removesuffix("_Q4") for n in graph.node
            if n.op_type == "MatMulNBits" and n.input[0].endswith(BLOCKSUMS)]


def _blocksum_width(blocks: int, block_size: int) -> int:
    """Columns of x's block sums: one per block, padded to whole blocks."""
    return -(-blocks // block_size) * block_size


def blocksum_matrix(k: int, block_size: int) -> np.ndarray:
    """B [K, extra]: x @ B is x's sum over each block of `block_size` channels, padded with zero columns to whole
    blocks (with_offsets)."""
    b = np.zeros((k, _blocksum_width(k // block_size, block_size)), np.float32)
    b[np.arange(k), np.arange(k) // block_size] = 1.0
    return b


def quantize_graph(src: Path, dst: Path, feeds: Iterable[dict[str, np.ndarray]], *, block_size: int = 32,
                   exclude: Iterable[str] = (), accuracy_level: int = 4, cache: dict | None = None,
                   grams: MutableMapping[str, np.ndarray] | None = None, offsets: bool | str = False,
                   progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """Every MatMul of `src` with a constant 2-D weight (but `exclude`) as GPTQ'd int4 MatMulNBits, written to
    `dst` (weights in `dst`.data). Returns each one's relative output error on the calibration inputs,
    |X (W - Wq)|^2 / |X W|^2: what its int4 costs, for choosing which to keep in 8 bits. `cache` (a dict kept
    by the caller across calls on one graph and feeds) saves redoing a MatMul's GPTQ while its weight is the same
    (smoothing another layer's input can scale this one's columns); `grams` (likewise) its inputs' X^T X, which
    that smoothing leaves as they are (it changes only the activations that 8-bit layers alone read).
    `offsets`: float zero points (with_offsets) where K is whole blocks: a weight on a grid with a float minimum
    per block (GGUF's Q4_1) then comes out as it was, not re-rounded, at the cost of two small nodes per input
    (its block sums, a MatMul by a 0/1 matrix, and a Concat) and an extra block per MatMul: 7-10% of
    SmolLM2-135M's decode step (README); a Reshape and ReduceSum measured no faster. True: every such MatMul;
    "auto" (the export's): those whose weight is on_float_grid, so that a model off any grid gets no extra node."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    exclude = set(exclude)
    targets = [node for node in graph.node if node.op_type == "MatMul" and node.name not in exclude
               and node.input[1] in inits and len(inits[node.input[1]].dims) == 2]
    cache = {} if cache is None else cache
    prints, use_offsets = {}, {}
    for t in targets:
        w = numpy_helper.to_array(inits[t.input[1]])
        use_offsets[t.name] = w.shape[0] % block_size == 0 and (  # the block sums need K in whole blocks
            offsets is True or (offsets == "auto" and on_float_grid(w, block_size)))
        prints[t.name] = _fingerprint(w) + ("+offsets" if use_offsets[t.name] else "")
    for t in targets:
        if t.name in cache and cache[t.name][4] != prints[t.name]:
            del cache[t.name]
    grams = {} if grams is None else grams
    for name in set(grams) - {t.input[0] for t in targets}:  # held while an int4 MatMul reads it (GBs at 1.7B)
        del grams[name]
    if todo := sorted({t.input[0] for t in targets if t.name not in cache} - set(grams)):
        grams.update(activation_grams(src, todo, feeds))
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    augmented: dict[str, str] = {}  # an input -> [input, its blocksums] (offsets)
    for i, node in enumerate(targets):
        k = inits[node.input[1]].dims[0]
        offset = use_offsets[node.name]
        if node.name not in cache:
            cache[node.name] = (*_quantize(numpy_helper.to_array(inits[node.input[1]]), grams[node.input[0]],
                                           block_size, offset), prints[node.name])
        q, scales, zeros, _, _ = cache[node.name]
        x = None
        if offset:
            q, scales, zeros = with_offsets(q, scales, zeros, block_size)
            if (x := augmented.get(node.input[0])) is None:
                x = augmented[node.input[0]] = node.input[0] + BLOCKSUMS
                b = f"gptq.blocksum_{k}"
                if b not in inits:
                    inits[b] = numpy_helper.from_array(blocksum_matrix(k, block_size), b)
                    graph.initializer.append(inits[b])
                at = list(graph.node).index(node)
                graph.node.insert(at, helper.make_node("Concat", [node.input[0], f"{x}.sums"], [x], axis=-1,
                                                       name=f"{x}.concat"))
                graph.node.insert(at, helper.make_node("MatMul", [node.input[0], b], [f"{x}.sums"], name=f"{x}.sum"))
            k = q.shape[1]
        new, new_inits = matmul_nbits(node, q, scales, zeros, k, block_size, accuracy_level, x)
        graph.initializer.extend(new_inits)
        if uses[node.input[1]] == 1:
            graph.initializer.remove(inits.pop(node.input[1]))
        graph.node.insert(list(graph.node).index(node), new)
        graph.node.remove(node)
        if progress and ((i + 1) % 16 == 0 or i + 1 == len(targets)):
            progress(f"gptq: {i + 1}/{len(targets)} MatMuls")
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    Path(str(dst) + ".data").unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save(model, str(dst), save_as_external_data=True, location=Path(str(dst) + ".data").name)
    return {t.name: cache[t.name][3] for t in targets}


def _fingerprint(w: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(w).tobytes(), digest_size=16).hexdigest()


def _quantize(w: np.ndarray, gram: np.ndarray, block_size: int, offsets: bool = False):
    """gptq() of W [K, N] padded to whole blocks, and its relative output error on the calibration inputs."""
    w = w.astype(np.float32)
    pad = (-w.shape[0]) % block_size
    if pad:  # zero channels: quantized exactly, they change nothing
        w = np.pad(w, ((0, pad), (0, 0)))
        gram = np.pad(gram, ((0, pad), (0, pad)))
    q, scales, zeros = gptq(w, gram, block_size, offsets=offsets)
    delta = (dequantize(q, scales, zeros, block_size) - w).astype(np.float64)
    ref = float(np.sum((gram @ w) * w))
    return q, scales, zeros, float(np.sum((gram @ delta) * delta)) / max(ref, 1e-30)
