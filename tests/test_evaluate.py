"""The pairwise protocol: order combination, winning score, bootstrap, tables, figure, run_comparison."""

from __future__ import annotations

import json
import math
import random

import pytest

from miwv_lib.method.pairwise import ALL, PairItem, bootstrap_interval, combine_orders, summarize, winning_score
from miwv_lib.experiments.evaluate import compare_generations, judge_pair, plot_outcomes, write_table
from miwv_lib.experiments.report import outcome_values, paired_difference, table_markdown
from miwv_lib.experiments.engine import run_comparison
from miwv_lib.method.selection import SelectionError
from miwv_lib.method.pairwise import LOSS, TIE, WIN, Review
from miwv_lib.experiments.judges import RougeJudge

# (verdict for A when A is shown first, verdict for A when A is shown second) -> outcome for A
PROTOCOL = {
    (WIN, WIN): WIN, (WIN, TIE): WIN, (TIE, WIN): WIN,
    (LOSS, LOSS): LOSS, (LOSS, TIE): LOSS, (TIE, LOSS): LOSS,
    (TIE, TIE): TIE, (WIN, LOSS): TIE, (LOSS, WIN): TIE,
}


@pytest.mark.parametrize(("first", "second"), list(PROTOCOL))
def test_combine_orders_every_combination(first, second):
    assert combine_orders(first, second) == PROTOCOL[(first, second)]


def test_winning_score_formula():
    assert winning_score(5, 3, 10) == pytest.approx(1.2)
    assert winning_score(10, 0, 10) == 2.0
    assert winning_score(0, 10, 10) == 0.0
    assert winning_score(4, 4, 10) == 1.0
    assert math.isnan(winning_score(0, 0, 0))


def test_bootstrap_interval_is_seeded_and_brackets_the_score():
    outcomes = [WIN] * 12 + [TIE] * 5 + [LOSS] * 3
    low, high = bootstrap_interval(outcomes, n_resamples=500, seed=1)
    assert (low, high) == bootstrap_interval(outcomes, n_resamples=500, seed=1)
    assert low < winning_score(12, 3, 20) < high
    assert bootstrap_interval([WIN] * 7, n_resamples=200) == (2.0, 2.0)
    assert all(math.isnan(x) for x in bootstrap_interval([]))


class _StubJudge:
    """Scores by a rule of the answers, counting how it is called."""

    margin = 0.0
    needs_reference = False
    cacheable = False

    def __init__(self, rule, judge_id="stub"):
        self.rule, self.id, self.calls = rule, judge_id, []

    def review(self, requests):
        self.calls += [(r.first.model, r.second.model) for r in requests]
        return [Review(*self.rule(r.first.answer, r.second.answer)) for r in requests]


def _items(answers_a, answers_b, dataset="vicuna"):
    return [PairItem(id=str(i), dataset=dataset, question=f"q{i}", reference=None, answer_a=a, answer_b=b)
            for i, (a, b) in enumerate(zip(answers_a, answers_b))]


def test_position_bias_becomes_a_tie_and_real_preference_a_win():
    items = _items(["a long good answer", "short"], ["short", "a long good answer"])
    first_always_wins = _StubJudge(lambda x, y: (9, 1))
    records = judge_pair(items, first_always_wins, "A", "B")
    assert [r["outcome"] for r in records] == [TIE, TIE]
    assert first_always_wins.calls == [("A", "B"), ("B", "A")] * 2  # both orders of every prompt

    longer_wins = _StubJudge(lambda x, y: (len(x), len(y)))
    records = judge_pair(items, longer_wins, "A", "B")
    assert [r["outcome"] for r in records] == [WIN, LOSS]
    assert records[0]["a_first"]["verdict_a"] == WIN and records[0]["b_first"]["verdict_a"] == WIN
    assert all(r["judge"] == "stub" for r in records)


def test_unscored_review_is_a_tie_and_counted():
    judge = _StubJudge(lambda x, y: (None, None))
    with pytest.warns(UserWarning, match="2 of 2 reviews have no scores"):
        records = judge_pair(_items(["x"], ["y"]), judge, "A", "B")
    assert records[0]["outcome"] == TIE
    table = summarize(records, n_resamples=50)
    assert table[-1]["unparsed"] == 2


def test_a_non_finite_score_is_an_unscored_review_not_a_silent_tie():
    judge = _StubJudge(lambda x, y: (float("nan"), 1.0))
    with pytest.warns(UserWarning, match="2 of 2 reviews have no scores"):
        records = judge_pair(_items(["x"], ["y"]), judge, "A", "B")
    assert records[0]["outcome"] == TIE and summarize(records, n_resamples=50)[-1]["unparsed"] == 2


