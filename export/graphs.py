"""Torch modules shaped for ONNX export, and the export call itself (torch.onnx dynamo exporter).

The decoder graph takes an explicit KV cache and returns the updated one:
    (input_ids | inputs_embeds, attention_mask, position_ids, past.{i}.key, past.{i}.value ...)
    -> (logits of the last position, present.{i}.key, present.{i}.value ...)
KV tensors are [batch, kv_heads, sequence, head_dim]. Only the last position's logits leave the graph:
a 1000-token prefill would otherwise compute 1000 x vocab logits nobody reads.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

# Names in every graph, which the runtime binds by, are the manifest's.
from edgevlm.manifest import (  # noqa: E402
    ATTENTION_MASK,
    IMAGE_FEATURES,
    INPUT_IDS,
    INPUTS_EMBEDS,
    KV,
    LOGITS,
    PIXEL_VALUES,
    POSITION_IDS,
    Graph,
    ModelSpec,
    past_name,
    present_name,
)


class DecoderWithPast(nn.Module):
    """A transformers decoder body + LM head with the KV cache as explicit inputs and outputs."""

    def __init__(self, body: nn.Module, lm_head: nn.Module, num_layers: int, embeds: bool):
        super().__init__()
        self.body, self.lm_head, self.num_layers, self.embeds = body, lm_head, num_layers, embeds

    def forward(self, x, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        inputs = {"inputs_embeds": x} if self.embeds else {"input_ids": x}
        out = self.body(**inputs, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                        use_cache=True)
        logits = self.lm_head(out.last_hidden_state[:, -1:])
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (logits, *present)


class TokenEmbedding(nn.Module):
    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embedding = embedding

    def forward(self, input_ids):
        return self.embedding(input_ids)


def decoder_io(num_layers: int, embeds: bool) -> tuple[list[str], list[str], dict]:
    """Input names, output names and dynamic axes of a decoder graph."""
    inputs = [INPUTS_EMBEDS if embeds else INPUT_IDS, ATTENTION_MASK, POSITION_IDS]
    outputs = [LOGITS]
    for i in range(num_layers):
        inputs += [past_name(i, "key"), past_name(i, "value")]
        outputs += [present_name(i, "key"), present_name(i, "value")]
    axes = {inputs[0]: {0: "batch", 1: "sequence"}, ATTENTION_MASK: {0: "batch", 1: "total_sequence"},
            POSITION_IDS: {0: "batch", 1: "sequence"}, LOGITS: {0: "batch"}}
    axes.update({n: {0: "batch", 2: "past_sequence"} for n in inputs[3:]})
    axes.update({n: {0: "batch", 2: "total_sequence"} for n in outputs[1:]})
    return inputs, outputs, axes


def sample_decoder_inputs(text_config, embeds: bool, batch: int = 2, seq: int = 3, past: int = 4):
    """Example inputs for tracing; sizes differ per axis so the exporter cannot confuse them."""
    kv = text_config.num_key_value_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    x = (torch.randn(batch, seq, text_config.hidden_size) if embeds
         else torch.randint(0, text_config.vocab_size, (batch, seq)))
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    positions = torch.arange(past, past + seq)[None].expand(batch, seq).contiguous()
    cache = [torch.randn(batch, kv, past, head_dim) for _ in range(2 * text_config.num_hidden_layers)]
    return (x, mask, positions, *cache)


def export(module: nn.Module, args: tuple, path: str | Path, input_names: list[str], output_names: list[str],
           dynamic_axes: dict, *, varargs_from: int | None = None) -> Path:
    """torch.onnx.export with the dynamo exporter; weights go to `<path>.data` (models pass 2 GB).

    `varargs_from`: index from which forward() takes *args (the KV cache), grouped for dynamic_shapes.
    """
    path = Path(path)
    dim = torch.export.Dim.DYNAMIC
    specs = [{axis: dim for axis in dynamic_axes.get(name, {})} or None for name in input_names[:len(args)]]
    shapes = tuple(specs) if varargs_from is None else (*specs[:varargs_from], tuple(specs[varargs_from:]))
    module.eval()
    # torch configures its loggers on import, after the CLI's settings: quiet the exporter's chatter here
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, input_names=input_names, output_names=output_names, dynamic_shapes=shapes, dynamo=True,
            optimize=True, verbose=False,
        )
        program.save(str(path), external_data=True)
    return path


def onnx_files(path: str | Path) -> list[Path]:
    """The graph file and its external-data file, if any."""
    path = Path(path)
    data = Path(str(path) + ".data")
    return [path, data] if data.exists() else [path]


def set_threads_for_export() -> None:
    # Export is single-process CPU work; let torch use every core.
    torch.set_num_threads(os.cpu_count() or 1)


def graph_io(path: str | Path) -> dict:
    """Names, element types and (symbolic) shapes of a saved graph's inputs and outputs, and the bytes of its
    lookup tables (`lookup_bytes`: initializers only Gather reads, like a token embedding, of which a decode
    step reads one row: the roofline leaves them out), for the manifest."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    readers: dict[str, set] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    lookup = sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                 for t in model.graph.initializer if readers.get(t.name) in ({"Gather"}, {"GatherBlockQuantized"}))

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                        "shape": dims})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output), "lookup_bytes": lookup}


