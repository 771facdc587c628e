"""Summaries of a run directory, for the notebooks and for ``report.md``.

Everything here reads plain data (rows, scores, files in the run directory), so the report can be
rebuilt at any time from ``run_dir`` alone: ``python -c "from miwv_lib.experiments.report import write_report;
write_report('runs/demo_nb')"``.

Run directory layout (written by the notebooks):

* ``pool.jsonl``, ``pool_info.json`` (01): the normalised pool and where it came from;
* ``scores.jsonl``, ``manifest.json``, ``neighbors.json`` (02, by :func:`miwv_lib.score_pool`);
* ``subsets/*.json``, ``subsets/summary.json`` (03);
* ``figures/*.png`` (all), ``notebooks/*.ipynb`` and ``pipeline.json`` (the pipeline).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.prompts import encode_text
from ..runtime.io import atomic_open, read_jsonl

SUMMARY_FIELDS = ("zero_shot_loss", "one_shot_loss", "miwv", "ifd")

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
    """Which file each row came from (file names only), for a pool read from ``files`` in order.

    ``load_instructions`` concatenates files and cuts at ``limit``, so row r belongs to the first
    file whose cumulative record count exceeds r. One file (or a hub cache): every row is that file.
    """
    names = [Path(f).name for f in files]
    if len(names) <= 1:
        return [names[0] if names else "unknown"] * n_rows
    out: list[str] = []
    for path, name in zip(files, names):
        count = _record_count(Path(path))
        out.extend([name] * min(count, n_rows - len(out)))
        if len(out) >= n_rows:
            break
    return out + ["unknown"] * (n_rows - len(out))


def sample_rows(n_rows: int, sample: int | None, seed: int = 0) -> list[int]:
    """Row numbers of a seeded random sample of ``sample`` rows, in pool order (all rows if None or ≥ n_rows)."""
    import random

    if sample is None or sample >= n_rows:
        return list(range(n_rows))
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 2:
        raise ValueError(f"sample must be an integer ≥ 2 or None; got {sample!r}")
    return sorted(random.Random(seed).sample(range(n_rows), sample))


def _record_count(path: Path) -> int:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return len(json.loads(path.read_text(encoding="utf-8")))
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            return sum(1 for line in handle if line.strip())
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    raise ValueError(f"cannot count the records of {path}")


def token_lengths(rows: Sequence[Mapping[str, str]], tokenizer) -> dict[str, np.ndarray]:
    """Tokens (no special tokens) of the instruction, the input and the response of every row."""
    out = {}
    for field, key in (("instruction", "instruction"), ("input", "input"), ("response", "output")):
        texts = [row.get(key) or "" for row in rows]
        ids = encode_text(tokenizer, texts)
        out[field] = np.array([len(x) for x in ids], dtype=np.int64)
    return out


def summary_stats(values: Iterable[float | None]) -> dict[str, float]:
    """n, mean, std, min, quartiles and max of the finite values (NaN statistics when there are none)."""
    arr = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"n": 0, **{k: math.nan for k in ("mean", "std", "min", "p25", "median", "p75", "max")}}
    return {"n": int(arr.size), "mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
            "min": float(arr.min()), "p25": float(np.percentile(arr, 25)), "median": float(np.median(arr)),
            "p75": float(np.percentile(arr, 75)), "max": float(arr.max())}


def score_summary(scores: Sequence[Mapping], fields: Sequence[str] = SUMMARY_FIELDS) -> dict[str, dict]:
    return {f: summary_stats(s.get(f) for s in scores) for f in fields}


def spearman(x: Sequence[float | None], y: Sequence[float | None]) -> float:
    """Rank correlation over the pairs where both values are finite (average ranks for ties)."""
    import pandas as pd

    pairs = [(a, b) for a, b in zip(x, y)
             if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return math.nan
    frame = pd.DataFrame(pairs, columns=["x", "y"])
    return float(frame["x"].corr(frame["y"], method="spearman"))


def ranked_examples(rows: Sequence[Mapping], scores: Sequence[Mapping], n: int = 5, *, field: str = "miwv",
                    highest: bool = True) -> list[dict]:
    """The ``n`` rows with the highest (or lowest) ``field``, each with its neighbour (the demo)."""
    usable = [s for s in scores if s.get(field) is not None and math.isfinite(s[field])]
    sign = -1.0 if highest else 1.0
    ranked = sorted(usable, key=lambda s: (sign * s[field], s["id"], s["index"]))[:n]
    out = []
    for s in ranked:
        i, k = s["index"], s["neighbor_index"]
        out.append({"index": i, "id": s["id"], field: s[field], "miwv": s.get("miwv"), "ifd": s.get("ifd"),
                    "zero_shot_loss": s.get("zero_shot_loss"), "one_shot_loss": s.get("one_shot_loss"),
                    "neighbor_index": k, "neighbor_similarity": s.get("neighbor_similarity"),
                    "instruction": rows[i]["instruction"], "input": rows[i].get("input", ""),
                    "output": rows[i]["output"], "neighbor_instruction": rows[k]["instruction"],
                    "neighbor_input": rows[k].get("input", ""), "neighbor_output": rows[k]["output"]})
    return out


def shortest_example(encoded: Sequence, neighbor_index: Sequence[int]) -> int:
    """The row whose one-shot sequence (demo + sample) is shortest: a readable worked example."""
    def size(i: int) -> int:
        k = int(neighbor_index[i])
        return len(encoded[i].prompt) + len(encoded[i].response) + len(encoded[k].prompt) + len(encoded[k].response)

    return min(range(len(encoded)), key=lambda i: (size(i), i))


def truncation_summary(scores: Sequence[Mapping], top_fraction: float = 0.15) -> dict[str, Any]:
    """How often ``max_length`` cut something, overall and among the top ``top_fraction`` by MIWV.

    A trimmed demonstration helps less, which pushes MIWV up: if trimmed rows crowd the top of the
    ranking, the selection partly reflects truncation, and ``max_length`` should be raised.
    """
    usable = [s for s in scores if s.get("miwv") is not None and math.isfinite(s["miwv"])]
    k = max(1, math.floor(top_fraction * len(usable) + 1e-9)) if usable else 0
    top = sorted(usable, key=lambda s: (-s["miwv"], s["id"], s["index"]))[:k]
    trimmed = [s for s in usable if s.get("truncated")]
    full = [s for s in usable if not s.get("truncated")]
    return {
        "no_demo": sum(1 for s in scores if s.get("status") == "no-demo"),
        "rows": len(usable),
        "truncated": len(trimmed),
        "demo_trimmed": sum(1 for s in usable if (s.get("truncation") or {}).get("demo")),
        "top_k": k,
        "top_truncated": sum(1 for s in top if s.get("truncated")),
        "median_miwv_truncated": float(np.median([s["miwv"] for s in trimmed])) if trimmed else math.nan,
        "median_miwv_not_truncated": float(np.median([s["miwv"] for s in full])) if full else math.nan,
    }


def jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def jaccard_matrix(selections: Mapping[str, Iterable[int]]) -> tuple[list[str], np.ndarray]:
    labels = list(selections)
    sets = [set(selections[k]) for k in labels]
    matrix = np.array([[jaccard(a, b) for b in sets] for a in sets], dtype=np.float64)
    return labels, matrix


def top_words(texts: Iterable[str], n: int = 10, stopwords: frozenset[str] = _STOPWORDS) -> list[tuple[str, int]]:
    """Most frequent words (lower case, letters only, 3+ characters, common words removed)."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w in re.findall(r"[a-z][a-z']{2,}", text.lower()) if w not in stopwords)
    return counts.most_common(n)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def fmt(value: Any, spec: str = ".4f") -> str:
    """A number for a table; a missing or non-finite one is a dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, spec)


def _one_line(text: str, limit: int = 110) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def build_report(run_dir: str | Path) -> str:
    """The Markdown text of ``report.md``, from the files in ``run_dir`` only."""
    run_dir = Path(run_dir)
    pipeline = _read_json(run_dir / "pipeline.json") or {}
    scores = read_jsonl(run_dir / "scores.jsonl") if (run_dir / "scores.jsonl").is_file() else []
    rows = read_jsonl(run_dir / "pool.jsonl") if (run_dir / "pool.jsonl").is_file() else []
    lines = ["# MIWV run report", "",
             f"Run directory: `{run_dir.name}`. Built from the files in it by `miwv_lib.experiments.report.write_report`.", ""]
    if pipeline.get("description"):
        lines += [str(pipeline["description"]).strip(), ""]
    lines += _setup_lines(run_dir, pipeline, rows)
    lines += _score_lines(scores, rows) if scores else []
    lines += _subset_lines(_read_json(run_dir / "subsets" / "summary.json"))
    lines += _training_lines(run_dir)
    lines += _evaluation_lines(run_dir)
    lines += _figure_lines(run_dir)
    executed = sorted(p.name for p in (run_dir / "notebooks").glob("[!.]*.ipynb"))
    if executed:
        lines += ["## Executed notebooks", "", *(f"- [{n}](notebooks/{n})" for n in executed), ""]
    return "\n".join(lines).rstrip() + "\n"


def _setup_lines(run_dir: Path, pipeline: Mapping, rows: list[dict]) -> list[str]:
    pool_info = _read_json(run_dir / "pool_info.json") or {}
    manifest = _read_json(run_dir / "manifest.json") or {}
    lines = ["## Setup", "", "| item | value |", "|---|---|"]
    if pool_info:
        how = [f"limit {pool_info['limit']}"] if pool_info.get("limit") else []
        if pool_info.get("sample"):
            how.append(f"random sample of {pool_info['sample']}, seed {pool_info.get('sample_seed')}")
        lines.append(f"| data | `{pool_info.get('data')}` ({pool_info.get('rows')} rows"
                     f"{': ' + ', '.join(how) if how else ''}) |")
        files = ", ".join(f"`{f}`" for f in pool_info.get("files", []))
        if files:
            lines.append(f"| files | {files} |")
        lines.append(f"| exact duplicate (instruction, input) groups | {len(pool_info.get('duplicate_groups', []))} |")
    elif rows:
        lines.append(f"| rows | {len(rows)} |")
    config = manifest.get("config", {})
    if config:
        lines += [
            f"| model | `{config.get('model')}` ({manifest.get('fingerprint_inputs', {}).get('dtype')}) |",
            f"| embedder | `{config.get('embedder')}` |",
            f"| template, max length | {config.get('template')}, {manifest.get('max_length', config.get('max_length'))}"
            f" tokens |",
            f"| scoring time | {fmt(manifest.get('seconds_scoring'), '.1f')} s "
            f"({fmt(manifest.get('seconds_per_sample'), '.3f')} s/sample), neighbours "
            f"{fmt(manifest.get('seconds_neighbors'), '.1f')} s |",
            f"| truncated rows | {manifest.get('truncated_rows')} ({manifest.get('demo_trimmed_rows', '?')} "
            f"with a trimmed demonstration; {manifest.get('no_miwv_rows', '?')} rows without MIWV) |"]
    seconds = pipeline.get("seconds") or {}
    if seconds:
        lines.append("| notebook wall time | " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
                     + f" (total {sum(seconds.values()):.0f} s) |")
    if pipeline.get("status"):
        lines.append(f"| pipeline status | {pipeline['status']} |")
    return [*lines, ""]


def _score_lines(scores: list[dict], rows: list[dict]) -> list[str]:
    lines = ["## MIWV and IFD", "",
             f"N = {len(scores)} scored samples. MIWV = one-shot loss − zero-shot loss "
             "(high: the most similar other example made the model worse on this one).", "",
             "| quantity | n | mean | std | min | 25% | median | 75% | max |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, st in score_summary(scores).items():
        lines.append(f"| {name} | {st['n']} | " + " | ".join(
            fmt(st[k]) for k in ("mean", "std", "min", "p25", "median", "p75", "max")) + " |")
    positive = sum(1 for s in scores if s.get("miwv") is not None and s["miwv"] > 0)
    rho = spearman([s.get("miwv") for s in scores], [s.get("ifd") for s in scores])
    lines += ["", f"{positive} of {len(scores)} samples have MIWV > 0. "
                  f"Spearman correlation of MIWV and IFD: {fmt(rho, '.3f')}.", ""]
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
                  "| rank | MIWV | IFD | instruction | demo (nearest neighbour) instruction | similarity |",
                  "|---|---|---|---|---|---|"]
        for rank, ex in enumerate(ranked_examples(rows, scores, 5), start=1):
            lines.append(f"| {rank} | {fmt(ex['miwv'])} | {fmt(ex['ifd'])} | {_one_line(ex['instruction'])} | "
                         f"{_one_line(ex['neighbor_instruction'])} | {fmt(ex['neighbor_similarity'], '.3f')} |")
        lines.append("")
    return lines


def _subset_lines(summary: Mapping | None) -> list[str]:
    if not summary:
        return []
    lines = ["## Subsets", "", f"Pool of {summary.get('pool_rows')} rows; each subset keeps floor(r·N) rows.", "",
             "| method | ratio | rows | rows with a trimmed demo | file |", "|---|---|---|---|---|"]
    for entry in summary.get("subsets", []):
        lines.append(f"| {entry['method']} | {entry['ratio']:g} | {entry['rows']} | "
                     f"{entry.get('demo_trimmed', '?')} | `subsets/{entry['file']}` |")
    for entry in summary.get("skipped", []):
        lines.append(f"| {entry['method']} | {entry['ratio']:g} | skipped: {entry['reason']} | | |")
    return [*lines, ""]


def _figure_lines(run_dir: Path) -> list[str]:
    figures = sorted(p.name for p in (run_dir / "figures").glob("[!.]*.png"))
    if not figures:
        return []
    lines = ["## Figures", ""]
    for name, caption in KEY_FIGURES.items():
        if name in figures:
            lines += [f"**{caption}**", "", f"![{caption}](figures/{name})", ""]
    others = [n for n in figures if n not in KEY_FIGURES]
    if others:
        lines += ["Other figures: " + ", ".join(f"[{n}](figures/{n})" for n in others), ""]
    return lines


def _training_lines(run_dir: Path) -> list[str]:
    """04: one row per fine-tuned model, from each model's manifest."""
    selections = _read_json(run_dir / "subsets" / "selections.json")
    names = [arm["name"] for arm in selections["arms"]] if selections else []
    if not names:
        return []
    config = _read_json(run_dir / "models" / names[-1] / "train_config.json") or {}
    steps = f"{config['max_steps']} steps" if config.get("max_steps", -1) > 0 else f"{config.get('epochs')} epochs"
    lines = ["## Fine-tuning (04)", "",
             f"{'LoRA' if config.get('method', 'lora') == 'lora' else 'Full fine-tuning'} on `{config.get('model')}`, {steps}, batch {config.get('batch_size')} × "
             f"{config.get('gradient_accumulation_steps')} accumulation, max length {config.get('max_length')}; "
             "the same settings for every model.", "",
             "| model | rows | optimizer steps | final train loss | seconds | tokens/s |", "|---|---|---|---|---|---|"]
    for name in names:
        m = _read_json(run_dir / "models" / name / "manifest.json") or {}
        lines.append(f"| {name} | {m.get('rows', '–')} | {m.get('steps', '–')} | {fmt(m.get('train_loss'))} | "
                     f"{fmt(m.get('seconds'), '.0f')} | {fmt(m.get('tokens_per_second'), '.1f')} |")
    return [*lines, ""]


def _evaluation_lines(run_dir: Path) -> list[str]:
    """05: the winning-score table over all test sets, per judge, from ``evaluation/table.csv``."""
    import csv

    summary = _read_json(run_dir / "evaluation" / "summary.json") or {}
    table_path = run_dir / "evaluation" / "table.csv"
    if not table_path.is_file():
        return []
    with open(table_path, encoding="utf-8", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["test_set"] == "All"]
    if not rows:
        return []
    lines = ["## Evaluation against the full-data model (05)", "",
             f"{summary.get('prompts_per_set', '?')} prompts per test set "
             f"({', '.join(summary.get('evaluated', []))}), each judged in both answer orders. Winning score = "
             "1 + (wins − losses) / N; 1 means as good as the full-data model. Per test set: `evaluation/table.md`.", "",
             "| judge | model vs baseline | n | wins | ties | losses | winning score | 95% CI |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['judge']} | {r['model_a']} vs {r['model_b']} | {r['n']} | {r['wins']} | {r['ties']} | "
                     f"{r['losses']} | {float(r['winning_score']):.3f} | "
                     f"[{float(r['ci_low']):.3f}, {float(r['ci_high']):.3f}] |")
    return [*lines, ""]


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.md`` atomically and return its path."""
    path = Path(run_dir) / "report.md"
    text = build_report(run_dir)
    with atomic_open(path) as handle:
        handle.write(text)
    return path
