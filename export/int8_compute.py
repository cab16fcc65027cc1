"""int8 compute for the compute-bound stages (prefill, vision towers): int8 activations x int8 weights on the
CPU's integer dot-product units (AVX-512 VNNI / AVX-VNNI, ARM dot-product), through ONNX Runtime's
MatMulIntegerToFloat.

Weight-only int8 (MatMulNBits) makes decode faster, being memory-bound, but leaves prefill and the vision
tower at fp32 speed. Here each constant-weight MatMul becomes:

    x [.., K] --(per-token: one scale per row, amax/127; uint8 with zero point 128)--> MatMulIntegerToFloat
              with per-output-channel symmetric weights --> times the row scale

The weights come in two formats (LEVELS), because without VNNI (AVX2; AVX-512 without VNNI: AMD before Zen 4,
Skylake-X) ONNX Runtime's uint8 x int8 kernel adds pairs of products in int16 (vpmaddubsw), which saturates once
255 * |w1| + 255 * |w2| > 32767. With full int8 weights a saturated pair moves outputs by whole units (measured on
an AVX2 EPYC: 4.0 max error against exact integer math, the demo vision tower's cosine 0.943): such a bundle
would compute differently on different CPUs. So:
- "int7": int8 weights in -63..63, which no pair can saturate: the uint8 x int8 kernel, VNNI where there is one;
  the weights' rounding error is doubled (a 1152 x 4304 MatMul's relative error 0.022 -> 0.027).
- "uint8": uint8 weights with zero point 128 in -127..127, on the uint8 x uint8 kernel, which widens to int16
  before multiplying (exact on every CPU): full 8-bit weights, as fast as "int7" on AVX2 but without a VNNI
  kernel on AVX-512 (AVX-VNNI-INT8 and ARM's dot products have one).
The exporter tries "int7" first and takes "uint8" where the 7-bit weights miss its check.

One quantized copy of an activation serves every MatMul that reads it (QKV, gate/up). Per-tensor activations
(ORT's quantize_dynamic) lost a 135M decoder's answers (0.78 top-1); per-token scales keep an outlier token
from flattening the others, and outlier *channels* are moved into the weights first by smoothing
(SmoothQuant's idea: x / s and W * s, with s = amax(x)^alpha / amax(W)^(1-alpha), alpha searched per
activation on calibration rows against the simulated int8 error), the 1/s folded into the norm or layer that
produces x where that is exact (quantize.fold_input_scales). The layers where int8 costs most (`keep`: the LM
head, the MLP down projections) are left to the caller, which gives them weight-only 8-bit blocks.

The rewritten graph is checked against its source on calibration inputs (`agreement`): the caller keeps
whichever passes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # smoothing strengths tried per activation (and none at all)
SAMPLE_ROWS = 256  # calibration rows per activation the smoothing search scores on
# weight formats: int8 holding -63..63 (no uint8 x int8 pair sum overflows int16: the module docstring), or
# uint8 with zero point 128 holding -127..127 (exact on ONNX Runtime's widening uint8 x uint8 kernel)
LEVELS = {"int7": 63, "uint8": 127}
MS_DOMAIN = "com.microsoft"


def _q_rows(x: np.ndarray, block: int | None = None) -> np.ndarray:
    """x quantized and dequantized as the graph does it: symmetric int8 per row (or, with `block`, per block of
    that many channels of a row, as ONNX Runtime's MatMulNBits quantizes its input at accuracy level 4)."""
    if block is not None:
        return _q_rows(x.reshape(len(x), -1, block)).reshape(x.shape)
    s = np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-8) / 127.0
    return np.round(x / s) * s