def to_fp16(path: str | Path) -> None:
    """Convert a saved graph's weights and arithmetic to float16 in place; inputs and outputs stay float32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    path = Path(path)
    model = onnx.load(str(path))
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    for f in onnx_files(path):
        f.unlink()
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")


def export_decoder(body: nn.Module, lm_head: nn.Module, text_config, path: Path, *, embeds: bool,
                   fused: bool = True) -> Path:
    """Export a decoder with explicit KV (see module docstring): written with ONNX Runtime's fused operators
    where edgevlm.export.fused covers the architecture (its cache can be updated in place), traced otherwise
    (or when EDGEVLM_TRACED_DECODER=1, to compare the two; and with `fused` False: TensorRT bundles, whose
    parser takes standard operators only).

    A head tied to the input embedding gets its own copy of the weight: exported tied, the graph would
    transpose the embedding at run time (ONNX Runtime folds it into a second fp32 copy anyway), and the
    head could never be quantized, since quantizers only touch MatMuls with constant weights.
    """
    from edgevlm.export import fused as fused_graphs

    fused = fused and os.environ.get("EDGEVLM_TRACED_DECODER") != "1"
    if fused and fused_graphs.unsupported(body, text_config) is None:
        return fused_graphs.build_decoder(body, lm_head, text_config, path, embeds=embeds)
    embedding = body.get_input_embeddings() if hasattr(body, "get_input_embeddings") else None
    if embedding is not None and lm_head.weight is embedding.weight:
        head = nn.Linear(lm_head.in_features, lm_head.out_features, bias=lm_head.bias is not None)
        head.load_state_dict({k: v.detach().clone() for k, v in lm_head.state_dict().items()})
        lm_head = head
    wrapper = DecoderWithPast(body, lm_head, text_config.num_hidden_layers, embeds)
    inputs, outputs, axes = decoder_io(text_config.num_hidden_layers, embeds)
    sample = sample_decoder_inputs(text_config, embeds)
    check_explicit_cache(wrapper, sample)
    return export(wrapper, sample, path, inputs, outputs, axes, varargs_from=3)


def check_explicit_cache(wrapper: DecoderWithPast, sample: tuple) -> None:
    """Refuse (one line) a decoder whose `present` is not past + new positions on the sample inputs: a transformers
    other than the pinned one can ignore the cache DecoderWithPast hands the body, and the traced graph then
    attends to the new positions alone (a GPU host's torch 2.11 / transformers 5.17 export: its present held the
    new positions alone, the bundle exported, and its first decode step failed inside ONNX Runtime)."""
    from edgevlm.errors import ModelError

    with torch.no_grad():
        present = wrapper(*sample)[1]
    past, new = sample[3].shape[2], sample[0].shape[1]
    if present.shape[2] != past + new:
        raise ModelError(f"the decoder ignored its explicit KV cache {under_versions()} (present holds "
                         f"{present.shape[2]} positions after {past} past and {new} new): {PINNED}")


PINNED = "export with edgevlm[export]'s pinned versions"  # what a refusal of a drifted export says to do


def under_versions() -> str:
    """The transformers and torch an export ran under, as a refusal that may owe them names them."""
    import transformers

    return f"under transformers {transformers.__version__} / torch {torch.__version__}"


def export_embedding(embedding: nn.Module, vocab_size: int, path: Path) -> Path:
    return export(TokenEmbedding(embedding), (torch.randint(0, vocab_size, (2, 3)),), path, [INPUT_IDS],
                  [INPUTS_EMBEDS], {INPUT_IDS: {0: "batch", 1: "sequence"}})


def kv_layout(text_config, max_context: int, shared: bool = False) -> KV:
    """The decoder's cache; `shared`: past and present may be one buffer, updated in place by the graph."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return KV(layers=text_config.num_hidden_layers, kv_heads=text_config.num_key_value_heads, head_dim=head_dim,
              max_sequence=max_context, shared=shared)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "special_tokens_map.json", "generation_config.json", "processor_config.json",
                   "preprocessor_config.json")


