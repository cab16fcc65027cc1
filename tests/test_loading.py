"""One loader for run, bench and eval (edgevlm.loading): a bad combination is refused when the Source is made,
before anything is read; a Source loads a bundle on ONNX Runtime or an HF pair on PyTorch; `each` loads the
systems one at a time."""

import gc
import weakref

import pytest

from edgevlm.bundle import BundleError
from edgevlm.errors import UsageError
from edgevlm.loading import Source, each, sources
from edgevlm.pipeline import PREFIX_CACHE_MB, VISION_CACHE_MB, Pipeline


@pytest.mark.parametrize("kwargs, message", [
    ({"bundle": "B", "extractor": "E"}, "^--bundle already fixes the models and their precision; drop --extractor$"),
    ({"bundle": "B", "preset": "demo", "reasoner": "R"}, "; drop --reasoner/--preset$"),
    ({"bundle": "B", "quant": "int8", "gguf_file": "r.gguf"}, "; drop --quant/--gguf-file$"),
    ({"quant": "int3"}, "unknown --quant 'int3'; choose int8 or nf4"),
    ({"extractor": "E", "memory_budget": "6GB"}, "--memory-budget plans an exported bundle's memory"),
    ({"bundle": "B", "memory_budget": "lots"}, "cannot read 'lots' as a memory size"),
    ({"preset": "nope"}, "unknown preset 'nope'"),
])
def test_a_bad_source_is_refused_when_made(kwargs, message):
    with pytest.raises(UsageError, match=message):
        Source(**kwargs)  # "B" does not exist: nothing is read before the combination is checked


def test_sources_are_the_bundles_or_else_the_one_pair():
    assert [s.bundle for s in sources(["a", "b"], device="cuda")] == ["a", "b"]
    assert all(s.device == "cuda" for s in sources(["a", "b"], device="cuda"))
    (pair,) = sources([], extractor="E", reasoner="R")
    assert (pair.bundle, pair.extractor, pair.reasoner) == (None, "E", "R")
    with pytest.raises(UsageError, match="--bundle already fixes"):
        sources(["a"], extractor="E")


def test_a_bundle_source_loads_on_onnx_runtime_with_its_memory_plan(tiny_bundle):
    pipe = Source(bundle=str(tiny_bundle), memory_budget="4GB", vision_cache_mb=1).load()
    assert isinstance(pipe, Pipeline) and pipe.extractor.backend == "onnxruntime" and pipe.reasoner is not None
    assert pipe.memory_plan.budget == 4_000_000_000
    assert pipe.vision_cache.max_bytes == 1_000_000
    with pytest.raises(BundleError, match="no such bundle directory"):
        Source(bundle=str(tiny_bundle.parent / "none")).load()


def test_an_hf_source_loads_on_pytorch_and_may_skip_the_reasoner(tiny_dir):
    source = Source(extractor=str(tiny_dir("llava_onevision")) + "/", reasoner=str(tiny_dir("qwen3")))
    pipe = source.load(load_reasoner=False)
    assert pipe.extractor.backend == "torch" and pipe.reasoner is None
    assert source.label() == "torch llava_onevision"
    assert Source().label() == "torch paper-0.6b" and Source(preset="paper-1.7b").label() == "torch paper-1.7b"


def test_a_bundle_source_is_labelled_by_its_folder_and_precision(tiny_bundle):
    assert Source(bundle=str(tiny_bundle)).label() == f"{tiny_bundle.name} (fp32)"
    assert (Source().prefix_cache_mb, Source().vision_cache_mb) == (PREFIX_CACHE_MB, VISION_CACHE_MB)


def test_each_loads_one_system_at_a_time(tiny_bundle):
    loaded, messages = [], []

    def work(source, pipe):
        gc.collect()
        alive = [ref() is not None for ref in loaded]
        loaded.append(weakref.ref(pipe))
        return source.bundle, alive

    done = each(sources([str(tiny_bundle)] * 2), work, progress=messages.append)
    assert done == [(str(tiny_bundle), []), (str(tiny_bundle), [False])]  # the first let go before the second
    assert messages == [f"loading {tiny_bundle}"] * 2
