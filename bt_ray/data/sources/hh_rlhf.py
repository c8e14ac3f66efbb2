"""Anthropic HH-RLHF: harmless-base dialogues as preference pairs (train) and harmful prompts (test).

Both loaders take ``part`` (``bt_ray.data.parts``): a seeded train/dev/test part of the file, assigned
by each dialogue's first Human turn, so one file (e.g. the shipped test split) can be trained on
(part train) and evaluated on (part dev or test) with no dialogue, and no first request, in both.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from bt_ray.data.parts import Part, load_part
from bt_ray.data.records import LoadReport, Message, PreferenceExample, PromptExample
from bt_ray.data.sources._files import (
    _collect,
    _extra_columns,
    _get_str,
    _Hub,
    _hub_split_given,
    _iter_hub,
    _iter_jsonl,
    _resolve,
    _Skip,
    _Source,
    _Where,
)


def _hh_source(split: str, **known) -> _Source:
    """The harmless-base file of one split, in the shared-datasets layout and on the hub."""
    return _Source(
        "hh-rlhf",
        f"hh-rlhf/harmless-base/{split}.jsonl.gz",
        "Anthropic HH-RLHF JSONL (.jsonl or .jsonl.gz) with 'chosen' and 'rejected' dialogues, "
        f"harmless-base {split} split",
        _Hub("Anthropic/hh-rlhf", "harmless-base", split, sub_arg="data_dir"),
        extra_dir_names=(f"harmless-base/{split}.jsonl.gz", f"{split}.jsonl", f"harmless-base/{split}.jsonl"),
        **known,
    )


_HH_TRAIN = _hh_source("train", missing_hint=(
    "the HH-RLHF harmless-base train split is not shipped in the shared datasets (only its test "
    "split, which evaluation uses); give the source a path: a local harmless-base/train.jsonl.gz "
    "(or a directory holding it), or the hub id Anthropic/hh-rlhf@harmless-base[train]"
))
_HH_TEST = _hh_source(
    "test", sha256="ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03", size=742801,  # shipped
)
_HH_SPLITS = {"train": _HH_TRAIN, "test": _HH_TEST}


def _hh_origin(path: str | os.PathLike | None, split: str | None, default: str) -> Path | _Hub:
    """Resolve an HH-RLHF ``path`` for ``split`` (None = ``default``); ``split`` picks the file or hub split.

    A file (given, or found in a directory) whose standard name says another split, or a hub id whose
    ``[split]`` says another one, is an error: the split is never silently other than asked. A file
    whose name says no split cannot be checked, so an explicit ``split`` with it is an error too.
    """
    want = default if split is None else split
    if want not in _HH_SPLITS:
        raise ValueError(f"hh-rlhf: split must be one of {', '.join(_HH_SPLITS)} or null (= {default}); "
                         f"got {split!r}")
    origin = _resolve(_HH_SPLITS[want], path)
    asked = f"split {split!r}" if split is not None else f"split null (= {default}, this loader's default)"
    if isinstance(origin, _Hub):
        if origin.split != want and _hub_split_given(path):
            raise ValueError(f"hh-rlhf: the hub id {path!r} names split {origin.split!r} but {asked} was "
                             f"asked; drop the [split] from the id or set split: {origin.split}")
        return origin
    named = next((s for s, src in _HH_SPLITS.items() if origin.name in src.dir_names()), None)
    if named is not None and named != want:
        raise ValueError(f"hh-rlhf: {origin} is the {named} split (by its name) but {asked} was asked; "
                         f"set split: {named} to read it on purpose")
    if named is None and split is not None:
        raise ValueError(f"hh-rlhf: split {split!r} cannot apply to {origin}: its name says no split; "
                         f"leave split null, or give a directory or hub id for split to choose from")
    return origin


# A turn starts at "\n\nHuman: " or "\n\nAssistant: ". The marker's trailing space is part of the
# marker; a marker with no space is accepted only at the very end of the string (an empty last turn).
_HH_MARKER = re.compile(r"\n\n(Human|Assistant):(?: |\Z)")


def parse_hh_dialogue(text: str) -> list[Message]:
    """Split an HH-RLHF dialogue string into messages, keeping each turn's text exactly.

    Args:
        text: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``.

    Returns:
        The turns in order, Human -> ``user``, Assistant -> ``assistant``. Only the marker (with its
        one space) is removed; any further whitespace stays in the turn text.

    Raises:
        ValueError: the text does not start with a ``"\\n\\nHuman: "`` turn.
    """
    parts = _HH_MARKER.split(text)
    if len(parts) == 1:
        raise ValueError("has no '\\n\\nHuman: ' or '\\n\\nAssistant: ' turn marker")
    if parts[0]:
        raise ValueError(f"has text before the first turn marker: {parts[0][:40]!r}")
    turns = [
        Message("user" if role == "Human" else "assistant", body)
        for role, body in zip(parts[1::2], parts[2::2])
    ]
    if turns[0].role != "user":
        raise ValueError("does not start with a '\\n\\nHuman: ' turn")
    return turns


def _hh_turns(row: dict, where: _Where, key: str) -> list[Message]:
    """Parse ``row[key]`` and check it is a dialogue ending with an Assistant turn."""
    text = _get_str(row, key, where, allow_empty=True)
    try:
        turns = parse_hh_dialogue(text)
    except ValueError as e:
        raise where.error(str(e), field=key) from None
    if all(m.role == "user" for m in turns):
        raise where.error("has no '\\n\\nAssistant: ' turn", field=key)
    if turns[-1].role != "assistant":
        raise where.error("does not end with an Assistant turn", field=key)
    for i, m in enumerate(turns):
        if m.role == "user" and not m.content.strip():
            raise where.error(f"has an empty Human turn (turn {i + 1})", field=key)
    return turns


def _alternates(turns: list[Message]) -> bool:
    return all(a.role != b.role for a, b in zip(turns, turns[1:]))


def _hh_preference(row: dict, where: _Where) -> PreferenceExample | _Skip:
    chosen = _hh_turns(row, where, "chosen")
    rejected = _hh_turns(row, where, "rejected")
    # A handful of rows have two Assistant turns in a row (a continued answer, or a Human turn glued
    # into the Assistant text without its "\n\n"). Their turn structure is corrupt, so they are left out.
    if not (_alternates(chosen) and _alternates(rejected)):
        return _Skip("non_alternating_turns")
    if chosen[:-1] != rejected[:-1]:
        first = next(
            (i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected))
        )
        raise where.error(
            f"has different turns from 'chosen' before the last Assistant turn (first difference at "
            f"turn {first + 1})",
            field="rejected",
        )
    prompt = tuple(chosen[:-1])
    return PreferenceExample(
        source="hh-rlhf",
        location=where.location,
        prompt=prompt,
        chosen=chosen[-1].content,
        rejected=rejected[-1].content,
        kind="harmful",
        meta=_extra_columns(row, ("chosen", "rejected"), {"num_turns": sum(m.role == "user" for m in prompt)},
                            where),
    )


def _hh_prompt(row: dict, where: _Where) -> PromptExample:
    turns = _hh_turns(row, where, "chosen")
    prompt = turns[:-1]
    return PromptExample(
        dataset="hh-rlhf",
        location=where.location,
        turns=(turns[0].content,),
        harmful=True,
        meta={"num_turns": sum(m.role == "user" for m in prompt)},
    )


def _hh_first_turn(row: dict, where: _Where) -> str:
    """What a dialogue's part is assigned by: its first Human turn (of ``chosen``)."""
    return _hh_turns(row, where, "chosen")[0].content


