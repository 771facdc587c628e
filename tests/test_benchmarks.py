"""The benchmark scripts run end to end (tiny settings: this checks they work, not how fast)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_rows

pytestmark = pytest.mark.integration  # runs the benchmark scripts end to end (tens of seconds)

ROOT = Path(__file__).resolve().parents[1]


def test_scoring_benchmark_reports_speed_and_fidelity(tmp_path):
    data = tmp_path / "pool.json"
    data.write_text(json.dumps(make_rows(20, seed=2)))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scoring.py"), "--model", "tiny-random",
                             "--data", str(data), "--rows", "20", "--max-length", "128", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                              "MIWV_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = {row["mode"]: row for row in json.loads((tmp_path / "bench_scoring.json").read_text())["summary"]}
    assert set(summary) == {"naive", "per-row", "exact", "exact-compiled", "fast", "compiled"}
    for mode in ("naive", "per-row", "exact", "exact-compiled"):  # float32, against float64 cross-entropy
        assert summary[mode]["max_abs_dloss_f64"] <= 1e-5
    for mode in ("per-row", "exact"):
        assert summary[mode]["max_abs_dloss"] <= 1e-5  # a 97-token vocabulary: naive's float32 sum is exact enough
    # Compiled, the body's float32 sums run in another order, so not the 1e-5 bound.
    assert summary["exact-compiled"]["max_abs_dloss"] <= 1e-4
    # The warm-up ran a batch of each kind, so no graph was compiled inside the timing.
    assert summary["exact-compiled"]["compile_s_in_timing"] == summary["compiled"]["compile_s_in_timing"] == 0
    assert summary["exact"]["body_tokens"] <= summary["per-row"]["body_tokens"]  # rows may share a neighbour's pass
    for mode in ("fast", "compiled"):
        assert 0 < summary[mode]["max_abs_dloss"] < 0.1  # bf16 differs, but only by rounding
    assert all(0 < summary[mode]["of_roofline"] for mode in summary)
    assert "| exact |" in (tmp_path / "bench_scoring.md").read_text()


def test_scoring_benchmark_takes_a_random_sample_and_measures_fidelity_against_exact(tmp_path):
    data = tmp_path / "pool.json"
    data.write_text(json.dumps(make_rows(30, seed=3)))
    run = [sys.executable, str(ROOT / "benchmarks" / "bench_scoring.py"), "--model", "tiny-random", "--data", str(data),
           "--rows", "12", "--max-length", "128", "--modes", "exact,fast"]
    env = {**__import__("os").environ, "MIWV_CACHE_DIR": str(tmp_path)}
    samples = []
    for seed, out in ((1, tmp_path / "a"), (1, tmp_path / "b"), (2, tmp_path / "c")):
        result = subprocess.run([*run, "--sample-seed", str(seed), "--out", str(out)], capture_output=True, text=True,
                                timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        summary = {row["mode"]: row for row in json.loads((out / "bench_scoring.json").read_text())["summary"]}
        assert summary["fast"]["speedup_vs_naive"] is None and 0 < summary["fast"]["max_abs_dloss"] < 0.1
        assert summary["exact"]["max_abs_dloss"] == 0  # the reference itself
        samples.append(summary["exact"]["body_tokens"])
    assert samples[0] == samples[1] != samples[2]  # the seed picks the rows: the same seed, the same rows


def test_gpu_benchmark_runs_on_cpu_with_a_tiny_model(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--size", "tiny",
                             "--device", "cpu", "--dtype", "float32", "--samples", "24", "--chunk-rows", "8",
                             "--variants", "4:512:16,64:8192:256:1:40", "--check", "40", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    # Both plans on the same rows: score's (rows that share a neighbour share a pass) and one pass per row.
    shared, per_row = report["plans"]
    assert (shared["pack_tokens"], per_row["pack_tokens"]) == (1024, 0) and report["samples"] == 24
    assert shared["branched_passes"] >= 1 and per_row["branched_passes"] == 0
    assert shared["passes"] < per_row["passes"] <= 40 and shared["tokens"] < per_row["tokens"]  # --check 40: all
    assert shared["response_tokens"] == per_row["response_tokens"] > 0
    assert [(v["pack_tokens"], v["head_chunk"], v["max_padding"], v["head_block"]) for v in report["variants"]] == [
        (1024, 16, 0.05, None), (1024, 256, 1.0, 40), (0, 16, 0.05, None), (0, 256, 1.0, 40)]
    for variant in report["variants"]:
        assert variant["tokens_per_s"] > 0 and 0 <= variant["padding_waste"] < 1
        assert variant["max_abs_dloss_vs_naive"] <= 1e-5  # the timed path is the engine, and it is exact in float32


def test_training_benchmark_runs_with_a_tiny_model(tmp_path, tiny_model_dir):
    """benchmarks/bench_training.py end to end (tiny settings: it works, not how fast)."""
    (tmp_path / "pool.json").write_text(json.dumps(make_rows(4, seed=2)))
    script = ROOT / "benchmarks" / "bench_training.py"
    done = subprocess.run([sys.executable, str(script), "--model", str(tiny_model_dir), "--data",
                           str(tmp_path / "pool.json"), "--steps", "2", "--batch-size", "2", "--order", "off,on",
                           "--out", str(tmp_path / "bench.json")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [t["mode"] for t in report["trials"]] == ["off", "on"]
    assert all(t["tokens_per_s"] > 0 and t["steps"] == 2 for t in report["trials"])
    assert report["summary"]["ratio_on_off"] > 0 and report["summary"]["max_abs_dloss"] < 1e-4


def test_gpu_benchmark_compiles_every_kind_of_batch_before_the_timing(tmp_path):
    """With torch.compile, a branched pass (its own mask) and a batch of one each compile a graph of their own;
    the warm-up runs one batch of each kind, so the timed runs compile nothing. (Chunks of 4 rows: the first chunk
    alone, the warm-up before, lacks a kind, and 4 s of compiling landed in the timing.)"""
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--size", "tiny",
                             "--device", "cpu", "--dtype", "float32", "--samples", "64", "--chunk-rows", "4",
                             "--variants", "8:2048:64", "--torch-compile", "--no-bare-forward", "--check", "4",
                             "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kinds of batch" in result.stderr  # the progress line names what the warm-up covered
    report = json.loads(out.read_text())
    assert report["plans"][0]["branched_passes"] >= 1 and len(report["variants"]) == 2
    for variant in report["variants"]:
        assert variant["compile_s_in_timing"] == 0.0
        assert variant["max_abs_dloss_vs_naive"] <= 1e-5  # compiled, branched or not, the engine stays exact
