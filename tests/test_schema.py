"""One configuration schema: the dataclasses check every value and the command line is derived from them."""

from __future__ import annotations

import math

import pytest

from miwv_lib.experiments.cli import TRAIN, build_parser, main
from miwv_lib.experiments.generate import GenerateConfig
from miwv_lib.runtime.schema import from_args
from miwv_lib.experiments.score import ScoreConfig
from miwv_lib.experiments.study import StudyError, load_study_config
from miwv_lib.experiments.train import TrainConfig

# The command-line contract: these flags existed before the schema, and keep their names.
SCORE_FLAGS = {"--model", "--embedder", "--template", "--max-length", "--dtype", "--device", "--batch-size",
               "--chunk-rows", "--no-ifd", "--overwrite", "--out", "--data", "--data-dir", "--limit"}
TRAIN_FLAGS = {"--model", "--method", "--template", "--max-length", "--epochs", "--learning-rate", "--batch-size",
               "--grad-accum", "--max-steps", "--lora-r", "--lora-alpha", "--lora-dropout", "--train-seed", "--no-bf16",
               "--device", "--overwrite", "--out", "--scores", "--ratio", "--by", "--seed"}


def _flags(command: str) -> set[str]:
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    return {flag for action in subparsers.choices[command]._actions for flag in action.option_strings}


def test_the_command_line_keeps_its_flags():
    assert SCORE_FLAGS <= _flags("score")
    assert TRAIN_FLAGS <= _flags("train") and TRAIN_FLAGS - {"--out", "--scores", "--by", "--seed"} <= _flags("evaluate")
    assert "--max-new-tokens" in _flags("evaluate")


def test_flag_defaults_are_the_dataclass_defaults():
    """No default is written twice: parsing no flags gives the dataclasses' own defaults."""
    args = build_parser().parse_args(["score", "--out", "x"])
    assert from_args(ScoreConfig, args) == ScoreConfig()
    args = build_parser().parse_args(["train", "--out", "x"])
    assert from_args(TrainConfig, args, prefix=TRAIN) == TrainConfig()
    assert build_parser().parse_args(["evaluate", "--run-dir", "x", "--ratio", "0.1"]).max_new_tokens == \
        GenerateConfig().max_new_tokens


def test_flags_reach_their_fields():
    args = build_parser().parse_args(["train", "--out", "x", "--grad-accum", "2", "--train-seed", "7", "--no-bf16",
                                      "--seed", "3", "--learning-rate", "1e-3", "--sampling", "group_by_length"])
    config = from_args(TrainConfig, args, prefix=TRAIN)
    assert (config.gradient_accumulation_steps, config.seed, config.bf16, config.learning_rate, config.sampling) == \
        (2, 7, False, 1e-3, "group_by_length")
    assert args.seed == 3  # the selection's seed is not the training seed
    args = build_parser().parse_args(["score", "--out", "x", "--no-ifd", "--max-length", "300"])
    assert from_args(ScoreConfig, args).compute_ifd is False and from_args(ScoreConfig, args).max_length == 300


@pytest.mark.parametrize(("cls", "field", "value", "says"), [
    (ScoreConfig, "batch_size", 0, "expected a positive integer"),
    (ScoreConfig, "chunk_rows", "64", "expected an integer"),
    (ScoreConfig, "template", "vicuna", "expected one of alpaca, plain, chat"),
    (ScoreConfig, "compute_ifd", "yes", "expected true or false"),
    (ScoreConfig, "max_length", 1, "cannot hold a single response token"),
    (TrainConfig, "epochs", 0, "expected a number > 0"),
    (TrainConfig, "max_steps", 0, "expected -1 or ≥ 1, got 0"),  # 0 used to train one step, recorded as 3 epochs
    (TrainConfig, "learning_rate", math.nan, "expected a finite number"),
    (TrainConfig, "lora_dropout", 5, "expected a number < 1"),
    (TrainConfig, "max_length", "auto", "expected an integer of at least 2, got 'auto'"),
    (TrainConfig, "lr_scheduler", "COSINE", "expected one of linear, cosine,"),
    (TrainConfig, "warmup_ratio", -0.1, "expected a number ≥ 0"),
    (GenerateConfig, "max_new_tokens", 0, "expected a positive integer"),
])
def test_every_setting_is_checked_where_it_is_built(cls, field, value, says):
    with pytest.raises(ValueError, match=f"^{field}: .*{says}"):
        cls(**{field: value})


