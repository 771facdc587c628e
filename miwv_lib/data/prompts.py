"""Prompt templates and the one tokenisation shared by scoring, training and generation: prompt and response are
tokenised separately and their IDs concatenated, so the boundary is exact (never inferred from string lengths)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from ..method.layouts import EncodedExample, SpecialTokens

# Verbatim from Stanford Alpaca's train.py (PROMPT_DICT). Alpaca appends the response directly
# after "### Response:" and trains on ``output + eos``; we keep that exactly.
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")


class TemplateError(ValueError):
    """A template this model's tokenizer cannot render (a user's choice of settings, not a bug)."""


DEFAULT_TEMPLATE = "alpaca"
TEMPLATES = (DEFAULT_TEMPLATE, "plain", "chat")
# The text templates: (with an input, without one).
_TEXT_TEMPLATES = {"alpaca": (ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT),
                   "plain": ("{instruction}\n\n{input}\n\n", "{instruction}\n\n")}


def format_prompt(instruction: str, input: str = "", template: str = DEFAULT_TEMPLATE,
                  tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """The text placed before the response."""
    if template in _TEXT_TEMPLATES:
        return _TEXT_TEMPLATES[template][0 if input else 1].format(instruction=instruction, input=input)
    if template != "chat":
        raise ValueError(f"template must be one of {TEMPLATES}; got {template!r}")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise TemplateError("template 'chat' needs a tokenizer with a chat template, and this model's has none; use "
                            "'alpaca' or 'plain'")
    content = _chat_content({"instruction": instruction, "input": input})
    return strip_prepended_bos(_render(tokenizer, ["user"], [content]), tokenizer)


def strip_prepended_bos(text: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """Drop a leading BOS text that the tokenizer also prepends as an ID, so it is not doubled. A BOS the tokenizer
    never prepends (SmolLM2's is <|im_start|>) is part of the chat template and stays."""
    bos = tokenizer.bos_token
    prepended = bos and text.startswith(bos) and SpecialTokens.from_tokenizer(tokenizer).bos is not None
    return text[len(bos):] if prepended else text


def encode_text(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token IDs of data text, without special tokens. Data is text: a ``</s>``, ``<eos>`` or ``<mask>`` inside an
    instruction or a response must not become the tokenizer's control token (an end-of-sequence mid-response, say)."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True).input_ids


_SLOT = "\x00MIWV-SLOT\x00"  # a string no chat template alters and no data row holds


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """The chat template's IDs with ``add_generation_prompt``: its own tokens special, each message's content text."""
    return encode_chats(tokenizer, [messages])[0]


def encode_chats(tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict[str, str]]]) -> list[list[int]]:
    """``encode_chat`` for conversations with the same roles: the template's frame around the contents is rendered
    and tokenised once, special tokens and all (no prepended BOS); the contents are tokenised as text."""
    if not conversations:
        return []
    roles = [m["role"] for m in conversations[0]]
    frames = _render(tokenizer, roles, [_SLOT] * len(roles)).split(_SLOT)  # the template's text around the contents
    contents = [_rendered_contents(tokenizer, frames, messages) for messages in conversations]
    frame_ids = tokenizer([strip_prepended_bos(frames[0], tokenizer), *frames[1:]], add_special_tokens=False).input_ids
    content_ids = encode_text(tokenizer, [text for texts in contents for text in texts])
    n = len(roles)
    return [_interleave(frame_ids, content_ids[k * n : (k + 1) * n]) for k in range(len(conversations))]


def _render(tokenizer: PreTrainedTokenizerBase, roles: list[str], contents: list[str]) -> str:
    return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in zip(roles, contents)],
                                         tokenize=False, add_generation_prompt=True)


def _rendered_contents(tokenizer: PreTrainedTokenizerBase, frames: list[str],
                       messages: list[dict[str, str]]) -> list[str]:
    """The contents as the template renders them between its frames: as given, or trimmed."""
    real = _render(tokenizer, [m["role"] for m in messages], [m["content"] for m in messages])
    for contents in ([m["content"] for m in messages], [m["content"].strip() for m in messages]):
        if real == _interleave(frames, contents):
            return contents
    raise TemplateError("the chat template changes the message text in a way this tokenisation cannot follow")


def _interleave(frames: list, contents: list) -> str | list[int]:
    """``frames[0] + contents[0] + frames[1] + ... + frames[-1]``, of strings or of lists of token IDs."""
    joined = frames[0]
    for content, frame in zip(contents, frames[1:]):
        joined = joined + content + frame
    return joined


def _chat_content(row: dict) -> str:
    return f"{row['instruction']}\n\n{row['input']}" if row.get("input") else row["instruction"]


def encode_examples(rows: list[dict], tokenizer: PreTrainedTokenizerBase, template: str = DEFAULT_TEMPLATE,
                    batch_size: int = 1024) -> list[EncodedExample]:
    """Prompt (no BOS) and response of each row, tokenised separately; only a chat template's tokens are special."""
    encoded: list[EncodedExample] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        if template != "chat":  # alpaca and plain hold no special token of their own
            prompts = [format_prompt(r["instruction"], r.get("input", ""), template) for r in chunk]
            prompt_ids = encode_text(tokenizer, prompts)
        else:
            format_prompt("", "", "chat", tokenizer)  # the clear error for a tokenizer without a chat template
            prompt_ids = encode_chats(tokenizer, [[{"role": "user", "content": _chat_content(r)}] for r in chunk])
        response_ids = encode_text(tokenizer, [r.get("output", "") for r in chunk])
        encoded.extend(EncodedExample(tuple(p), tuple(r)) for p, r in zip(prompt_ids, response_ids))
    return encoded
