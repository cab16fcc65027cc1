"""The TensorRT bundle flavour: graphs of standard ONNX operators that TensorRT's ONNX parser accepts, weights
quantized the way TensorRT reads them, and the checker that refuses any node it cannot parse.

What differs from the ONNX Runtime flavour (edgevlm.export.exporter drives both):
- decoders are the traced graphs (edgevlm.export.graphs: MatMul/Softmax attention, explicit past/present KV),
  not the fused ones built on Microsoft's contrib operators (GroupQueryAttention, MatMulNBits, ...);
- int8 weights are weight-only `DequantizeLinear` per output channel (int8 [K, N], scale [N], axis 1) feeding
  the MatMul: TensorRT's dequantize layer takes blocked scales for 4-bit weights only;
- int4 weights are blocked `DequantizeLinear` (opset 21): int4 [K, N] packed two a byte, low nibble first (ONNX's
  INT4 layout), scale [K / block, N], axis 0, symmetric with no zero point (TensorRT rejects zero points). They
  come from the same quantizers as the ONNX Runtime bundles (awq scaling, rtn or gptq rounding: edgevlm.export
  .quantize), whose symmetric MatMulNBits blocks are unpacked into that layout; hqq's zero points cannot be
  expressed and are refused.
Under ONNX Runtime these graphs run on CPU (a DequantizeLinear + MatMul pair is fused into one kernel), which
is how their parity with fp32 is measured here; edgevlm.backends.onnx dequantizes them exactly there
(`session.qdq_matmulnbits_accuracy_level` 1), as TensorRT computes them, not with int8 activations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgevlm.errors import EdgeVLMError, UsageError
from edgevlm.export import trt_operators as table

TARGETS = ("cuda", "jetson-orin-nano", "jetson-orin-nx", "jetson-orin-agx")
INT4_OPSET = 21  # DequantizeLinear's block_size and the INT4 type
INT4_METHODS = ("awq", "rtn")  # symmetric: gptq's and hqq's zero points are refused (TensorRT rejects them)
# Inputs that must be constants for TensorRT (the table's "must be an initializer / build-time constant").
CONSTANT_INPUTS = {**{op: 1 for op in table.SUPPORTED if op.startswith("Reduce")}, "Squeeze": 1, "Unsqueeze": 1,
                   "CumSum": 1, "TopK": 1}


class TensorRTError(EdgeVLMError):
    """A graph TensorRT's ONNX parser would not accept, or an option the TensorRT flavour cannot honour."""


def check_target(target: str) -> None:
    if target not in TARGETS:
        raise UsageError(f"--format tensorrt builds for a GPU: --target must be one of {', '.join(TARGETS)} "
                         f"(got {target!r})")


def check_plan(plan) -> None:
    """Refuse the precisions the TensorRT flavour cannot write (exporter.QuantPlan)."""
    if plan.embed not in ("fp32", "fp16"):
        raise UsageError(f"--embed-quant {plan.embed} needs ONNX Runtime's quantized Gather; TensorRT bundles take "
                         "fp32 or fp16 token embeddings")
    if plan.int4_method not in INT4_METHODS and "int4" in (plan.extractor, plan.reasoner, plan.vision):
        raise UsageError(f"--int4-method {plan.int4_method} stores zero points, which TensorRT's dequantize layer "
                         f"rejects; use one of: {', '.join(INT4_METHODS)}")
    if plan.fidelity_target is not None:
        raise UsageError("--fidelity-target ranks GPTQ's int4 layers, which TensorRT bundles do not use; use "
                         "--min-agreement to gate the export instead")


# ---------------------------------------------------------------- the checker
def problems(model) -> list[str]:
    """Every reason TensorRT's ONNX parser (TensorRT 10, trt_operators) would refuse `model` (an onnx
    ModelProto), one line each, naming the node."""
    found = []
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and not table.MIN_OPSET <= opset.version <= table.MAX_OPSET:
            found.append(f"opset {opset.version} (TensorRT {table.TENSORRT_VERSION} parses opsets "
                         f"{table.MIN_OPSET}-{table.MAX_OPSET})")
    found += _graph_problems(model.graph, {i.name: i for i in model.graph.initializer})
    return found


