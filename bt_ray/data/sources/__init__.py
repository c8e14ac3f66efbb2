"""Data sources: read each public data set (local file or hub dataset) into the shared records.

Two registries, name -> loader function:

* ``PREFERENCE_SOURCES`` (``hh-rlhf``, ``oasst2``, ``safety-tuned-llamas``, ``jsonl``: examples as
  ``bt-ray onpolicy`` writes them, ``bt_ray.data.sources.jsonl``) give ``PreferenceExample`` rows for
  SFT/DPO recipes.
* ``PROMPT_SOURCES`` (``advbench``, ``malicious-instructions``, ``simple-safety-tests``,
  ``strongreject``, ``mt-bench``, ``hh-rlhf``, ``q-harm``, ``xstest``) give ``PromptExample`` rows for
  evaluation.

Every loader takes ``(path=None, *, limit=None)`` (preference loaders also ``split=None``: the
source's training split, see ``PREFERENCE_SPLITS``; those in ``PARTED_SOURCES`` also ``part``: a seeded
train/dev/test part of the file, ``bt_ray.data.parts``) and returns ``(records, LoadReport)``. ``path`` is

* a local file in the source's own format (``.gz`` files are read through gzip);
* a local directory: the source's standard file name is looked up inside it, either the bare file
  name (``harmful_behaviors.csv``) or its place in the shared layout (``advbench/harmful_behaviors.csv``),
  so both the source's own directory and the data root work;
* a hub dataset spec ``owner/name[@sub][[split]]``, e.g. ``Anthropic/hh-rlhf@harmless-base[train]``,
  read with ``datasets.load_dataset``. ``@sub`` is the ``data_dir`` for hh-rlhf and the config name
  otherwise; the split defaults to the source's usual one. Hub rows go through the same row parser
  as file rows (a few hub copies name a column differently; those names are mapped, see
  ``_files._HUB_ALIASES``);
* None: ``$BT_RAY_DATA_DIR/<shared layout path>`` when that variable is set, else the source's
  canonical hub dataset (``DEFAULT_HUB``), or a FileNotFoundError for sources without one.

Never train on what is evaluated: ``eval_test_sets`` lists what each evaluation set resolves to, and
``eval_overlap`` says whether a resolved training source is one of them (same real path, same
content, or same hub repo, subset and split); ``bt_ray.data.build.check_not_evaluated`` uses both.
The HH-RLHF preference loader reads harmless-base train by default, the prompt loader (evaluation)
harmless-base test.

Locations name the row: ``test.jsonl.gz:12`` (1-based line; for CSV the header is line 1, so the
number is the one an editor shows, also for quoted fields spanning several lines),
``Q-Harm.json record 7`` (0-based index into the JSON list) or
``Anthropic/hh-rlhf@harmless-base[test] record 12`` (0-based hub row index).

Layout: ``_files`` holds what every loader shares (``_Source``, ``_resolve``, the readers,
``_collect``); ``hh_rlhf``, ``oasst2``, ``safety_sets`` and ``mt_bench`` one family each; this module
the registries and what is public.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bt_ray.data.parts import PARTED_SOURCES, Part
from bt_ray.data.records import LoadReport, PreferenceExample, PromptExample
from bt_ray.data.sources._files import _HUB_SPEC, DATA_DIR_ENV, _Hub, _no_split, _resolve
from bt_ray.data.sources.hh_rlhf import (
    _HH_TEST,
    _HH_TRAIN,
    _hh_origin,
    load_hh_rlhf_preferences,
    load_hh_rlhf_prompts,
    parse_hh_dialogue,
)
from bt_ray.data.sources.jsonl import load_jsonl_preferences
from bt_ray.data.sources.mt_bench import _MT_BENCH, load_mt_bench
from bt_ray.data.sources.oasst2 import _OASST2, load_oasst2
from bt_ray.data.sources.safety_sets import (
    _ADVBENCH,
    _MALICIOUS,
    _Q_HARM,
    _SST,
    _STL,
    _STRONGREJECT,
    load_advbench,
    load_malicious_instructions,
    load_q_harm,
    load_safety_tuned_llamas,
    load_simple_safety_tests,
    load_strongreject,
)
from bt_ray.data.sources.xstest import _XSTEST, load_xstest

__all__ = [
    "DATA_DIR_ENV",
    "DEFAULT_HUB",
    "PREFERENCE_SOURCES",
    "PARTED_SOURCES",
    "PREFERENCE_SPLITS",
    "PROMPT_SOURCES",
    "EvalTestSet",
    "eval_overlap",
    "eval_test_sets",
    "load_advbench",
    "load_hh_rlhf_preferences",
    "load_hh_rlhf_prompts",
    "load_malicious_instructions",
    "load_mt_bench",
    "load_oasst2",
    "load_preferences",
    "load_prompts",
    "load_q_harm",
    "load_safety_tuned_llamas",
    "load_simple_safety_tests",
    "load_strongreject",
    "load_xstest",
    "parse_hh_dialogue",
    "parse_origin",
    "parse_source_spec",
    "resolve_preference_source",
]

DEFAULT_HUB: dict[str, str | None] = {
    s.name: (str(s.hub) if s.hub else None)
    for s in (_HH_TRAIN, _OASST2, _STL, _ADVBENCH, _MALICIOUS, _SST, _STRONGREJECT, _MT_BENCH, _Q_HARM,
              _XSTEST)
}
"""The hub dataset each source reads when no path is given and $BT_RAY_DATA_DIR is unset."""


# ---------------------------------------------------------------- public entry points


def parse_source_spec(spec: str) -> tuple[str, str | None]:
    """Split ``NAME`` or ``NAME:PATH_OR_HUB_ID`` at the first colon.

    Args:
        spec: e.g. ``advbench``, ``hh-rlhf:/data/hh/test.jsonl.gz`` or
            ``hh-rlhf:Anthropic/hh-rlhf@harmless-base[train]``.

    Returns:
        ``(name, path)``; ``path`` is None when the spec has no colon or nothing after it.

    Raises:
        ValueError: the name part is empty.
    """
    name, _, path = spec.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"source spec {spec!r} has no source name; expected NAME or NAME:PATH")
    return name, (path or None)


def load_preferences(
    name: str, path: str | None = None, *, limit: int | None = None, split: str | None = None,
    part: Part | None = None,
) -> tuple[list[PreferenceExample], LoadReport]:
    """Load a preference source by name (see ``PREFERENCE_SOURCES``).

    Args:
        name: source name, e.g. ``hh-rlhf``.
        path: local file, local directory or hub spec; None for the default (module docstring).
        limit: stop once this many examples are used; None reads everything.
        split: the source's split (``PREFERENCE_SPLITS``); None = its training split.
        part: keep this seeded part of the data (``bt_ray.data.parts``; sources in ``PARTED_SOURCES``).

    Returns:
        The examples and the load report.

    Raises:
        ValueError: unknown source name, a bad ``limit``, or a ``split`` the source cannot apply.
        FileNotFoundError: the data cannot be found locally or loaded from the hub.
        DataError: a malformed row (the message names file, line or record, and field).
    """
    loader = _lookup(PREFERENCE_SOURCES, name, "preference")
    return loader(path, limit=limit, split=split, **_part_arg(name, part))


def load_prompts(
    name: str, path: str | None = None, *, limit: int | None = None, part: Part | None = None
) -> tuple[list[PromptExample], LoadReport]:
    """Load a prompt (evaluation) source by name (see ``PROMPT_SOURCES``).

    Args:
        name: source name, e.g. ``advbench``.
        path: local file, local directory or hub spec; None for the default (module docstring).
        limit: stop once this many prompts are used; None reads everything.
        part: keep this seeded part of the data (``bt_ray.data.parts``; sources in ``PARTED_SOURCES``).

    Returns:
        The prompts and the load report.

    Raises:
        ValueError: unknown source name or a bad ``limit``.
        FileNotFoundError: the data cannot be found locally or loaded from the hub.
        DataError: a malformed row (the message names file, line or record, and field).
    """
    return _lookup(PROMPT_SOURCES, name, "prompt")(path, limit=limit, **_part_arg(name, part))


def _part_arg(name: str, part: Part | None) -> dict:
    """``{"part": part}`` for a source that can be parted; a part for any other source is an error."""
    if part is None:
        return {}
    if name not in PARTED_SOURCES:
        raise ValueError(f"{name}: part must be null: only {', '.join(PARTED_SOURCES)} can be cut into "
                         f"seeded parts; got part {part.name!r}")
    return {"part": part}


def _lookup(table: dict[str, Callable], name: str, kind: str) -> Callable:
    if name in table:
        return table[name]
    msg = f"unknown {kind} source {name!r}; known {kind} sources: {', '.join(sorted(table))}"
    other = PROMPT_SOURCES if table is PREFERENCE_SOURCES else PREFERENCE_SOURCES
    if name in other:
        msg += f" ({name!r} is a {'prompt' if kind == 'preference' else 'preference'} source)"
    else:
        close = difflib.get_close_matches(name, list(table), n=1)
        if close:
            msg += f"; did you mean {close[0]!r}?"
    raise ValueError(msg)


# ---------------------------------------------------------------- registries

PREFERENCE_SOURCES: dict[str, Callable[..., tuple[list[PreferenceExample], LoadReport]]] = {
    "hh-rlhf": load_hh_rlhf_preferences,
    "oasst2": load_oasst2,
    "safety-tuned-llamas": load_safety_tuned_llamas,
    "jsonl": load_jsonl_preferences,
}
"""Preference sources: name -> ``loader(path=None, *, limit=None, split=None) -> (examples, report)``."""

PREFERENCE_SPLITS: dict[str, tuple[str, ...]] = {
    "hh-rlhf": ("train", "test"),
    "oasst2": (),
    "safety-tuned-llamas": (),
    "jsonl": (),
}
"""Splits a preference source's ``split`` may name (empty: none; ``split`` must be None)."""

