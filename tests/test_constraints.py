"""Constrained answers (edgevlm.constraints): the answer after the reasoning matches a JSON schema, a regular
expression or a list of choices, on both backends; bad constraints are usage errors before any model runs;
a constraint the model cannot complete in its tokens ends with stop_reason "constraint" and a note."""

import json
import re

import jsonschema
import numpy as np
import pytest
from conftest import random_image
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from edgevlm.constraints import AnswerMatcher, Constraint
from edgevlm.errors import UsageError
from edgevlm.generation import Decoding, generate
from edgevlm.pipeline import Pipeline
from edgevlm.tokenizer import Prompt

SCHEMA = {"type": "object", "properties": {"count": {"type": "integer", "minimum": 0, "maximum": 9},
                                           "side": {"enum": ["left", "right", "none"]}},
          "required": ["count", "side"], "additionalProperties": False}
REGEX = r"(left|right|none)"
# Enough tokens for a tiny random model to finish a short answer; thinking kept short.
BUDGET = dict(max_new_tokens=48, think_budget=8, instruction="the shapes")


@pytest.fixture(scope="module")
def bundle_pipe(tiny_bundle):
    return Pipeline.from_bundle(str(tiny_bundle))


def _pipes(pipelines, bundle_pipe):
    return {"torch": pipelines("llava_onevision"), "onnxruntime": bundle_pipe}


@pytest.mark.parametrize("think", [True, False])
def test_a_schema_constrained_answer_validates_on_both_backends(pipelines, bundle_pipe, think):
    for backend, pipe in _pipes(pipelines, bundle_pipe).items():
        for seed in range(3):
            r = pipe(random_image(seed=seed), "How many shapes, and on which side?", schema=SCHEMA, think=think,
                     seed=seed, temperature=1.0, **BUDGET)
            think_stage = r.stages["think"]
            if think_stage.stop_reason == "constraint":
                assert r.answer == "" and any("did not complete its json schema" in n for n in r.notes)
                continue
            jsonschema.validate(r.answer_json, SCHEMA)
            assert json.loads(r.answer) == r.answer_json, backend
            assert r.to_dict()["answer_json"] == r.answer_json


def test_a_regex_and_the_options_constrain_the_answer_on_both_backends(pipelines, bundle_pipe):
    for backend, pipe in _pipes(pipelines, bundle_pipe).items():
        r = pipe(random_image(seed=1), "Which side?", regex=REGEX, seed=1, temperature=1.0, **BUDGET)
        assert r.stages["think"].stop_reason == "constraint" or re.fullmatch(REGEX, r.answer), (backend, r.answer)
        assert r.answer_json is None
        # multiple choice: constrained to the options' letters by default
        r = pipe(random_image(seed=2), "Which color?", choices=["red", "green", "blue"], seed=2, temperature=1.0,
                 **BUDGET)
        assert r.answer in ("A", "B", "C"), (backend, r.response)
        assert re.search(r"Answer: [ABC]$", r.response.strip()), r.response


def test_direct_mode_constrains_the_vlm_answer(pipelines, bundle_pipe):
    for backend, pipe in _pipes(pipelines, bundle_pipe).items():
        r = pipe(random_image(seed=3), "Which side?", mode="direct", regex=REGEX, max_new_tokens=16, temperature=1.0)
        assert re.fullmatch(REGEX, r.answer), (backend, r.response)
        assert r.response == r.answer  # direct mode answers bare: no "Answer:" before it


def test_an_unsatisfiable_budget_ends_with_the_stop_reason_and_a_note(pipelines):
    pipe = pipelines("llava_onevision")
    r = pipe(random_image(seed=4), "Count?", regex=r"[0-9]{40}", think=False, max_new_tokens=6, instruction="x")
    assert r.stages["think"].stop_reason == "constraint"
    assert r.answer == "" and any("did not complete its regex" in n for n in r.notes)


@pytest.mark.parametrize("options, needle", [
    ({"schema": {"type": "objekt"}}, "invalid JSON schema: failed to compile JSON schema: Invalid type: objekt"),
    ({"schema": "{not json"}, "the JSON schema is not JSON"),
    ({"schema": [1, 2]}, "a JSON schema must be an object"),
    ({"regex": "(left"}, "invalid regular expression"),
    ({"regex": ""}, "non-empty string"),
    ({"regex": "a", "schema": {"type": "integer"}}, "give one constraint"),
    ({"regex": "a" * 1_000_001}, "the regular expression is 1,000,001 characters; the limit is 1,000,000"),
    ({"one_of": ["a" * 90_000 + str(i) for i in range(12)]}, "the choices together is 1,080,014 characters"),
    ({"schema": {"enum": ["x" * 1_000_000]}}, "the JSON schema is 1,000,0"),
])
def test_bad_constraints_are_one_line_usage_errors_before_any_model_runs(options, needle):
    # a Pipeline with no models: the call must fail on its options before it touches one
    pipe = Pipeline.__new__(Pipeline)
    with pytest.raises(UsageError, match=re.escape(needle)) as e:
        Pipeline.__call__(pipe, random_image(), "q", **options)
    assert "\n" not in str(e.value)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31), temperature=st.sampled_from([0.0, 0.7, 1.5]),
       kind=st.sampled_from(["schema", "regex", "choice"]))
