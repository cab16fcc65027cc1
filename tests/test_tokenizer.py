"""Our tokenizers+jinja2 tokenizer renders and tokenizes exactly as transformers does."""

import pytest

from edgevlm.families import extractor_family, reasoner_family
from edgevlm.tokenizer import StreamDecoder, Tokenizer

TEXT = "What is the position of the catcher? Ünïcödé ✓ 猫 and emoji 🤖 too."


@pytest.mark.parametrize("family", ["qwen3", "llava_onevision", "idefics3"])
def test_chat_template_renders_like_transformers(tiny_dir, family):
    from transformers import AutoTokenizer

    d = tiny_dir(family)
    ours, theirs = Tokenizer(d), AutoTokenizer.from_pretrained(d)
    fam = reasoner_family(d) if family == "qwen3" else extractor_family(d)
    for with_image in ([False] if family == "qwen3" else [False, True]):
        msgs = fam.messages(TEXT, with_image=with_image)
        for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
            for gen in (True, False):
                expected = theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **kwargs)
                assert ours.apply_chat_template(msgs, add_generation_prompt=gen, **kwargs) == expected


def test_qwen3_style_template_honours_enable_thinking(tiny_dir):
    tok = Tokenizer(tiny_dir("qwen3"))
    msgs = [{"role": "user", "content": "hi"}]
    no_think = tok.apply_chat_template(msgs, enable_thinking=False)
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.apply_chat_template(msgs, enable_thinking=True).endswith("<|im_start|>assistant\n")


def test_llava_onevision_prompt_is_the_papers_qwen_1_5_conversation(tiny_dir):
    d = tiny_dir("llava_onevision")
    msgs = extractor_family(d).messages("Describe this.", with_image=True)
    assert Tokenizer(d).apply_chat_template(msgs) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nDescribe this."
        "<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("family", ["qwen3", "idefics3"])
def test_encode_and_decode_match_transformers(tiny_dir, family):
    from transformers import AutoTokenizer

    d = tiny_dir(family)
    ours, theirs = Tokenizer(d), AutoTokenizer.from_pretrained(d)
    text = ours.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": TEXT}]}]
                                    if family == "idefics3" else [{"role": "user", "content": TEXT}])
    ids = ours.encode(text)
    assert ids == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)


def test_think_tags_survive_decoding_like_qwen3(tiny_dir):
    tok = Tokenizer(tiny_dir("qwen3"))
    ids = tok.encode("<think>\nhmm\n</think>\n\nAnswer: B<|im_end|>")
    assert tok.decode(ids) == "<think>\nhmm\n</think>\n\nAnswer: B"


def test_stream_decoder_deltas_add_up_to_the_full_decode(tiny_dir):
    tok = Tokenizer(tiny_dir("qwen3"))
    ids = tok.encode(TEXT + "<|im_end|>")
    stream = StreamDecoder(tok)
    deltas = [stream.push(i) for i in ids]
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)  # multi-byte characters are never split


def test_eos_ids_come_from_tokenizer_and_generation_config(tiny_dir):
    d = tiny_dir("idefics3")
    tok = Tokenizer(d)
    assert tok.eos_token_ids(d) == {tok.token_id("<end_of_utterance>"), tok.token_id("<|im_end|>")}