def test_the_table_s_interval_is_the_paired_comparison_s_for_the_same_outcomes():
    # The study report gives MIWV against the full pool twice: as a table row and as a paired difference (minus 1).
    judge = _StubJudge(lambda x, y: (len(x), len(y)))
    rng = random.Random(1)
    records = []
    for name in ("vicuna", "koala"):  # records in neither dataset nor id order
        answers = [("x" * rng.randint(1, 3), "x" * rng.randint(1, 3)) for _ in range(15)]
        records += judge_pair(_items(*zip(*answers), dataset=name), judge, "A", "B")[::-1]
    everything = summarize(records, n_resamples=300)[-1]
    mine = outcome_values(records)[("stub", "A")]
    paired = paired_difference(mine, dict.fromkeys(mine, 0.0), n_resamples=300)
    assert everything["ci_low"] - 1 == pytest.approx(paired["ci_low"], abs=1e-12)
    assert everything["ci_high"] - 1 == pytest.approx(paired["ci_high"], abs=1e-12)


def test_summarize_rows_per_set_and_all():
    judge = _StubJudge(lambda x, y: (len(x), len(y)))
    records = (judge_pair(_items(["aaa", "a", "aa"], ["a", "aaa", "aa"], "koala"), judge, "A", "B")
               + judge_pair(_items(["aaaa"], ["a"], "vicuna"), judge, "A", "B"))
    rows = summarize(records, datasets=["vicuna", "koala"], n_resamples=100)
    assert [r["test_set"] for r in rows] == ["vicuna", "koala", ALL]
    koala, everything = rows[1], rows[2]
    assert (koala["wins"], koala["ties"], koala["losses"], koala["n"]) == (1, 1, 1, 3)
    assert koala["winning_score"] == 1.0
    assert (everything["wins"], everything["losses"], everything["n"]) == (2, 1, 4)
    assert everything["winning_score"] == pytest.approx(1.25)


