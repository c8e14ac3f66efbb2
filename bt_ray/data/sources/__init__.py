"""Data sources: read each public data set (local file or hub dataset) into the shared records.

Two registries, name -> loader function:

* ``PREFERENCE_SOURCES`` (``hh-rlhf``, ``oasst2``, ``safety-tuned-llamas``) give
  ``PreferenceExample`` rows for SFT/DPO recipes.
* ``PROMPT_SOURCES`` (``advbench``, ``malicious-instructions``, ``simple-safety-tests``,
  ``strongreject``, ``mt-bench``, ``hh-rlhf``, ``q-harm``) give ``PromptExample`` rows for evaluation.

Every loader takes ``(path=None, *, limit=None)`` (preference loaders also ``split=None``: the
source's training split, see ``PREFERENCE_SPLITS``) and returns ``(records, LoadReport)``. ``path`` is

* a local file in the source's own format (``.gz`` files are read through gzip);
* a local directory: the source's standard file name is looked up inside it, either the bare file
  name (``harmful_behaviors.csv``) or its place in the shared layout (``advbench/harmful_behaviors.csv``),
  so both the source's own directory and the data root work;
* a hub dataset spec ``owner/name[@sub][[split]]``, e.g. ``Anthropic/hh-rlhf@harmless-base[train]``,
  read with ``datasets.load_dataset``. ``@sub`` is the ``data_dir`` for hh-rlhf and the config name
  otherwise; the split defaults to the source's usual one. Hub rows go through the same row parser
  as file rows (a few hub copies name a column differently; those names are mapped, see ``_HUB_ALIASES``);
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
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import gzip
import hashlib
import io
import itertools
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bt_ray.data.records import DataError, LoadReport, Message, PreferenceExample, PromptExample

DATA_DIR_ENV = "BT_RAY_DATA_DIR"

# A local path whose last part ends like this is never taken for a hub id: a missing "x/y.csv" is a
# missing file, not a dataset to download.
_FILE_SUFFIXES = (".csv", ".json", ".jsonl", ".gz", ".parquet", ".txt")
_HUB_SPEC = re.compile(r"^(?P<repo>[\w][\w.-]*/[\w.-]+)(?:@(?P<sub>[\w./-]+))?(?:\[(?P<split>[\w.-]+)\])?$")


# ---------------------------------------------------------------- where a row came from


@dataclass(frozen=True)
class _Where:
    """One row's position: ``origin`` names it in errors, ``short`` in record locations."""

    origin: str  # full path or hub spec
    short: str  # file name or hub spec
    pos: str  # ":12" (line) or " record 7" (index)

    @property
    def location(self) -> str:
        return f"{self.short}{self.pos}"

    def error(self, problem: str, field: str | None = None) -> DataError:
        where = f"{self.origin}{self.pos}"
        return DataError(f"{where}: field {field!r} {problem}" if field else f"{where}: {problem}")


@dataclass(frozen=True)
class _Hub:
    """A hub dataset to read with ``datasets.load_dataset``."""

    repo: str
    sub: str | None
    split: str
    sub_arg: str = "name"  # load_dataset keyword that receives ``sub``: "name" or "data_dir"
    note: str = dataclasses.field(default="", compare=False)  # why the hub was tried, for the error message
    hint: str = dataclasses.field(default="", compare=False)  # what to do when it cannot be loaded

    def __str__(self) -> str:
        sub = f"@{self.sub}" if self.sub else ""
        return f"{self.repo}{sub}[{self.split}]"


@dataclass(frozen=True)
class _Source:
    """Where a source's data lives."""

    name: str
    local_file: str  # path below $BT_RAY_DATA_DIR (the shared datasets layout)
    expected: str  # what the file is, for error messages
    hub: _Hub | None  # canonical hub dataset; None when there is no faithful hub copy
    extra_dir_names: tuple[str, ...] = ()  # other names looked for inside a directory
    missing_hint: str = ""  # added to "not found" errors: where else the data can come from
    sha256: str | None = None  # of the canonical file, when known: recognises copies of a test set
    size: int | None = None  # bytes of that file (only files of this size are hashed)

    def dir_names(self) -> tuple[str, ...]:
        return (Path(self.local_file).name, *self.extra_dir_names, self.local_file)


