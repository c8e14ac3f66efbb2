"""The records every data source produces, and the error and report types they share.

Sources parse files (or hub datasets) into two kinds of record:

* ``PreferenceExample``: a conversation ``prompt`` (every turn before the last assistant turn),
  the safe/preferred last assistant turn ``chosen`` (y+) and, when the source has one, the
  unsafe/dispreferred one ``rejected`` (y-). Recipes turn these into SFT and DPO rows.
* ``PromptExample``: a prompt for evaluation (safety sets, MT-Bench), with its user turns.

Nothing is dropped silently: a malformed row raises ``DataError`` naming the file and line (or
record index); a row left out by a documented rule is counted in ``LoadReport.skipped``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant"]
PairKind = Literal["harmful", "safe"]


@dataclass(frozen=True, slots=True)
class Message:
    """One chat turn."""

    role: Role
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True, kw_only=True, slots=True)
class PreferenceExample:
    """A prompt with a preferred (y+) and optionally a dispreferred (y-) last assistant turn.

    Attributes:
        source: name of the source that produced it (``hh-rlhf``, ``synthetic``, ...).
        location: where it came from, for error messages (``file.jsonl.gz:12``, ``record 7``).
        prompt: the conversation before the last assistant turn; ends with a user turn.
        chosen: y+, the safe or better response.
        rejected: y-, the unsafe or worse response; None when the source has none.
        kind: ``harmful`` when y- is (or is taken to be) unsafe, ``safe`` when both answers are
            acceptable and y- is merely worse. Decides which backtracking DPO pair is built.
        meta: free-form source fields kept for inspection (category, ids, ...).
    """

    source: str
    location: str
    prompt: tuple[Message, ...]
    chosen: str
    rejected: str | None
    kind: PairKind
    meta: dict = field(default_factory=dict)

    def prompt_dicts(self) -> list[dict[str, str]]:
        return [m.to_dict() for m in self.prompt]


@dataclass(frozen=True, kw_only=True, slots=True)
class PromptExample:
    """An evaluation prompt: one or more user turns (MT-Bench has two), answered in order.

    Attributes:
        dataset: the evaluation set it belongs to (``advbench``, ``mt-bench``, ...).
        location: where it came from, for error messages.
        turns: the user turns.
        category: the set's own category label, or "" when it has none.
        harmful: whether the set treats the prompt as a harmful request.
        meta: other fields kept for reports (ids, targets, references, ...).
    """

    dataset: str
    location: str
    turns: tuple[str, ...]
    category: str = ""
    harmful: bool = True
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"turns": list(self.turns)}


class DataError(ValueError):
    """A malformed input: the message names the file and line (or record index) and the field."""


@dataclass(slots=True)
class LoadReport:
    """Counts for one load: rows read, rows used, rows left out by a named rule."""

    source: str
    origin: str
    num_read: int = 0
    num_used: int = 0
    skipped: Counter = field(default_factory=Counter)
    # A parted load (bt_ray.data.parts): the part, its seed and fractions, and the rows read per part.
    parts: dict | None = None

    def skip(self, rule: str) -> None:
        self.skipped[rule] += 1

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "origin": self.origin,
            "num_read": self.num_read,
            "num_used": self.num_used,
            "skipped": dict(sorted(self.skipped.items())),
        } | ({"parts": self.parts} if self.parts is not None else {})

    def __str__(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"{self.source} ({self.origin}): read {self.num_read}, used {self.num_used}, "
            f"skipped by rule: {skipped}"
        ) + (f"; part {self.parts['part']} (seed {self.parts['seed']}), rows read per part: "
             + ", ".join(f"{k} {v}" for k, v in self.parts["read"].items()) if self.parts else "")