def copy_tokenizer(model_dir: Path, out: Path) -> None:
    """The files the runtime's Tokenizer reads (tokenizer, special tokens, chat template, eos ids)."""
    import shutil

    for name in TOKENIZER_FILES:
        if (Path(model_dir) / name).exists():
            shutil.copy(Path(model_dir) / name, out / name)


def graph_entry(path: Path, root: Path, quant: str) -> Graph:
    return Graph.from_dict({"file": path.relative_to(root).as_posix(), "quant": quant, **graph_io(path)})


def export_vlm_graphs(model, vision: nn.Module, crop: tuple[int, int], text_body: nn.Module, out: Path, *,
                      step, vision_label: str, fused: bool = True) -> dict[str, Path]:
    """A VLM's three fp32 graphs: vision (pixel_values [crops, 3, h, w] -> image_features), embedding, decoder."""
    text = model.config.text_config
    with step(vision_label):
        graphs = {"vision": export(vision, (torch.randn(2, 3, *crop),), out / "vision.onnx", [PIXEL_VALUES],
                                   [IMAGE_FEATURES], {PIXEL_VALUES: {0: "crops"}})}
    with step("token embedding"):
        graphs["embed"] = export_embedding(model.get_input_embeddings(), text.vocab_size, out / "embed.onnx")
    with step("decoder"):
        graphs["decoder"] = export_decoder(text_body, model.lm_head, text, out / "decoder.onnx", embeds=True,
                                           fused=fused)
    return graphs


def model_dims(family: str, text_config, vision_config=None, preprocess: dict | None = None) -> dict:
    """The sizes the runtime's memory planner (edgevlm.memory) estimates activations from."""
    dims = {"hidden": text_config.hidden_size, "heads": text_config.num_attention_heads,
            "intermediate": text_config.intermediate_size, "vocab": text_config.vocab_size}
    if vision_config is not None:
        from edgevlm.families import family_module

        side = vision_config.image_size // vision_config.patch_size
        dims["vision"] = {"hidden": vision_config.hidden_size, "heads": vision_config.num_attention_heads,
                          "intermediate": vision_config.intermediate_size, "tokens": side * side,
                          "max_crops": family_module(family).max_crops(preprocess), "feature": text_config.hidden_size,
                          "layers": vision_config.num_hidden_layers}
    return dims


def model_entry(family: str, graphs: dict[str, Path], text_config, model_dir: Path, out: Path, root: Path,
                vision_config=None, **extra) -> ModelSpec:
    """The manifest entry of one exported fp32 model; copies its tokenizer files beside the graphs."""
    from edgevlm.export import fused

    copy_tokenizer(model_dir, out)
    max_context = int(text_config.max_position_embeddings)
    return ModelSpec.from_dict({
        "family": family,
        "graphs": {name: graph_entry(path, root, "fp32").to_dict() for name, path in graphs.items()},
        "kv": kv_layout(text_config, max_context, fused.updates_cache_in_place(graphs["decoder"])).to_dict(),
        "max_context": max_context,
        "dims": model_dims(family, text_config, vision_config, extra.get("preprocess")),
        "tokenizer": out.relative_to(root).as_posix(),
        **extra,
    })
