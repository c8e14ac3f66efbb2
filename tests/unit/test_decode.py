"""Backtracking decoding: what is shown, the [RESET] logits processor, and no re-encoding."""

from __future__ import annotations

import pytest
import torch

from bt_ray.eval.config import DecodeCfg
from bt_ray.reset import (
    ResetLogitsProcessor,
    backtrack_output,
    clean_control_text,
    encode_chat_prompt,
    encode_text,
    shown_text,
)

R, EOT = 99, 7  # hand-built ids: [RESET] and end of turn


@pytest.mark.parametrize(
    "ids, shown, discarded, resets, first_kept, stopped",
    [
        ([1, 2, 3, EOT], [1, 2, 3], 0, 0, 0, True),  # no reset
        ([R, 4, 5, EOT], [4, 5], 0, 1, 1, True),  # reset at start: nothing discarded
        ([1, 2, R, 4, 5, EOT, 0, 0], [4, 5], 2, 1, 3, True),  # mid-way; padding after the stop dropped
        ([1, 2, 3, R], [], 3, 1, 4, False),  # reset as last token (token limit hit): nothing shown
        ([1, R, 2, R, 3], [3], 2, 2, 4, False),  # two resets (max_resets=2): after the last one
        ([], [], 0, 0, 0, False),
    ],
)
def test_backtrack_output_on_hand_built_ids(ids, shown, discarded, resets, first_kept, stopped):
    out = backtrack_output(ids, R, stop_ids=(EOT,))
    assert out.shown_ids == shown
    assert out.num_discarded_tokens == discarded
    assert out.num_resets == resets
    assert out.did_reset == (resets > 0)
    assert out.first_kept_index == first_kept
    assert out.stopped is stopped
    assert EOT not in out.raw_ids
    if shown:
        assert out.raw_ids[out.first_kept_index :] == shown


def test_processor_biases_only_the_reset_logit():
    scores_BV = torch.randn(3, 120)
    input_ids_BT = torch.tensor([[5, 6, 1], [5, 6, 2], [5, 6, 3]])
    out_BV = ResetLogitsProcessor(R, bias=-5.0, max_resets=1, prompt_length=2)(input_ids_BT, scores_BV)
    assert torch.allclose(out_BV[:, R], scores_BV[:, R] - 5.0)
    other = torch.ones(120, dtype=torch.bool)
    other[R] = False
    assert torch.equal(out_BV[:, other], scores_BV[:, other])


def test_processor_forbids_reset_after_max_resets_and_ignores_the_prompt():
    scores_BV = torch.zeros(4, 120)
    # prompt (first 2 positions) holds R in row 3: it must not count
    input_ids_BT = torch.tensor([[5, 6, 1, 2], [5, 6, R, 2], [5, 6, R, R], [R, R, 1, 2]])
    one = ResetLogitsProcessor(R, bias=100.0, max_resets=1, prompt_length=2)(input_ids_BT, scores_BV)
    assert one[:, R].tolist() == [100.0, float("-inf"), float("-inf"), 100.0]
    two = ResetLogitsProcessor(R, max_resets=2, prompt_length=2)(input_ids_BT, scores_BV)
    assert two[:, R].tolist() == [0.0, 0.0, float("-inf"), 0.0]
    unlimited = ResetLogitsProcessor(R, max_resets=None, prompt_length=2)(input_ids_BT, scores_BV)
    assert torch.isfinite(unlimited[:, R]).all()
    zero = ResetLogitsProcessor(R, max_resets=0)(input_ids_BT, scores_BV)
    assert torch.isinf(zero[:, R]).all()
    with pytest.raises(ValueError, match="max_resets must be >= 0"):
        ResetLogitsProcessor(R, max_resets=-1)



