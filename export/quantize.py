"""Weight quantization of exported fp32 graphs with ONNX Runtime's quantizers.

- int8: weight-only MatMulNBits with 8-bit blocks of 16 (run with int8 activations, accuracy_level 4),
  for decoders and vision towers alike: no calibration pass. (Static QDQ for the vision tower needed
  ORT's calibrator, which holds every intermediate tensor: SigLIP-so400m's took over 20 GB. ORT's dynamic int8,
  MatMulInteger with per-tensor activations, kept SmolLM2-135M at 0.78 top-1 agreement with fp32, and
  per-channel weights broke it entirely: measured in benchmarks/quant_fidelity.py.)
- int4: weight-only MatMulNBits (block-wise), by GPTQ on calibration prompts (`gptq`, the default: our own
  numpy GPTQ, asymmetric blocks with uint4 zero points, export/gptq.py), round-to-nearest (`rtn`),
  activation-aware channel scaling searched on calibration prompts then round-to-nearest (`awq`), or
  half-quadratic optimisation of scales and float zero points (`hqq`, no data needed; ONNX Runtime's CPU
  kernel for float zero points is slow). CPU kernels run them with accuracy_level 4.

Graphs keep their inputs and outputs; only weights and MatMul nodes change. Each function reads an fp32
graph at `src` and writes the quantized one at `dst` (weights in `dst`.data); `src` is left alone.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INT4_METHODS = ("gptq", "awq", "rtn", "hqq")
SENSITIVE = ("head", "down")  # layers an int4 model keeps in int8 by default
# Their 8-bit blocks: 64 decodes SmolLM2-135M's int4 default 12-14% faster than 16 at the same fidelity
# (mean KL 0.061 vs 0.060, 0.066 vs 0.063; 128 lost 3 points of top-1): benchmarks/quant_fidelity.py k8bsN
KEEP_INT8_BLOCK = 64
QUANTS = ("fp32", "fp16", "int8", "int4")


@contextmanager
def _quiet():
    """ORT's quantizers log advice to the root logger; an export's progress lines are what matter."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _mnb():
    """ORT's MatMulNBits quantizer module. Importing it calls logging.basicConfig(level=INFO), which would
    leave every library's INFO messages printing in the caller's process from then on (ONNX exports of
    the next graphs included): the root logger is put back as it was."""
    import sys

    name = "onnxruntime.quantization.matmul_nbits_quantizer"
    if name not in sys.modules:
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        try:
            importlib.import_module(name)
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
    return sys.modules[name]


def remove_graph(path: Path) -> None:
    """A graph file and its external-data file, where they exist."""
    for f in (Path(path), Path(f"{path}.data")):
        f.unlink(missing_ok=True)


@contextmanager
def scratch_graph(dst: Path, tag: str):
    """The path of an intermediate graph beside `dst` (so that its external data resolves there too), removed with
    its data afterwards, whatever happens."""
    path = Path(f"{dst}.{tag}.onnx")
    try:
        yield path
    finally:
        remove_graph(path)


class FeedReader:
    """An onnxruntime CalibrationDataReader over a list of input feeds (re-iterable, as GPTQ copies it)."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]):
        self.feeds = list(feeds)
        self._it = iter(self.feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)

    def __iter__(self):
        return iter(self.feeds)


def logits_matmul(path: Path) -> str | None:
    """The name of the MatMul that produces the graph's `logits` output (the LM head), if any."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producers = {out: node for node in graph.node for out in node.output}
    name = "logits"
    for _ in range(8):  # walk back through casts/reshapes to the MatMul
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type in ("MatMul", "Gemm"):
            return node.name
        name = node.input[0]
    return None


def sensitive_matmuls(path: Path, which: Iterable[str] = SENSITIVE) -> list[str]:
    """Node names of a decoder's quantization-sensitive MatMuls: the LM head ("head") and the MLP down
    projections ("down": the constant weights with the largest input dimension, the MLP's)."""
    import onnx

    names = []
    which = set(which)
    if "head" in which and (head := logits_matmul(path)):
        names.append(head)
    if "down" in which:
        graph = onnx.load(str(path), load_external_data=False).graph
        dims = {i.name: list(i.dims) for i in graph.initializer}
        consts = [n for n in graph.node if n.op_type == "MatMul" and len(dims.get(n.input[1], [])) == 2]
        if consts:
            widest = max(dims[n.input[1]][0] for n in consts)
            names += [n.name for n in consts if dims[n.input[1]][0] == widest and n.name not in names]
    return names


