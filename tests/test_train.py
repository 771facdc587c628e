"""Fine-tuning: the scorer's token layout as labels, LoRA that learns, reproducibility, resumable comparisons."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_rows
from miwv_lib.prompts import SpecialTokens, encode_examples
from miwv_lib.runs import FingerprintMismatch
from miwv_lib.scoring import sequence_losses, zero_shot_sequence
from miwv_lib.train import (
    IGNORE_INDEX, TrainConfig, _right_padding_collator, build_features, load_trained, read_loss_csv,
    train_comparison, train_model,
)


def _config(tiny_model_dir, **overrides) -> TrainConfig:
    settings = dict(model=str(tiny_model_dir), dtype="float32", bf16=False, max_steps=3, batch_size=4,
                    gradient_accumulation_steps=1, progress=False)
    return TrainConfig(**(settings | overrides))


def test_labels_are_exactly_the_scored_tokens(tiny):
    rows = make_rows(6)
    special = SpecialTokens.from_tokenizer(tiny.tokenizer)
    for max_length in (512, 24):  # 24 forces the scorer's truncation
        features = build_features(rows, tiny.tokenizer, "alpaca", max_length)
        for feature, example in zip(features, encode_examples(rows, tiny.tokenizer)):
            sequence, _ = zero_shot_sequence(example, special, max_length)
            assert feature["input_ids"] == list(sequence.input_ids)
            n_context = len(sequence.input_ids) - sequence.n_targets
            assert feature["labels"][:n_context] == [IGNORE_INDEX] * n_context
            assert feature["labels"][n_context:] == list(sequence.input_ids[n_context:])
            if max_length == 512:  # uncut: exactly response + EOS (a cut response loses its end, as when scored)
                assert feature["labels"][n_context:] == [*example.response, special.eos]
            else:
                assert len(feature["input_ids"]) <= max_length


def test_training_loss_is_the_scorers_zero_shot_loss(tiny):
    """Per example, the Trainer's loss (HF's label shift and -100 masking) equals MIWV's zero-shot loss."""
    rows = make_rows(4, seed=1)
    special = SpecialTokens.from_tokenizer(tiny.tokenizer)
    sequences = [zero_shot_sequence(e, special, 512)[0] for e in encode_examples(rows, tiny.tokenizer)]
    scored = sequence_losses(tiny.model, sequences, tiny.tokenizer.pad_token_id)
    collate = _right_padding_collator(tiny.tokenizer)
    with torch.no_grad():
        for feature, expected in zip(build_features(rows, tiny.tokenizer, "alpaca", 512), scored):
            assert tiny.model(**collate([feature])).loss.item() == pytest.approx(expected, abs=1e-5)


def test_collator_pads_right_and_masks_padding(tiny):
    features = build_features(make_rows(3), tiny.tokenizer, "alpaca", 512)
    side = tiny.tokenizer.padding_side
    batch = _right_padding_collator(tiny.tokenizer)(features)
    assert tiny.tokenizer.padding_side == side  # the caller's tokenizer is untouched
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == feature["input_ids"]
        assert batch["attention_mask"][row].sum() == n
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()


def test_lora_lowers_the_loss_changes_generations_and_saves_everything(tmp_path, tiny_model_dir):
    from miwv_lib import load_model
    from miwv_lib.generate import GenerateConfig, generate

    rows = make_rows(8, seed=3)
    config = _config(tiny_model_dir, max_steps=10, learning_rate=1e-2, warmup_ratio=0.0)
    result = train_model(rows, tmp_path / "run", config)
    assert result.steps == 10 and not result.skipped and result.tokens_per_second > 0
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "train_config.json",
                 "loss.csv", "manifest.json"):
        assert (tmp_path / "run" / name).exists(), name
    curve = read_loss_csv(tmp_path / "run" / "loss.csv")
    assert len(curve) == 10 and curve[-1]["loss"] < curve[0]["loss"]
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["learning_rate"] == 1e-2 and saved["lora_r"] == 16 and saved["lr_scheduler"] == "cosine"

    base = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    trained = load_trained(tmp_path / "run", dtype="float32", device="cpu")
    special = SpecialTokens.from_tokenizer(base.tokenizer)
    sequences = [zero_shot_sequence(e, special, 512)[0] for e in encode_examples(rows, base.tokenizer)]
    before = sequence_losses(base.model, sequences, base.tokenizer.pad_token_id).mean()
    after = sequence_losses(trained.model, sequences, base.tokenizer.pad_token_id).mean()
    assert after < before - 0.3, (before, after)

    settings = GenerateConfig(max_new_tokens=6, progress=False)
    assert generate(trained, rows[:3], settings) != generate(base, rows[:3], settings)


