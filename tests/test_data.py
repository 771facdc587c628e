"""Tests for miwv_lib.data.datasets: schemas, validation errors, resolution order, hub cache, real data."""

from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from miwv_lib.data import datasets as D
from miwv_lib.data.datasets import DataError, DataWarning, InstructionPool, load_instructions, load_test_set

ALPACA_ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    # Tests must not see the developer's data mirror or write into the repo's cache.
    monkeypatch.delenv(D.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv(D.CACHE_DIR_ENV, str(tmp_path / "hub-cache"))


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def expect_error(source, *fragments: str, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        load_instructions(source, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return info.value


def sha16(*parts: str) -> str:
    blob = json.dumps(list(parts), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- bad input


def test_error_message_format_names_file_row_and_field(tmp_path):
    rows = [dict(r) for r in ALPACA_ROWS * 6]
    rows[17]["output"] = 42
    path = write_json(tmp_path / "alpaca.json", rows)
    err = expect_error(path)
    assert str(err) == f"{path}, row 17, field 'output': expected a string, got int (42)"
    assert (err.source, err.row, err.field) == (str(path), 17, "output")
    assert isinstance(err, ValueError)


def test_not_json_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": oops}\n]', encoding="utf-8")
    expect_error(path, "broken.json", "not valid JSON", "line 3", "column")


def test_json_lines_saved_as_json_gets_a_hint(tmp_path):
    path = write_jsonl(tmp_path / "rows.json", ALPACA_ROWS)
    expect_error(path, "rows.json", "JSON Lines", ".jsonl")


def test_json_object_instead_of_list(tmp_path):
    path = write_json(tmp_path / "wrapped.json", {"data": ALPACA_ROWS, "version": 1})
    expect_error(path, "wrapped.json", "expected a JSON list of records, got an object with keys ['data', 'version']")


def test_json_scalar_instead_of_list(tmp_path):
    path = write_json(tmp_path / "scalar.json", 3)
    expect_error(path, "scalar.json", "expected a JSON list of records, got int")


def test_jsonl_corrupt_line_names_row_and_line(tmp_path):
    path = tmp_path / "pool.jsonl"
    lines = [json.dumps(r) for r in ALPACA_ROWS]
    lines.insert(2, '{"instruction": "half a record",')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    err = expect_error(path, "pool.jsonl", "row 2 (line 3)", "not valid JSON")
    assert err.row == 2 and err.line == 3


def test_a_key_given_twice_is_an_error_not_its_last_value(tmp_path):
    first = json.dumps(ALPACA_ROWS[0])
    path = tmp_path / "twice.json"
    path.write_text(f'[{first}, {{"instruction": "a", "output": "kept?", "output": "or this?"}}]', encoding="utf-8")
    err = expect_error(path, "twice.json, row 1, field 'output'", "given twice")
    assert (err.row, err.field) == (1, "output")
    nested = tmp_path / "chat.jsonl"
    turns = '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", "content": "b"}]'
    nested.write_text(f'{{"messages": {turns}}}\n', encoding="utf-8")
    expect_error(nested, "chat.jsonl, row 0 (line 1), field 'messages[1].content'", "given twice")
    write_json(same := tmp_path / "same.json", ALPACA_ROWS)  # a key repeated across records is fine
    assert len(load_instructions(same)) == 3


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_non_utf8_bytes_name_the_byte_offset(tmp_path, suffix):
    good = json.dumps(ALPACA_ROWS[0]).encode()
    if suffix == ".json":
        blob = b"[" + good + b', {"instruction": "caf\xe9", "output": "x"}]'
    else:
        blob = good + b'\n{"instruction": "caf\xe9", "output": "x"}\n'
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(blob)
    offset = blob.index(b"\xe9")
    err = expect_error(path, f"latin1{suffix}", "not valid UTF-8", f"byte offset {offset}")
    if suffix == ".jsonl":
        assert err.row == 1 and err.line == 2


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    # json.dumps(ensure_ascii=False) leaves U+2028/U+0085 raw; they must not split records.
    rows = [{"instruction": "a\u2028b\x85c", "input": "", "output": "d\u2029e"}]
    pool = load_instructions(write_jsonl(tmp_path / "sep.jsonl", rows))
    assert pool.rows[0]["instruction"] == "a\u2028b\x85c" and pool.rows[0]["output"] == "d\u2029e"


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ALPACA_ROWS).encode())
    assert len(load_instructions(path)) == 3


@pytest.mark.parametrize("bad_row", [["a", "list"], "a string", 7, None])
def test_row_that_is_not_an_object(tmp_path, bad_row):
    path = write_json(tmp_path / "rows.json", [ALPACA_ROWS[0], ALPACA_ROWS[1], bad_row])
    err = expect_error(path, "rows.json", "row 2", "expected a JSON object")
    assert err.row == 2


def test_first_row_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [[1, 2], ALPACA_ROWS[0]])
    expect_error(path, "rows.jsonl", "row 0", "expected a JSON object")


def test_missing_required_field(tmp_path):
    rows = [dict(r) for r in ALPACA_ROWS]
    del rows[1]["output"]
    err = expect_error(write_json(tmp_path / "m.json", rows), "m.json", "row 1", "field 'output'", "missing")
    assert err.field == "output"


@pytest.mark.parametrize(
    ("value", "described"),
    [(42, "int (42)"), (None, "null"), (["nested"], "list"), ({"a": 1}, "dict"), (1.5, "float (1.5)"), (True, "bool")],
)
@pytest.mark.parametrize("field", ["instruction", "input", "output"])
def test_non_string_field(tmp_path, value, described, field):
    rows = [dict(r) for r in ALPACA_ROWS]
    rows[2][field] = value
    expect_error(
        write_json(tmp_path / "t.json", rows), "t.json", "row 2", f"field '{field}'", f"expected a string, got {described}"
    )


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_blank_instruction(tmp_path, text):
    rows = [dict(r) for r in ALPACA_ROWS]
    rows[1]["instruction"] = text
    expect_error(write_json(tmp_path / "b.json", rows), "b.json", "row 1", "field 'instruction'", "empty")
    # Even prompt-only loads need an instruction.
    expect_error(tmp_path / "b.json", "row 1", "field 'instruction'", require_output=False)


@pytest.mark.parametrize("text", ["", "  \n"])
def test_blank_output_only_allowed_without_require_output(tmp_path, text):
    rows = [dict(r) for r in ALPACA_ROWS]
    rows[0]["output"] = text
    path = write_json(tmp_path / "o.json", rows)
    expect_error(path, "o.json", "row 0", "field 'output'", "empty")
    pool = load_instructions(path, require_output=False)
    assert pool.rows[0]["output"] == text  # kept exactly, not stripped


def test_unknown_schema_lists_keys_and_accepted_schemas(tmp_path):
    path = write_json(tmp_path / "odd.json", [{"question": "q", "answer": "a"}])
    err = expect_error(path, "odd.json", "row 0", "unknown schema", "['answer', 'question']")
    for schema in D.SCHEMAS:
        assert schema in str(err)


@pytest.mark.parametrize(("name", "content"), [("e.json", ""), ("e.json", "[]"), ("e.jsonl", ""), ("e.jsonl", "\n \n")])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    expect_error(path, name, "0 rows")


@pytest.mark.parametrize("source", ["missing.json", "nope/pool.jsonl", "a/b/c", "./x.parquet"])
def test_file_not_found(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    expect_error(source, source, "file not found")


def test_missing_path_object_is_file_not_found(tmp_path):
    expect_error(tmp_path / "absent.jsonl", "absent.jsonl", "file not found")


def test_directory_and_unsupported_suffix(tmp_path):
    expect_error(str(tmp_path), "is a directory")
    csv = tmp_path / "pool.csv"
    csv.write_text("instruction,output\na,b\n", encoding="utf-8")
    expect_error(csv, "pool.csv", "unsupported file type")


def test_unknown_name_lists_registry():
    err = expect_error("no_such_dataset", "no_such_dataset", "unknown dataset", "alpaca")
    assert err.source == "no_such_dataset"


@pytest.mark.parametrize("bad_id", [3.5, ["x"], True, ""])
def test_bad_id_field(tmp_path, bad_id):
    rows = [dict(r) for r in ALPACA_ROWS]
    rows[1]["id"] = bad_id
    expect_error(write_json(tmp_path / "ids.json", rows), "ids.json", "row 1", "field 'id'")


@pytest.mark.parametrize("limit", [0, -1, 1.5, "3", True])
def test_bad_limit(tmp_path, limit):
    path = write_json(tmp_path / "p.json", ALPACA_ROWS)
    expect_error(path, "limit", limit=limit)


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"definitely not parquet")
    expect_error(path, "bad.parquet", "parquet")


def test_a_parquet_struct_with_two_fields_of_one_name_is_an_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    twice = pa.StructArray.from_arrays([pa.array([1, 2]), pa.array([3, 4])], names=["a", "a"])
    pq.write_table(pa.table({"instruction": ["i", "j"], "output": ["o", "p"], "extra": twice}), tmp_path / "two.parquet")
    expect_error(tmp_path / "two.parquet", "two.parquet", "cannot be read as records", "duplicate field names")


# --------------------------------------------------------------------------- schemas


SCHEMA_CASES = [
    # (record, schema, expected (instruction, input, output), expected reference)
    ({"instruction": "I", "input": "X", "output": "O"}, "alpaca", ("I", "X", "O"), None),
    ({"instruction": "I", "output": "O", "text": "extra column"}, "alpaca", ("I", "", "O"), None),
    ({"prompt": "P", "response": "R"}, "prompt_response", ("P", "", "R"), None),
    ({"prompt": "P", "completion": "C"}, "prompt_completion", ("P", "", "C"), None),
    (
        {"messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]},
        "messages",
        ("U", "", "A"),
        None,
    ),
    (
        {"conversations": [{"from": "human", "value": "H"}, {"from": "gpt", "value": "G"}]},
        "sharegpt",
        ("H", "", "G"),
        None,
    ),
]

TEST_SCHEMA_CASES = [
    ({"question_id": 7, "text": "T", "category": "generic"}, "vicuna", ("T", "", ""), None, "7"),
    ({"id": "koala_3", "prompt": "P"}, "koala", ("P", "", ""), None, "koala_3"),
    ({"idx": 12, "Skill": "Math", "Difficulty": 3, "Instruction": "W"}, "wizardlm", ("W", "", ""), None, "12"),
    (
        {"id": "user_oriented_task_1", "motivation_app": "x", "instruction": "S", "instances": [{"input": "SI", "output": "REF"}]},
        "sinstruct",
        ("S", "SI", ""),
        "REF",
        "user_oriented_task_1",
    ),
    ({"conversations": "L"}, "lima", ("L", "", ""), None, None),
    ({"dataset": "helpful_base", "instruction": "E", "output": "BASE", "generator": "gpt4"}, "alpaca_eval", ("E", "", ""), "BASE", None),
]


@pytest.mark.parametrize(("record", "schema", "expected", "reference"), SCHEMA_CASES)
def test_training_schemas_normalise(tmp_path, record, schema, expected, reference):
    pool = load_instructions(write_json(tmp_path / "s.json", [record]))
    assert pool.schema == schema
    row = pool.rows[0]
    assert set(row) == {"id", "instruction", "input", "output"}
    assert (row["instruction"], row["input"], row["output"]) == expected
    assert row["id"] == sha16(*expected)
    assert pool.references == [reference]
    assert pool.records == [record]


@pytest.mark.parametrize(("record", "schema", "expected", "reference", "own_id"), TEST_SCHEMA_CASES)
def test_test_set_schemas_normalise(tmp_path, record, schema, expected, reference, own_id):
    path = write_jsonl(tmp_path / "t.jsonl", [record])
    pool = load_instructions(path, require_output=False)
    assert pool.schema == schema
    row = pool.rows[0]
    assert (row["instruction"], row["input"], row["output"]) == expected
    assert row["id"] == (own_id if own_id is not None else sha16(*expected))
    assert pool.references == [reference]
    # Test sets have no training responses: asking for them is an error, not silent "".
    expect_error(path, "test set", "load_test_set")


def test_lima_string_vs_sharegpt_list_detection():
    assert D.detect_schema({"conversations": "text"}) == "lima"
    assert D.detect_schema({"conversations": [{"from": "human", "value": "x"}]}) == "sharegpt"
    assert D.detect_schema({"question": 1}) is None


def test_multi_turn_conversations_use_first_exchange_and_warn_once(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be nice."},
                {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "Q2"},
                {"role": "assistant", "content": "A2"},
            ]
        },
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
        {"messages": [{"role": "user", "content": "Qa"}, {"role": "user", "content": "Qb"}, {"role": "assistant", "content": "Ab"}]},
    ]
    with pytest.warns(DataWarning) as record:
        pool = load_instructions(write_json(tmp_path / "chat.json", rows))
    turn_warnings = [w for w in record if "first user turn" in str(w.message)]
    assert len(turn_warnings) == 1
    assert "2 of 3 rows had more" in str(turn_warnings[0].message)
    assert [(r["instruction"], r["output"]) for r in pool.rows] == [("Q1", "A1"), ("Q", "A"), ("Qa", "Ab")]


