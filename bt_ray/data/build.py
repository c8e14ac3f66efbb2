"""Build recipe datasets from sources, and render rows token by token for inspection.

``build_dataset`` loads every configured source, turns the examples into rows of one recipe, mixes
and shuffles them (seeded), and writes ``<out>.jsonl`` atomically with ``<out>.config.yaml`` (the
resolved config) and ``<out>.summary.json`` (counts read / used / skipped by rule, per source and
per recipe) beside it.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from bt_ray.config import check, dump, git_sha, to_dict
from bt_ray.data.parts import DEFAULT_FRACTIONS, PARTED_SOURCES, EmptyPartError, make_part, part_checks
from bt_ray.data.recipes import RecipeCfg, build_rows, trained_mask
from bt_ray.data.records import LoadReport, PreferenceExample
from bt_ray.data.sources import PREFERENCE_SPLITS
from bt_ray.data.synthetic import SyntheticWorldCfg, preference_examples, pretraining_examples
from bt_ray.models import ModelCfg, load_tokenizer

# Sources generated in-process rather than read from a file or hub.
SYNTHETIC_SOURCES = ("synthetic", "synthetic-pretrain")

SOURCE_SPLITS: dict[str, tuple[str, ...]] = {
    "synthetic": ("train", "dev"),
    "synthetic-pretrain": (),
    **PREFERENCE_SPLITS,
}
"""Splits each source's ``split`` may name; empty = the source has none (``split`` must be null)."""


def _split_rule(name: str) -> str:
    splits = SOURCE_SPLITS.get(name, ())
    if not splits:
        return f"must be null: source {name!r} has no splits (choose its data with path)"
    return f"must be null (= {splits[0]}) or one of {', '.join(splits)} for source {name!r}"


@dataclass(frozen=True, kw_only=True, slots=True)
class SourceCfg:
    """One data source."""

    name: str = "synthetic"
    """Source name: synthetic, synthetic-pretrain, hh-rlhf, oasst2, safety-tuned-llamas."""
    path: str | None = None
    """Local file or directory, or hub id; null = $BT_RAY_DATA_DIR/<standard path>, else the hub."""
    split: str | None = None
    """The source's split: null = its training split; synthetic: train or dev; hh-rlhf: train or test
    (chooses the file in a directory / $BT_RAY_DATA_DIR and the hub split; a file or hub id naming
    another split is an error); other sources have none, so it must be null."""
    limit: int | None = None
    """Use at most this many examples from the source (null = all); with a part, of that part."""
    part: str | None = None
    """A seeded part of the source's file (``bt_ray.data.parts``): train, dev or test, by a stable hash of
    (part_seed, the dialogue's first user turn), so it never depends on file order or limit and dialogues
    opening alike share a part; null: the whole file. hh-rlhf only. E.g. split: test, part: train trains
    on the shipped test file's train part while evaluation reads its dev/test part (datasets' part)."""
    part_seed: int = 0
    """Seed of the part assignment; evaluation must use the same seed and fractions to be disjoint."""
    part_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    """Shares of train, dev, test (each in [0, 1], summing to 1; the chosen part's must be > 0)."""

    def __post_init__(self):
        check(self, [
            ("name", bool(self.name), "must name a source"),
            ("limit", self.limit is None or self.limit > 0, "must be > 0 or null"),
            ("split", self.split is None or self.name not in SOURCE_SPLITS
             or self.split in SOURCE_SPLITS[self.name], _split_rule(self.name)),
            ("part", self.part is None or self.name in PARTED_SOURCES,
             f"must be null: source {self.name!r} cannot be cut into parts "
             f"(only {', '.join(PARTED_SOURCES)})"),
            *part_checks(self.part, self.part_seed, self.part_fractions),
        ])


@dataclass(frozen=True, kw_only=True, slots=True)
class DataBuildCfg:
    """``bt-ray data build``: sources -> recipe rows -> JSONL."""

    model: ModelCfg = field(default_factory=ModelCfg)
    """Model whose tokenizer encodes the rows."""
    recipe: RecipeCfg = field(default_factory=RecipeCfg)
    """Recipe and its knobs."""
    sources: tuple[SourceCfg, ...] = (SourceCfg(),)
    """Sources, all used and mixed."""
    synthetic: SyntheticWorldCfg = field(default_factory=SyntheticWorldCfg)
    """The synthetic safety world (used by the synthetic sources)."""
    shuffle_seed: int | None = 0
    """Seed of the shuffle after mixing sources; null keeps source order."""
    out: str = "outputs/data/backtrack-sft.jsonl"
    """Output JSONL path (config and summary are written beside it)."""

    def __post_init__(self):
        check(self, [
            ("sources", len(self.sources) > 0, "must list at least one source"),
            ("out", self.out.endswith(".jsonl"), "must be a .jsonl path"),
        ])


