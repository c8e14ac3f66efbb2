"""Generate docs/configuration.md from the config dataclasses' field docstrings.

Run ``python docs/gen_config_reference.py`` after changing a config class; ``tests/unit/test_docs.py``
fails while the committed file differs from a fresh generation. Every field of a config class carries a
one-line attribute docstring (a string literal right after the field, STYLE.md); this script reads them
from the class source with ``ast``, so the reference and the code cannot drift apart. Nested config
classes are found by walking the field types, so only the root job configs are listed here.

The output is deterministic: classes in order of first appearance (depth first, fields in declaration
order), defaults from the dataclass itself, no timestamps or machine paths.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import sys
import textwrap
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

# The root configs, one per job: (title, "module:Class", the entry script and its command).
# Add a job's config here; the classes it nests are found by themselves.
ROOTS: tuple[tuple[str, str, str], ...] = (
    ("Pipeline", "bt_ray.pipeline.config:PipelineCfg", "jobs/pipeline.py (make demo, bt-ray pipeline)"),
    ("On-policy data", "bt_ray.data.onpolicy:OnPolicyCfg", "jobs/onpolicy.py (bt-ray onpolicy)"),
    ("SFT job", "bt_ray.train.config:SFTJobCfg", "jobs/sft.py (bt-ray sft)"),
    ("DPO job", "bt_ray.train.config:DPOJobCfg", "jobs/dpo.py (bt-ray dpo)"),
    ("Sweep", "bt_ray.tune.config:SweepCfg", "jobs/sweep.py (bt-ray sweep)"),
    ("Evaluation", "bt_ray.eval.config:EvalCfg", "jobs/eval.py (bt-ray eval)"),
    ("Calibration", "bt_ray.eval.calibrate:CalibrateCfg", "jobs/calibrate.py (bt-ray calibrate)"),
    ("Attacks", "bt_ray.attacks.config:AttackJobCfg", "jobs/attack.py (bt-ray attack)"),
    ("Serving", "bt_ray.serve.config:ServeCfg", "jobs/serve.py (bt-ray serve)"),
)

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "configuration.md"


def load_class(spec: str) -> type:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the attribute docstrings of ``cls`` and its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = next(n for n in tree.body if isinstance(n, ast.ClassDef)).body
        for stmt, after in zip(body, body[1:] + [None]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[stmt.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def nested_classes(tp: Any) -> list[type]:
    """Config dataclasses named anywhere in a field type (``X``, ``X | None``, ``tuple[X, ...]``)."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return [tp]
    return [c for arg in get_args(tp) for c in nested_classes(arg)]


def anchor(cls: type) -> str:
    return cls.__name__.lower()


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in get_args(tp))
    if origin in (tuple, list):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return f"[{tp.__name__}](#{anchor(tp)})"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(section)"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (tuple, list)):
        return "`[]`" if not value else f"`{list(value)!r}`"
    return f"`{value!r}`"


def cell(text: str) -> str:
    """Markdown table cell: reST double backticks as code, pipes and angle brackets escaped."""
    return text.replace("``", "`").replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def class_section(cls: type, where: str) -> list[str]:
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    summary = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")
    lines = [f"### {cls.__name__}", "", f"`{cls.__module__}.{cls.__qualname__}`{where}", ""]
    if summary and not summary.startswith(f"{cls.__name__}("):  # dataclass's generated signature
        lines += [summary.replace("``", "`"), ""]
    lines += ["| field | type | default | what |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        doc = docs.get(f.name, "(undocumented)")
        kind, default = cell(type_name(hints[f.name])), cell(default_text(f))
        lines.append(f"| `{f.name}` | {kind} | {default} | {cell(doc)} |")
    return lines + [""]


def generate() -> str:
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by docs/gen_config_reference.py from the config dataclasses' field docstrings."
        " Do not edit; run `python docs/gen_config_reference.py`. -->",
        "",
        "Every job reads a YAML file (`--config`) and then dotted overrides (`optim.learning_rate=1e-5`), "
        "into the frozen dataclasses below; every problem is reported at once, naming the field "
        "(`bt_ray/config.py`). A section's fields are set with `section.field=value`; `null` is YAML's None. "
        "Lists are YAML lists (`'[a, b]'` on the command line).",
        "",
        "| job | entry | root config |",
        "|---|---|---|",
    ]
    roots = [(title, load_class(spec), entry) for title, spec, entry in ROOTS]
    for title, cls, entry in roots:
        out.append(f"| {title} | `{entry}` | [{cls.__name__}](#{anchor(cls)}) |")
    out.append("")
    seen: set[type] = set()
    for title, root, entry in roots:
        out += [f"## {title}: {root.__name__}", ""]
        stack, order = [root], []
        while stack:  # depth first, fields in declaration order
            cls = stack.pop(0)
            if cls in seen:
                continue
            seen.add(cls)
            order.append(cls)
            hints = get_type_hints(cls)
            inner = [c for f in dataclasses.fields(cls) for c in nested_classes(hints[f.name])]
            stack = [c for c in inner if c not in seen] + stack
        for cls in order:
            out += class_section(cls, f" (in `{entry.split()[0]}`)" if cls is root else "")
        shared = [c for f in dataclasses.fields(root) for c in nested_classes(get_type_hints(root)[f.name])
                  if c not in order]
        if shared:
            names = ", ".join(f"[{c.__name__}](#{anchor(c)})" for c in dict.fromkeys(shared))
            out += [f"Also uses {names}, described above.", ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = generate()
    if argv == ["--check"]:
        if OUT.is_file() and OUT.read_text() == text:
            return 0
        shown = OUT.relative_to(REPO) if OUT.is_relative_to(REPO) else OUT
        print(f"{shown} is stale: run python docs/gen_config_reference.py", file=sys.stderr)
        return 1
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