def test_table_and_figure_files(tmp_path):
    judge = _StubJudge(lambda x, y: (len(x), len(y)))
    rng = random.Random(0)
    answers = [("x" * rng.randint(1, 5), "x" * rng.randint(1, 5)) for _ in range(12)]
    records = []
    for name in ("vicuna", "lima"):
        records += judge_pair(_items(*zip(*answers), dataset=name), judge, "miwv", "full")
    rows = summarize(records, n_resamples=100)
    csv_path, md_path = write_table(rows, tmp_path / "table")
    header = csv_path.read_text().splitlines()[0].split(",")
    assert header[:4] == ["judge", "model_a", "model_b", "test_set"] and "winning_score" in header
    assert "| **All** |" in md_path.read_text() and md_path.read_text() == table_markdown(rows)
    png = plot_outcomes(rows, tmp_path / "fig.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _generation(model, dataset, i, output, reference):
    return {"id": str(i), "dataset": dataset, "instruction": f"Question {i}", "input": "", "output": output,
            "generator": model, "reference": reference}


def test_compare_generations_with_rouge(tmp_path):
    refs = ["the cat sat on the mat", "paris is the capital of france", "water boils at one hundred degrees"]
    generations = {
        "good": [_generation("good", "sinstruct", i, r, r) for i, r in enumerate(refs)],
        "full": [_generation("full", "sinstruct", i, "bananas are yellow fruit", r) for i, r in enumerate(refs)],
    }
    generations["full"].append(_generation("full", "vicuna", 9, "x", None))  # no reference: skipped
    generations["good"].append(_generation("good", "vicuna", 9, "y", None))
    result = compare_generations(generations, "full", [RougeJudge()], tmp_path, n_resamples=100)
    assert [(r["test_set"], r["wins"], r["n"]) for r in result.table] == [("sinstruct", 3, 3), (ALL, 3, 3)]
    assert result.table[0]["winning_score"] == 2.0 and result.table[0]["judge"] == "rougeL-f1"
    assert {p.name for p in result.paths.values()} == {"judgements.jsonl", "table.csv", "table.md",
                                                       "win_tie_loss.png"}
    assert len(result.dataframe()) == 2


def test_run_comparison_end_to_end_on_tiny_model(tmp_path, tiny_model_dir, shared_data_dir):
    from miwv_lib import load_instructions
    from miwv_lib.experiments.generate import GenerateConfig
    from miwv_lib.runtime.io import write_jsonl
    from miwv_lib.experiments.train import TrainConfig

    from conftest import make_rows

    (tmp_path / "pool.json").write_text(json.dumps(make_rows(8)))
    pool = load_instructions(str(tmp_path / "pool.json"))
    write_jsonl(tmp_path / "scores.jsonl", [{"index": i, "id": r["id"], "miwv": float(i)} for i, r in enumerate(pool.rows)])
    train = TrainConfig(model=str(tiny_model_dir), dtype="float32", bf16=False, max_steps=1, batch_size=4,
                        gradient_accumulation_steps=1, progress=False)
    kwargs = dict(ratio=0.5, train_config=train, generate_config=GenerateConfig(max_new_tokens=3, progress=False),
                  test_sets=("sinstruct", "vicuna"), sample=2, data_dir=shared_data_dir,
                  judges=("reference-nll", "rougeL"), n_resamples=50)
    with pytest.raises(SelectionError, match="ratio: expected a number < 1"):  # the full pool against itself
        run_comparison(tmp_path, pool, **{**kwargs, "ratio": 1.0})
    with pytest.warns(UserWarning, match="vicuna: no reference answers"):  # answered, exported, not judged: said
        result = run_comparison(tmp_path, pool, **kwargs)
    assert set(result.models) == {"miwv_50pct", "random_50pct", "full"}
    assert {r["judge"] for r in result.table} == {"reference-nll", "rougeL-f1"}
    assert {(r["model_a"], r["model_b"]) for r in result.table} == {("miwv_50pct", "full"), ("random_50pct", "full")}
    assert {r["test_set"] for r in result.table} == {"sinstruct", ALL}  # vicuna has no reference answers
    outputs = json.loads((tmp_path / "generations" / "full" / "vicuna.model_outputs.json").read_text())
    assert len(outputs) == 2 and set(outputs[0]) == {"instruction", "output", "generator", "dataset"}
    assert (tmp_path / "evaluation" / "table.md").exists() and (tmp_path / "evaluation" / "win_tie_loss.png").exists()

    again = run_comparison(tmp_path, pool, **kwargs)  # everything cached: same table, nothing retrained
    assert all(m.skipped for m in again.models.values())
    assert again.table == result.table


@pytest.mark.slow
def test_run_comparison_with_gemma_end_to_end(tmp_path, shared_data_dir):
    """The real default model: score 8 Alpaca rows, train three LoRA models for 1 step, judge 2 prompts per set."""
    from miwv_lib import ScoreConfig, load_instructions, score_pool
    from miwv_lib.experiments.generate import GenerateConfig
    from miwv_lib.experiments.train import TrainConfig

    pool = load_instructions("alpaca", data_dir=shared_data_dir, limit=8)
    score_pool(pool, tmp_path, ScoreConfig(max_length=256, progress=False))
    train = TrainConfig(max_length=256, max_steps=1, batch_size=2, gradient_accumulation_steps=1, warmup_ratio=0.0,
                        learning_rate=1e-3, progress=False)  # no warm-up: the one step really changes the adapter
    result = run_comparison(tmp_path, pool, ratio=0.25, train_config=train,
                            generate_config=GenerateConfig(max_new_tokens=8, progress=False),
                            test_sets=("sinstruct", "alpaca_eval_gpt4"), sample=2, data_dir=shared_data_dir,
                            n_resamples=100)
    assert {r["judge"] for r in result.table} == {"reference-nll", "embedding-cosine:all-MiniLM-L6-v2", "rougeL-f1"}
    everything = [r for r in result.table if r["test_set"] == ALL]
    assert len(everything) == 6 and all(r["n"] == 4 for r in everything)
    assert all(0.0 <= r["winning_score"] <= 2.0 for r in everything)
    outputs = [json.loads(line) for line in (tmp_path / "generations" / "miwv_25pct" / "sinstruct.jsonl").open()]
    assert all(isinstance(o["output"], str) and o["reference"] for o in outputs)
    losses = [json.loads((tmp_path / "models" / n / "manifest.json").read_text())["train_loss"] for n in result.models]
    assert all(math.isfinite(x) for x in losses)
    nll = {n: json.loads((tmp_path / "generations" / n / "sinstruct.reference_nll.json").read_text())["reference_nll"]
           for n in result.models}
    assert nll["miwv_25pct"] != nll["full"]  # different data, different models


def test_test_sets_are_named_by_label_so_their_files_stay_in_the_run_directory(tmp_path, shared_data_dir):
    """A test set given by an absolute path once named its generation files by that path, so they were written
    beside the test file, each model over the last one's."""
    from miwv_lib.data.datasets import DataError
    from miwv_lib.experiments.evaluate import load_test_pools

    rows = [{"id": "a", "instruction": "Name a colour.", "output": ""},
            {"id": "b", "instruction": "Name a fruit.", "output": ""}]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pools = load_test_pools([str(tmp_path / "mine.jsonl"), "sinstruct"], sample=1, data_dir=shared_data_dir)
    assert list(pools) == ["mine", "sinstruct"] and len(pools["mine"]) == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match="two test sets are both named 'mine'"):
        load_test_pools([str(tmp_path / "mine.jsonl"), str(tmp_path / "other" / "mine.json")])


