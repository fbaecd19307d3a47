"""The "first hour" tutorials in docs/tutorials/ run, step by step, against a real ``arbiter demo``.

A tutorial's ```console blocks are its steps. A line starting with ``$ `` is a command (continued by a
trailing ``\\`` or by lines starting with ``> ``, as a shell shows them); the lines after it, up to the
next command, are text its output must contain (compared with runs of spaces collapsed, since tables
pad their columns). Commands run in bash from a directory laid out like the repository after
``make demo``: ``.venv`` and ``examples`` (links to the real ones) and ``demo-info.json`` (the demo's
info file), so every command is exactly what a reader types. Exported variables and the working
directory carry over from one step to the next, as in the reader's terminal; a command exiting
non-zero fails its step.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.conftest import run_demo

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "docs" / "tutorials"
ROLES = ["operator", "agent-developer", "security-engineer", "auditor"]
STEP_TIMEOUT_S = 60
FENCE = re.compile(r"^```console\n(.*?)^```", re.MULTILINE | re.DOTALL)


@dataclass
class Step:
    number: int  # the command's place in the tutorial: 1 for its first command
    command: str
    line: int = 0  # where the command is in the file
    expected: list[str] = field(default_factory=list[str])


def parse_steps(text: str) -> list[Step]:
    """Every command of every ```console block, in order, with the output lines expected of it."""
    steps: list[Step] = []
    for block in FENCE.finditer(text):
        first = text.count("\n", 0, block.start(1)) + 1  # the block's first line in the file
        lines = iter(enumerate(block.group(1).splitlines(), first))
        for number, line in lines:
            if line.startswith("$ "):
                command = line[2:]
                while command.endswith("\\"):
                    command += "\n" + next(lines)[1]
                steps.append(Step(len(steps) + 1, command, line=number))
            elif line.startswith("> ") or line == ">":
                assert steps, f"a continuation line before any command: {line!r}"
                steps[-1].command += "\n" + line[2:]
            elif line.strip():
                assert steps, f"an output line before any command: {line!r}"
                steps[-1].expected.append(line)
    return steps


def _squeeze(text: str) -> str:
    return re.sub(r"[ \t]+", " ", text)


def test_the_parser_reads_commands_continuations_and_expected_output() -> None:
    text = (
        "x\n```console\n$ echo a \\\n  b\nA B\n$ cat <<'EOF'\n> one\n> EOF\none\n```\n"
        "```sh\n$ not a step\n```\n"
    )
    steps = parse_steps(text)
    assert [(s.number, s.command, s.expected) for s in steps] == [
        (1, "echo a \\\n  b", ["A B"]),
        (2, "cat <<'EOF'\none\nEOF", ["one"]),
    ]
    assert [s.line for s in steps] == [3, 6]


@pytest.fixture(scope="module")
def demo_info(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """One demo for the four tutorials (a demo takes seconds to start): each works on names of its own,
    and they run in the order of ROLES, the security engineer's policy change after the agent developer."""
    with run_demo(tmp_path_factory.mktemp("tutorial-demo")) as demo:
        yield demo.info


@pytest.mark.parametrize("role", ROLES)
def test_tutorial_runs_against_the_demo(role: str, demo_info: dict[str, object], tmp_path: Path) -> None:
    tutorial = TUTORIALS / f"{role}.md"
    steps = parse_steps(tutorial.read_text(encoding="utf-8"))
    assert len(steps) >= 5, f"{tutorial.name}: a tutorial is a sequence of commands, found {len(steps)}"
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(ROOT / ".venv")
    (work / "examples").symlink_to(ROOT / "examples")
    (work / "demo-info.json").touch(mode=0o600)  # it holds the demo's keys, as `make demo` writes it
    (work / "demo-info.json").write_text(json.dumps(demo_info, indent=2), encoding="utf-8")
    # The reader's shell: no ARBITER_* of this process's own, the venv's commands first on PATH.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARBITER_", "OPENAI_", "VIRTUAL_ENV"))}
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["COLUMNS"] = "200"  # wide enough that tables do not wrap
    state = tmp_path / "shell-state"
    state.write_text(f"cd {work}\n")
    for step in steps:
        _run(tutorial.name, step, state, env)


def _run(name: str, step: Step, state: Path, env: dict[str, str]) -> None:
    # The step runs after the state the previous ones left, then saves its own (exports, directory).
    script = f'source {state}\n{step.command}\nrc=$?\n{{ export -p; echo "cd $PWD"; }} > {state}\nexit $rc\n'
    where = f"{name} step {step.number} (line {step.line}):\n$ {step.command}"
    try:
        done = subprocess.run(
            ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{where}\n--- did not finish in {STEP_TIMEOUT_S}s; output so far:\n{exc.output}")
    output = done.stdout + done.stderr
    where += f"\n--- output (exit {done.returncode}) ---\n{output}"
    assert done.returncode == 0, f"{where}\n--- the command failed"
    for line in step.expected:
        assert _squeeze(line.strip()) in _squeeze(output), (
            f"{where}\n--- expected in the output: {line.strip()!r}"
        )
