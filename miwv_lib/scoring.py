"""Steps 2–4 of MIWV: zero-shot loss, one-shot loss, and their difference.

Token layout (every sequence ends with the tokens the loss is taken over):

* zero-shot of sample i:   ``[BOS] prompt_i response_i [EOS]``
* one-shot of sample i:    ``[BOS] prompt_k response_k [EOS] prompt_i response_i [EOS]``
  (the neighbour k's full zero-shot sequence, then sample i's without its BOS)
* unconditional (IFD):     ``[BOS] response_i [EOS]``

The loss of each is the mean cross-entropy over ``response_i [EOS]``, the same tokens in all
three. Because those tokens always sit at the end of the sequence, the engine gathers hidden
states only there and applies the LM head to them alone: it never builds a
batch × sequence × vocabulary logits tensor.
"""

from __future__ import annotations

import json
import warnings
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import record_function
from tqdm.auto import tqdm

from .data import InstructionPool, format_source_text
from .io import file_sha256, read_jsonl, stable_hash, write_json, write_jsonl
from .models import DEFAULT_MODEL, LoadedModel, ModelLoadError, load_model
from .neighbors import DEFAULT_EMBEDDER, SELF_EMBEDDER, embed_texts, load_embedder, model_embeddings, nearest_neighbors
from .prompts import TEMPLATES, EncodedExample, SpecialTokens, encode_examples
from .distributed import Shard, barrier, from_main, init_from_env
from .runs import FingerprintMismatch, PartialResults, check_fingerprint, environment_info, now
from .schema import boolean, check, integer, setting, text
from .selection import scores_changed

LAYOUT_VERSION = 1  # bump when the token layout changes: it is part of every fingerprint


# --- the paper's equations -------------------------------------------------------------------

def response_loss(token_nll: torch.Tensor) -> float:
    """L(y | context) = −(1/|y|) Σ_t log p(y_t | context, y_<t), given the per-token −log p."""
    return token_nll.mean().item()


def miwv(one_shot_loss: float, zero_shot_loss: float) -> float:
    """MIWV = L(y_i | C_k, x_i) − L(y_i | x_i). Positive: the similar example made the model worse."""
    return one_shot_loss - zero_shot_loss


def ifd(conditional_loss: float, unconditional_loss: float) -> float:
    """IFD (Cherry LLM) = L(y | x) / L(y): how much the instruction helps predict the response."""
    return conditional_loss / unconditional_loss if unconditional_loss > 0 else math.nan


# --- token layouts ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Sequence:
    """One forward pass: the loss is the mean over the last ``n_targets`` tokens of ``input_ids``.

    ``extra_spans`` are further ``(stop, n)`` spans whose loss over tokens ``[stop - n, stop)`` is read
    from the same pass: a one-shot sequence starts with the neighbour's exact zero-shot sequence, so
    the neighbour's zero-shot loss comes out of it for free (causal attention never looks ahead).
    """

    input_ids: tuple[int, ...]
    n_targets: int
    extra_spans: tuple[tuple[int, int], ...] = ()

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
        cut: dict[str, int | str] = {k: v for k, v in
                                     (("demo", self.demo), ("prompt", self.prompt), ("response", self.response)) if v}
        if self.no_demo:
            cut["demo"] = "all"
        return cut


def _sample_body(example: EncodedExample, special: SpecialTokens, max_length: int) -> tuple[list[int], int, Truncation]:
    """Sample i's ``prompt response [EOS]`` fitted into ``max_length`` with its BOS; returns (tokens, n_targets, cuts).

    The prompt is trimmed from the left first; only a response that cannot fit on its own is
    cut (from the right), and then identically in every pass, so losses stay comparable.
    """
    room = max_length - len(special.prefix)
    targets = [*example.response, special.eos]
    cut = Truncation()
    if len(targets) > room:
        cut.response = len(targets) - room
        targets = targets[:room]
    prompt = list(example.prompt)
    if len(prompt) + len(targets) > room:
        keep = room - len(targets)
        cut.prompt = len(prompt) - keep
        prompt = prompt[len(prompt) - keep:]
    return prompt + targets, len(targets), cut


