"""Prompt templates and the one tokenisation shared by scoring, training and generation.

The prompt and the response are tokenised separately and their token IDs concatenated, so
the boundary between them is exact (never inferred from string lengths).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

# Verbatim from Stanford Alpaca's train.py (PROMPT_DICT). Alpaca appends the response directly
# after "### Response:" and trains on ``output + eos``; we keep that exactly.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
PLAIN_PROMPT_INPUT = "{instruction}\n\n{input}\n\n"
PLAIN_PROMPT_NO_INPUT = "{instruction}\n\n"

TEMPLATES = ("alpaca", "plain", "chat")


def format_prompt(instruction: str, input: str = "", template: str = "alpaca",
                  tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """The text placed before the response."""
    if template == "alpaca":
        fmt = ALPACA_PROMPT_INPUT if input else ALPACA_PROMPT_NO_INPUT
        return fmt.format_map({"instruction": instruction, "input": input})
    if template == "plain":
        fmt = PLAIN_PROMPT_INPUT if input else PLAIN_PROMPT_NO_INPUT
        return fmt.format_map({"instruction": instruction, "input": input})
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template='chat' needs a tokenizer with a chat template; use 'alpaca' or 'plain'")
        content = f"{instruction}\n\n{input}" if input else instruction
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        return strip_prepended_bos(text, tokenizer)
    raise ValueError(f"template must be one of {TEMPLATES}; got {template!r}")


def strip_prepended_bos(text: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """Drop a leading BOS text that the tokenizer also prepends as an ID, so it is not doubled.

    A BOS the tokenizer never prepends (SmolLM2's is <|im_start|>) is part of the chat template and stays.
    """
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and SpecialTokens.from_tokenizer(tokenizer).bos is not None:
        return text[len(bos):]
    return text


def resolve_template(template: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """``auto``: the chat template when the tokenizer has one, else Alpaca's."""
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of auto, {', '.join(TEMPLATES)}; got {template!r}")
    return template


@dataclass(frozen=True)
class EncodedExample:
    """Token IDs of one example, without special tokens; ``bos``/``eos`` are added by the layouts."""

    prompt: tuple[int, ...]
    response: tuple[int, ...]


@dataclass(frozen=True)
class SpecialTokens:
    bos: int | None  # None when the tokenizer does not prepend a BOS
    eos: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> "SpecialTokens":
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; the response loss includes the final EOS")
        probe = tokenizer("a").input_ids
        uses_bos = tokenizer.bos_token_id is not None and len(probe) > 0 and probe[0] == tokenizer.bos_token_id
        return cls(bos=tokenizer.bos_token_id if uses_bos else None, eos=tokenizer.eos_token_id)

    @property
    def prefix(self) -> tuple[int, ...]:
        return () if self.bos is None else (self.bos,)


def encode_examples(rows: list[dict], tokenizer: PreTrainedTokenizerBase, template: str = "alpaca",
                    batch_size: int = 1024) -> list[EncodedExample]:
    """Tokenise prompt and response of each row separately (fast tokenizer, batched)."""
    encoded: list[EncodedExample] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [format_prompt(r["instruction"], r.get("input", ""), template, tokenizer) for r in chunk]
        responses = [r.get("output", "") for r in chunk]
        prompt_ids = tokenizer(prompts, add_special_tokens=False).input_ids
        response_ids = tokenizer(responses, add_special_tokens=False).input_ids
        encoded.extend(EncodedExample(tuple(p), tuple(r)) for p, r in zip(prompt_ids, response_ids))
    return encoded
