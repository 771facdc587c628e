"""Steps 2–4 of MIWV: zero-shot and one-shot losses of a row, their difference, and IFD beside it.
``plan_passes`` lays out a chunk's forward passes; ``_score_row`` turns the losses into a row of ``scores.jsonl``."""

from __future__ import annotations

import math
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


def plan_passes(examples: list[EncodedExample], indices: list[int], neighbor_index: np.ndarray,
                special: SpecialTokens, max_length: int, compute_ifd: bool) -> PassPlan:
    """The passes for rows ``indices``: one-shot for each, zero-shot only where no one-shot pass carries it
    (a row's exact zero-shot sequence opens its neighbour's one-shot sequence: its loss is a span of that pass)."""
    zero = {i: zero_shot_sequence(examples[i], special, max_length)[0] for i in indices}
    one, cuts = {}, {}
    for i in indices:
        one[i], cuts[i] = one_shot_sequence(examples[i], examples[neighbor_index[i]], special, max_length)
    carrier: dict[int, int] = {}  # row k -> the row i whose one-shot pass opens with k's zero-shot sequence
    for i in indices:
        k = int(neighbor_index[i])
        if (not cuts[i].no_demo and k in zero and k not in carrier
                and one[i].input_ids[:len(zero[k].input_ids)] == zero[k].input_ids):
            carrier[k] = i

    passes: list[tuple[Sequence, tuple]] = []  # each pass, and the (pass kind, row) whose loss each of its spans is
    for i in indices:
        k = int(neighbor_index[i])
        if carrier.get(k) == i:
            spans = ((len(zero[k].input_ids), zero[k].n_targets),)
            passes.append((Sequence(one[i].input_ids, one[i].n_targets, spans), (("one", i), ("zero", k))))
        elif not cuts[i].no_demo:  # a row without its demo gets no one-shot pass
            passes.append((one[i], (("one", i),)))
        if i not in carrier:
            passes.append((zero[i], (("zero", i),)))
        if compute_ifd:
            passes.append((unconditional_sequence(examples[i], special, max_length), (("uncond", i),)))
    where = {owner: (n, span) for n, (_, owners) in enumerate(passes) for span, owner in enumerate(owners)}
    return PassPlan([sequence for sequence, _ in passes], where, one, cuts)


def _score_row(i: int, k: int, ids: list[str], examples: list[EncodedExample], one: Sequence, cut: Truncation,
               similarity: float, zero_loss: float, one_loss: float, uncond: float, compute_ifd: bool) -> dict:
    value = _finite_or_none(miwv(one_loss, zero_loss))
    # Why a row has no MIWV (such a row is never selected); no-demo: max_length leaves no room for the demonstration.
    status = "no-demo" if cut.no_demo else "ok" if value is not None else "loss-not-finite"
    return {"index": i, "id": ids[i], "neighbor_index": k, "neighbor_id": ids[k],
            "neighbor_similarity": round(float(similarity), 6),
            "zero_shot_loss": _finite_or_none(zero_loss), "one_shot_loss": _finite_or_none(one_loss),
            "miwv": value, "status": status, "unconditional_loss": _finite_or_none(uncond),
            "ifd": _finite_or_none(ifd(zero_loss, uncond)) if compute_ifd else None,
            "prompt_tokens": len(examples[i].prompt), "response_tokens": len(examples[i].response),
            "one_shot_tokens": len(one.input_ids), "truncated": bool(cut.as_dict()), "truncation": cut.as_dict()}


def chunk_plan(neighbor_index: np.ndarray, chunk_rows: int) -> list[list[int]]:
    """Fixed chunks of row indices along neighbour chains i → k → k' … (so ``plan_passes`` can share passes).
    The plan depends on the neighbours alone: a resumed or multi-process run batches every row as one process does."""
    placed = np.zeros(len(neighbor_index), dtype=bool)
    order: list[int] = []
    for start in range(len(neighbor_index)):
        i = start
        while not placed[i]:
            placed[i] = True
            order.append(i)
            i = int(neighbor_index[i])
    return [order[j:j + chunk_rows] for j in range(0, len(order), chunk_rows)]
