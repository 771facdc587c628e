"""The MIWV engine: token layouts, exactness against a naive reference, invariances, truncation."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_rows
from miwv_lib.method.layouts import EncodedExample, SpecialTokens
from miwv_lib.data.prompts import encode_examples
from miwv_lib.method.selection import select_indices
from miwv_lib.method import losses
from miwv_lib.method.losses import EngineConfig, sequence_losses
from miwv_lib.experiments.score import ScoreConfig, score_rows
from miwv_lib.method.importance import chunk_plan, ifd, miwv
from miwv_lib.method.layouts import one_shot_lengths, one_shot_sequence, resolve_max_length, unconditional_sequence, zero_shot_sequence

BOS, EOS = 1, 2
SPECIAL = SpecialTokens(bos=BOS, eos=EOS)
SAMPLE = EncodedExample(prompt=(10, 11, 12), response=(20, 21))
DEMO = EncodedExample(prompt=(30, 31), response=(40, 41, 42))


# --- layouts -------------------------------------------------------------------------------

def test_zero_shot_layout_is_bos_prompt_response_eos():
    seq, cut = zero_shot_sequence(SAMPLE, SPECIAL, max_length=64)
    assert seq.input_ids == (BOS, 10, 11, 12, 20, 21, EOS)
    assert seq.n_targets == 3  # response + EOS
    assert not cut.as_dict()


def test_one_shot_is_neighbours_zero_shot_then_sample_without_bos():
    seq, cut = one_shot_sequence(SAMPLE, DEMO, SPECIAL, max_length=64)
    demo_zero, _ = zero_shot_sequence(DEMO, SPECIAL, 64)
    sample_zero, _ = zero_shot_sequence(SAMPLE, SPECIAL, 64)
    assert seq.input_ids == demo_zero.input_ids + sample_zero.input_ids[1:]
    assert seq.n_targets == 3
    assert not cut.as_dict()


def test_unconditional_layout_is_bos_response_eos():
    seq = unconditional_sequence(SAMPLE, SPECIAL, max_length=64)
    assert seq.input_ids == (BOS, 20, 21, EOS)
    assert seq.n_targets == 3


def test_no_bos_when_tokenizer_has_none():
    special = SpecialTokens(bos=None, eos=EOS)
    seq, _ = one_shot_sequence(SAMPLE, DEMO, special, max_length=64)
    assert seq.input_ids == (30, 31, 40, 41, 42, EOS, 10, 11, 12, 20, 21, EOS)
    # IFD's pass has no prompt: the EOS that ends the text before stands in for the missing BOS
    assert unconditional_sequence(SAMPLE, special, max_length=64).input_ids == (EOS, 20, 21, EOS)
    assert special.layout_version != SPECIAL.layout_version  # so that no cache of the old layout is reused


@pytest.mark.parametrize("max_length", [64, 7, 4, 3, 2])
def test_without_a_bos_every_first_target_still_has_a_token_before_it(max_length):
    special = SpecialTokens(bos=None, eos=EOS)
    zero, zero_cut = zero_shot_sequence(SAMPLE, special, max_length)
    one, _ = one_shot_sequence(SAMPLE, DEMO, special, max_length)
    uncond = unconditional_sequence(SAMPLE, special, max_length)
    for seq in (zero, one, uncond):
        assert seq.n_targets < len(seq.input_ids) <= max_length
    assert _targets(zero) == _targets(one) == _targets(uncond)
    assert zero.input_ids[0] == 12 if zero_cut.prompt else zero.input_ids[0] == 10  # the prompt's last token stays


def _targets(seq):
    return seq.input_ids[len(seq.input_ids) - seq.n_targets:]


@pytest.mark.parametrize("max_length", [13, 11, 9, 7, 5, 4, 3, 2])
def test_truncation_keeps_the_same_targets_in_every_pass(max_length):
    zero, zero_cut = zero_shot_sequence(SAMPLE, SPECIAL, max_length)
    one, one_cut = one_shot_sequence(SAMPLE, DEMO, SPECIAL, max_length)
    uncond = unconditional_sequence(SAMPLE, SPECIAL, max_length)
    for seq in (zero, one, uncond):
        assert len(seq.input_ids) <= max_length
        assert seq.input_ids[0] == BOS
    assert _targets(zero) == _targets(one) == _targets(uncond)
    assert zero_cut.prompt == one_cut.prompt and zero_cut.response == one_cut.response


def test_demo_is_trimmed_from_the_left_first():
    # the full one-shot is 7 (demo incl. BOS) + 6 (sample without BOS) = 13 tokens
    one, cut = one_shot_sequence(SAMPLE, DEMO, SPECIAL, max_length=10)
    assert one.input_ids == (BOS, 41, 42, EOS, 10, 11, 12, 20, 21, EOS)
    assert cut.as_dict() == {"demo": 3}


def test_demo_dropped_entirely_before_the_prompt_is_cut():
    one, cut = one_shot_sequence(SAMPLE, DEMO, SPECIAL, max_length=7)
    assert one.input_ids == (BOS, 10, 11, 12, 20, 21, EOS)
    assert cut.as_dict() == {"demo": "all"} and cut.no_demo
    one, cut = one_shot_sequence(SAMPLE, DEMO, SPECIAL, max_length=5)
    assert one.input_ids == (BOS, 12, 20, 21, EOS)  # prompt trimmed from the left
    assert cut.as_dict() == {"demo": "all", "prompt": 2}
    _, cut = one_shot_sequence(SAMPLE, DEMO, SPECIAL, max_length=8)
    assert cut.as_dict() == {"demo": 5} and not cut.no_demo  # one token of the demo is still there


def test_response_longer_than_max_length_is_cut_identically():
    zero, cut = zero_shot_sequence(SAMPLE, SPECIAL, max_length=3)
    assert zero.input_ids == (BOS, 20, 21) and zero.n_targets == 2
    assert cut.as_dict() == {"prompt": 3, "response": 1}


def test_equations():
    assert miwv(2.5, 2.0) == pytest.approx(0.5)
    assert miwv(1.5, 2.0) == pytest.approx(-0.5)
    assert ifd(1.0, 2.0) == pytest.approx(0.5)
    assert np.isnan(ifd(1.0, 0.0))


# --- the batched engine against a naive one-sample-at-a-time reference ----------------------

def naive_loss(model, seq, dtype: torch.dtype = torch.float32) -> float:
    """What public implementations do: full logits for one sequence, plain cross-entropy (in ``dtype``)."""
    ids = torch.tensor([seq.input_ids])
    with torch.no_grad():
        logits = model(ids).logits[0]
    n, k = len(seq.input_ids), seq.n_targets
    return F.cross_entropy(logits[n - k - 1:n - 1].to(dtype), ids[0, n - k:]).item()


@pytest.fixture(scope="module")
def tiny_sequences(tiny):
    rows = make_rows(12)
    examples = encode_examples(rows, tiny.tokenizer)
    special = SpecialTokens.from_tokenizer(tiny.tokenizer)
    sequences = []
    for i, ex in enumerate(examples):
        sequences.append(zero_shot_sequence(ex, special, 256)[0])
        sequences.append(one_shot_sequence(ex, examples[(i + 1) % len(examples)], special, 256)[0])
        sequences.append(unconditional_sequence(ex, special, 256))
    sequences.append(one_shot_sequence(examples[0], examples[1], special, 24)[0])  # truncated
    return sequences


def test_every_loss_equals_the_naive_reference(tiny, tiny_sequences):
    reference = np.array([naive_loss(tiny.model, s) for s in tiny_sequences])
    got = sequence_losses(tiny.model, tiny_sequences, tiny.tokenizer.pad_token_id, EngineConfig(progress=False))
    assert np.abs(got - reference).max() <= 1e-5


@pytest.mark.parametrize("batch_size", [1, 16])
def test_without_a_bos_every_loss_equals_the_naive_reference(tiny, batch_size):
    """A tokenizer that prepends no BOS (SmolLM2): IFD's pass once read its first target's prediction from another
    token's state, a loss that looked right and changed with the batch."""
    examples = encode_examples(make_rows(6), tiny.tokenizer)
    special = SpecialTokens(bos=None, eos=tiny.tokenizer.eos_token_id)
    sequences = [unconditional_sequence(ex, special, 256) for ex in examples]
    sequences += [zero_shot_sequence(ex, special, len(ex.response) + 2)[0] for ex in examples]  # the prompt cut
    reference = np.array([naive_loss(tiny.model, s) for s in sequences])
    got = sequence_losses(tiny.model, sequences, tiny.tokenizer.pad_token_id,
                          EngineConfig(batch_size=batch_size, progress=False))
    assert np.abs(got - reference).max() <= 1e-5


