"""Safety sets: Safety-Tuned LLaMAs (training pairs) and the harmful-prompt evaluation sets
(AdvBench, I-MaliciousInstructions, SimpleSafetyTests, StrongREJECT, Q-Harm)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bt_ray.data.records import DataError, LoadReport, Message, PreferenceExample, PromptExample
from bt_ray.data.sources._files import (
    _HUB_ALIASES,
    _collect,
    _extra_columns,
    _get_str,
    _Hub,
    _iter_csv,
    _iter_hub,
    _json_list,
    _load_json,
    _no_split,
    _record_where,
    _Source,
    _Where,
)

_STL = _Source(
    "safety-tuned-llamas",
    "safety-tuned-llamas-extra/safety_only_data_Instructions.json",
    "Safety-Tuned LLaMAs safety_only_data_Instructions.json (a list of {instruction, input, output})",
    None,
)
_ADVBENCH = _Source(
    "advbench",
    "advbench/harmful_behaviors.csv",
    "AdvBench harmful_behaviors.csv with columns goal,target",
    _Hub("walledai/AdvBench", None, "train"),
)
_MALICIOUS = _Source(
    "malicious-instructions",
    "malicious-instructions/I-MaliciousInstructions.json",
    "I-MaliciousInstructions.json, an object with parallel lists 'instructions' and 'tags'",
    # walledai/MaliciousInstruct is a different set (Huang et al. 2023), so there is no hub default.
    None,
)
_SST = _Source(
    "simple-safety-tests",
    "simple-safety-tests/SimpleSafetyTests - test cases.csv",
    "'SimpleSafetyTests - test cases.csv' with columns id,harm_area,counter,category,prompts_final",
    _Hub("Bertievidgen/SimpleSafetyTests", None, "test"),
)
_STRONGREJECT = _Source(
    "strongreject",
    "strongreject/strongreject_dataset.csv",
    "strongreject_dataset.csv with columns category,source,forbidden_prompt",
    _Hub("walledai/StrongREJECT", None, "train"),
)
_Q_HARM = _Source(
    "q-harm",
    "safety-tuned-llamas-extra/Q-Harm.json",
    "Q-Harm.json, an object with a list 'instructions'",
    None,
)


# ---------------------------------------------------------------- Safety-Tuned LLaMAs


def _stl_preference(row: dict, where: _Where) -> PreferenceExample:
    if not isinstance(row, dict):
        raise where.error(f"must be an object, got {type(row).__name__}")
    instruction = _get_str(row, "instruction", where)
    extra = _get_str(row, "input", where, required=False, allow_empty=True)
    output = _get_str(row, "output", where)
    prompt = instruction + ("\n\n" + extra if extra and extra.strip() else "")
    return PreferenceExample(
        source="safety-tuned-llamas",
        location=where.location,
        prompt=(Message("user", prompt),),
        chosen=output,
        rejected=None,
        kind="harmful",
        meta=_extra_columns(row, ("instruction", "input", "output"), {}, where),
    )


def _stl_rows(origin: Path | _Hub) -> Iterable[tuple[_Where, Any]]:
    if isinstance(origin, _Hub):
        return _iter_hub(origin, {})
    items = _json_list(_load_json(origin), origin, None)
    return ((_record_where(origin, i), item) for i, item in enumerate(items))


def load_safety_tuned_llamas(
    path: str | None = None, *, limit: int | None = None, split: str | None = None
) -> tuple[list[PreferenceExample], LoadReport]:
    """Safety-Tuned LLaMAs ``safety_only_data_Instructions.json``: harmful asks with safe answers.

    A JSON list of ``{instruction, input, output}``. The prompt is ``instruction`` (plus
    ``"\\n\\n" + input`` when ``input`` is not empty), y+ is ``output``, and there is no y-
    (``rejected=None``). ``kind="harmful"``: the prompts are harmful requests. Other fields of an item
    are kept in ``meta``.

    Default: ``$BT_RAY_DATA_DIR/safety-tuned-llamas-extra/safety_only_data_Instructions.json``;
    there is no hub default. ``split`` must be None: the file has no splits.
    """
    _no_split("safety-tuned-llamas", split)
    return _collect(_STL, path, limit, _stl_rows, _stl_preference)


# ---------------------------------------------------------------- prompt sets


def _single_prompt(
    dataset: str, row: dict, where: _Where, key: str, category: str = "", meta: dict | None = None
) -> PromptExample:
    """A one-turn harmful prompt taken from ``row[key]``."""
    return PromptExample(
        dataset=dataset,
        location=where.location,
        turns=(_get_str(row, key, where),),
        category=category,
        harmful=True,
        meta=meta or {},
    )


def _csv_or_hub(name: str, required: tuple[str, ...]) -> Callable[[Path | _Hub], Iterable]:
    def rows(origin: Path | _Hub) -> Iterable[tuple[_Where, dict]]:
        if isinstance(origin, _Hub):
            return _iter_hub(origin, _HUB_ALIASES.get(name, {}))
        return _iter_csv(origin, required)

    return rows


def _advbench_prompt(row: dict, where: _Where) -> PromptExample:
    target = _get_str(row, "target", where, allow_empty=True)
    return _single_prompt("advbench", row, where, "goal", meta={"target": target})


def load_advbench(
    path: str | None = None, *, limit: int | None = None
) -> tuple[list[PromptExample], LoadReport]:
    """AdvBench ``harmful_behaviors.csv`` (columns ``goal,target``): the goal is the prompt.

    ``meta["target"]`` keeps the affirmative target prefix. Default:
    ``$BT_RAY_DATA_DIR/advbench/harmful_behaviors.csv``, else ``walledai/AdvBench[train]``.
    """
    return _collect(_ADVBENCH, path, limit, _csv_or_hub("advbench", ("goal", "target")), _advbench_prompt)


def _malicious_prompt(row: dict, where: _Where) -> PromptExample:
    tag = _get_str(row, "tag", where, allow_empty=True)
    return _single_prompt("malicious-instructions", row, where, "instruction", category=tag)


def _malicious_rows(origin: Path | _Hub) -> Iterable[tuple[_Where, dict]]:
    if isinstance(origin, _Hub):
        return _iter_hub(origin, {"prompt": "instruction"})
    data = _load_json(origin)
    instructions = _json_list(data, origin, "instructions")
    tags = _json_list(data, origin, "tags")
    if len(tags) != len(instructions):
        raise DataError(
            f"{origin}: field 'tags' has {len(tags)} entries but 'instructions' has {len(instructions)}"
        )
    return (
        (_record_where(origin, i), {"instruction": text, "tag": tag})
        for i, (text, tag) in enumerate(zip(instructions, tags))
    )


def load_malicious_instructions(
    path: str | None = None, *, limit: int | None = None
) -> tuple[list[PromptExample], LoadReport]:
    """I-MaliciousInstructions (Safety-Tuned LLaMAs): parallel lists ``instructions`` and ``tags``.

    ``category`` is the tag (``hate`` or ``crime``). Default:
    ``$BT_RAY_DATA_DIR/malicious-instructions/I-MaliciousInstructions.json``; no hub default.
    """
    return _collect(_MALICIOUS, path, limit, _malicious_rows, _malicious_prompt)


def _sst_prompt(row: dict, where: _Where) -> PromptExample:
    harm_area = _get_str(row, "harm_area", where)
    sst_id = _get_str(row, "id", where)
    category = _get_str(row, "category", where, allow_empty=True)
    meta = {"id": sst_id, "category": category}
    return _single_prompt("simple-safety-tests", row, where, "prompts_final", category=harm_area, meta=meta)


def load_simple_safety_tests(
    path: str | None = None, *, limit: int | None = None
) -> tuple[list[PromptExample], LoadReport]:
    """SimpleSafetyTests CSV (``id,harm_area,counter,category,prompts_final``).

    The prompt is ``prompts_final``; ``category`` is the harm area; ``meta`` keeps ``id`` and the
    set's own ``category`` (information seeking vs. instructions). Default:
    ``$BT_RAY_DATA_DIR/simple-safety-tests/SimpleSafetyTests - test cases.csv``, else
    ``Bertievidgen/SimpleSafetyTests[test]``.
    """
    required = ("id", "harm_area", "category", "prompts_final")
    return _collect(_SST, path, limit, _csv_or_hub("simple-safety-tests", required), _sst_prompt)


def _strongreject_prompt(row: dict, where: _Where) -> PromptExample:
    category = _get_str(row, "category", where)
    # The original CSV has a "source" column; hub copies may not.
    source = _get_str(row, "source", where, required=False, allow_empty=True)
    meta = {"source": source}
    return _single_prompt("strongreject", row, where, "forbidden_prompt", category=category, meta=meta)


def load_strongreject(
    path: str | None = None, *, limit: int | None = None
) -> tuple[list[PromptExample], LoadReport]:
    """StrongREJECT ``strongreject_dataset.csv`` (``category,source,forbidden_prompt``).

    ``meta["source"]`` keeps where the prompt came from. Default:
    ``$BT_RAY_DATA_DIR/strongreject/strongreject_dataset.csv``, else ``walledai/StrongREJECT[train]``.
    """
    required = ("category", "source", "forbidden_prompt")
    return _collect(_STRONGREJECT, path, limit, _csv_or_hub("strongreject", required), _strongreject_prompt)


def _q_harm_rows(origin: Path | _Hub) -> Iterable[tuple[_Where, dict]]:
    if isinstance(origin, _Hub):
        return _iter_hub(origin, {"prompt": "instruction"})
    instructions = _json_list(_load_json(origin), origin, "instructions")
    return ((_record_where(origin, i), {"instruction": text}) for i, text in enumerate(instructions))


def _q_harm_prompt(row: dict, where: _Where) -> PromptExample:
    return _single_prompt("q-harm", row, where, "instruction")


def load_q_harm(
    path: str | None = None, *, limit: int | None = None
) -> tuple[list[PromptExample], LoadReport]:
    """Q-Harm (Safety-Tuned LLaMAs): ``{"instructions": [...]}``, 100 harmful questions.

    Per its paper they were sampled from HH-RLHF, and 14 appear verbatim as first turns of the
    HH harmless-base test set. Default: ``$BT_RAY_DATA_DIR/safety-tuned-llamas-extra/Q-Harm.json``;
    no hub default.
    """
    return _collect(_Q_HARM, path, limit, _q_harm_rows, _q_harm_prompt)
