"""The two ways to install (Makefile/venv and environment.yml/conda) must install the same thing."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _makefile_var(name: str) -> str:
    match = re.search(rf"^{name}\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile defines no {name}"
    return match.group(1).strip()


def test_environment_yml_matches_makefile_and_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert _makefile_var("TORCH_PIN") in pip_section
    project_lines = [line for line in pip_section if line.startswith("-e .")]
    assert project_lines == [f"-e .[{_makefile_var('EXTRAS')}]"]

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    assert set(_makefile_var("EXTRAS").split(",")) <= extras
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    minimum = pyproject["project"]["requires-python"].removeprefix(">=")
    assert tuple(map(int, python.split("=")[1].split("."))) >= tuple(map(int, minimum.split(".")))


def test_console_script_points_at_cli_main():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["miwv"] == "miwv_lib.cli:main"
    from miwv_lib.cli import main

    assert callable(main)
