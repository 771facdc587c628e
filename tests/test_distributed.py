"""Data-parallel scoring: 2 CPU processes (gloo) under torchrun give the single-process file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import make_rows
from miwv_lib.runtime.io import read_jsonl


def _score(cmd_prefix: list[str], data, out, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MIWV_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd_prefix, "-m", "miwv_lib", "score", "--data", str(data), "--out", str(out),
                           "--model", "tiny-random", "--embedder", "self", "--dtype", "float32", "--max-length", "128"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)


def test_two_ranks_merge_into_the_single_process_file(tmp_path):
    data = tmp_path / "pool.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(150, seed=11)))  # 3 chunks of 64 rows
    single = _score([sys.executable], data, tmp_path / "single", tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    multi = _score(torchrun, data, tmp_path / "multi", tmp_path)
    assert multi.returncode == 0, multi.stderr[-4000:]

    one, two = read_jsonl(tmp_path / "single" / "scores.jsonl"), read_jsonl(tmp_path / "multi" / "scores.jsonl")
    assert [r["index"] for r in two] == list(range(150))
    for a, b in zip(one, two):
        for key in ("zero_shot_loss", "one_shot_loss", "miwv", "ifd"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), (a["index"], key)
        assert {k: v for k, v in a.items() if not isinstance(v, float)} == \
               {k: v for k, v in b.items() if not isinstance(v, float)}
    manifest = json.loads((tmp_path / "multi" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["status"] == "complete"
    assert not list((tmp_path / "multi").glob("scores.partial*"))


@pytest.mark.parametrize("world_size", ["2", "abc", "0"])
def test_a_world_size_without_a_process_group_is_one_clear_error(tmp_path, world_size):
    """WORLD_SIZE set by hand, without torchrun's rendezvous, used to end in a traceback (exit 1)."""
    data = tmp_path / "pool.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(4)))
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run([sys.executable, "-m", "miwv_lib", "score", "--data", str(data), "--out",
                             str(tmp_path / "out"), "--model", "tiny-random"], capture_output=True, text=True,
                            timeout=300, env={**env, "WORLD_SIZE": world_size, "RANK": "0"}, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: WORLD_SIZE")
    assert "Traceback" not in result.stderr and not (tmp_path / "out" / "scores.jsonl").exists()
