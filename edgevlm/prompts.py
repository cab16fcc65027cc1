"""Every prompt string and decoding default of the Extract->Think method, in one place.

The strings are the interface the released models were trained and evaluated
with (arXiv 2511.17487 and its public code), so they are reproduced as data,
character for character. Where the paper only covers multiple-choice questions,
the open-question variants are ours and marked so.
"""

from __future__ import annotations

import re

from edgevlm.generation import Decoding

# ---------------------------------------------------------------- 1. plan
PLANNER_TASK = (
    "Your task is to give a concise instruction about what basic elements are needed to be described "
    "based on the given question. Ensure that your instructions do not cover the raw question, options "
    "or thought process of answering the question."
)
PLANNER_EXAMPLES = (
    ("In which period the number of full time employees is the maximum?", "the number of full time employees"),
    ("What is the value of the smallest bar?", "the heights of all bars and their values"),
    ("What is the main subject of the image?", "the central theme or object"),
    ("What is the position of the catcher relative to the home plate?", "the spatial arrangement of the objects"),
    (
        "What is the expected ratio of offspring with white spots to offspring with solid coloring? "
        "Choose the most likely ratio.",
        "the genetic information",
    ),
)
PLANNER_ANSWER_TAG = "Contents to observe:"
# The constant part of every planner prompt: the obvious prefix-cache target.
PLANNER_PREFIX = (
    PLANNER_TASK
    + "\nExamples:\n"
    + "".join(f"Question: {q}\n{PLANNER_ANSWER_TAG} {a}\n" for q, a in PLANNER_EXAMPLES)
    + f'Now, perform the task, and format your answer as "{PLANNER_ANSWER_TAG}"\n'
)
# Used when the planner returns nothing usable (ours).
FALLBACK_INSTRUCTION = "the objects, their attributes and positions, and any text in the image"
MAX_INSTRUCTION_CHARS = 300


def planner_prompt(question: str) -> str:
    return f"{PLANNER_PREFIX}Question: {question}"


def parse_instruction(text: str) -> str:
    """The planner's answer after "Contents to observe:": its first non-empty line, used as is."""
    if PLANNER_ANSWER_TAG.lower() in text.lower():
        text = text[text.lower().rindex(PLANNER_ANSWER_TAG.lower()) + len(PLANNER_ANSWER_TAG):]
    lines = [ln.strip().strip('"').strip() for ln in text.strip().splitlines()]
    instruction = next((ln for ln in lines if ln), "")[:MAX_INSTRUCTION_CHARS].strip()
    return instruction or FALLBACK_INSTRUCTION


# ---------------------------------------------------------------- 2. extract
EXTRACT_PREFIX = (
    "Describe the fine-grained content of the image, including scenes, objects, relationships, "
    "instance location, and any text present. Especially, pay attention to "
)


def extract_prompt(instruction: str) -> str:
    """The perception prompt; a final "." is added when missing, as the paper does."""
    prompt = EXTRACT_PREFIX + instruction
    return prompt if prompt.endswith(".") else prompt + "."


# The LLaVA-NeXT `qwen_1_5` conversation the released extractors were trained with.
QWEN_1_5_SYSTEM = "You are a helpful assistant."

# ---------------------------------------------------------------- 3. think
REASONER_ROLE = (
    "You are an excellent text-based reasoning expert. You are required to answer the question based on "
    "the detailed description of the image.\n\n"
)
POST_THINK_CHOICE = (
    '\nPlease reason step by step, and give the final answer on the last line by itself in the format of '
    '"Answer:". Do not add anything other than the letter answer after "Answer:".'
)
POST_DIRECT_CHOICE = (
    "\nAnswer directly with the option's letter in the format of \"Answer:\". Do not add anything other "
    'than the letter answer after "Answer:".'
)
# Open questions (ours): the same instructions without the letter-only sentence.
POST_THINK_OPEN = (
    '\nPlease reason step by step, and give the final answer on the last line by itself in the format of '
    '"Answer:".'
)
POST_DIRECT_OPEN = '\nAnswer directly and concisely in the format of "Answer:".'


def reasoner_prompt(description: str, question: str, *, multiple_choice: bool, think: bool) -> str:
    if not question.lower().startswith(("question:", "hint:")):
        question = "Question: " + question
    if not description.endswith("\n"):
        description += "\n"
    if multiple_choice:
        post = POST_THINK_CHOICE if think else POST_DIRECT_CHOICE
    else:
        post = POST_THINK_OPEN if think else POST_DIRECT_OPEN
    return REASONER_ROLE + "Description: " + description + question + post


