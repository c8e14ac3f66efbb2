"""Training recipes (PAPER.md sections 3-4): baseline and backtracking, SFT and DPO.

Every row is built at the token level, so no boundary is ever re-tokenized:

* SFT rows: ``prompt_ids`` (chat prompt, plus ``prefix(y-)`` for a backtracking example) and
  ``completion_ids`` (``[RESET]`` + y+ + end-of-turn, or y+ + end-of-turn). Only the completion is
  trained on: the prompt and the unsafe prefix get no loss; ``[RESET]``, y+ and end-of-turn do.
* DPO rows: ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (TRL's own column names). The shared
  prefix of a backtracking pair sits in the prompt, where it cancels in the DPO margin.

Rows also carry the decoded text (``prompt``/``completion`` or ``prompt``/``chosen``/``rejected``)
for reading; the ids are the truth, because re-tokenizing text would turn a literal "[RESET]" in
user text into the control token.

Recipes:

* ``baseline-sft``: plain x -> y+ for every example.
* ``backtrack-sft``: the plain term for every example, plus x + prefix(y-) -> [RESET] + y+ for each
  harmful pair with a y- (the backtracking term).
* ``baseline-dpo``: x, y+ over y-.
* ``backtrack-dpo``: harmful pair: x + prefix(y-), ``[RESET]`` + y+ over the rest of y-;
  safe pair: x + prefix(y+), the rest of y+ over ``[RESET]`` + y- (discourages needless resets).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from bt_ray.config import check
from bt_ray.data.records import DataError, PreferenceExample
from bt_ray.eval.config import EngineCfg, JudgeCfg
from bt_ray.reset import ResetInfo, encode_chat_prompt, encode_text, end_of_turn_ids

RECIPES = ("baseline-sft", "backtrack-sft", "baseline-dpo", "backtrack-dpo")
RecipeName = Literal["baseline-sft", "backtrack-sft", "baseline-dpo", "backtrack-dpo"]


@dataclass(frozen=True, kw_only=True, slots=True)
class PrefixCfg:
    """How the length k of prefix(y) is drawn: uniform over token positions, seeded per example."""

    distribution: Literal["uniform"] = "uniform"
    """Distribution of k over [ceil(min_fraction*n), floor(max_fraction*n)] (n = tokens in y)."""
    min_fraction: float = 0.0
    """Lower end of k as a fraction of the response length."""
    max_fraction: float = 1.0
    """Upper end of k as a fraction of the response length (1.0 allows the whole response)."""
    include_empty: bool = False
    """Allow k = 0 (reset before any unsafe token)."""
    seed: int = 0
    """Seed; k depends only on (seed, example location), not on order or sharding."""

    def __post_init__(self):
        check(self, [
            ("min_fraction", 0.0 <= self.min_fraction <= 1.0, "must be in [0, 1]"),
            ("max_fraction", 0.0 <= self.max_fraction <= 1.0, "must be in [0, 1]"),
            ("max_fraction", self.max_fraction >= self.min_fraction, "must be >= min_fraction"),
        ])


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


@dataclass(frozen=True, kw_only=True, slots=True)
class RecipeCfg:
    """Which rows to build from preference examples."""

    name: RecipeName = "backtrack-sft"
    """baseline-sft, backtrack-sft, baseline-dpo or backtrack-dpo."""
    prefix: PrefixCfg = field(default_factory=PrefixCfg)
    """Prefix-length sampler for backtracking rows."""
    judge_filter: JudgeFilterName = "off"
    """Who decides which pairs give backtracking rows (PAPER.md section 2: y- unsafe and y+ safe).
    off: the source's own label (PreferenceExample.kind; every HH-RLHF pair is "harmful");
    synthetic: the synthetic world's exact judge; judge: the safety judge of `filter.judge`
    (Llama Guard 2, the LLM judge or the refusal-prefix stand-in), in batches; column: labels
    precomputed per pair in the source data (`filter.*_column`). A filter judges the pairs that
    their source labels harmful and that have a y- (pairs labelled safe, like OA's, keep their
    label: OA enters SFT only as plain rows). A pair whose y- is judged safe becomes a "safe" pair
    (SFT: the plain row only). A pair whose y+ is judged unsafe, or that got no verdict, is dropped
    whole (never trained to produce text a judge calls unsafe, never taken as safe when unjudged);
    each outcome is counted in the report (`filter`, PAIR_OUTCOMES)."""
    filter: JudgeFilterCfg = field(default_factory=JudgeFilterCfg)
    """Settings of judge_filter=judge and column."""
    max_length: int = 2048
    """Longest row in tokens. The prefix is shortened to fit; a row that cannot fit is skipped
    and counted (never truncated: [RESET] and the start of y+ are always kept)."""

    def __post_init__(self):
        check(self, [
            ("max_length", self.max_length >= 8, "must be >= 8"),
            ("judge_filter", self.judge_filter != "judge" or self.filter.judge.safety != "llm"
             or self.filter.judge.llm.base_url is not None,
             "needs filter.judge.llm.base_url when filter.judge.safety is llm"),
        ])


@dataclass(slots=True)
class RecipeReport:
    """What a recipe made: rows by kind and examples left out by a named rule."""

    recipe: str
    num_examples: int = 0
    rows: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    judge: str = "off"
    """The judge filter and the judge it used (``judge: llama-guard-2``)."""
    filter: Counter = field(default_factory=Counter)
    """Outcome of the judge filter per example (``PAIR_OUTCOMES``); empty when it is off."""

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe,
            "num_examples": self.num_examples,
            "num_rows": sum(self.rows.values()),
            "rows": dict(sorted(self.rows.items())),
            "skipped": dict(sorted(self.skipped.items())),
            "judge": self.judge,
            "filter": dict(sorted(self.filter.items())),
        }

    def __str__(self) -> str:
        rows = ", ".join(f"{k}={v}" for k, v in sorted(self.rows.items())) or "none"
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        text = f"{self.recipe}: {self.num_examples} examples -> rows {rows}; skipped by rule: {skipped}"
        if self.filter:
            outcomes = ", ".join(f"{k}={v}" for k, v in sorted(self.filter.items()))
            text += f"; judge filter ({self.judge}): {outcomes}"
        return text


def prefix_bounds(n: int, cfg: PrefixCfg) -> tuple[int, int]:
    """Inclusive range of k for a response of ``n`` tokens (lo > hi means no valid k)."""
    lo = math.ceil(cfg.min_fraction * n)
    hi = math.floor(cfg.max_fraction * n)
    if not cfg.include_empty:
        lo = max(lo, 1)
    return lo, hi


def sample_prefix_length(n: int, cfg: PrefixCfg, key: str, *, cap: int | None = None) -> int | None:
    """Draw k for a response of ``n`` tokens; deterministic in ``(cfg.seed, key)``.

    Args:
        n: tokens in the response the prefix is cut from.
        cfg: the sampler's settings.
        key: a stable id of the example (its location) plus the row type.
        cap: largest k that still fits the row's length budget.

    Returns:
        k, or None when no k in the configured range fits.
    """
    lo, hi = prefix_bounds(n, cfg)
    if cap is not None:
        hi = min(hi, cap)
    if lo > hi:
        return None
    return random.Random(f"{cfg.seed}:{key}").randint(lo, hi)


# ---------------------------------------------------------------- the judge filter

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


class RecipeBuilder:
    """Turns preference examples into token-level rows for one recipe and tokenizer.

    ``judge`` replaces the judge that ``judge_filter: judge`` would build from ``cfg.filter.judge``.
    """

    def __init__(self, cfg: RecipeCfg, tokenizer, reset: ResetInfo, *, judge=None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.reset = reset
        self.eot = end_of_turn_ids(tokenizer)
        self.filter = JudgeFilter(cfg, judge)
        self.report = RecipeReport(recipe=cfg.name)

    def build(self, examples: list[PreferenceExample]) -> list[dict]:
        """Rows for every example; the judge filter labels them all first, in batches.

        Raises:
            RuntimeError: more than ``filter.max_error_fraction`` of the judged pairs got no verdict.
        """
        labels = self.filter.label(examples)
        rows: list[dict] = []
        for example, label in zip(examples, labels):
            rows.extend(self._rows(example, label))
        judged = sum(v for k, v in self.report.filter.items() if k not in ("no_rejected", "source_safe"))
        errors = self.report.filter["judge_error"]
        if judged and errors / judged > self.cfg.filter.max_error_fraction:
            raise RuntimeError(
                f"judge filter ({self.report.judge}): {errors} of {judged} judged pairs got no verdict, more "
                f"than filter.max_error_fraction={self.cfg.filter.max_error_fraction:g}; fix the judge "
                f"(or its labels) before training on what it let through"
            )
        return rows

    def rows_for(self, example: PreferenceExample) -> list[dict]:
        """Rows for one example (zero or more); skips are counted in ``self.report``."""
        return self._rows(example, self.filter.label([example])[0])

    def _rows(self, example: PreferenceExample, label: PairLabel) -> list[dict]:
        self.report.num_examples += 1
        kind = label.kind
        if label.outcome:
            self.report.judge = self.filter.name
            self.report.filter[label.outcome] += 1
        if kind is None:
            self.report.skipped[_DROP_RULES[label.outcome]] += 1
            return []
        prompt_ids = encode_chat_prompt(self.tokenizer, example.prompt_dicts())
        chosen_ids = encode_text(self.tokenizer, example.chosen)
        rejected_ids = None if example.rejected is None else encode_text(self.tokenizer, example.rejected)
        name = self.cfg.name
        if name == "baseline-sft":
            made = [self._plain_sft(example, prompt_ids, chosen_ids)]
        elif name == "backtrack-sft":
            made = [self._plain_sft(example, prompt_ids, chosen_ids)]
            if kind == "harmful":
                made.append(self._backtrack_sft(example, prompt_ids, chosen_ids, rejected_ids))
        elif name == "baseline-dpo":
            made = [self._plain_dpo(example, prompt_ids, chosen_ids, rejected_ids)]
        else:
            made = [self._backtrack_dpo(example, kind, prompt_ids, chosen_ids, rejected_ids)]
        rows = [r for r in made if r is not None]
        for r in rows:
            self.report.rows[r["kind"]] += 1
        return rows

    # -- SFT

    def _plain_sft(self, ex, prompt_ids, chosen_ids):
        completion = chosen_ids + self.eot
        if len(prompt_ids) + len(completion) > self.cfg.max_length:
            self.report.skipped["too_long"] += 1
            return None
        return self._sft_row(ex, "plain", prompt_ids, completion, num_prefix_tokens=0)

    def _backtrack_sft(self, ex, prompt_ids, chosen_ids, rejected_ids):
        if not rejected_ids:
            self.report.skipped["no_rejected" if rejected_ids is None else "empty_rejected"] += 1
            return None
        completion = [self.reset.token_id] + chosen_ids + self.eot
        cap = self.cfg.max_length - len(prompt_ids) - len(completion)
        k = sample_prefix_length(len(rejected_ids), self.cfg.prefix, f"{ex.location}:sft", cap=cap)
        if k is None:
            self.report.skipped["too_long"] += 1
            return None
        return self._sft_row(ex, "backtrack", prompt_ids + rejected_ids[:k], completion, num_prefix_tokens=k)

    def _sft_row(self, ex, kind, prompt_ids, completion_ids, *, num_prefix_tokens):
        return {
            "recipe": self.cfg.name,
            "kind": kind,
            "source": ex.source,
            "location": ex.location,
            "num_prefix_tokens": num_prefix_tokens,
            "prompt": self._text(prompt_ids),
            "completion": self._text(completion_ids),
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
        }

    # -- DPO

    def _plain_dpo(self, ex, prompt_ids, chosen_ids, rejected_ids):
        if rejected_ids is None:
            self.report.skipped["no_rejected"] += 1
            return None
        chosen, rejected = chosen_ids + self.eot, rejected_ids + self.eot
        if len(prompt_ids) + max(len(chosen), len(rejected)) > self.cfg.max_length:
            self.report.skipped["too_long"] += 1
            return None
        return self._dpo_row(ex, "plain", prompt_ids, chosen, rejected, num_prefix_tokens=0)

    def _backtrack_dpo(self, ex, kind, prompt_ids, chosen_ids, rejected_ids):
        if rejected_ids is None:
            self.report.skipped["no_rejected"] += 1
            return None
        reset = [self.reset.token_id]
        # harmful: the model has started y-; chosen resets, rejected carries on.
        # safe: the model has started y+; chosen carries on, rejected resets needlessly.
        started, other = (rejected_ids, chosen_ids) if kind == "harmful" else (chosen_ids, rejected_ids)
        if not started:
            self.report.skipped["empty_rejected" if kind == "harmful" else "empty_chosen"] += 1
            return None
        # Row length = prompt + k + max(reset branch, carry-on branch). The carry-on branch plus the
        # prefix is always all of `started`, so only the reset branch limits k.
        max_len = self.cfg.max_length
        cap = max_len - len(prompt_ids) - (1 + len(other) + len(self.eot))
        k = sample_prefix_length(len(started), self.cfg.prefix, f"{ex.location}:dpo-{kind}", cap=cap)
        if k is None or len(prompt_ids) + len(started) + len(self.eot) > max_len:
            self.report.skipped["too_long"] += 1
            return None
        carry_on = started[k:] + self.eot
        reset_branch = reset + other + self.eot
        chosen, rejected = (reset_branch, carry_on) if kind == "harmful" else (carry_on, reset_branch)
        return self._dpo_row(
            ex, f"backtrack-{kind}", prompt_ids + started[:k], chosen, rejected, num_prefix_tokens=k
        )

    def _dpo_row(self, ex, kind, prompt_ids, chosen_ids, rejected_ids, *, num_prefix_tokens):
        return {
            "recipe": self.cfg.name,
            "kind": kind,
            "source": ex.source,
            "location": ex.location,
            "num_prefix_tokens": num_prefix_tokens,
            "prompt": self._text(prompt_ids),
            "chosen": self._text(chosen_ids),
            "rejected": self._text(rejected_ids),
            "prompt_ids": prompt_ids,
            "chosen_ids": chosen_ids,
            "rejected_ids": rejected_ids,
        }

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def build_rows(
    examples: list[PreferenceExample], cfg: RecipeCfg, tokenizer, reset: ResetInfo, *, judge=None
) -> tuple[list[dict], RecipeReport]:
    """Rows of recipe ``cfg.name`` for ``examples``, and the report of what was made and skipped."""
    builder = RecipeBuilder(cfg, tokenizer, reset, judge=judge)
    rows = builder.build(examples)
    return rows, builder.report


def sft_features(row: dict) -> dict:
    """A row as TRL's SFTTrainer takes pre-tokenized data (``input_ids`` + ``completion_mask``)."""
    return {
        "input_ids": row["prompt_ids"] + row["completion_ids"],
        "completion_mask": [0] * len(row["prompt_ids"]) + [1] * len(row["completion_ids"]),
    }


def trained_mask(row: dict) -> dict[str, list[bool]]:
    """Which tokens of a row carry loss, by segment (what ``bt-ray data inspect`` shows)."""
    if "completion_ids" in row:
        return {
            "prompt": [False] * len(row["prompt_ids"]),
            "completion": [True] * len(row["completion_ids"]),
        }
    return {
        "prompt": [False] * len(row["prompt_ids"]),
        "chosen": [True] * len(row["chosen_ids"]),
        "rejected": [True] * len(row["rejected_ids"]),
    }
