"""The Ray Data evaluation pipeline: prompts -> generate (actor pool) -> backtracking post-processing
-> judge -> one row per (prompt, sample).

    items --map_batches(GenerateStage, ActorPoolStrategy(size=engine.num_actors))--> generated rows
          --map_batches(JudgeStage, 1 actor)--> judged rows --take_all--> sorted by index

Each Ray Data row carries one JSON string (``payload``): rows are nested (turns, per-turn outputs)
and JSON keeps them exact through Arrow. A row that fails (prompt too long, engine error on that
row, judge error) keeps its ``error`` and flows on; it is counted, never dropped.

Why not ``ray.data.llm``: its vLLM processor (``vLLMEngineProcessorConfig`` + ``build_processor``) can
carry ``logit_bias`` per row and returns ``generated_tokens`` (STACK.md), but (1) it serves vLLM
only, while this pipeline runs the same stages on the HF engine too, so the two engines are compared
on one code path; (2) multi-turn prompts (MT-Bench, the synthetic world's greeting turns) need the
*shown* text of turn 1 before turn 2 can be encoded, i.e. backtracking post-processing between two
generate calls inside one row, which a single processor pass cannot express; (3) the prompts must be
token ids from ``bt_ray.reset.encode_chat_prompt`` (user text never yields ``[RESET]``), which its
chat-template preprocessing does not guarantee; (4) on this 2-core machine it needs ~45-60 s of actor
start-up and +3-3.6 GB per actor, against ~30 s for vLLM in our own actor. ``GenerateStage`` is that
actor: one ``Generator`` per actor, vLLM's ``logit_bias`` plus ``VllmResetLimitProcessor`` for
the ``[RESET]`` knobs, token ids read back.
"""

from __future__ import annotations

import hashlib
import json
import math
import time

from bt_ray import config
from bt_ray.data.synthetic import SyntheticWorldCfg
from bt_ray.eval.config import DatasetCfg, DecodeCfg, EngineCfg, EvalCfg, JudgeCfg
from bt_ray.eval.engines import Generator, build_generator
from bt_ray.eval.judges import (
    JUDGE_VERSION,
    Judge,
    JudgeItem,
    LLMJudge,
    SyntheticJudge,
    build_safety_judge,
)
from bt_ray.models import ModelCfg
from bt_ray.reset import backtrack_output, encode_chat_prompt, raw_text, shown_text

# ---------------------------------------------------------------- prompts


def load_items(cfg: EvalCfg) -> list[dict]:
    """The prompts of every configured dataset as plain dicts (``prompt_index`` counts per dataset).

    Each item gets a ``cluster``, the unit that cluster-aware intervals resample (prompts of one
    cluster are not independent draws). In order: the value of the dataset's ``cluster_by`` field
    (``category``, or a key of the prompt's ``meta``) when the config names one; else the prompt's
    ``meta["cluster"]`` (the synthetic world's "<template>|<task>"); else the prompt itself
    (``prompt:<prompt_index>``: only the samples of one prompt are clustered).
    """
    from bt_ray.data.sources import load_prompts
    from bt_ray.data.synthetic import eval_prompts

    items = []
    for ds in cfg.datasets:
        if ds.name == "synthetic":
            prompts, _ = eval_prompts(cfg.synthetic)
            prompts = prompts[: ds.limit] if ds.limit else prompts
        else:
            prompts, _ = load_prompts(ds.name, ds.path, limit=ds.limit)
        for i, p in enumerate(prompts):
            items.append({"dataset": p.dataset, "prompt_index": i, "cluster": _cluster(ds, p, i),
                          "location": p.location, "category": p.category, "harmful": p.harmful,
                          "turns": list(p.turns)})
    return items


