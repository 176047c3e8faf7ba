"""Every code block of README.md runs as written, in order, from a folder laid out like the repository root.

Only the data a block names without defining is substituted (DATA below). The
set-up line of command 1 runs in the current environment instead of a new
virtual environment (building one takes minutes): its `pip install` targets
must name this project and extras pyproject declares, and its `pytest -q` must
be the command .ci/run runs; every other command runs as written.
"""

from __future__ import annotations

import ast
import builtins
import importlib.metadata
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DATA = {"images": lambda: np.load(ROOT / "models" / "fashion_mnist_test.npz")["input"][:64]}  # "a batch of `images`"
SETUP = {"python3 -m venv .venv", ". .venv/bin/activate"}  # stand for the current environment


def code_blocks() -> list[tuple[str, str, int]]:
    """(language, code, line number) of every fenced block of the README."""
    text = README.read_text()
    return [(m.group(1), m.group(2), text[: m.start()].count("\n") + 1) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)]


def shell_commands(code: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped, `&&` chains split."""
    joined = re.sub(r"\\\n\s*", " ", code)
    lines = [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [part.strip() for line in lines for part in line.split("&&")]


def check_install(command: str) -> None:
    """`pip install TARGET`: TARGET is this project (.), with extras its pyproject declares."""
    (target,) = shlex.split(command)[2:]
    match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", target)
    assert match, f"'{command}' does not install this project"
    declared = set(importlib.metadata.metadata("fgq-onnx").get_all("Provides-Extra") or [])
    extras = set((match.group(1) or "").split(",")) - {""}
    assert extras <= declared, f"'{command}' asks for extras {sorted(extras - declared)} that pyproject.toml does not declare"


def run_shell(command: str, folder: Path) -> None:
    if command in SETUP:
        return
    if command.startswith("pip install "):
        check_install(command)
        return
    if command == "pytest -q":  # this very run; CI must run the same
        assert 'pip install ".[test]" && pytest -q' in (ROOT / ".ci" / "run").read_text()
        return
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(command, shell=True, cwd=folder, env=env, capture_output=True, text=True, executable="/bin/bash")
    assert result.returncode == 0, f"README command failed: {command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"


def free_names(code: str) -> set[str]:
    """Names a block reads but neither assigns nor imports (nor are builtins): the data it names."""
    tree = ast.parse(code)
    bound = {alias.asname or alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom) for alias in node.names}
    bound |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
    read = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    return read - bound - set(dir(builtins))


@pytest.fixture
def repository_like(tmp_path, monkeypatch):
    """A fresh folder with the repository's models/, as the README's commands expect at the root."""
    (tmp_path / "models").symlink_to(ROOT / "models")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_block_is_bash_or_python():
    assert [language for language, _, _ in code_blocks()] and all(language in ("bash", "python") for language, _, _ in code_blocks())


def test_every_readme_block_runs_as_written(repository_like):
    for language, code, line in code_blocks():
        if language == "bash":
            for command in shell_commands(code):
                run_shell(command, repository_like)
            continue
        names = free_names(code)
        assert names <= DATA.keys(), f"README.md:{line}: the block reads {sorted(names - DATA.keys())}, which it does not define"
        try:
            exec(compile(code, f"README.md:{line}", "exec"), {name: DATA[name]() for name in names})  # noqa: S102
        except Exception as error:
            raise AssertionError(f"the python block at README.md:{line} failed: {type(error).__name__}: {error}") from error
    assert (repository_like / "fashion_mnist.fgq.onnx").is_file()


@pytest.mark.parametrize("command", ["pip install .[tests]", "pip install ./other", "pip install fgq-onnx"])
def test_an_install_line_pyproject_does_not_back_fails(command):
    with pytest.raises(AssertionError):
        check_install(command)
