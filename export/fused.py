"""Decoder graphs written directly with ONNX Runtime's fused operators, for Llama-style text decoders
(Llama/SmolLM2, Qwen2, Qwen3 and the text halves of VLMs built on them).

The traced decoder's outputs (edgevlm.export.graphs) and its inputs less attention_mask, but each layer is
SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization, one packed QKV MatMul (fed to the
attention packed, or split for Qwen3's per-head q/k norms), GroupQueryAttention with rotary embedding
from cos/sin tables, one packed gate+up MatMul, QuickGelu(alpha=1) as SiLU, and the down MatMul: a dozen
kernels a layer instead of ~60, and MatMuls with constant weights that the quantizers turn into
MatMulNBits.

GroupQueryAttention writes the new keys and values into the cache in place when `past` and `present` are
bound to the same buffer (its sequence axis is then the buffer's capacity): the runtime keeps one buffer
per tensor for the whole generation instead of two that swap and copy the cache every step. Bound to
separate tensors it behaves like the traced graph. How much of the cache is filled comes from the last
position id (rows of one unpadded sequence, as the runtime feeds): with no mask to rebind at each new
length, a decode step's inputs are all bound once, and the step writes only its token and position.

Models this cannot express exactly (a head size that is not a multiple of 16, which the CPU kernel's
rotary needs; sliding windows; length-dependent rotary scaling; other activations) are left to the traced
export: `unsupported()` says why.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgevlm.export.graphs import (
    INPUT_IDS,
    INPUTS_EMBEDS,
    LOGITS,
    POSITION_IDS,
    past_name,
    present_name,
)

ARCHITECTURES = ("llama", "qwen2", "qwen3")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # rotary tables that do not depend on the length
OPSET = 17


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def unsupported(body, config) -> str | None:
    """Why this decoder cannot be written with the fused operators, or None if it can."""
    kind = getattr(config, "model_type", "")
    if kind not in ARCHITECTURES:
        return f"architecture {kind!r} (fused decoders cover {', '.join(ARCHITECTURES)})"
    if _head_dim(config) % 16:
        return f"head size {_head_dim(config)} (GroupQueryAttention's rotary needs a multiple of 16)"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "use_sliding_window", False) or (kind == "llama" and getattr(config, "sliding_window", None)):
        return "sliding-window attention"
    if getattr(config, "mlp_bias", False):
        return "MLP biases"
    rotary = getattr(body, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", "default") not in STATIC_ROPE:
        return f"rotary embedding {getattr(rotary, 'rope_type', None)!r}"
    return None


def rotary_tables(body, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [positions, head_dim / 2] from the model's own rotary module (its inverse frequencies and
    attention scaling, so llama3/yarn/linear scaling come out as transformers computes them)."""
    import torch

    rotary = body.rotary_emb
    inv_freq = rotary.inv_freq.detach().double().cpu()
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq[None]
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    return ((angles.cos() * scale).float().numpy(), (angles.sin() * scale).float().numpy())


