"""The reproduction study (configs/study/smoke.yaml): stages, resumption, the report's numbers."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from miwv_lib.runtime.io import read_jsonl
from miwv_lib.method.selection import select_indices, subset_size
from miwv_lib.experiments.study import BASELINE, Study, StudyError, StudyRecord, load_study_config
from miwv_lib.experiments.report import JUDGED_OUTPUTS, _reading, _rows_cut, _side, averaged, paired_difference
from miwv_lib.experiments.pipeline import resolve_path

pytestmark = pytest.mark.integration  # runs the smoke study on the tiny model (tens of seconds)

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "study" / "smoke.yaml"
SMALL_SCALE = REPO / "configs" / "study" / "small_scale.yaml"


def run_cli(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "miwv_lib", "study", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def study_dirs(tmp_path_factory):
    """The smoke study run in two sittings: first a part of the work, then the rest."""
    root = tmp_path_factory.mktemp("study")
    run_dir, results = root / "run", root / "results"
    common = ("--config", str(SMOKE), "--run-dir", str(run_dir), "--results-dir", str(results))
    first = run_cli(*common, "--stages", "score", "select", "train", "generate", "judge", "report",
                    "--models", "full", "miwv_10pct")
    assert first.returncode == 0, first.stderr[-3000:]
    partial_report = (results / "REPORT.md").read_text(encoding="utf-8")
    manifests = {p.parent.name: p.stat().st_mtime_ns for p in (run_dir / "models").glob("*/manifest.json")}
    second = run_cli(*common)
    assert second.returncode == 0, second.stderr[-3000:]
    return {"run": run_dir, "results": results, "partial_report": partial_report, "first_manifests": manifests,
            "common": common}


def test_plan_has_every_method_ratio_and_seed_and_the_full_baseline():
    config = load_study_config(SMOKE)
    names = [a.name for a in config.arms()]
    assert names[-1] == BASELINE
    assert len(names) == len(set(names)) == 1 + len(config.ratios) * (len(config.methods) - 1 + len(config.random_seeds))
    assert {"miwv_10pct", "random-s1_25pct", "low-miwv_25pct"} <= set(names)


def test_the_paper_scale_config_loads_and_plans_the_issue_s_arms():
    config = load_study_config(SMALL_SCALE)
    names = {a.name for a in config.arms()}
    for ratio in ("5pct", "10pct"):
        assert {f"miwv_{ratio}", f"ifd_{ratio}", f"low-miwv_{ratio}", *(f"random-s{s}_{ratio}" for s in (0, 1, 2))} <= names
    assert config.test_sets["alpaca_eval_gpt4"] >= 200 and "sinstruct" in config.test_sets



def test_the_paper_scale_config_pins_the_precision_its_committed_record_was_made_in():
    """"auto" resolves by the machine (bf16 only where the hardware has it), and precision is in every fingerprint:
    left to auto, the study continued on a CPU without native bf16 would refuse the record it is meant to extend."""
    config, record = load_study_config(SMALL_SCALE), REPO / "results" / "small_scale" / "record"
    scored = json.loads((record / "scores" / "manifest.json").read_text(encoding="utf-8"))["fingerprint_inputs"]
    assert config.score_config().dtype == scored["dtype"]
    trained = [json.loads(m.read_text(encoding="utf-8"))["fingerprint_inputs"]["config"]
               for m in sorted((record / "models").glob("*/manifest.json"))]
    assert trained and {t["bf16"] for t in trained} == {config.train_config().bf16}

def test_a_partial_study_reports_what_is_missing_and_judges_what_is_trained(study_dirs):
    text = study_dirs["partial_report"]
    assert "Status: incomplete" in text
    assert "train (9 of 11 models), generate (9 of 11 models), judge (9 of 10 models)" in text
    assert set(study_dirs["first_manifests"]) == {"full", "miwv_10pct"}
    judged_rows = re.findall(r"^\| (\S+) \|.*\*\*[\d.]+\*\* \[", text, re.M)  # the per-judge tables
    assert judged_rows and set(judged_rows) == {"miwv_10pct"}


def test_judging_needs_the_full_pool_model(tmp_path):
    result = run_cli("--config", str(SMOKE), "--run-dir", str(tmp_path / "run"), "--results-dir",
                     str(tmp_path / "results"), "--stages", "judge")
    assert result.returncode != 0
    assert "full-pool model is not trained yet" in result.stderr and "Traceback" not in result.stderr


def test_a_report_without_judgements_removes_an_earlier_report_s_judged_files(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    for name in JUDGED_OUTPUTS:
        (results / name).write_text("from an earlier, judged report")
    result = run_cli("--config", str(SMOKE), "--run-dir", str(tmp_path / "run"), "--results-dir", str(results),
                     "--stages", "report")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Needs the judgements" in (results / "REPORT.md").read_text(encoding="utf-8")
    assert [name for name in JUDGED_OUTPUTS if (results / name).exists()] == []


def test_resumed_study_skips_finished_work(study_dirs):
    run_dir = study_dirs["run"]
    for name, mtime in study_dirs["first_manifests"].items():  # trained in the first sitting, not again
        assert (run_dir / "models" / name / "manifest.json").stat().st_mtime_ns == mtime
    timings = read_jsonl(run_dir / "timings.jsonl")
    assert [t["stage"] for t in timings].count("score") == 1
    trained = sorted(t["model"] for t in timings if t["stage"] == "train")
    assert trained == sorted(a.name for a in load_study_config(SMOKE).arms())
    before = (run_dir / "timings.jsonl").read_text()
    again = run_cli(*study_dirs["common"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run_dir / "timings.jsonl").read_text() == before  # nothing was recomputed


def test_subsets_are_the_selection_rule(study_dirs):
    config = load_study_config(SMOKE)
    study = Study.from_config(config, study_dirs["run"], study_dirs["results"])
    scores = study.scores()
    for arm in study.arms:
        if arm.method == BASELINE:
            continue
        exported = json.loads((study_dirs["run"] / "subsets" / f"{arm.name}.json").read_text())
        assert len(exported) == subset_size(len(scores), arm.ratio)
        assert [r["miwv_selection"]["index"] for r in exported] == select_indices(scores, arm.ratio, arm.method,
                                                                                   arm.seed or 0)
    top = json.loads((study_dirs["run"] / "subsets" / "miwv_10pct.json").read_text())
    cutoff = min(r["miwv_selection"]["miwv"] for r in top)
    assert sum(s["miwv"] > cutoff for s in scores) <= len(top)


def test_report_numbers_come_from_the_judgements(study_dirs):
    text = (study_dirs["results"] / "REPORT.md").read_text(encoding="utf-8")
    assert "Status: complete" in text
    records = read_jsonl(study_dirs["run"] / "evaluation" / "judgements.jsonl")
    judges = list(dict.fromkeys(r["judge"] for r in records))
    assert len(judges) == 3
    for judge in judges:
        mine = [r for r in records if r["judge"] == judge and r["model_a"] == "ifd_25pct"]
        wins, losses = (sum(r["outcome"] == o for r in mine) for o in ("win", "loss"))
        ties = len(mine) - wins - losses
        section = text.split(f"**Judge `{judge}`**")[1].split("**Judge")[0]
        row = next(line for line in section.splitlines() if line.startswith("| ifd_25pct |"))
        assert f"| {wins} / {ties} / {losses} |" in row
        assert f"**{1 + (wins - losses) / len(mine):.3f}**" in row
    for png in ("winning_scores.png", "win_tie_lose.png", "miwv_vs_ifd.png", "training_loss.png"):
        data = (study_dirs["results"] / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({png})" in text
    assert "python -m miwv_lib study --config configs/study/smoke.yaml" in text  # as typed in the repository
    results = json.loads((study_dirs["results"] / "results.json").read_text())
    assert results["status_missing"] == [] and len(results["comparisons"]) == 3 * 2 * 4

    against_full = [c for c in results["comparisons"] if c["baseline"] == "full"]
    beaten = sum(c["ci_low"] > 0 for c in against_full)
    expected = ("not reproduced" if beaten == 0 else "reproduced" if beaten == len(against_full)
                else "only partly reproduced")
    assert f"is **{expected} here**" in text
    noise = results["seed_noise"]  # random seeds 0 and 1, each judge and ratio: the yardstick of training noise
    assert [(c["a"], c["b"]) for c in noise] == [("random-s0_10pct", "random-s1_10pct"),
                                                 ("random-s0_25pct", "random-s1_25pct")] * 3
    noisy = sum(c["ci_low"] > 0 or c["ci_high"] < 0 for c in noise)
    assert f"a clear difference in {noisy} of 6 comparisons" in text
    steps = {p.parent.name: json.loads(p.read_text())["steps"] for p in (study_dirs["run"] / "models").glob("*/manifest.json")}
    assert f"optimizer steps against the full-pool model's {steps['full']}:" in text

    lengths = text.split("Median answer length in words")[1].split("\n\n")[1].splitlines()
    [test_set] = Study.from_config(load_study_config(SMOKE), study_dirs["run"], study_dirs["results"]).test_set_labels
    answers = read_jsonl(study_dirs["run"] / "generations" / "ifd_25pct" / f"{test_set}.jsonl")
    median = float(np.median([len(r["output"].split()) for r in answers]))
    assert f"| ifd_25pct | {median:.0f} |" in lengths
    model_rows = [line.split(" | ")[0][2:] for line in lengths[2:] if not line.startswith("| *reference")]
    assert model_rows == [a.name for a in load_study_config(SMOKE).arms()]


@pytest.mark.parametrize(("tally", "reading"), [
    ({"better": 3, "worse": 0, "unclear": 0}, "better under every judge and ratio"),
    ({"better": 0, "worse": 3, "unclear": 0}, "worse under every judge and ratio"),
    ({"better": 1, "worse": 0, "unclear": 2}, "better in 1 of 3 comparisons and not clearly different in the rest"),
    ({"better": 0, "worse": 0, "unclear": 3}, "not clearly different under any judge or ratio"),
    ({"better": 1, "worse": 1, "unclear": 1}, "mixed: better in 1, worse in 1, unclear in 1 of 3 comparisons"),
])
def test_the_bottom_line_reads_the_tally_as_it_is(tally, reading):
    assert _reading(tally) == reading


def test_a_run_dir_of_ones_own_keeps_the_results_beside_it(tmp_path):
    """--run-dir alone used to write REPORT.md and record/ into the configuration's results_dir: for the committed
    study, over results/small_scale."""
    study = Study.from_config(load_study_config(SMOKE), tmp_path / "mine")
    assert study.results_dir == tmp_path / "mine" / "results"
    assert Study.from_config(load_study_config(SMOKE), tmp_path / "r", tmp_path / "x").results_dir == tmp_path / "x"
    assert Study.from_config(load_study_config(SMOKE)).results_dir == resolve_path(load_study_config(SMOKE).results_dir)


def test_cli_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SMOKE.read_text() + "\nepochs: 3\n")
    result = run_cli("--config", str(bad), "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 2 and "bad.yaml" in result.stderr and "epochs" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("--config", str(SMOKE), "--run-dir", str(tmp_path / "fresh"), "--results-dir",
                     str(tmp_path / "fresh_results"), "--stages", "train")
    assert result.returncode == 2 and "run the 'score' stage first" in result.stderr
    nested = tmp_path / "nested.yaml"
    nested.write_text(SMOKE.read_text().replace("train: {", "train: {epoch: 3, "))
    result = run_cli("--config", str(nested), "--run-dir", str(tmp_path / "r2"))
    assert result.returncode == 2 and "train" in result.stderr and "epoch" in result.stderr
    missing = tmp_path / "missing_test_set.yaml"  # found before scoring and training, not at the generate stage
    missing.write_text(SMOKE.read_text().replace("smoke_test_prompts.jsonl", "no_such_prompts.jsonl"))
    result = run_cli("--config", str(missing), "--run-dir", str(tmp_path / "r3"), "--results-dir", str(tmp_path / "x"))
    assert result.returncode == 2 and "no_such_prompts.jsonl: file not found" in result.stderr
    assert "[study] score" not in result.stdout and not (tmp_path / "r3" / "scores").exists()


def test_a_changed_setting_names_the_change_and_a_way_out_the_study_has(study_dirs, tmp_path):
    changed = tmp_path / "changed.yaml"
    changed.write_text(SMOKE.read_text().replace("max_length: 256, dtype: float32", "max_length: 200, dtype: float32"))
    result = run_cli("--config", str(changed), *study_dirs["common"][2:], "--stages", "score")
    assert result.returncode == 2 and "(max_length: 256 -> 200)" in result.stderr
    assert "a --results-dir of its own" in result.stderr and "--overwrite" not in result.stderr  # study has none


def test_a_report_of_files_made_with_other_settings_says_so(study_dirs, tmp_path):
    changed = tmp_path / "changed.yaml"
    changed.write_text(SMOKE.read_text().replace("max_steps: 2,", "max_steps: 3,").replace("dtype: float32",
                                                                                           "dtype: bfloat16"))
    result = run_cli("--config", str(changed), "--run-dir", str(study_dirs["run"]), "--results-dir",
                     str(tmp_path / "results"), "--stages", "report")
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "results" / "REPORT.md").read_text(encoding="utf-8")
    assert "**Status: incomplete" in report and "Status: complete" not in report
    assert "score.dtype: 'float32' in the files, 'bfloat16' here" in report
    assert "train.max_steps: 2 in the files, 3 here" in report


def test_a_model_trained_on_another_selection_than_todays_is_marked(study_dirs, tmp_path):
    """When a selection rule changes (IFD keeps Cherry LLM's IFD ≤ 1 since 2026-12-05), a model trained on the old
    selection is marked, with its own rows' statistics, instead of standing beside the new selection's."""
    from miwv_lib import load_instructions
    from miwv_lib.experiments.train import rows_fingerprint

    run = tmp_path / "run"
    shutil.copytree(study_dirs["run"], run)
    selections = json.loads((run / "subsets" / "selections.json").read_text(encoding="utf-8"))
    old = selections["indices"]["ifd_10pct"] = selections["indices"]["low-miwv_10pct"]  # the rows it was trained on
    (run / "subsets" / "selections.json").write_text(json.dumps(selections), encoding="utf-8")
    manifest_path = run / "models" / "ifd_10pct" / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    pool = load_instructions(str(REPO / "data" / "examples" / "smoke_pool.json"))
    manifest["fingerprint_inputs"]["data"] = rows_fingerprint([pool.rows[i] for i in old])
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    result = run_cli("--config", str(SMOKE), "--run-dir", str(run), "--results-dir", str(tmp_path / "results"),
                     "--stages", "report")
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "results" / "REPORT.md").read_text(encoding="utf-8")
    assert "train (ifd_10pct: trained on another selection than today's, †)" in report
    assert "| ifd_10pct † |" in report and "| ifd_25pct |" in report  # only the one whose rows differ
    assert "The models' own rows: ifd_10pct mean MIWV" in report
    assert "The comparisons with ifd_10pct use models trained on an earlier selection" in report
    assert "†" not in study_dirs["results"].joinpath("REPORT.md").read_text(encoding="utf-8")


def test_rows_cut_by_a_model_trained_before_they_were_recorded_are_counted_and_starred_only_when_some_were():
    """Before 2026-12-05 a row over the training max length lost its prompt's start; a model of that rule has no
    ``rows_cut``, so its count comes from the scores (``[BOS] prompt response [EOS]``), starred. One with no such row
    was trained as today's ``train`` trains it: a plain 0."""
    scores = [{"prompt_tokens": 100, "response_tokens": 410}, {"prompt_tokens": 100, "response_tokens": 411}]
    assert _rows_cut({"rows_cut": {"response": 3, "prompt": 0}}, [0, 1], scores, 512) == "3"
    assert _rows_cut({}, [0, 1], scores, 512) == "1*"
    assert _rows_cut({}, [0], scores, 512) == "0"
    assert _rows_cut({}, None, scores, 512) == "?"


def test_models_of_the_earlier_truncation_rule_that_cut_no_row_get_no_footnote(study_dirs, tmp_path):
    """Also: a model resumed from a checkpoint says that its time and its tokens/s cover different sittings."""
    run = tmp_path / "run"
    shutil.copytree(study_dirs["run"], run)
    for path in run.glob("models/*/manifest.json"):
        manifest = json.loads(path.read_text(encoding="utf-8"))
        del manifest["rows_cut"]
        if path.parent.name == "full":
            manifest["resumed_from_step"] = 2
        path.write_text(json.dumps(manifest), encoding="utf-8")
    result = run_cli("--config", str(SMOKE), "--run-dir", str(run), "--results-dir", str(tmp_path / "results"),
                     "--stages", "report")
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "results" / "REPORT.md").read_text(encoding="utf-8")
    assert re.search(r"^\| full \| 40 \| 0 \| ", report, re.MULTILINE), report
    assert "Trained before 2026-12-05" not in report and not re.search(r"\| \d+\* \|", report)
    assert report.count("trained in more than one sitting") == 1
    assert "full was trained in more than one sitting (the last resumed at step 2)" in report