# ---------------------------------------------------------------- direct mode (the VLM answers alone)
# The usual LLaVA evaluation suffixes.
DIRECT_POST_CHOICE = "\nAnswer with the option's letter from the given choices directly."
DIRECT_POST_OPEN = "\nAnswer the question using a single word or phrase."


def direct_prompt(question: str, *, multiple_choice: bool) -> str:
    return question + (DIRECT_POST_CHOICE if multiple_choice else DIRECT_POST_OPEN)


# ---------------------------------------------------------------- questions and answers
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[\).:]\s+\S", re.MULTILINE)
_OPTIONS_INLINE = re.compile(r"\bOptions?\s*:\s*\(?A[\).:]", re.IGNORECASE)


def format_question(question: str, choices: list[str] | None = None) -> str:
    """Append lettered options the way MMStar writes them ("Options: A: x, B: y")."""
    question = question.strip()
    if not choices:
        return question
    if len(choices) > len(LETTERS):
        from edgevlm.errors import UsageError

        raise UsageError(f"at most {len(LETTERS)} choices are supported, got {len(choices)}")
    opts = ", ".join(f"{LETTERS[i]}: {c.strip()}" for i, c in enumerate(choices))
    return f"{question}\nOptions: {opts}"


def is_multiple_choice(question: str) -> bool:
    """Whether the question lists lettered options (A/B/...), inline or one per line."""
    if _OPTIONS_INLINE.search(question):
        return True
    letters = [m.group(1) for m in _OPTION_LINE.finditer(question)]
    return "A" in letters and "B" in letters


_INLINE_LETTER = re.compile(r"(?:^|[\s,;])\(?([A-Z])[\).:]\s")


def option_letters(question: str, choices: list[str] | None = None) -> str | None:
    """The letters a multiple-choice answer may take: one per choice given, else those the question's options
    list (inline after "Options:" or one per line); None when the question lists none."""
    if choices:
        return LETTERS[:len(choices)]
    letters = {m.group(1) for m in _OPTION_LINE.finditer(question)}
    inline = _OPTIONS_INLINE.search(question)
    if inline:
        letters |= {m.group(1) for m in _INLINE_LETTER.finditer(question[inline.start():].split(":", 1)[1])}
    return "".join(sorted(letters)) or None


_ANSWER = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
_LETTER = re.compile(r"^\(?([A-Z])\)?(?:[\s.:,)]|$)")


def parse_answer(response: str, *, multiple_choice: bool) -> str:
    """The paper's rule: regex `Answer\\s*:\\s*([^\\n]+)` on the last line, else the last line itself.

    Two additions for robustness: trailing blank lines are ignored, and when the last line has no
    "Answer:" the last "Answer:" anywhere is used. Multiple-choice answers are reduced to the letter.
    """
    lines = [ln for ln in response.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    match = _ANSWER.search(lines[-1])
    if match is None:
        matches = _ANSWER.findall(response)
        answer = matches[-1] if matches else lines[-1]
    else:
        answer = match.group(1)
    answer = answer.strip()
    if multiple_choice:
        letter = _LETTER.match(answer)
        if letter:
            return letter.group(1)
    return answer


# ---------------------------------------------------------------- decoding defaults
# top_k=20 comes from Qwen3's generation_config.json, which HF `generate` applied in the paper's runs
# alongside the temperature/top_p the paper sets.
THINK_BUDGET = 4096
ANSWER_BUDGET = 1024
PLAN = Decoding(max_new_tokens=64)
EXTRACT = Decoding(max_new_tokens=1024)
DIRECT = Decoding(max_new_tokens=1024)
# Thinking mode: the budget and NoWait bans are applied by generation.ThinkControl while thinking.
THINK = Decoding(max_new_tokens=THINK_BUDGET + ANSWER_BUDGET, temperature=0.6, top_p=0.95, top_k=20)
NO_THINK = Decoding(max_new_tokens=ANSWER_BUDGET, temperature=0.7, top_p=0.8, top_k=20)

# NoWait: tokens whose text is one of these words (case-insensitive, whole words) are banned while thinking.
REFLEXIVE_WORDS = (
    "wait", "alternatively", "hmm", "but", "however", "alternative", "another", "check", "double-check",
    "oh", "maybe", "verify", "other", "again", "now", "ah", "anyway", "anyhow",
)