def test_whatever_the_model_samples_a_finished_answer_matches(torch_models, seed, temperature, kind):
    """Property: on the real tiny reasoner, any seed and temperature, a constrained answer that finishes
    (eos) matches its constraint; one that does not ends with stop_reason "constraint"."""
    from edgevlm.pipeline import render_prompt

    model = torch_models("qwen3")
    constraint = {"schema": Constraint.json_schema(SCHEMA), "regex": Constraint.regex(REGEX),
                  "choice": Constraint.choice(["A", "B", "C"])}[kind]
    prepared = model.prepare(render_prompt(model, "Answer in one word.", enable_thinking=False))
    matcher = AnswerMatcher(constraint, model.tokenizer, model.eos_ids, start="now", prefix=False)
    gen = generate(model.prefill(prepared), Decoding(max_new_tokens=40, temperature=temperature),
                   eos_ids=model.eos_ids, max_context=model.max_context, rng=np.random.default_rng(seed),
                   answer=matcher)
    tokens = []
    while True:
        try:
            tokens.append(next(gen))
        except StopIteration as done:
            generation = done.value
            break
    text = model.tokenizer.decode(tokens).strip()
    if generation.stop_reason == "constraint":
        return
    assert generation.stop_reason == "eos"
    if kind == "schema":
        jsonschema.validate(json.loads(text), SCHEMA)
    else:
        assert re.fullmatch(REGEX if kind == "regex" else "[ABC]", text), text


@settings(max_examples=150, deadline=None)
@given(text=st.one_of(st.text(max_size=60), st.from_regex(r"[a-z()|*+?\[\]{}\\/.^$0-9,-]{0,30}", fullmatch=True)),
       as_schema=st.booleans())
def test_any_user_text_as_a_constraint_is_accepted_or_a_one_line_usage_error(text, as_schema):
    """Property: whatever a caller passes as a regex or a schema, it compiles or is refused in one line."""
    try:
        c = Constraint.json_schema(text) if as_schema else Constraint.regex(text)
    except UsageError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert c.grammar("Answer: ").startswith("start:")


@settings(max_examples=80, deadline=None)
@given(schema=st.recursive(st.sampled_from([{"type": t} for t in ("integer", "string", "boolean", "null", "nope")]),
                           lambda inner: st.one_of(
                               st.builds(lambda p: {"type": "object", "properties": p},
                                         st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                               st.builds(lambda i: {"type": "array", "items": i}, inner)), max_leaves=6),
       guidance=st.one_of(st.none(), st.dictionaries(st.sampled_from(["whitespace_flexible", "lenient", "nope"]),
                                                     st.one_of(st.booleans(), st.text(max_size=3)), max_size=2),
                          st.lists(st.integers(), max_size=2), st.text(max_size=3), st.integers()),
       odd=st.sampled_from([None, float("nan"), {1, 2}, object()]))
def test_any_schema_object_is_accepted_or_a_one_line_usage_error(schema, guidance, odd):
    """Property: whatever a caller puts in a schema (llguidance's x-guidance options of any type, values JSON
    cannot hold: NaN, a set, an object), it compiles or is refused in one line."""
    if guidance is not None:
        schema = {**schema, "x-guidance": guidance}
    if odd is not None:
        schema = {**schema, "default": odd}
    try:
        Constraint.json_schema(schema)
    except UsageError as e:
        assert "\n" not in str(e)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=6), other=st.text(max_size=12))
def test_any_list_of_choices_takes_each_option_whole_and_nothing_else(torch_models, options, other):
    """Property: whatever strings a caller lists (regex syntax, slashes, quotes, newlines, emoji, blanks
    around them), each option's tokens (without its surrounding blanks) make a complete answer, which reads as
    the caller's own option, and a string that is not an option does not."""
    try:
        constraint = Constraint.choice(options)
    except UsageError as e:
        assert "\n" not in str(e) and any(not o.strip() for o in options)
        return
    model = torch_models("qwen3")
    tokenizer = model.tokenizer

    def complete(text: str) -> bool:
        matcher = AnswerMatcher(constraint, tokenizer, model.eos_ids, start="now", prefix=False,
                                remember=False)._synced()
        ids = tokenizer.encode_prompt(Prompt.literal(text))  # as written ("<|im_start|>" is text here)
        return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()

    for option in options:
        assert complete(option.strip()), option
        assert constraint.answer(option.strip()) == next(o for o in options if o.strip() == option.strip())
    if other and other not in {o.strip() for o in options} and other.lstrip(" \t\n") == other:
        assert not complete(other), other


