"""The quiet terminal: what a user sees of a pipeline run, and where everything else goes.

Stages run in this process (Ray drivers, vLLM, transformers, DeepSpeed), and Ray forwards its workers'
output to the driver's stderr. ``Console.capture`` therefore redirects the *file descriptors* 1 and 2
(not only ``sys.stdout``) into ``<run_dir>/logs/<name>.log``: C extensions, logging handlers that hold
``sys.stderr``, Ray's log monitor and tqdm bars all land there. The console itself writes to a copy of
the original stdout taken before any redirection. Between stages output goes to ``logs/pipeline.log``,
so late worker lines never reach the terminal. ``verbose`` turns all of this off.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

Progress = Callable[[], tuple[int, int | None]]
"""A stage's progress: (done, total or None), read from the files the stage writes."""


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


class Console:
    """One line per event on the terminal; the stages' own output in log files.

    Args:
        log_dir: where ``<name>.log`` files go.
        verbose: leave stdout/stderr alone (everything on the terminal, nothing captured).
        stream: where the console's lines go (default: a copy of the process's stdout).
    """

    def __init__(self, log_dir: str | Path, verbose: bool = False, stream=None):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.verbose = verbose
        _flush()
        self.out = stream or os.fdopen(os.dup(1), "w", buffering=1)
        self.lines = 0
        self._saved: tuple[int, int] | None = None

    def say(self, text: str = "") -> None:
        """Print ``text`` on the terminal (counted: the demo's line budget)."""
        self.out.write(text + "\n")
        self.out.flush()
        self.lines += text.count("\n") + 1

    def _point(self, path: Path) -> None:
        _flush()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """The whole run: between stages, fds 1 and 2 go to logs/pipeline.log; restored at the end."""
        if self.verbose:
            yield
            return
        self._saved = (os.dup(1), os.dup(2))
        self._point(self.log_dir / "pipeline.log")
        # sys.stdout/err straight onto fds 1 and 2, even where something replaced them (pytest, notebooks)
        streams = sys.stdout, sys.stderr
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        try:
            yield
        finally:
            _flush()
            sys.stdout, sys.stderr = streams
            os.dup2(self._saved[0], 1)
            os.dup2(self._saved[1], 2)
            for fd in self._saved:
                os.close(fd)
            self._saved = None

    @contextlib.contextmanager
    def capture(self, name: str, progress: Progress | None = None) -> Iterator[Path]:
        """Send fds 1 and 2 to logs/<name>.log while the block runs, with a progress bar on a terminal."""
        log = self.log_dir / f"{name}.log"
        if self.verbose:
            yield log
            return
        self._point(log)
        stop = threading.Event()
        bar = threading.Thread(target=self._bar, args=(name, progress, stop), daemon=True)
        if self.out.isatty():
            bar.start()
        try:
            yield log
        finally:
            stop.set()
            if bar.is_alive():
                bar.join()
            self._point(self.log_dir / "pipeline.log")

    def _bar(self, name: str, progress: Progress | None, stop: threading.Event) -> None:
        """A one-line tqdm bar on the terminal, redrawn in place (never a new line), cleared at the end."""
        from tqdm import tqdm

        bar = tqdm(file=self.out, desc=f"   {name}", leave=False, dynamic_ncols=True, mininterval=1.0)
        while not stop.wait(1.0):
            if progress is None:
                bar.refresh()
                continue
            with contextlib.suppress(Exception):
                done, total = progress()
                if total is not None and bar.total != total:
                    bar.total = total
                bar.update(done - bar.n)
        bar.close()


def count_lines(path: Path) -> int:
    """Lines in ``path`` (0 if missing): metrics and results files grow a line per unit of progress."""
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def elapsed(t0: float) -> str:
    s = time.perf_counter() - t0
    return f"{s:.0f}s" if s < 120 else f"{s // 60:.0f}m{s % 60:02.0f}s"
