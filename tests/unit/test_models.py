"""Models and tokenizers with [RESET]: one special token, padded mean-initialised embeddings."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from bt_ray.models import ModelCfg, TinyModelCfg, build_tiny_tokenizer, load_model, load_tokenizer, save_model
from bt_ray.reset import (
    RESET_TOKEN,
    add_reset_token,
    encode_chat_prompt,
    encode_text,
    end_of_turn_ids,
    resize_embeddings,
)


@pytest.fixture(scope="module")
def tiny():
    return load_model(ModelCfg())


def test_tiny_preset_has_one_reset_token_and_padded_embeddings(tiny):
    model, tokenizer, info = tiny
    assert info.token == RESET_TOKEN
    assert tokenizer.convert_ids_to_tokens(info.token_id) == RESET_TOKEN
    assert tokenizer.encode(RESET_TOKEN, add_special_tokens=False) == [info.token_id]
    assert RESET_TOKEN in tokenizer.all_special_tokens
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows >= len(tokenizer)
    assert model.get_output_embeddings().weight.shape[0] == rows
    assert model.config.hidden_size // model.config.num_attention_heads >= 32  # vLLM CPU needs it
    assert tokenizer.chat_template


def test_literal_reset_in_user_text_never_gives_the_reset_id(tiny):
    _, tokenizer, info = tiny
    text = "please print [RESET] and <|im_end|> literally: [RESET]"
    ids = encode_text(tokenizer, text)
    assert info.token_id not in ids
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") not in ids
    assert tokenizer.decode(ids) == text
    prompt = encode_chat_prompt(tokenizer, [{"role": "user", "content": text}])
    assert info.token_id not in prompt
    assert prompt.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 1  # the template's own


def test_chat_prompt_matches_the_template_rendering(tiny):
    _, tokenizer, _ = tiny
    messages = [
        {"role": "user", "content": "how do i bake bread ?"},
        {"role": "assistant", "content": "sure . get flour ."},
        {"role": "user", "content": "and then ?"},
    ]
    ids = encode_chat_prompt(tokenizer, messages)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids) == rendered
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]  # no boundary artefacts here
    assert end_of_turn_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def _tiny_llama(vocab: int, tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("tie", [False, True])
def test_new_rows_start_at_the_mean_of_old_rows(tie):
    tokenizer = build_tiny_tokenizer(200)
    num_old = len(tokenizer)
    model = _tiny_llama(num_old, tie)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    info = add_reset_token(tokenizer)
    assert info.num_added_tokens == 1 and info.token_id == num_old
    resize_embeddings(model, len(tokenizer), num_old, pad_to_multiple_of=64)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert emb.shape[0] % 64 == 0 and emb.shape[0] >= len(tokenizer)
    torch.testing.assert_close(emb[:num_old], old_in)
    torch.testing.assert_close(emb[info.token_id], old_in.mean(0))
    torch.testing.assert_close(emb[-1], old_in.mean(0))  # padding rows too
    torch.testing.assert_close(head[info.token_id], old_out.mean(0))
    assert (head.data_ptr() == emb.data_ptr()) == tie  # tied stays tied, untied stays untied


def test_add_reset_is_idempotent_and_reuse_token_adds_nothing():
    tokenizer = build_tiny_tokenizer(100)
    first = add_reset_token(tokenizer)
    again = add_reset_token(tokenizer)
    assert again.token_id == first.token_id and again.num_added_tokens == 0
    fresh = build_tiny_tokenizer(100)
    n = len(fresh)
    reused = add_reset_token(fresh, reuse_token="<|endoftext|>")
    assert reused.num_added_tokens == 0 and len(fresh) == n
    assert reused.token_id == fresh.convert_tokens_to_ids("<|endoftext|>")
    with pytest.raises(ValueError, match="reuse_token must be a token already in the vocabulary"):
        add_reset_token(build_tiny_tokenizer(100), reuse_token="<|not-there|>")


def test_saved_model_reloads_with_plain_from_pretrained(tiny, tmp_path):
    model, tokenizer, info = tiny
    out = save_model(model, tokenizer, tmp_path / "m", {"git_sha": "x"})
    assert (out / "model.safetensors").is_file() and (out / "bt_ray.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    tok2 = AutoTokenizer.from_pretrained(out)
    assert tok2.convert_tokens_to_ids(RESET_TOKEN) == info.token_id
    assert tok2.chat_template == tokenizer.chat_template
    ids = torch.tensor([encode_chat_prompt(tok2, [{"role": "user", "content": "hi"}])])
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    # loading the saved dir through bt-ray adds nothing a second time
    tok3, info3 = load_tokenizer(ModelCfg(name=str(out)))
    assert info3.num_added_tokens == 0 and info3.token_id == info.token_id and len(tok3) == len(tokenizer)


def test_load_tokenizer_matches_load_model(tiny):
    _, tokenizer, info = tiny
    tok2, info2 = load_tokenizer(ModelCfg())
    assert info2 == info and tok2.get_vocab() == tokenizer.get_vocab()


def test_tiny_config_rejects_small_heads_and_lists_all_errors():
    from bt_ray.config import ConfigError

    with pytest.raises(ConfigError) as e:
        TinyModelCfg(hidden_size=64, num_heads=4, num_layers=0)
    msg = str(e.value)
    assert "head_dim >= 32" in msg and "num_layers must be > 0" in msg


@pytest.mark.slow
def test_smollm2_preset_converts_and_gets_reset(tmp_path, monkeypatch):
    monkeypatch.setenv("BT_RAY_CACHE", str(tmp_path))
    model, tokenizer, info = load_model(ModelCfg(name="smollm2-135m"))
    assert info.token_id == 49152 and model.get_input_embeddings().weight.shape[0] == 49216
    assert model.config.tie_word_embeddings
    ids = torch.tensor([encode_chat_prompt(tokenizer, [{"role": "user", "content": "Say hello."}])])
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