def test_a_report_on_scores_of_other_data_says_so_instead_of_failing(study_dirs, tmp_path):
    """An edited limit used to end the report stage in an IndexError after its figures were redrawn."""
    changed = tmp_path / "changed.yaml"
    changed.write_text(SMOKE.read_text() + "\nlimit: 30\n")
    result = run_cli("--config", str(changed), "--run-dir", str(study_dirs["run"]), "--results-dir",
                     str(tmp_path / "results"), "--stages", "report")
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "results" / "REPORT.md").read_text(encoding="utf-8")
    assert "still to run: score (" in report and "has 40 rows but the data has 30" in report


def test_a_report_after_the_test_sample_changed_asks_for_answers_again(study_dirs, tmp_path):
    """is_answered looked only for the files: an edited test_seed reported the old sample's answers under it."""
    changed = tmp_path / "changed.yaml"
    changed.write_text(SMOKE.read_text().replace("test_seed: 0", "test_seed: 1"))
    result = run_cli("--config", str(changed), "--run-dir", str(study_dirs["run"]), "--results-dir",
                     str(tmp_path / "results"), "--stages", "report")
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "results" / "REPORT.md").read_text(encoding="utf-8")
    assert "generate (11 of 11 models)" in report, report[:600]


def test_unknown_model_names_are_refused(study_dirs):
    result = run_cli(*study_dirs["common"], "--stages", "train", "--models", "miwv_7pct")
    assert result.returncode == 2 and "miwv_7pct" in result.stderr and "miwv_10pct" in result.stderr