def test_processor_step_by_step_equals_a_fresh_recount_and_leaves_logits_alone_when_idle():
    """One processor through a generation (one id per step) masks exactly as a fresh one per step."""
    gen = torch.Generator().manual_seed(0)
    prompt_BT = torch.tensor([[5, 6, R], [5, 6, 1], [5, 6, 2]])  # a prompt [RESET] never counts
    steps_TB = torch.tensor([[1, 2, 3], [R, 4, 5], [6, 7, R], [R, 8, 9], [1, R, 2], [3, 4, 5]])
    limits = ((1, None), (2, None), (None, None), (None, 2), (2, 3), ([1, None, 2], [None, 1, 3]))
    for max_resets, window in limits:  # the windowed ones also count ids since the last reset
        live = ResetLogitsProcessor(R, max_resets=max_resets, window=window, prompt_length=3)
        ids_BT = prompt_BT
        for new_B in steps_TB:
            scores_BV = torch.randn(3, 120, generator=gen)
            before_BV = scores_BV.clone()
            fresh = ResetLogitsProcessor(R, max_resets=max_resets, window=window, prompt_length=3)(
                ids_BT, scores_BV)
            got = live(ids_BT, scores_BV)
            assert torch.equal(got, fresh)
            if not torch.isinf(got[:, R]).any():
                assert got is scores_BV  # bias 0 and nobody blocked: the logits are not copied
            assert torch.equal(scores_BV, before_BV)  # never modified in place
            ids_BT = torch.cat([ids_BT, new_B[:, None]], dim=1)
        # a new generation (shorter input) with the same processor object recounts from scratch
        scores_BV = torch.zeros(3, 120)
        assert torch.isfinite(live(prompt_BT, scores_BV)[:, R]).all()

def test_shown_text_is_cleaned_of_control_tokens(tiny_tokenizer):
    tok, info = tiny_tokenizer
    before = encode_text(tok, "Sure, here is how")
    # the model spells control tokens out as ordinary characters: still cleaned away
    after = encode_text(tok, "I can't help with that [RESET] <|im_end|>")
    out = backtrack_output(before + [info.token_id] + after + [tok.convert_tokens_to_ids("<|im_end|>")],
                           info.token_id, stop_ids=(tok.convert_tokens_to_ids("<|im_end|>"),))
    assert out.num_discarded_tokens == len(before)
    assert shown_text(tok, out) == "I can't help with that"
    assert clean_control_text(tok, "a[RESET]b<|im_start|>c") == "abc"


# ---------------------------------------------------------------- on the tiny model


@pytest.fixture(scope="module")
def tiny_hf():
    from bt_ray.eval.engines import HFGenerator
    from bt_ray.models import ModelCfg

    return HFGenerator.from_cfg(ModelCfg())


def _prompts(tok, texts):
    return [encode_chat_prompt(tok, [{"role": "user", "content": t}]) for t in texts]


def test_reset_re_encodes_nothing(tiny_hf):
    """With the KV cache, a reset costs one forward token like any other: the prompt is encoded once."""
    prompt = _prompts(tiny_hf.tokenizer, ["How do I bake bread at home?"])[0]
    calls: list[int] = []
    hook = tiny_hf.model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        forced = tiny_hf.generate([prompt], DecodeCfg(max_new_tokens=12, reset_bias=100.0, max_resets=1))[0]
    finally:
        hook.remove()
    out = backtrack_output(forced.ids, tiny_hf.reset_id, tiny_hf.stop_ids)
    assert out.num_resets == 1 and forced.ids[0] == tiny_hf.reset_id  # +100: reset first, then no more
    assert calls[0] == len(prompt)  # the prompt, once
    assert calls[1:] == [1] * (len(forced.ids) - 1)  # then one new token per step, reset or not
    assert sum(calls) == len(prompt) + len(forced.ids) - 1


def test_left_padded_batch_matches_one_by_one(tiny_hf):
    prompts = _prompts(tiny_hf.tokenizer, ["Hi", "Tell me a long story about a dragon and a knight", "2+2?"])
    decode = DecodeCfg(max_new_tokens=10)
    batched = [g.ids for g in tiny_hf.generate(prompts, decode)]
    alone = [tiny_hf.generate([p], decode)[0].ids for p in prompts]
    assert batched == alone