def zero_shot_sequence(example: EncodedExample, special: SpecialTokens, max_length: int) -> tuple[Sequence, Truncation]:
    body, n_targets, cut = _sample_body(example, special, max_length)
    return Sequence((*special.prefix, *body), n_targets), cut


def one_shot_sequence(example: EncodedExample, demo: EncodedExample, special: SpecialTokens,
                      max_length: int) -> tuple[Sequence, Truncation]:
    body, n_targets, cut = _sample_body(example, special, max_length)
    demo_body = [*demo.prompt, *demo.response, special.eos]
    room = max_length - len(special.prefix) - len(body)
    if len(demo_body) > room:
        cut.demo = len(demo_body) - max(room, 0)
        demo_body = demo_body[cut.demo:]  # trim the demo from the left: keep what sits next to x_i
    cut.demo_kept = len(demo_body)
    return Sequence((*special.prefix, *demo_body, *body), n_targets), cut


def unconditional_sequence(example: EncodedExample, special: SpecialTokens, max_length: int) -> Sequence:
    body, n_targets, _ = _sample_body(example, special, max_length)
    return Sequence((*special.prefix, *body[len(body) - n_targets:]), n_targets)


# --- the batched engine ----------------------------------------------------------------------

@dataclass
class EngineConfig:
    batch_size: int = 16  # most sequences in one forward pass
    max_tokens_per_batch: int = 8192  # padded tokens per pass: bounds activation memory on long data
    head_chunk: int | None = None  # response positions per LM-head matmul (logits memory: head_chunk × vocab);
    # None: 256 on a CPU, 4096 on a GPU (fewer, larger matmuls: +10 % on a 7B model)
    padding_side: str = "right"
    torch_compile: bool = False  # the loss as one compiled kernel (the body is compiled by compile_body)
    progress: bool = True
    progress_desc: str = "score"


