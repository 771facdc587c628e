"""The method with the real embedded default (Gemma-3-270m base): signs of MIWV and the CLI end to end."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from miwv_lib.data.models import bf16_supported
from miwv_lib.data.prompts import encode_examples
from miwv_lib.experiments.score import ScoreConfig, score_rows

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _miwv_with_demo(gemma, sample: dict, demo: dict) -> dict:
    examples = encode_examples([sample, demo], gemma.tokenizer)
    return score_rows(gemma, examples, ["sample", "demo"], [0], np.array([1, 0]), np.ones(2, dtype=np.float32),
                      ScoreConfig(progress=False))[0]


def test_an_exact_duplicate_demo_gives_clearly_negative_miwv(gemma):
    sample = {"instruction": "Describe a process of making crepes.", "input": "",
              "output": "Whisk flour, eggs, milk and a pinch of salt into a thin batter, rest it, then cook thin "
                        "layers in a hot buttered pan, flipping once."}
    row = _miwv_with_demo(gemma, sample, dict(sample))
    assert row["miwv"] < -1.0  # the model copies the demo's answer
    assert row["one_shot_loss"] < 0.5 * row["zero_shot_loss"]


def test_a_demo_that_contradicts_the_answer_gives_positive_miwv(gemma):
    # The demo answers the same instruction with a string of numbers instead of a sentence: the model
    # follows the demo and the real answer becomes less likely. (With this base model, most demos lower
    # the loss because they teach the template's format; see README, "Reading MIWV on a base model".)
    instruction = "Write one sentence about the weather today."
    sample = {"instruction": instruction, "input": "",
              "output": " It is sunny and warm today, with a light breeze from the west and not a single cloud in "
                        "the sky."}
    rng = random.Random(1)
    numbers = " ".join(str(rng.randint(0, 99)) for _ in range(150))
    row = _miwv_with_demo(gemma, sample, {"instruction": instruction, "input": "", "output": numbers})
    assert row["miwv"] > 0.1


def test_cli_scores_and_selects_real_data_end_to_end(shared_data_dir, tmp_path):
    data = shared_data_dir / "train" / "alpaca_gpt4_999.json"
    run = tmp_path / "run"
    score = subprocess.run([sys.executable, "-m", "miwv_lib", "score", "--data", str(data), "--limit", "16",
                            "--out", str(run)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert score.returncode == 0, score.stderr[-3000:]
    scores = [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()]
    assert [s["index"] for s in scores] == list(range(16))
    for s in scores:
        assert s["neighbor_index"] != s["index"] and 0 <= s["neighbor_index"] < 16
        assert 0 < s["zero_shot_loss"] < 10 and 0 < s["one_shot_loss"] < 10
        assert s["miwv"] == pytest.approx(s["one_shot_loss"] - s["zero_shot_loss"])
        assert 0 < s["ifd"] < 2
        assert not s["truncated"] and s["status"] == "ok"  # the default max length cuts nothing
    manifest = json.loads((run / "manifest.json").read_text())
    fast = "bfloat16" if bf16_supported(torch.device("cpu")) else "float32"  # --dtype auto: the fast one here
    assert manifest["fingerprint_inputs"]["dtype"] == fast and manifest["status"] == "complete"

    subset = tmp_path / "subset.json"
    select = subprocess.run([sys.executable, "-m", "miwv_lib", "select", "--data", str(data), "--limit", "16",
                             "--scores", str(run / "scores.jsonl"), "--ratio", "0.25", "--out", str(subset)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert select.returncode == 0, select.stderr[-3000:]
    chosen = json.loads(subset.read_text())
    top = sorted(scores, key=lambda s: -s["miwv"])[:4]
    assert [c["miwv_selection"]["index"] for c in chosen] == [s["index"] for s in top]
    assert set(chosen[0]) >= {"instruction", "input", "output"}


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "q", "input": "", "output": 3}]))
    result = subprocess.run([sys.executable, "-m", "miwv_lib", "score", "--data", str(bad), "--out",
                             str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "bad.json" in result.stderr and "row 0" in result.stderr and "output" in result.stderr
    assert "Traceback" not in result.stderr
