"""Run each stage once per resolved config: the skip/resume markers.

A stage that completes writes ``<run_dir>/stages/<stage>.json``: the hash of its resolved config (and of
the stages it starts from), that config, its outputs and its time. A rerun with the same hash, whose
outputs still exist, skips the stage and returns the recorded outputs; a changed config (here or
upstream) runs it again. A stage killed half way has no marker, so a rerun starts there: training jobs
resume from their own checkpoints, eval and attacks run again (attacks skip finished behaviours).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bt_ray.pipeline.console import Console, Progress, elapsed


def resolved(cfg: Any) -> Any:
    """A stage's config as plain JSON data (dataclasses flattened to dicts)."""
    from bt_ray import config

    return config.to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg


def config_hash(cfg: Any, upstream: dict[str, str]) -> str:
    """sha256 of the resolved config and the hashes of the stages it starts from (a retrained SFT model
    changes its DPO stage's hash even though the model's path is the same)."""
    text = json.dumps({"config": resolved(cfg), "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class StageRunner:
    """Runs stages in order, skipping those done with the same config; prints one line at each end.

    Args:
        run_dir: the pipeline's run dir (markers in ``stages/``, logs in ``logs/``).
        console: the terminal (``Console``).
    """

    def __init__(self, run_dir: str | Path, console: Console):
        self.dir = Path(run_dir) / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.console = console
        self.hashes: dict[str, str] = {}
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def marker(self, stage: str) -> Path:
        return self.dir / f"{stage}.json"

    def done(self, stage: str, digest: str) -> dict | None:
        """The marker of ``stage`` if it was completed with ``digest`` and its outputs still exist."""
        path = self.marker(stage)
        if not path.is_file():
            return None
        mark = json.loads(path.read_text())
        if mark.get("config_hash") != digest or not all(Path(p).exists() for p in mark.get("requires", [])):
            return None
        return mark

    def run(self, stage: str, cfg: Any, fn: Callable[[], Any], *, after: tuple[str, ...] = (),
            requires: Callable[[Any], list[str]] = lambda out: [], progress: Progress | None = None,
            what: str = "") -> Any:
        """Run ``fn()`` as ``stage`` unless done with this ``cfg``; returns its outputs (recorded ones
        when skipped). ``after``: the stages it starts from; ``requires(outputs)``: paths that must
        still exist for a skip; ``progress``: its bar; ``what``: a few words for the start line."""
        digest = config_hash(cfg, {s: self.hashes[s] for s in after if s in self.hashes})
        self.hashes[stage] = digest
        mark = self.done(stage, digest)
        if mark is not None:
            self.skipped.append(stage)
            self.console.say(f"-- {stage}: done before with this config, skipped ({self.marker(stage)})")
            return mark["outputs"]
        self.console.say(f"-> {stage}" + (f": {what}" if what else ""))
        t0 = time.perf_counter()
        try:
            with self.console.capture(stage, progress) as log:
                outputs = fn()
        except BaseException:
            log = log_path(self.console, stage)
            self.console.say(f"!! {stage} failed after {elapsed(t0)}; full log: {log}")
            raise
        wall = time.perf_counter() - t0
        self.marker(stage).write_text(json.dumps({
            "stage": stage, "config_hash": digest, "config": resolved(cfg), "outputs": outputs,
            "requires": requires(outputs), "wall_s": round(wall, 1), "finished_at": time.time(),
        }, indent=1, default=str))
        self.ran.append(stage)
        self.console.say(f"   {stage} done in {elapsed(t0)}; log: {log}")
        return outputs


def log_path(console: Console, stage: str) -> Path:
    return console.log_dir / f"{stage}.log"