def test_single_turn_conversations_do_not_warn(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "H"}, {"from": "gpt", "value": "G"}]}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_instructions(write_json(tmp_path / "c.json", rows))


def test_conversation_errors(tmp_path):
    no_reply = [{"messages": [{"role": "user", "content": "Q"}]}]
    path = write_json(tmp_path / "noreply.json", no_reply)
    expect_error(path, "noreply.json", "row 0", "field 'messages'", "no assistant turn")
    assert load_instructions(path, require_output=False).rows[0]["output"] == ""
    no_user = [{"conversations": [{"from": "gpt", "value": "G"}]}]
    expect_error(write_json(tmp_path / "nouser.json", no_user), "row 0", "field 'conversations'", "no user turn")
    bad_content = [{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "A"}]}]
    expect_error(write_json(tmp_path / "bad.json", bad_content), "row 0", "field 'messages[0].content'", "int (5)")
    not_list = [{"messages": "hello"}]
    expect_error(write_json(tmp_path / "nl.json", not_list), "row 0", "field 'messages'", "list of turns")


def test_sinstruct_bad_instances(tmp_path):
    rows = [{"id": "a", "instruction": "S", "instances": []}]
    expect_error(write_json(tmp_path / "si.json", rows), "si.json", "row 0", "field 'instances'", require_output=False)
    rows = [{"id": "a", "instruction": "S", "instances": [{"input": None, "output": "o"}]}]
    expect_error(write_json(tmp_path / "si.json", rows), "field 'instances[0].input'", "null", require_output=False)


