"""Step 4 of MIWV: keep the top floor(r·N) samples, the baselines the paper compares against, and the arms."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SELECTION_METHODS = ("miwv", "ifd", "low-miwv", "length", "random")
BASELINE = "full"  # the model fine-tuned on the whole pool, which every subset's model is compared against
# method -> (the score field it ranks by, descending?); random draws rows instead
RANKED_BY = {"miwv": ("miwv", True), "ifd": ("ifd", True), "low-miwv": ("miwv", False),
           "length": ("response_tokens", True)}


# Cherry LLM keeps only IFD ≤ 1 (cherry_seletion/data_by_IFD.py: `if mean_rate > 1: continue`): above 1 the
# instruction made the response *harder* to predict, a misaligned pair, not a hard one.
IFD_MAX = 1.0


class SelectionError(ValueError):
    pass


def subset_size(n: int, ratio: float) -> int:
    """floor(r · N), refusing ratios outside (0, 1] and subsets of zero rows."""
    if isinstance(ratio, bool) or not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise SelectionError(f"ratio must be in (0, 1]; got {ratio!r}")
    if n < 1:
        raise SelectionError("there are no rows to select from")
    size = math.floor(ratio * n + 1e-9)  # 0.29 * 100 is 28.999…: keep floor() meaning what it says
    if size == 0:
        raise SelectionError(f"ratio {ratio} of {n} rows selects zero rows; the smallest useful ratio is {1 / n:.4g}")
    return size


def select_indices(scores: list[dict], ratio: float, by: str = "miwv", seed: int = 0) -> list[int]:
    """Row indices of the subset, best first: by score (ascending for low-MIWV; ties by id; rows without a finite
    score never selected, nor, for ``ifd``, rows above ``IFD_MAX``), or a seeded permutation for ``random``."""
    if by not in SELECTION_METHODS:
        raise SelectionError(f"by must be one of {', '.join(SELECTION_METHODS)}; got {by!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SelectionError(f"seed must be a non-negative integer; got {seed!r}")
    size = subset_size(len(scores), ratio)
    if by == "random":
        order = np.random.default_rng(seed).permutation(len(scores))
        return [int(scores[j]["index"]) for j in order[:size]]
    field, descending = RANKED_BY[by]
    ranked = [s for s in rank_by(scores, field, descending) if by != "ifd" or s[field] <= IFD_MAX]
    if len(ranked) < size:
        kept = f"a finite {field!r}" + (f" ≤ {IFD_MAX:g} (Cherry LLM's rule)" if by == "ifd" else "")
        raise SelectionError(f"only {len(ranked)} rows have {kept}; cannot select {size}")
    return [int(s["index"]) for s in ranked[:size]]


def rank_by(scores: Sequence[dict], field: str, descending: bool = True) -> list[dict]:
    """The scores with a finite ``field``, best first, ties by id, then row: the one order that the selections and
    the reports' tables of top rows share."""
    usable = [s for s in scores if is_finite_number(s.get(field))]
    return sorted(usable, key=lambda s: (-s[field] if descending else s[field], s["id"], s["index"]))


def demo_trimmed(scores: list[dict]) -> int:
    """Rows whose demonstration ``max_length`` trimmed or cut away: their one-shot loss is not the paper's."""
    return sum(1 for s in scores if (s.get("truncation") or {}).get("demo"))


def score_warnings(scores: list[dict]) -> list[str]:
    """What a user must know about a scores file before trusting its ranking (one sentence per problem)."""
    no_demo = [s["index"] for s in scores if s.get("status") == "no-demo"]
    others = [s["index"] for s in scores if s.get("miwv") is None and s.get("status") != "no-demo"]
    trimmed = [s["index"] for s in scores if s.get("truncated") and s.get("status") != "no-demo"]
    return [line for rows, line in (
        (no_demo, f"{len(no_demo)} rows have no MIWV: max_length leaves no room for their neighbour's example "
                  f"(status 'no-demo', first rows {no_demo[:5]}); they are never selected. Use --max-length auto"),
        (others, f"{len(others)} rows have no finite MIWV (null in scores.jsonl, first rows {others[:5]}); "
                 "they are never selected"),
        (trimmed, f"{len(trimmed)} rows were cut to fit max_length ({demo_trimmed(scores) - len(no_demo)} of them "
                  f"with a trimmed demonstration, which raises MIWV; flagged 'truncated', first rows {trimmed[:5]})"),
    ) if rows]


@dataclass(frozen=True)
class Arm:
    """One fine-tuned model: a selection method at a ratio (and seed), or the full pool."""

    name: str
    method: str  # a selection method, or BASELINE
    ratio: float  # 1.0 for the full pool
    seed: int | None = None  # random selections only


def ratio_label(ratio: float) -> str:
    """0.05 -> '5pct', 0.015 -> '1.5pct'."""
    return f"{round(ratio * 100, 6):g}pct"


def arm_name(method: str, ratio: float, seed: int | None = None) -> str:
    """The one name of a subset, its file and its model: ``miwv_5pct``, ``random-s1_10pct``."""
    return f"{method if seed is None else f'{method}-s{seed}'}_{ratio_label(ratio)}"


def plan_arms(ratios: Sequence[float], methods: Sequence[str], random_seeds: Sequence[int] = (0,),
              include_full: bool = True) -> list[Arm]:
    """Every subset model, smallest ratio first, then the full-pool baseline (a random arm's name carries its seed
    only when there are several seeds to tell apart)."""
    arms = [Arm(arm_name(method, ratio, seed if len(random_seeds) > 1 else None), method, float(ratio), seed)
            for ratio in sorted(ratios) for method in methods
            for seed in (random_seeds if method == "random" else [None])]
    return arms + ([Arm(BASELINE, BASELINE, 1.0)] if include_full else [])


def select_arms(arms: Sequence[Arm], scores: list[dict]) -> dict[str, list[int]]:
    """Each arm's rows: its selection rule on ``scores``, or every row for the full pool."""
    return {arm.name: list(range(len(scores))) if arm.method == BASELINE
            else select_indices(scores, arm.ratio, by=arm.method, seed=arm.seed or 0) for arm in arms}


def is_finite_number(value) -> bool:
    """A real number that is finite (a bool is not a number here, and NaN or infinity never ranks)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