def test_paired_difference_is_a_paired_bootstrap():
    a = {("s", str(i)): v for i, v in enumerate([1, 1, 0, 1, -1, 1, 0, 1])}
    b = {("s", str(i)): v for i, v in enumerate([0, 1, 0, -1, -1, 0, 0, 0])}
    d = paired_difference(a, b, n_resamples=4000)
    assert d["n"] == 8 and d["difference"] == pytest.approx(4 / 8 - (-1 / 8))
    assert d["ci_low"] <= d["difference"] <= d["ci_high"]
    same = paired_difference(a, a)
    assert same["difference"] == same["ci_low"] == same["ci_high"] == 0  # pairing removes all variance
    assert math.isnan(paired_difference(a, {("t", "0"): 1})["difference"])  # no common prompt: no number


def test_a_difference_that_is_exactly_zero_is_not_read_by_the_sign_of_a_rounding_error():
    # MIWV's outcomes against the mean of three seeds': thirds, whose float sum is off by -1.85e-17
    mine = {("s", str(i)): v for i, v in enumerate([1, 0, -1, 1, 1, -1])}
    seeds = [{("s", str(i)): v for i, v in enumerate(s)}
             for s in ([0, 1, -1, 0, 1, -1], [1, 0, -1, -1, 0, 0], [1, 0, 1, 0, 1, 1])]
    diff = [mine[k] - averaged(seeds)[k] for k in sorted(mine)]
    assert np.mean(diff) < 0  # what the rounding error alone gives
    d = paired_difference(mine, averaged(seeds), n_resamples=200)
    assert d["difference"] == 0.0 and f"{d['difference']:+.3f}" == "+0.000"
    assert _side({"ci_low": -0.1, "ci_high": d["difference"]}) == "unclear"  # an interval touching 0 is no verdict