class _Skip:
    """A row left out by the named rule (counted in ``LoadReport.skipped``)."""

    __slots__ = ("rule",)

    def __init__(self, rule: str):
        self.rule = rule


_HH_EXPECTED = "Anthropic HH-RLHF JSONL (.jsonl or .jsonl.gz) with 'chosen' and 'rejected' dialogues"
_HH_TRAIN = _Source(
    "hh-rlhf",
    "hh-rlhf/harmless-base/train.jsonl.gz",
    _HH_EXPECTED + ", harmless-base train split",
    _Hub("Anthropic/hh-rlhf", "harmless-base", "train", sub_arg="data_dir"),
    extra_dir_names=("harmless-base/train.jsonl.gz", "train.jsonl", "harmless-base/train.jsonl"),
    missing_hint=(
        "the HH-RLHF harmless-base train split is not shipped in the shared datasets (only its test "
        "split, which evaluation uses); give the source a path: a local harmless-base/train.jsonl.gz "
        "(or a directory holding it), or the hub id Anthropic/hh-rlhf@harmless-base[train]"
    ),
)
_HH_TEST = _Source(
    "hh-rlhf",
    "hh-rlhf/harmless-base/test.jsonl.gz",
    _HH_EXPECTED + ", harmless-base test split",
    _Hub("Anthropic/hh-rlhf", "harmless-base", "test", sub_arg="data_dir"),
    extra_dir_names=("harmless-base/test.jsonl.gz", "test.jsonl", "harmless-base/test.jsonl"),
    sha256="ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03",  # the shipped file
    size=742801,
)
_HH_SPLITS = {"train": _HH_TRAIN, "test": _HH_TEST}
_OASST2 = _Source(
    "oasst2",
    "oasst2/2023-11-05_oasst2_ready.trees.jsonl.gz",
    "OpenAssistant-2 message trees (*.trees.jsonl[.gz]) or flat messages (*.messages.jsonl[.gz])",
    # The hub copy is the flat messages table (one row per message); it is assembled into trees.
    _Hub("OpenAssistant/oasst2", None, "train"),
    extra_dir_names=(
        "2023-11-05_oasst2_ready.trees.jsonl",
        "2023-11-05_oasst2_ready.messages.jsonl.gz",
        "2023-11-05_oasst2_ready.messages.jsonl",
    ),
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
_MT_BENCH = _Source(
    "mt-bench",
    "mt-bench/question.jsonl",
    "MT-Bench question.jsonl with question_id, category, turns[, reference]",
    _Hub("HuggingFaceH4/mt_bench_prompts", None, "train"),
)
_Q_HARM = _Source(
    "q-harm",
    "safety-tuned-llamas-extra/Q-Harm.json",
    "Q-Harm.json, an object with a list 'instructions'",
    None,
)

# Hub copies that name a column differently from the original file: hub name -> file name.
_HUB_ALIASES: dict[str, dict[str, str]] = {
    "advbench": {"prompt": "goal"},
    "simple-safety-tests": {"prompt": "prompts_final"},
    "strongreject": {"prompt": "forbidden_prompt"},
    "mt-bench": {"prompt": "turns", "prompt_id": "question_id"},
}

DEFAULT_HUB: dict[str, str | None] = {
    s.name: (str(s.hub) if s.hub else None)
    for s in (_HH_TRAIN, _OASST2, _STL, _ADVBENCH, _MALICIOUS, _SST, _STRONGREJECT, _MT_BENCH, _Q_HARM)
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
    name: str, path: str | None = None, *, limit: int | None = None, split: str | None = None
) -> tuple[list[PreferenceExample], LoadReport]:
    """Load a preference source by name (see ``PREFERENCE_SOURCES``).

    Args:
        name: source name, e.g. ``hh-rlhf``.
        path: local file, local directory or hub spec; None for the default (module docstring).
        limit: stop once this many examples are used; None reads everything.
        split: the source's split (``PREFERENCE_SPLITS``); None = its training split.

    Returns:
        The examples and the load report.

    Raises:
        ValueError: unknown source name, a bad ``limit``, or a ``split`` the source cannot apply.
        FileNotFoundError: the data cannot be found locally or loaded from the hub.
        DataError: a malformed row (the message names file, line or record, and field).
    """
    return _lookup(PREFERENCE_SOURCES, name, "preference")(path, limit=limit, split=split)


def load_prompts(
    name: str, path: str | None = None, *, limit: int | None = None
) -> tuple[list[PromptExample], LoadReport]:
    """Load a prompt (evaluation) source by name (see ``PROMPT_SOURCES``).

    Args:
        name: source name, e.g. ``advbench``.
        path: local file, local directory or hub spec; None for the default (module docstring).
        limit: stop once this many prompts are used; None reads everything.

    Returns:
        The prompts and the load report.

    Raises:
        ValueError: unknown source name or a bad ``limit``.
        FileNotFoundError: the data cannot be found locally or loaded from the hub.
        DataError: a malformed row (the message names file, line or record, and field).
    """
    return _lookup(PROMPT_SOURCES, name, "prompt")(path, limit=limit)


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


# ---------------------------------------------------------------- resolving a path


def _resolve(source: _Source, path: str | os.PathLike | None) -> Path | _Hub:
    """Turn the user's ``path`` argument into a local file or a hub dataset (nothing is read)."""
    hint = f"; {source.missing_hint}" if source.missing_hint else ""
    if path is None:
        root = os.environ.get(DATA_DIR_ENV)
        if root:
            file = Path(root).expanduser() / source.local_file
            if not file.is_file():
                raise FileNotFoundError(
                    f"{source.name}: {file} not found ({DATA_DIR_ENV}={root}); "
                    f"expected {source.expected}{hint}"
                )
            return file
        if source.hub is None:
            raise FileNotFoundError(
                f"{source.name}: no path given, {DATA_DIR_ENV} is not set, and this source has no hub "
                f"dataset; pass the path of {source.expected}, or set {DATA_DIR_ENV} to a directory "
                f"holding {source.local_file}"
            )
        note = f"the default for {source.name}: no path was given and {DATA_DIR_ENV} is not set"
        return dataclasses.replace(source.hub, note=note, hint=source.missing_hint)

    text = os.fspath(path)
    local = Path(text).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        for name in source.dir_names():
            if (local / name).is_file():
                return local / name
        raise FileNotFoundError(
            f"{source.name}: directory {local} holds none of {', '.join(source.dir_names())}; "
            f"expected {source.expected}{hint}"
        )
    match = _HUB_SPEC.match(text)
    if match and not text.startswith((".", "~")) and not text.lower().endswith(_FILE_SUFFIXES):
        default = source.hub
        return _Hub(
            match["repo"],
            match["sub"],
            match["split"] or (default.split if default else "train"),
            sub_arg=default.sub_arg if default else "name",
            note=f"{text!r} is not a local file or directory",
        )
    raise FileNotFoundError(
        f"{source.name}: {local} does not exist; expected {source.expected} "
        f"(or a directory holding it, or a hub id owner/name)"
    )


def _hub_split_given(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a hub spec that names its split (``...[train]``)."""
    return path is not None and bool(re.search(r"\[[\w.-]+\]$", os.fspath(path)))


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


def _no_split(name: str, split: str | None) -> None:
    if split is not None:
        raise ValueError(f"{name}: this source has no splits to choose from, so split must be null; got "
                         f"{split!r} (choose its data with path)")


# ---------------------------------------------------------------- readers


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_text(path: Path) -> str:
    """Read a whole (possibly gzipped) UTF-8 file; a BOM is dropped."""
    try:
        with _open_binary(path) as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a readable gzip file ({e})") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[_Where, dict]]:
    """Yield each JSON object line; blank lines are not rows and are passed over."""
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                where = _Where(str(path), path.name, f":{lineno}")
                try:
                    text = raw.decode("utf-8-sig")
                except UnicodeDecodeError as e:
                    raise where.error(f"not valid UTF-8 ({e.reason})") from None
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    raise where.error(f"not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise where.error(f"expected a JSON object, got {type(row).__name__}")
                yield where, row
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a readable gzip file ({e})") from e


def _iter_csv(path: Path, required: tuple[str, ...]) -> Iterator[tuple[_Where, dict]]:
    """Yield each CSV data row as a dict; the location is the line the row starts on."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: empty file; expected a header with columns {','.join(required)}") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(
            f"{path}:1: missing column(s) {', '.join(map(repr, missing))}; the header has {','.join(header)}"
        )
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}:{start}: malformed CSV ({e})") from None
        if not row:  # a blank line is not a row
            continue
        where = _Where(str(path), path.name, f":{start}")
        if len(row) != len(header):
            raise where.error(f"has {len(row)} fields but the header has {len(header)}")
        yield where, dict(zip(header, row))


