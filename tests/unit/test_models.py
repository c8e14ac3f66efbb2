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
    with pytest.raises(ValueError, match="must be an added or special token.*not in the vocabulary"):
        add_reset_token(build_tiny_tokenizer(100), reuse_token="<|not-there|>")


def test_reuse_token_rejects_an_ordinary_bpe_token_that_user_text_produces():
    """'Ġthe' is a plain BPE token: "tell me the way" encodes to it, so it can never be [RESET]."""
    tokenizer = build_tiny_tokenizer(1000)
    the = tokenizer.convert_tokens_to_ids("Ġthe")
    assert the in encode_text(tokenizer, "tell me the way")  # why it must be refused
    with pytest.raises(ValueError, match="must be an added or special token.*'Ġthe', an ordinary"):
        add_reset_token(tokenizer, reuse_token="Ġthe")
    with pytest.raises(ValueError, match="reuse_token must be an added or special token"):
        load_tokenizer(ModelCfg(reuse_token="Ġthe"))


def test_reuse_token_accepts_reserved_and_unused_special_tokens():
    from tests.chat_tokenizers import gemma_tokenizer, llama3_tokenizer

    cases = ((llama3_tokenizer(), "<|reserved_special_token_0|>"), (gemma_tokenizer(), "<unused0>"))
    for tokenizer, token in cases:
        n = len(tokenizer)
        info = add_reset_token(tokenizer, reuse_token=token)
        assert info.token_id == tokenizer.convert_tokens_to_ids(token) and len(tokenizer) == n
        assert info.token_id not in encode_text(tokenizer, f"say {token} now")


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


@pytest.fixture(scope="module")
def reused_dir(tmp_path_factory):
    """A tiny model saved by bt-ray with <|endoftext|> reused as [RESET]."""
    cfg = ModelCfg(reuse_token="<|endoftext|>", tiny=TinyModelCfg(num_layers=1))
    model, tokenizer, info = load_model(cfg)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("reused") / "m", {"stage": "test"}), info


def test_saved_dir_records_its_reset_token_and_loading_reads_it_back(reused_dir):
    """The dir says which token is [RESET]: loading it with a default config uses that id, adds none."""
    import json

    out, info = reused_dir
    meta = json.loads((out / "bt_ray.json").read_text())
    assert meta["reset_token"] == {"token": "<|endoftext|>", "id": info.token_id}
    assert meta["stage"] == "test"
    tokenizer, got = load_tokenizer(ModelCfg(name=str(out)))  # reuse_token not repeated
    assert (got.token, got.token_id, got.num_added_tokens) == ("<|endoftext|>", info.token_id, 0)
    assert tokenizer.convert_tokens_to_ids("[RESET]") != info.token_id  # no new [RESET] anywhere
    assert "[RESET]" not in tokenizer.get_vocab()
    model, tokenizer2, got2 = load_model(ModelCfg(name=str(out), reuse_token="<|endoftext|>"))  # agrees: fine
    assert got2 == got and len(tokenizer2) == len(tokenizer)


def test_a_setting_that_disagrees_with_the_dir_is_refused_naming_field_and_dir(reused_dir):
    from bt_ray.config import ConfigError

    out, _ = reused_dir
    disagrees = r"(?s)disagree with .*bt_ray.json.*model.reuse_token is '<\|im_start\|>'"
    with pytest.raises(ConfigError, match=disagrees):
        load_tokenizer(ModelCfg(name=str(out), reuse_token="<|im_start|>"))
    with pytest.raises(ConfigError, match=r"model.reset_token is '<RST>'"):
        load_model(ModelCfg(name=str(out), reset_token="<RST>"))


def test_save_model_always_records_the_tokenizers_reset(tiny, tmp_path):
    model, tokenizer, info = tiny
    with pytest.raises(ValueError, match="not the tokenizer's"):
        save_model(model, tokenizer, tmp_path / "bad", {"reset_token": {"token": "x", "id": 1}})
    with pytest.raises(ValueError, match="no \\[RESET\\] registered"):
        save_model(model, AutoTokenizer.from_pretrained(save_model(model, tokenizer, tmp_path / "m", {})),
                   tmp_path / "plain", {})


def test_added_token_row_is_mean_initialised_when_it_fits_in_spare_padding_rows():
    """Qwen-style spare rows: no resize is needed, yet [RESET]'s row must not keep its padding values."""
    tokenizer = build_tiny_tokenizer(200)
    num_old = len(tokenizer)
    rows = (num_old // 64 + 1) * 64  # room left over
    model = _tiny_llama(rows, tie=False)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    info = add_reset_token(tokenizer)
    resize_embeddings(model, len(tokenizer), num_old, pad_to_multiple_of=64)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == rows  # not resized
    torch.testing.assert_close(emb[info.token_id], old_in[:num_old].mean(0))
    torch.testing.assert_close(model.get_output_embeddings().weight[info.token_id], old_out[:num_old].mean(0))
    torch.testing.assert_close(emb[:num_old], old_in[:num_old])
    torch.testing.assert_close(emb[info.token_id + 1 :], old_in[info.token_id + 1 :])  # unused rows untouched


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