def _weight_ints(w: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] as integers in -levels..levels (float) and its per-output-column scale [N] (float32)."""
    s = (np.maximum(np.abs(w).max(axis=0), 1e-8) / levels).astype(np.float32)
    return np.clip(np.round(w / s), -levels, levels), s


def _q_cols(w: np.ndarray, levels: int = LEVELS["int7"], block: int | None = None) -> np.ndarray:
    """W [K, N] quantized and dequantized per output column as the graph stores it (`_weight_ints`), or per block
    of `block` input channels of each column (MatMulNBits' symmetric 8-bit blocks)."""
    if block is not None:
        k, n = w.shape
        return _q_cols(w.reshape(k // block, block, n).transpose(1, 0, 2).reshape(block, -1), levels).reshape(
            block, k // block, n).transpose(1, 0, 2).reshape(k, n)
    q, s = _weight_ints(w, levels)
    return q * s


def smoothing(x: np.ndarray, amax: np.ndarray, w: np.ndarray, group: tuple[int, int] | None = None,
              alphas: Iterable[float] = ALPHAS, levels: int = LEVELS["int7"],
              block: int | None = None) -> np.ndarray | None:
    """The per-channel scale s (x / s, W * s) that minimises the int8 output error of x @ W on rows x, or None if
    no smoothing does best. `amax` is x's per-channel max |x| over all calibration rows; `group` = (kv_heads,
    heads) makes the query heads that read one value head share their channels' scales (fold_input_scales
    needs that to fold through the attention); `block`: both sides quantized per block of that many input
    channels (MatMulNBits at accuracy level 4), not per row and column."""
    wmax = np.abs(w).max(axis=1)
    if group is not None:
        kv, heads = group

        def share(v):
            g = v.reshape(kv, heads // kv, -1).max(axis=1, keepdims=True)
            return np.broadcast_to(g, (kv, heads // kv, g.shape[-1])).ravel()

        amax, wmax = share(amax), share(wmax)
    reference = x @ w
    best, best_err = None, np.square(_q_rows(x, block) @ _q_cols(w, levels, block) - reference).mean()
    for alpha in alphas:
        s = np.maximum(amax, 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        err = np.square(_q_rows(x / s, block) @ _q_cols(w * s[:, None], levels, block) - reference).mean()
        if err < best_err:
            best, best_err = s, err
    return best


def smooth_graph(graph, by_input: dict[str, list], stats: dict, *, levels: int, block: int | None = None,
                 scales: dict | None = None, progress=None) -> int:
    """Smooths each activation of `by_input` (its name: the MatMuls that read it, all of them) whose calibration
    `stats` (quantize.activation_stats) favour it (`smoothing`): W * s in the weights, x / s as a Mul before them,
    folded into the norm or layer that produces x where that is exact (quantize.fold_input_scales). Returns how
    many activations it smoothed. `scales`: a dict the caller keeps across calls on one graph and `stats`, of
    each activation's s by its readers (the search, not redone)."""
    from onnx import helper, numpy_helper

    from edgevlm.export.quantize import _attr, fold_input_scales

    inits = {i.name: i for i in graph.initializer}
    attention = {n.output[0]: n for n in graph.node if n.op_type == "GroupQueryAttention"}
    uses: dict[str, int] = {}
    for n in graph.node:
        for x in n.input:
            uses[x] = uses.get(x, 0) + 1
    smoothed_count, scales = 0, {} if scales is None else scales
    for i, (name, nodes) in enumerate(by_input.items()):
        if progress and i % 16 == 0:
            progress(f"smoothing activations {i}/{len(by_input)}")
        if name not in stats or any(uses[n.input[1]] > 1 for n in nodes):
            continue  # a weight another node reads too (tied): scaling it would change that node
        ws = [numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in nodes]
        group = None
        if name in attention:
            group = (_attr(attention[name], "kv_num_heads"), _attr(attention[name], "num_heads"))
        key = (name, tuple(n.name for n in nodes), levels, block)
        if key not in scales:
            scales[key] = smoothing(stats[name].rows, stats[name].amax, np.concatenate(ws, axis=1), group,
                                    levels=levels, block=block)
        s = scales[key]
        if s is None:
            continue
        for node, w in zip(nodes, ws, strict=True):
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(w * s[:, None], node.input[1]))
        inv = numpy_helper.from_array((1.0 / s).astype(np.float32), f"{name}.int8_inv_scale")
        graph.initializer.append(inv)
        smoothed = f"{name}.int8_smoothed"
        graph.node.append(helper.make_node("Mul", [name, inv.name], [smoothed], name=f"{name}.int8.awq_mul"))
        for node in nodes:
            node.input[0] = smoothed
        smoothed_count += 1
    fold_input_scales(graph)  # where exact; a Mul it cannot fold stays (still the same function)
    return smoothed_count


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)


def rewrite(src: Path, dst: Path, reader, *, keep: Iterable[str] = (), smooth: bool = True, weights: str = "int7",
            progress=None) -> int:
    """Writes `src` with every constant-weight 2-D MatMul not in `keep` on per-token int8 activations and
    per-channel weights in format `weights` (LEVELS; smoothed first, on `reader`'s calibration feeds, if `smooth`).
    Returns how many MatMuls it rewrote."""
    import onnx
    from onnx import helper, numpy_helper

    from edgevlm.export.quantize import _topological_save, activation_stats

    keep = set(keep)
    levels = LEVELS[weights]

    def matmuls(graph) -> dict[str, list]:
        """The MatMuls to rewrite, by the activation they read."""
        dims = {i.name: i.dims for i in graph.initializer}
        by_input: dict[str, list] = {}
        for n in graph.node:
            if n.op_type == "MatMul" and n.name not in keep and len(dims.get(n.input[1], ())) == 2:
                by_input.setdefault(n.input[0], []).append(n)
        return by_input

    # the calibration pass first, before the weights are in memory (a 1.7B fp32 graph is 7 GB)
    activations = list(matmuls(onnx.load(str(src), load_external_data=False).graph))
    stats = activation_stats(src, activations, reader, "int8", rows=SAMPLE_ROWS) if smooth and activations else {}
    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    by_input = matmuls(graph)
    targets = [n for nodes in by_input.values() for n in nodes]

    if stats:
        smooth_graph(graph, by_input, stats, levels=levels, progress=progress)

    by_input = {}
    for node in targets:
        by_input.setdefault(node.input[0], []).append(node)
    axes_as_input = _opset(model) >= 18
    graph.initializer.extend([numpy_helper.from_array(np.array(1e-8, np.float32), "int8.eps"),
                              numpy_helper.from_array(np.array(1 / 127, np.float32), "int8.step"),
                              numpy_helper.from_array(np.array(128, np.uint8), "int8.zp"),
                              numpy_helper.from_array(np.array(128, np.uint8) if weights == "uint8"
                                                      else np.array(0, np.int8), "int8.wzp"),
                              numpy_helper.from_array(np.array([-1], np.int64), "int8.last_axis")])
    new_nodes = []
    for i, (x, nodes) in enumerate(by_input.items()):
        # Per row: a = max|x| (+eps), q = uint8(round(127 x / a) + 128); then each MatMul is
        # (q - 128) @ Wq * (1/127) * w_scale, times a. Five small kernels an activation, two a MatMul: at decode
        # (one row) their launches are what int8 compute costs over weight-only int8.
        p = f"int8.{i}"
        reduce = (helper.make_node("ReduceMax", [f"{p}.abs", "int8.last_axis"], [f"{p}.amax"], keepdims=1)
                  if axes_as_input else
                  helper.make_node("ReduceMax", [f"{p}.abs"], [f"{p}.amax"], axes=[-1], keepdims=1))
        new_nodes += [
            helper.make_node("Abs", [x], [f"{p}.abs"]),
            reduce,
            helper.make_node("Add", [f"{p}.amax", "int8.eps"], [f"{p}.a"]),
            helper.make_node("Div", [x, f"{p}.a"], [f"{p}.unit"]),
            helper.make_node("QuantizeLinear", [f"{p}.unit", "int8.step", "int8.zp"], [f"{p}.q"]),
        ]
        for node in nodes:
            w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            wq, scale = _weight_ints(w, levels)
            wq = (wq + 128).astype(np.uint8) if weights == "uint8" else wq.astype(np.int8)
            wname, sname = f"{node.name}.int8_weight", f"{node.name}.int8_weight_scale"
            graph.initializer.extend([numpy_helper.from_array(wq, wname), numpy_helper.from_array(scale, sname)])
            unscaled = f"{node.name}.int8_out"
            new_nodes += [
                helper.make_node("MatMulIntegerToFloat", [f"{p}.q", wname, "int8.step", sname, "int8.zp", "int8.wzp"],
                                 [unscaled], name=f"{node.name}.int8", domain=MS_DOMAIN),
                helper.make_node("Mul", [unscaled, f"{p}.a"], [node.output[0]], name=f"{node.name}.int8_rescale"),
            ]
            graph.node.remove(node)
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    _topological_save(model, dst)
    return sum(len(n) for n in by_input.values())


def outputs(path: Path, feeds: list[dict[str, np.ndarray]], limit: int = 8) -> tuple[str, np.ndarray]:
    """The output a check judges graph `path` by, on the first `limit` feeds, rows stacked: a decoder's `logits`
    (a fused decoder's: the last prompt position's), else the first output (a vision tower's features). Its
    session holds one copy of the weights (no prepacking) and is gone on return, so that two graphs' are not
    held side by side."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    name = "logits" if "logits" in names else names[0]
    rows = [session.run([name], feed)[0] for feed in feeds[:limit]]
    return name, np.concatenate([r.reshape(-1, r.shape[-1]) for r in rows])


def compare(reference: tuple[str, np.ndarray], candidate: tuple[str, np.ndarray]) -> dict[str, float]:
    """How closely `candidate`'s outputs (`outputs`) follow `reference`'s: mean KL and top-1 agreement of next-token
    distributions (logits), else the mean cosine similarity of the rows."""
    from edgevlm.calibration.metrics import cosine, kl_divergence, top1_agreement

    (name, ref), (_, test) = reference, candidate
    if name == "logits":
        return {"mean_kl": float(kl_divergence(ref, test).mean()), "top1_agreement": top1_agreement(ref, test)}
    return {"cosine": float(cosine(ref, test).mean())}


def agreement(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], limit: int = 8) -> dict[str, float]:
    """How closely graph `dst` reproduces `src` on calibration feeds (`compare`)."""
    return compare(outputs(src, feeds, limit), outputs(dst, feeds, limit))


def quantize(src: Path, dst: Path, reader, *, keep: Iterable[str] = (), keep_fp32: Iterable[str] = (),
             smooth: bool = True, weights: str = "int7", progress=None) -> int:
    """int8 compute for every constant-weight MatMul of `src` but `keep` (weight-only 8-bit blocks of 16, as
    quantize.int8_weight_only) and `keep_fp32` (left alone). Returns how many MatMuls run int8 compute."""
    from edgevlm.export import quantize as q

    keep, keep_fp32 = list(keep), list(keep_fp32)
    if not keep:
        return rewrite(src, dst, reader, keep=keep_fp32, smooth=smooth, weights=weights, progress=progress)
    with q.scratch_graph(dst, "w8a8") as half:
        count = rewrite(src, half, reader, keep=[*keep, *keep_fp32], smooth=smooth, weights=weights,
                        progress=progress)
        q._nbits(half, dst, 8, include=keep, block_size=16)
    return count