def test_lima_row_with_list_is_rejected(tmp_path):
    rows = [{"conversations": "a prompt"}, {"conversations": ["a", "b"]}]
    expect_error(write_jsonl(tmp_path / "l.jsonl", rows), "l.jsonl", "row 1", "field 'conversations'", require_output=False)


def test_text_is_kept_exactly(tmp_path):
    rows = [{"instruction": "  leading and trailing  \n", "input": "\ttab", "output": " spaced \r\n"}]
    pool = load_instructions(write_json(tmp_path / "x.json", rows))
    assert pool.rows[0] == {"id": sha16(*rows[0].values()), **rows[0]}


def test_format_source_text_never_includes_output():
    assert D.format_source_text({"instruction": "Do X", "input": "", "output": "SECRET"}) == "Do X"
    assert D.format_source_text({"instruction": "Do X", "input": "on Y", "output": "SECRET"}) == "Do X\non Y"
    assert "SECRET" not in D.format_source_text({"instruction": "a", "input": "b", "output": "SECRET"})


# --------------------------------------------------------------------------- ids, duplicates, limit


def test_ids_are_stable_and_content_based(tmp_path):
    path = write_json(tmp_path / "p.json", ALPACA_ROWS)
    first, second = load_instructions(path), load_instructions(path)
    assert first.ids == second.ids
    assert first.content_hash == second.content_hash
    assert len(set(first.ids)) == 3
    changed = [dict(r) for r in ALPACA_ROWS]
    changed[0]["output"] = "Red."
    other = load_instructions(write_json(tmp_path / "q.json", changed))
    assert other.ids[0] != first.ids[0] and other.ids[1:] == first.ids[1:]
    assert other.content_hash != first.content_hash


