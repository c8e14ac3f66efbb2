"""Shared parts of the source loaders: where data lives, how it is found, read and counted.

``_Source`` says where one source's data lives (its ``$BT_RAY_DATA_DIR`` path, its hub copy); ``_resolve``
turns the user's ``path`` into a local file or a ``_Hub`` without reading it; the readers yield
``(_Where, row)`` pairs from JSONL, CSV, JSON or a hub dataset; ``_collect`` parses rows into records
and fills the ``LoadReport``. The family modules (``hh_rlhf``, ``oasst2``, ``safety_sets``,
``mt_bench``) hold only what is particular to their data.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bt_ray.data.records import DataError, LoadReport

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


# Hub copies that name a column differently from the original file: hub name -> file name.
_HUB_ALIASES: dict[str, dict[str, str]] = {
    "advbench": {"prompt": "goal"},
    "simple-safety-tests": {"prompt": "prompts_final"},
    "strongreject": {"prompt": "forbidden_prompt"},
    "mt-bench": {"prompt": "turns", "prompt_id": "question_id"},
}


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
    return _take(rows(origin), parse, limit, out, report)


def _take(items: Iterable[tuple[_Where, Any]], parse: Callable[[Any, _Where], Any], limit: int | None,
          out: list, report: LoadReport) -> tuple[list, LoadReport]:
    """Parse items in order into ``out`` until ``limit`` are used; each is counted read, and used or
    skipped by its ``_Skip`` rule."""
    for where, item in items:
        report.num_read += 1
        result = parse(item, where)
        if isinstance(result, _Skip):
            report.skip(result.rule)
            continue
        out.append(result)
        report.num_used += 1
        if limit is not None and report.num_used >= limit:
            break
    return out, report


# ---------------------------------------------------------------- kept columns


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
