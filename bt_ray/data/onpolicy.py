"""On-policy y-: the base model's own answers to training prompts, judged, kept by configured rules.

PAPER.md section 4 leaves open where y- comes from. Here it is the base model's own answer: for every
prompt of the configured preference ``sources`` the model answers (``samples_per_prompt`` times),
through the Ray Data eval pipeline (``bt_ray.eval.pipeline.run_passes``: the same generation and
judging as evaluation, no second loop). The configured judge labels the answer (y-) in the pipeline
and the source's ``chosen`` (y+) in the driver, and ``decide`` applies the ``keep`` rules: by default an
answer judged unsafe becomes the y- of a harmful pair, an answer judged safe is dropped (the model
already behaved; as the y- of a "safe pair" it would teach preferring the source's refusal over a safe
answer, i.e. over-refusal), and a pair whose y+ is judged unsafe is dropped. Both labels are written
in ``meta`` (``rejected_unsafe``, ``chosen_unsafe``), so a recipe can re-filter the file with
``judge_filter: column``.

Helpfulness (``helpful``): no OpenAssistant copy exists here, so plain SFT rows come from
self-distillation. The base model answers benign prompts from ``benign_prompts.yaml`` (topics x
templates, written for bt-ray, none from XSTest or MT-Bench) and an answer is kept, as a ``safe``
row with chosen = its own answer and no y-, when a refusal judge says it is not a refusal. This
anchors the base model's benign behaviour while the safety rows move its harmful one. Its limits:
it cannot make the model more helpful or more correct than it was (wrong answers are kept as they
are), the prompts are templated and narrow next to real user traffic, and the refusal judge only
sees refusal phrases, not quality.

The driver is ``jobs/onpolicy.py``; this module holds the config, the prompts, the rules and the
output format, which the ``jsonl`` preference source (``bt_ray.data.sources.jsonl``) reads back.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from bt_ray import config
from bt_ray.config import check
from bt_ray.data.build import SYNTHETIC_SOURCES, SourceCfg
from bt_ray.data.records import DataError, Message, PreferenceExample
from bt_ray.eval.config import DecodeCfg, EngineCfg, JudgeCfg
from bt_ray.models import ModelCfg

BENIGN_PROMPTS = Path(__file__).with_name("benign_prompts.yaml")

# Judges whose verdict says harm, not refusal: they cannot tell a refusal of a benign prompt.
_NOT_REFUSAL_JUDGES = ("llama-guard-2", "llm")

RULES = {
    "unsafe_kept": "y- judged unsafe, y+ safe: kept as a harmful pair (keep.unsafe_answer=harmful)",
    "unsafe_dropped": "y- judged unsafe: dropped (keep.unsafe_answer=drop)",
    "safe_kept": "y- judged safe: kept as a safe pair (keep.safe_answer=safe)",
    "safe_dropped": "y- judged safe: dropped (keep.safe_answer=drop, the default)",
    "chosen_unsafe": "y+ judged unsafe: dropped (keep.chosen_unsafe=drop)",
    "generate_error": "no answer (prompt too long, engine error): dropped",
    "judge_error": "no verdict on y- or y+ (or on a helpful answer): dropped",
    "helpful_kept": "helpful: not a refusal, kept as a plain safe row",
    "helpful_refused": "helpful: judged a refusal, dropped",
}
"""What happened to each generated answer (the summary counts each, per source and in total)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class KeepCfg:
    """What becomes of each judged answer (``RULES``)."""

    unsafe_answer: Literal["harmful", "drop"] = "harmful"
    """An answer judged unsafe: harmful (the y- of a harmful pair, y+ the source's chosen) or drop."""
    safe_answer: Literal["drop", "safe"] = "drop"
    """An answer judged safe: drop (default), or safe (the y- of a safe pair: taught as merely worse
    than the source's y+; with refusal y+ this teaches over-refusal)."""
    chosen_unsafe: Literal["drop", "keep"] = "drop"
    """A pair whose y+ (the source's chosen) is judged unsafe: drop, or keep (labelled
    chosen_unsafe=true; a recipe's judge_filter=column drops it then)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class HelpfulCfg:
    """Self-distilled helpful rows: the base model's answers to benign prompts (module docstring)."""

    num_prompts: int = 0
    """Benign prompts answered (0: none); drawn without replacement, seeded, from topics x templates."""
    path: str | None = None
    """Prompt file (topics, templates with {topic}); null: bt_ray/data/benign_prompts.yaml."""
    seed: int = 0
    """Seed of the draw of prompts."""
    refusal_judge: str = "refusal-prefix"
    """Who says an answer is a refusal: a refusal/compliance judge named as judge.safety names it
    (refusal-prefix, a keyword stand-in, or refusal-classifier), built from the job's judge config;
    Llama Guard and the LLM rubric judge harm, not refusal, and are refused."""

    def __post_init__(self):
        check(self, [
            ("num_prompts", self.num_prompts >= 0, "must be >= 0"),
            ("refusal_judge", self.refusal_judge in refusal_judges(),
             f"must be a refusal/compliance judge: one of {', '.join(refusal_judges())}"),
        ])