@pytest.mark.parametrize(("yaml_text", "says"), [
    ("ratios: abc", "ratios: expected a non-empty list, got 'abc'"),
    ("ratios: [0.05, 2]", "ratios: item 1: expected a number < 1"),
    ("limit: ten", "limit: expected an integer, got 'ten'"),
    ("test_sets: [sinstruct]", "test_sets: expected a non-empty mapping"),
    ("score: 5", "score: expected a mapping"),
    ("score: {max_length: 1}", "score: max_length: 1 cannot hold a single response token"),
    ("train: {epochs: 0}", "train: epochs: expected a number > 0"),
    ("methods: [miwv, best]", "methods: item 1: expected one of"),
    ("judges: [reference-nll, gpt5]", "judges: item 1: unknown judge 'gpt5'"),
    ("", "holds no settings"),  # all defaults would rewrite the committed small-scale report
    ("# a comment only", "holds no settings"),
    ("ratios: [0.1]\nratios: [0.2]", "line 2: key 'ratios' is given twice"),
    ("train: {epochs: 1, epochs: 2}", "line 1: key 'epochs' is given twice"),
    ("ratios: [0.1]\n1: a\nbogus: b", "line 2: key 1 is not a name"),  # sorting the unknown keys raised TypeError
    ("score: {yes: 1}", "line 1: key True is not a name"),
])
def test_a_study_yaml_with_a_wrong_value_names_the_file_and_key(tmp_path, yaml_text, says):
    path = tmp_path / "study.yaml"
    path.write_text(yaml_text + "\n", encoding="utf-8")
    with pytest.raises(StudyError) as caught:
        load_study_config(path)
    assert str(path) in str(caught.value) and says in str(caught.value)


def test_a_binary_study_config_is_a_clear_error(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(StudyError, match="not a valid YAML text file"):
        load_study_config(path)


def test_a_relative_config_is_found_from_the_current_directory_or_else_the_repository(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text("ratios: [0.25]\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # a file beside the user, not in the repository: it was "not found" before
    assert load_study_config("mine.yaml").ratios == [0.25]
    assert load_study_config("configs/study/smoke.yaml").ratios  # the repository's, from elsewhere
    with pytest.raises(StudyError, match="configuration file not found: nowhere.yaml"):
        load_study_config("nowhere.yaml")


def test_train_ratio_without_scores_is_refused_not_ignored(tmp_path, capsys):
    data = tmp_path / "pool.json"
    data.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]', encoding="utf-8")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--ratio", "0.5"]) == 2
    assert "--ratio selects rows by their scores: give --scores too" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_notebook_parameters_are_named_as_the_fields_they_set():
    """One name per setting: a notebook parameter handed to ScoreConfig, TrainConfig or GenerateConfig is
    called as the field (04's ``batch_size`` is TrainConfig.batch_size, never ``train_batch_size``). The one
    exception is ``train_seed``: in 03 and 04 ``seed`` is the random baseline's, so the LoRA seed keeps the
    name of its command-line flag, ``--train-seed``."""
    import ast
    import dataclasses
    import json
    from pathlib import Path

    configs = {c.__name__: {f.name for f in dataclasses.fields(c)} for c in (ScoreConfig, TrainConfig, GenerateConfig)}
    checked = 0
    for path in sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        for call in ast.walk(ast.parse(code)):
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) in configs:
                for kw in call.keywords:
                    assert kw.arg in configs[call.func.id], f"{path.name}: {call.func.id} has no field {kw.arg}"
                    if isinstance(kw.value, ast.Name) and (kw.arg, kw.value.id) != ("seed", "train_seed"):
                        assert kw.value.id == kw.arg, f"{path.name}: parameter {kw.value.id} sets {kw.arg}"
                        checked += 1
    assert checked >= 25  # 02's ScoreConfig, 04's TrainConfig and 05's GenerateConfig were all found
