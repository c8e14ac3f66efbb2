"""The streaming view of a backtracking generation (bt_ray.reset.stream): what a client keeps equals
the non-streaming answer, and hold mode never sends what is later discarded."""

from __future__ import annotations

import random

import pytest

from bt_ray.eval.engines import stop_ids_of
from bt_ray.reset import encode_text, shown_text
from bt_ray.reset.stream import ResetStream


def kept_text(events) -> str:
    """What a client following the protocol keeps: text events appended, reset events drop the answer."""
    kept = ""
    for e in events:
        if e.kind == "reset":
            assert e.retracted_chars <= len(kept)
            kept = kept[: len(kept) - e.retracted_chars]
        else:
            kept += e.text
    return kept


def run(stream: ResetStream, ids: list[int], chunk: int = 1):
    events = []
    for i in range(0, len(ids), chunk):
        events += stream.feed(ids[i : i + chunk])
    return events + stream.finish()


def random_generations(tokenizer, reset_id, stop, n=200, seed=0):
    rng = random.Random(seed)
    words = ["hello", " world", " sorry", ",", " I", " cannot", " help", "  ", "\n", " é", "日本", " 🙂",
             " [RESET]", " <|im_end|>", " step", " one", "."]
    out = []
    for _ in range(n):
        ids: list[int] = []
        for _ in range(rng.randint(0, 4)):
            ids += encode_text(tokenizer, "".join(rng.choice(words) for _ in range(rng.randint(0, 6))))
            if rng.random() < 0.6:
                ids.append(reset_id)
        if rng.random() < 0.7:
            ids.append(rng.choice(stop))
        out.append(ids)
    return out


@pytest.mark.parametrize("chunk", [1, 3])
def test_retract_mode_kept_text_equals_the_non_streaming_answer(tiny_tokenizer, chunk):
    tok, info = tiny_tokenizer
    reset_id, stop = info.token_id, stop_ids_of(tok)
    for ids in random_generations(tok, reset_id, stop):
        stream = ResetStream(tok, reset_id, stop, mode="retract", max_resets=None)
        events = run(stream, ids, chunk)
        assert kept_text(events) == shown_text(tok, stream.output), ids
        assert sum(e.kind == "reset" for e in events) == stream.output.num_resets


@pytest.mark.parametrize("window,max_resets", [(None, None), (None, 2), (4, None), (6, 1)])
def test_hold_mode_never_sends_discarded_text(tiny_tokenizer, window, max_resets):
    """With a decoder that honours window/max_resets, hold sends no text that a later reset discards."""
    tok, info = tiny_tokenizer
    reset_id, stop = info.token_id, stop_ids_of(tok)
    checked = 0
    for ids in random_generations(tok, reset_id, stop, seed=1):
        if not _decoder_allows(ids, reset_id, window, max_resets):
            continue  # a sequence the decoder could not have produced
        checked += 1
        stream = ResetStream(tok, reset_id, stop, mode="hold", max_resets=max_resets, window=window)
        events = run(stream, ids)
        assert not [e for e in events if e.kind == "reset"], ids
        assert kept_text(events) == shown_text(tok, stream.output)
        assert stream.unheld_resets == 0
    assert checked >= 20


def _decoder_allows(ids, reset_id, window, max_resets) -> bool:
    resets, since = 0, 0
    for t in ids:
        if t == reset_id:
            if (max_resets is not None and resets >= max_resets) or (window is not None and since >= window):
                return False
            resets, since = resets + 1, 0
        else:
            since += 1
    return True


def test_hold_mode_streams_once_no_reset_is_possible(tiny_tokenizer):
    tok, info = tiny_tokenizer
    reset_id, stop = info.token_id, stop_ids_of(tok)
    ids = encode_text(tok, "one two three four five six seven eight")
    stream = ResetStream(tok, reset_id, stop, mode="hold", max_resets=1, window=3)
    first = stream.feed(ids[:2])
    assert first == []  # a reset is still possible: held
    later = stream.feed(ids[2:5])
    assert "".join(e.text for e in later).startswith("one")  # window passed: released
    # after the one allowed reset, text streams at once
    stream = ResetStream(tok, reset_id, stop, mode="hold", max_resets=1, window=None)
    assert stream.feed(ids[:3]) == []
    assert stream.feed([reset_id]) == []  # nothing was sent, so nothing to retract
    assert "".join(e.text for e in stream.feed(ids[:3]))


def test_literal_reset_text_is_not_a_reset(tiny_tokenizer):
    tok, info = tiny_tokenizer
    reset_id, stop = info.token_id, stop_ids_of(tok)
    ids = encode_text(tok, "a [RESET] b")
    assert reset_id not in ids
    stream = ResetStream(tok, reset_id, stop, mode="retract")
    events = run(stream, ids)
    assert not [e for e in events if e.kind == "reset"] and stream.num_resets == 0
