"""Typed configs: frozen dataclasses built from YAML plus dotted CLI overrides.

YAML is the source of truth; ``key.sub=value`` arguments override it. Every problem (unknown key,
wrong type, bad value) is collected and reported at once in one ``ConfigError``, each line naming
the dotted field and, for YAML input, the file and line it came from.

Config classes follow one convention (see ``bt_ray/models.py`` for an example)::

    @dataclass(frozen=True, kw_only=True, slots=True)
    class ModelCfg:
        name: str = "tiny"
        '''Preset name, HF directory or hub id.'''

        def __post_init__(self):
            check(self, [("name", bool(self.name), "must not be empty")])

Fields may be ``int``, ``float``, ``str``, ``bool``, ``Literal[...]``, ``X | None``, ``tuple[X, ...]``
or another config dataclass. ``__post_init__`` reports value problems through ``check`` so that they
too are collected with the others.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import subprocess
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """One or more config problems; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str], header: str = "invalid config"):
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"{header} ({len(self.errors)} problem(s)):\n{lines}")


def check(cfg: Any, rules: list[tuple[str, bool, str]]) -> None:
    """Raise one ConfigError listing every rule that fails.

    Args:
        cfg: the dataclass instance being validated (its field values go into the messages).
        rules: ``(field_name, ok, requirement)`` triples; a failing rule yields
            ``"<field> must ...; got <value>"``.
    """
    errors = [
        f"{name} {requirement}; got {getattr(cfg, name)!r}" for name, ok, requirement in rules if not ok
    ]
    if errors:
        raise ConfigError(errors)


# ---------------------------------------------------------------- YAML with line numbers


