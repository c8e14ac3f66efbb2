"""Config of ``jobs/eval.py`` and of its parts (engine, decoding, judges, datasets)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from bt_ray.config import check
from bt_ray.data.parts import DEFAULT_FRACTIONS, PARTED_SOURCES, part_checks
from bt_ray.data.sources.xstest import XSTEST_DATASETS
from bt_ray.data.synthetic import SyntheticWorldCfg
from bt_ray.models import ModelCfg

EVAL_DATASETS = (
    "synthetic", "advbench", "malicious-instructions", "simple-safety-tests", "strongreject", "hh-rlhf",
    "q-harm", "mt-bench", "xstest",
)

ROW_DATASETS = {"xstest": XSTEST_DATASETS}
"""Where a source names its halves apart (XSTest's unsafe contrast prompts and safe prompts): the
``dataset`` name its rows carry, by their ``harmful`` flag."""


def row_datasets(name: str, harmful: bool | None) -> tuple[str, ...]:
    """The ``dataset`` names of the rows an eval dataset entry gives: its name, or those of the halves
    its ``harmful`` filter keeps."""
    halves = ROW_DATASETS.get(name)
    if halves is None:
        return (name,)
    return tuple(halves.values()) if harmful is None else (halves[harmful],)


@dataclass(frozen=True, kw_only=True, slots=True)
class DecodeCfg:
    """How tokens are drawn; the ``[RESET]`` knobs are PAPER.md section 5's."""

    max_new_tokens: int = 128
    """Generated tokens per turn at most (paper: 512; 1024 for MT-Bench)."""
    temperature: float = 0.0
    """0 is greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass (with temperature > 0)."""
    seed: int = 0
    """Sampling seed."""
    reset_bias: float = 0.0
    """b, added to the [RESET] logit at every step (negative: fewer resets); |b| <= 100, the range vLLM's
    logit_bias clamps to, so both engines apply the same b."""
    max_resets: int | None = 1
    """Resets allowed per answer; after that the [RESET] logit is -inf. null: unlimited."""
    reset_window: int | None = None
    """A [RESET] is possible only within this many tokens after the start of the answer or the last
    reset (then its logit is -inf); null: anywhere (the paper). Serving's hold mode sets it, so it
    holds back at most this many tokens."""

    def __post_init__(self):
        check(self, [
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("reset_bias", abs(self.reset_bias) <= 100,
             "must be in [-100, 100] (vLLM clamps logit_bias there)"),
            ("max_resets", self.max_resets is None or self.max_resets >= 0, "must be >= 0 or null"),
            ("reset_window", self.reset_window is None or self.reset_window >= 1, "must be >= 1 or null"),
        ])


@dataclass(frozen=True, kw_only=True, slots=True)
class EngineCfg:
    """Which engine generates, and the actor pool it runs on."""

    kind: Literal["auto", "hf", "vllm"] = "auto"
    """hf (transformers generate), vllm, or auto: vllm when it is installed."""
    num_actors: int = 2
    """Generation actors in the Ray Data pool (concurrency)."""
    batch_size: int = 16
    """Prompts per generate call (and per Ray Data batch)."""
    batches_per_actor: int | None = None
    """Ray Data batches each generation actor works on at once, each in its own thread: on vLLM their
    requests share one continuous batch, so the engine never idles between batches. null: 4 on vLLM,
    1 on HF (transformers generate cannot batch across calls; > 1 on HF is an error). Above 1, which
    requests share an engine step depends on timing, so a few rows' floats (and, rarely, tokens) vary
    run to run, as on any continuously batching server; 1 keeps every batch fixed: rows reproduce
    bit for bit."""
    num_cpus_per_actor: float = 1.0
    """Logical CPUs each generation actor asks Ray for."""
    num_gpus_per_actor: float = 0.0
    """GPUs each generation actor asks Ray for (0 on CPU machines)."""
    actor_start_timeout_s: int = 0
    """> 0: every generation actor is up (model loaded) before the first batch is handed out, so
    actors that load slowly (vLLM: 10-60 s) do not leave the work to the first one up; a cluster
    that cannot start them all in this time is an error. 0: batches go out as actors come up
    (Ray Data's default; on 2 CPU cores it measured faster for quick-loading HF actors)."""
    max_prompt_tokens: int = 768
    """Longer prompts are an error for that row (recorded, the run goes on); < vllm_max_model_len on vLLM."""
    vllm_max_model_len: int = 1024
    """vLLM's context length (prompt + answer)."""
    vllm_kv_cache_memory_bytes: int = 1 << 30
    """KV cache size given to vLLM (its free-memory probe fails inside Ray actors without it)."""
    vllm_omp_threads_bind: str | None = None
    """VLLM_CPU_OMP_THREADS_BIND for vLLM on CPU (e.g. 0-1); null leaves vLLM's default."""

    def __post_init__(self):
        check(self, [
            ("num_actors", self.num_actors >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("batches_per_actor", self.batches_per_actor is None or self.batches_per_actor >= 1,
             "must be >= 1 or null"),
            ("batches_per_actor", self.kind != "hf" or (self.batches_per_actor or 1) == 1,
             "must be 1 or null on the HF engine (transformers generate cannot batch across calls)"),
            ("num_cpus_per_actor", self.num_cpus_per_actor >= 0, "must be >= 0"),
            ("num_gpus_per_actor", self.num_gpus_per_actor >= 0, "must be >= 0"),
            ("actor_start_timeout_s", self.actor_start_timeout_s >= 0, "must be >= 0"),
            ("max_prompt_tokens", self.max_prompt_tokens >= 1, "must be >= 1"),
            ("vllm_max_model_len", self.vllm_max_model_len >= 64, "must be >= 64"),
            ("max_prompt_tokens", self.kind == "hf" or self.max_prompt_tokens < self.vllm_max_model_len,
             f"must be < vllm_max_model_len ({self.vllm_max_model_len}) on vLLM, which rejects longer "
             "prompts (leaving room for the answer)"),
            ("vllm_kv_cache_memory_bytes", self.vllm_kv_cache_memory_bytes >= 1 << 20, "must be >= 1 MiB"),
        ])


@dataclass(frozen=True, kw_only=True, slots=True)
class LLMJudgeCfg:
    """An OpenAI-compatible chat/completions endpoint used as a judge (StrongREJECT, MT-Bench)."""

    base_url: str | None = None
    """e.g. http://127.0.0.1:8000/v1; null: no LLM judge."""
    model: str = "gpt-4o-mini"
    """Model name sent in each request."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (may be unset for local servers)."""
    timeout_s: float = 60.0
    """Per-request timeout."""
    max_tokens: int = 512
    """Longest judge answer."""

    def __post_init__(self):
        check(self, [
            ("base_url", self.base_url is None or self.base_url.startswith(("http://", "https://")),
             "must be an http(s) URL or null"),
            ("timeout_s", self.timeout_s > 0, "must be > 0"),
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
        ])


XSTEST_COMPLETIONS = "xstest/model_completions/xstest_v2_completions_{}.csv"


@dataclass(frozen=True, kw_only=True, slots=True)
class RefusalClassifierCfg:
    """The refusal-classifier stand-in judge (``bt_ray.eval.refusal_classifier``): TF-IDF + logistic
    regression over the start of the answer. Defaults chosen by ``tune`` (leave-one-file-out CV on the
    training files only: mean kappa 0.785, accuracy 0.912); mistralinstruct's XSTest answers are never
    trained or tuned on."""

    train_files: tuple[str, ...] = (XSTEST_COMPLETIONS.format("gpt4"),
                                    XSTEST_COMPLETIONS.format("llama2orig"))
    """Human-labelled CSVs (prompt, completion, final_label) it fits on; relative: under $BT_RAY_DATA_DIR."""
    response_chars: int = 300
    """Characters of the answer's start it reads (refusals show early; long answers add noise)."""
    c: float = 1.0
    """Inverse L2 strength of the logistic regression."""
    word_ngrams: int = 2
    """Word n-grams 1..word_ngrams."""
    char_ngrams: int = 0
    """Char (word-bounded) n-grams 2..char_ngrams; 0: none."""
    refusal_strings: float = 3.0
    """Value of the AdvBench refusal-string hit feature (its weight against the TF-IDF features); 0: off."""
    cache_dir: str | None = None
    """Where the fitted model is cached; null: $BT_RAY_CACHE, else ~/.cache/bt-ray."""

    def __post_init__(self):
        check(self, [
            ("train_files", len(self.train_files) >= 1, "must name at least one file"),
            ("response_chars", self.response_chars >= 16, "must be >= 16"),
            ("c", self.c > 0, "must be > 0"),
            ("word_ngrams", self.word_ngrams >= 1, "must be >= 1"),
            ("char_ngrams", self.char_ngrams == 0 or self.char_ngrams >= 2, "must be 0 or >= 2"),
            ("refusal_strings", self.refusal_strings >= 0, "must be >= 0"),
        ])


@dataclass(frozen=True, kw_only=True, slots=True)
class JudgeCfg:
    """Who decides whether a shown answer is unsafe."""

    safety: Literal["llama-guard-2", "refusal-prefix", "llm", "refusal-classifier"] = "refusal-prefix"
    """Judge of the real safety sets; refusal-prefix (keywords) and refusal-classifier (TF-IDF + logistic
    regression fitted on XSTest labels) are stand-ins, labelled as such."""
    refusal: Literal["refusal-prefix", "refusal-classifier"] = "refusal-prefix"
    """Judge of refusals on safe prompts (each harmful=False row's ``refused``, so over-refusal); the
    default needs no data (refusal-classifier fits on XSTest files under $BT_RAY_DATA_DIR)."""
    refusal_classifier: RefusalClassifierCfg = field(default_factory=RefusalClassifierCfg)
    """The refusal-classifier judge (safety or refusal = refusal-classifier)."""
    llama_guard_model: str = "meta-llama/Meta-Llama-Guard-2-8B"
    """Llama Guard 2 weights (HF dir or hub id) when safety is llama-guard-2."""
    llama_guard_max_new_tokens: int = 10
    """Tokens Llama Guard may write (its verdict is 'safe' or 'unsafe\\nS<n>')."""
    synthetic_exact: bool = True
    """Judge synthetic-world prompts with the world's exact judge (else with the safety judge)."""
    llm: LLMJudgeCfg = field(default_factory=LLMJudgeCfg)
    """The LLM-as-judge endpoint (safety = llm, and MT-Bench helpfulness)."""

    def __post_init__(self):
        check(self, [
            ("llama_guard_max_new_tokens", self.llama_guard_max_new_tokens >= 2, "must be >= 2"),
        ])


@dataclass(frozen=True, kw_only=True, slots=True)
class DatasetCfg:
    """One evaluation set."""

    name: str = "synthetic"
    """One of synthetic, advbench, malicious-instructions, simple-safety-tests, strongreject, hh-rlhf,
    q-harm, mt-bench, xstest (250 safe prompts, harmful=false, and 200 unsafe contrast prompts)."""
    path: str | None = None
    """File, directory or hub spec; null: $BT_RAY_DATA_DIR layout (module bt_ray.data.sources)."""
    limit: int | None = None
    """Prompts used at most; null: all."""
    cluster_by: str | None = None
    """Field whose value groups prompts into clusters for cluster-aware intervals: category, or a key of
    the prompt's meta; null: meta.cluster when the prompt has it (the synthetic world's (template,
    task)), else each prompt is its own cluster."""
    harmful: bool | None = None
    """Keep only prompts with this harmful flag (false: the safe prompts, e.g. a calibration dev set),
    before ``limit``; null: all."""
    part: str | None = None
    """A seeded part of the set (``bt_ray.data.parts``; hh-rlhf, xstest): train, dev or test, by a stable
    hash of (part_seed, the first user turn); null: the whole set. Evaluate on dev/test of the file a
    training source reads part train of; calibrate on xstest dev, report on xstest test."""
    part_seed: int = 0
    """Seed of the part assignment (the training source's, for disjoint parts of one file)."""
    part_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    """Shares of train, dev, test (sum 1; the chosen part's > 0); xstest, never trained on: [0, 0.5, 0.5]."""
    max_turns: int | None = None
    """Answer only the first this many user turns of each prompt (1: MT-Bench's first turns, a single-turn
    safe set); null: every turn."""

    def __post_init__(self):
        check(self, [
            ("name", self.name in EVAL_DATASETS, f"must be one of {', '.join(EVAL_DATASETS)}"),
            ("part", self.part is None or self.name in PARTED_SOURCES,
             f"must be null: dataset {self.name!r} cannot be cut into parts "
             f"(only {', '.join(PARTED_SOURCES)})"),
            *part_checks(self.part, self.part_seed, self.part_fractions),
            ("max_turns", self.max_turns is None or self.max_turns >= 1, "must be >= 1 or null"),
            ("cluster_by", self.cluster_by is None or self.cluster_by.strip() != "",
             "must be a field name or null"),
            ("limit", self.limit is None or self.limit >= 1, "must be >= 1 or null"),
        ])


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalCfg:
    """Everything ``jobs/eval.py`` does, on one page."""

    run_dir: str = "outputs/eval"
    """Where rows, summary.json, plots and the default MLflow store go."""
    models: tuple[str, ...] = ("tiny",)
    """Models to evaluate: presets or HF directories (each replaces model.name)."""
    labels: tuple[str, ...] = ()
    """Names of the models in tables and MLflow runs; empty: the directory names."""
    model: ModelCfg = field(default_factory=ModelCfg)
    """Loading settings shared by every model (dtype, [RESET] token, tiny preset shape)."""
    engine: EngineCfg = field(default_factory=EngineCfg)
    """Generation engine and actor pool."""
    decode: DecodeCfg = field(default_factory=DecodeCfg)
    """Decoding of the main evaluation."""
    datasets: tuple[DatasetCfg, ...] = (DatasetCfg(name="synthetic"),)
    """Evaluation sets."""
    synthetic: SyntheticWorldCfg = field(default_factory=SyntheticWorldCfg)
    """The synthetic world (its eval prompts)."""
    judge: JudgeCfg = field(default_factory=JudgeCfg)
    """Judges."""
    worst_of_k: tuple[int, ...] = ()
    """k values of the worst-of-k unsafe rate under sampling; empty: skipped."""
    worst_of_k_temperature: float = 1.0
    """Sampling temperature of the worst-of-k runs."""
    bias_sweep: tuple[float, ...] = ()
    """[RESET] logit biases to sweep (safety, reset rate on safe prompts, throughput); empty: skipped."""
    ray_num_cpus: int | None = None
    """Logical CPUs of the local Ray the job starts when none is running (null: the machine's cores)."""
    mlflow_experiment: str = "bt-ray-eval"
    """MLflow experiment (store: $MLFLOW_TRACKING_URI, else sqlite under run_dir)."""
    compare: tuple[tuple[str, str], ...] = ()
    """Pairs of labels (baseline, backtrack) compared on the same prompts: paired and cluster-aware
    differences of unsafe rates in summary.json's comparisons; empty: none."""
    compare_keys: tuple[str, ...] = ()
    """What each pair is compared on: the names rows carry (a dataset's name; XSTest's halves are
    xstest-safe and xstest-unsafe), pooled, worst-of-K; empty: every dataset with harmful prompts (a
    set of safe prompts only, such as mt-bench, has no unsafe rate to compare), pooled (when two or
    more pooled safety sets are evaluated) and every worst-of-k."""
    max_error_fraction: float = 0.01
    """The eval fails, naming the engine or judge, when more than this fraction of a run's rows errored."""
    bootstrap_resamples: int = 2000
    """Resamples of the cluster bootstrap (rates and paired differences)."""
    bootstrap_seed: int = 0
    """Seed of the cluster bootstrap."""

    def row_datasets(self) -> tuple[str, ...]:
        """The ``dataset`` names this eval's rows carry, in config order (XSTest's halves apart)."""
        return tuple(dict.fromkeys(n for d in self.datasets for n in row_datasets(d.name, d.harmful)))

    def __post_init__(self):
        check(self, [
            ("models", len(self.models) >= 1, "must name at least one model"),
            ("labels", not self.labels or len(self.labels) == len(self.models),
             "must be empty or give one label per model"),
            ("labels", len(set(self.labels)) == len(self.labels), "must be distinct"),
            ("datasets", len(self.datasets) >= 1, "must list at least one dataset"),
            ("worst_of_k", all(k >= 1 for k in self.worst_of_k), "must hold k >= 1"),
            ("worst_of_k_temperature", self.worst_of_k_temperature > 0, "must be > 0"),
            ("ray_num_cpus", self.ray_num_cpus is None or self.ray_num_cpus >= 1, "must be >= 1 or null"),
            ("compare", all(len(set(p)) == 2 and set(p) <= set(self.labels or _dir_labels(self.models))
                            for p in self.compare),
             "must hold pairs of two distinct model labels (baseline, backtrack)"),
            ("compare_keys", all(k == "pooled" or k in self.row_datasets() or _worst_key(k, self.worst_of_k)
                                 for k in self.compare_keys),
             f"must name datasets of this config's rows ({', '.join(self.row_datasets())}), pooled, or "
             "worst-of-K with K in worst_of_k"),
            ("max_error_fraction", 0 <= self.max_error_fraction <= 1, "must be in [0, 1]"),
            ("bootstrap_resamples", self.bootstrap_resamples >= 100, "must be >= 100"),
        ])


def _dir_labels(models: tuple[str, ...]) -> set[str]:
    """Default labels (``jobs/eval.py``): each model's directory name."""
    from pathlib import Path

    return {Path(m).name or m for m in models}


def _worst_key(key: str, ks: tuple[int, ...]) -> bool:
    k = key.removeprefix("worst-of-")
    return key.startswith("worst-of-") and k.isdigit() and int(k) in ks
