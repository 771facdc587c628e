"""The notebooks: committed clean, and executed end to end with papermill on the smoke configuration.

One pipeline run (module-scoped) on the tiny random model and the 40-row smoke pool feeds most tests;
the assertions are on the files the notebooks write into the run directory.
"""

from __future__ import annotations

import ast
import json
import math
import re
import shutil
import sys
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.integration  # runs the notebook pipeline on the tiny model (about a minute)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SOLUTIONS = sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb"))
SMOKE = ROOT / "configs" / "smoke.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Absolute paths (POSIX home/work/system dirs, Windows drives) must never be committed in a notebook.
ABSOLUTE_PATH = re.compile(r"(/work\b|/home/|/root\b|/tmp/|/Users/|/mnt/|/usr/|/opt/|[A-Za-z]:\\\\|[A-Za-z]:\\)")


def _parameters_cells(nb):
    return [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]


# --------------------------------------------------------------------------- hygiene (no execution)


def test_the_expected_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["00_overview.ipynb", "01_data.ipynb", "02_miwv_scoring.ipynb",
                                           "03_selection.ipynb", "04_finetune.ipynb", "05_evaluate.ipynb"]


def test_notebooks_01_to_05_end_with_exercises_whose_solutions_exist():
    for path in NOTEBOOKS[1:]:
        last = nbformat.read(path, as_version=4).cells[-1]
        assert last.cell_type == "markdown" and last.source.startswith("## Exercises"), path.name
        assert f"solutions/{path.stem}_solutions.ipynb" in last.source
        assert (ROOT / "notebooks" / "solutions" / f"{path.stem}_solutions.ipynb") in SOLUTIONS
        assert last.source.count("\n1. **") == 1 and "\n2. **" in last.source  # two or three exercises