def test_own_id_field_is_used_and_stringified(tmp_path):
    rows = [{**ALPACA_ROWS[0], "id": 5}, {**ALPACA_ROWS[1], "id": "abc"}, {**ALPACA_ROWS[2], "id": None}]
    pool = load_instructions(write_json(tmp_path / "p.json", rows))
    assert pool.ids == ["5", "abc", sha16(*ALPACA_ROWS[2].values())]


def test_duplicates_reported_not_dropped(tmp_path):
    rows = [ALPACA_ROWS[0], ALPACA_ROWS[1], ALPACA_ROWS[0], {**ALPACA_ROWS[1], "output": "five"}, ALPACA_ROWS[2]]
    with pytest.warns(DataWarning, match=r"2 \(instruction, input\) pairs occur more than once \(2 duplicate rows\)") as rec:
        pool = load_instructions(write_json(tmp_path / "d.json", rows))
    assert "[0, 2]" in str(rec[0].message) and "[1, 3]" in str(rec[0].message)
    assert len(pool) == 5
    assert pool.duplicate_groups == [[0, 2], [1, 3]]
    assert pool.ids[0] == pool.ids[2]  # exact duplicates share a content id
    assert pool.ids[1] != pool.ids[3]


def test_no_duplicates_no_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pool = load_instructions(write_json(tmp_path / "p.json", ALPACA_ROWS))
    assert pool.duplicate_groups == []


