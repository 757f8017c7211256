"""The documentation runs: every fenced code block of README.md and docs/*.md is either run here (Python snippets
and `python -m ...` commands, on a small run of the embedded sample made once per session) or carries a reason
why not (`<!-- not run: REASON -->` on the line before it); and docs/outputs.md is what the code generates."""
from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import outputs_doc

from .helpers import explain_on_local_ray

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^<!-- not run: (?P<reason>\S.*?) -->$")
FENCE = re.compile(r"^```(?P<info>[^`\s]*)\s*$")
RUNNABLE = ("python", "bash")
# the run the docs' snippets read (docs/outputs.md, "Reading a run"), made of the embedded sample
RUN_NAME = "runs/sample-vgg16-epsilon_gamma_box"
pytestmark = pytest.mark.timeout(300)


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    info: str
    code: str
    reason: str | None

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a page that carry a language (a bare fence is a diagram or a file tree)."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        marker = NOT_RUN.match(lines[i - 1]) if i > 0 else None
        if fence["info"] and fence["info"] != "text":
            blocks.append(Block(path.relative_to(ROOT).as_posix(), i + 1, fence["info"], "\n".join(lines[i + 1:end]),
                                marker["reason"] if marker else None))
        i = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in code_blocks(page)]
TO_RUN = [block for block in BLOCKS if block.reason is None]


def test_every_code_block_is_run_or_says_why_not():
    unrunnable = [f"{block} ({block.info})" for block in TO_RUN if block.info not in RUNNABLE]
    assert not unrunnable, (f"blocks this test cannot run, without `<!-- not run: REASON -->` on the line before: "
                            f"{', '.join(unrunnable)}")
    assert any(b.info == "python" for b in TO_RUN) and any(b.info == "bash" for b in TO_RUN)


def test_outputs_page_is_generated_from_the_code():
    committed = (ROOT / "docs" / "outputs.md").read_text()
    assert committed == outputs_doc.render(), f"docs/outputs.md is stale: run `{outputs_doc.COMMAND}` (or `make docs`)"


def test_outputs_page_names_every_column_and_the_runs_own_files():
    page = (ROOT / "docs" / "outputs.md").read_text()
    from pipeline.schema import FAILURE_SCHEMA, STATS_SCHEMA
    missing = [name for name in (*STATS_SCHEMA.names, *FAILURE_SCHEMA.names) if f"| `{name}` |" not in page]
    assert not missing, f"columns missing from docs/outputs.md: {missing}"
    for name in ("precision.json", "spray/clusters.parquet", "manifest.json", "relevance.h5"):
        assert f"`{name}`" in page


@pytest.fixture(scope="session")
def sample_run(tmp_path_factory, artifact_cache) -> Path:
    """A finished run of the embedded sample (vgg-shapes at 32x32, unlabelled: cheap), under the name the docs use."""
    from pipeline.config import load_config
    home = tmp_path_factory.mktemp("docs")
    config = load_config(dict(dataset=str(ROOT / "data" / "sample"), layout="plain", model="vgg-shapes", size=32,
                              batch_size=8, out=str(home / RUN_NAME), cache=str(artifact_cache)))
    explain_on_local_ray(config)
    return home


def _run_module(words: list[str]) -> str:
    """`python -m MODULE ARGS` in this process (runpy, as `-m` does): the real entry point without a new
    interpreter's start-up; exit status 0 expected."""
    assert words[:2] == ["python", "-m"] and len(words) > 2, f"not a `python -m` command: {' '.join(words)}"
    out, argv = io.StringIO(), sys.argv
    sys.argv = [words[2], *words[3:]]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            runpy.run_module(words[2], run_name="__main__", alter_sys=True)
    finally:
        sys.argv = argv
    assert exit_.value.code in (0, None), f"`{' '.join(words)}` exited {exit_.value.code}: {out.getvalue()[-500:]}"
    return out.getvalue()


def _commands(code: str) -> list[list[str]]:
    """The block's commands as words: one per line or `;`-separated part, comments dropped."""
    commands = []
    for line in code.splitlines():
        command: list[str] = []
        for word in shlex.split(line, comments=True):
            command.append(word.removesuffix(";"))
            if word.endswith(";"):
                commands.append(command)
                command = []
        if command:
            commands.append(command)
    return commands


@pytest.mark.parametrize("block", [b for b in TO_RUN if b.info == "bash"], ids=str)
def test_shell_block_runs(block):
    for words in _commands(block.code):
        assert _run_module(words).strip(), f"{block}: `{' '.join(words)}` printed nothing"


@pytest.mark.parametrize("block", [b for b in TO_RUN if b.info == "python"], ids=str)
def test_python_block_runs(block, sample_run, monkeypatch):
    monkeypatch.chdir(sample_run)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        exec(compile(block.code, str(block), "exec"), {"__name__": "__docs__"})


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_pages_resolve():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target, anchor in re.findall(r"\]\(([^)#\s]*\.md|[^)#\s]*\.png)?(?:#([^)\s]+))?\)", text):
            path = (page.parent / target) if target else page
            if not path.is_file():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
            elif anchor and anchor not in {_anchor(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}:
                broken.append(f"{page.relative_to(ROOT)} -> {target}#{anchor}")
    assert not broken, f"links to missing pages or headings: {', '.join(broken)}"


CONFLICT_MARKER = re.compile(r"^(<{7}|={7}|>{7})( |$)", re.MULTILINE)


def test_no_merge_conflict_markers_left_in_tracked_text_files():
    """A merge's leftover `<<<<<<<` / `=======` / `>>>>>>>` lines (docs/benchmarks.md once kept three blocks)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, timeout=60)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: no tracked files to list")
    culprits = []
    for name in filter(None, listed.stdout.decode().split("\0")):
        path = ROOT / name
        if path.suffix not in (".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".sh", ".cfg", ".json", ".html") \
                and path.name not in ("Makefile", "run"):
            continue
        text = path.read_text(errors="replace") if path.is_file() else ""
        culprits += [f"{name}:{text.count(chr(10), 0, m.start()) + 1}" for m in CONFLICT_MARKER.finditer(text)]
    assert not culprits, f"merge conflict markers left in: {', '.join(culprits)}"
