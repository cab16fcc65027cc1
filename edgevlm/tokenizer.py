"""Tokenization and chat templates without transformers: `tokenizers` + jinja2, rendered as HF renders them.

Text from users and text passed between stages is literal: a prompt is a `Prompt`, whose parts are either
control tokens the chat template (or a family's image expansion) wrote, or text that is tokenized without
matching any special or added token. The template itself never sees the caller's text: it renders once per
message shape with a placeholder in its place (in a child process, bounded in time and memory), and the
text is put in after.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import NamedTuple

from edgevlm.errors import ModelError

# Where the caller's text goes in the messages a chat template renders (private-use characters, which no
# template writes): the rendered text around it is the template's, the text put in its place is literal.
TEXT = "\ue000edgevlm-text\ue001"
# Bounds on rendering a chat template, which comes with the model (a bundle from a disk edgevlm does not
# control): real templates render in milliseconds to a few kilobytes. A child process renders it, since
# in-process checks cannot bound memory (a size is known only after the value is built, and one C call such
# as str.join is never interrupted); the child's address space is capped, the parent waits TEMPLATE_SECONDS.
TEMPLATE_SECONDS = 2.0  # wall time, the child's start included (~0.1 s)
TEMPLATE_MAX_CHARS = 1_000_000  # of the output
# Address space beyond the child's own interpreter and jinja2 (~26 MB on x86-64 Linux, CPython 3.11): real
# templates need well under 1 MB; a refused one costs the robot at most this, for well under TEMPLATE_SECONDS.
TEMPLATE_MEMORY_MB = 256
_WORKER = Path(__file__).with_name("chat_template_worker.py")
_MEMORY_EXIT = 3  # chat_template_worker.MEMORY_EXIT


class Part(NamedTuple):
    """A piece of a prompt: a control token (its id) or literal text (token_id None)."""

    text: str
    token_id: int | None = None


@dataclass(frozen=True)
class Prompt:
    """A prompt as the model reads it. `str(prompt)` is the text; only marker parts become control tokens."""

    parts: tuple[Part, ...]

    @classmethod
    def literal(cls, text: str) -> Prompt:
        return cls((Part(text),) if text else ())

    def __str__(self) -> str:
        return "".join(p.text for p in self.parts)

    def __add__(self, other: Prompt) -> Prompt:
        return Prompt(self.parts + other.parts)

    def expand(self, token_id: int, replacement: Prompt) -> Prompt:
        """The first control token `token_id` replaced by `replacement` (an image placeholder by its crops)."""
        for i, part in enumerate(self.parts):
            if part.token_id == token_id:
                return Prompt(self.parts[:i] + replacement.parts + self.parts[i + 1:])
        raise ModelError("the chat template put no image placeholder in the prompt")


def _render_chat_template(source: str, variables: dict) -> str:
    """`source` rendered with `variables` (plain JSON data) in a child process, bounded by TEMPLATE_SECONDS,
    TEMPLATE_MEMORY_MB and TEMPLATE_MAX_CHARS; any failure is a one-line ModelError. A template renders only a
    few times per model load (once per prompt shape), so the same source and variables render once a process."""
    request = json.dumps(variables)
    if "strftime_now" in source:  # the output holds today's date: a cached one would keep yesterday's
        return _render_in_child(source, request)
    return _render_cached(source, request)


@lru_cache(maxsize=256)
def _render_cached(source: str, variables_json: str) -> str:
    return _render_in_child(source, variables_json)


def _render_in_child(source: str, variables_json: str) -> str:
    request = json.dumps({"template": source, "variables": json.loads(variables_json),
                          "max_chars": TEMPLATE_MAX_CHARS, "memory_bytes": TEMPLATE_MEMORY_MB << 20,
                          "cpu_seconds": int(TEMPLATE_SECONDS) + 1})
    # -I: no PYTHON* variables, user site or script folder on the path; the worker imports only jinja2
    command = [sys.executable, "-I", str(_WORKER)]
    try:
        child = subprocess.run(command, input=request.encode(), capture_output=True, timeout=TEMPLATE_SECONDS)
    except subprocess.TimeoutExpired:
        raise ModelError(f"the model's chat template took more than {TEMPLATE_SECONDS:g} s; it is refused") from None
    except OSError as e:
        raise ModelError(f"the model's chat template cannot be rendered: cannot run {sys.executable}: {e}") from None
    if child.returncode == _MEMORY_EXIT:
        raise ModelError(f"the model's chat template needs more than {TEMPLATE_MEMORY_MB} MB; it is refused")
    if child.returncode == -getattr(signal, "SIGXCPU", 0):  # the worker's CPU-time backstop, should ours miss
        raise ModelError(f"the model's chat template took more than {TEMPLATE_SECONDS:g} s; it is refused")
    try:
        reply = json.loads(child.stdout) if child.returncode == 0 else {}
    except ValueError:
        reply = {}
    text, error = reply.get("text"), reply.get("error")
    if isinstance(text, str):  # the worker stops at TEMPLATE_MAX_CHARS, so what it writes is bounded
        if len(text) > TEMPLATE_MAX_CHARS:
            raise ModelError(f"the model's chat template writes more than {TEMPLATE_MAX_CHARS} characters")
        return text
    if isinstance(error, str) and error.strip():
        raise ModelError(f"the model's chat template {error.strip().splitlines()[0]}")
    # no reply: the worker was killed (by the OOM killer, say) or could not start (no jinja2 where it looks)
    if child.returncode < 0:
        why = f"was killed by signal {-child.returncode}"
    else:
        last = child.stderr.decode(errors="replace").strip().splitlines()[-1:]
        why = f"exited with status {child.returncode}" + (f": {last[0][:300]}" if last else "")
    raise ModelError(f"the model's chat template cannot be rendered: its renderer {why}")


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<|im_end|>", ...} in older tokenizer_config files
        return value.get("content")
    return value


class Tokenizer:
    """A model directory's tokenizer.json, special tokens and chat template."""

    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer as _Tokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise ModelError(f"{model_dir} has no tokenizer.json (a fast tokenizer is required)")
        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses on bad files
            raise ModelError(f"cannot load {path}: {e}") from None
        config_path = model_dir / "tokenizer_config.json"
        self.config = json.loads(config_path.read_text()) if config_path.exists() else {}
        self.chat_template = self._find_chat_template(model_dir)
        self.special_tokens = {
            name: _token_text(self.config.get(name))
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
            if _token_text(self.config.get(name))
        }

    def _find_chat_template(self, model_dir: Path) -> str | None:
        jinja = model_dir / "chat_template.jinja"
        if jinja.exists():
            return jinja.read_text()
        for name in ("chat_template.json", "processor_config.json"):
            path = model_dir / name
            if path.exists():
                template = json.loads(path.read_text()).get("chat_template")
                if template:
                    return template
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render messages to the prompt string, with the special tokens HF passes as template variables.
        The template runs in a child process, bounded (TEMPLATE_SECONDS, TEMPLATE_MEMORY_MB,
        TEMPLATE_MAX_CHARS); a failure is a ModelError. Messages and kwargs must be plain JSON data."""
        if not self.chat_template:
            raise ModelError("the model has no chat template; edgevlm needs an instruction-tuned (chat) model")
        variables = {"messages": messages, "add_generation_prompt": add_generation_prompt,
                     **self.special_tokens, **kwargs}
        return _render_chat_template(self.chat_template, variables)

    def render(self, messages: list[dict], text: str, **kwargs) -> Prompt:
        """The chat prompt of `messages`, which hold TEXT where `text` goes: the template's own output
        (control tokens live), with `text` literal in TEXT's place. The template runs once per message shape
        (each time, if it writes the date)."""
        key = json.dumps([messages, kwargs], sort_keys=True)
        skeleton = self._skeletons.get(key)
        if skeleton is None:
            rendered = self.apply_chat_template(messages, **kwargs)
            pieces = rendered.split(TEXT)
            if len(pieces) < 2:
                raise ModelError("the model's chat template does not write the prompt's text as given")
            skeleton = tuple(self.markers(piece) for piece in pieces)
            # a template that writes today's date renders each time (a robot runs for days); others once
            if "strftime_now" not in (self.chat_template or ""):
                self._skeletons[key] = skeleton
        literal = Prompt.literal(text)
        prompt = skeleton[0]
        for piece in skeleton[1:]:
            prompt = prompt + literal + piece
        return prompt

    @cached_property
    def _skeletons(self) -> dict[str, tuple[Prompt, ...]]:
        return {}

    @cached_property
    def _marker_ids(self) -> frozenset[int]:
        return frozenset(self._tok.get_added_tokens_decoder())

    @cached_property
    def _literal(self):
        """The same tokenizer without its added tokens: text encoded with it never becomes a control token."""
        from tokenizers import Tokenizer as _Tokenizer

        spec = json.loads(self._tok.to_str())
        spec["added_tokens"] = []
        return _Tokenizer.from_str(json.dumps(spec))

    def markers(self, text: str) -> Prompt:
        """Trusted text (a template's output, a family's image expansion) as a Prompt: its added tokens,
        found as the tokenizer itself finds them, become control tokens; the rest is text."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        parts, at = [], 0
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets, strict=True):
            if token_id in self._marker_ids:
                if start > at:
                    parts.append(Part(text[at:start]))
                parts.append(Part(text[start:end], token_id))
                at = end
        if at < len(text):
            parts.append(Part(text[at:]))
        return Prompt(tuple(parts))

    def encode_prompt(self, prompt: Prompt, add_special_tokens: bool = False) -> list[int]:
        """Token ids of a Prompt: its control tokens as they are, the text between two of them encoded as one
        piece without matching any added token (for ordinary text, the ids `encode` gives the joined string).
        `add_special_tokens` adds what the tokenizer's post-processor adds (a BOS), as VLM processors do."""
        ids, text = [], []

        def flush():
            if text:
                chunk = self._literal.encode("".join(text), add_special_tokens=False).ids
                leaked = self._marker_ids.intersection(chunk)
                if leaked:  # a vocabulary that merges plain text into a control token: never seen, never allowed
                    raise ModelError(f"text encodes to the control token {self.decode([min(leaked)], False)!r}")
                ids.extend(chunk)
                text.clear()

        for part in prompt.parts:
            if part.token_id is None:
                text.append(part.text)
            else:
                flush()
                ids.append(part.token_id)
        flush()
        if add_special_tokens:
            before, after = self._added_by_post_processor
            ids = before + ids + after
        return ids

    @cached_property
    def _added_by_post_processor(self) -> tuple[list[int], list[int]]:
        """The ids the post-processor puts before and after one sequence (a BOS, say)."""
        probe = self._literal.encode("a", add_special_tokens=False)
        full = self._tok.post_process(probe, add_special_tokens=True).ids
        at = next(i for i in range(len(full)) if full[i:i + len(probe.ids)] == probe.ids)
        return full[:at], full[at + len(probe.ids):]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of trusted `text`, its added tokens matched (as HF does); user text goes through
        `encode_prompt(Prompt.literal(text))`. Rendered chat prompts already hold their special tokens, so none
        are added by default (as HF's apply_chat_template)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """The tokenizer.json this tokenizer was loaded from (as `tokenizers` writes it)."""
        return self._tok.to_str()

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def eos_token_ids(self, model_dir: str | Path | None = None) -> set[int]:
        """The tokenizer's eos token plus the eos ids of the model's generation_config.json."""
        ids = set()
        eos = self.special_tokens.get("eos_token")
        if eos and self.token_id(eos) is not None:
            ids.add(self.token_id(eos))
        gen_path = Path(model_dir) / "generation_config.json" if model_dir else None
        if gen_path and gen_path.exists():
            value = json.loads(gen_path.read_text()).get("eos_token_id")
            ids.update(value if isinstance(value, list) else [value] if value is not None else [])
        return ids

    def ids_of_words(self, words: tuple[str, ...]) -> list[int]:
        """Ids of tokens whose text, as a whole word, is one of `words` (case-insensitive).

        "But", " but" and "but," match "but"; "butter" and "waiter" do not. Special tokens never match.
        """
        wanted = {w.lower() for w in words}
        special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        word = re.compile(r"[a-z]+(?:-[a-z]+)*")
        ids = []
        for token_id in range(self._tok.get_vocab_size(with_added_tokens=True)):
            if token_id in special:
                continue
            text = self._tok.decode([token_id], skip_special_tokens=False).lower()
            if any(w in wanted for w in word.findall(text)):
                ids.append(token_id)
        return ids


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, never splitting a multi-byte character."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # ids before this are settled
        self._read = 0  # text of ids[_prefix:_read] has been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self._prefix:self._read], self.skip)
        text = decode(self.ids[self._prefix:], self.skip)
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(prefix_text):]
        return ""
