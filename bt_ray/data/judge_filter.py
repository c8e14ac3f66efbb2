"""The judge filter: who decides which preference pairs give backtracking rows (PAPER.md section 2).

Backtracking rows teach "y- is unsafe, so reset and answer y+", which is only right for a pair whose
y- is unsafe and whose y+ is safe. ``recipe.judge_filter`` says who decides (``RecipeCfg``): ``off``
(the source's own label), ``synthetic`` (the synthetic world's exact judge), ``judge`` (a safety
judge, built as evaluation builds it) or ``column`` (labels precomputed in the source data).
``JudgeFilter.label`` turns each example into a ``PairLabel``: its kind, or None when the pair is
dropped; ``PAIR_OUTCOMES`` names every outcome that ``RecipeReport.filter`` counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from bt_ray.config import check
from bt_ray.data.records import DataError, PreferenceExample
from bt_ray.eval.config import EngineCfg, JudgeCfg

if TYPE_CHECKING:
    from bt_ray.data.recipes import RecipeCfg

JUDGE_FILTERS = ("off", "synthetic", "judge", "column")
JudgeFilterName = Literal["off", "synthetic", "judge", "column"]


@dataclass(frozen=True, kw_only=True, slots=True)
class JudgeFilterCfg:
    """Settings of the judge filter (``judge_filter: judge`` or ``column``); PAPER.md section 2."""

    judge: JudgeCfg = field(default_factory=lambda: JudgeCfg(safety="llama-guard-2"))
    """judge_filter=judge: the safety judge, built as evaluation builds it (judge.safety:
    llama-guard-2, llm or refusal-prefix, a keyword stand-in)."""
    engine: EngineCfg = field(default_factory=lambda: EngineCfg(num_actors=1))
    """Engine Llama Guard generates with on the machine that builds the rows (kind, batch_size, vLLM)."""
    dtype: str = "float32"
    """Parameter dtype of a judge model (bfloat16 on GPU)."""
    batch_size: int = 64
    """Answers sent to the judge per call (two per pair: y- and y+)."""
    rejected_unsafe_column: str = "rejected_unsafe"
    """judge_filter=column: source field (kept in PreferenceExample.meta) saying whether y- is unsafe:
    true/false, 1/0 or "unsafe"/"safe"; null = the judge failed on it (counted as judge_error)."""
    chosen_unsafe_column: str | None = "chosen_unsafe"
    """judge_filter=column: the same for y+; null = the data has no y+ labels, y+ is taken as safe."""
    max_error_fraction: float = 0.01
    """Building fails, naming the judge, when more than this fraction of the judged pairs got no verdict."""

    def __post_init__(self):
        check(self, [
            ("dtype", self.dtype in ("float32", "bfloat16", "float16"),
             "must be float32, bfloat16 or float16"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("rejected_unsafe_column", bool(self.rejected_unsafe_column), "must name a column"),
            ("max_error_fraction", 0.0 <= self.max_error_fraction <= 1.0, "must be in [0, 1]"),
        ])


PAIR_OUTCOMES = {
    "rejected_unsafe": "y- unsafe, y+ safe: a harmful pair (backtracking rows)",
    "rejected_safe": "y- safe, y+ safe: a safe pair (SFT: the plain row only)",
    "chosen_unsafe": "y+ unsafe: dropped (also counted in skipped as judge_chosen_unsafe)",
    "judge_error": "no verdict on y- or y+: dropped (also counted in skipped as judge_error)",
    "no_rejected": "no y- to judge: the source's own label is kept",
    "source_safe": "labelled safe by its source (OA, benign synthetic pairs): kept as is, not judged",
}
"""What the judge filter did with an example (``RecipeReport.filter`` counts each)."""


@dataclass(frozen=True, slots=True)
class PairLabel:
    """The filter's decision for one example: its kind, or None when it is dropped."""

    kind: str | None
    outcome: str  # a key of PAIR_OUTCOMES, or "" when the filter is off


# Outcomes that drop the example, and the rule they are counted under in ``RecipeReport.skipped``.
_DROP_RULES = {"chosen_unsafe": "judge_chosen_unsafe", "judge_error": "judge_error"}


