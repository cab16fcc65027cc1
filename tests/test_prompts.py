"""Prompt construction per stage, checked against the strings in PAPER.md; instruction and answer parsing."""

import pytest

from edgevlm import prompts

# Written out from PAPER.md / the paper's appendix, independently of edgevlm/prompts.py.
PAPER_EXTRACT = (
    "Describe the fine-grained content of the image, including scenes, objects, relationships, instance "
    "location, and any text present. Especially, pay attention to {instruction}"
)
PAPER_THINK = (
    "You are an excellent text-based reasoning expert. You are required to answer the question based on the "
    "detailed description of the image.\n\nDescription: {description}\nQuestion: {question}\nPlease reason step "
    'by step, and give the final answer on the last line by itself in the format of "Answer:". Do not add '
    'anything other than the letter answer after "Answer:".'
)
PAPER_NO_THINK = (
    "You are an excellent text-based reasoning expert. You are required to answer the question based on the "
    "detailed description of the image.\n\nDescription: {description}\nQuestion: {question}\nAnswer directly "
    "with the option's letter in the format of \"Answer:\". Do not add anything other than the letter answer "
    'after "Answer:".'
)


def test_extract_prompt_matches_paper_and_adds_final_period():
    assert prompts.extract_prompt("the dominant colors present in the scene") == PAPER_EXTRACT.format(
        instruction="the dominant colors present in the scene.")
    # an instruction that already ends in "." is used as is
    assert prompts.extract_prompt("the number of visible police officers in the image.") == PAPER_EXTRACT.format(
        instruction="the number of visible police officers in the image.")


def test_reasoner_prompt_with_thinking_matches_paper():
    q = "How many people are playing guitar in the image?\nOptions: A: One, B: Two, C: Three, D: Four"
    got = prompts.reasoner_prompt("Three guitarists on a stage.", q, multiple_choice=True, think=True)
    assert got == PAPER_THINK.format(description="Three guitarists on a stage.", question=q)


def test_reasoner_prompt_without_thinking_matches_paper():
    q = "What color is the car?\nOptions: A: red, B: blue"
    got = prompts.reasoner_prompt("A red car.\n", q, multiple_choice=True, think=False)
    assert got == PAPER_NO_THINK.format(description="A red car.", question=q)


def test_reasoner_prompt_keeps_existing_question_or_hint_prefix():
    got = prompts.reasoner_prompt("d", "Hint: look closely. Which?", multiple_choice=True, think=True)
    assert "\nHint: look closely. Which?\n" in got and "Question: Hint" not in got


def test_open_question_prompt_drops_the_letter_only_sentence():
    got = prompts.reasoner_prompt("d", "What is written on the sign?", multiple_choice=False, think=True)
    assert got.endswith('in the format of "Answer:".')
    assert "letter" not in got
    got = prompts.reasoner_prompt("d", "What is written on the sign?", multiple_choice=False, think=False)
    assert "letter" not in got and '"Answer:"' in got


def test_planner_prompt_has_task_five_examples_and_question_last():
    got = prompts.planner_prompt("What color is the softball?")
    assert got.startswith(
        "Your task is to give a concise instruction about what basic elements are needed to be described based "
        "on the given question. Ensure that your instructions do not cover the raw question, options or thought "
        "process of answering the question.")
    assert got.count("Contents to observe: ") == 5
    assert "Question: What is the position of the catcher relative to the home plate?\n" \
           "Contents to observe: the spatial arrangement of the objects\n" in got
    assert got.endswith('format your answer as "Contents to observe:"\nQuestion: What color is the softball?')
    # the few-shot block is a constant prefix (the prefix-cache target)
    assert got.startswith(prompts.PLANNER_PREFIX)
    assert prompts.planner_prompt("other").startswith(prompts.PLANNER_PREFIX)


@pytest.mark.parametrize("text, expected", [
    ("Contents to observe: the color of the softball", "the color of the softball"),
    ("  the number of cups on the table\nsome more text", "the number of cups on the table"),
    ('Sure.\nContents to observe: "the spatial arrangement of the objects"', "the spatial arrangement of the objects"),
    ("contents to observe:the text on the sign.", "the text on the sign."),
    ("", prompts.FALLBACK_INSTRUCTION),
    ("Contents to observe:   \n\n", prompts.FALLBACK_INSTRUCTION),
])
def test_instruction_parsing(text, expected):
    assert prompts.parse_instruction(text) == expected


@pytest.mark.parametrize("response, mc, expected", [
    ("The ball is yellow.\nAnswer: C", True, "C"),
    ("reasoning\nAnswer: (B)", True, "B"),
    ("reasoning\nAnswer:B. Two", True, "B"),
    ("Answer: D\n\n", True, "D"),  # trailing blank lines ignored
    ("answer : a red car", False, "a red car"),
    ("Answer: 42\nI am confident.", False, "42"),  # no Answer: on the last line: the last one anywhere
    ("no tag at all\nblue", False, "blue"),  # the paper's fallback: the last line itself
    ("", True, ""),
    ("Answer: Bus stop", True, "Bus stop"),  # not a letter: kept as text
])
def test_answer_parsing(response, mc, expected):
    assert prompts.parse_answer(response, multiple_choice=mc) == expected


def test_choices_are_formatted_like_mmstar_and_detected():
    q = prompts.format_question("What color is the car? ", ["red", "blue", "green"])
    assert q == "What color is the car?\nOptions: A: red, B: blue, C: green"
    assert prompts.is_multiple_choice(q)
    assert prompts.is_multiple_choice("Which?\nA. cat\nB. dog")
    assert prompts.is_multiple_choice("Which?\n(A) cat\n(B) dog")
    assert not prompts.is_multiple_choice("What is written on the sign?")
    assert not prompts.is_multiple_choice("Is A bigger than B?")


def test_decoding_defaults_follow_the_paper():
    assert prompts.EXTRACT.temperature == 0 and prompts.EXTRACT.max_new_tokens == 1024
    assert (prompts.THINK.temperature, prompts.THINK.top_p) == (0.6, 0.95)
    assert prompts.THINK_BUDGET == 4096 and prompts.THINK.max_new_tokens == 4096 + 1024
    assert prompts.THINK.top_k == 20 and prompts.NO_THINK.top_k == 20  # Qwen3's generation_config
    assert (prompts.NO_THINK.temperature, prompts.NO_THINK.top_p, prompts.NO_THINK.max_new_tokens) == (0.7, 0.8, 1024)
    assert set(prompts.REFLEXIVE_WORDS) == {
        "wait", "alternatively", "hmm", "but", "however", "alternative", "another", "check", "double-check", "oh",
        "maybe", "verify", "other", "again", "now", "ah", "anyway", "anyhow"}