def test_thousands_of_choices_are_one_lexeme_within_llguidance_limits(torch_models):
    """A list of options compiles to one regex lexeme: 20,000 options (a rule of one alternative each stops
    llguidance's parser at 2,000 items a row) still give a finished answer from the list."""
    model = torch_models("qwen3")
    options = [f"item {i}" for i in range(20_000)]
    matcher = AnswerMatcher(Constraint.choice(options), model.tokenizer, model.eos_ids, start="now", prefix=False)
    rng = np.random.default_rng(0)
    tokens = []
    for _ in range(12):
        token = matcher.choose(rng.normal(size=model.tokenizer.vocab_size).astype(np.float32) * 3,
                               Decoding(1, temperature=1.0), rng, 100)
        assert token is not None, matcher.error
        if token in model.eos_ids:
            break
        tokens.append(token)
    assert token in model.eos_ids and model.tokenizer.decode(tokens).strip() in options


def test_small_grammars_are_kept_built_and_large_ones_made_per_call(torch_models):
    """A server's clients may each send a grammar of up to a megabyte: those over KEPT_CHARS are compiled and
    built again per call (~100 MB each while in use), so the caches cannot hold dozens of them."""
    from edgevlm.constraints import KEPT_CHARS, _compile, _grammar, _vocabulary

    model = torch_models("qwen3")
    vocab = _vocabulary(model.tokenizer, frozenset(model.eos_ids))
    for options, kept in ((["left", "right"], True), ([f"option {i:06d}" for i in range(KEPT_CHARS // 10)], False)):
        constraint = Constraint.choice(options)
        grammar, parts = constraint.grammar(None), constraint.parts(None)
        assert (len(grammar) <= KEPT_CHARS) == kept
        compiled = _compile(grammar)
        assert (_compile(grammar) is compiled) == kept
        assert (_grammar(vocab, parts, compiled) is _grammar(vocab, parts, compiled)) == kept


# 3,000 optional keys: llguidance's parser stops past 2,000 items in a row once the answer opens a key
WIDE = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(3000)}}


def test_an_answer_past_llguidance_limits_ends_with_the_reason_and_never_an_eos(torch_models):
    """llguidance's matcher in its error state allows only EOS, which would end the answer unfinished as if it
    were complete: the answer instead goes no further (None: stop reason "constraint"), saying why."""
    model = torch_models("qwen3")
    tokenizer, size = model.tokenizer, model.tokenizer.vocab_size
    eos = min(model.eos_ids)
    for remember in (False, True):
        for speculate in (True, False):
            matcher = AnswerMatcher(Constraint.json_schema(WIDE), tokenizer, model.eos_ids, start="now",
                                    prefix=False, speculate=speculate, remember=remember)
            chosen = []
            for token in [*tokenizer.encode('{"k1":1}', add_special_tokens=False), eos]:
                logits = _one_hot(size, token)
                logits[eos] = 0.5  # the next best, everywhere
                out = matcher.choose(logits, Decoding(1), np.random.default_rng(0), 100)
                if out is None:
                    break
                chosen.append(out)
            assert out is None and not model.eos_ids & set(chosen), (remember, speculate, chosen)
            assert "items" in matcher.error and "\n" not in matcher.error and not matcher.satisfied


def test_a_pipeline_answer_past_llguidance_limits_is_no_answer_with_a_note(pipelines, bundle_pipe):
    """Any of 2,500 objects: llguidance's parser passes its row limit as soon as the answer starts, whatever
    the model samples."""
    schema = {"anyOf": [{"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]}
                        for i in range(2500)]}
    for backend, pipe in _pipes(pipelines, bundle_pipe).items():
        r = pipe(random_image(seed=6), "Describe it as JSON", schema=schema, think=False, seed=1, temperature=1.0,
                 **BUDGET)
        assert r.stages["think"].stop_reason == "constraint" and r.answer == "" and r.answer_json is None
        assert any("past llguidance's limits (Parser Error: Current row has" in n for n in r.notes), (backend, r.notes)


def test_one_of_keeps_the_question_open_and_the_answer_in_the_list(pipelines, bundle_pipe):
    for backend, pipe in _pipes(pipelines, bundle_pipe).items():
        listed = ["left side ", "right", "none at all"]  # an option with a blank after it is answered as written
        r = pipe(random_image(seed=5), "Which side?", one_of=listed, seed=5, temperature=1.0, **BUDGET)
        assert not r.multiple_choice
        assert r.stages["think"].stop_reason == "constraint" or r.answer in listed, backend
        # a multiple-choice question asked for a listed answer instead of a letter gets that answer
        mc = pipe(random_image(seed=5), "Which side?", choices=["left", "right"], one_of=["left side", "right"],
                  seed=5, temperature=1.0, **BUDGET)
        assert mc.stages["think"].stop_reason == "constraint" or (
            mc.answer in ("left side", "right") and not any("not one of the options" in n for n in mc.notes)), backend
    with pytest.raises(UsageError, match="one constraint"):
        pipe(random_image(), "q", one_of=["a"], regex="a")
    with pytest.raises(UsageError, match="one_of must be a non-empty list"):
        pipe(random_image(), "q", one_of="abc")


@pytest.fixture(scope="module")
def demo_pipes(tmp_path_factory):
    """The shipped demo models on both backends (the bundle exported here, fp32)."""
    from edgevlm import demo
    from edgevlm.export.exporter import export_bundle

    if not demo.available():
        pytest.skip("this checkout has no demo models")
    path = export_bundle(tmp_path_factory.mktemp("demo") / "fp32", preset="demo", fidelity_samples=0,
                         log=lambda m: None)
    return {"torch": Pipeline.from_pretrained(preset="demo"), "onnxruntime": Pipeline.from_bundle(str(path))}


def test_on_the_demo_models_constraints_validate_and_keep_a_right_free_answer(demo_pipes):
    """The demo answers its README example right; constrained to the shapes (regex), to a list, or to a
    schema, it gives the same answer on both backends (greedy), and the outputs validate."""
    from edgevlm import demo

    label = json.loads(demo.EXAMPLE_LABEL.read_text())
    schema = {"type": "object", "properties": {"shape": {"enum": ["circle", "square", "triangle"]}},
              "required": ["shape"], "additionalProperties": False}
    for backend, pipe in demo_pipes.items():
        ask = dict(temperature=0.0)
        free = pipe(demo.EXAMPLE, label["question"], **ask)
        assert free.answer == label["answer"], backend
        regex = pipe(demo.EXAMPLE, label["question"], regex="(circle|square|triangle)", **ask)
        listed = pipe(demo.EXAMPLE, label["question"], one_of=["circle", "square", "triangle"], **ask)
        shaped = pipe(demo.EXAMPLE, label["question"], schema=schema, **ask)
        assert regex.answer == listed.answer == free.answer, backend
        jsonschema.validate(shaped.answer_json, schema)
        assert shaped.answer_json["shape"] == free.answer, backend


def test_a_reasoner_without_think_tokens_is_constrained_from_its_answer_marker(tiny_dir):
    """A plain-text reasoner (one without </think>) reasons freely until it writes "Answer:", then is
    constrained; one that never writes it is made to answer when only the answer's share of tokens is left."""
    from edgevlm.backends.torch_ref import TorchModel
    from edgevlm.constraints import ANSWER_RESERVE
    from edgevlm.families import reasoner_family

    llama = TorchModel(tiny_dir("llama"), reasoner_family(tiny_dir("llama")))
    greedy, rng = Decoding(max_new_tokens=1), np.random.default_rng(0)

    def write(matcher, text):  # the model writing `text`, token by token, far from the end of its budget
        for token in llama.tokenizer.encode(text):
            logits = np.zeros(llama.tokenizer.vocab_size, np.float32)
            logits[token] = 1.0
            assert matcher.choose(logits, greedy, rng, remaining=1000) == token

    matcher = AnswerMatcher(Constraint.regex(REGEX), llama.tokenizer, llama.eos_ids, start="marker")
    write(matcher, "The shapes are on the left. So the")
    assert not matcher.active
    write(matcher, " Answer:")
    assert matcher.active and not matcher.satisfied
    late = AnswerMatcher(Constraint.regex(REGEX), llama.tokenizer, llama.eos_ids, start="marker")
    logits = np.zeros(llama.tokenizer.vocab_size, np.float32)
    late.choose(logits, greedy, rng, ANSWER_RESERVE + 1)
    assert not late.active
    late.choose(logits, greedy, rng, ANSWER_RESERVE)
    assert late.active
    # the real model, reasoning freely for its first 16 of 80 tokens, then made to answer
    from edgevlm.constraints import answer_text
    from edgevlm.pipeline import render_prompt

    state = llama.prefill(llama.prepare(render_prompt(llama, "Which side? Reason, then answer.")))
    forced = AnswerMatcher(Constraint.regex(REGEX), llama.tokenizer, llama.eos_ids, start="marker")
    gen = generate(state, Decoding(max_new_tokens=ANSWER_RESERVE + 16, temperature=1.0), eos_ids=llama.eos_ids,
                   max_context=llama.max_context, rng=np.random.default_rng(6), answer=forced)
    tokens = list(gen)
    text = llama.tokenizer.decode(tokens)
    assert forced.active and "\nAnswer: " in text
    assert not forced.satisfied or re.fullmatch(REGEX, answer_text(text, prefix=True)), text


# ---------------------------------------------------------------- speculate, then check
CONSTRAINTS = {"schema": lambda: Constraint.json_schema(SCHEMA), "regex": lambda: Constraint.regex(REGEX),
               "words": lambda: Constraint.regex(r"[a-z]+( [a-z]+)*"),
               "choice": lambda: Constraint.choice(["left", "right", "none at all"])}


def _validates(kind: str, text: str) -> bool:
    if kind == "schema":
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    pattern = {"regex": REGEX, "words": r"[a-z]+( [a-z]+)*", "choice": "left|right|none at all"}[kind]
    return re.fullmatch(pattern, text) is not None




@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31), kind=st.sampled_from(sorted(CONSTRAINTS)),
       backend=st.sampled_from(["torch", "onnxruntime"]), boost=st.floats(0.0, 1.0))
def test_speculation_chooses_the_tokens_masking_does_and_the_answers_validate(torch_models, bundle_pipe, seed, kind,
                                                                             backend, boost):
    """Property: for random logits (where an allowed token is on top in a `boost` share of the steps, an EOS in
    some), greedy speculate-then-check picks exactly the tokens mask-then-sample does, computes no mask when the
    top token is allowed, and a finished answer validates."""
    model = torch_models("qwen3") if backend == "torch" else bundle_pipe.reasoner
    tokenizer, eos = model.tokenizer, model.eos_ids
    size = tokenizer.vocab_size
    spec = AnswerMatcher(CONSTRAINTS[kind](), tokenizer, eos, start="now", prefix=False)
    ref = AnswerMatcher(CONSTRAINTS[kind](), tokenizer, eos, start="now", prefix=False, speculate=False,
                        remember=False)
    rng, greedy, tokens = np.random.default_rng(seed), Decoding(max_new_tokens=1), []
    for _ in range(40):
        logits, allowed = rng.normal(size=size).astype(np.float32), ref.allowed(size)
        if rng.random() < boost:
            logits[rng.choice(allowed)] += 50.0
        elif rng.random() < 0.2:
            logits[min(eos)] += 50.0
        masked = spec.masked
        token = ref.choose(logits, greedy, rng, 100)
        assert spec.choose(logits, greedy, rng, 100) == token
        assert spec.masked == masked + (int(np.argmax(logits)) not in allowed)
        if token is None or token in eos:
            break
        tokens.append(token)
    event(f"{kind}: {'finished' if token in eos else 'unfinished'}, {'some' if spec.masked else 'no'} masks")
    if token in eos:
        assert spec.satisfied and _validates(kind, tokenizer.decode(tokens).strip()), tokenizer.decode(tokens)


def test_where_the_grammar_forces_bytes_speculation_takes_the_canonical_token_as_the_mask_does(torch_models):
    """In `{"c` the schema forces "ount": llguidance's try takes "o" (a valid split), its mask only "ou" (the
    canonical tokenization's first token). A model that prefers "o" gets "ou" either way (hypothesis found
    speculation taking "o")."""
    model = torch_models("qwen3")
    tokenizer, size = model.tokenizer, model.tokenizer.vocab_size
    (o,), (ou,) = tokenizer.encode("o"), tokenizer.encode("ou")
    picks = []
    for speculate in (True, False):
        matcher = AnswerMatcher(Constraint.json_schema(SCHEMA), tokenizer, model.eos_ids, start="now",
                                prefix=False, speculate=speculate, remember=False)
        for token in tokenizer.encode('{"c'):
            assert matcher.choose(_one_hot(size, token), Decoding(1), np.random.default_rng(0), 100) == token
        logits = np.zeros(size, np.float32)
        logits[o], logits[ou] = 2.0, 1.0
        picks.append(matcher.choose(logits, Decoding(1), np.random.default_rng(0), 100))
    assert picks == [ou, ou]


@pytest.mark.parametrize("decoding", [Decoding(1, temperature=1.0), Decoding(1, temperature=0.7, top_p=0.8, top_k=20)])
def test_sampled_speculation_draws_from_the_masked_distribution(torch_models, decoding):
    """Temperature alone: a refused draw is redrawn from the mask (rejection sampling), so the first token's
    frequencies match masking's. With top-k/top-p: the mask is skipped only for a certain single-token nucleus."""
    model = torch_models("qwen3")
    size = model.tokenizer.vocab_size
    logits = np.random.default_rng(0).normal(size=size).astype(np.float32) * 2
    fresh = lambda speculate: AnswerMatcher(Constraint.regex(r"[a-z]+"), model.tokenizer, model.eos_ids,  # noqa: E731
                                            start="now", prefix=False, speculate=speculate, remember=False)
    allowed = fresh(False).allowed(size)
    logits[allowed[:3]] += 3.0  # three allowed tokens share most of the masked mass, refused ones most of the rest
    logits[np.setdiff1d(np.argsort(logits)[-40:], allowed)[:20]] += 4.0
    draws = {s: [fresh(s).choose(logits, decoding, rng, 100) for rng in [np.random.default_rng(1)] for _ in range(3000)]
             for s in (True, False)}
    assert set(draws[True]) <= set(allowed.tolist())
    for token in allowed[:3]:
        share = [np.mean(np.equal(draws[s], token)) for s in (True, False)]
        assert abs(share[0] - share[1]) < 0.05, (token, share)
    # a nucleus of one allowed token: no mask; of more: masked, as the reference
    certain = np.zeros(size, np.float32)
    certain[allowed[0]] = 30.0
    spec = fresh(True)
    assert spec.choose(certain, decoding, np.random.default_rng(2), 100) == allowed[0] and spec.masked == 0
    if decoding.top_p < 1.0:
        spec = fresh(True)
        spec.choose(logits, decoding, np.random.default_rng(2), 100)
        assert spec.masked == 1


def test_a_refused_draw_far_above_every_allowed_token_is_redrawn_from_the_allowed_logits(torch_models):
    """The redraw reuses the refused draw's weights, unless the allowed tokens' weights have all but vanished
    beside the refused best (float underflow): then it samples the allowed logits afresh, still exactly."""
    model = torch_models("qwen3")
    size = model.tokenizer.vocab_size
    matcher = lambda: AnswerMatcher(Constraint.regex(r"[a-z]+"), model.tokenizer, model.eos_ids,  # noqa: E731
                                    start="now", prefix=False, remember=False)
    allowed = matcher().allowed(size)
    refused = int(np.setdiff1d(np.arange(size), allowed)[0])
    logits = np.full(size, -1e4, np.float32)
    logits[allowed[:2]] = 0.0, 1.0
    logits[refused] = 800.0  # the first draw takes it; the allowed weights (exp(-800): 0 even in float64) vanish
    rng = np.random.default_rng(3)
    draws = [matcher().choose(logits, Decoding(1, temperature=1.0), rng, 100) for _ in range(2000)]
    assert set(draws) == set(allowed[:2].tolist())
    assert abs(np.mean(np.equal(draws, allowed[1])) - 1 / (1 + np.exp(-1.0))) < 0.04


def test_a_complete_answer_takes_eos_without_a_mask(torch_models):
    """A finished choice stops the matcher (llguidance's try refuses EOS then, its mask allows it): the EOS the
    model picks is taken, as the mask would, and a refused one is masked away."""
    model = torch_models("qwen3")
    tokenizer, eos, size = model.tokenizer, min(model.eos_ids), model.tokenizer.vocab_size
    greedy, rng = Decoding(1), np.random.default_rng(0)
    for speculate in (True, False):
        matcher = AnswerMatcher(Constraint.choice(["left", "right"]), tokenizer, model.eos_ids, start="now",
                                prefix=False, speculate=speculate)
        early = np.zeros(size, np.float32)
        early[eos] = 9.0
        early[tokenizer.encode("left")[0]] = 1.0
        assert matcher.choose(early, greedy, rng, 100) == tokenizer.encode("left")[0]  # EOS refused: not done
        for token in tokenizer.encode("left")[1:]:
            one_hot = np.zeros(size, np.float32)
            one_hot[token] = 1.0
            assert matcher.choose(one_hot, greedy, rng, 100) == token
        masked = matcher.masked
        assert matcher.satisfied and matcher.choose(early, greedy, rng, 100) == eos
        assert matcher.masked == masked + (not speculate)


@pytest.mark.parametrize("kind", sorted(CONSTRAINTS))
def test_speculation_and_masking_generate_the_same_greedy_answers_on_both_backends(torch_models, bundle_pipe, kind):
    from edgevlm.pipeline import render_prompt

    for model in (torch_models("qwen3"), bundle_pipe.reasoner):
        prompt = model.prepare(render_prompt(model, "Which side?", enable_thinking=False))
        runs = []
        for speculate in (True, False):
            matcher = AnswerMatcher(CONSTRAINTS[kind](), model.tokenizer, model.eos_ids, start="now", prefix=False,
                                    speculate=speculate, remember=speculate)
            runs.append(_generated(generate(model.prefill(prompt), Decoding(max_new_tokens=24),
                                            eos_ids=model.eos_ids, max_context=model.max_context,
                                            rng=np.random.default_rng(0), answer=matcher)))
        assert runs[0] == runs[1], (kind, model)


def _generated(gen):
    tokens = []
    while True:
        try:
            tokens.append(next(gen))
        except StopIteration as done:
            return tokens, done.value.stop_reason


# ---------------------------------------------------------------- remembered states
def _one_hot(size: int, token: int) -> np.ndarray:
    logits = np.zeros(size, np.float32)
    logits[token] = 1.0
    return logits


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31), kind=st.sampled_from(sorted(CONSTRAINTS)),
       backend=st.sampled_from(["torch", "onnxruntime"]), temperature=st.sampled_from([0.0, 1.0]),
       drift=st.floats(0.0, 1.0))
