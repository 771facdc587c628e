"""Fine-tuning: the scorer's token layout as labels, LoRA that learns, reproducibility, resumable comparisons."""

from __future__ import annotations

import copy
import itertools
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_rows
from miwv_lib.method.layouts import SpecialTokens
from miwv_lib.data.prompts import encode_examples
from miwv_lib.runtime.runs import FingerprintMismatch
from miwv_lib.method.losses import sequence_losses
from miwv_lib.method.layouts import zero_shot_sequence
from miwv_lib.experiments import train as train_module
from miwv_lib.experiments.train import CHECKPOINT_DIR, IGNORE_INDEX, LossCurveCallback, ResponseOnlyLossTrainer, TrainConfig, _prepare_model, _right_padding_collator, _training_arguments, build_features, load_trained, read_loss_csv, response_only_loss, train_model


def _config(tiny_model_dir, **overrides) -> TrainConfig:
    settings = dict(model=str(tiny_model_dir), dtype="float32", bf16=False, max_steps=3, batch_size=4,
                    gradient_accumulation_steps=1, progress=False)
    return TrainConfig(**(settings | overrides))


def test_labels_are_exactly_the_scored_tokens(tiny):
    rows = make_rows(6)
    special = SpecialTokens.from_tokenizer(tiny.tokenizer)
    features, cut = build_features(rows, tiny.tokenizer, "alpaca", 512)
    assert cut == {"response": 0, "prompt": 0}
    for feature, example in zip(features, encode_examples(rows, tiny.tokenizer)):
        sequence, _ = zero_shot_sequence(example, special, 512)  # uncut: the scorer's zero-shot pass
        assert feature["input_ids"] == list(sequence.input_ids)
        n_context = len(sequence.input_ids) - sequence.n_targets
        assert feature["labels"] == [IGNORE_INDEX] * n_context + [*example.response, special.eos]


def test_a_long_row_is_trained_with_its_whole_prompt_and_its_response_cut(tiny):
    """Alpaca's recipe: the scorer keeps the whole response and trims the prompt, but training on a response to an
    instruction cut out of view would teach answers without questions."""
    rows = make_rows(6)
    special = SpecialTokens.from_tokenizer(tiny.tokenizer)
    examples = encode_examples(rows, tiny.tokenizer)
    longest_prompt = max(len(e.prompt) for e in examples)
    max_length = longest_prompt + 1 + 3  # BOS, the longest prompt and 3 response tokens
    features, cut = build_features(rows, tiny.tokenizer, "alpaca", max_length)
    assert cut["prompt"] == 0 and cut["response"] == sum(len(e.response) + 1 > max_length - 1 - len(e.prompt)
                                                        for e in examples) > 0
    for feature, example in zip(features, examples):
        n_context = 1 + len(example.prompt)
        kept = min(len(example.response) + 1, max_length - n_context)
        assert feature["input_ids"] == [special.bos, *example.prompt, *[*example.response, special.eos][:kept]]
        assert feature["labels"] == [IGNORE_INDEX] * n_context + feature["input_ids"][n_context:]
    features, cut = build_features(rows, tiny.tokenizer, "alpaca", 8)  # no room for any prompt: trimmed as scored
    assert cut["prompt"] == len(rows)
    for feature, example in zip(features, examples):
        assert feature["input_ids"] == [special.bos, *example.prompt[-6:], example.response[0]]
        assert feature["labels"][-1] == example.response[0] and feature["labels"][:-1] == [IGNORE_INDEX] * 7