def test_a_first_target_with_no_token_before_it_is_an_error_not_a_loss(tiny):
    from miwv_lib.method.layouts import Sequence

    with pytest.raises(ValueError, match="no token before it"):
        sequence_losses(tiny.model, [Sequence((5, 6, 7), n_targets=3)], tiny.tokenizer.pad_token_id,
                        EngineConfig(progress=False))


@pytest.mark.parametrize("batch_size", [1, 3, 64])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_losses_do_not_depend_on_batch_size_or_padding_side(tiny, tiny_sequences, batch_size, padding_side):
    baseline = sequence_losses(tiny.model, tiny_sequences, tiny.tokenizer.pad_token_id,
                               EngineConfig(batch_size=1, progress=False))
    got = sequence_losses(tiny.model, tiny_sequences, tiny.tokenizer.pad_token_id,
                          EngineConfig(batch_size=batch_size, padding_side=padding_side, head_chunk=7,
                                       progress=False))
    assert np.abs(got - baseline).max() <= 1e-5


@pytest.mark.integration  # compiles a graph on the CPU (about 15 s)
def test_a_compiled_body_gives_the_naive_losses(tiny_model_dir, tiny_sequences):
    from miwv_lib.data.models import load_model
    from miwv_lib.method.losses import compile_body

    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu")  # its own copy: compiling is in place
    compile_body(loaded.model)
    got = sequence_losses(loaded.model, tiny_sequences, loaded.tokenizer.pad_token_id,
                          EngineConfig(progress=False, head_chunk=5, head_block=10))  # chunks and blocks of every size
    reference = np.array([naive_loss(loaded.model, s) for s in tiny_sequences])
    assert hasattr(loaded.model.base_model, "_orig_mod")  # the compiled module is what scored
    assert np.abs(got - reference).max() <= 1e-5


