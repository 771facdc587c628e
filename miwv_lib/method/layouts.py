"""The token layouts of MIWV; each loss is the mean cross-entropy over ``response_i [EOS]``, the same tokens in all:

* zero-shot of sample i:   ``[BOS] prompt_i response_i [EOS]``
* one-shot of sample i:    ``[BOS] prompt_k response_k [EOS] prompt_i response_i [EOS]`` (neighbour k first)
* unconditional (IFD):     ``[BOS] response_i [EOS]``, and ``[EOS] response_i [EOS]`` for a tokenizer without a BOS
* fine-tuning:             the zero-shot layout, but a long row loses its response's end, never its prompt

Prompt and response are tokenised separately (``data.prompts``), so the boundary between them is exact. A scored
token is predicted from the token before it, so every layout keeps one: the BOS, or the prompt's last token."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
    def from_tokenizer(cls, tokenizer) -> SpecialTokens:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; the response loss includes the final EOS")
        bos = tokenizer.bos_token_id
        return cls(bos=bos if tokenizer("a").input_ids[:1] == [bos] else None, eos=tokenizer.eos_token_id)

    @property
    def prefix(self) -> tuple[int, ...]:
        return () if self.bos is None else (self.bos,)

    @property
    def start(self) -> tuple[int, ...]:
        """What opens a pass with no prompt: the BOS, or else the EOS that ends the text before (SmolLM2 has no BOS)."""
        return self.prefix or (self.eos,)

    @property
    def layout_version(self) -> int:
        """Part of every fingerprint. Version 2 changed only tokenizers without a BOS: version 1 predicted their IFD
        pass's first token from no token at all, so a cache of version 1 must not be reused for them."""
        return LAYOUT_VERSION if self.bos is not None else 2


LAYOUT_VERSION = 1  # bump when the token layout changes (see ``SpecialTokens.layout_version``)


@dataclass(frozen=True)
class Sequence:
    """One forward pass: the loss is the mean over the last ``n_targets`` tokens of ``input_ids``. ``extra_spans``
    are ``(stop, n)`` spans, tokens ``[stop - n, stop)``, read from the same pass: a one-shot sequence opens with the
    neighbour's zero-shot sequence, whose loss so comes for free (causal attention never looks ahead)."""

    input_ids: tuple[int, ...]
    n_targets: int
    extra_spans: tuple[tuple[int, int], ...] = ()
    # Where the branches of a shared prefix start: tokens [0, branches[0]) are a prefix that every branch
    # [branches[j], branches[j+1]) sees as if it stood right after it (its positions continue the prefix's), and
    # no branch sees another. Empty: one ordinary causal sequence.
    branches: tuple[int, ...] = ()

    @property
    def spans(self) -> tuple[tuple[int, int], ...]:
        return ((len(self.input_ids), self.n_targets), *self.extra_spans)


@dataclass
class Truncation:
    """How many tokens ``max_length`` removed, per part. All zero when nothing was cut."""

    demo: int = 0  # cut from the left of the neighbour's example (one-shot only)
    prompt: int = 0  # cut from the left of sample i's prompt (both passes alike)
    response: int = 0  # cut from the right of sample i's response, EOS included (both passes alike)
    demo_kept: int | None = None  # tokens of the neighbour's example left in the one-shot sequence

    @property
    def no_demo(self) -> bool:
        """Nothing of the demonstration fits: the one-shot pass would be the zero-shot pass, MIWV a false 0."""
        return self.demo_kept == 0

    def as_dict(self) -> dict[str, int | str]:
        cut = {"demo": "all" if self.no_demo else self.demo, "prompt": self.prompt, "response": self.response}
        return {part: n for part, n in cut.items() if n}


def _sample_body(example: EncodedExample, special: SpecialTokens, max_length: int) -> tuple[list[int], int, Truncation]:
    """Sample i's ``prompt response [EOS]`` fitted into ``max_length`` with its BOS: (tokens, n_targets, cuts).
    The prompt is trimmed from the left; only a response too long on its own is cut (from the right, in every pass),
    to ``max_length - 1`` tokens: one token (the BOS, or else the prompt's last) must stand before the first target."""
    room = max_length - len(special.prefix)
    cut = Truncation(response=max(len(example.response) + 2 - max_length, 0))
    targets = [*example.response, special.eos][:max_length - 1]
    cut.prompt = max(len(example.prompt) + len(targets) - room, 0)
    return [*example.prompt[cut.prompt:], *targets], len(targets), cut