def load_source(
    src: SourceCfg, synthetic_cfg: SyntheticWorldCfg, *, field: str = "sources[]"
) -> tuple[list[PreferenceExample], LoadReport]:
    """Preference examples of one source, with its load report (``field`` names it in errors)."""
    # SourceCfg has checked src.split against SOURCE_SPLITS.
    if src.name == "synthetic":
        examples, report = preference_examples(synthetic_cfg, split=src.split or "train")
    elif src.name == "synthetic-pretrain":
        examples = pretraining_examples(synthetic_cfg)
        report = LoadReport(source=src.name, origin=f"seed {synthetic_cfg.seed}")
        report.num_read = report.num_used = len(examples)
    else:
        from bt_ray.data.sources import load_preferences

        part = make_part(src.part, src.part_seed, src.part_fractions)
        try:
            return load_preferences(src.name, src.path, limit=src.limit, split=src.split, part=part)
        except EmptyPartError as e:
            raise EmptyPartError(f"{field}.part ({src.name}): {e}") from e
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"{field} ({src.name}): {e}") from e
    if src.limit is not None and len(examples) > src.limit:
        report.num_used = src.limit
        examples = examples[: src.limit]
    return examples, report


def check_not_evaluated(sources: tuple[SourceCfg, ...], *, field: str = "sources", evals=None) -> None:
    """Refuse training data that an evaluation set tests on: never train on what is evaluated.

    Each file or hub source is resolved (nothing is read) and compared with every evaluation test set
    (``bt_ray.data.sources.eval_test_sets``): same real path, same content, or same hub repo, subset
    and split. Synthetic sources draw train/dev pairs, never the world's eval prompts.

    A source that is an evaluation file but keeps one seeded ``part`` of it is disjoint by construction
    from the file's other parts (``bt_ray.data.parts``), so it is accepted when evaluation reads only
    other parts (``part_conflict``): without ``evals`` (training alone), part train is accepted and
    dev/test are kept for evaluation; with ``evals`` (the eval's ``DatasetCfg``s), every dataset that
    reads this set must read another part with the same seed and fractions.

    Raises:
        ValueError: one line per offending source, naming ``<field>[i]``, where it resolved, and the
            evaluation set.
        FileNotFoundError: a source cannot be found (the message names ``<field>[i]``).
    """
    from bt_ray.data.sources import eval_overlap, eval_test_sets, resolve_preference_source

    test_sets = eval_test_sets()
    problems = []
    for i, src in enumerate(sources):
        if src.name in SYNTHETIC_SOURCES:
            continue
        try:
            origin = resolve_preference_source(src.name, src.path, src.split)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"{field}[{i}] ({src.name}): {e}") from e
        hit = eval_overlap(origin, test_sets)
        if hit is None:
            continue
        why = part_conflict(src.part, src.part_seed, src.part_fractions, hit.name, evals)
        if why is not None:
            part = f", part {src.part}" if src.part else ""
            problems.append(f"{field}[{i}] ({src.name}, {origin}{part}) is the evaluation test set "
                            f"{hit.name!r} ({hit.where}){why}")
    if problems:
        raise ValueError("never train on what is evaluated:\n  " + "\n  ".join(problems)
                        + "\ngive these sources a training split (e.g. hh-rlhf: split train, with a path "
                          "or hub id Anthropic/hh-rlhf@harmless-base[train]), or train on part: train of the "
                          "evaluation file while evaluation reads its part dev or test")


