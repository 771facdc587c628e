"""The ``judge`` stage: every model's answers to the test sets against the baseline's, judged in both orders with the
protocol of ``miwv_lib.method.pairwise``, and their table (``engine`` trains the models and collects the answers)."""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..data.datasets import REGISTRY, TEST_SETS, DataError, InstructionPool, load_test_set
from ..data.models import LoadedModel
from ..method.pairwise import _FLIP, Judge, PairItem, Review, ReviewRequest, Side, combine_orders, summarize, verdict
from ..runtime.io import atomic_open, save_png, stable_hash, write_json, write_jsonl
from .generate import GenerateConfig, cached_test_set, generate_test_set, generation_key, question_text
from .judges import JudgementCache, make_judge, reference_nll, run_judge
from .report import pairs, table_markdown

ALPACA_EVAL = "alpaca_eval_gpt4"
DEFAULT_TEST_SETS = (*TEST_SETS, ALPACA_EVAL)


def _order_record(review: Review, verdict_a: str) -> dict:
    return {"score_1": review.score_1, "score_2": review.score_2, "verdict_a": verdict_a, "error": review.error,
            "raw": review.raw, "cached": review.cached}


def judge_pair(items: list[PairItem], judge: Judge, model_a: str, model_b: str,
               cache: JudgementCache | None = None) -> list[dict]:
    """Both orders of every item through ``judge`` (symmetric judges too); one record per item, its outcome for A."""
    usable = [it for it in items if it.reference or not judge.needs_reference]
    sides = [(Side(model_a, it.answer_a, it.nll_a), Side(model_b, it.answer_b, it.nll_b)) for it in usable]
    reviews = run_judge(judge, [ReviewRequest(it.id, it.dataset, it.question, it.reference, *order)
                                for it, (a, b) in zip(usable, sides) for order in ((a, b), (b, a))], cache)
    records = []
    for item, ab, ba in zip(usable, reviews[::2], reviews[1::2]):
        v_ab = verdict(ab, judge.margin)  # A in position 1
        v_ba = _FLIP[verdict(ba, judge.margin)]  # A in position 2: position 1's verdict, seen from A
        records.append({"judge": judge.id, "model_a": model_a, "model_b": model_b, "dataset": item.dataset,
                        "id": item.id, "a_first": _order_record(ab, v_ab), "b_first": _order_record(ba, v_ba),
                        "outcome": combine_orders(v_ab, v_ba), "unparsed": int(not ab.scored) + int(not ba.scored)})
    return records


TABLE_COLUMNS = ("judge", "model_a", "model_b", "test_set", "n", "wins", "ties", "losses", "winning_score",
                 "ci_low", "ci_high", "unparsed")


