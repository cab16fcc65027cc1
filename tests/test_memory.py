"""The memory planner: sizes, the context a budget allows, refusals, and the runtime keeping to the plan."""

import dataclasses
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import random_image

from edgevlm import bundle as bundle_mod
from edgevlm import memory
from edgevlm.cli import cli
from edgevlm.errors import InputTooLongError, UsageError
from edgevlm.families import family_module
from edgevlm.pipeline import Pipeline


@pytest.mark.parametrize("text, expected", [("6GB", 6_000_000_000), ("6.5g", 6_500_000_000), ("512MiB", 512 * 2**20),
                                            ("1500", 1500), (" 2 GiB ", 2 * 2**30)])
def test_sizes_parse(text, expected):
    assert memory.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "6XB", "-1GB", "0", "six"])
def test_bad_sizes_are_usage_errors(text):
    with pytest.raises(UsageError):
        memory.parse_size(text)


def test_manifest_records_the_dims_the_planner_needs(tiny_bundle):
    b = bundle_mod.load(tiny_bundle, verify=False)
    extractor, reasoner = b.models["extractor"], b.models["reasoner"]
    assert set(reasoner.to_dict()["dims"]) == {"hidden", "heads", "intermediate", "vocab"}
    assert extractor.dims.vision.tokens == (32 // 8) ** 2  # the tiny SigLIP: 32 px in patches of 8
    assert extractor.dims.vision.max_crops == family_module("llava_onevision").max_crops(extractor.preprocess)
    # a bundle written before `dims` still plans, from its graphs' shapes
    legacy = dataclasses.replace(extractor, dims=None)
    assert memory.model_dims(legacy).vocab == extractor.dims.vocab


def test_the_plan_is_the_longest_context_that_fits(tiny_bundle):
    b = bundle_mod.load(tiny_bundle, verify=False)
    unlimited = memory.plan(b, None)
    assert unlimited.max_context == {r: b.models[r].max_context for r in ("extractor", "reasoner")}
    costs = {c.role: c for c in memory.costs(b)}
    fixed = sum(unlimited.resident.values())
    # a budget with room for exactly `target` positions of the hungrier model's stage
    target = max(c.min_context for c in costs.values()) + 300
    budget = fixed + max(c.stage_bytes(target, 512) for c in costs.values())
    planned = memory.plan(b, budget)
    hungry = max(costs, key=lambda r: costs[r].stage_bytes(target, 512))
    assert planned.max_context[hungry] == target
    assert all(planned.stage_peak[r] <= budget - fixed for r in costs)
    assert all(costs[r].stage_bytes(planned.max_context[r] + 1, 512) > budget - fixed for r in costs)
    assert planned.peak <= budget
    # a larger budget never plans a shorter context
    assert all(memory.plan(b, budget * 2).max_context[r] >= planned.max_context[r] for r in costs)


def test_the_planner_overlaps_the_vision_tower_only_when_both_fit(tiny_bundle, monkeypatch):
    from edgevlm.pipeline import Pipeline

    b = bundle_mod.load(tiny_bundle, verify=False)
    assert memory.plan(b, None).overlap
    # a vision tower whose activations dwarf the rest (the tiny one always fits beside the planner)
    monkeypatch.setattr(memory.ModelCost, "vision_bytes", lambda self: (0, 50_000_000 if self.dims.vision else 0))
    costs = {c.role: c for c in memory.costs(b)}
    fixed = sum(memory.plan(b, None).resident.values())
    budget = fixed + max(c.stage_bytes(c.min_context, 512) for c in costs.values())  # each stage fits alone
    tight = memory.plan(b, budget)
    assert tight.peak <= budget and not tight.overlap
    assert "does not fit" in tight.describe() and tight.to_dict()["overlap"] is False
    planner = costs["reasoner"].stage_bytes(memory.MIN_CONTEXT, 512)  # a planner prompt's stage
    assert memory.plan(b, budget + planner).overlap
    assert not Pipeline.from_bundle(str(tiny_bundle), memory_budget=budget, overlap=True, vision_cache_mb=0,
                                    prefix_cache_mb=0).overlap


def test_a_budget_that_cannot_fit_is_refused_saying_what_would(tiny_bundle):
    b = bundle_mod.load(tiny_bundle, verify=False)
    with pytest.raises(memory.MemoryBudgetError, match=r"needs at least ([0-9.]+) GB") as err:
        memory.plan(b, 1_000_000)
    needed = float(err.value.args[0].rsplit("at least ", 1)[1].split()[0]) * 1e9
    memory.plan(b, int(needed))  # the figure it names is enough


def test_the_runtime_keeps_to_the_planned_context(tiny_bundle, tmp_path):
    b = bundle_mod.load(tiny_bundle, verify=False)
    costs = {c.role: c for c in memory.costs(b)}
    fixed = sum(memory.plan(b, None, prefix_cache_mb=0).resident.values())
    budget = fixed + max(c.stage_bytes(c.min_context + 8, 512) for c in costs.values())
    pipe = Pipeline.from_bundle(str(tiny_bundle), memory_budget=budget, vision_cache_mb=0, prefix_cache_mb=0)
    plan = pipe.memory_plan
    assert pipe.extractor.max_context == plan.max_context["extractor"] < b.models["extractor"].max_context
    image = tmp_path / "frame.png"
    random_image(40, 60).save(image)
    result = pipe(str(image), "What is shown?", mode="extract", max_new_tokens=4000)
    stage = result.stages["extract"]
    assert stage.prompt_tokens + stage.new_tokens <= plan.max_context["extractor"]
    allocated, per_token = stage.memory["kv_allocated"], costs["extractor"].kv_per_token
    assert allocated <= per_token * plan.max_context["extractor"]  # both buffer sets, never past the plan
    with pytest.raises(InputTooLongError, match="within the .* GB memory budget"):  # says why, and what to do
        pipe(str(image), "where " * 5000, mode="extract")


def test_cli_budget_errors_are_one_line(tiny_bundle, tmp_path):
    image = tmp_path / "frame.png"
    random_image().save(image)
    for args, needle in [(["--bundle", tiny_bundle, "--memory-budget", "1MB"], "needs at least"),
                         (["--bundle", tiny_bundle, "--memory-budget", "lots"], "memory size"),
                         (["--memory-budget", "6GB"], "--bundle")]:
        proc = subprocess.run([sys.executable, "-m", "edgevlm", "run", str(image), "What is shown?", *map(str, args)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"image": str(image), "question": "What is shown?", "answer": "a"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "edgevlm", "eval", "--data", str(items), "--bundle", str(tiny_bundle),
                           "--memory-budget", "1MB"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "needs at least" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_info_shows_the_plan(tiny_bundle):
    result = CliRunner().invoke(cli, ["info", str(tiny_bundle), "--no-verify", "--memory-budget", "4GB"])
    assert result.exit_code == 0, result.output
    assert "memory plan, budget 4.00 GB" in result.output and "context" in result.output
    plan = memory.plan(bundle_mod.load(tiny_bundle, verify=False), 4_000_000_000)
    assert json.loads(json.dumps(plan.to_dict()))["budget_mb"] == 4000.0
