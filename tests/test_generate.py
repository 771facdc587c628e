"""Generation: the training prompt layout, left padding, EOS, and the output files."""

from __future__ import annotations

import json

import pytest

from conftest import make_rows
from miwv_lib.experiments.generate import GenerateConfig, _left_padded, _until_stop, generate, generate_ids, generate_test_set, generation_records, prompt_token_ids, write_generations
from miwv_lib.method.layouts import SpecialTokens
from miwv_lib.data.prompts import encode_examples
from miwv_lib.method.layouts import zero_shot_sequence
from miwv_lib.runtime.io import write_json


@pytest.fixture(scope="module")
def talkative(tmp_path_factory):
    """A tiny model whose first greedy token is not EOS (seed 1), so generations have content."""
    from miwv_lib import build_tiny_model, load_model

    return load_model(str(build_tiny_model(tmp_path_factory.mktemp("tiny1") / "m", seed=1)), dtype="float32",
                      device="cpu")


def test_prompt_is_the_scored_context(tiny):
    rows = make_rows(5)
    special = SpecialTokens.from_tokenizer(tiny.tokenizer)
    for prompt, example in zip(prompt_token_ids(rows, tiny.tokenizer), encode_examples(rows, tiny.tokenizer)):
        sequence, _ = zero_shot_sequence(example, special, 1024)
        assert prompt == list(sequence.input_ids[:-sequence.n_targets])
        assert prompt[0] == tiny.tokenizer.bos_token_id
    cut = prompt_token_ids(rows, tiny.tokenizer, max_prompt_length=10)
    assert all(len(p) == 10 and p[0] == tiny.tokenizer.bos_token_id for p in cut)


def test_left_padded_batches_match_one_by_one(talkative):
    rows = make_rows(5, seed=2)
    prompts = prompt_token_ids(rows, talkative.tokenizer)
    assert len({len(p) for p in prompts}) > 1  # padding really happens
    settings = GenerateConfig(max_new_tokens=6, batch_size=5, progress=False)
    batched = generate_ids(talkative, prompts, settings)
    single = [generate_ids(talkative, [p], GenerateConfig(max_new_tokens=6, batch_size=1, progress=False))[0]
              for p in prompts]
    assert batched == single
    assert all(0 < len(ids) <= 6 for ids in batched)
    assert generate(talkative, rows, settings) == [talkative.tokenizer.decode(ids, skip_special_tokens=True).strip()
                                                   for ids in batched]


@pytest.mark.parametrize("lora", [False, True])
def test_greedy_decoding_ignores_the_checkpoint_s_own_generation_settings(talkative, lora):
    import copy
    import dataclasses

    from peft import LoraConfig, get_peft_model

    prompts = prompt_token_ids(make_rows(4, seed=2), talkative.tokenizer)
    settings = GenerateConfig(max_new_tokens=8, batch_size=4, progress=False)
    greedy = generate_ids(talkative, prompts, settings)
    model = copy.deepcopy(talkative.model)
    if lora:  # the fine-tuned models: generate runs in the wrapped model, with that model's config
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=True))
    own = (model.get_base_model() if lora else model).generation_config
    own.repetition_penalty, own.no_repeat_ngram_size = 3.0, 1  # as a checkpoint may ship them
    assert generate_ids(dataclasses.replace(talkative, model=model), prompts, settings) == greedy
    assert own.repetition_penalty == 3.0  # handed back afterwards


def test_prompt_pass_never_copies_the_head_weight_per_row(talkative):
    # Without contiguous_head_input, the prompt pass's strided last-position slice sends a frozen LM head
    # (every LoRA model's) through a batched product with its weight broadcast to batch x hidden x vocab.
    import copy

    from torch.profiler import profile

    frozen = copy.copy(talkative)
    frozen.model = copy.deepcopy(talkative.model).requires_grad_(False)
    prompts = prompt_token_ids(make_rows(3, seed=2), talkative.tokenizer)
    head = frozen.model.get_output_embeddings()
    vocab, hidden = head.weight.shape
    broadcast_weight = [len(prompts), hidden, vocab]
    settings = GenerateConfig(max_new_tokens=2, batch_size=3, progress=False)

    def shapes_seen(run) -> list:
        with profile(record_shapes=True) as trace:
            run()
        return [shape for event in trace.events() for shape in event.input_shapes]

    unguarded = dict(input_ids=_left_padded(prompts, 0)[0], attention_mask=_left_padded(prompts, 0)[1],
                     max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert broadcast_weight in shapes_seen(lambda: frozen.model.generate(**unguarded))  # the trap is real
    assert broadcast_weight not in shapes_seen(lambda: generate_ids(frozen, prompts, settings))
    assert generate_ids(frozen, prompts, settings) == generate_ids(talkative, prompts, settings)
    assert not head._forward_pre_hooks  # the hook is gone afterwards


def test_generation_stops_at_eos(tiny):
    # The seed-0 tiny model's first greedy token is EOS: nothing is generated after it.
    assert generate_ids(tiny, prompt_token_ids(make_rows(2), tiny.tokenizer),
                        GenerateConfig(max_new_tokens=5, progress=False)) == [[], []]
    assert _until_stop([5, 6, 2, 7], {2}) == [5, 6] and _until_stop([5, 6], {2}) == [5, 6]


def _test_pool(tmp_path):
    from miwv_lib import load_instructions

    records = [{"dataset": "helpful_base", "instruction": f"Question {i}?", "output": f"Reference {i}.",
                "generator": "gpt4"} for i in range(3)]
    (tmp_path / "eval.json").write_text(json.dumps(records))
    return load_instructions(str(tmp_path / "eval.json"), require_output=False)


def test_files_in_jsonl_and_alpaca_eval_format(tmp_path):
    pool = _test_pool(tmp_path)
    records = generation_records(pool, ["a", "b", "c"], "miwv_5pct", "alpaca_eval_gpt4")
    jsonl, model_outputs = write_generations(tmp_path / "out", records, stem="alpaca_eval_gpt4")
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["output"] for r in lines] == ["a", "b", "c"] and lines[0]["reference"] == "Reference 0."
    outputs = json.loads(model_outputs.read_text())
    assert outputs[0] == {"instruction": "Question 0?", "output": "a", "generator": "miwv_5pct",
                          "dataset": "helpful_base"}