def write_table(rows: list[dict], out_stem: str | Path) -> tuple[Path, Path]:
    """``<stem>.csv`` and ``<stem>.md``, written atomically."""
    csv_path, md_path = Path(out_stem).with_suffix(".csv"), Path(out_stem).with_suffix(".md")
    with atomic_open(csv_path) as handle:
        writer = csv.DictWriter(handle, fieldnames=TABLE_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with atomic_open(md_path) as handle:
        handle.write(table_markdown(rows))
    return csv_path, md_path


def plot_outcomes(rows: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Figure-2-style stacked horizontal bars: win/tie/loss share per test set, one panel per (judge, pair)."""
    from .plots import outcome_figure  # lazy: matplotlib comes with the notebooks extra

    panels = {f"{a} vs {b} — judge {judge}": ([r["test_set"] for r in part], part)  # "All" last, at the bottom
              for (judge, a, b), part in pairs(rows).items()}
    return save_png(outcome_figure(panels, title=title), path, dpi=150, close=True)


def pair_items(records_a: list[dict], records_b: list[dict]) -> list[PairItem]:
    """Join two models' generation records (``generate.generation_records``) on (dataset, id)."""
    by_key = {(r["dataset"], r["id"]): r for r in records_b}
    matched = [(a, by_key.get((a["dataset"], a["id"]))) for a in records_a]
    if missing := next((a for a, b in matched if b is None), None):
        raise ValueError(f"model B has no generation for {missing['dataset']}/{missing['id']}")
    return [PairItem(a["id"], a["dataset"], question_text(a), a.get("reference"), a["output"], b["output"],
                     a.get("reference_nll"), b.get("reference_nll")) for a, b in matched]


@dataclass
class ComparisonResult:
    run_dir: Path
    table: list[dict]  # summarize() rows
    records: list[dict]  # one per (judge, pair, prompt)
    models: dict = field(default_factory=dict)  # name -> train.TrainResult
    paths: dict[str, Path] = field(default_factory=dict)

    def dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.table, columns=TABLE_COLUMNS)


def test_set_label(name: str) -> str:
    """How a test set is named in files and tables: a registry name as is, a file by its stem."""
    return name if name in REGISTRY else Path(name).name.split(".")[0].removesuffix("_test_set")


def load_test_pools(test_sets: Sequence[str] | Mapping[str, int | None], sample: int | None = None, seed: int = 0,
                    data_dir: str | Path | None = None) -> dict[str, InstructionPool]:
    """The test sets by label, each optionally cut to a deterministic sample of ``sample`` prompts (or of its own
    number, given a mapping of name to sample)."""
    samples = dict(test_sets) if isinstance(test_sets, Mapping) else dict.fromkeys(test_sets, sample)
    labels = {name: test_set_label(name) for name in samples}
    if twice := next((n for n in samples if list(labels.values()).count(labels[n]) > 1), None):
        raise DataError(f"two test sets are both named {labels[twice]!r} in files and tables: rename one",
                        source=twice)
    return {labels[name]: load_test_set(name, data_dir=data_dir, sample=n, seed=seed) for name, n in samples.items()}


def _with_reference_nll(rows: list[dict], path: Path, identity: str, template: str, max_length: int,
                        loaded: LoadedModel | None) -> list[dict] | None:
    """``rows``, each with its reference NLL under the model, cached in ``path``; None if not cached and no model."""
    key = stable_hash({"model": identity, "ids": [r["id"] for r in rows], "refs": [r.get("reference") for r in rows],
                       "template": template, "max_length": max_length})
    # the prompts were left out of the key once: checked apart, so that NLLs cached (and committed) before stay valid
    prompts = stable_hash([[r["instruction"], r.get("input", "")] for r in rows])
    if path.exists() and (saved := json.loads(path.read_text(encoding="utf-8"))).get("key") == key \
            and saved.get("prompts", prompts) == prompts:
        values = saved["reference_nll"]
    elif loaded is None:
        return None
    else:
        with_ref = [r for r in rows if r.get("reference")]
        nll = iter(reference_nll(loaded, with_ref, [r["reference"] for r in with_ref], template, max_length)
                   if with_ref else [])
        values = [next(nll) if r.get("reference") else None for r in rows]
        write_json(path, {"key": key, "prompts": prompts, "reference_nll": values})
    return [{**r, "reference_nll": v} for r, v in zip(rows, values)]


def cached_generations_for_model(model_identity: str, dtype: str, name: str, pools: dict[str, InstructionPool],
                                 out_dir: Path, config: GenerateConfig, nll_max_length: int = 1024,
                                 loaded: LoadedModel | None = None) -> list[dict] | None:
    """What ``generate_for_model`` would return, read from its caches; None if any test set's generations or reference
    NLLs are missing or were made by another model or setting. Given ``loaded``, what is missing is made instead."""
    records = []
    for dataset, pool in pools.items():
        rows = cached_test_set(out_dir / name, dataset, generation_key(model_identity, dtype, pool, config, name), pool)
        if rows is None and loaded is not None:
            rows = generate_test_set(loaded, pool, out_dir / name, dataset, config, generator=name)
        if rows is not None:
            rows = _with_reference_nll(rows, out_dir / name / f"{dataset}.reference_nll.json", model_identity,
                                       config.template, nll_max_length, loaded)
        if rows is None:
            return None
        records += rows
    return records


def generate_for_model(loaded: LoadedModel, name: str, pools: dict[str, InstructionPool], out_dir: Path,
                       config: GenerateConfig, nll_max_length: int = 1024) -> list[dict]:
    """Generations (+ reference NLLs) of one model on every test pool, cached under ``out_dir/<name>``."""
    return cached_generations_for_model(loaded.identity, str(loaded.dtype), name, pools, out_dir, config,
                                        nll_max_length, loaded=loaded)


def compare_generations(generations: dict[str, list[dict]], baseline: str, judges: Sequence[Judge | str],
                        out_dir: str | Path, datasets: Sequence[str] | None = None, n_resamples: int = 2000,
                        seed: int = 0) -> ComparisonResult:
    """Every model against ``baseline`` with every judge; writes records, table (CSV, md) and figure."""
    out_dir = Path(out_dir)
    cache = JudgementCache(out_dir / "judgements_cache.jsonl")
    judges = [make_judge(j) for j in judges]
    records = [record for judge in judges for name, rows in generations.items() if name != baseline
               for record in judge_pair(pair_items(rows, generations[baseline]), judge, name, baseline, cache)]
    table = summarize(records, datasets, n_resamples=n_resamples, seed=seed)
    paths = {"records": write_jsonl(out_dir / "judgements.jsonl", records)}
    paths["csv"], paths["markdown"] = write_table(table, out_dir / "table")
    if table:
        try:
            paths["figure"] = plot_outcomes(table, out_dir / "win_tie_loss.png")
        except ImportError:  # matplotlib comes with the notebooks extra; the tables do not need it
            warnings.warn("matplotlib is not installed: no win/tie/loss figure (pip install matplotlib)", stacklevel=2)
    return ComparisonResult(run_dir=out_dir, table=table, records=records, paths=paths)
