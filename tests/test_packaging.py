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


def test_the_miwv_command_is_python_dash_m_miwv_lib():
    """One entry point, ``__main__.run``: it handles Ctrl-C from the first import to the interpreter's shutdown."""
    import subprocess
    import sys

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["miwv"] == "miwv_lib.__main__:run"
    done = subprocess.run([Path(sys.executable).parent / "miwv", "select", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--ratio" in done.stdout, done.stderr


def test_every_module_sits_in_a_layer_and_the_layers_hold():
    """The import-linter contracts in pyproject.toml: the four layer folders, top to bottom, and an order
    inside each folder. A lower module never imports a higher one, so nothing imports in a circle."""
    import subprocess
    import sys

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    [top] = [c for c in contracts if "containers" not in c]
    folders = {p.parent.name for p in (ROOT / "miwv_lib").glob("*/__init__.py")}
    assert {f"miwv_lib.{f}" for f in folders} | {"miwv_lib.__main__"} == set(top["layers"])
    assert {p.name for p in (ROOT / "miwv_lib").glob("*.py")} == {"__init__.py", "__main__.py"}
    for folder in folders:
        [inner] = [c for c in contracts if c.get("containers") == [f"miwv_lib.{folder}"]]
        layered = {name.strip() for layer in inner["layers"] for name in layer.split("|")}
        modules = {p.stem for p in (ROOT / "miwv_lib" / folder).glob("*.py") if p.stem != "__init__"}
        assert modules == layered, f"{folder}: outside the layers: {modules - layered}; gone: {layered - modules}"
    linter = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(linter)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert f"{len(contracts)} kept, 0 broken" in done.stdout


def test_no_function_is_longer_than_sixty_lines():
    """Short functions that do one thing: a longer one mixes levels and is split before it lands."""
    import ast

    long = []
    for path in sorted((ROOT / "miwv_lib").glob("**/*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def test_the_readme_method_table_names_are_importable_from_the_package_root():
    """README: every function of the method table is also importable from ``miwv_lib`` itself, and is the same."""
    import importlib

    import miwv_lib

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## The method, and where each step lives", 1)[1].split("All of these", 1)[0]
    names = re.findall(r"`((?:method|data)\.\w+)\.(\w+)`", table)
    assert len(names) >= 10, table
    for module, name in names:
        assert getattr(miwv_lib, name) is getattr(importlib.import_module(f"miwv_lib.{module}"), name), name
