"""The docs stay true: the configuration reference is fresh, links resolve, and shell blocks run.

Every ```bash block in docs/*.md opens with one marker line:

* ``# runnable``: cheap; this test runs it (bash -e, .venv/bin first on PATH, from the repo root);
* ``# long: <reason>``: correct but too long for a unit test (``make demo``, a server); skipped with
  that reason, which says what runs it instead;
* ``# cluster-only``: needs a GPU cluster or cloud account; skipped.
"""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
MARKDOWN = sorted(DOCS.glob("*.md")) + [REPO / "README.md"]
BLOCK = re.compile(r"^[ \t]*```bash[ \t]*\n(.*?)^[ \t]*```", re.S | re.M)  # indented in lists too
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1", re.S | re.M)
MARKERS = ("# runnable", "# long:", "# cluster-only")


def _bash_blocks() -> list[tuple[str, int, str]]:
    out = []
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text()
        for m in BLOCK.finditer(text):
            out.append((path.name, text.count("\n", 0, m.start()) + 1, textwrap.dedent(m.group(1))))
    return out


BLOCKS = _bash_blocks()


def test_configuration_reference_is_fresh():
    gen = runpy.run_path(str(DOCS / "gen_config_reference.py"))
    fresh = gen["generate"]()
    committed = (DOCS / "configuration.md").read_text()
    assert committed == fresh, (
        "docs/configuration.md differs from the config dataclasses' docstrings: "
        "run python docs/gen_config_reference.py and commit the result"
    )


def test_configuration_reference_covers_every_root_and_documents_every_field():
    gen = runpy.run_path(str(DOCS / "gen_config_reference.py"))
    text = (DOCS / "configuration.md").read_text()
    for _, spec, _ in gen["ROOTS"]:
        assert f"### {spec.partition(':')[2]}\n" in text, spec
    assert "(undocumented)" not in text, "a config field has no docstring (STYLE.md: one line per field)"


def _slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())  # links inside code blocks are code, not links
    text = re.sub(r"`[^`\n]*`", "", text)
    return [a or b for a, b in LINK.findall(text)]


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(path):
    broken = []
    for target in _links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target} (no {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest})")
        elif fragment and dest.suffix == ".md":
            anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", FENCE.sub("", dest.read_text()), re.M)}
            if fragment not in anchors:
                broken.append(f"{target} (no heading #{fragment} in {dest.name})")
    assert not broken, f"{path.name}: broken links: {broken}"


def test_docs_have_shell_blocks_to_check():
    """The marker rule below is not vacuous, and at least one block is really run."""
    assert len(BLOCKS) >= 5, BLOCKS
    assert any(body.startswith("# runnable") for _, _, body in BLOCKS), BLOCKS


@pytest.mark.parametrize("name,line,body", BLOCKS, ids=[f"{n}:{ln}" for n, ln, _ in BLOCKS])
def test_bash_block(name, line, body):
    first = body.splitlines()[0].strip() if body.strip() else ""
    assert first.startswith(MARKERS), (
        f"docs/{name}:{line}: a bash block must open with '# runnable', '# long: <reason>' or "
        f"'# cluster-only'; got {first!r}"
    )
    if first.startswith("# cluster-only"):
        pytest.skip("cluster-only")
    if first.startswith("# long:"):
        reason = first.partition(":")[2].strip()
        assert reason, f"docs/{name}:{line}: '# long:' needs a reason"
        pytest.skip(f"long: {reason}")
    env = {**os.environ, "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", "-e", "-c", body], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, (
        f"docs/{name}:{line} failed (exit {done.returncode}):\n{body}\n--- stderr\n{done.stderr[-3000:]}"
    )


def test_generator_check_mode_names_the_fix(tmp_path, capsys):
    """``--check`` passes on the committed file and fails on a stale one, naming the command that fixes it."""
    gen = runpy.run_path(str(DOCS / "gen_config_reference.py"))
    main = gen["main"]
    assert main(["--check"]) == 0
    stale = tmp_path / "configuration.md"
    stale.write_text("stale")
    main.__globals__["OUT"] = stale
    assert main(["--check"]) == 1
    assert "run python docs/gen_config_reference.py" in capsys.readouterr().err
    assert stale.read_text() == "stale"  # --check never writes
