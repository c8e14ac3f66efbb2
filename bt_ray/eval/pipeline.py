"""The Ray Data evaluation pipeline: prompts -> generate (actor pool) -> backtracking post-processing
-> judge -> one row per (prompt, sample).

    passes' rows --map_batches(GenerateStage, ActorPoolStrategy(size=engine.num_actors,
                               engine.batches_per_actor batches in flight per actor))--> generated rows
                 --map_batches(JudgeStage, 1 actor)--> judged rows --take_all--> per pass, sorted by index

A pass (``Pass``) is one model and decoding over its rows. An eval of several models, with worst-of-k
samples and bias points, is one pipeline (``run_passes``): the actors start once and move from model
to model (on vLLM the weights are reloaded into the running engine when the architecture is shared).
Each actor works on several batches at once, in threads; on vLLM their requests join one continuous
batch (``bt_ray.eval.stepper``), so the engine never idles between batches.

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

The stages live beside their work: ``bt_ray.eval.generate`` (``generate_rows``, ``GenerateStage``) and
``bt_ray.eval.judging`` (``judge_rows``, ``JudgeStage``); this module loads the prompts, wires the
stages into Ray Data and writes the rows and metrics.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from bt_ray import config
from bt_ray.data.synthetic import SyntheticWorldCfg
from bt_ray.eval.config import DatasetCfg, DecodeCfg, EngineCfg, EvalCfg, JudgeCfg
from bt_ray.eval.generate import GenerateStage
from bt_ray.eval.judging import JudgeStage
from bt_ray.models import ModelCfg

# ---------------------------------------------------------------- prompts


def load_items(cfg: EvalCfg) -> list[dict]:
    """The prompts of every configured dataset as plain dicts (``prompt_index`` counts per dataset).

    Each item gets a ``cluster``, the unit that cluster-aware intervals resample (prompts of one
    cluster are not independent draws). In order: the value of the dataset's ``cluster_by`` field
    (``category``, or a key of the prompt's ``meta``) when the config names one; else the prompt's
    ``meta["cluster"]`` (the synthetic world's "<template>|<task>"); else the prompt itself
    (``prompt:<prompt_index>``: only the samples of one prompt are clustered). A dataset's ``harmful``
    filter keeps the prompts of that flag, then ``limit`` applies. A dataset's ``part`` keeps one seeded
    part of the set (``bt_ray.data.parts``, the same cut the training loaders make), and ``max_turns``
    keeps each prompt's first user turns.
    """
    from bt_ray.data.parts import EmptyPartError, make_part
    from bt_ray.data.sources import load_prompts
    from bt_ray.data.synthetic import eval_prompts

    items = []
    for ds in cfg.datasets:
        if ds.name == "synthetic":
            prompts, _ = eval_prompts(cfg.synthetic)
        else:  # with a harmful filter, the limit counts the prompts it keeps
            part = make_part(ds.part, ds.part_seed, ds.part_fractions)
            try:
                prompts, _ = load_prompts(ds.name, ds.path, limit=ds.limit if ds.harmful is None else None,
                                          part=part)
            except EmptyPartError as e:
                raise EmptyPartError(f"datasets[{ds.name}].part: {e}") from e
        if ds.harmful is not None:
            prompts = [p for p in prompts if p.harmful == ds.harmful]
            if not prompts:
                raise ValueError(f"datasets[{ds.name}].harmful={ds.harmful}: the set has no such prompt")
        prompts = prompts[: ds.limit] if ds.limit else prompts
        for i, p in enumerate(prompts):
            items.append({"dataset": p.dataset, "prompt_index": i, "cluster": _cluster(ds, p, i),
                          "location": p.location, "category": p.category, "harmful": p.harmful,
                          "turns": list(p.turns[: ds.max_turns])})
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


# ---------------------------------------------------------------- the pipeline


def batches_per_actor(engine: EngineCfg) -> int:
    """``engine.batches_per_actor``, or its default for the resolved engine (4 on vLLM, 1 on HF)."""
    from bt_ray.eval.engines import resolve_kind

    kind = resolve_kind(engine.kind)
    if engine.batches_per_actor is None:
        return 4 if kind == "vllm" else 1
    if kind == "hf" and engine.batches_per_actor > 1:  # kind auto resolved to HF (no vLLM installed)
        raise ValueError(f"engine.batches_per_actor={engine.batches_per_actor}: must be 1 or null on the HF "
                         "engine (engine.kind=auto resolved to hf: vLLM is not installed)")
    return engine.batches_per_actor


@dataclass(frozen=True)
class Pass:
    """One model and decoding over its rows (a model's main table, its worst-of-k samples, a bias point).

    Several passes run through one pipeline (``run_passes``): the actors start once and move from
    model to model, so an eval of four fine-tunes pays one start-up, not four or eight.
    """

    key: str
    model: ModelCfg
    decode: DecodeCfg
    rows: list[dict]


def run_pipeline(rows: list[dict], *, model: ModelCfg, engine: EngineCfg, decode: DecodeCfg,
                 judge: JudgeCfg) -> tuple[list[dict], dict]:
    """Run generation and judging over ``rows`` on the current Ray cluster (one pass, ``run_passes``).

    Returns:
        ``(rows, timing)``: every input row (sorted by ``index``), judged or carrying its error; and
        ``wall_s`` (whole pipeline, actor start-up included) and ``generate_span_s`` (first batch
        start to last batch end, start-up excluded).
    """
    return run_passes([Pass("main", model, decode, rows)], engine=engine, judge=judge)["main"]


def run_passes(passes: list[Pass], *, engine: EngineCfg,
               judge: JudgeCfg) -> dict[str, tuple[list[dict], dict]]:
    """Run every pass's rows through one pipeline (one actor pool) on the current Ray cluster.

    Returns:
        Per pass key, ``(rows, timing)`` as ``run_pipeline``: its rows sorted by ``index``, and
        ``generate_span_s`` over its own rows; ``wall_s`` is the whole pipeline's (shared).
    """
    import ray

    keys = [p.key for p in passes]
    if len(set(keys)) != len(keys) or not passes:
        raise ValueError(f"run_passes: pass keys must be unique and non-empty, got {keys}")
    engine_d = config.to_dict(engine)
    specs = {p.key: {"model": config.to_dict(p.model), "decode": config.to_dict(p.decode)} for p in passes}
    items = [{"payload": json.dumps(dict(r, **{"pass": p.key}))} for p in passes for r in p.rows]
    num_blocks = max(engine.num_actors, math.ceil(len(items) / engine.batch_size))
    ds = ray.data.from_items(items, override_num_blocks=num_blocks)
    in_flight = batches_per_actor(engine)
    ds = ds.map_batches(
        GenerateStage,
        fn_constructor_kwargs={"passes": specs, "engine": engine_d},
        # Several batches per actor, each in its own thread: their requests join one vLLM batch.
        compute=ray.data.ActorPoolStrategy(size=engine.num_actors, max_tasks_in_flight_per_actor=in_flight,
                                           max_concurrent_calls_per_actor=in_flight,
                                           enable_true_multi_threading=in_flight > 1),
        batch_size=engine.batch_size,
        num_cpus=engine.num_cpus_per_actor,
        num_gpus=engine.num_gpus_per_actor,
    )
    heavy_judge = judge.safety == "llama-guard-2"
    ds = ds.map_batches(
        JudgeStage,
        # The judge's dtype follows the (first) policy's, as with one model.
        fn_constructor_kwargs={"judge": config.to_dict(judge), "model": specs[keys[0]]["model"],
                               "engine": engine_d},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=engine.batch_size,
        # Light judges take a quarter CPU so they never starve the generation actors on small machines.
        num_cpus=engine.num_cpus_per_actor if heavy_judge else 0.25,
        num_gpus=engine.num_gpus_per_actor if heavy_judge else 0,
    )
    if engine.actor_start_timeout_s > 0:  # the dataset holds its own copy of the DataContext: set it there
        ds.context.wait_for_min_actors_s = engine.actor_start_timeout_s
    start = time.perf_counter()
    done: dict[str, list[dict]] = {key: [] for key in keys}
    for r in ds.take_all():
        row = json.loads(r["payload"])
        done[row.pop("pass")].append(row)
    wall = time.perf_counter() - start
    out = {}
    for p in passes:
        rows = sorted(done[p.key], key=lambda r: r["index"])
        assert [r["index"] for r in rows] == sorted(r["index"] for r in p.rows), \
            f"the pipeline lost or duplicated rows of pass {p.key}"
        starts = [r["generate_start"] for r in rows if "generate_start" in r]
        ends = [r["generate_end"] for r in rows if "generate_end" in r]
        out[p.key] = rows, {"wall_s": wall, "generate_span_s": max(ends) - min(starts) if starts else 0.0}
    return out


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
    rows, timing = run_pipeline(items, model=model, engine=engine, decode=decode, judge=judge)
    return write_pass(rows, timing, out_dir, where=f"model {model.name} ({engine.kind} engine)",
                      max_error_fraction=max_error_fraction, num_resamples=num_resamples, seed=seed)


def write_pass(rows: list[dict], timing: dict, out_dir, *, where: str,
               max_error_fraction: float | None = None, num_resamples: int = 2000, seed: int = 0) -> dict:
    """Write one pass's ``rows.jsonl`` and ``metrics.json`` in ``out_dir`` and return the metrics
    (``evaluate_model``'s; ``where`` names the model and engine in an error-rate failure)."""
    from pathlib import Path

    from bt_ray.eval.metrics import check_errors, summarize, throughput

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_rows(out_dir / "rows.jsonl", rows)
    if max_error_fraction is not None:
        check_errors(rows, max_error_fraction, where=f"{where}, rows in {out_dir / 'rows.jsonl'}")
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
    from bt_ray.models import BT_RAY_METADATA, read_metadata

    path = Path(model_name).expanduser() / BT_RAY_METADATA
    data = ((read_metadata(model_name) or {}).get("config") or {}).get("data") or {}
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
