"""OpenAssistant-2: the top-ranked path of each message tree (nested trees or flat messages)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from bt_ray.data.records import LoadReport, Message, PreferenceExample
from bt_ray.data.sources._files import (
    _check_limit,
    _get_str,
    _Hub,
    _iter_hub,
    _iter_jsonl,
    _no_split,
    _resolve,
    _Skip,
    _Source,
    _take,
    _Where,
)

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
    items = ((tree_where, (tree_id, state, root)) for tree_id, state, root, tree_where in trees)
    return _take(items, lambda tree, where: _oa_example(*tree, where, report), limit, out, report)
