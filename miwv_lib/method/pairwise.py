"""The paper's pairwise protocol: a judge scores both answers of a ``ReviewRequest`` (``Review``), ``verdict`` makes
win/tie/loss of the scores, each prompt is judged in both orders and ``combine_orders`` makes one outcome of the two;
winning score = 1 + (wins − losses) / N, with a seeded paired bootstrap 95 % interval."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

WIN, TIE, LOSS = "win", "tie", "loss"

# The Cherry LLM / AlpaGasus pairwise review prompt, verbatim.
REVIEW_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
REVIEW_CRITERIA = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above.\nPlease rate the helpfulness, relevance, accuracy, level of details of their "
    "responses. Each assistant receives an overall score on a scale of 1 to 10, where a higher score indicates "
    "better overall performance.\nPlease first output a single line containing only two values indicating the "
    "scores for Assistant 1 and 2, respectively. The two scores are separated by a space. In the subsequent line, "
    "please provide a comprehensive explanation of your evaluation, avoiding any potential bias and ensuring that "
    "the order in which the responses were presented does not affect your judgment.\n\n"
)
REVIEW_TEMPLATE = (
    "[Question]\n{question}\n\n"
    "[The Start of Assistant 1's Answer]\n{answer_1}\n\n[The End of Assistant 1's Answer]\n\n"
    "[The Start of Assistant 2's Answer]\n{answer_2}\n\n[The End of Assistant 2's Answer]\n\n"
    "[System]\n{criteria}"
)


@dataclass(frozen=True)
class Side:
    """One model's contribution to a comparison of one prompt."""

    model: str
    answer: str
    reference_nll: float | None = None  # mean NLL of the reference answer under this model (likelihood judge)


@dataclass(frozen=True)
class ReviewRequest:
    item_id: str
    dataset: str
    question: str
    reference: str | None
    first: Side  # shown as Assistant 1
    second: Side  # shown as Assistant 2


@dataclass
class Review:
    score_1: float | None
    score_2: float | None
    raw: str | None = None  # the judge's own words (LLM judges)
    error: str | None = None  # why there are no scores; such a review counts as a tie and is reported
    cached: bool = False

    @property
    def scored(self) -> bool:  # a NaN score would make a silent tie: it is counted as unscored, and reported
        return all(s is not None and math.isfinite(s) for s in (self.score_1, self.score_2))

    def as_dict(self) -> dict:
        return {"score_1": self.score_1, "score_2": self.score_2, "raw": self.raw, "error": self.error}


class Judge(Protocol):
    id: str  # recorded with every result and part of every cache key
    margin: float  # |score_1 − score_2| ≤ margin is a tie
    needs_reference: bool  # prompts without a reference answer are skipped
    cacheable: bool  # worth caching on disk (expensive, and determined by question + answers alone)

    def review(self, requests: list[ReviewRequest]) -> list[Review]: ...


def verdict(review: Review, margin: float = 0.0) -> str:
    """win/tie/loss for the answer in position 1; an unscored review is a tie."""
    if not review.scored:
        return TIE
    difference = review.score_1 - review.score_2
    return WIN if difference > margin else LOSS if difference < -margin else TIE


_NUMBER = r"((?:(?<!\w)-)?\d+(?:\.\d+)?)"  # "-3" is out of range, not a 3; "8-7" is 8 and 7
_LABEL = re.compile(r"\b(?:assistant|answer|response)\s*#?\s*[12]\b(?:'s\s+score)?\s*[:=]?", re.IGNORECASE)
# the scale is not a score: "(1-10)", "on a scale of 1 to 10", "8/10", "4 out of 10"
_SCALE = re.compile(r"\b[01]\s*(?:-|–|to)\s*10\b|\s*(?:/|out\s+of)\s*10(?:\.0+)?\b", re.IGNORECASE)
# the Cherry/AlpaGasus score line: two numbers, perhaps "Scores:" before and a comment without numbers after
_PAIR = re.compile(rf"[\s():]*(?:scores?\b[\s():]*)?{_NUMBER}(?:\s*[,;&]\s*|\s+(?:and|vs\.?)\s+|\s+|\s*-\s*)"
                   rf"{_NUMBER}(?:[\s.]*|\s*[(\-–—,;:]\D*)", re.IGNORECASE)
# between a label and its score only score words ("Assistant 1's score is 8", "Assistant 2 gets 10"), so neither
# "Assistant 1 gave 3 examples" nor the 2 of a later "Assistant 2" is read as a score
_GAP = r"(?:[\s:=(),]|'s\b|\b(?:a|an|is|of|gets|got|receives|earns|rated|score[sd]?|overall|final)\b)*?"
# nor a number that compares ("Assistant 1 is 2 points better", "Assistant 2 is 1 point behind")
_COMPARED = r"(?!\d|\.\d|\s*(?:points?\s+)?(?:more|better|higher|lower|worse|less|fewer|behind|ahead|than)\b)"
_LABELLED = {k: re.compile(rf"\b(?:assistant|answer|response)\s*#?\s*{k}\b{_GAP}{_NUMBER}{_COMPARED}", re.IGNORECASE)
             for k in (1, 2)}
_ORDER = re.compile(r"\b(?:assistant|answer|response)\s*#?\s*([12])\b", re.IGNORECASE)


def _valid(scores: list[float]) -> tuple[float, float] | None:
    return (scores[0], scores[1]) if len(scores) == 2 and all(0 <= s <= 10 for s in scores) else None


