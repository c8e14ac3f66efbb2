"""The bt-ray demo: an alias of ``jobs/pipeline.py --preset demo`` (tiny model, synthetic world).

Run as:
    make demo
    python jobs/demo.py [dotted.key=value ...]      # = python jobs/pipeline.py --preset demo [...]
    bt-ray demo --config FILE.yaml                  # = bt-ray pipeline --config FILE.yaml
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    pipeline = runpy.run_path(str(Path(__file__).resolve().parent / "pipeline.py"))
    argv = sys.argv[1:]
    if not any(a in ("--config", "--preset", "-h", "--help") or a.startswith("--config=") for a in argv):
        argv = ["--preset", "demo", *argv]
    pipeline["main"](pipeline["parse_args"](argv))