def test_limit_keeps_first_rows_and_skips_validation_past_it(tmp_path):
    rows = ALPACA_ROWS + [{"instruction": "", "output": "bad row past the limit"}]
    pool = load_instructions(write_json(tmp_path / "p.json", rows), limit=2)
    assert [r["instruction"] for r in pool.rows] == [r["instruction"] for r in ALPACA_ROWS[:2]]
    assert pool.records == ALPACA_ROWS[:2]
    assert len(load_instructions(tmp_path / "p.json", limit=3)) == 3
    expect_error(tmp_path / "p.json", "row 3", limit=10)
    huge = 10**20  # past sys.maxsize, which itertools.islice refused with a traceback
    assert len(load_instructions(write_json(tmp_path / "q.json", ALPACA_ROWS), limit=huge)) == len(ALPACA_ROWS)


def test_pool_subset_and_lengths(tmp_path):
    pool = load_instructions(write_json(tmp_path / "p.json", ALPACA_ROWS))
    sub = pool.subset([2, 0])
    assert sub.ids == [pool.ids[2], pool.ids[0]] and sub.records == [ALPACA_ROWS[2], ALPACA_ROWS[0]]
    with pytest.raises(ValueError):
        InstructionPool(rows=pool.rows, records=pool.records[:1], source="x", schema="alpaca", file_format="json")


# --------------------------------------------------------------------------- formats and concatenation


def test_list_of_files_concatenates(tmp_path):
    a = write_json(tmp_path / "a.json", ALPACA_ROWS[:2])
    b = write_jsonl(tmp_path / "b.jsonl", ALPACA_ROWS[2:])
    pool = load_instructions([a, str(b)])
    assert [r["instruction"] for r in pool.rows] == [r["instruction"] for r in ALPACA_ROWS]
    assert pool.source == f"{a} + {b}"
    assert pool.file_format == "json+jsonl"
    assert pool.records == ALPACA_ROWS
    assert len(load_instructions([a, b], limit=3)) == 3


def test_list_of_files_errors_name_the_right_file(tmp_path):
    a = write_json(tmp_path / "a.json", ALPACA_ROWS)
    b = write_json(tmp_path / "b.json", [ALPACA_ROWS[0], {"instruction": "x", "output": 3}])
    err = expect_error([a, b], "b.json", "row 1", "field 'output'")
    assert "a.json" not in str(err)
    chat = write_json(tmp_path / "c.json", [{"prompt": "p", "response": "r"}])
    expect_error([a, chat], "share one schema", "'alpaca'", "'prompt_response'")
    expect_error([a, tmp_path / "missing.json"], "missing.json", "file not found")
    expect_error([], "empty list")


def test_parquet_round_trip(tmp_path):
    import pandas as pd

    path = tmp_path / "pool.parquet"
    pd.DataFrame(ALPACA_ROWS).to_parquet(path, index=False)
    pool = load_instructions(path)
    assert pool.file_format == "parquet"
    assert pool.rows == load_instructions(write_json(tmp_path / "same.json", ALPACA_ROWS)).rows
    assert pool.records == ALPACA_ROWS


def test_parquet_null_is_an_error(tmp_path):
    import pandas as pd

    path = tmp_path / "nulls.parquet"
    pd.DataFrame([ALPACA_ROWS[0], {"instruction": "x", "input": None, "output": "y"}]).to_parquet(path, index=False)
    expect_error(path, "nulls.parquet", "row 1", "field 'input'", "null")


# --------------------------------------------------------------------------- registry and data dir


def make_mirror(root: Path) -> Path:
    write_json(root / "train" / "alpaca_cherry_3111.json", ALPACA_ROWS[:2])
    write_json(root / "train" / "alpaca_gpt4_999.json", ALPACA_ROWS[2:])
    write_jsonl(root / "eval" / "vicuna_test_set.jsonl", [{"question_id": i, "text": f"q{i}", "category": "c"} for i in range(1, 11)])
    return root