def _graph_problems(graph, initializers: dict) -> list[str]:
    from onnx import AttributeProto, TensorProto, numpy_helper

    found = []
    constants = set(initializers) | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    for node in graph.node:
        label = f"node {node.name or '(unnamed)'} ({node.domain + '.' if node.domain else ''}{node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            found.append(f"{label}: not a standard ONNX operator (domain {node.domain}); TensorRT parses none")
            continue
        if node.op_type not in table.SUPPORTED:
            listed = "marked unsupported" if node.op_type in table.UNSUPPORTED else "not listed"
            found.append(f"{label}: {listed} in TensorRT's ONNX operator table")
            continue
        index = CONSTANT_INPUTS.get(node.op_type)
        if index is not None and len(node.input) > index and node.input[index] and node.input[index] not in constants:
            found.append(f"{label}: input {index} must be a constant for TensorRT ({table.SUPPORTED[node.op_type]})")
        if node.op_type in ("DequantizeLinear", "QuantizeLinear") and len(node.input) > 2 and node.input[2]:
            zero = initializers.get(node.input[2])
            if zero is None or np.any(numpy_helper.to_array(zero) != 0):
                found.append(f"{label}: a zero point TensorRT rejects (it must be absent or zero)")
        if node.op_type == "DequantizeLinear":
            block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
            weight = initializers.get(node.input[0])
            if block and weight is not None and weight.data_type != TensorProto.INT4:
                found.append(f"{label}: blocked scales on {TensorProto.DataType.Name(weight.data_type)} weights "
                             "(TensorRT blocks 4-bit weights only; 8-bit ones are per channel)")
        for attr in node.attribute:  # If / Loop / Scan bodies
            for sub in ([attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)):
                found += _graph_problems(sub, {**initializers, **{i.name: i for i in sub.initializer}})
    return found


def check(path: str | Path) -> None:
    """Refuse (TensorRTError, one line naming the first node) a graph TensorRT's ONNX parser cannot parse."""
    import onnx

    path = Path(path)
    found = problems(onnx.load(str(path), load_external_data=False))
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise TensorRTError(f"{path.name}: {found[0]}{more}; TensorRT could not build an engine from it")


# ---------------------------------------------------------------- weights as TensorRT reads them
def _load(src: Path):
    import onnx

    return onnx.load(str(src))


def _save(model, dst: Path) -> None:
    import onnx

    from edgevlm.export.quantize import remove_graph

    dst = Path(dst)
    remove_graph(dst)
    onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data", size_threshold=1024)