def test_token_budget_limits_batches(tiny, tiny_sequences):
    small = sequence_losses(tiny.model, tiny_sequences, tiny.tokenizer.pad_token_id,
                            EngineConfig(batch_size=64, max_tokens_per_batch=50, progress=False))
    large = sequence_losses(tiny.model, tiny_sequences, tiny.tokenizer.pad_token_id,
                            EngineConfig(batch_size=64, progress=False))
    assert np.abs(small - large).max() <= 1e-5


def test_eos_equal_to_pad_is_still_scored(tiny, tiny_sequences):
    """The mask comes from lengths, so a PAD id that equals EOS never hides the final EOS."""
    eos = tiny.tokenizer.eos_token_id
    as_pad = sequence_losses(tiny.model, tiny_sequences, eos, EngineConfig(batch_size=8, progress=False))
    reference = np.array([naive_loss(tiny.model, s) for s in tiny_sequences])
    assert np.abs(as_pad - reference).max() <= 1e-5


def test_score_rows_pairs_each_row_with_its_neighbour(tiny):
    rows = make_rows(4)
    examples = encode_examples(rows, tiny.tokenizer)
    neighbors = np.array([1, 0, 3, 2])
    scores = score_rows(tiny, examples, ["a", "b", "c", "d"], [0, 1, 2, 3], neighbors,
                        np.ones(4, dtype=np.float32), ScoreConfig(progress=False, max_length=256))
    special = SpecialTokens.from_tokenizer(tiny.tokenizer)
    for row in scores:
        i = row["index"]
        zero = naive_loss(tiny.model, zero_shot_sequence(examples[i], special, 256)[0])
        one = naive_loss(tiny.model, one_shot_sequence(examples[i], examples[neighbors[i]], special, 256)[0])
        uncond = naive_loss(tiny.model, unconditional_sequence(examples[i], special, 256))
        assert row["zero_shot_loss"] == pytest.approx(zero, abs=1e-5)
        assert row["one_shot_loss"] == pytest.approx(one, abs=1e-5)
        assert row["miwv"] == pytest.approx(one - zero, abs=2e-5)
        assert row["ifd"] == pytest.approx(zero / uncond, abs=1e-5)
        assert row["neighbor_id"] == "abcd"[neighbors[i]]