def _load_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None


def _json_list(data: Any, path: Path, key: str | None) -> list:
    """The list at ``data[key]`` (or ``data`` itself when ``key`` is None)."""
    if key is None:
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list, got {type(data).__name__}")
        return data
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with a list {key!r}, got {type(data).__name__}")
    if key not in data:
        raise DataError(f"{path}: field {key!r} is missing (keys: {', '.join(map(repr, data))})")
    if not isinstance(data[key], list):
        raise DataError(f"{path}: field {key!r} must be a list, got {type(data[key]).__name__}")
    return data[key]


def _record_where(path: Path, index: int) -> _Where:
    return _Where(str(path), path.name, f" record {index}")


def _iter_hub(hub: _Hub, aliases: dict[str, str]) -> Iterator[tuple[_Where, dict]]:
    """Yield the rows of a hub dataset, renaming the columns that the hub copy names differently."""
    try:
        import datasets  # imported here: it is slow to import and only the hub path needs it

        kwargs: dict[str, Any] = {"split": hub.split}
        if hub.sub:
            kwargs[hub.sub_arg] = hub.sub
        dataset = datasets.load_dataset(hub.repo, **kwargs)
    except Exception as e:  # network, auth and config errors all mean "not available"
        hint = f"; {hub.hint}" if hub.hint else ""
        raise FileNotFoundError(
            f"tried the hub dataset {hub} because {hub.note}, and loading it failed: {type(e).__name__}: {e}"
            f"{hint}"
        ) from e
    for index, row in enumerate(dataset):
        row = dict(row)
        for hub_name, file_name in aliases.items():
            if file_name not in row and hub_name in row:
                row[file_name] = row.pop(hub_name)
        yield _Where(str(hub), str(hub), f" record {index}"), row