def test_registry_contents():
    registry = D.load_registry()
    keys = set(registry["alpaca"])
    for name, entry in registry.items():
        assert set(entry) == keys, name
        assert entry["kind"] in {"train", "test"}
        assert entry["schema"] in D.SCHEMAS
        assert entry["local_files"] or entry["hub_id"], name
    assert set(D.TEST_SETS) <= set(registry)
    assert registry["alpaca"]["hub_id"] == "tatsu-lab/alpaca" and registry["alpaca"]["local_rows"] == 4110
    assert registry["alpaca-cherry-3111"]["hub_id"] is None
    assert registry["alpaca-gpt4-999"]["hub_id"] == "vicgalle/alpaca-gpt4"
    assert D.DEFAULT_DATASET in registry
    registry["alpaca"]["hub_id"] = "mutated"
    assert D.load_registry()["alpaca"]["hub_id"] == "tatsu-lab/alpaca"


def test_resolve_data_dir(tmp_path, monkeypatch):
    assert D.resolve_data_dir() is None
    monkeypatch.setenv(D.DATA_DIR_ENV, str(tmp_path))
    assert D.resolve_data_dir() == tmp_path
    other = tmp_path / "other"
    other.mkdir()
    assert D.resolve_data_dir(other) == other  # explicit beats the environment
    with pytest.raises(DataError, match="does not exist"):
        D.resolve_data_dir(tmp_path / "nope")
    monkeypatch.setenv(D.DATA_DIR_ENV, str(tmp_path / "also-nope"))
    with pytest.raises(DataError, match=D.DATA_DIR_ENV):
        D.resolve_data_dir()


def test_registry_name_uses_local_mirror(tmp_path, monkeypatch):
    root = make_mirror(tmp_path / "mirror")
    monkeypatch.setattr("datasets.load_dataset", _hub_must_not_be_called)
    pool = load_instructions("alpaca", data_dir=root)
    assert len(pool) == 3 and pool.schema == "alpaca" and pool.file_format == "json"
    assert "alpaca_cherry_3111.json + " in pool.source
    assert len(load_instructions(None, data_dir=root)) == 3  # default dataset
    assert len(load_instructions("alpaca-gpt4-999", data_dir=root)) == 1
    monkeypatch.setenv(D.DATA_DIR_ENV, str(root))
    assert load_instructions("alpaca-cherry-3111").rows == load_instructions(root / "train" / "alpaca_cherry_3111.json").rows
    vicuna = load_test_set("vicuna")
    assert len(vicuna) == 10 and vicuna.ids[0] == "1"


def test_local_file_beats_registry_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_json(tmp_path / "alpaca", ALPACA_ROWS)  # an existing file literally named like a registry entry
    with pytest.raises(DataError, match="unsupported file type"):
        load_instructions("alpaca")


def test_registry_without_local_copy_or_hub_explains_where_to_get_it(tmp_path):
    expect_error("alpaca-cherry-3111", "alpaca-cherry-3111", "no local copy", D.DATA_DIR_ENV, "Cherry_LLM")
    expect_error("vicuna", "vicuna", "lacks", "eval/vicuna_test_set.jsonl", data_dir=tmp_path, require_output=False)


# --------------------------------------------------------------------------- hub


def _hub_must_not_be_called(*args, **kwargs):
    raise AssertionError(f"datasets.load_dataset called with {args} {kwargs}")


def _hub_unreachable(*args, **kwargs):
    raise ConnectionError("Couldn't reach the Hub")


def test_hub_unreachable_raises_helpful_error(tmp_path, monkeypatch):
    monkeypatch.setattr("datasets.load_dataset", _hub_unreachable)
    err = expect_error("someone/some-dataset", "someone/some-dataset", "unreachable", D.DATA_DIR_ENV, "local")
    assert err.row is None
    # A registry name whose mirror is absent falls back to the hub, and says why it had to.
    expect_error("alpaca", "tatsu-lab/alpaca", "unreachable", D.DATA_DIR_ENV, "no data directory set")
    partial = tmp_path / "partial"
    write_json(partial / "train" / "alpaca_cherry_3111.json", ALPACA_ROWS)
    expect_error("alpaca", "unreachable", "alpaca_gpt4_999.json", data_dir=partial)


