"""Seeded train/dev/test parts of one data file, so a file can be trained on and evaluated on safely.

Only the HH-RLHF harmless-base TEST file ships here (train does not), and XSTest has no splits at all.
A *part* cuts such a file into three disjoint pieces by a stable hash, so a user can train on
``part: train`` and evaluate on ``part: test`` (or calibrate on ``dev``) and no evaluated row was
trained on.

How a row is assigned (``Part.of``):

* its *key* is its prompt text: the FIRST user turn (for HH-RLHF, the first Human turn of ``chosen``),
  with whitespace collapsed and case folded (``part_key``). Dialogues that open with the same
  request therefore land in the same part, so no prompt leaks across parts (in harmless-base/test,
  264 of 2,312 dialogues share their first Human turn with another: 130 groups, up to 3 each);
* ``u = int(sha256(f"{seed}\\0{key}")[:16 hex]) / 2**64`` is uniform in [0, 1) and the part is
  ``train`` if ``u < f_train``, ``dev`` if ``u < f_train + f_dev``, else ``test``.

So a row's part depends only on (seed, its prompt, the fractions): never on file order, ``limit``,
other rows, or the Python process (``hash()`` is salted, sha256 is not). The fractions hold
in expectation; a file of n distinct prompts gets about ``f * n`` each (binomial noise).

Configs carry ``part`` (train, dev, test or null = the whole file), ``part_seed`` and
``part_fractions`` (default 0.8/0.1/0.1); a loader given a ``Part`` reads every row, assigns it,
and keeps its part: rows of other parts are counted under skip rules ``part_dev`` / ``part_test``
/ ``part_train`` and the report's ``parts`` holds the rows read per part.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PARTS = ("train", "dev", "test")
"""The part names, in the order of ``part_fractions``."""

DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
"""Default ``part_fractions``: train, dev, test."""

PARTED_SOURCES = ("hh-rlhf", "xstest")
"""Sources whose loaders take ``part``, the same for a source's preference and prompt loader."""


class EmptyPartError(ValueError):
    """A part that holds no usable rows (configs re-raise it naming their ``part`` field)."""


def part_key(text: str) -> str:
    """The text a row is assigned by: whitespace collapsed, case folded (a re-typed prompt matches)."""
    return " ".join(text.split()).casefold()


def part_checks(part: str | None, seed: int, fractions: tuple[float, ...], *,
                prefix: str = "part") -> list[tuple[str, bool, str]]:
    """``bt_ray.config.check`` entries for the fields ``<prefix>``, ``<prefix>_seed``, ``<prefix>_fractions``.

    A chosen part with fraction 0 would hold no rows: that is an error naming ``<prefix>_fractions``.
    """
    ok_fracs = (len(fractions) == 3 and all(isinstance(f, int | float) and 0 <= f <= 1 for f in fractions)
                and abs(sum(fractions) - 1) < 1e-9)
    return [
        (prefix, part is None or part in PARTS,
         f"must be one of {', '.join(PARTS)} or null (the whole file)"),
        (f"{prefix}_seed", isinstance(seed, int) and not isinstance(seed, bool), "must be an integer"),
        (f"{prefix}_fractions", ok_fracs,
         "must be three fractions (train, dev, test), each in [0, 1], summing to 1"),
        (f"{prefix}_fractions", not ok_fracs or part not in PARTS or fractions[PARTS.index(part)] > 0,
         f"gives part {part!r} fraction 0, so it would hold no rows"),
    ]


@dataclass(frozen=True)
class Part:
    """One part of a file: which part to keep, and the seed and fractions that define every part.

    Attributes:
        name: train, dev or test.
        seed: the hash seed; another seed gives an independent split.
        fractions: (train, dev, test) shares, summing to 1.
    """

    name: str
    seed: int = 0
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS

    def __post_init__(self):
        problems = [f"{f} {msg}" for f, ok, msg in part_checks(self.name, self.seed, tuple(self.fractions))
                    if not ok]
        if problems:
            raise ValueError(f"part {self.name!r}, seed {self.seed!r}, fractions {self.fractions!r}: "
                             + "; ".join(problems))
        object.__setattr__(self, "fractions", tuple(float(f) for f in self.fractions))

    def of(self, text: str) -> str:
        """The part of the row whose prompt (first user turn) is ``text``."""
        digest = hashlib.sha256(f"{self.seed}\0{part_key(text)}".encode()).hexdigest()
        u = int(digest[:16], 16) / 2**64
        train, dev, _ = self.fractions
        return "train" if u < train else "dev" if u < train + dev else "test"

    def describe(self) -> str:
        shares = "/".join(f"{f:g}" for f in self.fractions)
        return f"part {self.name!r} (seed {self.seed}, fractions train/dev/test {shares})"

    def to_dict(self, read: Counter) -> dict:
        """What a ``LoadReport`` records: the part, its definition, and the rows read per part."""
        return {"part": self.name, "seed": self.seed, "fractions": list(self.fractions),
                "read": {p: read.get(p, 0) for p in PARTS}}


def make_part(part: str | None, seed: int = 0,
              fractions: tuple[float, ...] = DEFAULT_FRACTIONS) -> Part | None:
    """A ``Part`` from config fields, or None when ``part`` is null (the whole file)."""
    return None if part is None else Part(part, seed, tuple(fractions))


def keep_part(part: Part, parse: Callable[[Any, Any], Any], key: Callable[[Any, Any], str],
              read: Counter, skip: Callable[[str], Any]) -> Callable[[Any, Any], Any]:
    """Wrap a row parser so it keeps only the rows of ``part``.

    Every row is parsed first (a malformed row is an error whatever its part), then assigned by
    ``key(row, where)`` (its first user turn). ``read`` counts rows per part; a row of another part
    becomes ``skip("part_<its part>")``, the loader's skip record.
    """

    def parse_in_part(row, where):
        result = parse(row, where)
        got = part.of(key(row, where))
        read[got] += 1
        return result if got == part.name else skip(f"part_{got}")

    return parse_in_part


def check_not_empty(part: Part, source: str, origin: str, used: int, limit: int | None,
                    read: Counter) -> None:
    """A part that yields no rows is an error naming the ``part`` field (never an empty data set)."""
    if used == 0 and limit != 0:
        counts = ", ".join(f"{p} {read.get(p, 0)}" for p in PARTS)
        raise EmptyPartError(f"{source}: {part.describe()} of {origin} holds no usable rows (rows read "
                         f"per part: {counts}); choose another part, part_seed or part_fractions")


def load_part(part: Part | None, load: Callable[[Callable], tuple[list, Any]],
              parse: Callable[[Any, Any], Any], key: Callable[[Any, Any], str], skip: Callable[[str], Any],
              limit: int | None) -> tuple[list, Any]:
    """``load(parse)`` (a loader's ``_collect`` over its rows), keeping only ``part``'s rows when given.

    The one place every parted loader goes through: the limit counts rows of the part (so the part
    never depends on it), the report's ``parts`` gets the rows read per part, and an empty part is an
    error (``check_not_empty``).
    """
    if part is None:
        return load(parse)
    read: Counter = Counter()
    records, report = load(keep_part(part, parse, key, read, skip))
    report.parts = part.to_dict(read)
    check_not_empty(part, report.source, report.origin, report.num_used, limit, read)
    return records, report