# ---------------------------------------------------------------- field helpers


def _get_str(row: dict, key: str, where: _Where, *, required: bool = True, allow_empty: bool = False):
    """``row[key]`` as a string; missing/None is an error when ``required``, else gives None."""
    value = row.get(key)
    if value is None:
        if required:
            raise where.error("is missing", field=key)
        return None
    if not isinstance(value, str):
        raise where.error(f"must be a string, got {type(value).__name__}", field=key)
    if not allow_empty and not value.strip():
        raise where.error("is empty", field=key)
    return value


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or an int >= 0; got {limit!r}")


def _collect(
    source: _Source,
    path: str | os.PathLike | None,
    limit: int | None,
    rows: Callable[[Path | _Hub], Iterable[tuple[_Where, dict]]],
    parse: Callable[[dict, _Where], Any],
    *,
    origin: Path | _Hub | None = None,
) -> tuple[list, LoadReport]:
    """Read rows one by one, parse each into a record or a ``_Skip``, stop at ``limit`` used.

    ``origin`` is the already resolved data (None: resolve ``path`` for ``source``).
    """
    _check_limit(limit)
    origin = _resolve(source, path) if origin is None else origin
    report = LoadReport(source=source.name, origin=str(origin))
    out: list = []
    if limit == 0:
        return out, report
    for where, row in rows(origin):
        report.num_read += 1
        result = parse(row, where)
        if isinstance(result, _Skip):
            report.skip(result.rule)
            continue
        out.append(result)
        report.num_used += 1
        if limit is not None and report.num_used >= limit:
            break
    return out, report


