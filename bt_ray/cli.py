"""The ``bt-ray`` command line.

``bt-ray data build`` and ``bt-ray data inspect`` are library tools and run here. Job subcommands
(``bt-ray demo``, ...) run the matching script in ``jobs/`` with the same arguments, which it parses
with ``bt_ray.config.parse_job_args``, so ``bt-ray demo --config X`` and
``python jobs/demo.py --config X`` are one code path.

Every subcommand takes ``--config FILE.yaml`` and trailing dotted overrides (``recipe.max_length=512``).
User errors (bad config, malformed data, missing files) print one clear message and exit 2.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

from bt_ray.config import ConfigError
from bt_ray.data.records import DataError
from bt_ray.eval import judge_check

JOBS_DIR = Path(__file__).resolve().parent.parent / "jobs"
JOB_COMMANDS = {
    "demo": "demo.py", "sft": "sft.py", "dpo": "dpo.py", "eval": "eval.py", "serve": "serve.py",
    "attack": "attack.py", "sweep": "sweep.py", "report": "report.py",
    "pipeline": "pipeline.py", "onpolicy": "onpolicy.py", "calibrate": "calibrate.py",
}
# Jobs whose arguments are not ``--config`` and overrides.
JOB_HELP = {"report": "write RUN_DIR/report.md with PNG plots, logged to the run's MLflow parent run "
                      "(jobs/report.py; takes RUN_DIR [--out DIR] [--no-mlflow])"}


def _source_overrides(args) -> list[str]:
    from bt_ray.data.sources import parse_source_spec

    overrides = []
    if args.recipe:
        overrides.append(f"recipe.name={args.recipe}")
    if args.model:
        overrides.append(f"model.name={args.model}")
    if args.source:
        specs = []
        for spec in args.source:
            name, path = parse_source_spec(spec)
            specs.append({"name": name, "path": path} if path else {"name": name})
        overrides.append("sources=" + json.dumps(specs))  # JSON is valid YAML flow syntax
    return overrides


def _data_parser(sub) -> None:
    data = sub.add_parser("data", help="build and inspect recipe datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    for name, help_text in (
        ("build", "sources -> recipe rows -> JSONL (+ config and summary beside it)"),
        ("inspect", "show rows token by token with whether each token is trained on"),
    ):
        p = data_sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="YAML config (DataBuildCfg); flags and overrides apply on top")
        p.add_argument("--recipe", help="baseline-sft | backtrack-sft | baseline-dpo | backtrack-dpo")
        p.add_argument(
            "--source", action="append",
            help="NAME or NAME:PATH_OR_HUB_ID (repeatable), e.g. hh-rlhf:../shared/datasets/hh-rlhf",
        )
        p.add_argument("--model", help="model preset, HF dir or hub id whose tokenizer encodes the rows")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. recipe.prefix.seed=3")
        if name == "build":
            p.add_argument("--out", help="output .jsonl path")
        else:
            p.add_argument("--limit", type=int, default=3, help="rows to show (default 3)")
            p.add_argument("--kind", help="only rows of this kind (plain, backtrack, backtrack-harmful, ...)")
            p.add_argument("--json", action="store_true", help="print a JSON list instead of text")
            p.add_argument("--color", action="store_true", help="colour trained tokens (terminal)")


def _run_data(args) -> None:
    from bt_ray import config
    from bt_ray.data.build import DataBuildCfg, build_dataset, format_rendered, load_source, render_row
    from bt_ray.data.recipes import RecipeBuilder
    from bt_ray.models import load_tokenizer

    overrides = _source_overrides(args)
    if args.data_command == "build" and args.out:
        overrides.append(f"out={args.out}")
    cfg = config.load(DataBuildCfg, args.config, overrides + list(args.overrides))
    if args.data_command == "build":
        build_dataset(cfg, log=lambda m: print(m, file=sys.stderr))
        return
    tokenizer, reset = load_tokenizer(cfg.model)
    builder = RecipeBuilder(cfg.recipe, tokenizer, reset)
    shown: list[dict] = []
    for src in cfg.sources:
        examples, _ = load_source(src, cfg.synthetic)
        for ex in examples:
            rows = [r for r in builder.rows_for(ex) if args.kind in (None, r["kind"])]
            shown.extend(render_row(r, tokenizer) for r in rows)
            if len(shown) >= args.limit:
                break
        if len(shown) >= args.limit:
            break
    shown = shown[: args.limit]
    if args.json:
        print(json.dumps(shown, ensure_ascii=False, indent=1))
    else:
        print("\n\n".join(format_rendered(r, color=args.color) for r in shown))
        print("\n(untrained tokens in [brackets], tokens separated by |)" if not args.color else "")


def _run_job(name: str, argv: list[str]) -> None:
    script = JOBS_DIR / JOB_COMMANDS[name]
    if not script.is_file():
        raise RuntimeError(f"{script} not found: job subcommands need a bt-ray checkout (pip install -e .)")
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in JOB_COMMANDS:
        _run_job(argv[0], argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="bt-ray", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _data_parser(sub)
    judge_check.add_parser(sub)
    for name in JOB_COMMANDS:
        default = f"run jobs/{JOB_COMMANDS[name]} (takes --config and overrides)"
        sub.add_parser(name, help=JOB_HELP.get(name, default))
    args = parser.parse_args(argv)
    try:
        if args.command == "data":
            _run_data(args)
        elif args.command == "judge":
            judge_check.run_cli(args)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        print(f"bt-ray: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
