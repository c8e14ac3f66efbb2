"""XSTest (Röttger et al. 2024): 250 safe prompts that sound unsafe, and 200 unsafe contrast prompts.

The safe prompts measure over-refusal and the ``[RESET]`` rate where no reset is wanted; the unsafe
contrast prompts are a small harmful set of the same shapes.
"""

from __future__ import annotations

from pathlib import Path

from bt_ray.data.parts import Part, load_part
from bt_ray.data.records import LoadReport, PromptExample
from bt_ray.data.sources._files import _collect, _get_str, _Hub, _iter_csv, _iter_hub, _Skip, _Source, _Where

_XSTEST = _Source(
    "xstest",
    "xstest/xstest_prompts.csv",
    "XSTest xstest_prompts.csv with columns id,prompt,type,label,focus,note",
    # No hub default: the CSV ships here. A hub id given as path is read with the same parser (the hub
    # copy walledai/XSTest has prompt, type, label, focus, note but no id).
    None,
)
_XSTEST_COLUMNS = ("id", "prompt", "type", "label", "focus", "note")
_XSTEST_LABELS = {"safe": False, "unsafe": True}
XSTEST_DATASETS = {True: "xstest-unsafe", False: "xstest-safe"}
"""The ``dataset`` name of a row, by its prompt's ``harmful`` flag (eval keys its metrics by it)."""


def _xstest_prompt(row: dict, where: _Where) -> PromptExample:
    label = _get_str(row, "label", where)
    if label not in _XSTEST_LABELS:
        raise where.error(f"must be safe or unsafe, got {label!r}", field="label")
    # Rows name their half: the safe prompts and the contrast prompts are two sets with different
    # metrics (over-refusal vs unsafe rate), so one eval can hold both without mixing their tables.
    return PromptExample(
        dataset=XSTEST_DATASETS[_XSTEST_LABELS[label]],
        location=where.location,
        turns=(_get_str(row, "prompt", where),),
        category=_get_str(row, "type", where),
        harmful=_XSTEST_LABELS[label],
        meta={"id": str(row["id"]) if row.get("id") is not None else "",
              "focus": row.get("focus") or "", "note": row.get("note") or ""},
    )


def _xstest_key(row: dict, where: _Where) -> str:
    return _get_str(row, "prompt", where)


def load_xstest(
    path: str | None = None, *, limit: int | None = None, part: Part | None = None
) -> tuple[list[PromptExample], LoadReport]:
    """XSTest ``xstest_prompts.csv``: one single-turn prompt per row.

    ``harmful`` is ``label == "unsafe"`` (the 200 contrast prompts; the 250 others are safe),
    ``category`` is ``type`` (e.g. ``homonyms``, ``contrast_homonyms``), ``meta`` keeps ``id``,
    ``focus`` and ``note`` (``""`` when empty). A label other than safe/unsafe is an error.

    ``part`` keeps one seeded part (``bt_ray.data.parts``, by the prompt text), e.g. a dev part of
    the safe prompts to calibrate the ``[RESET]`` bias on and a disjoint test part to report on
    (with evaluation's ``harmful: false`` filter; ``part_fractions: [0, 0.5, 0.5]`` halves the set,
    since nothing trains on XSTest). Default: ``$BT_RAY_DATA_DIR/xstest/xstest_prompts.csv``; there
    is no hub default.
    """

    def rows(origin: Path | _Hub):
        return _iter_hub(origin, {}) if isinstance(origin, _Hub) else _iter_csv(origin, _XSTEST_COLUMNS)

    return load_part(part, lambda parse: _collect(_XSTEST, path, limit, rows, parse),
                     _xstest_prompt, _xstest_key, _Skip, limit)