def _batches(lengths: list[int], cfg: EngineConfig) -> list[list[int]]:
    """Group sequence indices, longest first, so each batch holds similar lengths (little padding)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) >= cfg.batch_size or (len(current) + 1) * longest > cfg.max_tokens_per_batch):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def logit_transform(model):
    """Models that post-process logits (Gemma-2's soft-capping) must get the same treatment here."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        return lambda logits: torch.tanh(logits / cap) * cap
    return lambda logits: logits


def compile_body(model) -> None:
    """Compile the transformer body in place; dynamic shapes, since every batch has its own width."""
    model.set_submodule(model.base_model_prefix, torch.compile(model.base_model, dynamic=True))


def sequence_losses(model, sequences: list[Sequence], pad_token_id: int, cfg: EngineConfig | None = None) -> np.ndarray:
    """Mean response cross-entropy of each sequence (float64 array, same order as ``sequences``)."""
    return np.array([spans[0] for spans in span_losses(model, sequences, pad_token_id, cfg)], dtype=np.float64)


@dataclass
class _Layout:
    """One padded batch: the model inputs, and where its response tokens and their targets are."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    gather_rows: list[int]
    gather_cols: list[int]
    targets: list[int]


def _layout(sequences: list[Sequence], batch: list[int], pad_token_id: int, padding_side: str) -> _Layout:
    lengths = [len(sequences[i].input_ids) for i in batch]
    width = max(lengths)
    out = _Layout(torch.full((len(batch), width), pad_token_id, dtype=torch.long),
                  torch.zeros((len(batch), width), dtype=torch.long), torch.zeros((len(batch), width), dtype=torch.long),
                  [], [], [])
    for row, (i, n) in enumerate(zip(batch, lengths)):
        seq = sequences[i].input_ids
        offset = width - n if padding_side == "left" else 0
        out.ids[row, offset:offset + n] = torch.tensor(seq)
        out.mask[row, offset:offset + n] = 1
        # Explicit positions: with left padding the first real token must still be position 0.
        out.positions[row, offset:offset + n] = torch.arange(n)
        for stop, k in sequences[i].spans:
            # The token at position t is predicted by the hidden state at t − 1.
            out.gather_rows += [row] * k
            out.gather_cols += range(offset + stop - k - 1, offset + stop - 1)
            out.targets += seq[stop - k:stop]
    return out


def _token_nll(logits: torch.Tensor, targets: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Cross-entropy as float32 log-sum-exp minus the target's logit: compiled, one pass over the logits
    without a float32 copy or a log-softmax tensor (4x faster than ``F.cross_entropy`` on a CPU)."""
    x = logits.float()
    if cap:
        x = torch.tanh(x / cap) * cap
    return torch.logsumexp(x, -1) - x.gather(1, targets[:, None])[:, 0]


_compiled_token_nll = None


def _head_nll(model, picked: torch.Tensor, targets: torch.Tensor, chunk: int, compiled: bool) -> torch.Tensor:
    """Per-token negative log-likelihood, ``chunk`` positions at a time: never positions × vocabulary at once."""
    global _compiled_token_nll
    if compiled and _compiled_token_nll is None:
        _compiled_token_nll = torch.compile(_token_nll, dynamic=True)
    head, transform = model.get_output_embeddings(), logit_transform(model)
    cap = getattr(model.config, "final_logit_softcapping", None)
    token_nll = torch.empty(len(targets), dtype=torch.float64, device=picked.device)
    for start in range(0, len(targets), chunk):
        logits, aim = head(picked[start:start + chunk]), targets[start:start + chunk]
        if compiled:
            token_nll[start:start + chunk] = _compiled_token_nll(logits, aim, cap).double()
        else:  # float32 log-sum-exp, whatever the model's dtype
            token_nll[start:start + chunk] = F.cross_entropy(transform(logits.float()), aim, reduction="none").double()
    return token_nll.cpu()


@torch.no_grad()
def span_losses(model, sequences: list[Sequence], pad_token_id: int,
                cfg: EngineConfig | None = None) -> list[list[float]]:
    """Mean cross-entropy of every span of every sequence (``Sequence.spans`` order).

    The ``record_function`` labels (layout, body, head) name the engine's parts in a torch.profiler
    trace; ``benchmarks/bench_scoring.py --profile`` reads them.
    """
    cfg = cfg or EngineConfig()
    if cfg.padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right'; got {cfg.padding_side!r}")
    device = next(model.parameters()).device
    head_chunk = cfg.head_chunk or (4096 if device.type == "cuda" else 256)
    lengths = [len(s.input_ids) for s in sequences]
    losses: list[list[float]] = [[] for _ in sequences]
    bar = tqdm(total=sum(lengths), desc=cfg.progress_desc, unit="tok", unit_scale=True, disable=not cfg.progress,
               leave=False)
    for batch in _batches(lengths, cfg):
        with record_function("miwv.layout"):
            lay = _layout(sequences, batch, pad_token_id, cfg.padding_side)
        with record_function("miwv.body"):
            # use_cache=False: a KV cache would only keep every layer's keys and values alive until the pass ends.
            hidden = model.base_model(input_ids=lay.ids.to(device), attention_mask=lay.mask.to(device),
                                      position_ids=lay.positions.to(device), use_cache=False).last_hidden_state
        with record_function("miwv.head"):
            picked = hidden[torch.tensor(lay.gather_rows, device=device), torch.tensor(lay.gather_cols, device=device)]
            token_nll = _head_nll(model, picked, torch.tensor(lay.targets, device=device), head_chunk, cfg.torch_compile)
        cursor = 0
        for i in batch:
            for _, k in sequences[i].spans:
                losses[i].append(response_loss(token_nll[cursor:cursor + k]))
                cursor += k
        bar.update(sum(lengths[i] for i in batch))
    bar.close()
    return losses


# --- a scoring run: neighbours, three passes per sample, resumable output ----------------------

AUTO_MAX_LENGTH = "auto"
MIN_MAX_LENGTH = 2  # a BOS and one response token: anything shorter holds no target at all


def max_length_rule(value: int | str, *, allow_auto: bool = True) -> str | None:
    """What is wrong with a maximum length (``auto`` or an int ≥ 2), or None; checked before any model loads."""
    if value == AUTO_MAX_LENGTH and allow_auto:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_MAX_LENGTH:
        allowed = f"{AUTO_MAX_LENGTH!r} or an integer" if allow_auto else "an integer"
        return (f"{value!r} cannot hold a single response token once the prompt is cut away; use {allowed} of at "
                f"least {MIN_MAX_LENGTH}")
    return None


def parse_max_length(text: str) -> int | str:
    return text if text == AUTO_MAX_LENGTH else int(text)


parse_max_length.kind = f"{AUTO_MAX_LENGTH!r} or an integer"


def context_window(model) -> int | None:
    """The longest sequence the model's positions cover, when its config says."""
    config = getattr(model.config, "text_config", None) or model.config
    window = getattr(config, "max_position_embeddings", None)
    return int(window) if isinstance(window, int) and window > 0 else None


def resolve_max_length(setting: int | str, needed: list[int], model) -> int:
    """``auto``: the longest sequence ``needed``, capped at the model's context window; an int as it is."""
    problem = max_length_rule(setting)
    if problem:
        raise ValueError(f"max_length: {problem}")
    if setting != AUTO_MAX_LENGTH:
        return int(setting)
    longest, window = max(needed, default=MIN_MAX_LENGTH), context_window(model)
    return max(MIN_MAX_LENGTH, min(longest, window) if window else longest)


def one_shot_lengths(examples: list[EncodedExample], neighbor_index: np.ndarray, special: SpecialTokens,
                     indices: list[int] | None = None) -> list[int]:
    """Untruncated length of each row's one-shot sequence (all rows, or ``indices``): BOS, the neighbour's example,
    then the row's."""
    def body(i: int) -> int:
        return len(examples[i].prompt) + len(examples[i].response) + 1

    rows = range(len(examples)) if indices is None else indices
    return [len(special.prefix) + body(int(neighbor_index[i])) + body(i) for i in rows]


@dataclass
class ScoreConfig:
    model: str = setting(DEFAULT_MODEL, rule=text(), help="built-in name, local directory, .gguf file or hub id")
    embedder: str = setting(DEFAULT_EMBEDDER, rule=text(), help="sentence-transformers name/path, or 'self'")
    template: str = setting("alpaca", choices=TEMPLATES)
    max_length: int | str = setting(
        AUTO_MAX_LENGTH, rule=max_length_rule, parse=parse_max_length,
        help="longest sequence in tokens; auto (default): the pool's longest one-shot sequence, capped at the "
             "model's context window, so nothing is cut")
    dtype: str = setting("auto", choices=("auto", "float32", "bfloat16"), help="auto = bf16 (fast); float32 = exact mode")
    device: str = setting("auto", rule=text())
    batch_size: int = setting(16, rule=integer(1), help="most sequences in one forward pass")
    max_tokens_per_batch: int = setting(8192, rule=integer(1), help="padded tokens per forward pass (memory bound)")
    compute_ifd: bool = setting(True, rule=boolean(), flag="--no-ifd",
                                help="skip the unconditional pass that IFD needs")
    chunk_rows: int = setting(
        64, rule=integer(1), help="advanced: rows per checkpoint in scores.partial.jsonl (at most this much work is "
                                  "lost when the job is killed; a resumed run must use the same value to be byte-identical)")
    torch_compile: bool = setting(False, rule=boolean(),
                            help="torch.compile the model body and the loss: MFU 0.53 instead of 0.42 on a GPU (7B, H200), "
                                 "after a minute of compiling; not part of the configuration")
    progress: bool = setting(True, rule=boolean(), cli=False)

    def __post_init__(self):
        check(self)


def score_fingerprint_inputs(config: ScoreConfig, loaded: LoadedModel, pool: InstructionPool) -> dict:
    """Everything the numbers depend on (and nothing they don't, such as batch size)."""
    return {
        "model": loaded.identity,
        "template": config.template,
        "embedder": config.embedder,
        "max_length": config.max_length,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "ifd": config.compute_ifd,
        "data": pool.content_hash,
        "rows": len(pool),
        "layout_version": LAYOUT_VERSION,
    }


def find_neighbors(pool: InstructionPool, embedder: str, loaded: LoadedModel | None = None,
                   progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Nearest other sample of every row by cosine similarity of instruction+input embeddings."""
    texts = [format_source_text(row) for row in pool.rows]
    if embedder == SELF_EMBEDDER:
        if loaded is None:
            raise ValueError("embedder='self' needs the scored model")
        vectors = model_embeddings(loaded.model, loaded.tokenizer, texts, progress=progress)
    else:
        vectors = embed_texts(texts, load_embedder(embedder), progress=progress)
    return nearest_neighbors(vectors)


def _read_neighbors(path: Path, key: dict, rows: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached neighbours, or None (compute them again) when absent, of another key, or damaged.

    The file carries a checksum of its own numbers, so a hand edit that stays valid JSON (another
    row's index, say) is caught like a torn file; the neighbours are deterministic, so recomputing
    them gives back exactly what the scores already written were computed with.
    """
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") != key:
            return None
        index = np.asarray(saved["neighbor_index"], dtype=np.int64)
        similarity = np.asarray(saved["neighbor_similarity"], dtype=np.float32)
        intact = (saved.get("checksum") == _neighbors_checksum(index, similarity) and index.shape == (rows,)
                  and similarity.shape == (rows,) and ((index >= 0) & (index < rows) & (index != np.arange(rows))).all())
    except (OSError, ValueError, TypeError, KeyError, AttributeError, OverflowError):
        intact = False
    if not intact:
        warnings.warn(f"{path} is damaged; the neighbours are computed again", stacklevel=2)
        return None
    return index, similarity


def _neighbors_checksum(index: np.ndarray, similarity: np.ndarray) -> str:
    return stable_hash({"neighbor_index": index.tolist(), "neighbor_similarity": similarity.tolist()})


def _cached_neighbors(path: Path, key: dict, rows: int, compute) -> tuple[np.ndarray, np.ndarray]:
    cached = _read_neighbors(path, key, rows)
    if cached is not None:
        return cached
    index, similarity = compute()
    index, similarity = np.asarray(index, dtype=np.int64), np.asarray(similarity, dtype=np.float32)
    write_json(path, {"key": key, "neighbor_index": index.tolist(), "neighbor_similarity": similarity.tolist(),
                      "checksum": _neighbors_checksum(index, similarity)})
    return index, similarity


def _finite_or_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


@dataclass
class PassPlan:
    """The forward passes that score a set of rows, and where each row's losses are read from them."""

    sequences: list[Sequence]
    where: dict[tuple[str, int], tuple[int, int]]  # (pass kind, row) -> (sequence, span)
    one_shot: dict[int, Sequence]
    cuts: dict[int, Truncation]


def plan_passes(examples: list[EncodedExample], indices: list[int], neighbor_index: np.ndarray,
                special: SpecialTokens, max_length: int, compute_ifd: bool) -> PassPlan:
    """The passes for rows ``indices``: one-shot for each, zero-shot only where no one-shot pass carries it.

    A row whose exact zero-shot sequence opens another row's one-shot sequence in this batch gets its
    zero-shot loss from that pass (a span of it) instead of a pass of its own.
    """
    zero = {i: zero_shot_sequence(examples[i], special, max_length)[0] for i in indices}
    one, cuts = {}, {}
    for i in indices:
        one[i], cuts[i] = one_shot_sequence(examples[i], examples[neighbor_index[i]], special, max_length)
    with_demo = [i for i in indices if not cuts[i].no_demo]  # a row without its demo gets no one-shot pass
    donor: dict[int, int] = {}  # row -> the row whose one-shot pass carries its zero-shot sequence
    for i in with_demo:
        k = int(neighbor_index[i])
        if k in zero and k not in donor and one[i].input_ids[:len(zero[k].input_ids)] == zero[k].input_ids:
            donor[k] = i
    carried: dict[int, list[int]] = {}
    for k, i in donor.items():
        carried.setdefault(i, []).append(k)

    sequences: list[Sequence] = []
    where: dict[tuple[str, int], tuple[int, int]] = {}
    for i in indices:
        if i in with_demo:
            spans = tuple((len(zero[k].input_ids), zero[k].n_targets) for k in carried.get(i, ()))
            where[("one", i)] = (len(sequences), 0)
            where.update({("zero", k): (len(sequences), 1 + n) for n, k in enumerate(carried.get(i, ()))})
            sequences.append(Sequence(one[i].input_ids, one[i].n_targets, spans))
        if i not in donor:
            where[("zero", i)] = (len(sequences), 0)
            sequences.append(zero[i])
        if compute_ifd:
            where[("uncond", i)] = (len(sequences), 0)
            sequences.append(unconditional_sequence(examples[i], special, max_length))
    return PassPlan(sequences, where, one, cuts)


def score_rows(loaded: LoadedModel, examples: list[EncodedExample], ids: list[str], indices: list[int],
               neighbor_index: np.ndarray, neighbor_similarity: np.ndarray, config: ScoreConfig,
               engine: EngineConfig | None = None) -> list[dict]:
    """Zero-shot, one-shot (and unconditional) losses of the rows ``indices``, batched together."""
    special = SpecialTokens.from_tokenizer(loaded.tokenizer)
    # "auto" cuts only what exceeds the context window, so resolving it per chunk gives the pool's numbers.
    max_length = resolve_max_length(config.max_length, one_shot_lengths(examples, neighbor_index, special, indices),
                                    loaded.model)
    plan = plan_passes(examples, indices, neighbor_index, special, max_length, config.compute_ifd)
    sequences, where, one, cuts = plan.sequences, plan.where, plan.one_shot, plan.cuts
    engine = engine or EngineConfig(batch_size=config.batch_size, max_tokens_per_batch=config.max_tokens_per_batch,
                                    progress=config.progress, torch_compile=config.torch_compile)
    losses = span_losses(loaded.model, sequences, loaded.tokenizer.pad_token_id, engine)

    def loss(kind: str, i: int) -> float:
        sequence, span = where.get((kind, i), (None, None))
        return math.nan if sequence is None else losses[sequence][span]

    return [_score_row(i, int(neighbor_index[i]), ids, examples, one[i], cuts[i], neighbor_similarity[i],
                       loss("zero", i), loss("one", i), loss("uncond", i), config.compute_ifd) for i in indices]


# Why a row has no MIWV (``status`` in scores.jsonl); such a row is never selected.
STATUS_OK = "ok"
STATUS_NO_DEMO = "no-demo"  # max_length leaves no room for any of the neighbour's example
STATUS_NOT_FINITE = "loss-not-finite"


def _score_row(i: int, k: int, ids: list[str], examples: list[EncodedExample], one: Sequence, cut: Truncation,
               similarity: float, zero_loss: float, one_loss: float, uncond: float, compute_ifd: bool) -> dict:
    status = STATUS_NO_DEMO if cut.no_demo else STATUS_OK
    value = _finite_or_none(miwv(one_loss, zero_loss))
    if status == STATUS_OK and value is None:
        status = STATUS_NOT_FINITE
    return {
        "index": i,
        "id": ids[i],
        "neighbor_index": k,
        "neighbor_id": ids[k],
        "neighbor_similarity": round(float(similarity), 6),
        "zero_shot_loss": _finite_or_none(zero_loss),
        "one_shot_loss": _finite_or_none(one_loss),
        "miwv": value,
        "status": status,
        "unconditional_loss": _finite_or_none(uncond),
        "ifd": _finite_or_none(ifd(zero_loss, uncond)) if compute_ifd else None,
        "prompt_tokens": len(examples[i].prompt),
        "response_tokens": len(examples[i].response),
        "one_shot_tokens": len(one.input_ids),
        "truncated": bool(cut.as_dict()),
        "truncation": cut.as_dict(),
    }


def chunk_plan(neighbor_index: np.ndarray, chunk_rows: int) -> list[list[int]]:
    """Fixed chunks of row indices, each row placed next to its neighbour chain i → k → k' …

    Neighbours in the same chunk let ``score_rows`` share passes. The plan depends only on the
    neighbours, never on what is already done, so a resumed or multi-process run batches every row
    exactly as an uninterrupted single process does.
    """
    placed = np.zeros(len(neighbor_index), dtype=bool)
    order: list[int] = []
    for start in range(len(neighbor_index)):
        i = start
        while not placed[i]:
            placed[i] = True
            order.append(i)
            i = int(neighbor_index[i])
    return [order[j:j + chunk_rows] for j in range(0, len(order), chunk_rows)]


def _partial_files(out_dir: Path, shard: Shard) -> tuple[PartialResults, list[PartialResults]]:
    """This rank's append-only file, and every partial file in the directory (any earlier world size)."""
    name = "scores.partial.jsonl" if shard.is_main else f"scores.partial.rank{shard.rank}.jsonl"
    everyone = [PartialResults(p) for p in sorted(out_dir.glob("scores.partial*.jsonl"))]
    return PartialResults(out_dir / name), everyone


def _load_done(partials: list[PartialResults], repair: bool = False) -> dict[int, dict]:
    """Rows already scored. Only rank 0, before any rank appends, may ``repair`` (cut torn tails)."""
    done: dict[int, dict] = {}
    for partial in partials:
        done.update(partial.load(repair=repair))
    return done


@dataclass
class _Run:
    """One scoring run's directory, configuration and identity (shared by the helpers of ``score_pool``)."""

    pool: InstructionPool
    out_dir: Path
    config: ScoreConfig
    loaded: LoadedModel
    shard: Shard

    @property
    def inputs(self) -> dict:
        return score_fingerprint_inputs(self.config, self.loaded, self.pool)

    @property
    def neighbor_key(self) -> dict:
        return {"embedder": self.config.embedder, "data": self.pool.content_hash,
                "model": self.loaded.identity if self.config.embedder == SELF_EMBEDDER else None}

    @property
    def progress(self) -> bool:
        return self.config.progress and self.shard.is_main


def score_pool(pool: InstructionPool, out_dir: str | Path, config: ScoreConfig | None = None, *,
               loaded: LoadedModel | None = None, overwrite: bool = False) -> list[dict]:
    """Score every row of ``pool`` into ``out_dir/scores.jsonl`` (+ ``manifest.json``), resuming if possible.

    Under ``torchrun`` each rank scores every world_size-th chunk and rank 0 merges (see ``distributed``).
    """
    config = config or ScoreConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = loaded or load_model(config.model, dtype=config.dtype, device=config.device)
    if config.template == "chat" and not getattr(loaded.tokenizer, "chat_template", None):  # before any run file
        raise ModelLoadError(f"{config.model}: --template chat needs a chat template, and this model's tokenizer has "
                             "none; use --template alpaca or plain")
    if config.torch_compile:
        compile_body(loaded.model)
    run = _Run(pool, out_dir, config, loaded, init_from_env())
    # Rank 0 alone checks the directory, writes the manifest, searches neighbours and repairs torn lines.
    status = from_main(run.shard, _start(run, overwrite) if run.shard.is_main else None)
    if status["error"] is not None:
        raise status["error"]
    if not status["finished"]:
        max_length, seconds, todo = _score_missing_chunks(run)
        barrier(run.shard)
        if run.shard.is_main:
            _finish(run, status["manifest"], max_length, seconds, todo)
        barrier(run.shard)
    return read_jsonl(out_dir / "scores.jsonl")


def _start(run: _Run, overwrite: bool) -> dict:
    """Rank 0: refuse another configuration's directory, then the manifest and the neighbours; never raises."""
    status: dict = {"error": None, "finished": False, "manifest": {}}
    try:
        inputs = run.inputs
        fingerprint = stable_hash(inputs)
        previous = check_fingerprint(run.out_dir / "manifest.json", fingerprint, inputs, overwrite=overwrite)
        status["finished"] = bool(previous and previous.get("status") == "complete"
                                  and (run.out_dir / "scores.jsonl").exists())
        if status["finished"]:
            _check_unchanged(run.out_dir / "scores.jsonl", previous)
            return status
        if previous is None:  # a new run, or an overwrite: drop what an older configuration left
            for old in _partial_files(run.out_dir, run.shard)[1]:
                old.remove()
            (run.out_dir / "scores.jsonl").unlink(missing_ok=True)
        status["manifest"] = manifest = {
            "status": "running", "fingerprint": fingerprint, "fingerprint_inputs": inputs,
            "config": asdict(run.config), "data_source": run.pool.source, "started": now(),
            "world_size": run.shard.world_size, "environment": environment_info()}
        write_json(run.out_dir / "manifest.json", manifest)
        t0 = time.perf_counter()
        _cached_neighbors(run.out_dir / "neighbors.json", run.neighbor_key, len(run.pool),
                          lambda: find_neighbors(run.pool, run.config.embedder, run.loaded, progress=run.progress))
        manifest["seconds_neighbors"] = round(time.perf_counter() - t0, 2)
        _load_done(_partial_files(run.out_dir, run.shard)[1], repair=True)
    except Exception as exc:  # noqa: BLE001 - raised on every rank by score_pool
        status["error"] = exc
    return status


def _check_unchanged(scores_path: Path, manifest: dict) -> None:
    """A finished run's scores are the file it wrote: a row lost or a number edited since is an error, not a result."""
    if scores_changed(scores_path, manifest):
        raise FingerprintMismatch(
            f"{scores_path} was changed after the run finished (its checksum differs from the one in "
            f"{scores_path.parent / 'manifest.json'}): restore it, or score again with --overwrite")


def _score_missing_chunks(run: _Run) -> tuple[int, float, list[int]]:
    """This rank's unfinished chunks, appended to its partial file; returns (max length, seconds, rows to do)."""
    neighbor_index, neighbor_similarity = _read_neighbors(run.out_dir / "neighbors.json", run.neighbor_key,
                                                          len(run.pool))  # rank 0 has just written them
    examples = encode_examples(run.pool.rows, run.loaded.tokenizer, run.config.template)
    special = SpecialTokens.from_tokenizer(run.loaded.tokenizer)
    max_length = resolve_max_length(run.config.max_length, one_shot_lengths(examples, neighbor_index, special),
                                    run.loaded.model)
    config = replace(run.config, max_length=max_length)
    ids = [row["id"] for row in run.pool.rows]
    mine, everyone = _partial_files(run.out_dir, run.shard)
    done = _load_done(everyone)
    # A chunk is scored whole even if a crash left part of it on disk: its batches stay the same.
    my_chunks = [chunk for number, chunk in enumerate(chunk_plan(neighbor_index, config.chunk_rows))
                 if run.shard.owns(number) and any(i not in done for i in chunk)]
    world = run.shard.world_size
    label = "MIWV scoring" if world == 1 else f"MIWV scoring (rank 0 of {world})"
    t0 = time.perf_counter()
    with tqdm(total=len(done) + sum(map(len, my_chunks)), initial=len(done), desc=label, unit="sample",
              disable=not run.progress) as bar:
        for chunk in my_chunks:
            rows = score_rows(run.loaded, examples, ids, chunk, neighbor_index, neighbor_similarity, config)
            mine.append([row for row in rows if row["index"] not in done])
            bar.update(len(chunk))
    return max_length, time.perf_counter() - t0, [i for i in range(len(run.pool)) if i not in done]


def _finish(run: _Run, manifest: dict, max_length: int, seconds: float, todo: list[int]) -> None:
    """Rank 0: merge every rank's partial file into ``scores.jsonl`` in input order; complete the manifest."""
    everyone = _partial_files(run.out_dir, run.shard)[1]
    done = _load_done(everyone)
    scores = [done[i] for i in range(len(run.pool))]
    write_jsonl(run.out_dir / "scores.jsonl", scores)
    try:
        _complete_manifest(run, manifest, scores, max_length, seconds, todo)
    except BaseException:  # a full disk, say: no complete-looking scores.jsonl beside a "running" manifest
        (run.out_dir / "scores.jsonl").unlink(missing_ok=True)  # the partial files stay: a re-run merges them again
        raise
    for partial in everyone:
        partial.remove()


def _complete_manifest(run: _Run, manifest: dict, scores: list[dict], max_length: int, seconds: float,
                       todo: list[int]) -> None:
    manifest.update(status="complete", scores_sha256=file_sha256(run.out_dir / "scores.jsonl"), finished=now(),
                    rows=len(scores), rows_scored_this_run=len(todo), rows_resumed=len(run.pool) - len(todo),
                    seconds_scoring=round(seconds, 2),
                    seconds_per_sample=round(seconds / len(todo), 4) if todo else None,
                    max_length=max_length, truncated_rows=sum(r["truncated"] for r in scores),
                    demo_trimmed_rows=sum(bool(r["truncation"].get("demo")) for r in scores),
                    no_miwv_rows=sum(r["miwv"] is None for r in scores))
    write_json(run.out_dir / "manifest.json", manifest)