def _hh_rows(origin: Path | _Hub) -> Iterable[tuple[_Where, dict]]:
    return _iter_hub(origin, {}) if isinstance(origin, _Hub) else _iter_jsonl(origin)


def load_hh_rlhf_preferences(
    path: str | None = None, *, limit: int | None = None, split: str | None = None, part: Part | None = None
) -> tuple[list[PreferenceExample], LoadReport]:
    """Anthropic HH-RLHF ``{"chosen", "rejected"}`` dialogues as preference pairs (training data).

    Each dialogue string is split into turns at ``"\\n\\nHuman: "`` / ``"\\n\\nAssistant: "``. The
    prompt is every turn before the last Assistant turn and must be the same in both strings; y+ is
    the last Assistant turn of ``chosen``, y- that of ``rejected``. Any other field of a row (e.g.
    precomputed judge labels) is kept in ``meta`` under its own name.

    ``kind`` is ``"harmful"`` for every pair: the default data, harmless-base, is red-teaming data
    in which y- is taken to be the unsafe answer (a judge filter can overrule it, see
    ``bt_ray.data.recipes``). Loading helpful-base through this loader would mislabel it.

    Rules and odd rows (found in harmless-base/test, 2,312 rows):

    * An empty last Assistant turn (``"...\\n\\nAssistant: "``; 4 ``chosen`` strings) is kept:
      the annotator preferred saying nothing, so y+ is ``""``.
    * Rows whose ``chosen`` or ``rejected`` has two Assistant turns in a row are skipped by rule
      ``non_alternating_turns`` (9 rows). In 8 of them the second marker has an extra space
      (``"\\n\\nAssistant:  ..."``); the assistant was continued, or the Human turn before it was
      glued into the previous Assistant text as ``"  Human: ..."``. The turn structure cannot be
      recovered without guessing, and in 5 of the rows the two strings also disagree on the prompt.
    * ``"Human:"`` inside a turn's text (not preceded by ``"\\n\\n"``) is left as text.

    ``split`` (``train`` or ``test``; None = ``train``) chooses the file in ``$BT_RAY_DATA_DIR`` or a
    directory (``harmless-base/<split>.jsonl.gz``) and the hub split; a file or hub id that names
    another split is an error (``_hh_origin``). Default: ``$BT_RAY_DATA_DIR/hh-rlhf/harmless-base/
    train.jsonl.gz``, else ``Anthropic/hh-rlhf@harmless-base[train]``. Only the test split ships in
    the shared datasets, and evaluation uses it: the train default never falls back to it. A hub
    spec without ``@harmless-base`` loads every subset of the repo, helpful ones included.

    ``part`` keeps one seeded part of the file (``bt_ray.data.parts``), e.g. ``split="test",
    part=Part("train")`` trains on 80% of the shipped test file while evaluation reads its test part;
    ``limit`` then counts rows of the part, and the report's ``parts`` has the rows read per part.
    """
    origin = _hh_origin(path, split, "train")
    return load_part(part, lambda parse: _collect(_HH_TRAIN, path, limit, _hh_rows, parse, origin=origin),
                     _hh_preference, _hh_first_turn, _Skip, limit)


def load_hh_rlhf_prompts(
    path: str | None = None, *, limit: int | None = None, part: Part | None = None
) -> tuple[list[PromptExample], LoadReport]:
    """The HH-RLHF harmless-base TEST dialogues as single-turn harmful prompts (the paper's dev set).

    ``PromptExample`` holds only user turns, with no assistant turns between them, so a multi-turn
    HH dialogue cannot be replayed faithfully. Each row gives its FIRST Human turn as a one-turn
    prompt, and ``meta["num_turns"]`` records how many Human turns the prompt part of ``chosen``
    had. Only ``chosen`` is read; no row is left out (the first Human turn is clean even in the
    rows that ``load_hh_rlhf_preferences`` skips). Default: ``$BT_RAY_DATA_DIR/hh-rlhf/harmless-base/
    test.jsonl.gz``, else ``Anthropic/hh-rlhf@harmless-base[test]``. ``part`` keeps one seeded part
    of the file, assigned exactly as ``load_hh_rlhf_preferences`` assigns it (``bt_ray.data.parts``).
    """
    return load_part(part, lambda parse: _collect(_HH_TEST, path, limit, _hh_rows, parse),
                     _hh_prompt, _hh_first_turn, _Skip, limit)