def parse_review(text: str) -> tuple[float, float] | None:
    """The two scores (each in [0, 10]) of a review, or None when they cannot be read with confidence: from the
    score line ("8 7", "8, 7", "8/10 and 7/10", "Assistant 1: 8, Assistant 2: 7"), else from labels ("Assistant 2:
    6"). The score line is the first line with a number that is not the scale, as a header ("Scores (1-10):") may
    come first; a line with any other number is not one (the 3 of "Assistant 1: 8 (it covers all 3 points)")."""
    cleaned = _SCALE.sub("", (text or "").replace("*", ""))
    blank = [(s, _LABEL.sub(lambda m: " " * len(m[0]), s)) for s in cleaned.splitlines()]  # positions kept
    raw, line = next(((s, b) for s, b in blank if re.search(r"\d", b)), ("", ""))
    if (pair := _PAIR.fullmatch(line)) and (scores := _valid([float(pair[1]), float(pair[2])])):
        order = _ORDER.findall(raw[:pair.end(2)])  # "Assistant 2: 7, Assistant 1: 9" is 9 and 7
        if order in ([], ["1", "2"], ["2", "1"]):  # else the labels say more than the line: read them below
            return scores[::-1] if order == ["2", "1"] else scores
    labelled = [_LABELLED[k].search(cleaned) for k in (1, 2)]
    return _valid([float(m.group(1)) for m in labelled]) if all(labelled) else None


def review_prompt(question: str, answer_1: str, answer_2: str) -> str:
    return REVIEW_TEMPLATE.format(question=question, answer_1=answer_1, answer_2=answer_2, criteria=REVIEW_CRITERIA)


ALL = "All"
OUTCOMES = (WIN, TIE, LOSS)
_FLIP = {WIN: LOSS, LOSS: WIN, TIE: TIE}
OUTCOME_VALUE = {WIN: 1, TIE: 0, LOSS: -1}  # a prompt's share of wins − losses: the winning score is 1 + the mean


def combine_orders(first: str, second: str) -> str:
    """One prompt's outcome for model A from its verdicts in the two orders: a win if A wins both, or wins one and ties
    the other; a loss symmetrically; otherwise a tie (one win and one loss: the judge only followed the position)."""
    total = OUTCOME_VALUE[first] + OUTCOME_VALUE[second]
    return WIN if total > 0 else LOSS if total < 0 else TIE


def winning_score(wins: int, losses: int, n: int) -> float:
    """1 + (wins − losses) / N: 2 = A always wins, 1 = even, 0 = A always loses."""
    return 1.0 + (wins - losses) / n if n else math.nan


def mean_interval(values: Sequence[float], n_resamples: int = 2000, level: float = 0.95,
                  seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one per prompt; prompts resampled, seeded)."""
    from scipy.stats import bootstrap

    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return math.nan, math.nan
    if np.all(data == data[0]):  # every resample has the same mean (scipy refuses a single value)
        return float(data[0]), float(data[0])
    interval = bootstrap((data,), np.mean, n_resamples=n_resamples, confidence_level=level, method="percentile",
                         vectorized=True, random_state=np.random.default_rng(seed)).confidence_interval
    return float(interval.low), float(interval.high)


def bootstrap_interval(outcomes: Sequence[str], n_resamples: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Interval of the winning score 1 + mean(+1 win, 0 tie, −1 loss) over prompts."""
    low, high = mean_interval([OUTCOME_VALUE[o] for o in outcomes], n_resamples, level, seed)
    return 1.0 + low, 1.0 + high


@dataclass(frozen=True)
class PairItem:
    """One test prompt with both models' answers (and, for the likelihood judge, their reference NLLs)."""

    id: str
    dataset: str
    question: str
    reference: str | None
    answer_a: str
    answer_b: str
    nll_a: float | None = None
    nll_b: float | None = None


def summarize(records: list[dict], datasets: Sequence[str] | None = None, n_resamples: int = 2000,
              seed: int = 0) -> list[dict]:
    """Table-3 rows: per (judge, model pair), one row per test set and one for all sets together."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["judge"], record["model_a"], record["model_b"]), []).append(record)
    rows = []
    for (judge_id, model_a, model_b), group in groups.items():
        present = list(dict.fromkeys(r["dataset"] for r in group))
        named = list(datasets or ())
        order = [d for d in named if d in present] + [d for d in present if d not in named]
        # In the prompts' (dataset, id) order, the order a paired comparison resamples them in: the same outcomes
        # then give the same interval in both.
        group.sort(key=lambda r: (r["dataset"], r["id"]))
        for name in [*order, ALL]:
            subset = group if name == ALL else [r for r in group if r["dataset"] == name]
            outcomes = [r["outcome"] for r in subset]
            counts = {o: outcomes.count(o) for o in OUTCOMES}
            low, high = bootstrap_interval(outcomes, n_resamples, seed=seed)
            rows.append({"judge": judge_id, "model_a": model_a, "model_b": model_b, "test_set": name,
                         "n": len(outcomes), "wins": counts[WIN], "ties": counts[TIE], "losses": counts[LOSS],
                         # unrounded: a table rounds once (0.33850 rounded to 0.3385 would print as 0.339)
                         "winning_score": winning_score(counts[WIN], counts[LOSS], len(outcomes)),
                         "ci_low": low, "ci_high": high,
                         "unparsed": sum(r["unparsed"] for r in subset)})
    return rows
