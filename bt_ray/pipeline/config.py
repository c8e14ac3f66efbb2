"""Config of the pipeline (``jobs/pipeline.py``, ``bt-ray pipeline``, ``make demo``) and its presets.

The pipeline chains ordinary jobs, each with its own config (the ``*_config`` fields), and forwards the
two things every stage must share:

* ``model``: built once with [RESET] and saved as ``<run_dir>/model-init``; the first training stage
  starts from that directory, so the model described is the model trained;
* ``synthetic``: the one synthetic world, passed whole to every training stage (``data.synthetic``), to
  eval, attacks and the serve check (``synthetic``), so held-out prompts stay held out.

Everything else about a stage lives in that stage's config; ``*_overrides`` reach one kind of stage.
A preset is ``jobs/configs/pipeline_<preset>.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bt_ray.config import check
from bt_ray.data.synthetic import SyntheticWorldCfg
from bt_ray.models import ModelCfg

# Override prefixes the pipeline forwards itself: naming them in stage_overrides would fork the model
# or the world.
FORWARDED_PREFIXES = ("model.", "data.synthetic.")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "jobs" / "configs"


@dataclass(frozen=True, kw_only=True, slots=True)
class PipelineCfg:
    """Everything ``jobs/pipeline.py`` does, on one page."""

    preset: str = "demo"
    """Name of this setup (the preset it came from); names the default MLflow experiment."""
    run_dir: str = "outputs/demo"
    """Where every output goes (model-init, runs, eval, attacks, stages/, logs/, summary.json, report)."""
    model: ModelCfg = field(default_factory=ModelCfg)
    """Model to build (tiny by default); the first training stage starts from it."""
    synthetic: SyntheticWorldCfg = field(default_factory=SyntheticWorldCfg)
    """The synthetic safety world of every stage (its sizes: pairs, pretraining examples, eval prompts)."""
    pretrain_config: str | None = "jobs/configs/sft_tiny_pretrain.yaml"
    """SFT config that makes the base model (complies with everything, like a real base model);
    null starts SFT from the pipeline's model directly (real base models)."""
    onpolicy_config: str | None = None
    """On-policy data config (jobs/onpolicy.py) run from the base model before SFT: its own answers to
    the training prompts, judged, become y- (PAPER.md section 4's open option); SFT and DPO then read
    that file (a jsonl source, judge_filter column). null: the training configs' own sources."""
    sft_config: str | None = "jobs/configs/sft_tiny_demo.yaml"
    """SFT config run once per recipe (baseline-sft, backtrack-sft); null stops after building the model."""
    dpo_config: str | None = "jobs/configs/dpo_tiny_demo.yaml"
    """DPO config run on each SFT model (baseline-dpo, backtrack-dpo); null skips DPO."""
    sweep_config: str | None = None
    """Sweep config run before SFT from the base model (pretrained if any) on the pipeline's world (e.g.
    jobs/configs/sweep_demo.yaml, about 3 min); null (the default) skips it."""
    stage_overrides: tuple[str, ...] = ()
    """Dotted overrides applied to every training stage (e.g. optim.max_steps=4 for a smoke run);
    model.* and data.synthetic.* are not allowed here: set the pipeline's own model and synthetic."""
    eval_config: str | None = "jobs/configs/eval_demo.yaml"
    """Eval config comparing every aligned model (safety, worst-of-k, bias sweep, helpfulness); null skips."""
    eval_base: bool = False
    """Evaluate the base model (the model SFT starts from) beside the aligned ones, labelled base."""
    eval_overrides: tuple[str, ...] = ()
    """Dotted overrides of the eval stage (e.g. engine.kind=hf)."""
    calibrate_config: str | None = None
    """Calibration config (jobs/calibrate.py) run on the backtracking models after eval: the [RESET] bias
    whose reset rate on a safe dev set meets a target, and the safety it buys; null skips it."""
    calibrate_overrides: tuple[str, ...] = ()
    """Dotted overrides of the calibration stage."""
    onpolicy_overrides: tuple[str, ...] = ()
    """Dotted overrides of the on-policy data stage."""
    attack_config: str | None = "jobs/configs/attack_demo.yaml"
    """Attack config run on the DPO models (the SFT models without DPO); null skips attacks."""
    attacks: tuple[str, ...] = ("prefill",)
    """Attacks to run, one attack stage each (prefill, gcg, autodan, adaptive)."""
    attack_overrides: tuple[str, ...] = ()
    """Dotted overrides of every attack stage (e.g. behaviours.limit=2)."""
    serve_config: str | None = "jobs/configs/serve_demo.yaml"
    """Serve config of the serve check: the backtracking model behind the OpenAI API, asked one harmful
    and one benign held-out prompt with the openai client; null skips it."""
    serve_overrides: tuple[str, ...] = ()
    """Dotted overrides of the serve check."""
    report: bool = True
    """Write report.md with plots at the end (bt_ray.report, when installed)."""
    verbose: bool = False
    """Show every stage's own output (Ray and vLLM worker logs included) instead of logs/<stage>.log."""
    mlflow_experiment: str | None = None
    """The one MLflow experiment of every stage; null: bt-ray-<preset>."""
    ray_num_cpus: int | None = 4
    """Logical CPUs of the local Ray cluster (a Train controller and 2 workers on a 2-core laptop)."""
    cluster_only: bool = False
    """The preset needs a GPU cluster: refuse to start on a machine without a GPU."""

    @property
    def experiment(self) -> str:
        return self.mlflow_experiment or f"bt-ray-{self.preset}"

    def __post_init__(self):
        keys = [o.partition("=")[0].strip() for o in self.stage_overrides]
        forked = [k for k in keys if k.startswith(FORWARDED_PREFIXES)]
        kinds = ("prefill", "gcg", "autodan", "adaptive")
        check(self, [
            ("preset", bool(self.preset) and "/" not in self.preset, "must be a plain name"),
            ("dpo_config", self.dpo_config is None or self.sft_config is not None, "needs sft_config"),
            ("attacks", all(a in kinds for a in self.attacks) and len(set(self.attacks)) == len(self.attacks),
             f"must be distinct names among {kinds}"),
            ("ray_num_cpus", self.ray_num_cpus is None or self.ray_num_cpus > 0, "must be > 0 or null"),
            ("stage_overrides", not forked,
             f"must not set the model or the world the pipeline forwards to every stage ({forked}); "
             "set the pipeline's model.* / synthetic.* instead"),
            *((f"{name}_overrides", all("=" in o for o in getattr(self, f"{name}_overrides")),
               "must be dotted key=value items") for name in ("stage", "eval", "attack", "serve", "calibrate",
                                                          "onpolicy")),
        ])


def preset_path(preset: str) -> Path:
    """``jobs/configs/pipeline_<preset>.yaml`` (dashes become underscores: smollm2-cpu -> smollm2_cpu)."""
    return CONFIG_DIR / f"pipeline_{preset.replace('-', '_')}.yaml"


def presets() -> list[str]:
    """Every preset shipped in jobs/configs."""
    paths = CONFIG_DIR.glob("pipeline_*.yaml")
    return sorted(p.stem.removeprefix("pipeline_").replace("_", "-") for p in paths)


def load_preset(preset: str | None, config_path: str | None = None, overrides=()) -> PipelineCfg:
    """The pipeline config of ``preset`` (or of the file ``config_path``) with dotted ``overrides``."""
    from bt_ray import config

    if preset is not None:
        path = preset_path(preset)
        if not path.is_file():
            raise config.ConfigError([f"preset: unknown preset {preset!r}; known: {', '.join(presets())}"])
        overrides = [f"preset={preset}", *overrides]
    else:
        path = config_path
    return config.load(PipelineCfg, path, list(overrides))