def test_generate_test_set_reuses_an_identical_run(tmp_path, talkative, monkeypatch):
    import miwv_lib.experiments.generate as generate_module

    pool = _test_pool(tmp_path)
    settings = GenerateConfig(max_new_tokens=3, progress=False)
    first = generate_test_set(talkative, pool, tmp_path / "gen", "alpaca_eval_gpt4", settings, generator="m")
    monkeypatch.setattr(generate_module, "generate", lambda *a, **k: pytest.fail("should have been cached"))
    assert generate_test_set(talkative, pool, tmp_path / "gen", "alpaca_eval_gpt4", settings, generator="m") == first
    with pytest.raises(pytest.fail.Exception):  # another setting: generated again
        generate_test_set(talkative, pool, tmp_path / "gen", "alpaca_eval_gpt4",
                          GenerateConfig(max_new_tokens=4, progress=False), generator="m")


def test_a_crash_before_the_meta_is_written_leaves_no_answers_to_reuse(tmp_path, talkative, monkeypatch):
    """New answers renamed into place, then a crash before their meta: the old meta once vouched for them, so answers
    of max_new_tokens 8 were reused as those of max_new_tokens 2."""
    import miwv_lib.experiments.generate as generate_module

    pool, short = _test_pool(tmp_path), GenerateConfig(max_new_tokens=2, progress=False)
    first = generate_test_set(talkative, pool, tmp_path / "gen", "alpaca_eval_gpt4", short, generator="m")

    def crash_at_the_meta(path, obj):
        if str(path).endswith(".meta.json"):
            raise KeyboardInterrupt("killed")
        return write_json(path, obj)

    monkeypatch.setattr(generate_module, "write_json", crash_at_the_meta)
    with pytest.raises(KeyboardInterrupt):
        generate_test_set(talkative, pool, tmp_path / "gen", "alpaca_eval_gpt4",
                          GenerateConfig(max_new_tokens=8, progress=False), generator="m")
    monkeypatch.undo()
    on_disk = [json.loads(line) for line in (tmp_path / "gen" / "alpaca_eval_gpt4.jsonl").read_text().splitlines()]
    assert [r["output"] for r in on_disk] != [r["output"] for r in first]  # the longer answers did land
    assert generate_test_set(talkative, pool, tmp_path / "gen", "alpaca_eval_gpt4", short, generator="m") == first


def test_cached_answers_carry_the_test_files_current_references(tmp_path, talkative, monkeypatch):
    """Answers do not depend on the references, so they are reused after the references are corrected, but judged
    against the corrected ones (they once kept the references they were generated beside)."""
    import miwv_lib.experiments.generate as generate_module
    from miwv_lib import load_instructions

    settings = GenerateConfig(max_new_tokens=3, progress=False)
    first = generate_test_set(talkative, _test_pool(tmp_path), tmp_path / "gen", "alpaca_eval_gpt4", settings)
    records = json.loads((tmp_path / "eval.json").read_text())
    (tmp_path / "eval.json").write_text(json.dumps([{**r, "output": f"Corrected {i}."} for i, r in enumerate(records)]))
    monkeypatch.setattr(generate_module, "generate", lambda *a, **k: pytest.fail("should have been cached"))
    pool = load_instructions(str(tmp_path / "eval.json"), require_output=False)
    again = generate_test_set(talkative, pool, tmp_path / "gen", "alpaca_eval_gpt4", settings)
    assert [r["output"] for r in again] == [r["output"] for r in first]
    assert [r["reference"] for r in again] == ["Corrected 0.", "Corrected 1.", "Corrected 2."]


@pytest.mark.slow
def test_gemma_generates_on_real_prompts(gemma, shared_data_dir):
    from miwv_lib import load_test_set

    pool = load_test_set("vicuna", data_dir=shared_data_dir, sample=2, seed=0)
    outputs = generate(gemma, pool, GenerateConfig(max_new_tokens=12, batch_size=2, progress=False))
    assert len(outputs) == 2 and all(isinstance(o, str) for o in outputs) and any(outputs)