def _nbits(src: Path, dst: Path, bits: int, *, include: list[str] | None = None,
           exclude: list[str] | None = None, block_size: int = 32, accuracy_level: int = 4) -> None:
    mnb = _mnb()
    if include is not None:  # ORT's nodes_to_include only adds to its op types (every MatMul): exclude the rest
        import onnx

        graph = onnx.load(str(src), load_external_data=False).graph
        exclude = [*(exclude or []), *(n.name for n in graph.node if n.op_type == "MatMul" and n.name not in include)]
        include = None
    config = mnb.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
                                              bits=bits)
    with _quiet():
        quantizer = mnb.MatMulNBitsQuantizer(str(src), bits=bits, block_size=block_size, is_symmetric=True,
                                             accuracy_level=accuracy_level,
                                             nodes_to_include=include, nodes_to_exclude=exclude or [],
                                             algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)


EMBED_BLOCK = 32


def quantize_embeddings(src: Path, dst: Path, bits: int = 8, block_size: int = EMBED_BLOCK) -> list[str]:
    """Each token-embedding Gather of `src` (a 2-D float table indexed by a graph input) as ONNX Runtime's
    GatherBlockQuantized: `bits` 8 or 4, symmetric blocks of `block_size` along the hidden dimension (uint8 data,
    zero points at the middle of the range, scales in the table's type). A decode step reads one row of the
    table, so this shrinks the bundle and its memory, not the bytes a token reads. Returns the Gathers changed;
    a table used by anything else (a head tied to it) stays as it is."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    inputs = {i.name for i in graph.input}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    changed = []
    levels, middle = (127, 128) if bits == 8 else (7, 8)
    for node in list(graph.node):
        table_name = node.input[0] if node.op_type == "Gather" else None
        if (table_name not in inits or node.input[1] not in inputs or uses[table_name] != 1
                or any(a.name == "axis" and a.i != 0 for a in node.attribute)):
            continue
        table = numpy_helper.to_array(inits[table_name])
        if table.ndim != 2 or table.dtype not in (np.float32, np.float16) or table.shape[1] % block_size:
            continue
        rows, dim = table.shape
        blocks = table.astype(np.float32).reshape(rows, dim // block_size, block_size)
        scale = np.abs(blocks).max(axis=2) / levels
        scale[scale == 0] = 1.0
        q = (np.clip(np.round(blocks / scale[..., None]), -levels, levels) + middle).astype(np.uint8).reshape(rows, dim)
        zeros = np.full((rows, dim // block_size), middle, np.uint8)
        if bits == 4:  # two a byte, low nibble first, as MatMulNBits packs them
            from edgevlm.export.gptq import _pack

            q, zeros = _pack(q), _pack(np.pad(zeros, ((0, 0), (0, zeros.shape[1] % 2))))
        new_inits = [numpy_helper.from_array(q, f"{table_name}_q{bits}"),
                     numpy_helper.from_array(scale.astype(table.dtype), f"{table_name}_scales"),
                     numpy_helper.from_array(zeros, f"{table_name}_zero_points")]
        inputs = [new_inits[0].name, node.input[1], *(i.name for i in new_inits[1:])]
        new = helper.make_node("GatherBlockQuantized", inputs, list(node.output), name=f"{node.name}_Q{bits}",
                               domain="com.microsoft", bits=bits, block_size=block_size, gather_axis=0, quantize_axis=1)
        graph.initializer.remove(inits.pop(table_name))
        graph.initializer.extend(new_inits)
        graph.node.insert(list(graph.node).index(node), new)
        graph.node.remove(node)
        changed.append(node.name)
    if changed and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    Path(f"{dst}.data").unlink(missing_ok=True)  # onnx appends to an existing data file; the model is in memory
    onnx.save(model, str(dst), save_as_external_data=True, location=Path(str(dst) + ".data").name)
    return changed


def int8_weight_only(src: Path, dst: Path, *, exclude: list[str] | None = None, block_size: int = 16,
                     accuracy_level: int = 4) -> None:
    """Every constant-weight MatMul as 8-bit MatMulNBits (symmetric blocks).

    With accuracy_level 4 the CPU kernel also quantizes the activations to int8, per block of the same
    size: blocks of 16 keep activation outliers local. On SmolLM2-135M (benchmarks/quant_fidelity.py)
    top-1 agreement with fp32 went from 0.966 (plan and think) at 32 to 0.988 / 0.975 at 16.
    """
    _nbits(src, dst, 8, exclude=exclude, block_size=block_size, accuracy_level=accuracy_level)


def smooth_8bit_inputs(src: Path, dst: Path, reader: FeedReader, matmuls: Iterable[str], *,
                       block_size: int = KEEP_INT8_BLOCK, stats: dict | None = None, scales: dict | None = None) -> int:
    """Smoothing (export/int8_compute.py) for 8-bit weight-only MatMuls: ONNX Runtime's MatMulNBits at accuracy
    level 4 quantizes its input to int8 per block of `block_size` channels, where one outlier channel flattens
    its block's others; that, not the 8-bit weights, is most of such a layer's error. So each activation that only
    `matmuls` read is scaled as x / s, W * s (s searched on calibration rows against that blocked int8 error), the
    1/s folded into what produces x where exact. Writes `dst` (the same function in fp32); returns how many
    activations it smoothed. `stats`: a dict the caller keeps across calls on one `src` and `reader`, of the
    activations' calibration statistics (computed once each); `scales` likewise, of the smoothing's search."""
    import onnx

    from edgevlm.export import int8_compute

    matmuls = set(matmuls)

    def readers(graph) -> dict[str, list]:
        """The activations every MatMul reader of which is in `matmuls` (a constant 2-D weight of whole blocks)."""
        dims = {i.name: i.dims for i in graph.initializer}
        by_input: dict[str, list] = {}
        for n in graph.node:
            if n.op_type == "MatMul" and n.name in matmuls:
                by_input.setdefault(n.input[0], []).append(n)
        others = {x for n in graph.node if n.op_type != "MatMul" or n.name not in matmuls for x in n.input}
        others |= {o.name for o in graph.output}
        return {x: nodes for x, nodes in by_input.items() if x not in others and all(
            len(dims.get(n.input[1], ())) == 2 and dims[n.input[1]][0] % block_size == 0 for n in nodes)}

    activations = list(readers(onnx.load(str(src), load_external_data=False).graph))
    if not activations:
        return 0
    stats = {} if stats is None else stats
    missing = [a for a in activations if a not in stats]
    if missing:
        stats.update(activation_stats(src, missing, reader, "smooth8", rows=int8_compute.SAMPLE_ROWS))
    model = onnx.load(str(src))
    count = int8_compute.smooth_graph(model.graph, readers(model.graph), stats, levels=127, block=block_size,
                                      scales=scales)
    _topological_save(model, dst)
    return count


def int4(src: Path, dst: Path, *, method: str = "awq", block_size: int = 32, reader: FeedReader | None = None,
         exclude: list[str] | None = None, keep_int8: list[str] | None = None,
         keep_block_size: int = KEEP_INT8_BLOCK, accuracy_level: int = 4, cache: dict | None = None,
         smooth_int8: Iterable[str] = (), offsets: bool | str = False, progress=None) -> dict[str, float]:
    """int4 weights by `method`; `keep_int8` MatMuls get 8-bit weights (blocks of `keep_block_size`) instead,
    the inputs of those of them in `smooth_int8` smoothed first (smooth_8bit_inputs), `exclude` stay fp32. For
    gptq, returns each int4 MatMul's relative output error on the calibration prompts (see gptq.quantize_graph);
    else {}. `cache`: a dict the caller keeps across calls on one `src` and `reader`, of GPTQ's per-MatMul results
    and the smoothing's activation statistics. `offsets`: gptq with float zero points (gptq.quantize_graph: True, or
    "auto" where a weight is on a float-minimum grid)."""
    cache = {} if cache is None else cache
    smooth_int8 = [n for n in smooth_int8 if n in (keep_int8 or ())]
    if smooth_int8:
        with scratch_graph(dst, "smooth8") as smoothed:
            smooth_8bit_inputs(src, smoothed, reader, smooth_int8, block_size=keep_block_size,
                               stats=cache.setdefault("smoothing", {}), scales=cache.setdefault("scales", {}))
            return int4(smoothed, dst, method=method, block_size=block_size, reader=reader, exclude=exclude,
                        keep_int8=keep_int8, keep_block_size=keep_block_size, accuracy_level=accuracy_level,
                        cache=cache, offsets=offsets, progress=progress)
    if keep_int8:
        with scratch_graph(dst, "int4") as half:
            errors = int4(src, half, method=method, block_size=block_size, reader=reader,
                          exclude=[*(exclude or []), *keep_int8], accuracy_level=accuracy_level, cache=cache,
                          offsets=offsets, progress=progress)
            _nbits(half, dst, 8, include=keep_int8, block_size=keep_block_size, accuracy_level=accuracy_level)
        return errors
    mnb = _mnb()

    if method == "awq":
        if reader is None:
            raise ValueError("awq needs calibration data")
        with scratch_graph(dst, "awq") as scaled:
            awq_scale(src, scaled, reader, block_size=block_size, exclude=exclude or [])
            int4(scaled, dst, method="rtn", block_size=block_size, exclude=exclude)
        return {}
    if method == "gptq":
        if reader is None:
            raise ValueError("gptq needs calibration data")
        from edgevlm.export import gptq

        reader.rewind()
        if "grams" not in cache:
            cache["grams"] = gptq.SpilledGrams()
        return gptq.quantize_graph(src, dst, reader, block_size=block_size, exclude=exclude or [],
                                   accuracy_level=accuracy_level, cache=cache.setdefault("gptq", {}),
                                   grams=cache["grams"], offsets=offsets, progress=progress)
    if method == "rtn":
        config = mnb.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=4)
    elif method == "hqq":
        config = mnb.HQQWeightOnlyQuantConfig(block_size=block_size)
    else:
        raise ValueError(f"unknown int4 method {method!r}; choose one of {', '.join(INT4_METHODS)}")
    with _quiet():
        quantizer = mnb.MatMulNBitsQuantizer(str(src), block_size=block_size, is_symmetric=True, accuracy_level=4,
                                             nodes_to_exclude=exclude or [], algo_config=config)
        quantizer.process()
        if method == "hqq":  # ORT's HQQ quantizer leaves accuracy_level unset (0: fp32 compute, ~10x slower)
            _set_accuracy_level(quantizer.model.model.graph, accuracy_level)
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)
    return {}


def _set_accuracy_level(graph, level: int) -> None:
    from onnx import helper

    for node in graph.node:
        if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
            node.attribute.append(helper.make_attribute("accuracy_level", level))


def _rtn_int4(w: np.ndarray, block: int) -> np.ndarray:
    """Symmetric block-wise int4 round-to-nearest of W [K, N] along K, dequantized, as ONNX Runtime's
    MatMulNBits quantizer does it (the largest-magnitude value of a block maps exactly to -8)."""
    k, n = w.shape
    blocks = np.pad(w, ((0, (-k) % block), (0, 0))).reshape(-1, block, n)
    hi, lo = blocks.max(axis=1, keepdims=True), blocks.min(axis=1, keepdims=True)
    scale = np.where(np.abs(hi) > np.abs(lo), hi, lo) / -8.0
    scale[scale == 0] = 1.0
    return (np.clip(np.round(blocks / scale), -8, 7) * scale).reshape(-1, n)[:k]


CLIP_RATIOS = np.linspace(1.0, 0.6, 9)


def _clip_search(w: np.ndarray, x: np.ndarray, block: int, ratios: np.ndarray = CLIP_RATIOS) -> np.ndarray:
    """Per block and output column, the clipping of the weight range that minimises int4 output error on x
    (AWQ's second step). Returns W with each block clamped to its best ratio of its largest magnitude."""
    k, n = w.shape
    blocks = w.reshape(-1, block, n)
    xb = x.reshape(len(x), -1, block)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    best = np.full((blocks.shape[0], 1, n), np.inf, np.float32)
    out = blocks.copy()
    for ratio in ratios:
        limit = absmax * ratio
        clipped = np.clip(blocks, -limit, limit)
        delta = _rtn_int4(clipped.reshape(k, n), block).reshape(blocks.shape) - blocks
        err = np.square(np.einsum("sbk,bkn->sbn", xb, delta)).mean(axis=0)[:, None, :]
        better = err < best
        best = np.where(better, err, best)
        out = np.where(better, clipped, out)
    return out.reshape(k, n)


@contextmanager
def activation_probe(src: Path, names: Iterable[str], tag: str):
    """An ONNX Runtime session on graph `src` with the tensors `names` exposed as outputs too (optimizations off,
    so they keep their names): the calibration pass of AWQ and GPTQ. The probe graph is written beside `src`, so
    its external data resolves, named per process and `tag` so that two quantizations of one graph can run, and
    removed afterwards."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    probe = onnx.load(str(src), load_external_data=False)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(a) for a in names if a not in known)
    probe_path = src.with_name(f"{src.stem}.{tag}-probe-{os.getpid()}.onnx")
    onnx.save(probe, str(probe_path))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_prepacking", "1")  # one copy of the weights, not two
    try:
        yield ort.InferenceSession(str(probe_path), options, providers=["CPUExecutionProvider"])
    finally:
        probe_path.unlink(missing_ok=True)


@dataclass
class ActivationStats:
    """One activation's calibration statistics: per-channel max |x| and mean |x| over every row, and a sample
    of rows (64 a feed)."""

    amax: np.ndarray
    mean_abs: np.ndarray
    rows: np.ndarray


def activation_stats(src: Path, activations: list[str], reader: FeedReader, tag: str,
                     rows: int = 512) -> dict[str, ActivationStats]:
    """Runs the calibration feeds through graph `src` with `activations` exposed (activation_probe)."""
    amax = {a: 0.0 for a in activations}
    sums = {a: 0.0 for a in activations}
    counts = dict.fromkeys(activations, 0)
    samples: dict[str, list[np.ndarray]] = {a: [] for a in activations}
    rng = np.random.default_rng(0)
    with activation_probe(src, activations, tag) as session:
        reader.rewind()
        for feed in reader:
            for name, x in zip(activations, session.run(activations, feed), strict=True):
                x = x.reshape(-1, x.shape[-1]).astype(np.float32)
                amax[name] = np.maximum(amax[name], np.abs(x).max(0))
                sums[name] = sums[name] + np.abs(x).sum(0)
                counts[name] += len(x)
                # Every feed draws (the generator's stream, so the rows kept, stay what they were), but rows past
                # the first `rows` are not kept: they were cut at the end, after holding every feed's (1.2 GB
                # of SmolLM2's int4 export's 4.3 GB peak).
                pick = rng.choice(len(x), size=min(len(x), 64), replace=False)
                if sum(map(len, samples[name])) < rows:
                    samples[name].append(x[pick])
    return {a: ActivationStats(amax[a], sums[a] / max(counts[a], 1), np.concatenate(samples[a])[:rows])
            for a in activations}


def awq_scale(src: Path, dst: Path, reader: FeedReader, *, block_size: int = 32, exclude: list[str] = (),
              grid: int = 20, sample_rows: int = 512, fold: bool = True) -> int:
    """Activation-aware weight scaling (the idea of AWQ): for each MatMul with a constant weight W [K, N], find
    per-input-channel scales s = mean|x|^alpha (alpha searched on calibration activations) that minimise the
    output error of int4 round-to-nearest, then store W * s and feed the MatMul x / s (a Mul node).
    Salient input channels so keep more precision; each block's range is then clipped where that lowers the
    error. Writes the fp32 graph to `dst` (function unchanged up to the clipping), with the scales folded
    into the layers before where that is exact (`fold`: fold_input_scales; the cached values then come out
    scaled); returns how many changed."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    targets = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits and n.name not in exclude
               and len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].dims[0] % block_size == 0]
    activations = sorted({n.input[0] for n in targets})
    attention = {n.output[0]: n for n in graph.node if n.op_type == "GroupQueryAttention"}
    # 1. activation statistics on the calibration prompts
    stats = activation_stats(src, activations, reader, "awq")
    # 2. per MatMul, the alpha whose scaled int4 weights reproduce x @ W best on sampled rows; then the
    #    per-block clipping of the scaled weights that does best
    changed = 0
    for node in targets:
        name = node.input[0]
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        mean_abs = np.maximum(stats[name].mean_abs, 1e-5)
        if name in attention:  # query heads that read one value head share its channels' scales, so that
            # they fold into the value projection (fold_input_scales)
            heads, kv_heads = _attr(attention[name], "num_heads"), _attr(attention[name], "kv_num_heads")
            grouped = mean_abs.reshape(kv_heads, heads // kv_heads, -1)
            mean_abs = np.broadcast_to(grouped.mean(axis=1, keepdims=True), grouped.shape).ravel()
        x = stats[name].rows[:sample_rows]
        reference = x @ w
        best_alpha, best_err = 0.0, np.inf
        for alpha in np.linspace(0, 1, grid, endpoint=False):
            scale = mean_abs**alpha
            scale = scale / np.sqrt(scale.max() * scale.min())
            err = np.square((x / scale) @ _rtn_int4(w * scale[:, None], block_size) - reference).mean()
            if err < best_err:
                best_alpha, best_err = alpha, err
        scale = mean_abs**best_alpha
        scale = (scale / np.sqrt(scale.max() * scale.min())).astype(np.float32)
        scaled_w = _clip_search(w * scale[:, None], (x / scale)[:128], block_size).astype(np.float32)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(scaled_w, node.input[1]))
        changed += 1
        if best_alpha == 0.0:
            continue  # no channel scaling: the clipped weights are all that changes
        inv = numpy_helper.from_array((1.0 / scale).astype(np.float32), f"{node.name}.awq_inv_scale")
        graph.initializer.append(inv)
        scaled = f"{node.name}.awq_input"
        graph.node.append(helper.make_node("Mul", [name, inv.name], [scaled], name=f"{node.name}.awq_mul"))
        node.input[0] = scaled
    if fold:
        fold_input_scales(graph)
    _topological_save(model, dst)
    return changed