def part_conflict(part: str | None, seed: int, fractions, eval_name: str, evals=None) -> str | None:
    """Why training on ``part`` of the file that evaluation set ``eval_name`` reads overlaps evaluation;
    None when it does not (the parts are disjoint by construction, ``bt_ray.data.parts``).

    Args:
        part, seed, fractions: the training source's part fields (``part`` None: the whole file).
        eval_name: the evaluation set the source's file is.
        evals: the evaluation's datasets (objects with name, part, part_seed, part_fractions), or None
            when unknown: then only part train is accepted (dev and test are kept for evaluation).
    """
    if part is None:
        return ""
    if evals is None:
        return None if part == "train" else (f": part {part} is kept for evaluation; train only on part "
                                             "train of an evaluation file")
    for j, ds in enumerate(evals):
        if ds.name != eval_name:
            continue
        if ds.part is None:
            return f", and evaluation datasets[{j}] reads the whole file (give it part dev or test)"
        if ds.part_seed != seed or tuple(ds.part_fractions) != tuple(fractions):
            return (f", and evaluation datasets[{j}] cuts it with another part_seed/part_fractions "
                    f"({ds.part_seed}, {list(ds.part_fractions)} vs {seed}, {list(fractions)}): parts of "
                    "different cuts overlap")
        if ds.part == part:
            return f", and evaluation datasets[{j}] reads the same part {part}"
    return None


def build_dataset(cfg: DataBuildCfg, *, log=print, field: str = "sources") -> dict:
    """Build the recipe's rows from every source and write them; returns the summary dict.

    Sources that are an evaluation test set are refused first (``check_not_evaluated``); ``field``
    is the config field of the sources in messages (``data.sources`` for a training job).
    """
    check_not_evaluated(cfg.sources, field=field)
    tokenizer, reset = load_tokenizer(cfg.model)
    examples: list[PreferenceExample] = []
    source_reports = []
    for i, src in enumerate(cfg.sources):
        got, report = load_source(src, cfg.synthetic, field=f"{field}[{i}]")
        log(f"source {report}")
        examples.extend(got)
        source_reports.append(report.to_dict())
    rows, recipe_report = build_rows(examples, cfg.recipe, tokenizer, reset)
    log(f"recipe {recipe_report}")
    if cfg.shuffle_seed is not None:
        random.Random(cfg.shuffle_seed).shuffle(rows)

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out)  # readers never see a half-written file
    config_path = dump(cfg, out.with_suffix(".config.yaml"))
    summary = {
        "out": str(out),
        "config": str(config_path),
        "git_sha": git_sha(),
        "num_rows": len(rows),
        "reset_token": reset.token,
        "reset_token_id": reset.token_id,
        "sources": source_reports,
        "recipe": recipe_report.to_dict(),
        "resolved_config": to_dict(cfg),
    }
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2))
    log(f"wrote {len(rows)} rows to {out} (config {config_path}, summary {out.with_suffix('.summary.json')})")
    return summary


# ---------------------------------------------------------------- inspection


def render_row(row: dict, tokenizer) -> dict:
    """A row with every token as ``{id, text, trained}``, by segment."""
    masks = trained_mask(row)
    rendered = {k: row[k] for k in ("recipe", "kind", "source", "location", "num_prefix_tokens")}
    for segment, mask in masks.items():
        ids = row[f"{segment}_ids"]
        rendered[segment] = [
            {"id": i, "text": tokenizer.decode([i], skip_special_tokens=False), "trained": t}
            for i, t in zip(ids, mask)
        ]
    if "completion" in masks:
        rendered["tokens"] = rendered["prompt"] + rendered["completion"]
    return rendered


def format_rendered(rendered: dict, *, color: bool = False) -> str:
    """Human-readable view: untrained tokens in [brackets] (dim), trained ones plain (bold green)."""

    def seg(tokens):
        parts = []
        for t in tokens:
            text = t["text"].replace("\n", "\\n")
            if color:
                parts.append(f"\x1b[1;32m{text}\x1b[0m" if t["trained"] else f"\x1b[2m{text}\x1b[0m")
            else:
                parts.append(f"{text}" if t["trained"] else f"[{text}]")
            parts.append("|")
        return "".join(parts)

    head = (
        f"== {rendered['recipe']} / {rendered['kind']} / {rendered['location']} "
        f"(prefix tokens: {rendered['num_prefix_tokens']})"
    )
    lines = [head]
    for segment in ("prompt", "completion", "chosen", "rejected"):
        if segment in rendered:
            num_trained = sum(t["trained"] for t in rendered[segment])
            lines.append(f"-- {segment} ({len(rendered[segment])} tokens, {num_trained} trained)")
            lines.append(seg(rendered[segment]))
    return "\n".join(lines)