def _line_map(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            out[key] = key_node.start_mark.line + 1
            _line_map(value_node, key, out)


def read_yaml(path: str | Path) -> tuple[dict, dict[str, int]]:
    """Read a YAML mapping and the line of each dotted key in it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML: {e}"]) from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping; got {type(data).__name__}"])
    lines: dict[str, int] = {}
    if node is not None:
        _line_map(node, "", lines)
    return data, lines


# ---------------------------------------------------------------- overrides


def apply_overrides(data: dict, overrides: list[str]) -> tuple[dict, list[str]]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict.

    An override sets one key, creating absent or null sections on its way. It never replaces a value
    on its way: ``optim.learning_rate.x=1`` with a number at ``optim.learning_rate``, or ``sources.limit=5``
    with a list at ``sources``, is rejected rather than turning that value into a section.

    Returns:
        The new dict and one message per rejected override (malformed, or reaching below a value),
        which the caller reports with the other config errors.
    """
    data = _deepcopy(data)
    bad = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            bad.append(f"override {item!r} must look like section.field=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:  # an absent or null section: the override fills it in
                child = node[part] = {}
            elif not isinstance(child, dict):
                reached = ".".join(parts[: i + 1])
                if isinstance(child, list):
                    what, hint = "a list", f"; set the whole list ({reached}=[...])"
                else:
                    what, hint = f"{child!r}, not a section", ""
                below = parts[i + 1]
                bad.append(f"override {item!r}: {reached} is {what}, so it has no field {below!r}{hint}")
                break
            node = child
        else:
            node[parts[-1]] = value
    return data, bad


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


# ---------------------------------------------------------------- building dataclasses


def _where(key: str, origin: str, lines: dict[str, int], overridden: set[str]) -> str:
    """Where a dotted key's value came from: an override, a YAML line, or the default."""
    if key in overridden:
        return f"override {key}"
    if key in lines:
        return f"{origin}:{lines[key]}: {key}"
    parts = key.split(".")
    if any(".".join(parts[:i]) in overridden for i in range(1, len(parts))):
        return f"override {key}"
    return key


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, errors: list[str], where) -> Any:
    """Convert a YAML value to ``tp``; append a message to ``errors`` and return None on failure."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(value, non_none[0], key, errors, where)
        for a in non_none:  # first that converts cleanly
            trial: list[str] = []
            out = _convert(value, a, key, trial, where)
            if not trial:
                return out
        errors.append(f"{where(key)} must be {' or '.join(_type_name(a) for a in non_none)}; got {value!r}")
        return None
    if origin is Literal:
        if value not in get_args(tp):
            hint = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            errors.append(f"{where(key)} must be {_type_name(tp)}; got {value!r}{extra}")
        return value
    if origin in (tuple, list):
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            errors.append(f"{where(key)} must be a list; got {value!r}")
            return None
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{key}[{i}]", errors, where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            errors.append(f"{where(key)} must be a mapping; got {value!r}")
            return None
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            errors.append(f"{where(key)} must be a mapping (section {tp.__name__}); got {value!r}")
            return None
        return _build(tp, value, key, errors, where)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{where(key)} must be true or false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{where(key)} must be an integer; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 1e-5 (no dot) as a string; accept what float() accepts.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            errors.append(f"{where(key)} must be a number; got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{where(key)} must be a string; got {value!r}")
        return value
    raise TypeError(f"unsupported config field type {tp!r} at {key}")  # programmer error


def _build(cls: type[T], data: dict, prefix: str, errors: list[str], where) -> T | None:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else f" (known: {', '.join(fields)})"
            errors.append(f"{where(dotted)}: unknown key{extra}")
            continue
        num_before = len(errors)
        converted = _convert(value, hints[key], dotted, errors, where)
        if len(errors) == num_before:
            kwargs[key] = converted
    # Build even when a sibling failed so the section's own checks are reported too.
    try:
        return cls(**kwargs)
    except ConfigError as e:
        for message in e.errors:  # "field must ...": locate the field
            name, _, rest = message.partition(" ")
            errors.append(f"{where(f'{prefix}.{name}' if prefix else name)} {rest}")
    except (TypeError, ValueError) as e:
        errors.append(f"{prefix or cls.__name__}: {e}")
    return None


def build(
    cls: type[T],
    data: dict,
    *,
    origin: str = "",
    lines: dict[str, int] | None = None,
    overridden: set[str] | None = None,
) -> T:
    """Build config ``cls`` from a nested dict, raising one ConfigError with every problem."""
    errors: list[str] = []
    lines = lines or {}
    overridden = overridden or set()

    def where(key: str) -> str:
        return _where(key, origin, lines, overridden)

    cfg = _build(cls, data, "", errors, where)
    if errors or cfg is None:
        raise ConfigError(errors or [f"could not build {cls.__name__}"])
    return cfg


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Load ``cls`` from a YAML file (optional) and dotted overrides; every error listed at once."""
    data, lines, origin = {}, {}, ""
    if path is not None:
        data, lines = read_yaml(path)
        origin = str(path)
    data, bad = apply_overrides(data, list(overrides))
    errors = list(bad)
    overridden = {item.partition("=")[0] for item in overrides if "=" in item}
    try:
        cfg = build(cls, data, origin=origin, lines=lines, overridden=overridden)
    except ConfigError as e:
        errors.extend(e.errors)
        cfg = None
    if errors:
        raise ConfigError(errors, header=f"invalid config{' ' + origin if origin else ''}")
    return cfg


def parse_job_args(cls: type[T], doc: str | None, argv: list[str] | None = None, *,
                   example: str = "run.name=x") -> T:
    """The command line of every job: ``--config FILE.yaml`` then dotted overrides, loaded into ``cls``.

    One parser for ``jobs/*.py``, and so for ``bt-ray <job>`` (which runs the job's script with the same
    arguments). The first paragraph of the job's docstring ``doc`` is its ``--help`` description;
    ``example`` is the override its help shows. ``argv`` defaults to ``sys.argv[1:]``.
    """
    import argparse

    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--config", default=None, help=f"YAML config ({cls.__name__})")
    parser.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")
    args = parser.parse_args(argv)
    return load(cls, args.config, args.overrides)

def to_dict(cfg: Any) -> Any:
    """A plain, YAML-safe dict of a config (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params and summaries)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def dump(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML next to an output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


GIT_SHA_ENV = "BT_RAY_GIT_SHA"


def git_sha() -> str:
    """The git commit of the bt-ray code that runs: ``$BT_RAY_GIT_SHA`` if set, else asked of git.

    ``ray job submit`` uploads the working dir without ``.git``, so a job on a cluster cannot ask git:
    ``clusters/submit.sh`` computes the sha at submit time and passes it in the job's runtime env.
    Asking git gives ``<sha>`` or ``<sha>+dirty`` (tracked files modified), ``unknown`` outside a git tree.
    """
    if os.environ.get(GIT_SHA_ENV):
        return os.environ[GIT_SHA_ENV]
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


__all__ = [
    "ConfigError", "check", "load", "parse_job_args", "build", "dump", "to_dict", "flatten", "read_yaml",
    "apply_overrides", "git_sha",
]
