"""House-style rules that a machine can check (docs/STYLE.md habits 10 and the house line width).

Over every git-tracked or new (untracked, not ignored) ``*.py`` file under ``model_core/``, ``services/`` (less the
generated proto stubs in ``services/api/generated/``) and ``tests/``:

* no line is longer than ``MAX_LINE_CHARS`` characters (characters, not bytes);
* every module under ``model_core/`` and ``services/`` opens with a docstring;
* no module under ``model_core/`` or ``services/`` is longer than ``MAX_MODULE_LINES`` lines: past that, split it
  along a role boundary.

Each failure names every offending file (and line), so one run lists all the work.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINE_CHARS = 120
MAX_MODULE_LINES = 600
ROOTS = ("model_core", "services", "tests")
PRODUCT_ROOTS = ("model_core", "services")
EXCLUDED = ("services/api/generated/",)


def python_files(repo: Path = REPO) -> list[str]:
    """Repo-relative paths of the checked ``*.py`` files: git-tracked or new, existing, not excluded."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *ROOTS],
            cwd=repo, capture_output=True, text=True, check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an unpacked sdist)
        out = [str(p.relative_to(repo)) for root in ROOTS for p in (repo / root).rglob("*.py")]
    paths = {p for p in out if p.endswith(".py") and (repo / p).is_file()}
    return sorted(p for p in paths if not p.startswith(EXCLUDED))


def _text(path: str, repo: Path = REPO) -> str:
    return (repo / path).read_text(encoding="utf-8")


def long_lines(paths: list[str], repo: Path = REPO) -> list[str]:
    """``path:line: N chars`` for every line over ``MAX_LINE_CHARS`` characters."""
    return [
        f"{path}:{number}: {len(line)} chars"
        for path in paths
        for number, line in enumerate(_text(path, repo).splitlines(), start=1)
        if len(line) > MAX_LINE_CHARS
    ]


def missing_docstrings(paths: list[str], repo: Path = REPO) -> list[str]:
    """Product modules whose first statement is not a docstring."""
    return [
        path
        for path in paths
        if path.startswith(PRODUCT_ROOTS) and not ast.get_docstring(ast.parse(_text(path, repo), filename=path))
    ]


def oversized_modules(paths: list[str], repo: Path = REPO) -> list[str]:
    """``path: N lines`` for every product module over ``MAX_MODULE_LINES`` lines."""
    counts = {path: len(_text(path, repo).splitlines()) for path in paths if path.startswith(PRODUCT_ROOTS)}
    return [f"{path}: {n} lines" for path, n in counts.items() if n > MAX_MODULE_LINES]


@pytest.fixture(scope="module")
def files() -> list[str]:
    paths = python_files()
    assert any(p.startswith("model_core/") for p in paths) and any(p.startswith("services/") for p in paths)
    assert "tests/test_house_style.py" in paths
    return paths


def test_no_line_is_longer_than_the_house_width(files):
    problems = long_lines(files)
    assert not problems, f"lines over {MAX_LINE_CHARS} characters:\n" + "\n".join(problems)


def test_every_product_module_opens_with_a_docstring(files):
    problems = missing_docstrings(files)
    assert not problems, "modules without a docstring (say what lives there and what it does not know):\n" + "\n".join(
        problems
    )


def test_no_product_module_is_past_the_split_size(files):
    problems = oversized_modules(files)
    assert not problems, (
        f"modules over {MAX_MODULE_LINES} lines (split along a role boundary):\n" + "\n".join(problems)
    )


def test_the_checks_catch_what_they_look_for(tmp_path):
    """Each rule fires on a file that breaks it and stays quiet on one that keeps it (characters, not bytes)."""
    (tmp_path / "services").mkdir()
    good = '"""Docstring."""\n' + "x = '" + "é" * (MAX_LINE_CHARS - 6) + "'\n"  # 120 chars, more bytes
    (tmp_path / "services" / "good.py").write_text(good, encoding="utf-8")
    (tmp_path / "services" / "bad.py").write_text(
        "import os\n" + "y = 1  # " + "z" * MAX_LINE_CHARS + "\n" + "pass\n" * MAX_MODULE_LINES, encoding="utf-8"
    )
    paths = ["services/good.py", "services/bad.py"]
    assert long_lines(paths, tmp_path) == [f"services/bad.py:2: {MAX_LINE_CHARS + 9} chars"]
    assert missing_docstrings(paths, tmp_path) == ["services/bad.py"]
    assert oversized_modules(paths, tmp_path) == [f"services/bad.py: {MAX_MODULE_LINES + 2} lines"]
