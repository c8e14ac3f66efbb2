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
from bt_ray.data.judge_filter import _DROP_RULES, JudgeFilter, JudgeFilterCfg, JudgeFilterName, PairLabel
from bt_ray.data.records import PreferenceExample
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
        return self._row(ex, "plain", prompt=prompt_ids, completion=completion, num_prefix_tokens=0)

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
        return self._row(ex, "backtrack", prompt=prompt_ids + rejected_ids[:k], completion=completion,
                         num_prefix_tokens=k)

    # -- DPO

    def _plain_dpo(self, ex, prompt_ids, chosen_ids, rejected_ids):
        if rejected_ids is None:
            self.report.skipped["no_rejected"] += 1
            return None
        chosen, rejected = chosen_ids + self.eot, rejected_ids + self.eot
        if len(prompt_ids) + max(len(chosen), len(rejected)) > self.cfg.max_length:
            self.report.skipped["too_long"] += 1
            return None
        return self._row(ex, "plain", prompt=prompt_ids, chosen=chosen, rejected=rejected,
                         num_prefix_tokens=0)

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
        return self._row(ex, f"backtrack-{kind}", prompt=prompt_ids + started[:k], chosen=chosen,
                         rejected=rejected, num_prefix_tokens=k)

    # -- rows

    def _row(self, ex, kind, *, num_prefix_tokens, **sequences):
        """A row: where it came from, then each token sequence (``prompt`` and ``completion`` for SFT,
        ``prompt``, ``chosen`` and ``rejected`` for DPO) as text, then as ids."""
        return {
            "recipe": self.cfg.name,
            "kind": kind,
            "source": ex.source,
            "location": ex.location,
            "num_prefix_tokens": num_prefix_tokens,
            **{name: self._text(ids) for name, ids in sequences.items()},
            **{f"{name}_ids": ids for name, ids in sequences.items()},
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