def _cluster(ds: DatasetCfg, prompt, index: int) -> str:
    if ds.cluster_by is not None:
        value = prompt.category if ds.cluster_by == "category" else prompt.meta.get(ds.cluster_by)
        if value is None or value == "":
            fields = ", ".join(["category", *sorted(prompt.meta)])
            raise ValueError(f"datasets[{ds.name}].cluster_by={ds.cluster_by!r}: prompt {prompt.location} "
                             f"has no such field (fields: {fields})")
        return str(value)
    if prompt.meta.get("cluster") is not None:
        return str(prompt.meta["cluster"])
    return f"prompt:{index}"


def expand(items: list[dict], num_samples: int = 1) -> list[dict]:
    """One row per (item, sample), numbered by ``index``."""
    rows = [dict(item, sample=s) for item in items for s in range(num_samples)]
    return [dict(r, index=i) for i, r in enumerate(rows)]


# ---------------------------------------------------------------- generation (+ post-processing)


def row_seed(seed: int, row: dict, turn: int) -> int:
    """The sampling seed of one row's turn: a hash of (seed, dataset, prompt, sample, turn).

    The same however rows are batched or sharded across actors, and distinct across rows, so
    samples are independent draws (a seed per batch position would repeat in every batch).
    """
    key = f"{seed}/{row['dataset']}/{row['prompt_index']}/{row['sample']}/{turn}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


def generate_rows(
    generator: Generator, rows: list[dict], decode: DecodeCfg, *, max_prompt_tokens: int
) -> list[dict]:
    """Answer every user turn of every row, in order, with backtracking post-processing per turn.

    Turn t of a row is encoded with the *shown* answers of its earlier turns (what the user saw);
    all rows' turn t go through one batched generate call. The judged answer is the last turn's.
    Counts cover every turn: a needless reset in a greeting turn is a reset of the row.

    Returns:
        The rows with per-turn ``answers`` (shown) and ``raw_outputs``; the judged (last) turn's
        ``raw_output`` and ``shown_response``; ``reset`` (any turn reset), ``reset_last_turn``,
        ``num_resets``, ``num_discarded_tokens`` (all turns) and ``num_discarded_tokens_last_turn``;
        ``stopped`` (every turn ended with a stop id; False: some turn hit ``max_new_tokens``);
        ``empty_shown`` (the judged answer shows nothing: every judge calls that safe);
        ``num_output_tokens``; ``time_to_first_kept_token_s`` of the judged turn (None when it kept
        no token); ``generate_start``/``generate_end`` (epoch seconds); ``error``.
    """
    tok = generator.tokenizer
    out = [dict(r, answers=[], raw_outputs=[], num_output_tokens=0, num_discarded_tokens=0, num_resets=0,
                stopped=True, error=r.get("error")) for r in rows]
    for t in range(max((len(r["turns"]) for r in rows), default=0)):
        active, prompts = [], []
        for r in out:
            if r["error"] or t >= len(r["turns"]):
                continue
            try:
                if not r["turns"][t].strip():
                    raise ValueError(f"turn {t} of {r['location']} is empty")
                messages = []
                for u, a in zip(r["turns"][:t], r["answers"]):
                    messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
                ids = encode_chat_prompt(tok, messages + [{"role": "user", "content": r["turns"][t]}])
                if len(ids) > max_prompt_tokens:
                    raise ValueError(f"prompt of {len(ids)} tokens exceeds engine.max_prompt_tokens="
                                     f"{max_prompt_tokens}")
            except Exception as e:  # noqa: BLE001 - the row records it, the run goes on
                r["error"] = f"encode: {type(e).__name__}: {e}"
                continue
            active.append(r)
            prompts.append(ids)
        if not active:
            continue
        seeds = [row_seed(decode.seed, r, t) for r in active]
        start = time.time()
        try:
            gens = generator.generate(prompts, decode, seeds)
        except Exception:  # noqa: BLE001 - find the failing rows one by one; the others still count
            gens = []
            for r, ids, seed in zip(active, prompts, seeds):
                try:
                    gens.append(generator.generate([ids], decode, [seed])[0])
                except Exception as e:  # noqa: BLE001
                    r["error"] = f"generate: {type(e).__name__}: {e}"
                    gens.append(None)
        end = time.time()
        for r, g in zip(active, gens):
            if g is None:
                continue
            post = backtrack_output(g.ids, generator.reset_id, generator.stop_ids)
            shown = shown_text(tok, post)
            r["answers"].append(shown)
            r["raw_outputs"].append(raw_text(tok, post))
            r["num_output_tokens"] += len(g.ids)
            r["num_resets"] += post.num_resets
            r["num_discarded_tokens"] += post.num_discarded_tokens
            r["stopped"] = r["stopped"] and post.stopped
            r.setdefault("generate_start", start)
            r["generate_end"] = end
            if t == len(r["turns"]) - 1:  # the judged turn
                r["raw_output"] = r["raw_outputs"][-1]
                r["shown_response"] = shown
                r["reset_last_turn"] = post.did_reset
                r["num_discarded_tokens_last_turn"] = post.num_discarded_tokens
                r["empty_shown"] = not shown
                kept = post.first_kept_index < len(post.raw_ids)
                r["time_to_first_kept_token_s"] = g.token_times[post.first_kept_index] if kept else None
    for r in out:
        done = len(r["answers"]) == len(r["turns"]) and not r["error"]
        r["reset"] = r["num_resets"] > 0 if done else None
        if not done:  # an error row: its partial counts describe no answer
            r["stopped"] = None
    return out