def _int8_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of W [K, N] per output column: (q int8 [K, N], scale float32 [N])."""
    scale = np.abs(w).max(axis=0) / 127.0
    scale[scale == 0] = 1.0
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


def pack_int4(q: np.ndarray) -> bytes:
    """Signed 4-bit values (int8 in [-8, 7]) in ONNX's INT4 layout: two a byte, the first in the low nibble."""
    flat = (q.ravel().astype(np.uint8) & 0x0F)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_int4(raw: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """pack_int4's inverse: int8 values in [-8, 7] of `shape`."""
    b = np.frombuffer(raw, np.uint8)
    both = np.stack([b & 0x0F, b >> 4], axis=1).ravel()[:int(np.prod(shape))].astype(np.int8)
    return np.where(both > 7, both - 16, both).astype(np.int8).reshape(shape)


def _dq_matmul(graph, node, weight: str, q_tensor, scale: np.ndarray, **attrs) -> None:
    """Feed `node` (a MatMul) its weight through a DequantizeLinear of q_tensor (a TensorProto) and scale."""
    from onnx import helper, numpy_helper

    q_tensor.name = f"{weight}.quantized"
    scale_name = f"{weight}.scale"
    graph.initializer.extend([q_tensor, numpy_helper.from_array(scale, scale_name)])
    out = f"{weight}.dequantized"
    graph.node.append(helper.make_node("DequantizeLinear", [q_tensor.name, scale_name], [out],
                                       name=f"{node.name or weight}/DequantizeLinear", **attrs))
    node.input[1] = out


def int8_weight_only(src: Path, dst: Path, *, include: list[str] | None = None) -> int:
    """Every MatMul with a constant 2-D float weight (or those named in `include`) as per-channel int8
    DequantizeLinear + MatMul; returns how many."""
    from onnx import TensorProto, numpy_helper

    model = _load(src)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            uses[name] = uses.get(name, 0) + 1
    changed, dequantized = 0, {}  # weight -> its DequantizeLinear's output (a weight two MatMuls share)
    for node in list(graph.node):
        if node.op_type != "MatMul" or (include is not None and node.name not in include):
            continue
        weight = node.input[1]
        if weight in dequantized:
            node.input[1] = dequantized[weight]
            changed += 1
            continue
        t = inits.get(weight)
        if t is None or len(t.dims) != 2 or t.data_type != TensorProto.FLOAT:
            continue
        q, scale = _int8_per_channel(numpy_helper.to_array(t).astype(np.float32))
        if uses[weight] == sum(n.op_type == "MatMul" and n.input[1] == weight and (include is None or n.name in include)
                               for n in graph.node):
            graph.initializer.remove(inits.pop(weight))  # nothing else reads the fp32 weight
        _dq_matmul(graph, node, weight, numpy_helper.from_array(q), scale, axis=1)
        dequantized[weight] = node.input[1]
        changed += 1
    _toposort_save(model, dst)
    return changed


def int4_weight_only(src: Path, dst: Path, *, method: str = "awq", block_size: int = 32, reader=None,
                     keep_int8: list[str] | None = None) -> None:
    """int4 blocked DequantizeLinear weights by `method` (quantize.int4's, symmetric); the `keep_int8` MatMuls
    get per-channel int8 instead."""
    from edgevlm.export import quantize

    if method not in INT4_METHODS:
        raise UsageError(f"int4 method {method!r} cannot be written for TensorRT; use one of: "
                         f"{', '.join(INT4_METHODS)}")
    with quantize.scratch_graph(dst, "nbits") as nbits:
        quantize.int4(src, nbits, method=method, block_size=block_size, reader=reader, exclude=keep_int8 or [])
        model = _load(nbits)
    nbits_to_dequantize(model)
    with quantize.scratch_graph(dst, "int4") as staged:
        _toposort_save(model, staged)
        if keep_int8:
            int8_weight_only(staged, dst, include=keep_int8)
        else:
            _save(_load(staged), dst)


def nbits_to_dequantize(model) -> int:
    """Rewrite every 4-bit symmetric MatMulNBits of `model` (ONNX Runtime's layout: B uint8 [N, blocks,
    block / 2] with the value + 8 in each nibble, scales [N * blocks]) as DequantizeLinear(int4 [K, N],
    scale [blocks, N], axis 0, block_size) + MatMul, in place; returns how many. The opset becomes at least 21."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    changed = 0
    for node in list(graph.node):
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
        if bits != 4 or (len(node.input) > 3 and any(node.input[3:])):
            raise TensorRTError(f"node {node.name}: {bits}-bit weights with zero points or extra inputs cannot be "
                                "written for TensorRT")
        if k % block:
            raise TensorRTError(f"node {node.name}: K={k} is not a multiple of the block size {block}")
        blocks = k // block
        packed = numpy_helper.to_array(inits[node.input[1]]).reshape(n, blocks * block // 2)
        stored = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, k)  # low nibble first, along K
        q = (stored.astype(np.int8) - 8).T  # [K, N], in [-8, 7]
        scale = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(n, blocks).T
        weight = node.name or node.output[0]
        tensor = TensorProto(name=weight, data_type=TensorProto.INT4, dims=[k, n], raw_data=pack_int4(q))
        matmul = helper.make_node("MatMul", [node.input[0], ""], list(node.output), name=node.name)
        _dq_matmul(graph, matmul, weight, tensor, np.ascontiguousarray(scale), axis=0, block_size=block)
        graph.node.append(matmul)  # a copy: appended once its inputs are set
        graph.node.remove(node)
        changed += 1
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    if not any(node.domain == "com.microsoft" for node in graph.node):
        for opset in [o for o in model.opset_import if o.domain == "com.microsoft"]:
            model.opset_import.remove(opset)
    if changed:
        set_opset(model, INT4_OPSET)
    return changed


def set_opset(model, version: int) -> None:
    """Raise the default domain's opset to `version`. From 20 to 21 the operators a traced graph holds changed
    only their accepted types (int4, uint4...); GroupNormalization changed meaning, so it is refused."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < version:
            if any(n.op_type == "GroupNormalization" for n in model.graph.node):
                raise TensorRTError("cannot raise the opset of a graph with GroupNormalization")
            opset.version = version
    model.ir_version = max(model.ir_version, 10)  # INT4 tensors


def _toposort_save(model, dst: Path) -> None:
    from onnxruntime.quantization.onnx_model import ONNXModel

    wrapped = ONNXModel(model)
    wrapped.topological_sort()
    _save(wrapped.model, dst)
