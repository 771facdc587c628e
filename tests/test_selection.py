"""Step 4: top floor(r·N) by MIWV, the baselines, and export in the input's schema."""

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from miwv_lib.data.datasets import load_instructions
from miwv_lib.method.selection import SelectionError, select_indices, subset_size
from miwv_lib.experiments.report import ranked_examples
from miwv_lib.experiments.select import check_scores_match, export_subset


def _scores(values, ids=None):
    return [{"index": i, "id": (ids or [f"id{i:03d}" for i in range(len(values))])[i], "miwv": v, "ifd": None if v is None else v / 10,
             "response_tokens": i} for i, v in enumerate(values)]


def test_subset_size_is_floor_of_ratio_times_n():
    assert subset_size(100, 0.01) == 1
    assert subset_size(100, 0.29) == 29  # 0.29 * 100 = 28.999... in floating point
    assert subset_size(4110, 0.05) == 205
    assert subset_size(10, 1.0) == 10


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan")])
def test_ratio_outside_unit_interval_is_refused(ratio):
    with pytest.raises(SelectionError, match="ratio"):
        subset_size(10, ratio)


def test_ratio_selecting_zero_rows_is_refused():
    with pytest.raises(SelectionError, match="zero rows"):
        subset_size(50, 0.01)


def test_top_miwv_descending_with_ties_by_id():
    scores = _scores([0.1, 0.5, 0.5, -0.2, 0.3], ids=["e", "d", "c", "b", "a"])
    assert select_indices(scores, 0.6, "miwv") == [2, 1, 4]  # 0.5 (id c), 0.5 (id d), 0.3
    assert select_indices(scores, 0.4, "low-miwv") == [3, 0]
    assert select_indices(scores, 0.2, "ifd") == [2]
    assert select_indices(scores, 0.4, "length") == [4, 3]


def test_ifd_keeps_cherry_llms_rule_no_row_above_1():
    """Cherry LLM drops IFD > 1 (the instruction made the response harder to predict) before taking the highest;
    ranking them first used to give the IFD baseline exactly the rows Cherry throws away."""
    scores = _scores([0.0] * 5)
    for s, value in zip(scores, [1.4, 0.9, 1.0, 0.3, 1.01]):
        s["ifd"] = value
    assert select_indices(scores, 0.4, "ifd") == [2, 1]  # 1.0 is kept, 1.4 and 1.01 are not
    assert select_indices(scores, 0.6, "ifd") == [2, 1, 3]
    with pytest.raises(SelectionError, match=r"only 3 rows have a finite 'ifd' ≤ 1 \(Cherry LLM's rule\)"):
        select_indices(scores, 0.8, "ifd")


def test_rows_without_a_score_are_never_selected():
    scores = _scores([None, 0.2, math.nan, 0.1])
    assert select_indices(scores, 0.5, "miwv") == [1, 3]
    with pytest.raises(SelectionError, match="finite"):
        select_indices(scores, 0.75, "miwv")


def test_random_baseline_is_seeded():
    scores = _scores(list(range(100)))
    first = select_indices(scores, 0.1, "random", seed=3)
    assert first == select_indices(scores, 0.1, "random", seed=3)
    assert first != select_indices(scores, 0.1, "random", seed=4)
    assert len(set(first)) == 10


@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=60), st.floats(0.01, 1.0))
def test_selection_is_the_top_of_the_sorted_scores(values, ratio):
    scores = _scores(values)
    size = math.floor(ratio * len(values) + 1e-9)
    if size == 0:
        with pytest.raises(SelectionError):
            select_indices(scores, ratio)
        return
    chosen = select_indices(scores, ratio)
    assert len(chosen) == len(set(chosen)) == size
    threshold = min(values[i] for i in chosen)
    assert all(v <= threshold for i, v in enumerate(values) if i not in chosen)


def test_export_keeps_input_schema_and_attaches_scores(tmp_path):
    src = tmp_path / "pool.json"
    records = [{"instruction": f"q{i}", "input": "", "output": f"a{i}", "extra": i} for i in range(5)]
    src.write_text(json.dumps(records))
    pool = load_instructions(src)
    scores = _scores([0.1, 0.9, 0.3, 0.2, 0.5], ids=pool.ids)
    out = export_subset(pool, scores, select_indices(scores, 0.4), tmp_path / "subset.json")
    exported = json.loads(out.read_text())
    assert [r["instruction"] for r in exported] == ["q1", "q4"]
    assert exported[0]["extra"] == 1 and exported[0]["miwv_selection"]["miwv"] == 0.9
    reloaded = load_instructions(out)  # a subset is itself a valid pool with the same ids
    assert reloaded.ids == [pool.ids[1], pool.ids[4]]
    jsonl = export_subset(pool, scores, [0], tmp_path / "subset.jsonl")
    assert len(jsonl.read_text().splitlines()) == 1


def test_scores_of_another_dataset_are_refused(tmp_path):
    src = tmp_path / "pool.json"
    src.write_text(json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]))
    pool = load_instructions(src)
    check_scores_match(pool, _scores([0, 0, 0], ids=pool.ids))
    with pytest.raises(SelectionError, match="3"):
        check_scores_match(pool, _scores([0, 0]))
    with pytest.raises(SelectionError, match="row 0, field 'id'"):
        check_scores_match(pool, _scores([0, 0, 0]))


@given(st.lists(st.one_of(st.sampled_from([-1.0, 0.0, 0.5, 2.0]), st.none(), st.just(math.nan)), min_size=2,
                max_size=40),
       st.lists(st.sampled_from(["a", "b", "c"]), min_size=40, max_size=40))
def test_the_report_s_top_rows_are_the_selection_s_first_rows(values, ids):
    """Ties (repeated values, repeated ids), rows without a score: the report's top-rows table and the MIWV selection
    rank by one rule, so its rows are the subset's first rows, in the subset's order."""
    scores = [{**s, "neighbor_index": (i + 1) % len(values), "neighbor_similarity": 0.5}
              for i, s in enumerate(_scores(values, ids[:len(values)]))]
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(len(values))]
    finite = sum(v is not None and math.isfinite(v) for v in values)
    if finite == 0:
        assert ranked_examples(rows, scores, 5) == []
        return
    for highest, by in ((True, "miwv"), (False, "low-miwv")):
        shown = [e["index"] for e in ranked_examples(rows, scores, 5, highest=highest)]
        assert shown == select_indices(scores, finite / len(values), by=by)[:5]