@pytest.mark.parametrize("max_length", [256, 40])
def test_shared_zero_shot_passes_match_separate_ones(tiny, max_length):
    """Mutual neighbours share passes; truncated demos (max_length 40) must not, and both give naive numbers."""
    rows = make_rows(6, seed=3)
    examples = encode_examples(rows, tiny.tokenizer)
    neighbors = np.array([1, 0, 0, 4, 3, 3])
    special = SpecialTokens.from_tokenizer(tiny.tokenizer)
    scores = score_rows(tiny, examples, list("abcdef"), list(range(6)), neighbors, np.ones(6, dtype=np.float32),
                        ScoreConfig(progress=False, max_length=max_length))
    for row in scores:
        zero = naive_loss(tiny.model, zero_shot_sequence(examples[row["index"]], special, max_length)[0])
        assert row["zero_shot_loss"] == pytest.approx(zero, abs=1e-5)


def _random_model(architecture: str, attention: str):
    """Random float32 weights: Gemma-3 with a 6-token sliding window (shorter than every pass) in every other
    layer, or Llama (global attention only)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    sizes = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                 max_position_embeddings=512, attn_implementation=attention)
    if architecture == "gemma3":
        config = Gemma3TextConfig(**sizes, num_hidden_layers=4, head_dim=16, sliding_window=6,
                                  layer_types=["sliding_attention", "full_attention"] * 2)
        return Gemma3ForCausalLM(config).eval()
    return LlamaForCausalLM(LlamaConfig(**sizes, num_hidden_layers=2)).eval()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("architecture", ["gemma3", "llama"])
def test_rows_that_share_a_neighbour_share_one_exact_pass(architecture, attention):
    """Rows 3..29 have neighbours 0, 1 or 2: each neighbour's example is run once, with the rows' own tokens as
    branches after it, and every loss is still the naive one (each sequence alone, causal, no mask of ours)."""
    from miwv_lib.method.importance import plan_passes
    from miwv_lib.method.losses import span_losses, supports_branches

    rng = np.random.default_rng(0)
    examples = [EncodedExample(tuple(rng.integers(3, 97, rng.integers(2, 13)).tolist()),
                               tuple(rng.integers(3, 97, rng.integers(1, 11)).tolist())) for _ in range(30)]
    neighbors = np.array([1, 2, 0, *rng.integers(0, 3, 27)])
    plan = plan_passes(examples, list(range(30)), neighbors, SPECIAL, 64, True, pack_tokens=1024)
    per_row = plan_passes(examples, list(range(30)), neighbors, SPECIAL, 64, True, pack_tokens=0)
    assert sum(len(s.branches) > 1 for s in plan.sequences) == 3 and not any(s.branches for s in per_row.sequences)
    assert sum(map(len, (s.input_ids for s in plan.sequences))) < sum(map(len, (s.input_ids for s in per_row.sequences)))
    model = _random_model(architecture, attention)
    assert supports_branches(model)
    losses = span_losses(model, plan.sequences, 0, EngineConfig(batch_size=4, progress=False))
    assert set(plan.where) == {(kind, i) for kind in ("zero", "one", "uncond") for i in range(30)}
    for (kind, i), (n, span) in plan.where.items():
        sequence = {"zero": lambda: zero_shot_sequence(examples[i], SPECIAL, 64)[0],
                    "one": lambda: one_shot_sequence(examples[i], examples[neighbors[i]], SPECIAL, 64)[0],
                    "uncond": lambda: unconditional_sequence(examples[i], SPECIAL, 64)}[kind]()
        assert losses[n][span] == pytest.approx(naive_loss(model, sequence), abs=1e-5), (kind, i)


def test_batches_hold_similar_lengths_and_waste_at_most_max_padding_on_padding():
    from miwv_lib.method.losses import length_batches

    lengths = np.random.default_rng(2).integers(5, 400, 300).tolist()
    for cfg in (EngineConfig(batch_size=16, max_tokens_per_batch=2048), EngineConfig(batch_size=8, max_padding=0.2)):
        batches = length_batches(lengths, cfg)
        assert sorted(i for b in batches for i in b) == list(range(300))
        for b in batches:
            size = len(b) * lengths[b[0]]
            assert lengths[b[0]] == max(lengths[i] for i in b) and len(b) <= cfg.batch_size
            padding = size - sum(lengths[i] for i in b)
            assert len(b) == 1 or (size <= cfg.max_tokens_per_batch and padding <= cfg.max_padding * size)
    unbounded = length_batches(lengths, EngineConfig(batch_size=16, max_padding=1.0))  # by size alone: 16 a batch
    assert [len(b) for b in unbounded] == [16] * 18 + [12] and len(length_batches(lengths, EngineConfig())) > 19


def test_chunk_plan_keeps_the_rows_that_share_a_neighbour_with_it_and_covers_every_row():
    neighbors = np.array([5, 3, 0, 1, 7, 0, 2, 4])  # 2 and 5 take 0; 6 takes 2; pairs 0-5, 1-3, 4-7
    plan = chunk_plan(neighbors, chunk_rows=3)
    assert sorted(i for chunk in plan for i in chunk) == list(range(8))
    assert plan == [[0, 2, 5], [6, 1, 3], [4, 7]]  # from the cycle 0-5: 0, the rows taking it, then 6 taking 2
    rng = np.random.default_rng(1)  # a random neighbour graph: every row once, in chunks of the given size
    neighbors = (np.arange(500) + rng.integers(1, 500, 500)) % 500
    plan = chunk_plan(neighbors, chunk_rows=64)
    assert sorted(i for chunk in plan for i in chunk) == list(range(500)) and [len(c) for c in plan[:-1]] == [64] * 7
    place = np.argsort([i for chunk in plan for i in chunk])
    for k in range(500):  # the rows taking k come one after another, after k (but the cycle's first row, before it)
        after = sorted(place[i] for i in np.flatnonzero(neighbors == k) if place[i] > place[k])
        assert np.all(np.diff(after) == 1), k


# --- rows MIWV cannot be computed for, and the default maximum length ------------------------

def test_a_row_whose_demo_cannot_fit_has_no_miwv_and_is_never_selected(tiny):
    """Before: the one-shot pass held no demo, so one-shot = zero-shot and MIWV was a false 0.0 near the top."""
    rows = make_rows(6, seed=5)
    rows[2]["output"] = " ".join(["the quick dog runs past the green city"] * 30)  # fills max_length alone
    examples = encode_examples(rows, tiny.tokenizer)
    special = SpecialTokens.from_tokenizer(tiny.tokenizer)
    max_length = len(zero_shot_sequence(examples[2], special, 10_000)[0].input_ids)
    neighbors = np.array([1, 2, 1, 4, 3, 4])
    scores = score_rows(tiny, examples, list("abcdef"), list(range(6)), neighbors, np.ones(6, dtype=np.float32),
                        ScoreConfig(progress=False, max_length=max_length))
    row = scores[2]
    assert row["status"] == "no-demo" and row["truncation"] == {"demo": "all"}
    assert row["miwv"] is None and row["one_shot_loss"] is None
    assert row["zero_shot_loss"] == pytest.approx(naive_loss(tiny.model, zero_shot_sequence(examples[2], special,
                                                                                          max_length)[0]), abs=1e-5)
    assert row["ifd"] is not None  # IFD needs no demonstration
    assert all(s["status"] == "ok" and s["miwv"] is not None for s in scores if s["index"] != 2)
    assert 2 not in select_indices(scores, ratio=5 / 6, by="miwv")
    assert 2 not in select_indices(scores, ratio=5 / 6, by="low-miwv")
    under_1 = [{**s, "ifd": min(s["ifd"], 1.0)} for s in scores]  # the tiny random model's IFDs straddle 1
    assert 2 in select_indices(under_1, ratio=1.0, by="ifd")


def test_a_row_whose_response_has_no_token_has_no_miwv(tiny):
    """SmolLM2's tokenizer drops some control characters: a response made of them alone used to be scored on the
    EOS alone, as an ordinary MIWV."""
    rows = make_rows(6, seed=5)
    examples = encode_examples(rows, tiny.tokenizer)
    examples[3] = dataclasses.replace(examples[3], response=())
    neighbors = np.array([1, 2, 1, 4, 3, 4])
    scores = score_rows(tiny, examples, list("abcdef"), list(range(6)), neighbors, np.ones(6, dtype=np.float32),
                        ScoreConfig(progress=False))
    assert scores[3]["status"] == "no-response" and scores[3]["miwv"] is None and scores[3]["ifd"] is None
    assert scores[3]["response_tokens"] == 0 and scores[3]["zero_shot_loss"] is not None  # the EOS's loss, kept
    assert all(s["status"] == "ok" and s["miwv"] is not None for s in scores if s["index"] != 3)
    under_1 = [{**s, "ifd": None if s["ifd"] is None else min(s["ifd"], 1.0)} for s in scores]  # see above
    assert 3 not in select_indices(scores, ratio=5 / 6, by="miwv") + select_indices(under_1, ratio=5 / 6, by="ifd")


@pytest.mark.parametrize("value", [0, 1, -5])
def test_a_max_length_that_holds_no_response_token_is_refused(value):
    with pytest.raises(ValueError, match="cannot hold a single response token"):
        ScoreConfig(max_length=value)


@pytest.mark.parametrize("value", [1.5, "long", "256", None, True])
def test_a_max_length_that_is_not_an_integer_is_refused_as_such(value):
    with pytest.raises(ValueError, match=f"expected 'auto' or an integer of at least 2, got {value!r}"):
        ScoreConfig(max_length=value)


def test_auto_max_length_is_the_longest_one_shot_sequence_capped_at_the_context_window(tiny):
    examples = encode_examples(make_rows(8, seed=2), tiny.tokenizer)
    special = SpecialTokens.from_tokenizer(tiny.tokenizer)
    neighbors = np.array([7, 0, 1, 2, 3, 4, 5, 6])
    lengths = one_shot_lengths(examples, neighbors, special)
    assert lengths == [len(one_shot_sequence(examples[i], examples[k], special, 10_000)[0].input_ids)
                       for i, k in enumerate(neighbors)]
    assert resolve_max_length("auto", lengths, tiny.model) == max(lengths)
    assert resolve_max_length("auto", [10**6], tiny.model) == tiny.model.config.max_position_embeddings
    assert resolve_max_length(300, lengths, tiny.model) == 300
    assert ScoreConfig().max_length == "auto"


def test_the_default_max_length_cuts_no_row_of_the_local_pool(shared_data_dir):
    """Whatever the neighbours: even the longest example as every row's demo fits Gemma-3's window uncut."""
    from miwv_lib.data.datasets import load_instructions
    from miwv_lib.data.models import load_tokenizer

    pool = load_instructions("alpaca", data_dir=shared_data_dir)
    tokenizer = load_tokenizer("gemma-3-270m")
    examples = encode_examples(pool.rows, tokenizer)
    special = SpecialTokens.from_tokenizer(tokenizer)
    longest = max(range(len(examples)), key=lambda i: len(examples[i].prompt) + len(examples[i].response))
    worst = np.full(len(examples), longest)
    worst[longest] = 0
    lengths = one_shot_lengths(examples, worst, special)

    class Gemma270m:  # its context window, without loading the weights
        config = type("Config", (), {"max_position_embeddings": 32_768})()

    max_length = resolve_max_length(ScoreConfig().max_length, lengths, Gemma270m)
    assert max_length == max(lengths) < 32_768
    cuts = [one_shot_sequence(examples[i], examples[k], special, max_length)[1] for i, k in enumerate(worst)]
    assert not any(cut.as_dict() for cut in cuts)


@pytest.mark.parametrize("damage", ["edit an index", "torn", "not json", "wrong length", "self as neighbour"])
def test_a_damaged_neighbours_file_is_computed_again(tmp_path, damage):
    from miwv_lib.experiments.score import _cached_neighbors

    path, key = tmp_path / "neighbors.json", {"embedder": "e", "data": "d"}
    calls = []

    def compute():
        calls.append(1)
        return np.array([1, 2, 0]), np.array([0.5, 0.25, 0.125], dtype=np.float32)

    first = _cached_neighbors(path, key, 3, compute)
    assert _cached_neighbors(path, key, 3, compute)[0].tolist() == [1, 2, 0] and len(calls) == 1  # read back
    saved = json.loads(path.read_text())
    if damage == "edit an index":
        saved["neighbor_index"][0] = 2  # still a valid other row: only the checksum tells
    elif damage == "wrong length":
        saved["neighbor_index"].append(1)
    elif damage == "self as neighbour":
        saved["neighbor_index"][1] = 1
    text = json.dumps(saved)
    path.write_text({"torn": text[: len(text) // 2], "not json": "\x00\x01"}.get(damage, text))
    with pytest.warns(UserWarning, match="damaged"):
        again = _cached_neighbors(path, key, 3, compute)
    assert len(calls) == 2 and again[0].tolist() == first[0].tolist()
    assert json.loads(path.read_text())["neighbor_index"] == [1, 2, 0]  # repaired on disk


class _WrappedHead(torch.nn.Module):
    """A head that is not a plain ``nn.Linear`` (as a LoRA or quantised layer is): the engine must call it."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, hidden):
        return 0.5 * self.linear(hidden)