def test_hub_download_is_cached_and_reused(tmp_path, monkeypatch):
    import datasets

    calls: list[tuple] = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list([{**r, "text": "x"} for r in ALPACA_ROWS])

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    cache_dir = tmp_path / "cache"
    first = load_instructions("owner/pool", cache_dir=cache_dir)
    cache_file = cache_dir / "owner__pool.jsonl"
    assert cache_file.is_file() and len(calls) == 1
    assert calls[0] == (("owner/pool",), {"split": "train"})
    assert first.file_format == "hub" and first.source == "owner/pool" and len(first) == 3
    stamp = cache_file.stat().st_mtime_ns

    monkeypatch.setattr("datasets.load_dataset", _hub_must_not_be_called)
    second = load_instructions("owner/pool", cache_dir=cache_dir, limit=2)
    assert second.rows == first.rows[:2] and second.file_format == "hub"
    assert cache_file.stat().st_mtime_ns == stamp
    assert first.records[0]["text"] == "x"  # original hub columns are kept for export


def test_hub_cache_defaults_to_env_dir(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr("datasets.load_dataset", lambda *a, **k: datasets.Dataset.from_list(ALPACA_ROWS))
    monkeypatch.setenv(D.CACHE_DIR_ENV, str(tmp_path / "envcache"))
    load_instructions("owner/other")
    assert (tmp_path / "envcache" / "owner__other.jsonl").is_file()
    assert (tmp_path / "envcache" / ".gitignore").read_text() == "*\n"


def test_registry_alpaca_eval_hub_reads_raw_json_file(tmp_path, monkeypatch):
    import datasets

    calls = []
    rows = [{"dataset": "d", "instruction": "E", "output": "REF", "generator": "gpt4"}]

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    pool = load_test_set("alpaca_eval_gpt4", cache_dir=tmp_path)
    assert calls == [(("json",), {"data_files": ["hf://datasets/tatsu-lab/alpaca_eval/alpaca_eval_gpt4_baseline.json"], "split": "train"})]
    assert pool.references == ["REF"] and pool.rows[0]["output"] == ""
    assert (tmp_path / "tatsu-lab__alpaca_eval__alpaca_eval_gpt4_baseline__eval.jsonl").is_file()


def test_hub_content_errors_are_reported_with_the_row(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(
        "datasets.load_dataset",
        lambda *a, **k: datasets.Dataset.from_list([ALPACA_ROWS[0], {**ALPACA_ROWS[1], "output": ""}]),
    )
    expect_error("owner/badrows", "owner/badrows", "row 1", "field 'output'", cache_dir=tmp_path)


# --------------------------------------------------------------------------- test sets


def test_load_test_set_sample_is_deterministic(tmp_path):
    root = make_mirror(tmp_path / "mirror")
    full = load_test_set("vicuna", data_dir=root)
    a = load_test_set("vicuna", data_dir=root, sample=4, seed=3)
    b = load_test_set("vicuna", data_dir=root, sample=4, seed=3)
    c = load_test_set("vicuna", data_dir=root, sample=4, seed=4)
    assert a.ids == b.ids and len(a) == 4
    assert a.ids != c.ids
    positions = [full.ids.index(i) for i in a.ids]
    assert positions == sorted(positions)  # original order kept
    assert a.records == [full.records[p] for p in positions]
    assert load_test_set("vicuna", data_dir=root, sample=100).ids == full.ids
    with pytest.raises(DataError, match="sample"):
        load_test_set("vicuna", data_dir=root, sample=0)


def test_a_test_set_of_prompts_needs_no_output_but_a_training_pool_does(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"id": "a", "instruction": "Say hi."},
                                                    {"id": "b", "instruction": "Say bye.", "input": "now"}])
    prompts = load_test_set(path)
    assert [(r["instruction"], r["input"], r["output"]) for r in prompts.rows] == [("Say hi.", "", ""),
                                                                                  ("Say bye.", "now", "")]
    expect_error(path, "prompts.jsonl, row 0 (line 1), field 'output': missing required field")


EXPECTED_ROWS = {
    "alpaca-cherry-3111": 3111,
    "alpaca-gpt4-999": 999,
    "alpaca": 4110,
    "vicuna": 80,
    "koala": 180,
    "wizardlm": 218,
    "sinstruct": 252,
    "lima": 300,
    "alpaca_eval_gpt4": 805,
    "alpaca_eval_davinci003": 805,
}


@pytest.mark.filterwarnings("ignore::miwv_lib.data.datasets.DataWarning")
@pytest.mark.parametrize(("name", "rows"), EXPECTED_ROWS.items())
def test_real_data_loads_with_documented_row_counts(shared_data_dir, name, rows):
    entry = D.REGISTRY[name]
    if entry["kind"] == "train":
        pool = load_instructions(name, data_dir=shared_data_dir)
        assert all(r["output"].strip() for r in pool.rows)
    else:
        pool = load_test_set(name, data_dir=shared_data_dir)
        assert all(r["output"] == "" for r in pool.rows)
    assert len(pool) == rows == entry["local_rows"]
    assert pool.schema == entry["schema"]
    assert all(r["instruction"].strip() for r in pool.rows)
    if name == "sinstruct":
        assert all(ref is not None for ref in pool.references)
        assert sum(1 for r in pool.rows if r["input"]) == 208
    if name.startswith("alpaca_eval"):
        assert len(set(pool.ids)) == 805


