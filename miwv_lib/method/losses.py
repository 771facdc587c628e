"""The response-only loss engine: per-token cross-entropy over the spans a layout marks, batched. The LM head is
applied to the hidden states of the scored tokens alone, in chunks of positions × blocks of the vocabulary: never
a batch × sequence × vocabulary tensor (Gemma-3's head has 262k rows and costs more per token than its body)."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torch.profiler import record_function
from tqdm.auto import tqdm

from .layouts import Sequence, text_config


def response_loss(token_nll: torch.Tensor) -> float:
    """L(y | context) = −(1/|y|) Σ_t log p(y_t | context, y_<t), given the per-token −log p."""
    return token_nll.mean().item()


@dataclass
class EngineConfig:
    batch_size: int = 16  # most sequences in one forward pass
    max_tokens_per_batch: int = 8192  # padded tokens per pass: bounds activation memory on long data
    max_padding: float = 0.05  # a batch takes a shorter sequence only while padding stays under this share of it
    head_chunk: int | None = None  # response positions per LM-head matmul; None: 1024 on a CPU, 4096 on a GPU
    head_block: int | None = None  # vocabulary columns per LM-head matmul (logits memory: head_chunk × head_block);
    # None: 2048 on a CPU (an 8-MB float32 block stays in cache for its log-sum-exp), 32768 on a GPU
    padding_side: str = "right"
    progress: bool = True
    progress_desc: str = "score"


def length_batches(lengths: list[int], cfg: EngineConfig) -> list[list[int]]:
    """Group sequence indices, longest first, into batches of similar lengths. A batch takes the next sequence while
    it has room and its padding stays within ``max_padding`` of its tokens: padding is work thrown away (on the
    local Alpaca pool's 64-row chunks, 17.5 % of the body's tokens at 16 sequences a batch without that bound)."""
    batches: list[list[int]] = []
    real = 0  # tokens of the last batch's sequences
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        last = batches[-1] if batches else []
        size = (len(last) + 1) * lengths[last[0]] if last else 0
        if (last and len(last) < cfg.batch_size and size <= cfg.max_tokens_per_batch
                and size - real - lengths[i] <= cfg.max_padding * size):
            last.append(i)
            real += lengths[i]
        else:
            batches.append([i])
            real = lengths[i]
    return batches


def logit_transform(model):
    """Models that post-process logits (Gemma-2's soft-capping) must get the same treatment here."""
    if cap := getattr(model.config, "final_logit_softcapping", None):
        return lambda logits: torch.tanh(logits / cap) * cap
    return lambda logits: logits


def compile_body(model) -> None:
    """Compile the transformer body in place; dynamic shapes, since every batch has its own width."""
    model.set_submodule(model.base_model_prefix, torch.compile(model.base_model, dynamic=True))


def warm_up_batches(plans: list[list[Sequence]], cfg: EngineConfig) -> list[list[Sequence]]:
    """The first batch of each kind in a plan's chunks: with or without branches (another mask), of one sequence
    or more (a compiled body specialises a batch of one). Each kind is a graph of its own for ``torch.compile``;
    scored once before a timing, they keep the compiling out of it."""
    kinds: dict[tuple[bool, bool], list[Sequence]] = {}
    for seqs in plans:
        for batch in length_batches([len(s.input_ids) for s in seqs], cfg):
            kinds.setdefault((len(batch) == 1, any(seqs[i].branches for i in batch)), [seqs[i] for i in batch])
    return list(kinds.values())


def compile_seconds() -> float:
    """Seconds ``torch.compile`` has spent in this process so far (each graph, Inductor included): a benchmark
    subtracts the one-off cost, and sees when a new mask or a batch of one compiled another graph mid-run."""
    from torch._dynamo.utils import compilation_time_metrics  # no public counter of this

    return float(sum(compilation_time_metrics.get("_compile.compile_inner", [])))


def sequence_losses(model, sequences: list[Sequence], pad_token_id: int, cfg: EngineConfig | None = None) -> np.ndarray:
    """Mean response cross-entropy of each sequence (float64 array, same order as ``sequences``)."""
    return np.array([spans[0] for spans in span_losses(model, sequences, pad_token_id, cfg)], dtype=np.float64)


def _layout(sequences: list[Sequence], batch: list[int], pad_token_id: int, padding_side: str) -> tuple:
    """One padded batch: ids, attention mask, positions and segments (0: a sequence or its shared prefix, j + 1:
    its branch j, -1: padding), then the (row, column) of the hidden state that predicts each scored token, and
    that token."""
    width = max(len(sequences[i].input_ids) for i in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    mask, positions, segments = torch.zeros_like(ids), torch.zeros_like(ids), torch.full_like(ids, -1)
    rows, cols, targets = [], [], []
    for row, i in enumerate(batch):
        seq, branches = sequences[i].input_ids, sequences[i].branches
        offset = width - len(seq) if padding_side == "left" else 0
        ids[row, offset:offset + len(seq)] = torch.tensor(seq)
        mask[row, offset:offset + len(seq)] = 1
        # Explicit positions: with left padding the first real token must still be position 0, and a branch
        # continues its prefix's positions.
        pos, seg = torch.arange(len(seq)), torch.zeros(len(seq), dtype=torch.long)
        for j, (start, stop) in enumerate(zip(branches, [*branches[1:], len(seq)])):
            pos[start:stop], seg[start:stop] = torch.arange(branches[0], branches[0] + stop - start), j + 1
        positions[row, offset:offset + len(seq)], segments[row, offset:offset + len(seq)] = pos, seg
        for stop, k in sequences[i].spans:
            if k >= stop:  # column −1 would read another token's state: a plausible, wrong loss
                raise ValueError(f"sequence {i}: its first scored token has no token before it to be predicted from")
            # The token at position t is predicted by the hidden state at t − 1.
            rows += [row] * k
            cols += range(offset + stop - k - 1, offset + stop - 1)
            targets += seq[stop - k:stop]
    return ids, mask, positions, segments, rows, cols, targets


@cache
def _takes_mask_per_layer_type(body_type: type) -> bool:
    return "causal_mask_mapping" in inspect.getsource(body_type.forward)  # read once per class: it is slow


def supports_branches(model) -> bool:
    """Whether the model's attention takes the masks of ``branch_attention`` exactly: SDPA or eager attention, and
    either no sliding-window layer or a body that takes one mask per layer type (Gemma-3's mix of both)."""
    config = text_config(model)
    if config._attn_implementation not in ("sdpa", "eager"):
        return False
    layer_types = set(getattr(config, "layer_types", None) or ())
    if "sliding_attention" in layer_types:
        body = getattr(model.base_model, "_orig_mod", model.base_model)  # a compiled body keeps the module there
        return _takes_mask_per_layer_type(type(body))
    return not getattr(config, "sliding_window", None) and layer_types <= {"full_attention"}


def branch_attention(model, segments: torch.Tensor, positions: torch.Tensor):
    """The 4-D attention masks of a batch with branches: a token sees the earlier tokens of its own segment and of
    the shared prefix (segment 0); in a sliding-window layer, only those less than the window's positions back."""
    width = segments.shape[1]
    index, valid = torch.arange(width, device=segments.device), segments >= 0
    sees = (index[:, None] >= index[None, :]) & ((segments[:, :, None] == segments[:, None, :])
                                                  | (segments[:, None, :] == 0))
    sees &= valid[:, :, None] & valid[:, None, :]
    sees |= torch.eye(width, dtype=torch.bool, device=segments.device) & ~valid[:, :, None]  # no all-masked row: NaN
    config = text_config(model)
    masks = {"full_attention": sees}
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        masks["sliding_attention"] = sees & (positions[:, :, None] - positions[:, None, :] < config.sliding_window)
    if config._attn_implementation == "eager":  # eager attention adds its mask to the scores
        dtype = next(model.parameters()).dtype
        masks = {k: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)
                 for k, m in masks.items()}
    masks = {k: m[:, None] for k, m in masks.items()}
    return masks if len(masks) > 1 else masks["full_attention"]


def batch_inputs(model, sequences: list[Sequence], batch: list[int], pad_token_id: int, padding_side: str,
                 device: torch.device) -> tuple:
    """One batch on ``device``: ids, attention mask (the branch masks where a pass has branches) and positions for
    the body, then the (row, column) of the hidden state that predicts each scored token, and that token."""
    ids, mask, positions, segments, rows, cols, targets = _layout(sequences, batch, pad_token_id, padding_side)
    positions = positions.to(device)
    if any(sequences[i].branches for i in batch):
        attention = branch_attention(model, segments.to(device), positions)
    else:
        attention = mask.to(device)
    return ids.to(device), attention, positions, rows, cols, targets


def _scratch(buffers: dict[str, torch.Tensor], name: str, shape: tuple, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    """A ``shape`` view of the start of a flat tensor kept in ``buffers``, made anew (the old one let go first)
    only when too small: every block of every chunk writes into the same memory, since fresh memory costs page
    faults on a CPU (Gemma-3-270m's head matmul, 2 threads: 200 GFLOP/s into new memory, 243 into reused)."""
    size = math.prod(shape)
    if name not in buffers or buffers[name].numel() < size:
        buffers.pop(name, None)
        buffers[name] = torch.empty(size, dtype=dtype, device=device)
    return buffers[name][:size].view(shape)


def _block_logits(head: torch.nn.Module, hidden: torch.Tensor, cols: slice, wrapped: torch.Tensor | None,
                  buffers: dict[str, torch.Tensor]) -> torch.Tensor:
    """Columns ``cols`` of ``head(hidden)`` as float32, in a buffer the blocks reuse: a plain ``nn.Linear``
    computes just those columns; a wrapped head has computed all of them, its own way, in ``wrapped``."""
    if wrapped is None:
        out = _scratch(buffers, "logits", (len(hidden), cols.stop - cols.start), hidden.dtype, hidden.device)
        weight = head.weight[cols].t()
        logits = (torch.mm(hidden, weight, out=out) if head.bias is None
                  else torch.addmm(head.bias[cols], hidden, weight, out=out))  # one rounding, as nn.Linear's
        if logits.dtype == torch.float32:
            return logits
    else:
        logits = wrapped[:, cols]
    return _scratch(buffers, "logits32", logits.shape, torch.float32, logits.device).copy_(logits)


# A row whose log-sum-exp, unshifted, came out below this may have lost terms to underflow (float32's exp is 0
# under e^-103); above it, everything lost is under 1e-15 of the sum.
_UNSHIFTED_FLOOR = -40.0


def _log_sum_exp_(x: torch.Tensor, shift: bool) -> torch.Tensor:
    """log Σ exp of each row of float32 ``x``, overwriting ``x``, with no temporary (``torch.logsumexp`` makes two
    of x's size). Unshifted it is two passes over a block in cache instead of four, 2.9× faster: exact while no
    logit is over 88 (exp's float32 overflow) and the sum is not tiny, which the caller checks."""
    if not shift:
        return x.exp_().sum(1).log_()
    top = x.amax(1, keepdim=True)
    return x.sub_(top).exp_().sum(1).log_().add_(top[:, 0])


def _chunk_nll(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, cap: float | None, block: int,
               buffers: dict[str, torch.Tensor], shift: bool = False) -> torch.Tensor:
    """−log p of each target, the vocabulary ``block`` columns at a time: each block's float32 log-sum-exp runs
    while the block is in cache, and the blocks' sums are combined at the end. The target's logit is read from
    its block, so it is the same matmul's value as the ones it is compared with. Unshifted sums that overflowed
    or came out tiny send the chunk through again, each block shifted by its maximum."""
    wrapped = None if type(head) is torch.nn.Linear else head(hidden)  # LoRA, quantised: computed their own way
    vocab = head.out_features if wrapped is None else wrapped.shape[1]
    if len(targets) and (top := int(targets.max())) >= vocab:
        raise ValueError(f"token id {top} is outside the LM head's {vocab} rows")
    sums = torch.empty((-(-vocab // block), len(hidden)), dtype=torch.float32, device=hidden.device)
    target_logit = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
    for j, start in enumerate(range(0, vocab, block)):
        x = _block_logits(head, hidden, slice(start, min(start + block, vocab)), wrapped, buffers)
        if cap:  # soft-capping (Gemma-2): the model's own logits are these
            x.div_(cap).tanh_().mul_(cap)
        local = targets - start
        here = (local >= 0) & (local < x.shape[1])
        target_logit = torch.where(here, x.gather(1, local.clamp(0, x.shape[1] - 1)[:, None])[:, 0], target_logit)
        sums[j] = _log_sum_exp_(x, shift)
    total = torch.logsumexp(sums, 0)
    if not shift and not bool((torch.isfinite(total) & (total >= _UNSHIFTED_FLOOR)).all()):
        return _chunk_nll(head, hidden, targets, cap, block, buffers, shift=True)
    return total - target_logit


def _head_nll(model, picked: torch.Tensor, targets: torch.Tensor, chunk: int, block: int) -> torch.Tensor:
    """Per-token negative log-likelihood, ``chunk`` positions × ``block`` vocabulary columns at a time: never
    positions × vocabulary at once."""
    head, cap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)
    token_nll = torch.empty(len(targets), dtype=torch.float64, device=picked.device)
    buffers: dict[str, torch.Tensor] = {}
    for start in range(0, len(targets), chunk):
        token_nll[start:start + chunk] = _chunk_nll(head, picked[start:start + chunk], targets[start:start + chunk],
                                                    cap, block, buffers)
    return token_nll.cpu()


@torch.no_grad()
def span_losses(model, sequences: list[Sequence], pad_token_id: int,
                cfg: EngineConfig | None = None) -> list[list[float]]:
    """Mean cross-entropy of every span of every sequence (``Sequence.spans`` order). The ``record_function``
    labels name the engine's parts in a torch.profiler trace (``benchmarks/bench_scoring.py --profile``)."""
    cfg = cfg or EngineConfig()
    if cfg.padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right'; got {cfg.padding_side!r}")
    device = next(model.parameters()).device
    head_chunk = cfg.head_chunk or (4096 if device.type == "cuda" else 1024)
    head_block = cfg.head_block or (32768 if device.type == "cuda" else 2048)
    lengths = [len(s.input_ids) for s in sequences]
    losses: list[list[float]] = [[] for _ in sequences]
    # A with-block closes the bar while an interrupt unwinds, so nothing is drawn after the command's last line.
    with tqdm(total=sum(lengths), desc=cfg.progress_desc, unit="tok", unit_scale=True, disable=not cfg.progress,
              leave=False) as bar:
        for batch in length_batches(lengths, cfg):
            with record_function("miwv.layout"):
                ids, attention, positions, rows, cols, targets = batch_inputs(model, sequences, batch, pad_token_id,
                                                                              cfg.padding_side, device)
            with record_function("miwv.body"):
                # use_cache=False: a KV cache would only keep every layer's keys and values alive to the pass's end.
                hidden = model.base_model(input_ids=ids, attention_mask=attention, position_ids=positions,
                                          use_cache=False).last_hidden_state
            with record_function("miwv.head"):
                picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
                token_nll = _head_nll(model, picked, torch.tensor(targets, device=device), head_chunk,
                                      head_block)
            cursor = 0
            for i in batch:
                for _, k in sequences[i].spans:
                    losses[i].append(response_loss(token_nll[cursor:cursor + k]))
                    cursor += k
            bar.update(sum(lengths[i] for i in batch))
    return losses
