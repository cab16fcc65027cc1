"""Tokenization and chat templates without transformers: `tokenizers` + jinja2, rendered as HF renders them."""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import cached_property
from pathlib import Path

from edgevlm.errors import ModelError


def _compile_chat_template(source: str):
    """A sandboxed jinja2 template with the environment transformers gives chat templates."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; it renders as is.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which chat templates do not expect
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


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

    @cached_property
    def _template(self):
        if not self.chat_template:
            raise ModelError("the model has no chat template; edgevlm needs an instruction-tuned (chat) model")
        return _compile_chat_template(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render messages to the prompt string, with the special tokens HF passes as template variables."""
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens, **kwargs
        )

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Rendered chat prompts already hold their special tokens, so none are added by
        default (as HF's apply_chat_template); VLM processors tokenize with them, so their families pass True."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

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