def test_a_test_set_whose_prompts_share_an_id_is_refused(tmp_path):
    """Answers are paired by (test set, id): every prompt would meet the other model's answer to the last one."""
    from miwv_lib.data.datasets import DataError, load_test_set

    rows = [{"id": "q", "instruction": f"Question {i}?", "output": ""} for i in range(3)]
    (tmp_path / "dup.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"row 1, field 'id': id 'q' is also row 0's, a different prompt"):
        load_test_set(str(tmp_path / "dup.jsonl"))
    rows[1]["instruction"] = rows[0]["instruction"]  # the same prompt twice: the same answer either way
    (tmp_path / "same.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    assert len(load_test_set(str(tmp_path / "same.jsonl"))) == 2


def test_reference_nlls_follow_edits_of_the_test_files_prompts_and_references(tmp_path, tiny):
    """Cached reference NLLs were once reused after a prompt was edited (their key left the prompts out), and cached
    answers kept the references they were generated beside: both judged against a test file that is no more."""
    from miwv_lib.experiments.evaluate import generate_for_model, load_test_pools
    from miwv_lib.experiments.generate import GenerateConfig

    rows = [{"id": f"q{i}", "instruction": f"Question {i}?", "output": f"Reference answer {i}.", "generator": "gpt4",
             "dataset": "mine"} for i in range(2)]

    def judged(out: str) -> list[tuple]:
        (tmp_path / "mine.json").write_text(json.dumps(rows))
        records = generate_for_model(tiny, "m", load_test_pools([str(tmp_path / "mine.json")]), tmp_path / out,
                                     GenerateConfig(max_new_tokens=2, progress=False), nll_max_length=64)
        return [(r["instruction"], r["reference"], round(r["reference_nll"], 6)) for r in records]

    judged("cached")
    rows[0]["instruction"] = "Which planet of the solar system is the largest, and by how much?"
    assert judged("cached") == judged("fresh_prompt")
    rows[1]["output"] = "A corrected, much longer reference answer to the second question."
    assert judged("cached") == judged("fresh_reference")


def test_a_winning_score_is_rounded_once_in_its_table():
    """54 wins and 353 losses of 452 prompts: 0.33850 (0.338 to 3 places), which rounded to 4 places first, as the
    table once stored it, printed as 0.339."""
    outcomes = [WIN] * 54 + [LOSS] * 353 + [TIE] * 45
    records = [{"judge": "j", "model_a": "a", "model_b": "b", "dataset": "s", "id": str(i), "outcome": o,
                "unparsed": False} for i, o in enumerate(outcomes)]
    row = summarize(records, n_resamples=10)[-1]
    assert row["winning_score"] == 1 + (54 - 353) / 452
    assert "| 0.338 |" in table_markdown([row]) and "0.339" not in table_markdown([row])


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_evaluate_command_finds_repository_files_from_any_directory(tmp_path, tiny_model_dir):
    """README: a relative data file is read from the current directory, else from the repository; ``--data`` and
    ``--test-sets`` alike (``--test-sets`` was read from the current directory only)."""
    import os
    import subprocess
    import sys

    from miwv_lib import load_instructions
    from miwv_lib.experiments.pipeline import repo_root
    from miwv_lib.runtime.io import write_jsonl

    pool = load_instructions(str(repo_root() / "data" / "examples" / "smoke_pool.json"))
    write_jsonl(tmp_path / "run" / "scores.jsonl",
                [{"index": i, "id": r["id"], "miwv": float(i)} for i, r in enumerate(pool.rows)])
    env = {**{k: v for k, v in os.environ.items() if k != "MIWV_DATA_DIR"}, "OMP_NUM_THREADS": "1",
           "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "miwv_lib", "evaluate", "--data", "data/examples/smoke_pool.json",
                           "--run-dir", "run", "--model", str(tiny_model_dir), "--dtype", "float32", "--max-steps",
                           "1", "--batch-size", "4", "--ratio", "0.1", "--methods", "miwv", "--test-sets",
                           "data/examples/smoke_test_prompts.jsonl", "--sample", "2", "--max-new-tokens", "3",
                           "--judge", "rougeL"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    table = (tmp_path / "run" / "evaluation" / "table.csv").read_text(encoding="utf-8")
    assert "smoke_test_prompts" in table and "miwv_10pct" in table
