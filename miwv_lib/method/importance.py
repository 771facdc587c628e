"""Steps 2–4 of MIWV: zero-shot and one-shot losses of a row, their difference, and IFD beside it.
``plan_passes`` lays out a chunk's forward passes; ``_score_row`` turns the losses into a row of ``scores.jsonl``."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from .layouts import (
    EncodedExample,
    Sequence,
    SpecialTokens,
    Truncation,
    one_shot_sequence,
    unconditional_sequence,
    zero_shot_sequence,
)


def miwv(one_shot_loss: float, zero_shot_loss: float) -> float:
    """MIWV = L(y_i | C_k, x_i) − L(y_i | x_i). Positive: the similar example made the model worse."""
    return one_shot_loss - zero_shot_loss


def ifd(conditional_loss: float, unconditional_loss: float) -> float:
    """IFD (Cherry LLM) = L(y | x) / L(y): how much the instruction helps predict the response."""
    return conditional_loss / unconditional_loss if unconditional_loss > 0 else math.nan


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass
class PassPlan:
    """The forward passes that score a set of rows, and where each row's losses are read from them."""

    sequences: list[Sequence]
    where: dict[tuple[str, int], tuple[int, int]]  # (pass kind, row) -> (sequence, span)
    one_shot: dict[int, Sequence]
    cuts: dict[int, Truncation]


PACK_TOKENS = 1024  # longest shared-prefix pass: attention grows with the square of a pass's length


def plan_passes(examples: list[EncodedExample], indices: list[int], neighbor_index: np.ndarray,
                special: SpecialTokens, max_length: int, compute_ifd: bool, pack_tokens: int = 0) -> PassPlan:
    """The passes for rows ``indices``. A row's one-shot sequence opens with its neighbour k's exact zero-shot
    sequence, so k's zero-shot loss is a span of that pass, and the rows that share k share one pass: k's sequence
    once, then each row's own tokens as a branch (``Sequence.branches``), up to ``pack_tokens`` tokens a pass
    (0: one row a pass, for a model whose attention takes no such mask)."""
    one, cuts = {}, {}
    for i in indices:
        one[i], cuts[i] = one_shot_sequence(examples[i], examples[neighbor_index[i]], special, max_length)
    zero: dict[int, Sequence] = {}  # the rows' and their neighbours' zero-shot sequences, each built once

    def zero_of(k: int) -> Sequence:
        if k not in zero:
            zero[k] = zero_shot_sequence(examples[k], special, max_length)[0]
        return zero[k]

    groups: dict[int, list[int]] = {}  # k -> the rows whose one-shot sequence is k's zero-shot one + their own tokens
    for i in indices:
        k, seq = int(neighbor_index[i]), one[i]
        prefix = zero_of(k).input_ids
        # A branch must hold more than its targets: its first target is predicted from within it.
        own = len(seq.input_ids) - len(prefix)
        if not cuts[i].no_demo and seq.input_ids[:len(prefix)] == prefix and own > seq.n_targets:
            groups.setdefault(k, []).append(i)
    scored = set(indices)
    passes = _shared_prefix_passes(groups, zero_of, one, scored, pack_tokens)
    grouped, carried = {i for rows in groups.values() for i in rows}, set(groups) & scored
    for i in indices:
        if i not in grouped and not cuts[i].no_demo:  # a row without its demo gets no one-shot pass
            passes.append((one[i], (("one", i),)))
        if i not in carried:
            passes.append((zero_of(i), (("zero", i),)))
        if compute_ifd:
            passes.append((unconditional_sequence(examples[i], special, max_length), (("uncond", i),)))
    where = {owner: (n, span) for n, (_, owners) in enumerate(passes) for span, owner in enumerate(owners)}
    return PassPlan([sequence for sequence, _ in passes], where, one, cuts)