@pytest.mark.parametrize("bos", [1, None])
def test_the_training_layout_fits_keeps_a_token_before_every_label_and_cuts_the_response_first(bos):
    from miwv_lib.method.layouts import EncodedExample, training_sequence

    special = SpecialTokens(bos=bos, eos=2)
    for n_prompt, n_response, max_length in itertools.product(range(1, 10), range(1, 10), range(2, 22)):
        example = EncodedExample(tuple(range(10, 10 + n_prompt)), tuple(range(50, 50 + n_response)))
        sequence, cut = training_sequence(example, special, max_length)
        assert len(sequence.input_ids) <= max_length and sequence.n_targets >= 1
        assert len(sequence.input_ids) > sequence.n_targets  # the first label is predicted from a token
        assert not cut.prompt or cut.response  # the prompt is trimmed only once the response is down to one token
        assert sequence.input_ids[-sequence.n_targets:] == (*example.response, 2)[:sequence.n_targets]


def test_training_loss_is_the_scorers_zero_shot_loss(tiny):
    """Per example, the Trainer's loss (HF's label shift and -100 masking) equals MIWV's zero-shot loss."""
    rows = make_rows(4, seed=1)
    special = SpecialTokens.from_tokenizer(tiny.tokenizer)
    sequences = [zero_shot_sequence(e, special, 512)[0] for e in encode_examples(rows, tiny.tokenizer)]
    scored = sequence_losses(tiny.model, sequences, tiny.tokenizer.pad_token_id)
    collate = _right_padding_collator(tiny.tokenizer)
    with torch.no_grad():
        for feature, expected in zip(build_features(rows, tiny.tokenizer, "alpaca", 512)[0], scored):
            assert tiny.model(**collate([feature])).loss.item() == pytest.approx(expected, abs=1e-5)


def test_collator_pads_right_and_masks_padding(tiny):
    features, _ = build_features(make_rows(3), tiny.tokenizer, "alpaca", 512)
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
    from miwv_lib.experiments.generate import GenerateConfig, generate

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
    with pytest.raises(FingerprintMismatch, match=r"\(config\.learning_rate: 0\.0002 -> 0\.001\)"):
        train_model(rows, tmp_path / "run", _config(tiny_model_dir, max_steps=1, learning_rate=1e-3))
    # Rows cut at max_length enter the fingerprint (they were cut another way before), uncut ones leave it as it was
    train_model(rows, tmp_path / "cut", _config(tiny_model_dir, max_steps=1, max_length=24))
    cut = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert cut["rows_cut"]["response"] > 0 and cut["fingerprint_inputs"]["rows_cut"] == cut["rows_cut"]
    uncut = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert uncut["rows_cut"] == {"response": 0, "prompt": 0} and "rows_cut" not in uncut["fingerprint_inputs"]


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


def test_an_adapter_is_not_loaded_onto_base_weights_that_changed(tmp_path, tiny_model_dir):
    from safetensors.torch import save_file

    from miwv_lib.data.models import ModelLoadError

    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    train_model(make_rows(4), tmp_path / "run", _config(base, max_steps=1))
    assert load_trained(tmp_path / "run", device="cpu").identity.startswith("dir:base:")
    [weights] = base.glob("*.safetensors")  # trained again into the same folder: same names, same sizes
    save_file({k: t * 0.5 if t.is_floating_point() else t for k, t in load_file(weights).items()}, weights,
              metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="was trained on dir:base:.*train it again"):
        load_trained(tmp_path / "run", device="cpu")


def test_train_arms_trains_each_subset_once(tmp_path, tiny_model_dir):
    from miwv_lib import load_instructions, plan_arms, select_arms
    from miwv_lib.experiments.engine import train_arms

    (tmp_path / "pool.json").write_text(json.dumps(make_rows(10)))
    pool = load_instructions(str(tmp_path / "pool.json"))
    scores = [{"index": i, "id": r["id"], "miwv": -float(i)} for i, r in enumerate(pool.rows)]
    config = _config(tiny_model_dir, max_steps=1)
    arms = plan_arms([0.2], ["miwv", "random"])
    plan = select_arms(arms, scores)
    results = train_arms(arms, plan, pool, tmp_path / "models", config)
    assert list(results) == ["miwv_20pct", "random_20pct", "full"]
    assert [r.n_examples for r in results.values()] == [2, 2, 10]
    inputs = json.loads((tmp_path / "models" / "miwv_20pct" / "manifest.json").read_text())["fingerprint_inputs"]
    expected = [pool.rows[0], pool.rows[1]]  # the two highest MIWV
    from miwv_lib.runtime.io import stable_hash

    assert inputs["data"] == stable_hash([(r["id"], r["instruction"], r["input"], r["output"]) for r in expected])
    assert all(r.skipped for r in train_arms(arms, plan, pool, tmp_path / "models", config).values())


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
    from miwv_lib.experiments.cli import main
    from miwv_lib.runtime.io import write_jsonl

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


