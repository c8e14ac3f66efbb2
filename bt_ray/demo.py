"""Config of the end-to-end demo (``jobs/demo.py``, ``make demo``).

The demo runs on the embedded default: the tiny model, the synthetic safety world, local Ray,
MLflow in a local sqlite file. Its stages are ordinary jobs with their own configs (the ``*_config``
fields); the demo chains their outputs (base model -> baseline/backtracking SFT -> DPO -> eval) and
forwards the two things every stage must share:

* ``model``: built once and saved as ``<run_dir>/model-init``; the first training stage starts from
  that directory, so the model the demo describes is the model that is trained;
* ``synthetic``: the one synthetic world, passed whole to every training stage (``data.synthetic``)
  and to evaluation (``synthetic``), so eval's held-out prompts are held out of what was trained.

Everything else about a stage (data sources, recipe knobs, lengths, optimiser) lives in that stage's
config; ``stage_overrides`` reaches the training stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bt_ray.config import check
from bt_ray.data.synthetic import SyntheticWorldCfg
from bt_ray.models import ModelCfg

# Override prefixes the demo forwards itself: naming them in stage_overrides would fork the model or world.
FORWARDED_PREFIXES = ("model.", "data.synthetic.")


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoCfg:
    """Everything ``jobs/demo.py`` does, on one page."""

    run_dir: str = "outputs/demo"
    """Where every output of the demo goes (model, runs, eval, summary.json)."""
    model: ModelCfg = field(default_factory=ModelCfg)
    """Model to build (tiny by default); the first training stage starts from it."""
    synthetic: SyntheticWorldCfg = field(default_factory=SyntheticWorldCfg)
    """The synthetic safety world of every stage (its sizes: pairs, pretraining examples, eval prompts)."""
    num_inspect: int = 1
    """Backtracking rows printed token by token, per backtracking stage, from the rows it trained on."""
    pretrain_config: str | None = "jobs/configs/sft_tiny_pretrain.yaml"
    """SFT config that makes the base model (complies with everything, like a real base model);
    null starts SFT from the demo's model directly."""
    sft_config: str | None = "jobs/configs/sft_tiny_demo.yaml"
    """SFT config run once per recipe (baseline-sft, backtrack-sft); null stops after building the model."""
    dpo_config: str | None = "jobs/configs/dpo_tiny_demo.yaml"
    """DPO config run on each SFT model (baseline-dpo, backtrack-dpo); null skips DPO."""
    sweep_config: str | None = None
    """Sweep config run from the pretrained base on the demo's world (jobs/configs/sweep_demo.yaml: a 2x2
    grid of backtracking SFT, about 3 min); null (the default, so make demo keeps its time) skips it."""
    eval_config: str | None = "jobs/configs/eval_demo.yaml"
    """Eval config comparing every trained model; null skips evaluation."""
    serve_config: str | None = "jobs/configs/serve_demo.yaml"
    """Serve config the demo ends with: the last backtracking model behind the OpenAI API, asked one
    harmful and one benign held-out prompt with the openai client; null skips it."""
    stage_overrides: tuple[str, ...] = ()
    """Dotted overrides applied to every training stage (e.g. optim.max_steps=4 for a smoke run);
    model.* and data.synthetic.* are not allowed here: set the demo's own model and synthetic."""
    ray_num_cpus: int | None = 4
    """Logical CPUs of the local Ray cluster (a Train controller and 2 workers on a 2-core laptop)."""

    def __post_init__(self):
        keys = [o.partition("=")[0].strip() for o in self.stage_overrides]
        forked = [k for k in keys if k.startswith(FORWARDED_PREFIXES)]
        check(self, [
            ("num_inspect", self.num_inspect >= 0, "must be >= 0"),
            ("dpo_config", self.dpo_config is None or self.sft_config is not None, "needs sft_config"),
            ("sweep_config", self.sweep_config is None or self.pretrain_config is not None,
             "needs pretrain_config (the sweep starts from the pretrained base)"),
            ("ray_num_cpus", self.ray_num_cpus is None or self.ray_num_cpus > 0, "must be > 0 or null"),
            ("stage_overrides", not forked,
             f"must not set the model or the world the demo forwards to every stage ({forked}); "
             "set the demo's model.* / synthetic.* instead"),
        ])