def refusal_judges() -> tuple[str, ...]:
    """The judges (``JudgeCfg.safety`` values) whose 'unsafe' verdict means 'complied'."""
    import typing

    names = typing.get_args(typing.get_type_hints(JudgeCfg)["safety"])
    return tuple(n for n in names if n not in _NOT_REFUSAL_JUDGES)


@dataclass(frozen=True, kw_only=True, slots=True)
class OnPolicyCfg:
    """``bt-ray onpolicy``: the base model's own answers as y-, judged, kept by rules, as JSONL."""

    model: ModelCfg = field(default_factory=lambda: ModelCfg(name="smollm2-135m"))
    """The base model that answers (a preset such as smollm2-135m, or an HF directory)."""
    sources: tuple[SourceCfg, ...] = (SourceCfg(name="safety-tuned-llamas"),)
    """Preference sources (as data build's): their prompts are answered, their chosen is kept as y+."""
    multi_turn: Literal["skip", "last_turn"] = "skip"
    """A prompt with several turns (the pipeline answers user turns only, so the source's own earlier
    assistant turns cannot be replayed): skip (counted as rule multi_turn in the source's skipped) or
    last_turn (ask its last user turn alone; y+ is kept, though it answered the whole dialogue)."""
    engine: EngineCfg = field(default_factory=lambda: EngineCfg(num_actors=1))
    """Generation engine and actor pool."""
    decode: DecodeCfg = field(default_factory=lambda: DecodeCfg(max_new_tokens=256))
    """Decoding of the answers (max_new_tokens, temperature, seed)."""
    samples_per_prompt: int = 1
    """Answers per prompt (> 1 needs decode.temperature > 0); each is its own pair."""
    judge: JudgeCfg = field(default_factory=JudgeCfg)
    """The safety judge of y- (in the pipeline) and y+ (in the driver)."""
    keep: KeepCfg = field(default_factory=KeepCfg)
    """Keep/drop rules."""
    helpful: HelpfulCfg = field(default_factory=HelpfulCfg)
    """Self-distilled helpful rows (off when helpful.num_prompts is 0)."""
    max_error_fraction: float = 0.01
    """The job fails, naming the engine and judge, when more generated answers than this fraction got
    no answer or no verdict."""
    ray_num_cpus: int | None = None
    """Logical CPUs of the local Ray the job starts when none is running (null: the machine's cores)."""
    out: str = "outputs/data/onpolicy.jsonl"
    """Output JSONL (PreferenceExample rows); <out>.summary.json and <out>.config.yaml beside it."""

    def __post_init__(self):
        from bt_ray.data.sources import PREFERENCE_SOURCES

        known = (*PREFERENCE_SOURCES, *SYNTHETIC_SOURCES)
        check(self, [
            ("sources", bool(self.sources) or self.helpful.num_prompts > 0,
             "must list a source, or set helpful.num_prompts > 0"),
            ("sources", all(s.name in known for s in self.sources),
             f"must name preference sources ({', '.join(known)})"),
            ("samples_per_prompt", self.samples_per_prompt >= 1, "must be >= 1"),
            ("samples_per_prompt", self.samples_per_prompt == 1 or self.decode.temperature > 0,
             "must be 1 with greedy decoding (decode.temperature=0 gives the same answer each time)"),
            ("max_error_fraction", 0.0 <= self.max_error_fraction <= 1.0, "must be in [0, 1]"),
            ("ray_num_cpus", self.ray_num_cpus is None or self.ray_num_cpus >= 1, "must be >= 1 or null"),
            ("out", self.out.endswith(".jsonl"), "must be a .jsonl path"),
        ])


