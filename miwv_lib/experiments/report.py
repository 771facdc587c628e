"""Every report, and the table helpers they share: a notebook run's ``report.md`` (:func:`write_report`) and the
study's ``REPORT.md`` (its ``report`` stage). Both are rebuilt from a run directory's files alone; the study's
conclusions are derived from the paired comparisons, never written by hand. The notebooks import their summaries here.
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
import subprocess
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.datasets import record_count
from ..data.prompts import encode_text
from ..method.pairwise import ALL, OUTCOME_VALUE, mean_interval
from ..method.selection import BASELINE, SelectionError, demo_trimmed, rank_by, ratio_label, subset_size
from ..runtime.io import atomic_open, read_jsonl, save_png, write_json
from .select import SELECTIONS_FILE

if TYPE_CHECKING:
    from .study import Study

# Figures that the report embeds, in order, with a caption (others in figures/ are listed by name).
KEY_FIGURES = {
    "01_token_lengths.png": "Token lengths of instruction, input and response (01)",
    "02_loss_histograms.png": "Zero-shot loss, one-shot loss and MIWV (02)",
    "02_miwv_vs_ifd.png": "MIWV against IFD, one point per sample (02)",
    "03_jaccard.png": "Overlap (Jaccard) between the selections (03)",
    "03_selected_lengths.png": "Response length of the selected samples (03)",
    "04_loss_curves.png": "Training loss of each fine-tuned model (04)",
    "05_win_tie_loss.png": "Win / tie / lose against the full-data model (05)",
}

_STOPWORDS = frozenset("""
a an the and or but if then else of to in on at by for with from into onto about as is are was were be been being
this that these those it its it's i you he she we they me him her us them my your his our their what which who whom
whose when where why how not no do does did done can could should would will shall may might must have has had
there here than so such very more most some any each every all both few other own same too also just only over
under up down out off again further once s t using use given give following write make one two three
""".split())


def row_source_files(files: Sequence[str | Path], n_rows: int) -> list[str]:
    """Which file each row came from (file names only), for a pool read from ``files`` in order: ``load_instructions``
    concatenates them and cuts at ``limit``. One file (or a hub cache): every row is that file."""
    names = [Path(f).name for f in files]
    if len(names) <= 1:
        return [names[0] if names else "unknown"] * n_rows
    out: list[str] = []
    for path, name in zip(files, names):
        if len(out) >= n_rows:
            break
        out.extend([name] * min(record_count(path), n_rows - len(out)))
    return out + ["unknown"] * (n_rows - len(out))


def sample_rows(n_rows: int, sample: int | None, seed: int = 0) -> list[int]:
    """Row numbers of a seeded random sample of ``sample`` rows, in pool order (all rows if None or ≥ n_rows)."""
    if sample is None or sample >= n_rows:
        return list(range(n_rows))
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 2:
        raise ValueError(f"sample must be an integer ≥ 2 or None; got {sample!r}")
    return sorted(random.Random(seed).sample(range(n_rows), sample))


def token_lengths(rows: Sequence[Mapping[str, str]], tokenizer) -> dict[str, np.ndarray]:
    """Tokens (no special tokens) of the instruction, the input and the response of every row."""
    return {field: np.array([len(x) for x in encode_text(tokenizer, [row.get(key) or "" for row in rows])], np.int64)
            for field, key in (("instruction", "instruction"), ("input", "input"), ("response", "output"))}


def summary_stats(values: Iterable[float | None]) -> dict[str, float]:
    """n, mean, std, min, quartiles and max of the finite values (NaN statistics when there are none)."""
    arr = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"n": 0, **{k: math.nan for k in ("mean", "std", "min", "p25", "median", "p75", "max")}}
    return {"n": int(arr.size), "mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
            "min": float(arr.min()), "p25": float(np.percentile(arr, 25)), "median": float(np.median(arr)),
            "p75": float(np.percentile(arr, 75)), "max": float(arr.max())}


def score_summary(scores: Sequence[Mapping]) -> dict[str, dict]:
    return {f: summary_stats(s.get(f) for s in scores) for f in ("zero_shot_loss", "one_shot_loss", "miwv", "ifd")}


def spearman(x: Sequence[float | None], y: Sequence[float | None]) -> float:
    """Rank correlation over the pairs where both values are finite (average ranks for ties)."""
    import pandas as pd

    frame = pd.DataFrame({"x": x, "y": y}, dtype=np.float64).replace([np.inf, -np.inf], np.nan).dropna()
    return float(frame["x"].corr(frame["y"], method="spearman")) if len(frame) >= 3 else math.nan


def ranked_examples(rows: Sequence[Mapping], scores: Sequence[Mapping], n: int = 5, *,
                    highest: bool = True) -> list[dict]:
    """The ``n`` rows with the highest (or lowest) MIWV, each with its neighbour (the demo)."""
    out = []
    for s in rank_by(scores, "miwv", highest)[:n]:
        example = {key: s.get(key) for key in ("index", "id", "miwv", "ifd", "zero_shot_loss", "one_shot_loss",
                                                "neighbor_index", "neighbor_similarity")}
        for prefix, row in (("", rows[s["index"]]), ("neighbor_", rows[s["neighbor_index"]])):
            example.update({prefix + key: row.get(key, "") if key == "input" else row[key]
                            for key in ("instruction", "input", "output")})
        out.append(example)
    return out


def shortest_example(encoded: Sequence, neighbor_index: Sequence[int]) -> int:
    """The row whose one-shot sequence (demo + sample) is shortest: a readable worked example."""
    sizes = [len(e.prompt) + len(e.response) for e in encoded]
    return min(range(len(encoded)), key=lambda i: (sizes[i] + sizes[int(neighbor_index[i])], i))


def truncation_summary(scores: Sequence[Mapping], top_fraction: float = 0.15) -> dict[str, Any]:
    """How often ``max_length`` cut something, overall and among the top ``top_fraction`` by MIWV. A trimmed
    demonstration helps less, which pushes MIWV up: if trimmed rows crowd the top of the ranking, the selection
    partly reflects truncation, and ``max_length`` should be raised."""
    ranked = rank_by(scores, "miwv")
    k = max(1, math.floor(top_fraction * len(ranked) + 1e-9)) if ranked else 0
    cut = [s["miwv"] for s in ranked if s.get("truncated")]
    whole = [s["miwv"] for s in ranked if not s.get("truncated")]
    return {"no_demo": sum(s.get("status") == "no-demo" for s in scores), "rows": len(ranked), "truncated": len(cut),
            "demo_trimmed": demo_trimmed(ranked), "top_k": k,
            "top_truncated": sum(bool(s.get("truncated")) for s in ranked[:k]),
            "median_miwv_truncated": float(np.median(cut)) if cut else math.nan,
            "median_miwv_not_truncated": float(np.median(whole)) if whole else math.nan}


def jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def jaccard_matrix(selections: Mapping[str, Iterable[int]]) -> tuple[list[str], np.ndarray]:
    labels = list(selections)
    sets = [set(selections[k]) for k in labels]  # once: a selection may be an iterator
    return labels, np.array([[jaccard(a, b) for b in sets] for a in sets])


def top_words(texts: Iterable[str], n: int = 10) -> list[tuple[str, int]]:
    """Most frequent words (lower case, letters only, 3+ characters, common words removed)."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w in re.findall(r"[a-z][a-z']{2,}", text.lower()) if w not in _STOPWORDS)
    return counts.most_common(n)


# ---------------------------------------------------------------------------------- what every report is made of


def fmt(value: Any, spec: str = ".4f") -> str:
    """A number for a table; a missing or non-finite one is a dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, spec)


def _read(path: Path, default: Any = None) -> Any:
    """A JSON, JSONL or CSV file of a run directory, or ``default`` when a stage has not written it (yet)."""
    if not path.is_file():
        return default
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle)) if path.suffix == ".csv" else json.load(handle)


def md_table(header: Sequence[str], rows: Iterable[Sequence], align: str = "") -> list[str]:
    """A Markdown table's lines; ``align`` has an ``r`` for each right-aligned column (the others are left)."""
    lines = ["| " + " | ".join(map(str, cells)) + " |" for cells in (header, *rows)]
    return [lines[0], "|" + "".join("---:|" if a == "r" else "---|" for a in align.ljust(len(header))), *lines[1:]]


def pairs(rows: Iterable[Mapping]) -> dict[tuple[str, str, str], list]:
    """Evaluation table rows grouped by (judge, model A, model B), in their order."""
    out: dict[tuple[str, str, str], list] = {}
    for r in rows:
        out.setdefault((r["judge"], r["model_a"], r["model_b"]), []).append(r)
    return out


def _interval(r: Mapping) -> str:
    return f"[{float(r['ci_low']):.3f}, {float(r['ci_high']):.3f}]"


def _outcome_cells(r: Mapping) -> list:
    """n, wins, ties, losses, winning score and 95% CI of an evaluation table row (as summarized or read from CSV)."""
    return [r["n"], r["wins"], r["ties"], r["losses"], f"{float(r['winning_score']):.3f}", _interval(r)]


def table_markdown(rows: list[dict]) -> str:
    """One markdown table per (judge, pair), as in the paper's Table 3."""
    blocks = []
    for (judge, model_a, model_b), part in pairs(rows).items():
        table = md_table(["test set", "n", "wins", "ties", "losses", "winning score", "95% CI", "unparsed"],
                         [[f"**{r['test_set']}**" if r["test_set"] == ALL else r["test_set"], *_outcome_cells(r),
                           r["unparsed"]] for r in part], "lrrrrrlr")
        blocks.append("\n".join([f"**{model_a} vs {model_b}** (judge: `{judge}`)", "", *table]))
    return "\n\n".join(blocks) + "\n"


# ---------------------------------------------------------------------------------- a notebook run's report.md


def build_report(run_dir: str | Path) -> str:
    """The Markdown text of ``report.md``, from the files in ``run_dir`` only."""
    run_dir = Path(run_dir)
    pipeline = _read(run_dir / "pipeline.json") or {}
    scores, rows = _read(run_dir / "scores.jsonl", []), _read(run_dir / "pool.jsonl", [])
    lines = ["# MIWV run report", "",
             f"Run directory: `{run_dir.name}`. Built from the files in it by "
             "`miwv_lib.experiments.report.write_report`.", ""]
    if pipeline.get("description"):
        lines += [str(pipeline["description"]).strip(), ""]
    lines += [*_setup_lines(run_dir, pipeline, rows), *(_score_lines(scores, rows) if scores else [])]
    if summary := _read(run_dir / "subsets" / "summary.json"):
        lines += ["## Subsets", "", f"Pool of {summary.get('pool_rows')} rows; each subset keeps floor(r·N) rows.", "",
                  *md_table(["method", "ratio", "rows", "rows with a trimmed demo", "file"],
                            [[e["method"], f"{e['ratio']:g}", e["rows"], e.get("demo_trimmed", "?"),
                              f"`subsets/{e['file']}`"] for e in summary.get("subsets", [])]),
                  *(f"| {e['method']} | {e['ratio']:g} | skipped: {e['reason']} | | |"
                    for e in summary.get("skipped", [])), ""]
    lines += _model_lines(run_dir)
    if figures := sorted(p.name for p in (run_dir / "figures").glob("[!.]*.png")):
        lines += ["## Figures", ""]
        for name, caption in KEY_FIGURES.items():
            if name in figures:
                lines += [f"**{caption}**", "", f"![{caption}](figures/{name})", ""]
        if others := [n for n in figures if n not in KEY_FIGURES]:
            lines += ["Other figures: " + ", ".join(f"[{n}](figures/{n})" for n in others), ""]
    if executed := sorted(p.name for p in (run_dir / "notebooks").glob("[!.]*.ipynb")):
        lines += ["## Executed notebooks", "", *(f"- [{n}](notebooks/{n})" for n in executed), ""]
    return "\n".join(lines).rstrip() + "\n"


def _setup_lines(run_dir: Path, pipeline: Mapping, rows: list[dict]) -> list[str]:
    info, manifest = _read(run_dir / "pool_info.json") or {}, _read(run_dir / "manifest.json") or {}
    items: list[tuple[str, Any]] = []
    if info:
        how = [f"limit {info['limit']}"] if info.get("limit") else []
        if info.get("sample"):
            how.append(f"random sample of {info['sample']}, seed {info.get('sample_seed')}")
        items.append(("data", f"`{info.get('data')}` ({info.get('rows')} rows{': ' + ', '.join(how) if how else ''})"))
        if files := ", ".join(f"`{f}`" for f in info.get("files", [])):
            items.append(("files", files))
        items.append(("exact duplicate (instruction, input) groups", len(info.get("duplicate_groups", []))))
    elif rows:
        items.append(("rows", len(rows)))
    if config := manifest.get("config", {}):
        items += [
            ("model", f"`{config.get('model')}` ({manifest.get('fingerprint_inputs', {}).get('dtype')})"),
            ("embedder", f"`{config.get('embedder')}`"),
            ("template, max length", f"{config.get('template')}, {manifest.get('max_length', config.get('max_length'))}"
                                     " tokens"),
            ("scoring time", f"{fmt(manifest.get('seconds_scoring'), '.1f')} s "
                             f"({fmt(manifest.get('seconds_per_sample'), '.3f')} s/sample), neighbours "
                             f"{fmt(manifest.get('seconds_neighbors'), '.1f')} s"),
            ("truncated rows", f"{manifest.get('truncated_rows')} ({manifest.get('demo_trimmed_rows', '?')} with a "
                               f"trimmed demonstration; {manifest.get('no_miwv_rows', '?')} rows without MIWV)")]
    if seconds := pipeline.get("seconds") or {}:
        items.append(("notebook wall time", ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
                      + f" (total {sum(seconds.values()):.0f} s)"))
    if pipeline.get("status"):
        items.append(("pipeline status", pipeline["status"]))
    return ["## Setup", "", *md_table(["item", "value"], items), ""]


def _one_line(text: str, limit: int = 110) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _score_lines(scores: list[dict], rows: list[dict]) -> list[str]:
    positive = sum(1 for s in scores if s.get("miwv") is not None and s["miwv"] > 0)
    rho = spearman([s.get("miwv") for s in scores], [s.get("ifd") for s in scores])
    lines = ["## MIWV and IFD", "",
             f"N = {len(scores)} scored samples. MIWV = one-shot loss − zero-shot loss "
             "(high: the most similar other example made the model worse on this one).", "",
             *md_table(["quantity", "n", "mean", "std", "min", "25%", "median", "75%", "max"],
                       [[name, st["n"], *(fmt(st[k]) for k in ("mean", "std", "min", "p25", "median", "p75", "max"))]
                        for name, st in score_summary(scores).items()]),
             "", f"{positive} of {len(scores)} samples have MIWV > 0. Spearman correlation of MIWV and IFD: "
                 f"{fmt(rho, '.3f')}.", ""]
    trunc = truncation_summary(scores)
    if trunc["no_demo"]:
        lines += [f"**{trunc['no_demo']} samples have no MIWV**: max length leaves no room for their neighbour's "
                  "example (status `no-demo`). They are never selected by MIWV; score with `max_length: auto`.", ""]
    if trunc["truncated"]:
        lines += [f"Truncation: {trunc['truncated']} of {trunc['rows']} samples were cut at max length "
                  f"({trunc['demo_trimmed']} had their demonstration trimmed), and {trunc['top_truncated']} of "
                  f"the top {trunc['top_k']} by MIWV; median MIWV {fmt(trunc['median_miwv_truncated'])} "
                  f"(cut) vs {fmt(trunc['median_miwv_not_truncated'])} (not cut).", ""]
    if rows and len(rows) == len(scores):
        lines += ["### Top-5 samples by MIWV", "",
                  *md_table(["rank", "MIWV", "IFD", "instruction", "demo (nearest neighbour) instruction",
                             "similarity"],
                            [[rank, fmt(ex["miwv"]), fmt(ex["ifd"]), _one_line(ex["instruction"]),
                              _one_line(ex["neighbor_instruction"]), fmt(ex["neighbor_similarity"], ".3f")]
                             for rank, ex in enumerate(ranked_examples(rows, scores, 5), start=1)]), ""]
    return lines


def _model_lines(run_dir: Path) -> list[str]:
    """04: one row per fine-tuned model, from its manifest; 05: the winning score over all test sets, per judge."""
    lines = []
    if names := [arm["name"] for arm in (_read(run_dir / "subsets" / "selections.json") or {}).get("arms", [])]:
        config = _read(run_dir / "models" / names[-1] / "train_config.json") or {}
        steps = f"{config['max_steps']} steps" if config.get("max_steps", -1) > 0 else f"{config.get('epochs')} epochs"
        manifests = {name: _read(run_dir / "models" / name / "manifest.json") or {} for name in names}
        lines += ["## Fine-tuning (04)", "",
                  f"{'LoRA' if config.get('method', 'lora') == 'lora' else 'Full fine-tuning'} on "
                  f"`{config.get('model')}`, {steps}, batch {config.get('batch_size')} × "
                  f"{config.get('gradient_accumulation_steps')} accumulation, max length {config.get('max_length')}; "
                  "the same settings for every model.", "",
                  *md_table(["model", "rows", "optimizer steps", "final train loss", "seconds", "tokens/s"],
                            [[name, m.get("rows", "–"), m.get("steps", "–"), fmt(m.get("train_loss")),
                              fmt(m.get("seconds"), ".0f"), fmt(m.get("tokens_per_second"), ".1f")]
                             for name, m in manifests.items()]), ""]
    if not (rows := [r for r in _read(run_dir / "evaluation" / "table.csv", []) if r["test_set"] == ALL]):
        return lines
    summary = _read(run_dir / "evaluation" / "summary.json") or {}
    return [*lines, "## Evaluation against the full-data model (05)", "",
            f"{summary.get('prompts_per_set', '?')} prompts per test set "
            f"({', '.join(summary.get('evaluated', []))}), each judged in both answer orders. Winning score = "
            "1 + (wins − losses) / N; 1 means as good as the full-data model. Per test set: `evaluation/table.md`.", "",
            *md_table(["judge", "model vs baseline", "n", "wins", "ties", "losses", "winning score", "95% CI"],
                      [[r["judge"], f"{r['model_a']} vs {r['model_b']}", *_outcome_cells(r)] for r in rows]), ""]


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.md`` atomically and return its path."""
    with atomic_open(path := Path(run_dir) / "report.md") as handle:
        handle.write(build_report(run_dir))
    return path


# ---------------------------------------------------------------------------------- the study's REPORT.md

ALPACA_52K = 52_002
STALE_SCORE_SETTINGS = ("model", "embedder", "template", "max_length", "dtype", "compute_ifd")
JUDGED_OUTPUTS = ("table.csv", "winning_scores.png", "win_tie_lose.png")
JUDGE_NOTES = {  # by the judge id's prefix
    "reference-nll": "the model that gives the GPT-4 reference answer the lower per-token NLL wins (a likelihood "
                     "judge: it scores the model, not the generated text)",
    "embedding-cosine": "the answer whose all-MiniLM-L6-v2 embedding is closer (cosine) to the reference wins",
    "rougeL-f1": "the answer with the higher ROUGE-L F1 against the reference wins",
}
VERDICTS = {"better": "MIWV better (interval above 0)", "worse": "MIWV worse (interval below 0)",
            "unclear": "no clear difference (interval contains 0)"}


def judge_ids(rows: Sequence[Mapping]) -> list[str]:
    """The judges as named in tables and records (e.g. ``embedding-cosine:all-MiniLM-L6-v2``), in order."""
    return list(dict.fromkeys(r["judge"] for r in rows))


def outcome_values(records: Sequence[Mapping]) -> dict[tuple[str, str], dict[tuple[str, str], int]]:
    """``{(judge, model_a): {(dataset, id): +1 | 0 | -1}}`` from judgement records."""
    table: dict[tuple[str, str], dict[tuple[str, str], int]] = {}
    for r in records:
        table.setdefault((r["judge"], r["model_a"]), {})[(r["dataset"], r["id"])] = OUTCOME_VALUE[r["outcome"]]
    return table


def paired_difference(a: Mapping[tuple[str, str], float], b: Mapping[tuple[str, str], float],
                      n_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Winning-score difference A − B on the prompts both were judged on, with a paired bootstrap interval: both
    models met the same full-pool model on the same prompts, so the per-prompt differences are what is resampled."""
    keys = sorted(set(a) & set(b))
    diff = [a[k] - b[k] for k in keys]
    # Rounded far below any real difference: an average of seeds' outcomes (thirds) sums with an error of 1e-17,
    # and an interval ending at that error's sign rather than at an exact 0 would read as better or worse.
    low, high, mean = (round(x, 12) + 0.0 for x in (*mean_interval(diff, n_resamples, level, seed),
                                                     float(np.mean(diff)) if diff else math.nan))
    return {"n": len(keys), "difference": mean, "ci_low": low, "ci_high": high}


def averaged(values: Sequence[Mapping[tuple[str, str], int]]) -> dict[tuple[str, str], float]:
    """Per prompt, the mean outcome over several models (the random seeds): their average winning score."""
    keys = set.intersection(*(set(v) for v in values)) if values else set()
    return {k: float(np.mean([v[k] for v in values])) for k in keys}


def comparisons(study: Study, values: Mapping[tuple[str, str], Mapping]) -> list[dict]:
    """MIWV's subset against each baseline's at the same ratio, per judge (paired over prompts); ``values`` as
    ``outcome_values`` gives them."""
    out = []
    for judge in dict.fromkeys(judge for judge, _ in values):
        for ratio in sorted(study.config.ratios):
            arms = [a for a in study.arms if a.ratio == ratio]
            miwv = next((a for a in arms if a.method == "miwv"), None)
            if miwv is None or (judge, miwv.name) not in values:
                continue
            mine, groups = values[(judge, miwv.name)], {}
            for a in arms:
                if a.method != "miwv" and (judge, a.name) in values:
                    groups.setdefault(a.method, []).append(values[(judge, a.name)])
            baselines = {method: averaged(g) if len(g) > 1 else g[0] for method, g in groups.items()}
            baselines["full"] = dict.fromkeys(mine, 0.0)  # the full model against itself: winning score 1
            for method, theirs in baselines.items():
                out.append({"judge": judge, "ratio": ratio, "miwv": miwv.name, "baseline": method,
                            **paired_difference(mine, theirs, study.config.n_bootstrap),
                            "miwv_score": 1 + float(np.mean(list(mine.values()))),
                            "baseline_score": 1 + float(np.mean([theirs[k] for k in mine if k in theirs]))})
    return out


def seed_noise(study: Study, values: Mapping[tuple[str, str], Mapping]) -> list[dict]:
    """Every two random seeds at each ratio, by the test of ``comparisons``: their rule is one, so whatever this test
    calls a clear difference between them is training noise, the yardstick for one trained model against another."""
    out = []
    for judge in dict.fromkeys(judge for judge, _ in values):
        for ratio in sorted(study.config.ratios):
            seeds = [a.name for a in study.arms if a.ratio == ratio and a.seed is not None
                     and (judge, a.name) in values]
            out += [{"judge": judge, "ratio": ratio, "a": x, "b": y,
                     **paired_difference(values[(judge, x)], values[(judge, y)], study.config.n_bootstrap)}
                    for i, x in enumerate(seeds) for y in seeds[i + 1:]]
    return out


def _side(c: Mapping) -> str:
    """Where a paired difference's interval lies: above 0 (MIWV better), below (worse) or across it."""
    return "better" if c["ci_low"] > 0 else "worse" if c["ci_high"] < 0 else "unclear"


def _reading(t: Mapping[str, int]) -> str:
    better, worse, total = t["better"], t["worse"], sum(t.values())
    if total in (better, worse):
        return f"{'better' if better == total else 'worse'} under every judge and ratio"
    if better and worse:
        return f"mixed: better in {better}, worse in {worse}, unclear in {t['unclear']} of {total} comparisons"
    if better or worse:
        return (f"{'better' if better else 'worse'} in {better or worse} of {total} comparisons and not clearly "
                "different in the rest")
    return "not clearly different under any judge or ratio"


def write_study_report(study: Study, root: Path) -> Path:
    """``REPORT.md`` + figures + ``results.json`` in ``study.results_dir``; returns the report's path. ``root`` is
    the repository: the report names its commit and the regeneration command relative to it."""
    out = study.results_dir
    out.mkdir(parents=True, exist_ok=True)
    scores, other_data = None, None
    if study.scores_path.exists():
        try:  # the configuration's data or limit edited since: those scores are not this study's
            scores = study.scores()
        except SelectionError as exc:
            other_data = str(exc)
    table, records = _read(study.evaluation_dir / "table.csv", []), _read(study.evaluation_dir / "judgements.jsonl", [])
    figures = _study_figures(study, out, scores, table)
    values = outcome_values(records)  # once, for MIWV's comparisons and the seeds' alike
    comps, noise = (comparisons(study, values), seed_noise(study, values)) if records else ([], [])
    manifest = _read(study.scores_dir / "manifest.json")
    if not scores or not manifest or manifest.get("status") != "complete":
        scores = None  # the figure shows a run's scores so far; the numbers wait for all of them
    judged = {r["model_a"] for r in records}
    plan = study.selections(scores) if scores is not None else {}
    trained = _trained_rows(study, plan) if scores is not None else {}
    reselected = {name: rows for name, rows in trained.items() if rows != plan[name]}  # the rows they were given
    missing = [f"score ({other_data})"] if other_data else [] if study.scores_path.exists() else ["score"]
    for stage, arms, done in (("train", study.arms, study.is_trained), ("generate", study.arms, study.is_answered),
                              ("judge", [a for a in study.arms if a.name != BASELINE], lambda a: a.name in judged)):
        if todo := [a for a in arms if not done(a)]:
            missing.append(f"{stage} ({len(todo)} of {len(arms)} models)")
    if stale := _stale_settings(study, manifest or {}):  # the configuration was edited after its files were made
        missing.append(f"the stages whose files were made with other settings ({'; '.join(stale)})")
    if reselected:
        missing.append(f"train ({', '.join(reselected)}: trained on another selection than today's, †)")
    parts = [*_intro(study, missing, root),
             "## 1. Scoring", "", _scoring_section(study, scores, manifest, figures), "",
             "## 2. Selected subsets", "", _selection_section(study, scores, plan, reselected), "",
             "## 3. Fine-tuning", "", _training_section(study, scores, trained, figures), "",
             "## 4. Every subset model against the full-pool model", "",
             _evaluation_tables(study, table) if table else "Needs the judgements (stages `generate`, `judge`).", "",
             _answer_lengths(study)]
    if "winning" in figures:
        parts += ["", f"![winning scores]({figures['winning']})", "", f"![win/tie/lose]({figures['bars']})"]
    with atomic_open(path := out / "REPORT.md") as handle:
        handle.write("\n".join([*parts, *_closing(study, comps, noise, root, reselected)]) + "\n")
    write_json(out / "results.json", {"status_missing": missing, "comparisons": comps, "seed_noise": noise,
                                      "table": table, "figures": figures})
    return path


def _trained_rows(study: Study, plan: Mapping[str, list[int]]) -> dict[str, list[int] | None]:
    """Each trained model's rows, told by its fingerprint of them: its selection today, else the one recorded when
    it was selected (the rule has changed since), else None (not known)."""
    from .train import rows_fingerprint

    recorded = (_read(study.run_dir / SELECTIONS_FILE) or {}).get("indices", {})
    out = {}
    for arm in filter(study.is_trained, study.arms):
        data = _read(study.model_dir(arm) / "manifest.json")["fingerprint_inputs"]["data"]
        out[arm.name] = next((rows for rows in (plan[arm.name], recorded.get(arm.name)) if rows is not None
                              and max(rows, default=-1) < len(study.pool)
                              and rows_fingerprint([study.pool.rows[i] for i in rows]) == data), None)
    return out


def _stale_settings(study: Study, manifest: Mapping) -> list[str]:
    """The configuration's settings that the run's scores (``manifest``) or models were made with otherwise."""
    scored = {**manifest.get("config", {}), "dtype": manifest.get("fingerprint_inputs", {}).get("dtype")}  # resolved
    score, train = asdict(study.config.score_config()), asdict(study.config.train_config())
    stale = [f"score.{k}: {scored[k]!r} in the files, {score[k]!r} here" for k in STALE_SCORE_SETTINGS
             if scored.get(k) is not None and score[k] != "auto" and scored[k] != score[k]]
    for arm in filter(study.is_trained, study.arms):
        trained = _read(study.model_dir(arm) / "manifest.json")["fingerprint_inputs"]["config"]
        stale += [f"train.{k}: {v!r} in the files, {train[k]!r} here" for k, v in trained.items()
                  if train.get(k) not in (None, "auto") and v != train[k]]
    return list(dict.fromkeys(stale))


def _study_figures(study: Study, out: Path, scores: list[dict] | None, table: list[dict]) -> dict[str, str]:
    """Draw the figures the run directory has data for and copy the judged table; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    from .plots import loss_curves, miwv_vs_ifd, outcome_figure, winning_scores
    from .train import read_loss_csv

    def save(fig, name: str) -> str:
        return save_png(fig, out / name, dpi=120, close=True).name

    figures: dict[str, str] = {}
    if scores:
        rho = spearman([s["miwv"] for s in scores], [s.get("ifd") for s in scores])
        figures["scores"] = save(miwv_vs_ifd(scores, rho), "miwv_vs_ifd.png")
    losses = {arm.name: [r for r in read_loss_csv(study.model_dir(arm) / "loss.csv") if r.get("loss") is not None]
              for arm in study.arms if (study.model_dir(arm) / "loss.csv").exists()}
    curves = {name: ([r["step"] for r in rows], [r["loss"] for r in rows]) for name, rows in losses.items() if rows}
    if curves:
        thick = [a.name for a in study.arms if a.method in ("miwv", "full")]
        figures["training"] = save(loss_curves(curves, thick), "training_loss.png")
    if table:
        arms = [a for a in study.arms if a.method != BASELINE]
        rows = {(r["judge"], r["model_a"]): r for r in table if r["test_set"] == ALL}
        panels = {f"judge: {judge}": ([a.name for a in arms], [rows.get((judge, a.name)) for a in arms])
                  for judge in judge_ids(table)}
        figures["winning"] = save(winning_scores(panels, [a.method for a in arms]), "winning_scores.png")
        figures["bars"] = save(outcome_figure(panels, across=True), "win_tie_lose.png")
        with atomic_open(out / "table.csv") as handle:
            handle.write((study.evaluation_dir / "table.csv").read_text(encoding="utf-8"))
    else:  # an earlier, judged report's files would otherwise sit beside a report that has no judgements
        for name in JUDGED_OUTPUTS:
            (out / name).unlink(missing_ok=True)
    return figures


def _intro(study: Study, missing: list[str], root: Path) -> list[str]:
    """The header, the paper's claim, and our setting beside the paper's."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    c = study.config
    score, train, gen = c.score_config(), c.train_config(), c.generate_config()
    sizes = ", ".join(f"{100 * r:g}% = {subset_size(len(study.pool), r)} rows" for r in sorted(c.ratios))
    tests = ", ".join(f"{name} ({'all' if n is None else f'{n} sampled, seed {c.test_seed}'})"
                      for name, n in c.test_sets.items())
    epochs = f"{train.max_steps} steps" if train.max_steps > 0 else f"{train.epochs:g} epoch(s)"
    return [
        "# Small-scale reproduction of MIWV", "",
        f"*Generated by `miwv_lib/experiments/report.py` from the run directory; commit {commit}.*", "",
        "**Status: complete.**" if not missing else f"**Status: incomplete — still to run: {', '.join(missing)}.** "
        "The sections below show what exists so far.", "",
        "## The paper's claim", "",
        "MIWV (*Importance-Aware Data Selection for Efficient LLM Instruction Tuning*, AAAI-26) ranks instruction "
        "data by how much a similar example, placed before a sample as a one-shot demonstration, *hurts* the model's "
        "loss on that sample's response (MIWV = one-shot loss − zero-shot loss). The paper reports that fine-tuning "
        "LLaMA-2-7B on the top 1 % of Alpaca-52K by MIWV beats fine-tuning on all 52K rows under a GPT-4 pairwise "
        "judge on five test sets (winning score > 1), and beats IFD (Cherry) selection at the same size.", "",
        "## Our setting, and how it differs", "",
        c.description.strip() if c.description else "", "",
        "| | paper | here |", "|---|---|---|",
        "| model | LLaMA-2-7B (and others), full fine-tuning | "
        f"`{score.model}` (base model), scored in {score.dtype} |",
        f"| pool | Alpaca-52K | `{c.data}`: {len(study.pool):,} rows |",
        f"| ratios | 1 % (5/10/15 % in ablations) | {sizes} |",
        f"| baselines | IFD (Cherry), random, full data | {', '.join(c.methods)}"
        f"{f' (random: seeds {c.random_seeds})' if 'random' in c.methods else ''}, full pool |",
        f"| fine-tuning | full fine-tuning, 3 epochs | {'LoRA' if train.method == 'lora' else 'full fine-tuning'} "
        f"(r={train.lora_r}, alpha={train.lora_alpha}, all linear layers), {epochs}, lr "
        f"{train.resolved_learning_rate():g}, effective batch {train.batch_size * train.gradient_accumulation_steps}, "
        f"max length {train.max_length}, {train.sampling.replace('_', ' ')} batches; identical for every model |",
        f"| test sets | Vicuna, Koala, WizardLM, Self-Instruct, LIMA | {tests} |",
        f"| generation | – | greedy, at most {gen.max_new_tokens} new tokens |",
        "| judge | GPT-4, both answer orders | offline reference judges, both answer orders: "
        f"{', '.join(f'`{j}`' for j in c.judges)} |", "",
        "Winning score = 1 + (wins − losses) / N over prompts; each prompt is judged twice with the answers "
        "swapped, a prompt is a win if the model wins both orders or wins one and ties the other, a loss "
        "symmetrically, otherwise a tie (the paper's protocol). 95 % intervals: bootstrap over prompts.", ""]


def _scoring_section(study: Study, scores: list[dict] | None, manifest: Mapping | None, figures: dict[str, str]) -> str:
    if scores is None:
        return "Not run yet (stage `score`)."
    timings = [t for t in _read(study.run_dir / "timings.jsonl", []) if t["stage"] == "score"]
    rows_timed = sum(t.get("rows") or 0 for t in timings)
    seconds = sum(t.get("seconds_scoring") or 0 for t in timings)
    miwv = [s["miwv"] for s in scores]
    stats = summary_stats(miwv)
    positive = sum(1 for v in miwv if v is not None and v > 0)
    env, inputs = manifest.get("environment", {}), manifest["fingerprint_inputs"]
    lines = [f"- {len(scores):,} rows scored with `{inputs['model']}` in {inputs['dtype']} (max length "
             f"{inputs['max_length']}), embedder `{inputs['embedder']}`."]
    if rows_timed and seconds:
        lines.append(f"- Time: {seconds / 3600:.2f} h of scoring for {rows_timed:,} rows, "
                     f"**{seconds / rows_timed:.2f} s/sample** ({rows_timed / seconds:.2f} samples/s) on "
                     f"{env.get('device') or env.get('platform') or 'this machine'}"
                     f"{', over several resumed runs' if len(timings) > 1 else ''} (wall time: it counts "
                     "whatever else the machine was doing, so it bounds the cost from above).")
    lines += [
        f"- MIWV: median {stats['median']:.3f}, range {stats['min']:.3f} to {stats['max']:.3f}; "
        f"{positive:,} rows ({positive / len(scores):.1%}) have MIWV > 0 "
        "(the neighbour's example made the loss worse).",
        f"- Spearman correlation of MIWV with IFD: {spearman(miwv, [s.get('ifd') for s in scores]):.3f}.",
        f"- Rows whose one-shot sequence was truncated: {sum(s['truncated'] for s in scores)} "
        f"({demo_trimmed(scores)} with a trimmed demonstration); rows without MIWV: "
        f"{sum(s['miwv'] is None for s in scores)}."]
    if "scores" in figures:
        lines += ["", f"![MIWV and IFD]({figures['scores']})"]
    return "\n".join(lines)


def _mean(scores: list[dict], rows: list[int], key: str) -> str:
    return fmt(summary_stats(scores[i][key] for i in rows)["mean"], ".3f")


def _selection_section(study: Study, scores: list[dict] | None, plan: Mapping[str, list[int]],
                       other: Mapping[str, list[int] | None]) -> str:
    """``other``: the models trained on another selection than today's, with their rows (None: not known)."""
    if scores is None:
        return "Needs the scores."
    sources = row_source_files(study.pool.files, len(study.pool)) if study.pool.files else None
    rows = []
    for arm in study.arms:
        idx = plan[arm.name]
        chosen = [scores[i] for i in idx]
        counts = sorted(Counter(sources[i] for i in idx).items()) if sources else []
        means = (_mean(scores, idx, key) for key in ("miwv", "ifd"))
        rows.append([arm.name + (" †" if arm.name in other else ""), f"{len(idx):,}", demo_trimmed(chosen),
                     f"{np.median([s['response_tokens'] for s in chosen]):.0f}", *means,
                     ", ".join(f"{k} {v / len(idx):.0%}" for k, v in counts)])
    lines = md_table(["subset", "rows", "rows with a trimmed demo", "median response tokens", "mean MIWV", "mean IFD",
                      "share per source file"], rows, "lrrrrrl")
    if other:
        lines += ["", "† Its model (sections 3–5) was trained on another selection, by an earlier rule: until "
                  "2026-12-05 `ifd` ranked every row, while Cherry LLM, whose baseline it is, keeps only IFD ≤ 1 "
                  "(above 1 the instruction made the response harder to predict). This table shows today's "
                  "selection; continuing the study trains the model again. The models' own rows: " + "; ".join(
                      f"{name} mean MIWV {_mean(scores, old, 'miwv')}, mean IFD {_mean(scores, old, 'ifd')}"
                      if old else f"{name} not known" for name, old in other.items()) + "."]
    lines += ["", "Overlap (Jaccard) between the subsets of the same size:", ""]
    for ratio in sorted(study.config.ratios):
        arms = [a.name for a in study.arms if a.ratio == ratio]
        lines += [*md_table([ratio_label(ratio), *arms], [[a, *(f"{jaccard(plan[a], plan[b]):.2f}" for b in arms)]
                                                          for a in arms], "l" + "r" * len(arms)), ""]
    return "\n".join(lines)


def _rows_cut(manifest: Mapping, rows: list[int] | None, scores: list[dict] | None, max_length: int) -> str:
    """Rows longer than the training max length. A model trained before ``rows_cut`` was recorded (when such a row
    lost its prompt's start, not its response's end) has them counted from the scores' token counts of its ``rows``,
    starred; with none, the earlier rule trained it as today's does, so its 0 carries no star."""
    if "rows_cut" in manifest:  # a row whose prompt was trimmed lost its response's end too: count it once
        return str(manifest["rows_cut"]["response"])
    if scores is None or rows is None:
        return "?"
    cut = sum(2 + scores[i]["prompt_tokens"] + scores[i]["response_tokens"] > max_length for i in rows)
    return f"{cut}*" if cut else "0"


def _training_section(study: Study, scores: list[dict] | None, trained: Mapping[str, list[int] | None],
                      figures: dict[str, str]) -> str:
    manifests = {arm.name: _read(study.model_dir(arm) / "manifest.json") for arm in study.arms}
    done = {name: m for name, m in manifests.items() if m and m.get("status") == "complete"}
    max_length = study.config.train_config().max_length
    rows = [[name, f"{m['rows']:,}", _rows_cut(m, trained.get(name), scores, max_length), m["steps"],
             fmt(m.get("train_loss"), ".3f"), f"{fmt((m.get('seconds') or math.nan) / 60, '.1f')} min",
             fmt(m.get("tokens_per_second"), ".0f")] for name, m in done.items()]
    lines = md_table(["model", "rows", "rows cut at max length", "optimizer steps", "final train loss", "time",
                      "tokens/s"], rows, "lrrrrrr")
    lines += ["", "Time and tokens/s are wall-clock: they count whatever else the machine was doing meanwhile."]
    lines += [f"{name} was trained in more than one sitting (the last resumed at step {m['resumed_from_step']}): its "
              "time adds up the sittings up to their checkpoints, its tokens/s is the last sitting's."
              for name, m in done.items() if m.get("resumed_from_step")]
    if any(row[2].endswith("*") for row in rows):
        lines += ["", f"\\* Trained before 2026-12-05: a row longer than the training max length "
                  f"({max_length} tokens) lost the start of its prompt, its instruction, "
                  "instead of the end of its response, and a row whose response alone filled it was trained with no "
                  "prompt at all. Today's `train` keeps the prompt (Alpaca's recipe) and trains such a model again."]
    if len(done) < len(manifests):
        lines += ["", f"Not trained yet: {', '.join(name for name in manifests if name not in done)}."]
    if "training" in figures:
        lines += ["", f"![training loss]({figures['training']})"]
    return "\n".join(lines)


def _evaluation_tables(study: Study, table: list[dict]) -> str:
    """Per judge: every subset model against the full-pool model over all test sets (and per set)."""
    sets = study.test_set_labels
    lines = []
    for judge in judge_ids(table):
        mine = {(r["model_a"], r["test_set"]): r for r in table if r["judge"] == judge}
        rows = [[arm.name, *(fmt(float(mine[arm.name, s]["winning_score"]), ".3f") if (arm.name, s) in mine else "–"
                             for s in sets),
                 f"{a['wins']} / {a['ties']} / {a['losses']}", f"**{float(a['winning_score']):.3f}** {_interval(a)}"]
                for arm in study.arms if (a := mine.get((arm.name, ALL)))]
        lines += [f"**Judge `{judge}`**: {JUDGE_NOTES.get(judge.split(':')[0], '')}.", "",
                  *md_table(["model vs full", *(f"{s} WS" for s in sets), "All: win / tie / lose",
                             "All: winning score [95% CI]"], rows, "l" + "r" * len(sets) + "ll"), ""]
    return "\n".join(lines)


def _answer_lengths(study: Study) -> str:
    """Median answer length per model and test set, beside the reference's: the text judges reward
    answers that resemble the reference, so a subset that teaches short or long answers shows here."""
    sets = study.test_set_labels
    medians: dict[str, dict[str, float]] = {}
    references: dict[str, float] = {}
    for arm in filter(study.is_answered, study.arms):
        medians[arm.name] = {}
        for d in sets:
            rows = read_jsonl(study.generations_dir / arm.name / f"{d}.jsonl")
            medians[arm.name][d] = float(np.median([len(r["output"].split()) for r in rows]))
            if d not in references and all(r.get("reference") for r in rows):
                references[d] = float(np.median([len(r["reference"].split()) for r in rows]))
    if not medians:
        return ""
    rows = [[name, *(f"{per_set[d]:.0f}" for d in sets)] for name, per_set in medians.items()]
    if references:
        rows.append(["*reference (GPT-4)*", *(fmt(references.get(d), ".0f") for d in sets)])
    return "\n".join(["Median answer length in words (greedy, at most "
                      f"{study.config.generate_config().max_new_tokens} new tokens):", "",
                      *md_table(["model", *sets], rows, "l" + "r" * len(sets))])


def _conclusions(study: Study, comps: list[dict], noise: list[dict], reselected: Collection[str]) -> str:
    if not comps:
        return "Needs the judgements."
    rows = [[c["judge"], ratio_label(c["ratio"]), c["baseline"], f"{c['miwv_score']:.3f}", f"{c['baseline_score']:.3f}",
             f"{c['difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]", VERDICTS[_side(c)]] for c in comps]
    lines = ["Paired differences of winning score, MIWV subset minus the baseline at the same size (both compared "
             "with the full-pool model on the same prompts; 'full' means MIWV's own score minus 1), with paired "
             "bootstrap 95 % intervals over prompts. They cover the sampling of prompts, not the randomness of "
             "training: each selection is one trained model (random: the average of its seeds' models).", "",
             *md_table(["judge", "ratio", "baseline", "MIWV WS", "baseline WS", "difference [95% CI]", "reading"], rows,
                       "lllrrll"), "", "Over all judges and ratios:", ""]
    tally: dict[str, dict[str, int]] = {}
    for c in comps:
        tally.setdefault(c["baseline"], dict.fromkeys(VERDICTS, 0))[_side(c)] += 1
    for baseline, t in tally.items():
        lines.append(f"- against **{baseline}**: MIWV clearly better in {t['better']} of {sum(t.values())} "
                     f"comparisons, clearly worse in {t['worse']}, no clear difference in {t['unclear']}.")
    noisy = sum(_side(c) != "unclear" for c in noise)
    if noise:
        lines.append(f"- between two **random seeds** of one rule, by the same test (training noise alone): a clear "
                     f"difference in {noisy} of {len(noise)} comparisons.")
    # The bottom line, in plain language: every word of it follows from the numbers above.
    bottom = []
    if full := tally.get("full"):
        reproduced = ("**reproduced here**" if full["better"] == sum(full.values()) else
                      "**not reproduced here**" if full["better"] == 0 else "**only partly reproduced here**")
        bottom.append(f"**Bottom line.** The paper's headline claim, that a small MIWV subset beats fine-tuning on "
                      f"the whole pool, is {reproduced}: the MIWV model is {_reading(full)} "
                      "against the full-pool model.")
    if others := [f"{_reading(t)} against **{b}**" for b, t in tally.items() if b != "full"]:
        bottom.append("Against the other selections of the same size, MIWV is " + "; ".join(others) + ".")
    if noisy:
        bottom.append(f"Yet models trained on two random selections by one rule differ clearly in {noisy} of "
                      f"{len(noise)} comparisons, so a clear difference between two single models may be training "
                      "noise rather than their selections.")
    if reselected:
        bottom.append(f"The comparisons with {', '.join(reselected)} use models trained on an earlier selection "
                      "(†, section 2), not on today's.")
    steps = {arm.name: _read(study.model_dir(arm) / "manifest.json")["steps"]
             for arm in filter(study.is_trained, study.arms)}
    subset_steps = sorted({v for name, v in steps.items() if name != BASELINE})
    if BASELINE in steps and subset_steps:
        bottom.append(f"Every model trains for the same number of epochs, so a subset model takes "
                      f"{' or '.join(str(v) for v in subset_steps)} optimizer steps against the full-pool model's "
                      f"{steps[BASELINE]}: against the full pool, a subset is compared at a fraction of the compute, "
                      "as in the paper's setting.")
    return "\n".join([*lines, "", " ".join(bottom)])


def _closing(study: Study, comps: list[dict], noise: list[dict], root: Path, reselected: Collection[str]) -> list[str]:
    c = study.config
    stages = ", ".join(f"`{s}`" for s in ("score", "select", "train", "generate", "judge", "report"))
    try:  # the config file as a reader of the repository types it; a mapping, or a file outside it, as it is
        source = Path(c.source).resolve().relative_to(root).as_posix()
    except (TypeError, ValueError):
        source = str(c.source)
    parts = ["", "## 5. What we can and cannot conclude", "", _conclusions(study, comps, noise, reselected), "",
             "What this setting cannot show: the paper's judge is GPT-4 reading both answers; ours are reference-based "
             "proxies (likelihood of, and similarity to, the GPT-4 reference answer), which reward answers that look "
             f"like the reference, not answers a person prefers. The model is far smaller than the paper's 7B, "
             f"the pool is {len(study.pool):,} rows ({len(study.pool) / ALPACA_52K:.1%} of Alpaca-52K), and "
             "fine-tuning is on a CPU budget. A negative or null result here does not refute the paper at its "
             "scale; a positive one does not confirm it.",
             "", "## Reproduce", "", "```bash", f"python -m miwv_lib study --config {source}", "```", "",
             "Each stage skips what is already done, so the same command continues an interrupted study; "
             f"`--stages` runs a subset of {stages}. "
             f"Intermediate files live in `{c.run_dir}` (not committed); `record/` beside this report keeps the "
             "small ones (scores, each model's manifest and loss curve, its answers as ids and text, no weights, no "
             "dataset text), so a fresh clone continues the study where the last commit left it."]
    per_stage: dict[str, float] = {}
    for t in _read(study.run_dir / "timings.jsonl", []):
        per_stage[t["stage"]] = per_stage.get(t["stage"], 0.0) + t["seconds"]
    if per_stage:
        parts += ["", "Compute spent so far: " + ", ".join(f"{k} {v / 3600:.2f} h" for k, v in per_stage.items()) + "."]
    return parts