def test_remembered_masks_choose_only_what_llguidance_allows(torch_models, bundle_pipe, seed, kind, backend,
                                                            temperature, drift):
    """Property: answers in a row sharing their grammar's remembered states (the logits of each step repeat
    from one answer to the next but for a `drift` share of steps, so later answers walk paths earlier ones
    took) choose only tokens llguidance allows, step by step: under greedy decoding the token the reference
    (masking every step, remembering nothing) picks; sampled from a remembered mask, the reference's very draw.
    Their `satisfied` agrees with the reference's, and a finished answer validates."""
    model = torch_models("qwen3") if backend == "torch" else bundle_pipe.reasoner
    tokenizer, eos = model.tokenizer, model.eos_ids
    size, decoding, greedy = tokenizer.vocab_size, Decoding(1, temperature=temperature), Decoding(1)
    rng, remembered = np.random.default_rng(seed), 0
    for _ in range(4):
        mem = AnswerMatcher(CONSTRAINTS[kind](), tokenizer, eos, start="now", prefix=False)
        ref = AnswerMatcher(CONSTRAINTS[kind](), tokenizer, eos, start="now", prefix=False, speculate=False,
                            remember=False)
        tokens, token = [], None
        for step in range(40):
            logits = np.random.default_rng([seed, step]).normal(size=size).astype(np.float32) * 4
            if rng.random() < drift:
                logits += rng.normal(size=size).astype(np.float32) * 4
            known = mem.node.ids is not None
            remembered += known
            token = mem.choose(logits, decoding, np.random.default_rng([seed, step, 1]), 100)
            if temperature <= 0 or known:
                assert token == ref.choose(logits, decoding, np.random.default_rng([seed, step, 1]), 100)
            else:  # drawn speculatively: allowed, and the reference takes it
                assert token is None or ref.choose(_one_hot(size, token), greedy, rng, 100) == token
            if token is None or token in eos:
                break
            tokens.append(token)
        assert mem.satisfied == ref.satisfied
        if token in eos:
            assert _validates(kind, tokenizer.decode(tokens).strip()), tokenizer.decode(tokens)
    event(f"{kind}: {'some' if remembered else 'no'} remembered masks")