@pytest.mark.parametrize("path", NOTEBOOKS + SOLUTIONS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has outputs"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"
        assert not ABSOLUTE_PATH.search(cell.source), f"{path.name} cell {i} holds an absolute path"
    assert "papermill" not in nb.metadata, "an executed copy was committed"
    assert "/work" not in path.read_text(encoding="utf-8")


@pytest.mark.parametrize("path", NOTEBOOKS + SOLUTIONS, ids=lambda p: p.stem)
def test_one_typed_commented_parameters_cell_that_papermill_reads_completely(path):
    import papermill

    nb = nbformat.read(path, as_version=4)
    cells = _parameters_cells(nb)
    assert len(cells) == 1, f"{path.name}: {len(cells)} cells tagged 'parameters'"
    tree = ast.parse(cells[0].source)
    assigned = []
    for node in tree.body:
        # typed: `name: type = default`, nothing else in the cell
        assert isinstance(node, ast.AnnAssign) and node.value is not None, ast.dump(node)[:80]
        assigned.append(node.target.id)
    lines = [line for line in cells[0].source.splitlines() if line.strip()]
    assert all(re.search(r"\S\s+#\s+\S", line) for line in lines), "every parameter needs a comment"
    # papermill skips lines it cannot parse (e.g. a '=' inside the comment): then the pipeline would
    # silently not pass that parameter. Every assignment must be seen.
    inspected = papermill.inspect_notebook(str(path))
    assert list(inspected) == assigned
    assert "run_dir" in inspected
    # the default run directory is relative (resolved against the repository root, not the cwd)
    assert not Path(ast.literal_eval(inspected["run_dir"]["default"])).is_absolute()
    if path.stem in ("00_overview", "01_data"):  # the notebooks that load data
        assert inspected["data_dir"]["default"] == "None"


def test_notebook_defaults_are_the_small_real_run():
    import papermill

    data = papermill.inspect_notebook(str(ROOT / "notebooks" / "01_data.ipynb"))
    scoring = papermill.inspect_notebook(str(ROOT / "notebooks" / "02_miwv_scoring.ipynb"))
    selection = papermill.inspect_notebook(str(ROOT / "notebooks" / "03_selection.ipynb"))
    assert data["model"]["default"] == scoring["model"]["default"] == '"gemma-3-270m"'
    assert data["data"]["default"] == '"alpaca"' and data["limit"]["default"] == "120"
    assert data["max_length"]["default"] == scoring["max_length"]["default"] == "1024"
    assert ast.literal_eval(selection["ratios"]["default"]) == [0.01, 0.05, 0.10, 0.15]
    assert set(ast.literal_eval(selection["methods"]["default"])) == {"miwv", "random", "ifd", "low-miwv", "length"}
    finetune = papermill.inspect_notebook(str(ROOT / "notebooks" / "04_finetune.ipynb"))
    evaluation = papermill.inspect_notebook(str(ROOT / "notebooks" / "05_evaluate.ipynb"))
    assert finetune["model"]["default"] == '"gemma-3-270m"' and finetune["train_ratio"]["default"] == "0.05"
    assert ast.literal_eval(finetune["train_methods"]["default"]) == ["miwv", "random"]
    assert 0 < ast.literal_eval(finetune["max_steps"]["default"]) <= 10  # a few CPU minutes, not an hour
    assert ast.literal_eval(evaluation["test_sets"]["default"]) == ["sinstruct", "alpaca_eval_gpt4"]
    assert ast.literal_eval(evaluation["judges"]["default"]) == ["reference-nll", "embedding", "rougeL"]
    assert evaluation["data_dir"]["default"] == "None" and evaluation["baseline"]["default"] == '"full"'


def test_python3_kernel_is_this_interpreter():
    """papermill runs kernel 'python3'; it must resolve to the venv's ipykernel, run by this interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    # jupyter_client replaces a bare 'python' with sys.executable when it launches the kernel
    assert spec.argv[0] in ("python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}",
                            sys.executable), spec.argv


# --------------------------------------------------------------------------- executed (smoke)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from miwv_lib.experiments.pipeline import run_pipeline

    run_dir = tmp_path_factory.mktemp("smoke_run")
    result = run_pipeline(SMOKE, run_dir=run_dir, progress=True)  # as `make demo` runs: the cell bars too
    return result


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_pipeline_executed_every_notebook_without_errors(smoke_run):
    run_dir = smoke_run.run_dir
    assert [p.name for p in smoke_run.executed] == [p.name for p in NOTEBOOKS]
    widget_bars = 0
    for path in smoke_run.executed:
        nb = nbformat.read(path, as_version=4)
        assert nb.metadata["papermill"]["exception"] in (None, False)
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1 and str(run_dir) in injected[0].source
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert errors == []
        bars = [o["data"]["text/plain"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
                if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
        assert not [b for b in bars if " 0%|" in b], f"{path.name}: progress bars saved as they started"
        widget_bars += len(bars)
        streams = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
        assert "IProgress not found" not in streams, f"{path.name}: no ipywidgets in the kernel (notebooks extra)"
    assert widget_bars, "no progress bar was a widget: JupyterLab would show text bars and a TqdmWarning"
    assert not list((run_dir / "notebooks").glob(".*")), "a temporary notebook was left behind"
    record = json.loads((run_dir / "pipeline.json").read_text())
    assert record["status"] == "complete" and set(record["seconds"]) == {p.stem for p in NOTEBOOKS}
    # each notebook got only the parameters it declares
    assert "ratios" not in record["parameters"]["02_miwv_scoring"]
    assert "model" not in record["parameters"]["03_selection"]
    assert record["parameters"]["02_miwv_scoring"]["n_show"] == 2  # the per-notebook value
    assert record["parameters"]["04_finetune"]["max_steps"] == 2 and "methods" not in record["parameters"]["04_finetune"]
    # one name per setting, each notebook its own value: the scoring batch is not the training batch
    assert record["parameters"]["04_finetune"]["batch_size"] == 2 and record["parameters"]["02_miwv_scoring"]["batch_size"] == 16
    assert record["parameters"]["05_evaluate"]["prompts_per_set"] == 2 and "sample" not in record["parameters"]["05_evaluate"]


def test_01_wrote_the_pool(smoke_run):
    run_dir = smoke_run.run_dir
    pool = _read_jsonl(run_dir / "pool.jsonl")
    source = json.loads((ROOT / "data" / "examples" / "smoke_pool.json").read_text())
    assert len(pool) == len(source) == 40
    assert [r["instruction"] for r in pool] == [r["instruction"] for r in source]
    assert {r["source_file"] for r in pool} == {"smoke_pool.json"}
    info = json.loads((run_dir / "pool_info.json").read_text())
    assert info["rows"] == 40 and info["duplicate_groups"] == [[5, 13], [8, 23]]


def test_02_wrote_one_score_per_row(smoke_run):
    run_dir = smoke_run.run_dir
    pool = _read_jsonl(run_dir / "pool.jsonl")
    scores = _read_jsonl(run_dir / "scores.jsonl")
    assert len(scores) == len(pool)
    assert [s["id"] for s in scores] == [r["id"] for r in pool]
    for s in scores:
        assert s["neighbor_index"] != s["index"]
        assert math.isclose(s["miwv"], s["one_shot_loss"] - s["zero_shot_loss"], abs_tol=1e-9)
        assert math.isfinite(s["ifd"])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["config"]["model"] == "tiny-random"
    assert manifest["config"]["max_length"] == 256  # the smoke configuration, not the notebook default


def test_03_wrote_subsets_of_floor_r_n_rows(smoke_run):
    run_dir = smoke_run.run_dir
    n = len(_read_jsonl(run_dir / "pool.jsonl"))
    scores = _read_jsonl(run_dir / "scores.jsonl")
    summary = json.loads((run_dir / "subsets" / "summary.json").read_text())
    ratios = [0.05, 0.1, 0.25]
    methods = ["miwv", "random", "ifd", "low-miwv", "length"]
    assert summary["pool_rows"] == n and summary["ratios"] == ratios
    assert {(e["method"], e["ratio"]) for e in summary["subsets"]} == {(m, r) for m in methods for r in ratios}
    for entry in summary["subsets"]:
        records = json.loads((run_dir / "subsets" / entry["file"]).read_text())
        assert len(records) == entry["rows"] == math.floor(entry["ratio"] * n)
    top = json.loads((run_dir / "subsets" / "miwv_25pct.json").read_text())
    best = sorted(scores, key=lambda s: (-s["miwv"], s["id"], s["index"]))[:10]
    assert [r["miwv_selection"]["index"] for r in top] == [s["index"] for s in best]
    assert {"instruction", "input", "output"} <= set(top[0])


SMOKE_TRAINED = {"miwv_10pct": 4, "random_10pct": 4, "full": 40}  # configs/smoke.yaml: train_ratio 0.1 of 40 rows


def test_04_trained_the_three_models_with_the_same_settings(smoke_run):
    from miwv_lib import select_indices
    from miwv_lib.experiments.train import read_loss_csv

    run_dir = smoke_run.run_dir
    models = run_dir / "models"
    selections = json.loads((run_dir / "subsets" / "selections.json").read_text())
    assert [(a["name"], a["method"], a["ratio"]) for a in selections["arms"]] == [
        ("miwv_10pct", "miwv", 0.1), ("random_10pct", "random", 0.1), ("full", "full", 1.0)]
    settings = []
    for name, rows in SMOKE_TRAINED.items():
        manifest = json.loads((models / name / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["rows"] == rows and manifest["steps"] == 2
        assert math.isfinite(manifest["train_loss"])
        adapter = models / name / "adapter"
        assert (adapter / "adapter_config.json").is_file()
        assert any(p.suffix in (".safetensors", ".bin") and p.stat().st_size > 0 for p in adapter.iterdir())
        curve = read_loss_csv(models / name / "loss.csv")
        assert len(curve) == 2 and all(math.isfinite(row["loss"]) for row in curve)
        config = json.loads((models / name / "train_config.json").read_text())
        assert config["model"] == "tiny-random" and config["method"] == "lora" and config["max_length"] == 256
        settings.append({k: v for k, v in config.items() if k != "n_examples"})
    assert all(s == settings[0] for s in settings)  # identical hyper-parameters, only the data differ
    # the MIWV model was trained on 03's subset of the same ratio
    scores = _read_jsonl(run_dir / "scores.jsonl")
    subset = json.loads((run_dir / "subsets" / "miwv_10pct.json").read_text())
    assert [r["miwv_selection"]["index"] for r in subset] == select_indices(scores, 0.1, by="miwv")


def test_05_judged_every_model_against_the_full_model(smoke_run):
    import csv

    run_dir = smoke_run.run_dir
    summary = json.loads((run_dir / "evaluation" / "summary.json").read_text())
    evaluated = summary["evaluated"]
    assert evaluated[0] == "smoke_test_prompts"  # the local prompt file is always there
    # sinstruct needs the data mirror: evaluated with it, skipped with a reason without it
    assert {*evaluated, *(s["test_set"] for s in summary["skipped"])} == {"smoke_test_prompts", "sinstruct"}
    assert all(s["reason"] for s in summary["skipped"])
    with open(run_dir / "evaluation" / "table.csv", newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    pairs = {("miwv_10pct", "full"), ("random_10pct", "full")}
    assert {(r["model_a"], r["model_b"]) for r in table} == pairs
    assert len(summary["judge_ids"]) == 3 and {r["judge"] for r in table} == set(summary["judge_ids"])
    for judge in summary["judge_ids"]:
        for pair in pairs:
            rows = [r for r in table if r["judge"] == judge and (r["model_a"], r["model_b"]) == pair]
            assert [r["test_set"] for r in rows] == [*evaluated, "All"]
            for r in rows:
                wins, ties, losses, n = (int(r[k]) for k in ("wins", "ties", "losses", "n"))
                assert wins + ties + losses == n
                assert math.isclose(float(r["winning_score"]), 1 + (wins - losses) / n, abs_tol=1e-4)
            assert [int(r["n"]) for r in rows[:-1]] == [2] * len(evaluated)  # 2 prompts per set, all with references
            assert int(rows[-1]["n"]) == 2 * len(evaluated)
    for name in SMOKE_TRAINED:
        for dataset in evaluated:
            answers = _read_jsonl(run_dir / "generations" / name / f"{dataset}.jsonl")
            assert len(answers) == 2 and all(isinstance(a["output"], str) and a["reference"] for a in answers)
    assert (run_dir / "evaluation" / "table.md").read_text().count("| **All** |") == 3 * len(pairs)
    assert (run_dir / "evaluation" / "win_tie_loss.png").read_bytes().startswith(PNG_MAGIC)


def test_figures_are_non_empty_pngs(smoke_run):
    figures = smoke_run.run_dir / "figures"
    expected = {"01_token_lengths", "01_sequence_lengths", "02_neighbor_similarity", "02_loss_histograms",
                "02_miwv_vs_ifd", "03_jaccard", "03_selected_lengths", "04_loss_curves", "05_win_tie_loss"}
    assert expected <= {p.stem for p in figures.glob("*.png")}
    for path in figures.glob("*.png"):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, path.name


def test_report_matches_the_scores(smoke_run):
    run_dir = smoke_run.run_dir
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    scores = _read_jsonl(run_dir / "scores.jsonl")
    miwvs = sorted(s["miwv"] for s in scores)
    assert f"N = {len(scores)} scored samples" in report
    assert f"| miwv | {len(scores)} | {sum(miwvs) / len(miwvs):.4f} |" in report
    assert f"{miwvs[0]:.4f}" in report and f"{miwvs[-1]:.4f}" in report
    # the top-5 table starts with the highest-MIWV row's instruction
    pool = _read_jsonl(run_dir / "pool.jsonl")
    best = max(scores, key=lambda s: (s["miwv"], s["id"]))
    assert f"| 1 | {best['miwv']:.4f} |" in report and pool[best["index"]]["instruction"] in report
    chosen = [r["miwv_selection"]["index"] for r in json.loads((run_dir / "subsets" / "miwv_25pct.json").read_text())]
    trimmed = sum(1 for i in chosen if scores[i]["truncation"].get("demo"))
    assert f"| miwv | 0.25 | 10 | {trimmed} | `subsets/miwv_25pct.json` |" in report
    # 04 and 05 are summarised from their manifests and tables
    for name in ("miwv_10pct", "random_10pct", "full"):
        manifest = json.loads((run_dir / "models" / name / "manifest.json").read_text())
        assert f"| {name} | {manifest['rows']} | {manifest['steps']} | {manifest['train_loss']:.4f} |" in report
    import csv

    with open(run_dir / "evaluation" / "table.csv", encoding="utf-8", newline="") as handle:
        overall = [r for r in csv.DictReader(handle) if r["test_set"] == "All"]
    assert overall and "## Evaluation against the full-data model (05)" in report
    for r in overall:
        assert (f"| {r['judge']} | {r['model_a']} vs {r['model_b']} | {r['n']} | {r['wins']} | {r['ties']} | "
                f"{r['losses']} | {float(r['winning_score']):.3f} |") in report
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):  # relative PNG links that resolve
        assert not Path(link).is_absolute() and (run_dir / link).is_file()
    assert "/tmp" not in report and str(ROOT) not in report


def test_03_honours_non_default_parameters(smoke_run, tmp_path):
    """Run 03_selection alone, on a copy of the smoke outputs, with another ratio list and methods."""
    from miwv_lib.experiments.pipeline import run_pipeline

    for name in ("pool.jsonl", "scores.jsonl", "manifest.json"):
        shutil.copy(smoke_run.run_dir / name, tmp_path / name)
    result = run_pipeline({"parameters": {"ratios": [0.2, 0.5], "methods": ["random", "miwv"], "seed": 3}},
                          run_dir=tmp_path, notebooks=["03_selection"], progress=False)
    assert [p.name for p in result.executed] == ["03_selection.ipynb"]
    summary = json.loads((tmp_path / "subsets" / "summary.json").read_text())
    assert summary["ratios"] == [0.2, 0.5] and summary["methods"] == ["random", "miwv"] and summary["seed"] == 3
    assert sorted(p.name for p in (tmp_path / "subsets").glob("*.json")) == [
        "miwv_20pct.json", "miwv_50pct.json", "random_20pct.json", "random_50pct.json", "summary.json"]
    assert len(json.loads((tmp_path / "subsets" / "random_50pct.json").read_text())) == 20
    # the seed reached the random baseline: a different sample than the smoke run's seed 0
    from miwv_lib import select_indices

    scores = _read_jsonl(tmp_path / "scores.jsonl")
    picked = [r["miwv_selection"]["index"] for r in json.loads((tmp_path / "subsets" / "random_20pct.json").read_text())]
    assert picked == select_indices(scores, 0.2, by="random", seed=3) != select_indices(scores, 0.2, by="random", seed=0)
    report = (tmp_path / "report.md").read_text()
    assert "| random | 0.5 | 20 |" in report


def test_01_keeps_the_pool_that_the_scores_beside_it_were_computed_on(smoke_run, tmp_path):
    """A pipeline re-run with another limit replaced pool.jsonl (and 01's figures) before 02 refused its scores:
    a run directory whose files disagreed. Now 01 refuses first, and ``overwrite`` replaces the pool."""
    from miwv_lib.experiments.pipeline import PipelineError, run_pipeline

    for name in ("pool.jsonl", "pool_info.json", "scores.jsonl", "manifest.json"):
        shutil.copy(smoke_run.run_dir / name, tmp_path / name)
    before = {name: (tmp_path / name).read_bytes() for name in ("pool.jsonl", "pool_info.json")}
    with pytest.raises(PipelineError, match="holds scores of another pool \\(40 rows; this one has 20\\)"):
        run_pipeline(SMOKE, run_dir=tmp_path, notebooks=["01"], overrides=["limit=20"], progress=False)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    run_pipeline(SMOKE, run_dir=tmp_path, notebooks=["01"], overrides=["limit=20", "01_data.overwrite=true"],
                 progress=False, report=False)
    assert len(_read_jsonl(tmp_path / "pool.jsonl")) == 20


def test_05_stops_at_a_test_set_file_that_is_there_but_wrong(smoke_run, tmp_path):
    """A test set that cannot be obtained is skipped; a file with an error in it was skipped too, and its run then
    wrote an evaluation of nothing over the good one."""
    from miwv_lib.experiments.pipeline import PipelineError, run_pipeline

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run.run_dir, run_dir)
    before = (run_dir / "evaluation" / "summary.json").read_bytes()
    rows = _read_jsonl(ROOT / "data" / "examples" / "smoke_test_prompts.jsonl")
    rows[1]["id"] = rows[0]["id"]
    (tmp_path / "twice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PipelineError, match="twice.jsonl, row 1, field 'id'"):
        run_pipeline(SMOKE, run_dir=run_dir, notebooks=["05"], progress=False,
                     overrides=[f"05_evaluate.test_sets=[{tmp_path / 'twice.jsonl'}]"])
    assert (run_dir / "evaluation" / "summary.json").read_bytes() == before


@pytest.mark.parametrize("notebook", ["03_selection", "04_finetune"])
def test_03_and_04_refuse_scores_of_other_data(smoke_run, tmp_path, notebook):
    """They checked the scores against the pool by row count and ids only, so edited data was selected and
    trained on by the old MIWV; now they load the scores as the select command does."""
    from miwv_lib.experiments.pipeline import PipelineError, run_pipeline

    for name in ("pool.jsonl", "scores.jsonl", "manifest.json"):
        shutil.copy(smoke_run.run_dir / name, tmp_path / name)
    rows = _read_jsonl(tmp_path / "pool.jsonl")
    rows[0]["output"] = "Another answer altogether."
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PipelineError, match="computed on other data"):
        run_pipeline(SMOKE, run_dir=tmp_path, notebooks=[notebook], progress=False)
    assert not (tmp_path / "subsets").exists() and not (tmp_path / "models").exists()


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_the_solutions_run_on_the_smoke_run(smoke_run, path, tmp_path):
    """Every exercise's solution executes top to bottom on what the notebooks wrote (its asserts included)."""
    from miwv_lib.experiments.pipeline import execute_notebook

    executed, error = execute_notebook(path, {"run_dir": str(smoke_run.run_dir)}, tmp_path)
    assert error is None, error
    assert executed.is_file()