def test_random_seeds_are_averaged_per_prompt():
    seeds = [{("s", "0"): 1, ("s", "1"): -1}, {("s", "0"): 0, ("s", "1"): -1}, {("s", "0"): 1}]
    assert averaged(seeds) == {("s", "0"): pytest.approx(2 / 3)}


def test_small_scale_config_refuses_a_typo_early(tmp_path):
    text = SMALL_SCALE.read_text().replace("methods:", "methodz:")
    (tmp_path / "typo.yaml").write_text(text)
    with pytest.raises(StudyError, match="methodz"):
        load_study_config(tmp_path / "typo.yaml")
    assert re.search(r"^results_dir: results/small_scale", SMALL_SCALE.read_text(), re.M)
    (tmp_path / "layout.yaml").write_text(SMALL_SCALE.read_text().replace("generate:", "generate:\n  template: plain"))
    with pytest.raises(StudyError, match="generate: template: 'plain' is not the models' training template 'alpaca'"):
        load_study_config(tmp_path / "layout.yaml")  # answers in a layout the models never learned


def _work_timings(run_dir: Path) -> list[dict]:
    """The expensive stages' timings (judging is cheap and redone in a fresh run directory)."""
    return [t for t in read_jsonl(run_dir / "timings.jsonl") if t["stage"] in ("score", "train", "generate")]