# --- response-only loss: HF's loss without logits at unlabelled positions -----------------------------------

def _tiny_gemma(tiny, softcap: float):
    """A random 2-layer Gemma-3 text model on the tiny tokenizer: Gemma's decoder, tied head and logit soft-capping."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=len(tiny.tokenizer), hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              sliding_window=8, max_position_embeddings=2048, final_logit_softcapping=softcap,
                              pad_token_id=tiny.tokenizer.pad_token_id)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).float()


def _lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("arch,bf16", [("llama", False), ("gemma-softcap", False), ("llama", True)])
def test_response_only_loss_is_hf_loss_with_its_gradients(tmp_path, tiny, tiny_model_dir, arch, bf16):
    """Padding, several examples, with and without num_items_in_batch: same loss and LoRA gradients as HF's."""
    config = _config(tiny_model_dir, lora_dropout=0.0, bf16=bf16)
    base = copy.deepcopy(tiny.model) if arch == "llama" else _tiny_gemma(tiny, softcap=2.0)
    model = _prepare_model(base, config)
    with torch.no_grad():  # LoRA starts as a no-op (B = 0): make it count, so its gradients reach every matrix
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    trainer = ResponseOnlyLossTrainer(model=model, args=_training_arguments(config, torch.device("cpu"), bf16,
                                                                               str(tmp_path)))
    assert trainer.model_accepts_loss_kwargs and trainer.loss_is_scaled_for_ga is None
    model = trainer.accelerator.prepare_model(model)  # as in train(): under bf16, forward autocasts
    batch = _right_padding_collator(tiny.tokenizer)(build_features(make_rows(5, seed=4), tiny.tokenizer, "alpaca", 512)[0])
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # the batch is padded
    n_labels = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    for num_items in (None, torch.tensor(n_labels + 37)):  # alone, or one micro-batch of an accumulated batch
        kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
        expected = model(**batch, **kwargs).loss
        expected.backward()
        expected_grads = _lora_grads(model)
        ours = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
        ours.backward()
        grads = _lora_grads(model)
        assert ours.item() == pytest.approx(expected.item(), abs=1e-5)
        assert grads.keys() == expected_grads.keys() and len(grads) > 0
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    if arch == "gemma-softcap":  # the cap matters here: without it the loss would differ
        cap, model.config.final_logit_softcapping = model.config.final_logit_softcapping, None
        with torch.no_grad():
            uncapped = response_only_loss(model, dict(batch)).item()
        model.config.final_logit_softcapping = cap
        assert abs(uncapped - expected.item()) > 1e-2