def digest(cfg: OnPolicyCfg) -> str:
    """SHA-256 of the resolved config: a rerun with the same digest reuses a complete output."""
    return hashlib.sha256(json.dumps(config.to_dict(cfg), sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- prompts


def prompt_turn(example: PreferenceExample, multi_turn: str) -> str | None:
    """The one user turn the model answers for ``example``, or None when ``multi_turn`` skips it."""
    users = [m.content for m in example.prompt if m.role == "user"]
    if len(example.prompt) == 1 and len(users) == 1:
        return users[0]
    return users[-1] if multi_turn == "last_turn" and users else None


def load_benign_prompts(path: str | os.PathLike | None = None) -> list[dict]:
    """Every benign prompt of a prompt file: topics x templates, in file order.

    Returns:
        Dicts with ``prompt``, ``category``, ``topic`` and ``location`` (``FILE topic T template P``,
        0-based).

    Raises:
        DataError: a malformed file (names the file and the entry).
    """
    path = Path(path) if path is not None else BENIGN_PROMPTS
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("topics"), dict) \
            or not isinstance(data.get("templates"), list):
        raise DataError(f"{path}: expected a mapping with 'topics' (category -> list of topics) and "
                        "'templates' (a list of strings holding {topic})")
    templates = data["templates"]
    for j, t in enumerate(templates):
        if not isinstance(t, str) or t.count("{topic}") != 1:
            raise DataError(f"{path}: templates[{j}] must be a string holding {{topic}} once; got {t!r}")
    out, i = [], 0
    for category, topics in data["topics"].items():
        if not isinstance(topics, list) or not topics:
            raise DataError(f"{path}: topics.{category} must be a non-empty list of strings")
        for topic in topics:
            if not isinstance(topic, str) or not topic.strip():
                raise DataError(f"{path}: topics.{category} holds {topic!r}, not a non-empty string")
            for j, t in enumerate(templates):
                out.append({"prompt": t.replace("{topic}", topic), "category": str(category), "topic": topic,
                            "location": f"{path.name} topic {i} template {j}"})
            i += 1
    return out


def draw_benign(cfg: HelpfulCfg) -> list[dict]:
    """``cfg.num_prompts`` benign prompts, drawn without replacement (seeded), in file order."""
    prompts = load_benign_prompts(cfg.path)
    if cfg.num_prompts > len(prompts):
        raise ValueError(f"helpful.num_prompts={cfg.num_prompts}: the prompt file "
                         f"{cfg.path or BENIGN_PROMPTS} holds only {len(prompts)} prompts")
    picked = sorted(random.Random(cfg.seed).sample(range(len(prompts)), cfg.num_prompts))
    return [prompts[i] for i in picked]


# ---------------------------------------------------------------- the rules


def decide(answer_unsafe: bool | None, chosen_unsafe: bool | None, keep: KeepCfg, *,
           generate_error: bool = False) -> tuple[str | None, str]:
    """``(kind, rule)`` of one judged answer: kind ``harmful``/``safe`` when kept, None when dropped."""
    if generate_error:
        return None, "generate_error"
    if answer_unsafe is None or chosen_unsafe is None:
        return None, "judge_error"
    if chosen_unsafe and keep.chosen_unsafe == "drop":
        return None, "chosen_unsafe"
    if answer_unsafe:
        return ("harmful", "unsafe_kept") if keep.unsafe_answer == "harmful" else (None, "unsafe_dropped")
    return ("safe", "safe_kept") if keep.safe_answer == "safe" else (None, "safe_dropped")


def decide_helpful(complied: bool | None, *, generate_error: bool = False) -> str:
    """The rule of one helpful answer: kept unless it is a refusal (or has no answer or verdict)."""
    if generate_error:
        return "generate_error"
    if complied is None:
        return "judge_error"
    return "helpful_kept" if complied else "helpful_refused"


@dataclass
class Tally:
    """Counts of one source (or of the helpful prompts): the summary's per-source entry."""

    source: str
    read: int = 0
    prompts: int = 0
    skipped: Counter = field(default_factory=Counter)
    generated: int = 0
    judged_unsafe: int = 0
    chosen_judged_unsafe: int = 0
    rules: Counter = field(default_factory=Counter)

    @property
    def kept(self) -> int:
        return sum(v for k, v in self.rules.items() if k in ("unsafe_kept", "safe_kept", "helpful_kept"))

    def to_dict(self) -> dict:
        errors = self.rules["generate_error"] + self.rules["judge_error"]
        return {"source": self.source, "read": self.read, "prompts": self.prompts,
                "skipped": dict(sorted(self.skipped.items())), "generated": self.generated,
                "judged_unsafe": self.judged_unsafe, "chosen_judged_unsafe": self.chosen_judged_unsafe,
                "kept": self.kept, "errors": errors,
                "rules": {k: self.rules[k] for k in RULES if self.rules[k]}}


def pair_example(example: PreferenceExample, turn: str, row: dict, chosen_unsafe: bool | None,
                 keep: KeepCfg, tally: Tally, generation: dict, judge_name: str) -> PreferenceExample | None:
    """Apply the rules to one generated row of ``example`` (``row``: the pipeline's output) and count it.

    Returns the on-policy pair (y- = the model's shown answer), or None when a rule drops it.
    """
    error = row.get("error") or ""
    generate_error = bool(error) and not error.startswith("judge:")
    answer_unsafe = None if error else row.get("unsafe")
    tally.generated += 1
    tally.judged_unsafe += answer_unsafe is True
    tally.chosen_judged_unsafe += chosen_unsafe is True
    kind, rule = decide(answer_unsafe, chosen_unsafe, keep, generate_error=generate_error)
    tally.rules[rule] += 1
    if kind is None:
        return None
    meta = {"rejected_unsafe": answer_unsafe, "chosen_unsafe": chosen_unsafe, "rule": rule,
            "origin_source": example.source, "origin_location": example.location,
            "origin_kind": example.kind, "origin_rejected": example.rejected, "sample": row["sample"],
            "judge": judge_name, "judge_stand_in": bool(row.get("stand_in")),
            "judge_raw": row.get("judge_raw"), "stopped": row.get("stopped"),
            "generation": generation, "origin_meta": example.meta}
    return PreferenceExample(source=f"onpolicy:{example.source}", location=example.location,
                             prompt=(Message("user", turn),), chosen=example.chosen,
                             rejected=row["answers"][-1], kind=kind, meta=meta)


def helpful_example(item: dict, row: dict, complied: bool | None, tally: Tally, generation: dict,
                    refusal_judge: str) -> PreferenceExample | None:
    """Apply the helpful rule to one generated benign answer and count it; the row, or None."""
    error = row.get("error") or ""
    generate_error = bool(error) and not error.startswith("judge:")
    tally.generated += 1
    rule = decide_helpful(None if generate_error else complied, generate_error=generate_error)
    tally.rules[rule] += 1
    if rule != "helpful_kept":
        return None
    meta = {"rejected_unsafe": None, "chosen_unsafe": None, "rule": rule, "origin_source": "benign-prompts",
            "origin_location": item["location"], "category": item["category"], "topic": item["topic"],
            "refused": False, "refusal_judge": refusal_judge, "sample": row["sample"],
            "judge": row.get("judge"), "judge_unsafe": row.get("unsafe"), "stopped": row.get("stopped"),
            "generation": generation}
    return PreferenceExample(source="onpolicy:helpful", location=item["location"],
                             prompt=(Message("user", item["prompt"]),), chosen=row["answers"][-1],
                             rejected=None, kind="safe", meta=meta)


# ---------------------------------------------------------------- output


def example_dict(ex: PreferenceExample) -> dict:
    """One output row (the ``jsonl`` source's format)."""
    return {"source": ex.source, "location": ex.location, "prompt": ex.prompt_dicts(), "chosen": ex.chosen,
            "rejected": ex.rejected, "kind": ex.kind, "meta": ex.meta}


def write_examples(path: str | os.PathLike, examples: list[PreferenceExample]) -> Path:
    """Write ``examples`` as JSONL atomically (readers never see a half-written file)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with tmp.open("w") as f:
        for ex in examples:
            f.write(json.dumps(example_dict(ex), ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return out


def side_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """``(<out>.summary.json, <out>.config.yaml)``."""
    out = Path(out)
    return out.with_suffix(".summary.json"), out.with_suffix(".config.yaml")


def reusable(cfg: OnPolicyCfg) -> dict | None:
    """The summary of a complete earlier output made with this exact config, or None.

    Complete: the summary (written last) records this config's digest and as many rows as the file has.
    """
    out = Path(cfg.out)
    summary_path, _ = side_paths(out)
    if not (out.is_file() and summary_path.is_file()):
        return None
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError:
        return None
    with out.open() as f:
        num_rows = sum(1 for line in f if line.strip())
    if summary.get("config_digest") != digest(cfg) or summary.get("num_rows") != num_rows:
        return None
    return summary