def test_an_answer_along_a_remembered_path_asks_llguidance_nothing(bundle_pipe):
    """The second answer of a grammar, down the path the first took, uses the first's masks and never copies
    llguidance's matcher; the same tokens come out, and it is complete when asked."""
    model = bundle_pipe.reasoner
    size, eos = model.tokenizer.vocab_size, model.eos_ids
    steps = [np.random.default_rng([7, i]).normal(size=size).astype(np.float32) for i in range(12)]
    constraint = Constraint.choice(["left", "right", "none at all", "a path remembered"])  # a grammar of its own
    runs = []
    for _ in range(2):
        matcher = AnswerMatcher(constraint, model.tokenizer, eos, start="now", prefix=False)
        tokens = []
        for logits in steps:
            tokens.append(matcher.choose(logits, Decoding(1), np.random.default_rng(0), 100))
            if tokens[-1] in eos:
                break
        runs.append((tokens, matcher.masked, matcher.computed, matcher.matcher))
        assert matcher.satisfied
    (first, masked, computed, _), (second, masked_again, computed_again, copied) = runs
    assert first == second and first[-1] in eos
    assert computed == masked > 0 and masked_again == masked
    assert computed_again == 0 and copied is None


def test_answers_of_other_words_reuse_the_masks_of_a_regex_state():
    """A regex's states are what is left to match, whatever text reached them: once answers have been through
    each state twice (the second visit computes its mask), an answer of words never seen before asks
    llguidance nothing, and takes the tokens the reference (masking every step) takes."""
    from edgevlm.demo import REASONER
    from edgevlm.tokenizer import Tokenizer

    tokenizer, eos = Tokenizer(REASONER), {0, 2}
    constraint = Constraint.regex(r"[a-z]( [a-z])*\.")  # a grammar of its own
    size = tokenizer.vocab_size
    ids = {c: tokenizer.encode(c) for c in "abc. "}
    assert all(len(v) == 1 for v in ids.values())
    for text in ("a b c.", "c a b.", "b c a."):
        matcher = AnswerMatcher(constraint, tokenizer, eos, start="now", prefix=False)
        ref = AnswerMatcher(constraint, tokenizer, eos, start="now", prefix=False, speculate=False, remember=False)
        for want in [ids[c][0] for c in text] + [2]:
            logits = _one_hot(size, want)
            assert matcher.choose(logits, Decoding(1), np.random.default_rng(0), 100) == want
            assert ref.choose(logits, Decoding(1), np.random.default_rng(0), 100) == want
    assert matcher.computed == 0 and matcher.matcher is None
    # before the answer, after its first letter, after a blank, after a later letter, after the stop
    assert len(matcher.grammar.keyed) == 5