@pytest.mark.filterwarnings("ignore::miwv_lib.data.datasets.DataWarning")
def test_real_test_sets_total_1030_prompts(shared_data_dir):
    assert sum(len(load_test_set(n, data_dir=shared_data_dir)) for n in D.TEST_SETS) == 1030


# --------------------------------------------------------------------------- properties

_text = st.text(min_size=1, max_size=40).filter(lambda s: s.strip() != "")
_records = st.lists(
    st.fixed_dictionaries({"instruction": _text, "input": st.text(max_size=20), "output": _text}),
    min_size=1,
    max_size=8,
)


@settings(max_examples=40, deadline=None)
@given(records=_records)
def test_json_and_jsonl_round_trip_identically(records):
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # random lists may contain duplicates
        a = load_instructions(write_json(Path(tmp) / "p.json", records))
        b = load_instructions(write_jsonl(Path(tmp) / "p.jsonl", records))
    assert a.rows == b.rows
    assert a.records == b.records == records
    assert [(r["instruction"], r["input"], r["output"]) for r in a.rows] == [
        (r["instruction"], r["input"], r["output"]) for r in records
    ]


@settings(max_examples=60, deadline=None)
@given(instruction=_text, input_text=st.text(max_size=20), output=_text)
def test_ids_are_deterministic(instruction, input_text, output):
    expected = sha16(instruction, input_text, output)
    assert D.content_id(instruction, input_text, output) == expected
    assert D.content_id(instruction, input_text, output + "!") != expected


@pytest.mark.parametrize("column, values, accepted", [
    ("when", "timestamp", False), ("blob", "binary", False), ("price", "decimal", False),
    ("tags", "list of structs", True), ("kind", "categorical", True), ("score", "float with nulls", True),
])
def test_a_parquet_column_json_cannot_hold_is_refused_at_load_not_at_export(tmp_path, column, values, accepted):
    """Subsets and hub caches are JSON: a date, bytes or a decimal column would fail only when the subset is
    written, after scoring. The loader names the file, the column and its type instead."""
    import datetime
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    made = {"timestamp": pa.array([datetime.datetime(2024, 1, d) for d in (1, 2)]),
            "binary": pa.array([b"\x00", b"\xff"]), "decimal": pa.array([decimal.Decimal("1.5")] * 2),
            "list of structs": pa.array([[{"a": 1}], []]),
            "categorical": pa.array(["x", "y"]).dictionary_encode(), "float with nulls": pa.array([1.5, None])}
    table = pa.table({"instruction": ["Say a", "Say b"], "output": ["a", "b"], column: made[values]})
    path = tmp_path / "pool.parquet"
    pq.write_table(table, path)
    if accepted:
        pool = D.load_instructions(str(path))
        assert len(pool) == 2 and json.dumps(pool.records)
    else:
        with pytest.raises(D.DataError) as info:
            D.load_instructions(str(path))
        assert str(info.value).startswith(f"{path}: column {column!r} has type ")
        assert "JSON cannot hold; store it as text or drop the column" in str(info.value)


def test_capitalised_alpaca_keys_are_a_rename_not_a_test_set(tmp_path):
    """'Instruction' is WizardLM's test-set key too: Alpaca rows with capitalised keys must not be told they are
    a test set (or be given Python advice on the command line); they are told which fields to rename."""
    rows = [{"Instruction": "Say hi.", "Input": "", "Output": "Hi."}, {"Instruction": "Count.", "Input": "", "Output": "1"}]
    error = expect_error(write_json(tmp_path / "cap.json", rows), "cap.json, row 0",
                         "rename the field 'Instruction' to 'instruction', 'Input' to 'input', 'Output' to 'output'")
    assert "test set" not in str(error) and "Python" not in str(error)
    # A real test set (prompts only) is still named as one.
    expect_error(write_json(tmp_path / "wiz.json", [{"Instruction": "Say hi.", "Skill": "x", "Difficulty": 1}]),
                 "look like the 'wizardlm' test set")