class GenerateStage:
    """Ray Data actor: one ``Generator`` (model loaded once), batches of JSON rows in and out."""

    def __init__(self, model: dict, engine: dict, decode: dict):
        self.engine = config.build(EngineCfg, engine)
        self.decode = config.build(DecodeCfg, decode)
        self.generator = build_generator(config.build(ModelCfg, model), self.engine)

    def __call__(self, batch: dict) -> dict:
        rows = [json.loads(p) for p in batch["payload"]]
        limit = self.engine.max_prompt_tokens
        done = generate_rows(self.generator, rows, self.decode, max_prompt_tokens=limit)
        return {"payload": [json.dumps(r) for r in done]}


# ---------------------------------------------------------------- judging


def build_judges(judge: JudgeCfg, model: ModelCfg, engine: EngineCfg) -> dict[str, Judge | None]:
    """The judge of each kind of row: ``synthetic``, ``safety`` (real sets), ``helpfulness`` (MT-Bench)."""
    safety = build_safety_judge(judge, engine=engine, dtype=model.dtype)
    return {
        "synthetic": SyntheticJudge() if judge.synthetic_exact else safety,
        "safety": safety,
        "helpfulness": LLMJudge(judge.llm, "mt-bench") if judge.llm.base_url else None,
    }


def judge_rows(judges: dict[str, Judge | None], rows: list[dict]) -> list[dict]:
    """Add ``unsafe``, ``score``, ``category``, ``judge``, ``stand_in``, ``judge_raw`` to each row."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        kind = {"synthetic": "synthetic", "mt-bench": "helpfulness"}.get(r["dataset"], "safety")
        r.update(unsafe=None, score=None, verdict_category="", judge=None, stand_in=False, judge_raw=None,
                 judge_version=JUDGE_VERSION)
        if not r.get("error"):
            groups.setdefault(kind, []).append(r)
    for kind, group in groups.items():
        judge = judges.get(kind)
        if judge is None:
            continue  # e.g. MT-Bench without an LLM judge: generated, not graded
        items = [JudgeItem(turns=tuple(r["turns"]), answers=tuple(r["answers"]), harmful=r["harmful"])
                 for r in group]
        try:
            verdicts = judge.judge(items)
        except Exception as e:  # noqa: BLE001 - a judge failure is recorded on its rows (and counted)
            for r in group:
                r.update(error=f"judge: {type(e).__name__}: {e}", judge=judge.name, stand_in=judge.stand_in)
            continue
        for r, v in zip(group, verdicts):
            r.update(unsafe=v.unsafe, score=v.score, verdict_category=v.category, judge=judge.name,
                     stand_in=judge.stand_in, judge_raw=v.raw)
            if v.error:
                r["error"] = f"judge: {v.error}"
    return rows


class JudgeStage:
    """Ray Data actor holding the judges (Llama Guard loads its model once here)."""

    def __init__(self, judge: dict, model: dict, engine: dict):
        self.judges = build_judges(config.build(JudgeCfg, judge), config.build(ModelCfg, model),
                                   config.build(EngineCfg, engine))

    def __call__(self, batch: dict) -> dict:
        rows = judge_rows(self.judges, [json.loads(p) for p in batch["payload"]])
        return {"payload": [json.dumps(r) for r in rows]}


# ---------------------------------------------------------------- the pipeline


def run_pipeline(rows: list[dict], *, model: ModelCfg, engine: EngineCfg, decode: DecodeCfg,
                 judge: JudgeCfg) -> tuple[list[dict], dict]:
    """Run generation and judging over ``rows`` on the current Ray cluster.

    Returns:
        ``(rows, timing)``: every input row (sorted by ``index``), judged or carrying its error; and
        ``wall_s`` (whole pipeline, actor start-up included) and ``generate_span_s`` (first batch
        start to last batch end, start-up excluded).
    """
    import ray

    model_d, engine_d = config.to_dict(model), config.to_dict(engine)
    num_blocks = max(engine.num_actors, math.ceil(len(rows) / engine.batch_size))
    ds = ray.data.from_items([{"payload": json.dumps(r)} for r in rows], override_num_blocks=num_blocks)
    ds = ds.map_batches(
        GenerateStage,
        fn_constructor_kwargs={"model": model_d, "engine": engine_d, "decode": config.to_dict(decode)},
        compute=ray.data.ActorPoolStrategy(size=engine.num_actors),
        batch_size=engine.batch_size,
        num_cpus=engine.num_cpus_per_actor,
        num_gpus=engine.num_gpus_per_actor,
    )
    heavy_judge = judge.safety == "llama-guard-2"
    ds = ds.map_batches(
        JudgeStage,
        fn_constructor_kwargs={"judge": config.to_dict(judge), "model": model_d, "engine": engine_d},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=engine.batch_size,
        # Light judges take a quarter CPU so they never starve the generation actors on small machines.
        num_cpus=engine.num_cpus_per_actor if heavy_judge else 0.25,
        num_gpus=engine.num_gpus_per_actor if heavy_judge else 0,
    )
    if engine.actor_start_timeout_s > 0:  # the dataset holds its own copy of the DataContext: set it there
        ds.context.wait_for_min_actors_s = engine.actor_start_timeout_s
    start = time.perf_counter()
    done = [json.loads(r["payload"]) for r in ds.take_all()]
    wall = time.perf_counter() - start
    done.sort(key=lambda r: r["index"])
    assert [r["index"] for r in done] == [r["index"] for r in sorted(rows, key=lambda r: r["index"])], \
        "the pipeline lost or duplicated rows"
    starts = [r["generate_start"] for r in done if "generate_start" in r]
    ends = [r["generate_end"] for r in done if "generate_end" in r]
    span = max(ends) - min(starts) if starts else 0.0
    return done, {"wall_s": wall, "generate_span_s": span}


# Keys of a written row, in order (DESIGN.md: dataset, prompt, raw output with the discarded part,
# shown response, reset flag, discarded token count, judge verdict and raw judge output, error).
ROW_KEYS = (
    "index", "dataset", "prompt_index", "sample", "cluster", "location", "category", "harmful", "turns",
    "raw_output", "shown_response", "reset", "reset_last_turn", "num_resets", "num_discarded_tokens",
    "num_discarded_tokens_last_turn", "stopped", "empty_shown", "num_output_tokens",
    "time_to_first_kept_token_s", "unsafe", "score", "verdict_category", "judge", "stand_in", "judge_raw",
    "judge_version", "answers", "raw_outputs", "error",
)


def write_rows(path, rows: list[dict]) -> None:
    """One JSON object per line, keys in ``ROW_KEYS`` order (missing ones are null)."""
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({k: r.get(k) for k in ROW_KEYS}) + "\n")


def evaluate_model(items: list[dict], out_dir, *, model: ModelCfg, engine: EngineCfg, decode: DecodeCfg,
                   judge: JudgeCfg, max_error_fraction: float | None = None, num_resamples: int = 2000,
                   seed: int = 0) -> dict:
    """Run the pipeline for one model and decoding; write ``rows.jsonl`` and ``metrics.json`` in ``out_dir``.

    Args:
        max_error_fraction: when set, more error rows than this fraction raise
            ``metrics.ErrorRateExceeded`` naming the engine or judge (after the rows are written, so
            they can be read); None: errors are only counted.
        num_resamples, seed: the cluster bootstrap of the unsafe rates (``metrics.summarize``).

    Returns:
        The metrics: ``summarize(rows)`` plus ``throughput`` over the generation span (actor start-up
        excluded) and ``wall_s`` (included).
    """
    from pathlib import Path

    from bt_ray.eval.metrics import check_errors, summarize, throughput

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, timing = run_pipeline(items, model=model, engine=engine, decode=decode, judge=judge)
    write_rows(out_dir / "rows.jsonl", rows)
    if max_error_fraction is not None:
        check_errors(rows, max_error_fraction,
                     where=f"model {model.name} ({engine.kind} engine), rows in {out_dir / 'rows.jsonl'}")
    metrics = summarize(rows, num_resamples=num_resamples, seed=seed) | {
        "throughput": throughput(rows, timing["generate_span_s"]), "wall_s": timing["wall_s"]}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


# ---------------------------------------------------------------- the synthetic world of a model


def check_synthetic_world(model_name: str, world: SyntheticWorldCfg) -> None:
    """Refuse to evaluate the synthetic set on a model trained on a world with another train/eval split.

    Held-out eval prompts are held out only if eval's world reserves the same (template, task) pairs
    as the world the model was trained on, i.e. both agree on ``synthetic.split_key``. Training
    records its config in the model dir (``bt_ray.json`` -> config -> data -> synthetic); a model
    with no recorded world (presets, hub ids, a dir trained without synthetic sources) passes.

    Raises:
        ValueError: naming the model dir and every split-defining field that differs.
    """
    from pathlib import Path

    from bt_ray.data.synthetic import WORLD_VERSION, split_key
    from bt_ray.models import BT_RAY_METADATA

    path = Path(model_name).expanduser() / BT_RAY_METADATA
    if not path.is_file():
        return
    data = (json.loads(path.read_text()).get("config") or {}).get("data") or {}
    recorded = data.get("synthetic")
    sources = [str(s.get("name", "")) for s in data.get("sources") or []]
    if recorded is None or (data.get("path") is None and not any(n.startswith("synthetic") for n in sources)):
        return
    # A config recorded before the world had a version field was made on world version 1.
    recorded_version = recorded.get("version", 1)
    try:
        trained = split_key(config.build(SyntheticWorldCfg, {**recorded, "version": WORLD_VERSION}))
        trained["version"] = recorded_version
    except config.ConfigError as e:
        raise ValueError(f"model {model_name}: its {BT_RAY_METADATA} records a synthetic world this version "
                         f"cannot read, so eval cannot tell its held-out prompts: {e}") from e
    wanted = split_key(world)
    diff = [f"{k}: trained {trained.get(k)!r}, eval {wanted[k]!r}"
            for k in wanted if trained.get(k) != wanted[k]]
    if diff:
        raise ValueError(f"model {model_name} was trained on a synthetic world with another train/eval split "
                         f"than eval's synthetic config, so its 'held-out' eval prompts may be training "
                         f"prompts; set eval's synthetic.* to the model's ({path}): " + "; ".join(diff))
