"""On-policy y-: the base model answers the training prompts, a judge labels the answers, rules keep them.

Run as:
    python jobs/onpolicy.py [--config FILE.yaml] [dotted.key=value ...]
    bt-ray onpolicy model.name=smollm2-135m 'sources=[{name: safety-tuned-llamas, limit: 200}]' \
        helpful.num_prompts=100 out=outputs/data/onpolicy.jsonl

Steps (``bt_ray.data.onpolicy`` holds the config, rules and format):
1. Load every source (sources an evaluation set tests on are refused first) and the benign prompts;
   a multi-turn prompt is skipped or asked by its last turn (``multi_turn``).
2. Generate the answers and judge them (y-) with the Ray Data eval pipeline (``run_passes``): one actor
   pool, ``samples_per_prompt`` answers per prompt.
3. Judge each source's y+ (``chosen``) with the same judge, and each benign answer with the refusal
   judge (``helpful.refusal_judge``); apply the ``keep`` rules.
4. Write ``out`` (PreferenceExample JSONL, atomically), ``<out>.config.yaml`` and, last,
   ``<out>.summary.json`` (counts per source and per rule). Too many answers without an answer or a
   verdict (``max_error_fraction``) fail the job before anything is written, naming engine and judge.

A rerun with the same resolved config reuses a complete output (the summary records the config's
digest and the row count) without starting Ray. Read the file back with the ``jsonl`` source, e.g.
``bt-ray data build 'sources=[{name: jsonl, path: outputs/data/onpolicy.jsonl}]'
recipe.judge_filter=column``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter

from bt_ray import config
from bt_ray.data.build import check_not_evaluated, load_source
from bt_ray.data.judge_filter import judge_items
from bt_ray.data.onpolicy import (
    RULES,
    OnPolicyCfg,
    Tally,
    digest,
    draw_benign,
    helpful_example,
    pair_example,
    prompt_turn,
    reusable,
    side_paths,
    write_examples,
)
from bt_ray.data.synthetic import SyntheticWorldCfg
from bt_ray.eval.engines import resolve_kind
from bt_ray.eval.judges import JudgeItem, build_safety_judge
from bt_ray.eval.pipeline import Pass, expand, run_passes

JUDGE_BATCH = 64  # answers per call to a driver-side judge


def parse_args(argv=None) -> OnPolicyCfg:
    return config.parse_job_args(OnPolicyCfg, __doc__, argv, example="helpful.num_prompts=100")


def load_prompts(cfg: OnPolicyCfg):
    """Per source: its tally, and its ``(example, turn)`` pairs to answer; and the benign prompts."""
    check_not_evaluated(cfg.sources, field="sources")
    groups = []
    for i, src in enumerate(cfg.sources):
        examples, report = load_source(src, SyntheticWorldCfg(), field=f"sources[{i}]")
        tally = Tally(source=f"sources[{i}] {src.name}", read=report.num_read,
                      skipped=Counter(report.skipped))
        todo = []
        for ex in examples:
            turn = prompt_turn(ex, cfg.multi_turn)
            if turn is None:
                tally.skipped["multi_turn"] += 1
            else:
                todo.append((ex, turn))
        tally.prompts = len(todo)
        groups.append((tally, todo))
    benign = draw_benign(cfg.helpful) if cfg.helpful.num_prompts else []
    return groups, benign


def pipeline_rows(groups, benign) -> list[dict]:
    """One pipeline row per prompt (``expand`` numbers the samples); ``group``/``item`` find its prompt."""
    items = []
    for g, (_, todo) in enumerate(groups):
        for n, (ex, turn) in enumerate(todo):
            items.append({"dataset": f"onpolicy:{ex.source}", "prompt_index": len(items),
                          "cluster": f"{g}:{n}", "location": ex.location, "category": "", "harmful": True,
                          "turns": [turn], "group": g, "item": n})
    for n, b in enumerate(benign):
        items.append({"dataset": "onpolicy:helpful", "prompt_index": len(items), "cluster": f"helpful:{n}",
                      "location": b["location"], "category": b["category"], "harmful": False,
                      "turns": [b["prompt"]], "group": "helpful", "item": n})
    return items


def judge_all(judge, items: list[JudgeItem]) -> list[bool | None]:
    """The judge's ``unsafe`` per item (None: no verdict), in batches; a judge that raises fails the job."""
    out = []
    for start in range(0, len(items), JUDGE_BATCH):
        verdicts = judge.judge(items[start:start + JUDGE_BATCH])
        out.extend(None if v.error else v.unsafe for v in verdicts)
    if len(out) != len(items):
        raise RuntimeError(f"judge {judge.name} gave {len(out)} verdicts for {len(items)} answers")
    return out