@pytest.mark.parametrize("head_block", [None, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head", ["tied", "bias", "wrapped", "softcap"])
def test_every_kind_of_lm_head_gives_the_naive_losses(head, dtype, head_block):
    """The head writes each block of logits into one reused buffer and combines the blocks' log-sum-exps: a head
    with a bias, a wrapped head and Gemma's soft-capped logits must still give the naive losses, in chunks (3)
    that do not divide the positions and in blocks (10) that do not divide the vocabulary (97)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    model = _random_model("llama", "sdpa")
    if head == "softcap":
        torch.manual_seed(0)
        model = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                   head_dim=16, final_logit_softcapping=0.5)).eval()
    elif head == "bias":
        linear = torch.nn.Linear(32, 97, bias=True)
        model.set_output_embeddings(linear)
    elif head == "wrapped":
        model.set_output_embeddings(_WrappedHead(model.get_output_embeddings()))
    model = model.to(dtype)
    rng = np.random.default_rng(1)
    examples = [EncodedExample(tuple(rng.integers(3, 97, rng.integers(2, 13)).tolist()),
                               tuple(rng.integers(3, 97, rng.integers(1, 11)).tolist())) for _ in range(6)]
    sequences = [zero_shot_sequence(e, SPECIAL, 64)[0] for e in examples]
    got = sequence_losses(model, sequences, 0, EngineConfig(batch_size=1, head_chunk=3, head_block=head_block,
                                                            progress=False))
    reference = np.array([naive_loss(model, s) for s in sequences])
    # Batches of one: the body's numbers are naive's. In bf16 naive soft-caps bf16 logits, the engine float32 ones.
    assert np.abs(got - reference).max() <= (1e-3 if head == "softcap" and dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("logits", ["ordinary", "over 88", "all under -40"])
def test_the_unshifted_log_sum_exp_falls_back_where_float32_exp_would_overflow_or_underflow(logits, monkeypatch):
    """The head sums exp(logit) without subtracting each row's maximum first (two passes over a block, not four).
    Logits over 88 overflow float32's exp and logits far below 0 underflow it: those chunks must go through
    again shifted, and give float64's cross-entropy; ordinary logits must not pay for the second pass."""
    model = _random_model("llama", "sdpa")
    head = torch.nn.Linear(32, 97, bias=True)
    with torch.no_grad():
        if logits == "over 88":
            head.weight.mul_(400.0)
        elif logits == "all under -40":
            head.bias.fill_(-300.0)
    model.set_output_embeddings(head)
    shifted = []
    monkeypatch.setattr(losses, "_log_sum_exp_", lambda x, shift, inner=losses._log_sum_exp_: (
        shifted.append(shift) or inner(x, shift)))
    rng = np.random.default_rng(2)
    examples = [EncodedExample(tuple(rng.integers(3, 97, 6).tolist()), tuple(rng.integers(3, 97, 5).tolist()))
                for _ in range(4)]
    sequences = [zero_shot_sequence(e, SPECIAL, 64)[0] for e in examples]
    got = sequence_losses(model, sequences, 0, EngineConfig(head_chunk=7, head_block=10, progress=False))
    reference = [naive_loss(model, s, torch.float64) for s in sequences]
    np.testing.assert_allclose(got, reference, rtol=1e-6, atol=1e-5)
    assert any(shifted) == (logits != "ordinary")


def test_a_token_outside_the_lm_head_is_an_error_not_a_loss():
    model = _random_model("llama", "sdpa")  # 97 embeddings
    model.set_output_embeddings(torch.nn.Linear(32, 90, bias=False))  # a head read in blocks never indexes row 93
    sequence = zero_shot_sequence(EncodedExample((5, 6, 7), (8, 93)), SPECIAL, 64)[0]
    with pytest.raises(ValueError, match="token id 93 is outside the LM head's 90 rows"):
        sequence_losses(model, [sequence], 0, EngineConfig(head_block=10, progress=False))
