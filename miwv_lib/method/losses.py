"""The response-only loss engine: per-token cross-entropy over the spans a layout marks, batched. The LM head is
applied, in chunks, to the hidden states of the scored tokens alone: never a batch × sequence × vocabulary tensor
(Gemma-3's head has 262k rows and costs more per token than its body)."""

from __future__ import annotations

import inspect
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
    head_chunk: int | None = None  # response positions per LM-head matmul (logits memory: head_chunk × vocab);
    # None: 256 on a CPU, 4096 on a GPU (fewer, larger matmuls: +10 % on a 7B model)
    padding_side: str = "right"
    torch_compile: bool = False  # the loss as one compiled kernel (the body is compiled by compile_body)
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


def _token_nll(logits: torch.Tensor, targets: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Cross-entropy as float32 log-sum-exp minus the target's logit: compiled, one pass over the logits
    without a float32 copy or a log-softmax tensor (4x faster than ``F.cross_entropy`` on a CPU)."""
    x = logits.float()
    if cap:
        x = torch.tanh(x / cap) * cap
    return torch.logsumexp(x, -1) - x.gather(1, targets[:, None])[:, 0]


@cache
def _compiled_token_nll():
    return torch.compile(_token_nll, dynamic=True)


def _buffer(buffers: dict[str, torch.Tensor], name: str, shape: tuple, dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    """The tensor kept in ``buffers`` under ``name``; made anew, the old one let go first, when a chunk's shape
    differs (a batch's shorter last chunk). Not a view of it: a compiled loss would compile another graph."""
    if name in buffers and buffers[name].shape != shape:
        del buffers[name]
    if name not in buffers:
        buffers[name] = torch.empty(shape, dtype=dtype, device=device)
    return buffers[name]


def _head_logits(head: torch.nn.Module, hidden: torch.Tensor, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
    """``head(hidden)``, into a buffer that the chunks reuse: fresh chunk × vocabulary memory costs page faults on
    a CPU (Gemma-3-270m's head matmul, 2 threads: 200 GFLOP/s into new memory, 243 into a reused buffer)."""
    if type(head) is not torch.nn.Linear:  # a wrapped head (LoRA, quantised) computes its own way
        return head(hidden)
    out = _buffer(buffers, "logits", (len(hidden), head.out_features), hidden.dtype, hidden.device)
    if head.bias is None:
        return torch.mm(hidden, head.weight.t(), out=out)
    return torch.addmm(head.bias, hidden, head.weight.t(), out=out)  # one rounding, as nn.Linear's


def _chunk_nll(logits: torch.Tensor, targets: torch.Tensor, cap: float | None, compiled: bool,
               buffers: dict[str, torch.Tensor]) -> torch.Tensor:
    """−log p of each target from its logits row. Eager: a float32 log-softmax whatever the model's dtype, into
    buffers too, bit for bit ``F.cross_entropy``."""
    if compiled:
        return _compiled_token_nll()(logits, targets, cap)
    x = logits
    if x.dtype != torch.float32:
        x = _buffer(buffers, "logits32", x.shape, torch.float32, x.device).copy_(x)
    if cap:
        x.div_(cap).tanh_().mul_(cap)
    log_probs = torch.log_softmax(x, -1, out=_buffer(buffers, "log_probs", x.shape, torch.float32, x.device))
    return -log_probs.gather(1, targets[:, None])[:, 0]


def _head_nll(model, picked: torch.Tensor, targets: torch.Tensor, chunk: int, compiled: bool) -> torch.Tensor:
    """Per-token negative log-likelihood, ``chunk`` positions at a time: never positions × vocabulary at once."""
    head, cap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)
    token_nll = torch.empty(len(targets), dtype=torch.float64, device=picked.device)
    buffers: dict[str, torch.Tensor] = {}  # only these hold the chunk tensors between chunks
    for start in range(0, len(targets), chunk):
        logits = _head_logits(head, picked[start:start + chunk], buffers)
        token_nll[start:start + chunk] = _chunk_nll(logits, targets[start:start + chunk], cap, compiled, buffers)
        del logits  # a shorter last chunk then frees the kept logits before it makes its own
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
    head_chunk = cfg.head_chunk or (4096 if device.type == "cuda" else 256)
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
                                      cfg.torch_compile)
            cursor = 0
            for i in batch:
                for _, k in sequences[i].spans:
                    losses[i].append(response_loss(token_nll[cursor:cursor + k]))
                    cursor += k
            bar.update(sum(lengths[i] for i in batch))
    return losses
