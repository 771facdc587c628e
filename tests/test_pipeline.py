"""miwv_lib.experiments.pipeline (configuration, parameter routing, failures), miwv_lib.experiments.report and miwv_lib.experiments.plots.

Everything here is fast: only the failure test starts a kernel (one notebook that stops early).
"""

from __future__ import annotations

import json
import re
import math
from pathlib import Path

import pytest

from miwv_lib.experiments.pipeline import PipelineError, load_config, notebook_paths, parse_overrides, plan_parameters, repo_root, resolve_data_source, resolve_path, resolve_run_dir, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


# --------------------------------------------------------------------------- paths


def test_relative_paths_resolve_against_the_cwd_or_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert repo_root() == ROOT
    assert resolve_path("runs/x") == ROOT / "runs" / "x"
    assert resolve_path(tmp_path / "abs") == tmp_path / "abs"
    assert resolve_run_dir(tmp_path / "made") == tmp_path / "made" and (tmp_path / "made").is_dir()
    assert resolve_data_source("data/examples/smoke_pool.json") == str(ROOT / "data" / "examples" / "smoke_pool.json")
    assert resolve_data_source("alpaca") == "alpaca"  # registry name
    assert resolve_data_source("tatsu-lab/alpaca") == "tatsu-lab/alpaca"  # hub id
    (tmp_path / "mine.json").write_text("[]")
    assert resolve_data_source("mine.json") == str(tmp_path / "mine.json")  # not in the repo: the cwd
    mine = tmp_path / "data" / "examples" / "smoke_pool.json"  # in both: the current directory's, as the shell means
    mine.parent.mkdir(parents=True)
    mine.write_text("[]")
    assert resolve_data_source("data/examples/smoke_pool.json") == str(mine)
    assert resolve_data_source(None) is None


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_plans_against_the_notebooks(path, tmp_path):
    cfg = load_config(path)
    plan = plan_parameters(cfg, notebook_paths(), tmp_path)
    assert set(plan) == {p.stem for p in notebook_paths()}
    assert all(p["run_dir"] == str(tmp_path) for p in plan.values())
    assert plan["00_overview"]["config"] == str(path.resolve())  # the overview describes the config being run
    assert cfg["run_dir"] and not Path(cfg["run_dir"]).is_absolute()


def test_shipped_configs_hold_the_promised_settings():
    smoke, demo, paper = (load_config(ROOT / "configs" / f"{n}.yaml")["parameters"] for n in ("smoke", "demo", "paper"))
    assert smoke["model"] == "tiny-random" and smoke["data"] == "data/examples/smoke_pool.json"
    assert demo["model"] == "gemma-3-270m" and demo["data"] == "alpaca" and demo["max_length"] == 1024
    assert paper["model"] == "meta-llama/Llama-2-7b-hf" and paper["data"] == "tatsu-lab/alpaca"
    assert paper["ratios"] == [0.01] and paper["embedder"] == "BAAI/bge-large-en-v1.5"


def test_smoke_pool_is_a_small_valid_alpaca_file_with_inputs_and_duplicates():
    import warnings

    from miwv_lib import load_instructions

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        pool = load_instructions(str(ROOT / "data" / "examples" / "smoke_pool.json"))
    assert 30 <= len(pool) <= 50 and pool.schema == "alpaca"
    assert sum(bool(r["input"]) for r in pool.rows) >= 3
    assert len(pool.duplicate_groups) >= 2


