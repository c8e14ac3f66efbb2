"""Chat encoding on real model families' templates (Llama 3, Gemma, an injected system prompt, the
ChatML fallback), with tokenizers built in code: one BOS exactly where the template puts it, trimmed
contents where the template trims, control strings in contents never becoming control tokens, and
the end-of-turn id each family closes an assistant turn with."""

from __future__ import annotations

import pytest

from bt_ray.reset import (
    CHATML_TEMPLATE,
    add_reset_token,
    encode_chat_prompt,
    encode_text,
    end_of_turn_ids,
    ensure_chat_template,
)
from tests.chat_tokenizers import QWEN2_SYSTEM_PROMPT, gemma_tokenizer, llama3_tokenizer, qwen2_tokenizer

TWO_TURNS = [
    {"role": "user", "content": "How do I bake bread?"},
    {"role": "assistant", "content": "Mix flour, water and yeast."},
    {"role": "user", "content": "And then?"},
]


def _one_piece(tokenizer, messages) -> list[int]:
    """The template rendered and tokenized in one call, the way the model's own tooling does it."""
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("build", [llama3_tokenizer, gemma_tokenizer, qwen2_tokenizer])
def test_chat_prompt_equals_the_templates_own_tokenization_with_one_bos(build):
    tokenizer = build()
    add_reset_token(tokenizer)
    ids = encode_chat_prompt(tokenizer, TWO_TURNS)
    assert ids == _one_piece(tokenizer, TWO_TURNS)
    if tokenizer.bos_token_id is not None:
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1  # no double BOS


def test_llama3_instruct_prompt_layout_and_end_of_turn():
    tokenizer = llama3_tokenizer()
    ids = encode_chat_prompt(tokenizer, [{"role": "user", "content": "Hi"}])
    assert tokenizer.decode(ids) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi"
                                     "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert end_of_turn_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|eot_id|>")]


def test_gemma_prompt_layout_and_end_of_turn():
    tokenizer = gemma_tokenizer()
    ids = encode_chat_prompt(tokenizer, [{"role": "user", "content": "Hi"}])
    assert tokenizer.decode(ids) == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert end_of_turn_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<end_of_turn>")]


@pytest.mark.parametrize("build", [llama3_tokenizer, gemma_tokenizer])
def test_templates_that_trim_contents_get_trimmed_contents(build):
    """Llama 3 and Gemma render ``message['content'] | trim``: the encoding must trim as they do."""
    tokenizer = build()
    padded = [{"role": "user", "content": "  \n How do I bake bread?\n\n  "}]
    ids = encode_chat_prompt(tokenizer, padded)
    assert ids == _one_piece(tokenizer, padded)
    assert ids == encode_chat_prompt(tokenizer, [{"role": "user", "content": "How do I bake bread?"}])


def test_templates_that_keep_whitespace_keep_it():
    tokenizer = qwen2_tokenizer()
    padded = [{"role": "user", "content": "  spaced out \n"}]
    ids = encode_chat_prompt(tokenizer, padded)
    assert "\n  spaced out \n<|im_end|>" in tokenizer.decode(ids)
    assert ids == _one_piece(tokenizer, padded)


def test_injected_system_prompt_is_template_text_before_the_user_turn():
    tokenizer = qwen2_tokenizer()
    ids = encode_chat_prompt(tokenizer, [{"role": "user", "content": "Hi"}])
    assert tokenizer.decode(ids) == (f"<|im_start|>system\n{QWEN2_SYSTEM_PROMPT}<|im_end|>\n"
                                     "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(im_start) == 3  # system, user, assistant: each a single control token
    assert end_of_turn_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_llama3_base_without_template_gets_chatml_that_starts_with_its_bos(tmp_path):
    """Meta-Llama-3-8B ships no chat template: the ChatML fallback must still start with <|begin_of_text|>."""
    from bt_ray.models import ModelCfg, load_tokenizer

    llama3_tokenizer(instruct=False).save_pretrained(tmp_path)
    tokenizer, _ = load_tokenizer(ModelCfg(name=str(tmp_path)))
    assert tokenizer.chat_template == CHATML_TEMPLATE
    ids = encode_chat_prompt(tokenizer, [{"role": "user", "content": "Hi"}])
    bos = tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    assert ids[0] == bos and ids.count(bos) == 1
    assert tokenizer.decode(ids) == "<|begin_of_text|><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert end_of_turn_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_chatml_fallback_without_bos_adds_none():
    """The tiny preset's tokenizer has no BOS: the fallback renders exactly what it did before."""
    from bt_ray.models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(300)
    assert tokenizer.bos_token is None
    ids = encode_chat_prompt(tokenizer, [{"role": "user", "content": "Hi"}])
    assert tokenizer.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("build", [llama3_tokenizer, gemma_tokenizer, qwen2_tokenizer])
def test_control_strings_in_contents_stay_plain_text(build):
    tokenizer = build()
    info = add_reset_token(tokenizer)
    specials = [t for t in tokenizer.all_special_tokens if t]
    text = "echo " + " ".join(specials)
    ids = encode_chat_prompt(tokenizer, [{"role": "user", "content": text}])
    template_only = encode_chat_prompt(tokenizer, [{"role": "user", "content": "echo"}])
    assert info.token_id not in ids
    for token_id in set(template_only):  # no control token appears more often than the template puts it
        if token_id in tokenizer.all_special_ids:
            assert ids.count(token_id) == template_only.count(token_id)
    assert text in tokenizer.decode(ids)
    assert len(encode_text(tokenizer, text)) > len(specials)  # spelled out in ordinary tokens


def test_ensure_chat_template_keeps_a_family_template():
    tokenizer = llama3_tokenizer()
    template = tokenizer.chat_template
    assert ensure_chat_template(tokenizer) is False and tokenizer.chat_template == template