def test_a_fresh_checkout_continues_from_the_committed_record(study_dirs, tmp_path):
    """Only results_dir is committed; a clean clone has no run directory. The record beside the report
    must let the study finish there without scoring, training or generating anything again."""
    results = tmp_path / "results"
    shutil.copytree(study_dirs["results"], results)
    record = results / "record"
    answers = sorted(record.rglob("*.outputs.jsonl"))
    assert len(answers) == len(load_study_config(SMOKE).arms())  # one test set, every model
    for path in answers:  # our models' answers, never the test sets' prompts or references
        assert all(set(row) == {"id", "output"} for row in read_jsonl(path))
    assert not list(record.rglob("adapter*")) and not list(record.glob("subsets/*pct.json"))

    report_only = run_cli("--config", str(SMOKE), "--run-dir", str(tmp_path / "report_only"), "--results-dir",
                          str(results), "--stages", "report")  # the restored answers count without 'generate'
    assert report_only.returncode == 0, report_only.stderr[-3000:]
    assert "still to run: judge (10 of 10 models)." in (results / "REPORT.md").read_text(encoding="utf-8")

    fresh = tmp_path / "run"
    result = run_cli("--config", str(SMOKE), "--run-dir", str(fresh), "--results-dir", str(results))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "restored" in result.stdout
    assert not list((fresh / "models").glob("*/adapter"))  # no model was trained again
    assert _work_timings(fresh) == _work_timings(study_dirs["run"])  # nor scored or generated again
    assert read_jsonl(fresh / "scores" / "scores.jsonl") == read_jsonl(study_dirs["run"] / "scores" / "scores.jsonl")
    original = read_jsonl(study_dirs["run"] / "evaluation" / "judgements.jsonl")
    assert read_jsonl(fresh / "evaluation" / "judgements.jsonl") == original
    assert "Status: complete" in (results / "REPORT.md").read_text(encoding="utf-8")