PROMPT_SOURCES: dict[str, Callable[..., tuple[list[PromptExample], LoadReport]]] = {
    "advbench": load_advbench,
    "malicious-instructions": load_malicious_instructions,
    "simple-safety-tests": load_simple_safety_tests,
    "strongreject": load_strongreject,
    "mt-bench": load_mt_bench,
    "hh-rlhf": load_hh_rlhf_prompts,
    "q-harm": load_q_harm,
    "xstest": load_xstest,
}
"""Prompt sources: name -> ``loader(path=None, *, limit=None) -> (prompts, report)``."""




# ---------------------------------------------------------------- never train on what is evaluated

_PROMPT_SOURCE_DATA = {
    "advbench": _ADVBENCH,
    "malicious-instructions": _MALICIOUS,
    "simple-safety-tests": _SST,
    "strongreject": _STRONGREJECT,
    "mt-bench": _MT_BENCH,
    "hh-rlhf": _HH_TEST,
    "q-harm": _Q_HARM,
    "xstest": _XSTEST,
}


@dataclass(frozen=True)
class EvalTestSet:
    """What an evaluation set resolves to, compared with every training source.

    Attributes:
        name: the evaluation dataset name (``bt_ray.eval.config.EVAL_DATASETS``).
        where: how it is read by default, for messages.
        file: its file (real path) when ``$BT_RAY_DATA_DIR`` holds it, else None.
        hub: its hub dataset, when it has one.
        canonical: ``(size, sha256)`` of its canonical file when known (recognises copies elsewhere).
    """

    name: str
    where: str
    file: Path | None = None
    hub: _Hub | None = None
    canonical: tuple[int, str] | None = None