# ---------------------------------------------------------------- HH-RLHF

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


def _extra_columns(row: dict, known: tuple[str, ...], meta: dict, where: _Where) -> dict:
    """``meta`` plus every field of ``row`` outside ``known`` (e.g. precomputed judge labels that the
    recipes' ``judge_filter: column`` reads); a field that would overwrite a ``meta`` key is an error."""
    out = dict(meta)
    for key, value in row.items():
        if key in known:
            continue
        if key in out:
            raise where.error(f"clashes with the loader's own meta key {key!r}; rename the column", field=key)
        out[key] = value
    return out


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


def _hh_rows(origin: Path | _Hub) -> Iterable[tuple[_Where, dict]]:
    return _iter_hub(origin, {}) if isinstance(origin, _Hub) else _iter_jsonl(origin)


def load_hh_rlhf_preferences(
    path: str | None = None, *, limit: int | None = None, split: str | None = None
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
    """
    origin = _hh_origin(path, split, "train")
    return _collect(_HH_TRAIN, path, limit, _hh_rows, _hh_preference, origin=origin)


def load_hh_rlhf_prompts(
    path: str | None = None, *, limit: int | None = None
) -> tuple[list[PromptExample], LoadReport]:
    """The HH-RLHF harmless-base TEST dialogues as single-turn harmful prompts (the paper's dev set).

    ``PromptExample`` holds only user turns, with no assistant turns between them, so a multi-turn
    HH dialogue cannot be replayed faithfully. Each row gives its FIRST Human turn as a one-turn
    prompt, and ``meta["num_turns"]`` records how many Human turns the prompt part of ``chosen``
    had. Only ``chosen`` is read; no row is left out (the first Human turn is clean even in the
    rows that ``load_hh_rlhf_preferences`` skips). Default: ``$BT_RAY_DATA_DIR/hh-rlhf/harmless-base/
    test.jsonl.gz``, else ``Anthropic/hh-rlhf@harmless-base[test]``.
    """
    return _collect(_HH_TEST, path, limit, _hh_rows, _hh_prompt)


# ---------------------------------------------------------------- OpenAssistant-2

_OA_ROLES = {"prompter": "user", "assistant": "assistant"}


@dataclass
class _OANode:
    message_id: str
    role: str  # "user" or "assistant"
    text: str
    rank: int | None
    deleted: bool
    review_result: bool | None
    lang: str | None
    where: _Where
    field: str  # field path of this message in its row, for errors ("prompt.replies[0]" or "")
    replies: list[_OANode] = dataclasses.field(default_factory=list)


def _oa_node(msg: Any, where: _Where, prefix: str) -> _OANode:
    """Check one message's fields (``prefix`` is its field path, "" for a flat row)."""

    def name(key: str) -> str:
        return f"{prefix}.{key}" if prefix else key

    if not isinstance(msg, dict):
        raise where.error(f"must be an object, got {type(msg).__name__}", field=prefix or "row")
    message_id = msg.get("message_id")
    if not isinstance(message_id, str) or not message_id:
        raise where.error("must be a non-empty string", field=name("message_id"))
    role = msg.get("role")
    if role not in _OA_ROLES:
        raise where.error(f"must be 'prompter' or 'assistant', got {role!r}", field=name("role"))
    text = msg.get("text")
    if not isinstance(text, str):
        raise where.error(f"must be a string, got {type(text).__name__}", field=name("text"))
    rank = msg.get("rank")
    if isinstance(rank, float) and rank.is_integer():  # a parquet column with nulls may hold floats
        rank = int(rank)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise where.error(f"must be an integer or null, got {rank!r}", field=name("rank"))
    for key in ("deleted", "review_result"):
        if msg.get(key) is not None and not isinstance(msg.get(key), bool):
            raise where.error(f"must be true, false or null, got {msg.get(key)!r}", field=name(key))
    lang = msg.get("lang")
    if lang is not None and not isinstance(lang, str):
        raise where.error(f"must be a string or null, got {lang!r}", field=name("lang"))
    return _OANode(
        message_id=message_id,
        role=_OA_ROLES[role],
        text=text,
        rank=rank,
        deleted=bool(msg.get("deleted")),
        review_result=msg.get("review_result"),
        lang=lang,
        where=where,
        field=prefix,
    )


def _oa_tree_node(msg: Any, where: _Where, prefix: str) -> _OANode:
    """A message of the nested trees format, with its replies."""
    node = _oa_node(msg, where, prefix)
    replies = msg.get("replies") or []
    if not isinstance(replies, list):
        raise where.error(f"must be a list, got {type(replies).__name__}", field=f"{prefix}.replies")
    node.replies = [_oa_tree_node(r, where, f"{prefix}.replies[{i}]") for i, r in enumerate(replies)]
    return node


def _oa_exclusion(node: _OANode) -> str | None:
    """The rule that excludes a message, or None when it may be used."""
    if node.deleted:
        return "deleted"
    if node.review_result is False:
        return "review_failed"
    return None


def _oa_rank_key(node: _OANode) -> tuple[bool, int]:
    # Lowest rank first; unranked (None) messages after all ranked ones.
    return (node.rank is None, node.rank if node.rank is not None else 0)


def _oa_example(
    tree_id: str, state: str | None, root: _OANode, where: _Where, report: LoadReport
) -> PreferenceExample | _Skip:
    """Follow the top-ranked path of one tree and build its example (or say why there is none)."""
    if state is not None and state != "ready_for_export":
        return _Skip("tree_not_ready_for_export")
    if root.role != "user":
        raise root.where.error("the root message must have role 'prompter'", field=root.field or "role")
    rule = _oa_exclusion(root)
    if rule:
        return _Skip(f"tree_root_{rule}")

    path = [root]
    while True:
        usable = [r for r in path[-1].replies if _oa_exclusion(r) is None]
        if not usable:
            break
        path.append(min(usable, key=_oa_rank_key))  # min keeps file order among equal ranks
    last = max((i for i, node in enumerate(path) if node.role == "assistant"), default=None)
    if last is None:
        return _Skip("tree_without_assistant_reply")
    path = path[: last + 1]

    # The excluded replies of the kept path were candidates the rules removed: count them.
    for node in path[:-1]:
        for reply in node.replies:
            rule = _oa_exclusion(reply)
            if rule:
                report.skip(f"message_{rule}")

    for parent, child in zip(path, path[1:]):
        if parent.role == child.role:
            raise child.where.error(
                f"has role {child.role!r} like its parent {parent.message_id}", field=child.field or "role"
            )
    for node in path:
        if not node.text.strip():
            raise node.where.error("is empty", field=f"{node.field}.text" if node.field else "text")

    chosen = path[-1]
    siblings = [r for r in path[-2].replies if r is not chosen and _oa_exclusion(r) is None]
    rejected = min(siblings, key=_oa_rank_key) if siblings else None
    if rejected is not None and not rejected.text.strip():
        raise rejected.where.error("is empty", field=f"{rejected.field}.text" if rejected.field else "text")
    return PreferenceExample(
        source="oasst2",
        location=where.location,
        prompt=tuple(Message(n.role, n.text) for n in path[:-1]),
        chosen=chosen.text,
        rejected=rejected.text if rejected else None,
        kind="safe",
        meta={
            "message_tree_id": tree_id,
            "lang": root.lang,
            "chosen_message_id": chosen.message_id,
            "chosen_rank": chosen.rank,
            "rejected_message_id": rejected.message_id if rejected else None,
            "rejected_rank": rejected.rank if rejected else None,
        },
    )


def _oa_nested_trees(
    rows: Iterable[tuple[_Where, dict]],
) -> Iterator[tuple[str, str | None, _OANode, _Where]]:
    """Trees of the ``*.trees.jsonl`` format: one tree per line."""
    for where, row in rows:
        tree_id = _get_str(row, "message_tree_id", where)
        state = _get_str(row, "tree_state", where)
        if "prompt" not in row:
            raise where.error("is missing", field="prompt")
        yield tree_id, state, _oa_tree_node(row["prompt"], where, "prompt"), where


def _oa_flat_trees(
    rows: Iterable[tuple[_Where, dict]], report: LoadReport
) -> Iterator[tuple[str, str | None, _OANode, _Where]]:
    """Trees assembled from flat message rows by ``parent_id`` (replies keep the file order)."""
    nodes: dict[str, _OANode] = {}
    parents: dict[str, str | None] = {}
    rows_by_id: dict[str, dict] = {}
    for where, row in rows:
        node = _oa_node(row, where, "")
        if node.message_id in nodes:
            raise where.error(
                f"repeats message_id {node.message_id!r} (first at {nodes[node.message_id].where.location})",
                field="message_id",
            )
        parent_id = row.get("parent_id")
        if parent_id is not None and not isinstance(parent_id, str):
            raise where.error(f"must be a string or null, got {parent_id!r}", field="parent_id")
        nodes[node.message_id] = node
        parents[node.message_id] = parent_id
        rows_by_id[node.message_id] = row
    roots = []
    for message_id, node in nodes.items():
        parent_id = parents[message_id]
        if parent_id is None:
            roots.append(node)
        elif parent_id in nodes:
            nodes[parent_id].replies.append(node)
        else:
            # A dump filtered by message (not by tree) can hold replies whose parent is not in it.
            report.skip("message_orphaned")
    for root in roots:
        row = rows_by_id[root.message_id]
        tree_id = _get_str(row, "message_tree_id", root.where, required=False) or root.message_id
        # The flat export repeats the tree's state on every message; some copies leave it out.
        state = _get_str(row, "tree_state", root.where, required=False)
        yield tree_id, state, root, root.where


def load_oasst2(
    path: str | None = None, *, limit: int | None = None, split: str | None = None
) -> tuple[list[PreferenceExample], LoadReport]:
    """OpenAssistant-2 conversations: the top-ranked path of each message tree.

    Reads the nested ``*.trees.jsonl[.gz]`` format (one tree per line:
    ``{"message_tree_id", "tree_state", "prompt": {message_id, role, text, rank, deleted,
    review_result, lang, replies: [...]}}``) or the flat messages format (one message per line
    with ``parent_id``, like the hub's ``OpenAssistant/oasst2``), chosen by the first row.

    From the root prompt, each step takes the usable reply with the lowest ``rank`` (unranked ones
    after ranked ones, file order among ties) and the walk ends at the deepest assistant message of
    that path. y+ is that message, y- its best-ranked usable sibling or None when it has none. The
    prompt is the path before it (prompter -> ``user``). ``kind`` is ``"safe"``: both answers are
    acceptable, y- is merely ranked lower. Every language is kept; ``meta["lang"]`` has the root's.

    ``num_read`` counts trees. Rules, counted in ``skipped``: per tree ``tree_not_ready_for_export``
    (``tree_state`` is not ``ready_for_export``; a flat row without ``tree_state`` counts as ready),
    ``tree_root_deleted``, ``tree_root_review_failed``, ``tree_without_assistant_reply``; per
    message ``message_deleted`` and ``message_review_failed`` (replies on the kept path's steps that
    the rule removed from the choice) and, for flat input, ``message_orphaned`` (parent not found).

    Default: ``$BT_RAY_DATA_DIR/oasst2/2023-11-05_oasst2_ready.trees.jsonl.gz``, else the hub
    dataset ``OpenAssistant/oasst2[train]``. ``split`` must be None: the trees file has no splits (a hub
    id chooses its own, ``OpenAssistant/oasst2[validation]``).
    """
    _no_split("oasst2", split)
    _check_limit(limit)
    origin = _resolve(_OASST2, path)
    report = LoadReport(source="oasst2", origin=str(origin))
    out: list[PreferenceExample] = []
    if limit == 0:
        return out, report
    rows = iter(_iter_hub(origin, {}) if isinstance(origin, _Hub) else _iter_jsonl(origin))
    first = next(rows, None)
    if first is None:
        return out, report
    rows = itertools.chain([first], rows)
    where, row = first
    if "prompt" in row and "message_tree_id" in row:
        trees = _oa_nested_trees(rows)
    elif "message_id" in row:
        trees = _oa_flat_trees(rows, report)
    else:
        raise where.error(
            "is neither a message tree (message_tree_id, prompt) nor a message (message_id, parent_id)"
        )
    for tree_id, state, root, tree_where in trees:
        report.num_read += 1
        result = _oa_example(tree_id, state, root, tree_where, report)
        if isinstance(result, _Skip):
            report.skip(result.rule)
            continue
        out.append(result)
        report.num_used += 1
        if limit is not None and report.num_used >= limit:
            break
    return out, report


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


# ---------------------------------------------------------------- registries

PREFERENCE_SOURCES: dict[str, Callable[..., tuple[list[PreferenceExample], LoadReport]]] = {
    "hh-rlhf": load_hh_rlhf_preferences,
    "oasst2": load_oasst2,
    "safety-tuned-llamas": load_safety_tuned_llamas,
}
"""Preference sources: name -> ``loader(path=None, *, limit=None, split=None) -> (examples, report)``."""

PREFERENCE_SPLITS: dict[str, tuple[str, ...]] = {
    "hh-rlhf": ("train", "test"),
    "oasst2": (),
    "safety-tuned-llamas": (),
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


def eval_test_sets(datasets: Iterable[tuple[str, str | None]] | None = None) -> list[EvalTestSet]:
    """The evaluation test sets, resolved as evaluation reads them (nothing is read).

    Args:
        datasets: ``(name, path)`` of evaluation sets (an eval config's ``datasets``); None = every
            name in ``EVAL_DATASETS`` at its default (``$BT_RAY_DATA_DIR`` file and hub dataset).

    Returns:
        One entry per set. ``synthetic`` has neither file nor hub: its eval prompts are generated
        from the world's held-out reservations, which no training split draws from.
    """
    from bt_ray.eval.config import EVAL_DATASETS

    out = []
    for name, path in datasets if datasets is not None else ((n, None) for n in EVAL_DATASETS):
        source = _PROMPT_SOURCE_DATA.get(name)
        if source is None:
            out.append(EvalTestSet(name, f"{name} eval prompts (generated)"))
            continue
        file, hub = None, source.hub
        if path is None:
            root = os.environ.get(DATA_DIR_ENV)
            candidate = Path(root).expanduser() / source.local_file if root else None
            if candidate is not None and candidate.is_file():
                file = candidate.resolve()
        else:
            try:
                origin = _resolve(source, path)
            except FileNotFoundError:
                origin = None  # evaluation would fail on it; nothing to compare
            file, hub = (origin.resolve(), None) if isinstance(origin, Path) else (None, origin)
        where = " or ".join(str(x) for x in (file, hub) if x is not None) or source.local_file
        canonical = (source.size, source.sha256) if source.size and source.sha256 else None
        out.append(EvalTestSet(name, where, file, hub, canonical))
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
    return _resolve(_OASST2 if name == "oasst2" else _STL, path)


def parse_origin(text: str) -> Path | _Hub | None:
    """A ``LoadReport.origin`` read back: an existing file, a hub spec, or None (anything else)."""
    if Path(text).is_file():
        return Path(text)
    match = _HUB_SPEC.match(text)
    if match and match["split"]:
        return _Hub(match["repo"], match["sub"], match["split"])
    return None