def test_a_model_whose_answers_are_not_all_recorded_is_trained_again(study_dirs, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(study_dirs["results"], results)
    next(iter((results / "record" / "generations" / "miwv_10pct").glob("*.outputs.jsonl"))).unlink()
    fresh = tmp_path / "run"
    result = run_cli("--config", str(SMOKE), "--run-dir", str(fresh), "--results-dir", str(results),
                     "--stages", "score", "select", "train", "--models", "miwv_10pct")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (fresh / "models" / "miwv_10pct" / "adapter").is_dir()  # trained here: its weights are needed
    assert (fresh / "models" / "full" / "manifest.json").exists()  # restored: all its answers are recorded
    assert not (fresh / "models" / "full" / "adapter").exists()
    manifest = json.loads((fresh / "models" / "miwv_10pct" / "manifest.json").read_text())
    before = json.loads((study_dirs["run"] / "models" / "miwv_10pct" / "manifest.json").read_text())
    assert manifest["fingerprint"] == before["fingerprint"] and manifest["train_loss"] == pytest.approx(
        before["train_loss"], rel=1e-5)


def test_a_restored_model_that_today_s_code_trains_otherwise_is_trained_again(study_dirs, tmp_path, monkeypatch):
    """The record keeps a model made under an earlier rule (before 2026-12-05 a long row lost its prompt's start),
    without its weights: continuing the study trains it again. That used to stop a fresh clone's train stage with an
    error. A changed setting still stops it, so that no edit replaces the record's models unasked."""
    from miwv_lib.experiments import train
    from miwv_lib.experiments.study import run_study

    results = tmp_path / "results"
    shutil.copytree(study_dirs["results"], results)
    monkeypatch.setattr(train, "TRAIN_FORMAT_VERSION", train.TRAIN_FORMAT_VERSION + 1)  # today's code: a rule on
    stages = ("score", "select", "train")
    run_study(SMOKE, tmp_path / "run", results, stages, only=["miwv_10pct"])
    model = tmp_path / "run" / "models" / "miwv_10pct"
    assert (model / "adapter").is_dir()  # trained again, by today's rule
    manifest = json.loads((model / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["fingerprint_inputs"]["format_version"] == train.TRAIN_FORMAT_VERSION
    recorded = results / "record" / "models" / "miwv_10pct" / "manifest.json"
    assert json.loads(recorded.read_text(encoding="utf-8"))["fingerprint"] == manifest["fingerprint"]
    changed = tmp_path / "changed.yaml"
    changed.write_text(SMOKE.read_text().replace("max_steps: 2,", "max_steps: 3,"))
    with pytest.raises(StudyError, match=r"config\.max_steps: 2 -> 3"):
        run_study(changed, tmp_path / "run2", results, stages, only=["full"])
    assert not (tmp_path / "run2" / "models" / "full" / "adapter").exists()


def test_a_restored_model_whose_answers_do_not_apply_is_trained_again(study_dirs, tmp_path):
    """Another sample of the test set: the recorded answers are not this study's, and the weights are gone."""
    results = tmp_path / "results"
    shutil.copytree(study_dirs["results"], results)
    other = tmp_path / "other_sample.yaml"
    other.write_text(SMOKE.read_text().replace("smoke_test_prompts.jsonl: 3", "smoke_test_prompts.jsonl: 2"))
    fresh = tmp_path / "run"
    result = run_cli("--config", str(other), "--run-dir", str(fresh), "--results-dir", str(results),
                     "--stages", "score", "select", "train", "generate", "--models", "miwv_10pct")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (fresh / "models" / "miwv_10pct" / "adapter").is_dir()  # trained again, then asked the 2 prompts
    [answers] = [p for p in (fresh / "generations" / "miwv_10pct").glob("*.jsonl")]
    assert len(read_jsonl(answers)) == 2


def test_the_record_keeps_finished_chunks_until_the_scores_are_complete(tmp_path):
    run = tmp_path / "run"
    record = StudyRecord(tmp_path / "results" / "record", run)
    (run / "scores").mkdir(parents=True)
    (run / "scores" / "manifest.json").write_text('{"status": "running"}\n')
    (run / "scores" / "scores.partial.jsonl").write_text('{"index": 0}\n')
    record.keep()
    assert (record.root / "scores" / "scores.partial.jsonl").read_text() == '{"index": 0}\n'

    elsewhere = StudyRecord(record.root, tmp_path / "fresh")  # a clean clone resumes from the same chunks
    assert sorted(elsewhere.restore([], [])) == ["scores/manifest.json", "scores/scores.partial.jsonl"]
    assert (tmp_path / "fresh" / "scores" / "scores.partial.jsonl").read_text() == '{"index": 0}\n'
    (tmp_path / "fresh" / "scores" / "manifest.json").write_text('{"status": "newer"}\n')
    assert elsewhere.restore([], []) == []  # what the run directory has wins
    assert (tmp_path / "fresh" / "scores" / "manifest.json").read_text() == '{"status": "newer"}\n'

    (run / "scores" / "scores.partial.jsonl").unlink()  # score_pool merged the chunks into scores.jsonl
    (run / "scores" / "scores.jsonl").write_text('{"index": 0}\n')
    record.keep()
    assert not list(record.root.glob("scores/scores.partial*")) and (record.root / "scores" / "scores.jsonl").exists()


def _report_body(text: str) -> str:
    """REPORT.md without its provenance lines: the commit that wrote it, and the compute log (a fresh run
    directory adds its own judging time to it)."""
    return "\n".join(line for line in text.splitlines()
                     if not line.startswith(("*Generated by", "Compute spent so far")))


@pytest.mark.study
def test_the_committed_report_is_what_the_committed_code_makes_of_the_committed_record(shared_data_dir, tmp_path):
    """results/small_scale/REPORT.md is rebuilt, numbers and all, by README's command to continue the study, run in
    a clean run directory with nothing but the record beside it and the real data: every stage finds its work done
    (a fresh clone continues the study where the commit left it, rather than training or stopping)."""
    committed, run = REPO / "results" / "small_scale", tmp_path / "run"
    results = tmp_path / "results"
    shutil.copytree(committed, results)
    judged = bool(json.loads((committed / "results.json").read_text(encoding="utf-8"))["table"])
    stages = () if judged else ("--stages", "report")  # a record not judged yet is reported as it is
    env = {**os.environ, "MIWV_DATA_DIR": str(shared_data_dir), "HF_HUB_OFFLINE": "1"}
    result = run_cli("--config", str(SMALL_SCALE), "--run-dir", str(run), "--results-dir", str(results), *stages,
                     env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = read_jsonl(committed / "record" / "timings.jsonl"), read_jsonl(run / "timings.jsonl")
    # no stage worked but judge: the record keeps answers, not verdicts
    assert after[:len(before)] == before and {t["stage"] for t in after[len(before):]} <= {"judge"}
    assert not list(run.glob("models/*/adapter"))
    rebuilt = (results / "REPORT.md").read_text(encoding="utf-8")
    assert _report_body(rebuilt) == _report_body((committed / "REPORT.md").read_text(encoding="utf-8"))
