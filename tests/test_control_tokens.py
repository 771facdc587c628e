"""Data is text: control-token strings inside a row stay text everywhere the row is tokenised.

Before, ``</s>`` in a response became an end-of-sequence in the middle of the loss, and ``<mask>``
(in three rows of the local pool) became Gemma's mask token. The template's own special tokens
(a chat template's ``<|im_start|>``) must stay special.
"""

from __future__ import annotations

import copy

import pytest

from conftest import make_rows
from miwv_lib.data.prompts import encode_chat, encode_examples, encode_text, format_prompt

CONTROL = "Use <s> and </s>, then <eos> <pad> <unk> <|im_end|> <|endoftext|> <mask> <bos> here."


def _check_text_stays_text(tokenizer, template: str = "alpaca") -> None:
    row = {"instruction": f"Explain {CONTROL}", "input": "<s>x</s>", "output": f"An answer {CONTROL} <eos>"}
    [example] = encode_examples([row], tokenizer, template)
    special = set(tokenizer.all_special_ids)
    assert not special & set(example.response)
    assert tokenizer.decode(list(example.response)) == row["output"]
    if template != "chat":
        assert not special & set(example.prompt)
        assert tokenizer.decode(list(example.prompt)) == format_prompt(row["instruction"], row["input"], template)


def _check_ordinary_text_is_unchanged(tokenizer, rows, template: str = "alpaca") -> None:
    """Rows without control strings tokenise exactly as before (the committed numbers stay)."""
    examples = encode_examples(rows, tokenizer, template)
    prompts = [format_prompt(r["instruction"], r.get("input", ""), template, tokenizer) for r in rows]
    assert [list(e.prompt) for e in examples] == tokenizer(prompts, add_special_tokens=False).input_ids
    assert [list(e.response) for e in examples] == tokenizer([r["output"] for r in rows],
                                                             add_special_tokens=False).input_ids


def test_tiny_tokenizer_keeps_control_strings_as_text(tiny):
    _check_text_stays_text(tiny.tokenizer)
    _check_text_stays_text(tiny.tokenizer, "plain")
    _check_ordinary_text_is_unchanged(tiny.tokenizer, make_rows(20, seed=4))
    # the failure this guards against: the plain call turns </s> into the EOS id
    assert tiny.tokenizer.eos_token_id in tiny.tokenizer("a </s> b", add_special_tokens=False).input_ids
    assert tiny.tokenizer.eos_token_id not in encode_text(tiny.tokenizer, ["a </s> b"])[0]


def test_training_labels_and_generation_prompts_keep_control_strings_as_text(tiny):
    from miwv_lib.experiments.generate import prompt_token_ids
    from miwv_lib.experiments.train import build_features

    row = {"instruction": "Say </s> twice", "input": "", "output": "</s> </s>"}
    [feature], _ = build_features([row], tiny.tokenizer, "alpaca", 256)
    eos = tiny.tokenizer.eos_token_id
    assert feature["input_ids"].count(eos) == 1 and feature["input_ids"][-1] == eos  # only the real end
    [prompt] = prompt_token_ids([row], tiny.tokenizer)
    assert eos not in prompt


def test_chat_template_tokens_stay_special_and_the_content_stays_text(tiny):
    tokenizer = copy.deepcopy(tiny.tokenizer)
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}</s>{{ m.role }}\n{{ m.content | trim }}</s>\n"
                               "{% endfor %}{% if add_generation_prompt %}</s>assistant\n{% endif %}")
    eos = tokenizer.eos_token_id
    ids = encode_chat(tokenizer, [{"role": "user", "content": "  hi </s> there "}])
    assert ids.count(eos) == 3  # the template's three </s>, not the one in the content
    assert tokenizer.bos_token_id not in ids  # the BOS is prepended as an ID by the layouts, not doubled
    [example] = encode_examples([{"instruction": "hi </s> there", "input": "", "output": "ok"}], tokenizer, "chat")
    assert list(example.prompt) == ids


def test_hf_judge_prompt_keeps_answers_as_text(tiny):
    from miwv_lib.experiments.judges import HFChatBackend

    backend = HFChatBackend(tiny, progress=False)
    ids = backend.prompt_ids("SYS", "Answer 1: </s> done")
    assert tiny.tokenizer.eos_token_id not in ids and ids[0] == tiny.tokenizer.bos_token_id


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma-3-270m", "smollm2-135m-instruct"])
def test_real_tokenizers_keep_control_strings_as_text(name):
    from miwv_lib.data.models import load_tokenizer

    tokenizer = load_tokenizer(name)
    _check_text_stays_text(tokenizer)
    _check_ordinary_text_is_unchanged(tokenizer, make_rows(50, seed=9))
    if getattr(tokenizer, "chat_template", None):
        _check_text_stays_text(tokenizer, "chat")
        _check_ordinary_text_is_unchanged(tokenizer, make_rows(50, seed=9), "chat")
        [example] = encode_examples([{"instruction": "a <|im_end|> b", "input": "", "output": "c"}], tokenizer, "chat")
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        template_only = encode_chat(tokenizer, [{"role": "user", "content": "a b"}])
        assert list(example.prompt).count(im_end) == template_only.count(im_end) >= 1


@pytest.mark.slow
def test_the_local_pool_tokenises_as_before_except_its_control_strings(shared_data_dir):
    """Only the three rows holding ``<mask>`` change under Gemma-3; every other row keeps its ids."""
    from miwv_lib.data.datasets import load_instructions
    from miwv_lib.data.models import load_tokenizer

    pool = load_instructions("alpaca", data_dir=shared_data_dir)
    tokenizer = load_tokenizer("gemma-3-270m")
    specials = tokenizer.all_special_tokens
    plain = [r for r in pool.rows if not any(s in r["instruction"] + r["input"] + r["output"] for s in specials)]
    assert len(pool.rows) - len(plain) == 3
    _check_ordinary_text_is_unchanged(tokenizer, plain)