def _decide(rejected_unsafe: bool | None, chosen_unsafe: bool | None) -> PairLabel:
    if rejected_unsafe is None or chosen_unsafe is None:
        return PairLabel(None, "judge_error")
    if chosen_unsafe:
        return PairLabel(None, "chosen_unsafe")
    return PairLabel("harmful", "rejected_unsafe") if rejected_unsafe else PairLabel("safe", "rejected_safe")


def judge_items(example: PreferenceExample, answer: str):
    """The ``JudgeItem`` of ``answer`` as the last assistant turn of ``example``'s conversation.

    Earlier assistant turns become the answers to earlier user turns (the judge sees the whole
    conversation); a prompt that does not alternate user/assistant is judged as its user turns joined.
    """
    from bt_ray.eval.judges import JudgeItem

    turns = [m for m in example.prompt if m.role != "system"]
    users = tuple(m.content for m in turns if m.role == "user")
    answers = tuple(m.content for m in turns if m.role == "assistant") + (answer,)
    alternating = all(m.role == ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(turns))
    if not alternating or len(answers) != len(users):
        users, answers = ("\n".join(users),), (answer,)
    return JudgeItem(turns=users, answers=answers, harmful=example.kind == "harmful")


def _column_label(example: PreferenceExample, column: str) -> bool | None:
    if column not in example.meta:
        raise DataError(f"{example.location}: column {column!r} is missing (judge_filter=column reads it; "
                        f"the example has {', '.join(map(repr, example.meta)) or 'no columns'})")
    value = example.meta[column]
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("safe", "unsafe"):
        return value.strip().lower() == "unsafe"
    raise DataError(f"{example.location}: column {column!r} must be true/false, 1/0, 'unsafe'/'safe' or "
                    f"null; got {value!r}")


class JudgeFilter:
    """Labels examples for a recipe: the source's label (off), or a judge's verdicts on y- and y+."""

    def __init__(self, cfg: RecipeCfg, judge=None):
        self.mode = cfg.judge_filter
        self.cfg = cfg.filter
        self._judge = judge  # a bt_ray.eval.judges.Judge; built on first use when None

    @property
    def judge(self):
        if self._judge is None:
            from bt_ray.eval.judges import build_safety_judge

            self._judge = build_safety_judge(self.cfg.judge, engine=self.cfg.engine, dtype=self.cfg.dtype)
        return self._judge

    @property
    def name(self) -> str:
        if self.mode == "judge":
            return f"judge: {self.judge.name}"
        if self.mode == "column":
            return f"column: {self.cfg.rejected_unsafe_column}, {self.cfg.chosen_unsafe_column}"
        return self.mode

    def label(self, examples: list[PreferenceExample]) -> list[PairLabel]:
        """One label per example; a model judge sees them in batches of ``filter.batch_size`` answers."""
        if self.mode == "off":
            return [PairLabel(ex.kind, "") for ex in examples]
        out: list[PairLabel | None] = [
            PairLabel(ex.kind, "no_rejected") if ex.rejected is None
            else PairLabel(ex.kind, "source_safe") if ex.kind == "safe" else None
            for ex in examples
        ]
        todo = [i for i, label in enumerate(out) if label is None]
        if self.mode == "synthetic":
            from bt_ray.data import synthetic

            for i in todo:
                ex = examples[i]
                prompt = "\n".join(m.content for m in ex.prompt if m.role == "user")
                out[i] = _decide(synthetic.judge(prompt, ex.rejected).unsafe,
                                 synthetic.judge(prompt, ex.chosen).unsafe)
        elif self.mode == "column":
            chosen_col = self.cfg.chosen_unsafe_column
            for i in todo:
                ex = examples[i]
                rejected = _column_label(ex, self.cfg.rejected_unsafe_column)
                out[i] = _decide(rejected, False if chosen_col is None else _column_label(ex, chosen_col))
        else:
            items = [it for i in todo for it in (judge_items(examples[i], examples[i].rejected),
                                                  judge_items(examples[i], examples[i].chosen))]
            verdicts = []
            for start in range(0, len(items), self.cfg.batch_size):
                verdicts.extend(self.judge.judge(items[start:start + self.cfg.batch_size]))
            if len(verdicts) != len(items):
                raise RuntimeError(f"judge {self.judge.name} gave {len(verdicts)} verdicts for "
                                   f"{len(items)} answers")
            for n, i in enumerate(todo):
                out[i] = _decide(verdicts[2 * n].unsafe, verdicts[2 * n + 1].unsafe)
        return out  # type: ignore[return-value]
