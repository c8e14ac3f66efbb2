"""MT-Bench: the 80 two-turn benign questions (``harmful=False``), to check helpfulness is kept."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from bt_ray.data.records import LoadReport, PromptExample
from bt_ray.data.sources._files import (
    _HUB_ALIASES,
    _collect,
    _get_str,
    _Hub,
    _iter_hub,
    _iter_jsonl,
    _Source,
    _Where,
)

_MT_BENCH = _Source(
    "mt-bench",
    "mt-bench/question.jsonl",
    "MT-Bench question.jsonl with question_id, category, turns[, reference]",
    _Hub("HuggingFaceH4/mt_bench_prompts", None, "train"),
)


def _mt_bench_prompt(row: dict, where: _Where) -> PromptExample:
    question_id = row.get("question_id")
    if isinstance(question_id, bool) or not isinstance(question_id, int):
        raise where.error(f"must be an integer, got {question_id!r}", field="question_id")
    category = _get_str(row, "category", where)
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns:
        raise where.error(f"must be a non-empty list of strings, got {turns!r}", field="turns")
    for i, turn in enumerate(turns):
        if not isinstance(turn, str) or not turn.strip():
            raise where.error("must be a non-empty string", field=f"turns[{i}]")
    reference = row.get("reference")
    if reference is not None and not isinstance(reference, list):
        raise where.error(f"must be a list, got {type(reference).__name__}", field="reference")
    return PromptExample(
        dataset="mt-bench",
        location=where.location,
        turns=tuple(turns),
        category=category,
        harmful=False,
        # The hub copy has reference [] where the file has none: both become None.
        meta={"question_id": question_id, "reference": reference or None},
    )


def load_mt_bench(
    path: str | None = None, *, limit: int | None = None
) -> tuple[list[PromptExample], LoadReport]:
    """MT-Bench ``question.jsonl``: two user turns per question, ``harmful=False``.

    ``meta`` keeps ``question_id`` and ``reference`` (None when the question has none). Default:
    ``$BT_RAY_DATA_DIR/mt-bench/question.jsonl``, else ``HuggingFaceH4/mt_bench_prompts[train]``.
    """

    def rows(origin: Path | _Hub) -> Iterable[tuple[_Where, dict]]:
        if isinstance(origin, _Hub):
            return _iter_hub(origin, _HUB_ALIASES["mt-bench"])
        return _iter_jsonl(origin)

    return _collect(_MT_BENCH, path, limit, rows, _mt_bench_prompt)
