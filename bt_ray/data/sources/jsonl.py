"""``jsonl``: preference examples written as JSON lines (``bt-ray onpolicy`` output, or hand-made).

One object per line: ``prompt`` (a list of ``{role, content}`` ending with a user turn), ``chosen``
(string), ``rejected`` (string or null), ``kind`` (``harmful`` or ``safe``), and optional ``source``,
``location`` and ``meta`` (an object). ``bt_ray.data.onpolicy.example_dict`` writes exactly this.
"""

from __future__ import annotations

from pathlib import Path

from bt_ray.data.records import LoadReport, Message, PreferenceExample
from bt_ray.data.sources._files import _collect, _get_str, _iter_jsonl, _no_split, _Source, _Where

_JSONL = _Source("jsonl", "onpolicy.jsonl",
                 "a JSONL file of preference examples (prompt, chosen, rejected, kind)", None,
                 missing_hint="give the source a path: the .jsonl file (e.g. bt-ray onpolicy's out)")
_ROLES = ("system", "user", "assistant")
_KNOWN = ("source", "location", "prompt", "chosen", "rejected", "kind", "meta")


def _prompt(row: dict, where: _Where) -> tuple[Message, ...]:
    turns = row.get("prompt")
    if not isinstance(turns, list) or not turns:
        raise where.error("must be a non-empty list of {role, content} objects", field="prompt")
    out = []
    for i, m in enumerate(turns):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise where.error(f"turn {i} must be {{role: {'|'.join(_ROLES)}, content: string}}; "
                              f"got {m!r:.80}", field="prompt")
        out.append(Message(m["role"], m["content"]))
    if out[-1].role != "user":
        raise where.error("must end with a user turn", field="prompt")
    return tuple(out)


def _jsonl_preference(row: dict, where: _Where) -> PreferenceExample:
    unknown = sorted(set(row) - set(_KNOWN))
    if unknown:
        raise where.error(f"unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(_KNOWN)} "
                          "(put extra columns in meta)")
    prompt = _prompt(row, where)
    chosen = _get_str(row, "chosen", where, allow_empty=True)
    rejected = _get_str(row, "rejected", where, required=False, allow_empty=True)
    kind = row.get("kind")
    if kind not in ("harmful", "safe"):
        raise where.error(f"must be 'harmful' or 'safe'; got {kind!r}", field="kind")
    meta = row.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise where.error(f"must be an object; got {type(meta).__name__}", field="meta")
    source = _get_str(row, "source", where, required=False) or "jsonl"
    meta = dict(meta)
    if "location" in row:
        meta.setdefault("row_location", _get_str(row, "location", where))
    return PreferenceExample(source=source, location=where.location, prompt=prompt, chosen=chosen,
                             rejected=rejected, kind=kind, meta=meta)


def load_jsonl_preferences(path: str | None = None, *, limit: int | None = None,
                           split: str | None = None) -> tuple[list[PreferenceExample], LoadReport]:
    """Preference examples from a JSONL file (module docstring); a malformed row raises ``DataError``
    naming ``file:line`` and the field. ``source`` is the row's own (default ``jsonl``), ``location``
    the row's ``file:line`` (the row's own ``location`` is kept as ``meta['row_location']``).
    """
    _no_split("jsonl", split)
    if path is None:
        raise FileNotFoundError(f"jsonl: no path given; {_JSONL.missing_hint}")
    if not Path(path).expanduser().is_file():
        raise FileNotFoundError(f"jsonl: {path} is not a file; {_JSONL.missing_hint}")
    return _collect(_JSONL, path, limit, _iter_jsonl, _jsonl_preference, origin=Path(path).expanduser())