def test_same_seed_same_adapter(tmp_path, tiny_model_dir, tiny):
    rows = make_rows(8)
    adapters = []
    for name, seed, base in (("a", 7, None), ("b", 7, tiny), ("c", 8, tiny)):  # loaded here, or lent by the caller
        train_model(rows, tmp_path / name, _config(tiny_model_dir, seed=seed, lora_dropout=0.1), base=base)
        adapters.append(load_file(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    assert not any("lora" in n for n, _ in tiny.model.named_modules())  # the lent model was copied, not wrapped
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[0]) > 0
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    assert not all(torch.equal(adapters[0][k], adapters[2][k]) for k in adapters[0])


def test_trained_run_is_skipped_and_a_different_one_refused(tmp_path, tiny_model_dir):
    rows = make_rows(4)
    first = train_model(rows, tmp_path / "run", _config(tiny_model_dir, max_steps=1))
    again = train_model(rows, tmp_path / "run", _config(tiny_model_dir, max_steps=1, progress=True))
    assert again.skipped and again.fingerprint == first.fingerprint and again.train_loss == first.train_loss
    with pytest.raises(FingerprintMismatch, match="learning_rate"):
        train_model(rows, tmp_path / "run", _config(tiny_model_dir, max_steps=1, learning_rate=1e-3))


def test_bf16_training_on_cpu(tmp_path, tiny_model_dir):
    """Trainer(bf16=True) autocasts on CPU; the frozen base is loaded in bf16, the adapter stays fp32."""
    result = train_model(make_rows(4), tmp_path / "run", _config(tiny_model_dir, max_steps=2, dtype="auto", bf16=True))
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["bf16"] is True and saved["weights_dtype"] == "bfloat16"
    assert math.isfinite(result.train_loss)
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in adapter.values())


def test_full_fine_tuning(tmp_path, tiny_model_dir):
    result = train_model(make_rows(4), tmp_path / "run", _config(tiny_model_dir, method="full", max_steps=2))
    assert (tmp_path / "run" / "model" / "config.json").exists() and result.model_dir.name == "model"
    trained = load_trained(tmp_path / "run", dtype="float32", device="cpu")
    assert "+full:" in trained.identity


def test_train_comparison_trains_each_subset_once(tmp_path, tiny_model_dir):
    from miwv_lib import load_instructions

    (tmp_path / "pool.json").write_text(json.dumps(make_rows(10)))
    pool = load_instructions(str(tmp_path / "pool.json"))
    scores = [{"index": i, "id": r["id"], "miwv": -float(i)} for i, r in enumerate(pool.rows)]
    config = _config(tiny_model_dir, max_steps=1)
    results = train_comparison(pool, scores, tmp_path, 0.2, config=config)
    assert list(results) == ["miwv_20pct", "random_20pct", "full"]
    assert [r.n_examples for r in results.values()] == [2, 2, 10]
    inputs = json.loads((tmp_path / "models" / "miwv_20pct" / "manifest.json").read_text())["fingerprint_inputs"]
    expected = [pool.rows[0], pool.rows[1]]  # the two highest MIWV
    from miwv_lib.io import stable_hash

    assert inputs["data"] == stable_hash([(r["id"], r["instruction"], r["input"], r["output"]) for r in expected])
    assert all(r.skipped for r in train_comparison(pool, scores, tmp_path, 0.2, config=config).values())


@pytest.mark.slow
def test_gemma_lora_few_steps(tmp_path, shared_data_dir):
    """The real default model: LoRA in bf16 on CPU for 2 steps of 2 real Alpaca rows at max length 256."""
    from miwv_lib import load_instructions

    rows = load_instructions("alpaca", data_dir=shared_data_dir, limit=4).rows
    config = TrainConfig(max_length=256, max_steps=2, batch_size=2, gradient_accumulation_steps=1, progress=False)
    result = train_model(rows, tmp_path / "gemma", config)
    assert math.isfinite(result.train_loss) and result.tokens_per_second > 0
    saved = json.loads((tmp_path / "gemma" / "train_config.json").read_text())
    assert saved["base_model_identity"].startswith("gemma-3-270m@")


def test_cli_train_on_a_selection(tmp_path, tiny_model_dir, capsys):
    from miwv_lib.cli import main
    from miwv_lib.io import write_jsonl

    (tmp_path / "pool.json").write_text(json.dumps(make_rows(6)))
    from miwv_lib import load_instructions

    pool = load_instructions(str(tmp_path / "pool.json"))
    write_jsonl(tmp_path / "scores.jsonl", [{"index": i, "id": r["id"], "miwv": float(i)} for i, r in enumerate(pool.rows)])
    argv = ["train", "--data", str(tmp_path / "pool.json"), "--scores", str(tmp_path / "scores.jsonl"), "--ratio", "0.5",
            "--model", str(tiny_model_dir), "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--no-bf16",
            "--device", "cpu", "--out", str(tmp_path / "model")]
    assert main(argv) == 0
    assert "on 3 rows" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert manifest["rows"] == 3 and manifest["status"] == "complete"
    assert main(argv) == 0 and "already trained" in capsys.readouterr().out