def zero_shot_sequence(example: EncodedExample, special: SpecialTokens, max_length: int) -> tuple[Sequence, Truncation]:
    body, n_targets, cut = _sample_body(example, special, max_length)
    return Sequence((*special.prefix, *body), n_targets), cut


def one_shot_sequence(example: EncodedExample, demo: EncodedExample, special: SpecialTokens,
                      max_length: int) -> tuple[Sequence, Truncation]:
    body, n_targets, cut = _sample_body(example, special, max_length)
    demo_body = [*demo.prompt, *demo.response, special.eos]
    cut.demo = max(len(demo_body) - max(max_length - len(special.prefix) - len(body), 0), 0)
    demo_body = demo_body[cut.demo:]  # trim the demo from the left: keep what sits next to x_i
    cut.demo_kept = len(demo_body)
    return Sequence((*special.prefix, *demo_body, *body), n_targets), cut


def unconditional_sequence(example: EncodedExample, special: SpecialTokens, max_length: int) -> Sequence:
    body, n_targets, _ = _sample_body(example, special, max_length)
    return Sequence((*special.start, *body[len(body) - n_targets:]), n_targets)


def training_sequence(example: EncodedExample, special: SpecialTokens, max_length: int) -> tuple[Sequence, Truncation]:
    """Fine-tuning's layout, ``[BOS] prompt response [EOS]`` as the zero-shot pass, but cut from the right (Alpaca's
    recipe): a model is never taught an answer to an instruction cut out of its view. Only a prompt that leaves no
    room for one response token is trimmed from the left, as the scorer trims it."""
    room, targets = max_length - len(special.prefix), [*example.response, special.eos]
    kept = min(len(targets), max(room - len(example.prompt), 1))
    cut = Truncation(prompt=max(len(example.prompt) + kept - room, 0), response=len(targets) - kept)
    return Sequence((*special.prefix, *example.prompt[cut.prompt:], *targets[:kept]), kept), cut


AUTO_MAX_LENGTH = "auto"
MIN_MAX_LENGTH = 2  # a token to predict from and one response token: anything shorter holds no target at all


def max_length_rule(value: int | str, *, allow_auto: bool = True) -> str | None:
    """What is wrong with a maximum length (``auto`` or an int ≥ 2), or None; checked before any model loads."""
    if value == AUTO_MAX_LENGTH and allow_auto:
        return None
    allowed = f"{AUTO_MAX_LENGTH!r} or an integer" if allow_auto else "an integer"
    if isinstance(value, bool) or not isinstance(value, int):
        return f"expected {allowed} of at least {MIN_MAX_LENGTH}, got {value!r}"
    if value < MIN_MAX_LENGTH:
        return (f"{value!r} cannot hold a single response token once the prompt is cut away; use {allowed} of at "
                f"least {MIN_MAX_LENGTH}")
    return None


def parse_max_length(text: str) -> int | str:
    return text if text == AUTO_MAX_LENGTH else int(text)


parse_max_length.kind = f"{AUTO_MAX_LENGTH!r} or an integer"


def text_config(model):
    """The language model's configuration (a multimodal model such as Gemma-3 4B nests it)."""
    return getattr(model.config, "text_config", None) or model.config


def context_window(model) -> int | None:
    """The most positions the model was built for, when its configuration says."""
    window = getattr(text_config(model), "max_position_embeddings", None)
    return window if isinstance(window, int) and window > 0 else None


def resolve_max_length(setting: int | str, needed: list[int], model) -> int:
    """``auto``: the longest sequence ``needed``, capped at the model's context window; an int as it is."""
    if problem := max_length_rule(setting):
        raise ValueError(f"max_length: {problem}")
    if setting != AUTO_MAX_LENGTH:
        return int(setting)
    window, longest = context_window(model), max(needed, default=MIN_MAX_LENGTH)
    return max(MIN_MAX_LENGTH, min(longest, window) if window else longest)


def one_shot_lengths(examples: list[EncodedExample], neighbor_index: np.ndarray, special: SpecialTokens,
                     indices: list[int] | None = None) -> list[int]:
    """Untruncated length of each row's one-shot sequence (all rows, or ``indices``)."""
    def body(i: int) -> int:
        return len(examples[i].prompt) + len(examples[i].response) + 1

    rows = range(len(examples)) if indices is None else indices
    return [len(special.prefix) + body(int(neighbor_index[i])) + body(i) for i in rows]
