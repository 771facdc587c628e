"""Shared pytest fixtures. Several modules' tests add fixtures here: append, don't overwrite."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest


# ---- data (miwv_lib.data.datasets) -------------------------------------------------------------


def _find_shared_data_dir() -> Path | None:
    # $MIWV_DATA_DIR wins so CI/other machines can point at their own mirror;
    # otherwise the workspace layout puts the mirror next to the repo: <repo>/../shared/data.
    candidates = []
    if os.environ.get("MIWV_DATA_DIR"):
        candidates.append(Path(os.environ["MIWV_DATA_DIR"]).expanduser())
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "data")
    for path in candidates:
        if (path / "train").is_dir() or (path / "eval").is_dir():
            return path
    return None


# Resolved at import, before any test's monkeypatch can hide $MIWV_DATA_DIR.
_SHARED_DATA_DIR = _find_shared_data_dir()


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real local data mirror (read-only); skips the test when it is not available."""
    path = _SHARED_DATA_DIR
    if path is None:
        pytest.skip(
            "real data mirror not found: set MIWV_DATA_DIR or place it at <repo>/../shared/data "
            "(see data/README.md)"
        )
    return path


# ---- models (miwv_lib.data.models) -----------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with a locally trained tokenizer: unit tests run in seconds."""
    from miwv_lib.data.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    from miwv_lib.data.models import load_model

    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def gemma():
    """The real embedded default (Gemma-3-270m base), in float32 exact mode."""
    from miwv_lib.data.models import load_model

    return load_model("gemma-3-270m", dtype="float32", device="cpu")


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Small, varied Alpaca-style rows (some with input, different lengths)."""
    import random

    rng = random.Random(seed)
    words = "the cat dog sun sea moon tree river city green blue quick slow happy write list explain".split()
    rows = []
    for i in range(n):
        instruction = f"Task {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        inp = " ".join(rng.choice(words) for _ in range(rng.randint(0, 6))) if i % 3 == 0 else ""
        output = " ".join(rng.choice(words) for _ in range(rng.randint(2, 30))) + "."
        rows.append({"instruction": instruction, "input": inp, "output": output})
    return rows


# ---- the fuzzer (tests/test_fuzz.py) ----------------------------------------------------------------------

FUZZ_CASES: Counter = Counter()  # generated cases run, per family; shown in the summary


def pytest_terminal_summary(terminalreporter):
    if FUZZ_CASES:
        families = ", ".join(f"{family} {n}" for family, n in sorted(FUZZ_CASES.items()))
        terminalreporter.write_line(f"fuzz cases run: {sum(FUZZ_CASES.values())} ({families})")