def test_load_config_validates(tmp_path):
    assert load_config(None)["parameters"] == {}
    cfg = load_config({"parameters": {"limit": 5}, "notebooks": {"03_selection.ipynb": {"seed": 1}}})
    assert cfg["notebooks"] == {"03_selection": {"seed": 1}}  # '.ipynb' is optional
    with pytest.raises(PipelineError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(PipelineError, match="unknown keys"):
        load_config({"params": {}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(PipelineError, match="mapping"):
        load_config(bad)


@pytest.mark.parametrize(("parameters", "notebooks", "says"), [
    ({"limit": "ten"}, {}, "limit (a parameter of 01_data): expected int, got 'ten'"),
    ({"ratios": [0.05, 1.5]}, {}, "ratios (a parameter of 03_selection): item 1: expected a number < 1"),
    ({"methods": ["best"]}, {}, "methods (a parameter of 03_selection): item 0: expected one of miwv"),
    ({}, {"02_miwv_scoring": {"batch_size": 0}}, "batch_size (a parameter of 02_miwv_scoring): expected a positive"),
    ({}, {"04_finetune": {"max_length": "auto"}}, "max_length (a parameter of 04_finetune): expected int, got 'auto'"),
    ({"max_length": "auto"}, {}, "max_length (a parameter of 01_data): expected int, got 'auto'"),  # 01 measures by it
    ({}, {"02_miwv_scoring": {"max_length": "auto"}}, "max_length (a parameter of 02_miwv_scoring): expected int"),
    ({}, {"02_miwv_scoring": {"max_length": 1}}, "max_length (a parameter of 02_miwv_scoring): 1 cannot hold a single"),
    ({}, {"05_evaluate": {"judges": ["gpt5"]}}, "judges (a parameter of 05_evaluate): item 0: unknown judge 'gpt5'"),
    ({"limit": 0}, {}, "limit (a parameter of 01_data): expected a positive integer, got 0"),  # 01 failed in a cell
    ({"sample": 1}, {}, "sample (a parameter of 01_data): expected at least 2, got 1"),
    ({}, {"05_evaluate": {"prompts_per_set": 0}}, "prompts_per_set (a parameter of 05_evaluate): expected a positive integer, got 0"),
])
def test_a_parameter_of_the_wrong_type_or_range_is_refused_before_any_notebook_runs(parameters, notebooks, says):
    """By the parameters cell's annotation and by the configuration field of the same name (the notebook builds that
    configuration from it): it used to fail inside the notebook, or run with the value skipped."""
    config = load_config({"parameters": parameters, "notebooks": notebooks})
    with pytest.raises(PipelineError, match=re.escape(says)):
        plan_parameters(config, notebook_paths(), Path("run"))


def test_a_parameter_that_its_configuration_allows_is_accepted():
    config = load_config({"notebooks": {"02_miwv_scoring": {"max_length": 300}, "03_selection": {"focus_ratio": None},
                                        "04_finetune": {"learning_rate": 1e-4, "epochs": 1}}})
    plan = plan_parameters(config, notebook_paths(), Path("run"))
    assert plan["02_miwv_scoring"]["max_length"] == 300 and plan["04_finetune"]["epochs"] == 1


def test_parse_overrides_reads_yaml_values():
    assert parse_overrides(["limit=50", "ratios=[0.1, 0.2]", "data_dir=null", "model=gemma-3-270m",
                            "03_selection.seed=4", "overwrite=true"]) == {
        "limit": 50, "ratios": [0.1, 0.2], "data_dir": None, "model": "gemma-3-270m", "03_selection.seed": 4,
        "overwrite": True}
    with pytest.raises(PipelineError, match="key=value"):
        parse_overrides(["limit"])


def test_each_notebook_gets_only_what_it_declares(tmp_path):
    cfg = load_config({"parameters": {"model": "tiny-random", "ratios": [0.5], "limit": 10},
                       "notebooks": {"02_miwv_scoring": {"n_show": 1}}})
    plan = plan_parameters(cfg, notebook_paths(), tmp_path)
    assert plan["01_data"] == {"model": "tiny-random", "limit": 10, "run_dir": str(tmp_path)}
    assert plan["02_miwv_scoring"] == {"model": "tiny-random", "n_show": 1, "run_dir": str(tmp_path)}
    assert plan["03_selection"] == {"ratios": [0.5], "run_dir": str(tmp_path)}
    assert "config" not in plan["00_overview"]  # a dict configuration has no file to show


def test_a_run_dir_that_is_not_a_path_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("run_dir: 5\n")
    with pytest.raises(PipelineError, match="run_dir: expected a path, got 5"):
        run_pipeline(tmp_path / "c.yaml", progress=False)
    with pytest.raises(PipelineError, match=re.escape("run_dir: expected a path, got [1]")):
        run_pipeline(ROOT / "configs" / "smoke.yaml", overrides=["run_dir=[1]"], progress=False)


def test_a_key_that_is_not_a_name_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("parameters:\n  limit: 5\n  1: a\n")
    with pytest.raises(PipelineError, match="c.yaml, line 3: key 1 is not a name"):
        load_config(tmp_path / "c.yaml")


def test_typos_in_parameters_are_refused(tmp_path):
    with pytest.raises(PipelineError, match="ratio"):
        plan_parameters(load_config({"parameters": {"ratio": 0.1}}), notebook_paths(), tmp_path)
    with pytest.raises(PipelineError, match="03_selection declares no parameter"):
        plan_parameters(load_config({"notebooks": {"03_selection": {"model": "x"}}}), notebook_paths(), tmp_path)
    first = [p for p in notebook_paths() if p.stem.startswith("01")]  # a notebook not run this time: a typo still
    with pytest.raises(PipelineError, match="04_finetune declares no parameter"):
        plan_parameters(load_config({"notebooks": {"04_finetune": {"nosuch": 1}}}), first, tmp_path)
    with pytest.raises(PipelineError, match="unknown notebooks"):
        plan_parameters(load_config({"notebooks": {"07_nothing": {}}}), notebook_paths(), tmp_path)


def test_cli_reports_a_configuration_error_with_exit_code_2(tmp_path, capsys):
    from miwv_lib.experiments.cli import main

    code = main(["pipeline", "--config", str(ROOT / "configs" / "smoke.yaml"), "--run-dir", str(tmp_path),
                 "--set", "ratio=0.5", "--no-progress"])
    assert code == 2
    assert "ratio" in capsys.readouterr().err
    assert not (tmp_path / "notebooks").exists()  # refused before any notebook ran


def test_a_failing_notebook_is_named_with_its_cell(tmp_path, capfd):
    """A bad parameter (a data file that does not exist) stops 01_data; the error says where."""
    with pytest.raises(PipelineError) as info:
        run_pipeline(ROOT / "configs" / "smoke.yaml", run_dir=tmp_path, notebooks=["01"],
                     overrides=["data=data/examples/no_such_file.json"], progress=False, report=False)
    error = info.value
    message = str(error)
    assert error.notebook == "01_data" and "notebook 01_data failed in cell" in message
    assert error.cell_index is not None and f"cell {error.cell_index}" in message
    assert "DataError" in message and "no_such_file.json" in message
    assert "load_instructions" in message  # the first line of the failing cell
    saved = tmp_path / "notebooks" / "01_data.ipynb"
    assert error.executed_path == saved and saved.is_file() and str(saved) in message
    record = json.loads((tmp_path / "pipeline.json").read_text())
    assert record["status"] == "failed" and record["failed"] == "01_data"
    # the kernel ran over Unix sockets: its start-up printed no warning about TCP without encryption
    assert "without encryption" not in capfd.readouterr().err


def test_unknown_notebook_name_is_refused(tmp_path):
    with pytest.raises(PipelineError, match="unknown notebook"):
        run_pipeline({}, run_dir=tmp_path, notebooks=["09_finetune"], progress=False)


# --------------------------------------------------------------------------- report helpers


def test_selection_helpers():
    from miwv_lib.experiments.report import jaccard, jaccard_matrix, sample_rows, top_words
    from miwv_lib.method.selection import arm_name, plan_arms, ratio_label

    assert ratio_label(0.05) == "5pct" and ratio_label(0.015) == "1.5pct" and ratio_label(0.1) == "10pct"
    assert arm_name("low-miwv", 0.01) == "low-miwv_1pct" and arm_name("random", 0.1, 2) == "random-s2_10pct"
    # one seed: its name carries none; several: each carries its own
    assert [a.name for a in plan_arms([0.1, 0.05], ["miwv", "random"], [3])] == ["miwv_5pct", "random_5pct",
                                                                                   "miwv_10pct", "random_10pct", "full"]
    assert [a.name for a in plan_arms([0.1], ["random"], [0, 1], include_full=False)] == ["random-s0_10pct",
                                                                                          "random-s1_10pct"]
    assert jaccard([1, 2, 3], [2, 3, 4]) == 0.5 and jaccard([], []) == 1.0
    labels, matrix = jaccard_matrix({"a": [1, 2], "b": [3]})
    assert labels == ["a", "b"] and matrix.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert top_words(["Write the poem", "write a Poem about the sea"], 2) == [("poem", 2), ("sea", 1)]
    assert sample_rows(5, None) == list(range(5)) and sample_rows(5, 9) == list(range(5))
    picked = sample_rows(100, 10, seed=1)
    assert picked == sorted(picked) and len(set(picked)) == 10 and picked == sample_rows(100, 10, seed=1)


def test_row_source_files_follow_concatenation_and_limit(tmp_path):
    from miwv_lib.experiments.report import row_source_files

    a, b = tmp_path / "a.json", tmp_path / "b.jsonl"
    a.write_text(json.dumps([{"x": 1}] * 3))
    b.write_text("{}\n{}\n")
    assert row_source_files([a, b], 5) == ["a.json"] * 3 + ["b.jsonl"] * 2
    assert row_source_files([a, b], 2) == ["a.json"] * 2
    assert row_source_files([a], 4) == ["a.json"] * 4
    import pyarrow as pa
    import pyarrow.parquet as pq

    c = tmp_path / "c.parquet"  # counted from the footer
    pq.write_table(pa.table({"instruction": ["i"] * 4, "output": ["o"] * 4}), c)
    assert row_source_files([c, a], 6) == ["c.parquet"] * 4 + ["a.json"] * 2


def test_summary_stats_and_ranked_examples():
    from miwv_lib.experiments.report import ranked_examples, summary_stats

    st = summary_stats([1.0, None, 3.0, float("nan"), 2.0])
    assert st["n"] == 3 and st["mean"] == 2.0 and st["median"] == 2.0 and st["min"] == 1.0 and st["max"] == 3.0
    assert summary_stats([])["n"] == 0 and math.isnan(summary_stats([])["mean"])
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
    scores = [{"index": i, "id": str(i), "miwv": m, "neighbor_index": (i + 1) % 3} for i, m in enumerate([0.1, 0.5, -0.2])]
    top = ranked_examples(rows, scores, 2)
    assert [e["index"] for e in top] == [1, 0] and top[0]["neighbor_instruction"] == "q2"
    assert [e["index"] for e in ranked_examples(rows, scores, 1, highest=False)] == [2]


def _fake_run(run_dir: Path, n: int = 6) -> list[dict]:
    from miwv_lib.runtime.io import write_json, write_jsonl

    rows = [{"id": f"r{i}", "instruction": f"Task number {i}", "input": "", "output": f"answer {i}",
             "source_file": "a.json"} for i in range(n)]
    scores = [{"index": i, "id": f"r{i}", "neighbor_index": (i + 1) % n, "neighbor_similarity": 0.5,
               "zero_shot_loss": 2.0 + i / 10, "one_shot_loss": 2.0 + (i % 3) / 7, "miwv": (i % 3) / 7 - i / 10,
               "unconditional_loss": 3.0, "ifd": (2.0 + i / 10) / 3.0, "response_tokens": 3} for i in range(n)]
    write_jsonl(run_dir / "pool.jsonl", rows)
    write_jsonl(run_dir / "scores.jsonl", scores)
    write_json(run_dir / "subsets" / "summary.json", {
        "pool_rows": n, "subsets": [{"method": "miwv", "ratio": 0.5, "rows": 3, "file": "miwv_50pct.json",
                                    "demo_trimmed": 1}],
        "skipped": [{"method": "miwv", "ratio": 0.01, "reason": "selects zero rows"}]})
    return scores


def test_report_is_built_from_the_run_directory_alone(tmp_path):
    from miwv_lib.experiments.report import write_report

    scores = _fake_run(tmp_path)
    path = write_report(tmp_path)
    text = path.read_text(encoding="utf-8")
    miwvs = [s["miwv"] for s in scores]
    assert path == tmp_path / "report.md"
    assert f"N = {len(scores)} scored samples" in text
    assert f"{max(miwvs):.4f}" in text and f"{min(miwvs):.4f}" in text
    assert "| miwv | 0.5 | 3 | 1 | `subsets/miwv_50pct.json` |" in text and "skipped: selects zero rows" in text
    best = max(scores, key=lambda s: s["miwv"])
    assert f"| 1 | {best['miwv']:.4f} |" in text and f"Task number {best['index']}" in text
    assert "## Figures" not in text  # none yet
    assert not list(tmp_path.glob(".report.md*"))  # atomic write left no temp file


def test_report_of_an_empty_run_directory(tmp_path):
    from miwv_lib.experiments.report import build_report

    assert build_report(tmp_path).startswith("# MIWV run report")


# --------------------------------------------------------------------------- plots


def test_figures_render_headless_and_save_atomically(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from miwv_lib.experiments import plots
    from miwv_lib.experiments.report import jaccard_matrix

    scores = _fake_run(tmp_path)
    figs = {
        "lengths": plots.length_histograms({"instruction": [3, 4, 5], "input": [0, 0, 2], "response": [9, 1, 4]}),
        "losses": plots.loss_histograms(scores),
        "scatter": plots.miwv_vs_ifd(scores, 0.3),
        "jaccard": plots.jaccard_heatmaps({"r = 0.5": jaccard_matrix({"a": [1, 2], "b": [2, 3]})}),
        "lengths_box": plots.selected_lengths({"pool": [1, 2, 3], "miwv": [2, 3]}),
        "sources": plots.source_shares({"pool": {"a.json": 0.7, "b.json": 0.3}, "miwv": {"a.json": 1.0}}),
    }
    for name, fig in figs.items():
        path = plots.save_figure(fig, tmp_path, name)
        assert path == tmp_path / "figures" / f"{name}.png"
        assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 2000
        plt.close(fig)
    assert not list((tmp_path / "figures").glob(".*"))


def _tqdm_widget(state: dict, key: str, left: str, value: float, total: float, right: str, hidden: bool) -> str:
    ids = [f"{key}-{part}" for part in ("left", "bar", "right", "layout")]
    state[ids[0]] = {"model_name": "HTMLModel", "state": {"value": left}}
    state[ids[1]] = {"model_name": "FloatProgressModel", "state": {"value": value, "max": total}}
    state[ids[2]] = {"model_name": "HTMLModel", "state": {"value": right}}
    state[ids[3]] = {"model_name": "LayoutModel", "state": {"visibility": "hidden" if hidden else None}}
    state[key] = {"model_name": "HBoxModel", "state": {"children": [f"IPY_MODEL_{i}" for i in ids[:3]],
                                                       "layout": f"IPY_MODEL_{ids[3]}"}}
    return key


def test_saved_progress_bars_read_as_they_ended(tmp_path):
    """Outside Jupyter a tqdm widget shows the text captured when it was created ("0%"): settle it."""
    import nbformat

    from miwv_lib.experiments.pipeline import settle_progress_bars

    state: dict = {}
    done = _tqdm_widget(state, "a", "MIWV\u2007scoring:\u2007100%", 400.0, 400.0, "\u2007400/400\u2007[22:20&lt;00:00]",
                        hidden=False)
    inner = _tqdm_widget(state, "b", "score:\u2007100%", 9.0, 9.0, "\u20079/9", hidden=True)
    other = "c"
    state[other] = {"model_name": "IntSliderModel", "state": {"value": 3}}
    view = "application/vnd.jupyter.widget-view+json"
    outputs = [nbformat.v4.new_output("display_data", data={"text/plain": "MIWV scoring:   0%|          | 0/400",
                                                            view: {"model_id": m, "version_major": 2}})
               for m in (done, inner, other)]
    outputs.append(nbformat.v4.new_output("stream", name="stdout", text="kept\n"))
    cell = nbformat.v4.new_code_cell("x = 1", outputs=outputs)
    nb = nbformat.v4.new_notebook(cells=[cell])
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": state}}
    path = tmp_path / "executed.ipynb"
    nbformat.write(nb, str(path))
    settle_progress_bars(path)
    settled = nbformat.read(str(path), as_version=4).cells[0].outputs
    assert len(settled) == 3  # the hidden (leave=False) bar is gone; the slider and the stream stay
    assert settled[0]["data"]["text/plain"] == "MIWV scoring: 100%|██████████| 400/400 [22:20<00:00]"
    assert settled[1]["data"][view]["model_id"] == other and "0%" in settled[1]["data"]["text/plain"]
    assert settled[2]["text"] == "kept\n"


def test_the_terminal_shows_the_progress_of_the_running_cell(tmp_path, capfd):
    """A long cell (scoring, training, generation) draws a tqdm bar inside the kernel; the pipeline shows
    it in the terminal while the cell runs, not only the notebook's "cells done" bar."""
    import os

    import nbformat

    from miwv_lib.experiments.pipeline import execute_notebook

    cell = nbformat.v4.new_code_cell(
        "import time\nfrom tqdm.auto import tqdm\nfor _ in tqdm(range(6), desc='scoring in the kernel'):\n"
        "    time.sleep(0.4)\nbar = tqdm(total=3, disable=True)  # a bar the cell turned off, driven by hand\n"
        "bar.update(1)\nbar.close()")
    path = tmp_path / "long_cell.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), str(path))
    before = dict(os.environ)
    final, error = execute_notebook(path, {}, tmp_path / "out", progress=True, cell_timeout=120)
    assert error is None and final.is_file()
    err = capfd.readouterr().err
    assert "scoring in the kernel" in err and "6/6" in err
    assert dict(os.environ) == before  # the kernel's start-up settings do not leak into this process
    _, error = execute_notebook(path, {}, tmp_path / "quiet", cell_timeout=120)
    assert error is None and "scoring in the kernel" not in capfd.readouterr().err


def test_publishing_a_run_keeps_no_path_of_this_machine(tmp_path, monkeypatch):
    import nbformat

    from miwv_lib.experiments.pipeline import publish_run

    run_dir, data_dir = tmp_path / "run", tmp_path / "mirror"
    data_dir.mkdir()
    monkeypatch.setenv("MIWV_DATA_DIR", str(data_dir))
    cell = nbformat.v4.new_code_cell("print(run_dir)", outputs=[nbformat.v4.new_output(
        "stream", name="stdout", text=f"{run_dir}/pool.jsonl from {data_dir}/train/a.json in {ROOT}/configs\n")])
    (run_dir / "notebooks").mkdir(parents=True)
    nbformat.write(nbformat.v4.new_notebook(cells=[cell]), str(run_dir / "notebooks" / "01_data.ipynb"))
    (run_dir / "report.md").write_text(f"Run directory: {run_dir}\n", encoding="utf-8")
    (run_dir / "figures").mkdir()
    (run_dir / "figures" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    written = publish_run(run_dir, tmp_path / "published")
    assert sorted(p.relative_to(tmp_path / "published").as_posix() for p in written) == [
        "figures/a.png", "notebooks/01_data.ipynb", "report.md"]
    text = (tmp_path / "published" / "notebooks" / "01_data.ipynb").read_text(encoding="utf-8")
    assert "run/pool.jsonl from $MIWV_DATA_DIR/train/a.json in ./configs" in text
    assert str(tmp_path) not in text and str(ROOT) not in text
    assert (tmp_path / "published" / "report.md").read_text(encoding="utf-8") == "Run directory: run\n"


def test_the_published_demo_is_the_current_notebooks_executed():
    """results/demo/ holds the demo's executed notebooks, to be read on the web (``make publish`` refreshes
    it). Their cells are the current notebooks' cells, so they never show code that no longer exists."""
    import nbformat

    published = ROOT / "results" / "demo"
    paths = sorted((published / "notebooks").glob("*.ipynb"))
    assert [p.name for p in paths] == [p.name for p in notebook_paths()]
    for path in paths:
        executed = nbformat.read(path, as_version=4)
        cells = [c for c in executed.cells if "injected-parameters" not in c.metadata.get("tags", [])]
        current = nbformat.read(ROOT / "notebooks" / path.name, as_version=4).cells
        assert [(c.cell_type, c.source) for c in cells] == [(c.cell_type, c.source) for c in current], (
            f"results/demo/notebooks/{path.name} is stale: run `make publish`")
        assert executed.metadata["papermill"]["exception"] in (None, False)
        code = [c for c in cells if c.cell_type == "code"]
        assert all(c.execution_count is not None for c in code), f"{path.name}: a cell did not run"
        assert not [o for c in code for o in c.outputs if o.output_type == "error"]
        text = path.read_text(encoding="utf-8")
        assert "/work/" not in text and str(Path.home()) + "/" not in text
        assert "IProgress not found" not in text, f"{path.name}: executed without ipywidgets (text progress bars)"
    assert "Run directory" in (published / "report.md").read_text(encoding="utf-8")