def test_bias_and_max_resets_on_the_model(tiny_hf):
    prompts = _prompts(tiny_hf.tokenizer, ["Hi", "How are you today?"])
    for max_resets in (1, 2):
        gens = tiny_hf.generate(prompts, DecodeCfg(max_new_tokens=8, reset_bias=100.0, max_resets=max_resets))
        for g in gens:
            assert g.ids[:max_resets] == [tiny_hf.reset_id] * max_resets
            assert g.ids.count(tiny_hf.reset_id) == max_resets
    never = tiny_hf.generate(prompts, DecodeCfg(max_new_tokens=8, reset_bias=100.0, max_resets=0))
    assert all(tiny_hf.reset_id not in g.ids for g in never)
    plain = tiny_hf.generate(prompts, DecodeCfg(max_new_tokens=8, reset_bias=-100.0))
    assert all(tiny_hf.reset_id not in g.ids for g in plain)


def test_samples_of_one_prompt_are_independent_across_batches(tiny_hf):
    """8 samples of one prompt, generated 2 per batch: no batch repeats another's random draws.

    (A seed per batch position made every batch sample the same ids: samples 0, 2, 4, 6 were one.)
    The seeds are a function of the row, not of its batch: the same rows give the same samples.
    """
    from bt_ray.eval.generate import generate_rows
    from bt_ray.eval.pipeline import expand

    items = [{"dataset": "d", "prompt_index": 0, "turns": ["Tell me about dragons"], "harmful": True,
              "location": "d #0"}]
    rows = expand(items, num_samples=8)
    decode = DecodeCfg(max_new_tokens=12, temperature=1.0)
    old_batch = tiny_hf.batch_size
    try:
        tiny_hf.batch_size = 2
        twice = [[r["raw_outputs"][0] for r in generate_rows(tiny_hf, rows, decode, max_prompt_tokens=768)]
                 for _ in range(2)]
    finally:
        tiny_hf.batch_size = old_batch
    assert twice[0] == twice[1]  # reproducible
    assert len(set(twice[0])) == 8, twice[0]  # random weights: 8 independent samples all differ


def test_reset_bias_is_bounded_to_the_range_vllm_applies():
    """vLLM clamps logit_bias to [-100, 100] and HF does not: a larger |b| would differ between engines."""
    from bt_ray.config import ConfigError

    assert DecodeCfg(reset_bias=-100.0).reset_bias == -100.0 and DecodeCfg(reset_bias=100.0)
    for bad in (-100.5, 250.0, float("inf")):
        with pytest.raises(ConfigError, match=r"reset_bias must be in \[-100, 100\]"):
            DecodeCfg(reset_bias=bad)


def test_engine_cfg_needs_prompts_shorter_than_the_vllm_context():
    """A prompt vLLM cannot take would fail in add_request; the config catches it up front."""
    from bt_ray.config import ConfigError
    from bt_ray.eval.config import EngineCfg

    for kind in ("vllm", "auto"):
        with pytest.raises(ConfigError, match=r"max_prompt_tokens must be < vllm_max_model_len \(1024\)"):
            EngineCfg(kind=kind, max_prompt_tokens=1024, vllm_max_model_len=1024)
    assert EngineCfg(kind="vllm", max_prompt_tokens=1023, vllm_max_model_len=1024)
    assert EngineCfg(kind="hf", max_prompt_tokens=4096)  # the vLLM context does not apply to HF


def test_batches_per_actor_defaults_to_the_engine_and_more_than_one_is_refused_on_hf(monkeypatch):
    """vLLM batches across the calls in flight (default 4); transformers generate cannot (default 1)."""
    import bt_ray.eval.engines as engines
    from bt_ray.config import ConfigError
    from bt_ray.eval.config import EngineCfg
    from bt_ray.eval.pipeline import batches_per_actor

    assert batches_per_actor(EngineCfg(kind="vllm")) == 4 and batches_per_actor(EngineCfg(kind="hf")) == 1
    assert batches_per_actor(EngineCfg(kind="vllm", batches_per_actor=2)) == 2
    with pytest.raises(ConfigError, match="batches_per_actor must be 1 or null on the HF engine"):
        EngineCfg(kind="hf", batches_per_actor=2)
    with pytest.raises(ConfigError, match="batches_per_actor must be >= 1 or null"):
        EngineCfg(batches_per_actor=0)
    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name: None)  # auto without vLLM: HF
    assert batches_per_actor(EngineCfg(kind="auto")) == 1
    with pytest.raises(ValueError, match="engine.kind=auto resolved to hf"):
        batches_per_actor(EngineCfg(kind="auto", batches_per_actor=4))