@pytest.mark.parametrize("constraint", [
    Constraint.regex(r"[a-z]+( [a-z]+)* bounded"),  # states keyed by the answer's text (a graph)
    Constraint.json_schema({"type": "object", "properties": {"bounded": {"type": "string"}}}),  # a trie of tokens
], ids=["regex", "json"])
def test_remembered_states_and_masks_stay_within_their_bounds(bundle_pipe, monkeypatch, constraint):
    """Past MAX_NODES states, MAX_EDGES tokens between them or MAX_MASK_BYTES of masks a grammar remembers
    nothing more (an answer's new states are its own), and its answers still choose only allowed tokens."""
    from edgevlm import constraints

    model = bundle_pipe.reasoner
    size, eos = model.tokenizer.vocab_size, model.eos_ids
    most = 3 * ((size + 31) // 32 * 4 + 4 * size)  # room for three masks of any size, not for all
    monkeypatch.setattr(constraints._Grammar, "MAX_NODES", 12)
    monkeypatch.setattr(constraints._Grammar, "MAX_EDGES", 20)
    monkeypatch.setattr(constraints._Grammar, "MAX_MASK_BYTES", most)
    for seed in range(10):
        matcher = AnswerMatcher(constraint, model.tokenizer, eos, start="now", prefix=False)
        ref = AnswerMatcher(constraint, model.tokenizer, eos, start="now", prefix=False, speculate=False,
                            remember=False)
        rng = np.random.default_rng(seed)
        for _ in range(30):
            token = matcher.choose(rng.normal(size=size).astype(np.float32) * 3, Decoding(1, temperature=1.0), rng,
                                   100)
            if token is None:
                break
            assert ref.choose(_one_hot(size, token), Decoding(1), rng, 100) == token
            if token in eos:
                break
    grammar, seen, stack, edges = matcher.grammar, {}, [matcher.grammar.root], 0
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen[id(node)] = node
            edges += len(node.children)
            stack.extend(node.children.values())
    assert all(node.shared for node in seen.values())
    assert len(seen) == grammar.nodes <= 12 and edges == grammar.edges <= 20
    assert grammar.nodes == 12 or grammar.edges == 20  # a bound was reached
    held = sum(node.bits.nbytes + node.ids.nbytes for node in seen.values() if node.ids is not None)
    assert held == grammar.mask_bytes and 0 < held <= most


@pytest.mark.parametrize("constraint", [
    Constraint.json_schema({**SCHEMA, "title": "threads"}),  # a grammar of its own: a trie
    Constraint.regex(r"[a-z]+( [a-z]+)* threads"),  # states keyed by the answer's text
], ids=["json", "regex"])
def test_answers_on_several_threads_share_remembered_states_safely(bundle_pipe, constraint):
    """Generations on four threads at once, down overlapping paths of one grammar, choose what each would
    alone with nothing remembered."""
    from concurrent.futures import ThreadPoolExecutor

    model = bundle_pipe.reasoner
    size, eos = model.tokenizer.vocab_size, model.eos_ids

    def answer(seed: int, remember: bool) -> list[int]:
        matcher = AnswerMatcher(constraint, model.tokenizer, eos, start="now", prefix=False, remember=remember)
        tokens = []
        for step in range(30):
            logits = np.random.default_rng([seed % 3, step]).normal(size=size).astype(np.float32)
            logits[np.random.default_rng([seed, step]).integers(size)] += 2.0 * (seed % 2)
            tokens.append(matcher.choose(logits, Decoding(1), np.random.default_rng(0), 100))
            if tokens[-1] is None or tokens[-1] in eos:
                break
        return tokens

    expected = [answer(seed, False) for seed in range(12)]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert list(pool.map(answer, range(12), [True] * 12)) == expected