def eval_test_sets() -> list[EvalTestSet]:
    """The evaluation test sets, resolved as evaluation reads them by default (nothing is read).

    Returns:
        One entry per name in ``EVAL_DATASETS``, at its default (``$BT_RAY_DATA_DIR`` file and hub
        dataset). ``synthetic`` has neither file nor hub: its eval prompts are generated from the
        world's held-out reservations, which no training split draws from.
    """
    from bt_ray.eval.config import EVAL_DATASETS

    out = []
    root = os.environ.get(DATA_DIR_ENV)
    for name in EVAL_DATASETS:
        source = _PROMPT_SOURCE_DATA.get(name)
        if source is None:
            out.append(EvalTestSet(name, f"{name} eval prompts (generated)"))
            continue
        candidate = Path(root).expanduser() / source.local_file if root else None
        file = candidate.resolve() if candidate is not None and candidate.is_file() else None
        where = " or ".join(str(x) for x in (file, source.hub) if x is not None) or source.local_file
        canonical = (source.size, source.sha256) if source.size and source.sha256 else None
        out.append(EvalTestSet(name, where, file, source.hub, canonical))
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _same_hub(a: _Hub, b: _Hub) -> bool:
    """Same repo and split, and the same subset (no subset loads them all, so it overlaps any)."""
    return a.repo == b.repo and a.split == b.split and (a.sub is None or b.sub is None or a.sub == b.sub)


def eval_overlap(origin: Path | _Hub, test_sets: list[EvalTestSet]) -> EvalTestSet | None:
    """The evaluation test set that ``origin`` (a resolved training source) is, or None.

    A file matches by real path, or by content (SHA-256) when the test set's file or canonical hash
    is known; a hub dataset matches by repo, subset and split.
    """
    if isinstance(origin, _Hub):
        return next((t for t in test_sets if t.hub is not None and _same_hub(origin, t.hub)), None)
    real = origin.resolve()
    size = real.stat().st_size
    digest = None
    for t in test_sets:
        if t.file is not None and t.file == real:
            return t
        hashes = {t.canonical[1]} if t.canonical and t.canonical[0] == size else set()
        if t.file is not None and t.file.stat().st_size == size:
            hashes.add(_sha256(t.file))
        if hashes:
            digest = digest or _sha256(real)
            if digest in hashes:
                return t
    return None


def resolve_preference_source(name: str, path: str | None = None, split: str | None = None) -> Path | _Hub:
    """Where ``load_preferences(name, path, split=split)`` would read from, without reading it.

    Raises:
        ValueError: unknown source name or a ``split`` the source cannot apply.
        FileNotFoundError: the data cannot be found (the message says where else it can come from).
    """
    _lookup(PREFERENCE_SOURCES, name, "preference")
    if name == "hh-rlhf":
        return _hh_origin(path, split, "train")
    _no_split(name, split)
    if name == "jsonl":  # a file only: no default location, no hub
        if path is None or not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"jsonl: {path!r} is not a file; give the source a path to a .jsonl file")
        return Path(path).expanduser()
    return _resolve(_OASST2 if name == "oasst2" else _STL, path)


def parse_origin(text: str) -> Path | _Hub | None:
    """A ``LoadReport.origin`` read back: an existing file, a hub spec, or None (anything else)."""
    if Path(text).is_file():
        return Path(text)
    match = _HUB_SPEC.match(text)
    if match and match["split"]:
        return _Hub(match["repo"], match["sub"], match["split"])
    return None