class _Graph:
    """Nodes and initializers of a graph being written. Weights of `external_bytes` or more go straight into
    the data file as they come, so the graph never holds a second copy of the model: a 1.7B decoder's
    weights would otherwise sit in memory three times over (tensors, initializer protos, the model proto)."""

    external_bytes = 1024

    def __init__(self, data, location: str):
        from onnx import helper

        self.helper, self.nodes, self.initializers = helper, [], []
        self.data, self.location = data, location  # the open data file, and its name beside the graph

    def weight(self, name: str, array: np.ndarray) -> str:
        from onnx import TensorProto, numpy_helper

        array = np.ascontiguousarray(array)
        if array.nbytes < self.external_bytes:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        offset = (self.data.tell() + 63) // 64 * 64  # aligned, for memory-mapped loading
        self.data.seek(offset)
        self.data.write(memoryview(array).cast("B"))
        tensor = TensorProto(name=name, data_type=self.helper.np_dtype_to_tensor_dtype(array.dtype),
                             dims=array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", offset), ("length", array.nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self.initializers.append(tensor)
        return name

    def const(self, name: str, values, dtype=np.int64) -> str:
        return self.weight(name, np.asarray(values, dtype))

    def node(self, op: str, inputs: list[str], outputs: int | list[str], name: str, domain: str = "", **attrs):
        outs = outputs if isinstance(outputs, list) else [f"{name}/out{i}" if outputs > 1 else f"{name}/out"
                                                          for i in range(outputs)]
        self.nodes.append(self.helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        return outs if len(outs) > 1 else outs[0]


def build_decoder(body, lm_head, config, path: Path, *, embeds: bool, positions: int | None = None) -> Path:
    """Write the fused decoder graph of `body` (a transformers decoder: LlamaModel, Qwen2Model, Qwen3Model)
    and `lm_head` to `path` (weights in `path`.data). Call unsupported() first."""
    import onnx

    path = Path(path)
    data_path = Path(str(path) + ".data")
    for stale in (path, data_path):
        stale.unlink(missing_ok=True)
    with open(data_path, "wb") as data:
        model = _decoder_model(_Graph(data, data_path.name), body, lm_head, config, embeds, positions)
    onnx.save_model(model, str(path))  # the weights are in the data file already
    return path


def _decoder_model(g: _Graph, body, lm_head, config, embeds: bool, positions: int | None):
    import onnx
    import torch
    from onnx import TensorProto

    def w(t) -> np.ndarray:
        return t.detach().to(torch.float32).cpu().numpy()

    state = {k: w(v) for k, v in body.state_dict().items()}
    head_dim, heads, kv_heads = _head_dim(config), config.num_attention_heads, config.num_key_value_heads
    hidden, eps = config.hidden_size, float(config.rms_norm_eps)
    layers = config.num_hidden_layers
    cos, sin = rotary_tables(body, positions or int(config.max_position_embeddings))
    g.weight("rotary.cos", cos)
    g.weight("rotary.sin", sin)

    if embeds:
        x = INPUTS_EMBEDS
    else:
        x = g.node("Gather", [g.weight("embed_tokens.weight", state["embed_tokens.weight"]), INPUT_IDS], 1,
                   "embed_tokens/Gather")
    # GroupQueryAttention's lengths from the positions: the last filled position per row, and the total length
    last = g.node("ReduceMax", [POSITION_IDS], 1, "lengths/last", axes=[1], keepdims=0)
    seqlens_k = g.node("Cast", [last], 1, "lengths/seqlens_k", to=TensorProto.INT32)
    total = g.node("Add", [g.node("ReduceMax", [last], 1, "lengths/max", keepdims=0), g.const("one", 1)], 1,
                   "lengths/total")
    total = g.node("Cast", [total], 1, "lengths/total_sequence_length", to=TensorProto.INT32)
    if "layers.0.self_attn.q_norm.weight" in state:  # Qwen3's per-head norms
        head_shape, flat_shape = g.const("shape.heads", [0, 0, -1, head_dim]), g.const("shape.flat", [0, 0, -1])

    skip, mlp_out = x, None
    for i in range(layers):
        p = f"layers.{i}"
        if mlp_out is None:
            normed = g.node("SimplifiedLayerNormalization", [x, g.weight(f"{p}.input_layernorm.weight",
                            state[f"{p}.input_layernorm.weight"])], 1, f"{p}/input_layernorm", axis=-1, epsilon=eps)
        else:
            normed, _, _, skip = g.node(
                "SkipSimplifiedLayerNormalization",
                [mlp_out, skip, g.weight(f"{p}.input_layernorm.weight", state[f"{p}.input_layernorm.weight"])],
                [f"{p}/input_layernorm/out", "", "", f"{p}/residual"], f"{p}/input_layernorm",
                domain="com.microsoft", epsilon=eps)
        a = f"{p}.self_attn"
        qkv_w = np.concatenate([state[f"{a}.{n}_proj.weight"] for n in "qkv"]).T
        qkv = g.node("MatMul", [normed, g.weight(f"{a}.qkv_proj.weight", qkv_w)], 1, f"{a}.qkv_proj/MatMul")
        if f"{a}.q_proj.bias" in state:
            bias = np.concatenate([state[f"{a}.{n}_proj.bias"] for n in "qkv"])
            qkv = g.node("Add", [qkv, g.weight(f"{a}.qkv_proj.bias", bias)], 1, f"{a}.qkv_proj/Add")

        def head_norm(t, name, a=a):  # Qwen3: an RMSNorm over each head before rotary
            per_head = g.node("Reshape", [t, head_shape], 1, f"{a}.{name}_norm/Reshape")
            normed = g.node("SimplifiedLayerNormalization", [per_head, g.weight(
                f"{a}.{name}_norm.weight", state[f"{a}.{name}_norm.weight"])], 1, f"{a}.{name}_norm", axis=-1,
                epsilon=eps)
            return g.node("Reshape", [normed, flat_shape], 1, f"{a}.{name}_norm/Flatten")

        if f"{a}.q_norm.weight" in state:
            sizes = g.const(f"{a}.qkv_split", [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
            q, k, v = g.node("Split", [qkv, sizes], 3, f"{a}.qkv_split", axis=-1)
            q, k = head_norm(q, "q"), head_norm(k, "k")
        else:  # the attention takes the packed projection as it is
            q, k, v = qkv, "", ""
        attn, _, _ = g.node(
            "GroupQueryAttention",
            [q, k, v, past_name(i, "key"), past_name(i, "value"), seqlens_k, total, "rotary.cos", "rotary.sin",
             POSITION_IDS],
            [f"{a}/out", present_name(i, "key"), present_name(i, "value")], f"{a}/GroupQueryAttention",
            domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0,
            scale=float(head_dim) ** -0.5)
        out = g.node("MatMul", [attn, g.weight(f"{a}.o_proj.weight", state[f"{a}.o_proj.weight"].T)], 1,
                     f"{a}.o_proj/MatMul")
        if f"{a}.o_proj.bias" in state:
            out = g.node("Add", [out, g.weight(f"{a}.o_proj.bias", state[f"{a}.o_proj.bias"])], 1, f"{a}.o_proj/Add")
        normed, _, _, skip = g.node(
            "SkipSimplifiedLayerNormalization",
            [out, skip, g.weight(f"{p}.post_attention_layernorm.weight",
                                 state[f"{p}.post_attention_layernorm.weight"])],
            [f"{p}/post_attention_layernorm/out", "", "", f"{p}/attn_residual"], f"{p}/post_attention_layernorm",
            domain="com.microsoft", epsilon=eps)
        m = f"{p}.mlp"
        gate_up_w = np.concatenate([state[f"{m}.gate_proj.weight"], state[f"{m}.up_proj.weight"]]).T
        gate_up = g.node("MatMul", [normed, g.weight(f"{m}.gate_up_proj.weight", gate_up_w)], 1,
                         f"{m}.gate_up_proj/MatMul")
        gate, up = g.node("Split", [gate_up, g.const(f"{m}.split", [config.intermediate_size] * 2)], 2,
                          f"{m}.gate_up_split", axis=-1)
        act = g.node("QuickGelu", [gate], 1, f"{m}.act", domain="com.microsoft", alpha=1.0)  # x * sigmoid(x): SiLU
        mlp_out = g.node("MatMul", [g.node("Mul", [act, up], 1, f"{m}/Mul"), g.weight(
            f"{m}.down_proj.weight", state[f"{m}.down_proj.weight"].T)], 1, f"{m}.down_proj/MatMul")

    final_norm = g.weight("norm.weight", state["norm.weight"])
    final, _, _, _ = g.node("SkipSimplifiedLayerNormalization", [mlp_out, skip, final_norm], ["norm/out", "", "", ""],
                            "norm", domain="com.microsoft", epsilon=eps)
    # only the last position's logits leave the graph (see edgevlm.export.graphs)
    last_pos = g.node("Slice", [final, g.const("slice.start", [-1]), g.const("slice.end", [np.iinfo(np.int64).max]),
                                g.const("slice.axis", [1])], 1, "last_position/Slice")
    head_w = w(lm_head.weight).T  # a tied head gets its own copy, so it can be quantized (graphs.export_decoder)
    g.node("MatMul", [last_pos, g.weight("lm_head.weight", head_w)], [LOGITS], "lm_head/MatMul")

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    vi = onnx.helper.make_tensor_value_info
    kv_shape = ["batch", kv_heads, "past_sequence", head_dim]
    first = (vi(INPUTS_EMBEDS, f32, ["batch", "sequence", hidden]) if embeds
             else vi(INPUT_IDS, i64, ["batch", "sequence"]))
    inputs = [first, vi(POSITION_IDS, i64, ["batch", "sequence"])]
    outputs = [vi(LOGITS, f32, ["batch", 1, config.vocab_size])]
    for i in range(layers):
        inputs += [vi(past_name(i, kind), f32, kv_shape) for kind in ("key", "value")]
        outputs += [vi(present_name(i, kind), f32, ["batch", kv_heads, "present_sequence", head_dim])
                    for kind in ("key", "value")]
    graph = onnx.helper.make_graph(g.nodes, "decoder", inputs, outputs, g.initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET),
                                                         onnx.helper.make_opsetid("com.microsoft", 1)],
                                   producer_name="edgevlm")
    # The oldest IR version that carries these opsets, not the installed onnx's newest (make_model's default): ONNX
    # Runtime refuses a graph of a newer IR than it knows, and the GPU and Jetson builds lag the CPU wheel
    # (onnxruntime-gpu 1.31.1 refused IR 14 on an H200 where the pinned CPU wheel, 1.32.0, read it).
    model.ir_version = onnx.helper.find_min_ir_version_for(model.opset_import, ignore_unknown=True)
    return model


def updates_cache_in_place(path: Path) -> bool:
    """Whether a decoder graph's attention reads and writes the graph's own cache inputs and outputs (so the
    runtime may bind one buffer to both). An fp16 conversion puts casts between them: the cache is then
    copied each step, as with a traced graph."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inputs, outputs = {i.name for i in graph.input}, {o.name for o in graph.output}
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    return bool(attention) and all(n.input[3] in inputs and n.input[4] in inputs and n.output[1] in outputs
                                   and n.output[2] in outputs for n in attention)