def _shared_prefix_passes(groups: dict[int, list[int]], zero_of, one: dict[int, Sequence], scored: set[int],
                          pack_tokens: int) -> list[tuple[Sequence, tuple]]:
    """Each group's passes: k's zero-shot sequence, then as many of its rows' own tokens as fit in ``pack_tokens``;
    with each pass, the (pass kind, row) whose loss each of its spans is (``Sequence.spans`` order)."""
    passes = []
    for k, rows in groups.items():
        prefix = zero_of(k)
        packs: list[list[int]] = [[]]
        size = len(prefix.input_ids)
        for i in rows:
            own = len(one[i].input_ids) - len(prefix.input_ids)
            if packs[-1] and size + own > pack_tokens:
                packs.append([])
                size = len(prefix.input_ids)
            packs[-1].append(i)
            size += own
        for n, pack in enumerate(packs):
            ids, starts = list(prefix.input_ids), []
            spans, owners = ([(len(ids), prefix.n_targets)], [("zero", k)]) if n == 0 and k in scored else ([], [])
            for i in pack:
                starts.append(len(ids))
                ids += one[i].input_ids[len(prefix.input_ids):]
                spans.append((len(ids), one[i].n_targets))
                owners.append(("one", i))
            last = spans.pop()  # Sequence.spans lists (len(input_ids), n_targets) first
            sequence = Sequence(tuple(ids), last[1], tuple(spans), tuple(starts) if len(pack) > 1 else ())
            passes.append((sequence, (owners.pop(), *owners)))
    return passes


def _score_row(i: int, k: int, ids: list[str], examples: list[EncodedExample], one: Sequence, cut: Truncation,
               similarity: float, zero_loss: float, one_loss: float, uncond: float, compute_ifd: bool) -> dict:
    # Why a row has no MIWV (such a row is never selected); no-demo: max_length leaves no room for the demonstration;
    # no-response: the tokenizer drops every character of the response (SmolLM2 drops some control characters),
    # so only the EOS would be scored.
    empty = not examples[i].response
    value = None if empty else _finite_or_none(miwv(one_loss, zero_loss))
    status = "no-demo" if cut.no_demo else "no-response" if empty else "ok" if value is not None else "loss-not-finite"
    return {"index": i, "id": ids[i], "neighbor_index": k, "neighbor_id": ids[k],
            "neighbor_similarity": round(float(similarity), 6),
            "zero_shot_loss": _finite_or_none(zero_loss), "one_shot_loss": _finite_or_none(one_loss),
            "miwv": value, "status": status, "unconditional_loss": _finite_or_none(uncond),
            "ifd": _finite_or_none(ifd(zero_loss, uncond)) if compute_ifd and not empty else None,
            "prompt_tokens": len(examples[i].prompt), "response_tokens": len(examples[i].response),
            "one_shot_tokens": len(one.input_ids), "truncated": bool(cut.as_dict()), "truncation": cut.as_dict()}


def chunk_plan(neighbor_index: np.ndarray, chunk_rows: int) -> list[list[int]]:
    """Fixed chunks of row indices that keep the rows sharing a neighbour k together and near k, so that
    ``plan_passes`` gives them one pass (k's example once) which also yields k's zero-shot loss. The order walks
    each component of the neighbour graph breadth-first from its cycle (a mutual pair of neighbours); on the local
    Alpaca pool, at 64 rows a chunk, it cuts the body's tokens by 14 % against walking chains i → k → k′ … The plan
    depends on the neighbours alone: a resumed or multi-process run batches every row as one process does."""
    takers: list[list[int]] = [[] for _ in neighbor_index]
    for i, k in enumerate(neighbor_index):
        takers[int(k)].append(i)
    placed = np.zeros(len(neighbor_index), dtype=bool)
    order: list[int] = []
    for start in range(len(neighbor_index)):
        if placed[start]:
            continue
        seen, i = set(), start
        while i not in seen:  # every path in a neighbour graph ends in a cycle: start the walk there
            seen.add(i)
            i = int(neighbor_index[i])
        placed[i], queue = True, deque([i])
        while queue:
            order.append(k := queue.popleft())
            for i in takers[k]:
                if not placed[i]:
                    placed[i] = True
                    queue.append(i)
    return [order[j:j + chunk_rows] for j in range(0, len(order), chunk_rows)]