def test_response_only_training_equals_hf_training(tmp_path, tiny_model_dir, monkeypatch):
    """Gradient accumulation over batches of uneven lengths: same logged losses and adapter either way."""
    calls = []  # the switch really takes the response-only path inside Trainer.train (no silent fallback)
    monkeypatch.setattr(train_module, "response_only_loss",
                        lambda *a, **k: calls.append(1) or response_only_loss(*a, **k))
    rows = make_rows(12, seed=5)
    results, curves, adapters = {}, {}, {}
    for switch in (False, True):
        config = _config(tiny_model_dir, response_only_loss=switch, max_steps=4, batch_size=3,
                         gradient_accumulation_steps=2, learning_rate=5e-3, warmup_ratio=0.0)
        results[switch] = train_model(rows, tmp_path / str(switch), config)
        assert len(calls) == (4 * 2 if switch else 0)  # one per micro-batch
        curves[switch] = read_loss_csv(tmp_path / str(switch) / "loss.csv")
        adapters[switch] = load_file(tmp_path / str(switch) / "adapter" / "adapter_model.safetensors")
    assert results[True].fingerprint == results[False].fingerprint  # the switch does not change what is trained
    assert [r["step"] for r in curves[True]] == [1, 2, 3, 4]
    for on, off in zip(curves[True], curves[False]):
        assert on["loss"] == pytest.approx(off["loss"], rel=1e-5)
        assert on["grad_norm"] == pytest.approx(off["grad_norm"], rel=1e-4)
    assert results[True].train_loss == pytest.approx(results[False].train_loss, rel=1e-5)
    assert curves[True][-1]["loss"] < curves[True][0]["loss"] - 0.05  # it did train
    for name, weight in adapters[True].items():
        torch.testing.assert_close(weight, adapters[False][name], rtol=1e-4, atol=1e-6, msg=name)


# --- resuming a killed run from its checkpoint ----------------------------------------------------------------

class _KilledAtStep3(LossCurveCallback):
    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if state.global_step == 3:  # after step 3's update, before its log and any save: its work is lost
            raise KeyboardInterrupt


def test_length_grouped_sampling_pads_less_and_resumes(tmp_path, tiny_model_dir, monkeypatch):
    """``sampling="group_by_length"`` (the study's setting) reaches the Trainer, and a killed run still
    resumes to the same adapter: the sampler's order must be the same in both sessions."""
    rows = make_rows(64, seed=3)  # HF groups within "megabatches" of up to 50 batches: here 8 batches of 2
    for i, row in enumerate(rows):  # short and long responses, interleaved
        row["output"] = " ".join(["sea"] * (3 if i % 2 else 60))
    padding = {}
    for sampling in ("random", "group_by_length"):
        masks: list[torch.Tensor] = []

        def recording(tokenizer, masks=masks):
            collate = _right_padding_collator(tokenizer)
            return lambda features: masks.append((batch := collate(features))["attention_mask"]) or batch

        monkeypatch.setattr(train_module, "_right_padding_collator", recording)
        train_model(rows, tmp_path / sampling, _config(tiny_model_dir, max_steps=-1, epochs=1.0, batch_size=2,
                                                       sampling=sampling))
        padding[sampling] = sum(int((m == 0).sum()) for m in masks)
    monkeypatch.undo()
    assert padding["group_by_length"] < padding["random"] / 2

    config = _config(tiny_model_dir, max_steps=6, batch_size=2, save_steps=2, sampling="group_by_length")
    whole = train_model(rows, tmp_path / "whole", config)
    _kill_at_step_3(rows, tmp_path / "killed", config, monkeypatch)
    resumed = train_model(rows, tmp_path / "killed", config)
    assert resumed.resumed_from_step == 2 and resumed.train_loss == pytest.approx(whole.train_loss, rel=1e-5)
    expected, got = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (tmp_path / "whole",
                                                                                      tmp_path / "killed"))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


class _KilledAtTrainEnd(LossCurveCallback):
    def on_train_end(self, args, state, control, **kwargs):
        raise KeyboardInterrupt