NORMS = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}  # op: its weight input


def _attr(node, name: str, default: int = 0) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def fold_input_scales(graph) -> int:
    """Fold AWQ's input scales (`*.awq_mul`: x times a constant per-channel vector, in front of a MatMul) into
    what produces x, where that is exact, and drop the Mul: into the weight (and bias) of the norm before the QKV
    and gate/up projections (or a traced norm's last Mul by a constant); into the up projection's output
    columns before the down projection ((act(gate) * up) / s = act(gate) * (up / s), a packed gate+up's up
    half included); and into the value projection's columns before o_proj, the attention being linear in
    the values (awq_scale shares one scale among the query heads that read a value head); through the
    last-position Slice to the final norm, for the LM head. A decode step then runs one elementwise kernel
    fewer per projection: the graph has the nodes of the one it was made from. The values it caches are then
    the model's times inv, which is the same function as long as the cache it reads is one it wrote (as the
    runtime's always is). Returns how many were folded."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    uses: dict[str, int] = {}
    for name in [i for node in graph.node for i in node.input] + [o.name for o in graph.output]:
        uses[name] = uses.get(name, 0) + 1

    def constant(name: str, inv: np.ndarray, columns: slice, ndim: int = 1) -> np.ndarray | None:
        """The constant `name` (a vector, or with ndim 2 a MatMul weight [K, N]) with its last-axis `columns`
        times inv, or None if it is not a constant of that rank used once with that many columns."""
        if name not in inits or uses.get(name) != 1:
            return None
        array = numpy_helper.to_array(inits[name]).astype(np.float32)
        if array.ndim != ndim or array[..., columns].shape[-1] != inv.size:
            return None
        array[..., columns] *= inv
        return array

    def fold(x: str, inv: np.ndarray, columns: slice = slice(None)) -> list[tuple[str, np.ndarray]] | None:
        """The constants to rewrite so that the `columns` of x (used once) come out times inv, or None."""
        producer = producers.get(x)
        if producer is None or uses.get(x) != 1:
            return None
        op, inputs = producer.op_type, list(producer.input)
        if op in NORMS and producer.output[0] == x and columns == slice(None):
            weight = constant(inputs[NORMS[op]], inv, columns)
            return None if weight is None else [(inputs[NORMS[op]], weight)]
        if op == "LayerNormalization" and producer.output[0] == x and columns == slice(None):
            rewrites = [(c, constant(c, inv, columns)) for c in inputs[1:3] if c]
            return None if any(a is None for _, a in rewrites) else rewrites
        if op == "MatMul":
            weight = constant(inputs[1], inv, columns, ndim=2)
            return None if weight is None else [(inputs[1], weight)]
        if op == "Add" and inputs[1] in inits:  # a bias
            bias, rest = constant(inputs[1], inv, columns), fold(inputs[0], inv, columns)
            return None if bias is None or rest is None else [(inputs[1], bias), *rest]
        if op == "Mul":  # (a * s) * b = (a * b) * s: a traced RMSNorm's weight, act(gate) * up
            a, b = inputs
            c = next((c for c in (b, a) if c in inits), None)
            if c is not None:
                weight = constant(c, inv, columns)
                return None if weight is None else [(c, weight)]
            return fold(b, inv, columns) or fold(a, inv, columns)
        if op == "Slice" and columns == slice(None) and len(inputs) > 3 and inputs[3] in inits and set(
                numpy_helper.to_array(inits[inputs[3]]).tolist()) <= {0, 1}:  # positions (a channel slice
            # of a [tokens, K] tensor fails the width check below, unless it keeps every channel)
            return fold(inputs[0], inv, columns)
        if op == "Split" and len(inputs) > 1 and inputs[1] in inits and _attr(producer, "axis") == -1:
            if columns != slice(None):
                return None
            sizes = numpy_helper.to_array(inits[inputs[1]])
            i = list(producer.output).index(x)
            start = int(sizes[:i].sum())
            return fold(inputs[0], inv, slice(start, start + int(sizes[i])))
        if op == "GroupQueryAttention" and producer.output[0] == x and columns == slice(None):
            heads, kv_heads = _attr(producer, "num_heads"), _attr(producer, "kv_num_heads")
            per_kv = inv.reshape(kv_heads, heads // kv_heads, -1)
            if not np.all(per_kv == per_kv[:, :1]):
                return None  # query heads that share a value head have different scales
            inv_v = per_kv[:, 0].ravel()
            if len(inputs) > 2 and inputs[2]:
                return fold(inputs[2], inv_v)
            return fold(inputs[0], inv_v, slice(-inv_v.size, None))  # packed QKV: the values come last
        return None

    folded = 0
    for node in [n for n in graph.node if n.op_type == "Mul" and n.name.endswith(".awq_mul")]:
        x, inv_name = node.input
        rewrites = fold(x, numpy_helper.to_array(inits[inv_name]).astype(np.float32))
        if not rewrites:
            continue
        for name, array in rewrites:
            inits[name].CopyFrom(numpy_helper.from_array(array, name))
        for consumer in graph.node:
            consumer.input[:] = [x if name == node.output[0] else name for name in consumer.input]
        graph.node.remove(node)
        graph.initializer.remove(inits.pop(inv_name))
        folded += 1
    return folded


def _topological_save(model, dst: Path) -> None:
    from onnxruntime.quantization.onnx_model import ONNXModel

    wrapped = ONNXModel(model)
    wrapped.topological_sort()
    wrapped.save_model_to_file(str(dst), use_external_data_format=True)