def main(cfg: OnPolicyCfg) -> dict:
    import ray

    summary_path, config_path = side_paths(cfg.out)
    done = reusable(cfg)
    if done is not None:
        print(f"== bt-ray onpolicy: {cfg.out} is complete for this config ({done['num_rows']} rows); reused")
        return done | {"reused": True}
    engine = resolve_kind(cfg.engine.kind)
    print(f"== bt-ray onpolicy -> {cfg.out} (model {cfg.model.name}, engine {engine})")
    groups, benign = load_prompts(cfg)
    for tally, _ in groups:
        print(f"-- {tally.source}: read {tally.read}, {tally.prompts} prompts, skipped {dict(tally.skipped)}")
    items = pipeline_rows(groups, benign)
    if not items:
        raise ValueError("no prompt to answer: every source was empty or skipped (see multi_turn)")
    if not ray.is_initialized():
        ray.init(num_cpus=cfg.ray_num_cpus, include_dashboard=False)
    t0 = time.perf_counter()
    answers = Pass("onpolicy", cfg.model, cfg.decode, expand(items, cfg.samples_per_prompt))
    rows, timing = run_passes([answers], engine=cfg.engine, judge=cfg.judge)["onpolicy"]
    print(f"-- {len(rows)} answers generated and judged in {time.perf_counter() - t0:.0f}s "
          f"(generation span {timing['generate_span_s']:.0f}s)")

    # y+ of every source prompt, judged once per prompt with the configured judge (in the driver: the
    # pipeline judges only what it generated).
    safety = build_safety_judge(cfg.judge, engine=cfg.engine, dtype=cfg.model.dtype)
    flat = [(g, n) for g, (_, todo) in enumerate(groups) for n in range(len(todo))]
    chosen = dict(zip(flat, judge_all(safety, [judge_items(groups[g][1][n][0], groups[g][1][n][0].chosen)
                                                for g, n in flat])))
    benign_rows = [r for r in rows if r["group"] == "helpful" and len(r["answers"]) == len(r["turns"])]
    refusal = build_safety_judge(dataclasses.replace(cfg.judge, safety=cfg.helpful.refusal_judge))
    complied = dict(zip((r["index"] for r in benign_rows), judge_all(refusal, [
        JudgeItem(turns=tuple(r["turns"]), answers=(r["answers"][-1],), harmful=True) for r in benign_rows])))

    generation = {"model": cfg.model.name, "engine": engine, **{k: getattr(cfg.decode, k) for k in (
        "max_new_tokens", "temperature", "top_p", "seed")}}
    helpful = Tally(source="helpful", read=len(benign), prompts=len(benign))
    examples = []
    for r in rows:
        if r["group"] == "helpful":
            ex = helpful_example(benign[r["item"]], r, complied.get(r["index"]), helpful, generation,
                                 refusal.name)
        else:
            tally, todo = groups[r["group"]]
            source_ex, turn = todo[r["item"]]
            ex = pair_example(source_ex, turn, r, chosen[(r["group"], r["item"])], cfg.keep, tally,
                              generation, safety.name)
        if ex is not None:
            examples.append(ex)

    tallies = [t for t, _ in groups] + ([helpful] if benign else [])
    totals = Counter()
    for t in tallies:
        totals.update(t.rules)
    errors = totals["generate_error"] + totals["judge_error"]
    if errors > cfg.max_error_fraction * len(rows):
        raise RuntimeError(f"{errors} of {len(rows)} answers got no answer or no verdict (more than "
                           f"max_error_fraction={cfg.max_error_fraction}): engine {engine} for model "
                           f"{cfg.model.name}, judge {safety.name}, refusal judge {refusal.name}; by rule: "
                           f"{dict(totals)}; errors: "
                           f"{Counter(r['error'][:60] for r in rows if r.get('error'))}")

    out = write_examples(cfg.out, examples)
    config.dump(cfg, config_path)
    kinds = Counter(ex.kind for ex in examples)
    summary = {
        "out": str(out), "config": str(config_path), "config_digest": digest(cfg),
        "git_sha": config.git_sha(),
        "num_rows": len(examples), "kinds": dict(kinds), "num_generated": len(rows),
        "judge": safety.name, "judge_stand_in": safety.stand_in, "refusal_judge": refusal.name,
        "generation": generation, "timing": timing,
        "sources": [t.to_dict() for t in tallies],
        "rules": {k: totals[k] for k in RULES if totals[k]}, "rule_meanings": RULES,
        "resolved_config": config.to_dict(cfg),
    }
    summary_path.write_text(json.dumps(summary, indent=2))  # last: marks the output complete
    for t in tallies:
        d = t.to_dict()
        print(f"-- {t.source}: generated {d['generated']}, judged unsafe {d['judged_unsafe']}, "
              f"kept {d['kept']}, by rule {d['rules']}")
    print(f"== wrote {len(examples)} rows ({dict(kinds)}) to {out} (summary {summary_path})")
    return summary


if __name__ == "__main__":
    main(parse_args())