def test_killed_run_resumes_from_its_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    rows = make_rows(10, seed=6)
    config = _config(tiny_model_dir, max_steps=7, batch_size=2, gradient_accumulation_steps=2, save_steps=2,
                     learning_rate=5e-3, warmup_ratio=0.0)  # 3 steps per epoch: the kill and resume are mid-epoch
    whole = train_model(rows, tmp_path / "whole", config)
    assert whole.resumed_from_step == 0 and not (tmp_path / "whole" / CHECKPOINT_DIR).exists()

    monkeypatch.setattr(train_module, "LossCurveCallback", _KilledAtStep3)
    with pytest.raises(KeyboardInterrupt):
        train_model(rows, tmp_path / "killed", config)
    monkeypatch.undo()
    left = tmp_path / "killed"
    assert json.loads((left / "manifest.json").read_text())["status"] == "running"
    assert not (left / "adapter").exists() and (left / CHECKPOINT_DIR / "checkpoint-2").is_dir()

    resumed = train_model(rows, left, config)
    assert resumed.resumed_from_step == 2 and resumed.steps == 7 and resumed.fingerprint == whole.fingerprint
    assert not (left / CHECKPOINT_DIR).exists()
    expected, got = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (tmp_path / "whole", left))
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)

    curve, expected_curve = read_loss_csv(left / "loss.csv"), read_loss_csv(tmp_path / "whole" / "loss.csv")
    assert [r["step"] for r in curve] == list(range(1, 8))
    for row, expected_row in zip(curve, expected_curve):
        assert row["loss"] == pytest.approx(expected_row["loss"], rel=1e-5)
        assert row["tokens_seen"] == expected_row["tokens_seen"]
    assert all(b["seconds"] > a["seconds"] for a, b in zip(curve, curve[1:]))  # time adds up across sessions
    assert resumed.train_loss == pytest.approx(whole.train_loss, rel=1e-5)  # the whole run's mean, not the session's
    manifest = json.loads((left / "manifest.json").read_text())
    session_tokens = manifest["tokens_seen"] - curve[1]["tokens_seen"]  # steps 3-7 ran in the resumed session
    assert manifest["tokens_seen"] == curve[-1]["tokens_seen"] and session_tokens > 0
    assert manifest["tokens_per_second"] == pytest.approx(session_tokens / manifest["session_seconds"], rel=0.02)
    assert manifest["seconds"] > manifest["session_seconds"]  # the whole run's time counts the killed session too
    assert manifest["resumed_from_step"] == 2 and manifest["status"] == "complete"


def _kill_at_step_3(rows, out_dir, config, monkeypatch) -> None:
    monkeypatch.setattr(train_module, "LossCurveCallback", _KilledAtStep3)
    with pytest.raises(KeyboardInterrupt):
        train_model(rows, out_dir, config)
    monkeypatch.undo()
    assert (out_dir / CHECKPOINT_DIR / "checkpoint-2").is_dir()


def test_which_checkpoints_are_resumed(tmp_path, tiny_model_dir, monkeypatch):
    """save_steps is not part of the training: a rerun without it still resumes. overwrite=True starts afresh."""
    rows = make_rows(6, seed=7)
    config = _config(tiny_model_dir, max_steps=4, batch_size=2, save_steps=2)
    _kill_at_step_3(rows, tmp_path / "a", config, monkeypatch)
    result = train_model(rows, tmp_path / "a", _config(tiny_model_dir, max_steps=4, batch_size=2))
    assert result.resumed_from_step == 2 and not (tmp_path / "a" / CHECKPOINT_DIR).exists()

    _kill_at_step_3(rows, tmp_path / "b", config, monkeypatch)
    result = train_model(rows, tmp_path / "b", config, overwrite=True)
    assert result.resumed_from_step == 0 and len(read_loss_csv(tmp_path / "b" / "loss.csv")) == 4
    assert not (tmp_path / "b" / CHECKPOINT_DIR).exists()

    # killed after the last step, before the adapter was saved: no checkpoint of a finished run (Trainer would
    # resume from it with one step too many), so the last checkpoint resumes and the run ends at max_steps
    monkeypatch.setattr(train_module, "LossCurveCallback", _KilledAtTrainEnd)
    with pytest.raises(KeyboardInterrupt):
        train_model(rows, tmp_path / "c", config)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "c" / CHECKPOINT_DIR).iterdir()) == ["checkpoint-2"]
    result = train_model(rows, tmp_path / "c", config)
    assert result.resumed_from_step == 2 and result.steps == 4
    assert [r["step"] for r in read_loss_csv(tmp_path / "c" / "loss.csv")] == [1, 2, 3, 4]
