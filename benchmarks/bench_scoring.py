"""MIWV scoring speed and fidelity, measured side by side in one run.

Modes, all on the same model, rows and machine:

* ``naive``  — what public implementations do: one sample per forward pass, full logits, float32;
* ``per-row`` — our engine in float32 with ``--no-share-prefix``: every one-shot pass on its own;
* ``exact``  — our engine in float32 (the path ``score_pool`` takes, IFD off): the rows that share a
  neighbour share one pass, its example once and each row's own tokens after it;
* ``exact-compiled`` — exact with ``--torch-compile`` (the body compiled): the float32 path of a CPU
  without fast bf16 matmuls, where ``--dtype auto`` scores in float32;
* ``fast``   — our engine in bfloat16 (float32 log-sum-exp);
* ``compiled`` — fast with ``--torch-compile`` (the body compiled).

Each engine mode first scores two rows outside the timing (``warmup_s``: one-off costs such as
compiling, which do not grow with the rows).

tokens/s counts the tokens of the naive passes (the work to be done), so it is comparable across modes.

Each mode runs in its own subprocess so its peak memory (RSS) is its own. Fidelity is measured
against ``naive`` (or ``exact`` when naive is not run): max |Δloss|, Spearman of MIWV, overlap of the top-10%
selections; and, with naive, against a float64 cross-entropy of naive's logits on the first 32 rows
(``max_abs_dloss_f64``, computed after the timing): naive's float32 cross-entropy is itself off by up to 3e-5
on a 262k vocabulary.

The roofline is measured in the same run: the GEMM rates of this model's body shapes
(4096 × hidden × intermediate and back) and head shapes (256 and 1,024 × hidden × vocabulary, the faster)
in bf16 and float32, and the least work that gives exact losses: each row's zero-shot sequence once, its
one-shot suffix on top of the neighbour's cached keys and values, the head only at response
positions. Each mode's "of roofline" is that work's time at its own dtype's rates over its time.
``--profile N`` adds a torch.profiler breakdown of ``--profile-mode`` (an engine mode) on N rows.

    python benchmarks/bench_scoring.py                    # gemma-3-270m, 200 rows of the local Alpaca pool
    python benchmarks/bench_scoring.py --rows 40 --modes naive,fast
    python benchmarks/bench_scoring.py --rows 40 --modes fast --profile 40
    python benchmarks/bench_scoring.py --rows 100 --sample-seed 1 --modes exact,fast   # fidelity on random rows
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODES = ("naive", "per-row", "exact", "exact-compiled", "fast", "compiled")
FLOAT32_MODES = ("naive", "per-row", "exact", "exact-compiled")
COMPILED_MODES = ("exact-compiled", "compiled")
HEAD_ROWS = (256, 1024)
F64_ROWS = 32


def bench_pool(args: argparse.Namespace):
    """The first ``--rows`` rows of the pool, or with ``--sample-seed`` a seeded random sample of that many (their
    neighbours are then searched within the sample, as they would be in a pool of that size)."""
    from miwv_lib.data.datasets import load_instructions

    if args.sample_seed is None:
        return load_instructions(args.data, limit=args.rows)
    pool = load_instructions(args.data)
    picked = np.random.default_rng(args.sample_seed).choice(len(pool), min(args.rows, len(pool)), replace=False)
    return pool.subset(sorted(picked.tolist()))


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    """Score ``args.rows`` rows in this process with one mode; return losses, timings and peak RSS."""
    import torch

    from miwv_lib.data.models import load_model
    from miwv_lib.method.layouts import SpecialTokens
    from miwv_lib.data.prompts import encode_examples
    from miwv_lib.experiments.score import ScoreConfig, find_neighbors, score_rows
    from miwv_lib.method.importance import chunk_plan
    from miwv_lib.method.layouts import one_shot_sequence, zero_shot_sequence
    from miwv_lib.method.losses import compile_seconds

    pool = bench_pool(args)
    neighbors, similarities = find_neighbors(pool, "all-MiniLM-L6-v2", progress=False)
    loaded = load_model(args.model, dtype="float32" if mode in FLOAT32_MODES else "bfloat16", device="cpu")
    special = SpecialTokens.from_tokenizer(loaded.tokenizer)
    examples = encode_examples(pool.rows, loaded.tokenizer)
    sequences, no_demo = [], []
    for i, example in enumerate(examples):
        sequences.append(zero_shot_sequence(example, special, args.max_length)[0])
        one, cut = one_shot_sequence(example, examples[neighbors[i]], special, args.max_length)
        sequences.append(one)
        no_demo.append(cut.no_demo)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    warmup = warm_up(mode, loaded, examples, neighbors, similarities, args)
    compiling, start = compile_seconds(), time.perf_counter()
    if mode == "naive":
        losses = naive_losses(loaded.model, sequences, torch.float32, "naive")
        # as in the engine: a one-shot pass without its demo has no loss
        losses[1::2][np.array(no_demo, dtype=bool)] = np.nan
    else:  # the scoring path of `score_pool`: chunk plan, shared prefixes, batched passes
        config = ScoreConfig(max_length=args.max_length, batch_size=args.batch_size, compute_ifd=False,
                             torch_compile=mode in COMPILED_MODES, share_prefix=mode != "per-row")
        ids = [row["id"] for row in pool.rows]
        rows = []
        for chunk in chunk_plan(neighbors, config.chunk_rows):
            rows += score_rows(loaded, examples, ids, chunk, neighbors, similarities, config)
        rows.sort(key=lambda row: row["index"])
        losses = np.array([[row["zero_shot_loss"], row["one_shot_loss"]] for row in rows], dtype=float).reshape(-1)
    seconds, compiling = time.perf_counter() - start, compile_seconds() - compiling
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "mode": mode,
        "seconds": seconds,
        **({"losses_f64": float64_reference(loaded.model, sequences, losses)} if mode == "naive" else {}),
        "rows": len(pool),
        "tokens": sum(len(s.input_ids) for s in sequences),
        **token_accounting(examples, neighbors, special, args.max_length),
        "losses": losses.tolist(),
        "warmup_s": warmup,
        "compile_s_in_timing": round(compiling, 2),  # a graph the warm-up did not need; 0 when none
        "peak_rss_mb": peak_rss / 1024,
        "rss_after_load_mb": rss_loaded / 1024,
        "threads": torch.get_num_threads(),
    }


def naive_losses(model, sequences, dtype, desc: str) -> np.ndarray:
    """One sequence per forward pass with its full logits, their cross-entropy in ``dtype``."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    losses = []
    with torch.no_grad():
        for seq in tqdm(sequences, desc=desc, leave=False):
            ids = torch.tensor([seq.input_ids])
            logits = model(ids).logits[0]  # full sequence × vocabulary
            n, k = len(seq.input_ids), seq.n_targets
            losses.append(F.cross_entropy(logits[n - k - 1:n - 1].to(dtype), ids[0, n - k:]).item())
    return np.array(losses)


def float64_reference(model, sequences, losses: np.ndarray) -> list[float]:
    """After the timing: naive's first ``F64_ROWS`` rows again, their logits' cross-entropy in float64, free of
    float32's rounding in a sum of 262,144 exponentials (NaN for the other rows)."""
    import torch

    reference = np.full(len(losses), np.nan)
    reference[:2 * F64_ROWS] = naive_losses(model, sequences[:2 * F64_ROWS], torch.float64, "float64 reference")
    reference[np.isnan(losses)] = np.nan
    return reference.tolist()


def warm_up(mode: str, loaded, examples, neighbors, similarities, args: argparse.Namespace) -> float:
    """One batch of each kind the run will score (with or without branches, of one sequence or more) outside the
    timing: one-off costs (for the compiled modes, a graph per kind) are reported on their own, since they do not
    grow with the rows."""
    from miwv_lib.method.layouts import SpecialTokens
    from miwv_lib.method.losses import EngineConfig, compile_body, span_losses, supports_branches, warm_up_batches

    if mode == "naive":
        return 0.0
    start = time.perf_counter()
    if mode in COMPILED_MODES:
        compile_body(loaded.model)  # as score_pool does
    share = mode != "per-row" and supports_branches(loaded.model)  # as score_rows plans
    engine = EngineConfig(batch_size=args.batch_size, progress=False)
    plans = engine_plans(examples, neighbors, SpecialTokens.from_tokenizer(loaded.tokenizer), args.max_length, share)
    for batch in warm_up_batches(plans, engine):
        span_losses(loaded.model, batch, loaded.tokenizer.pad_token_id, engine)
    return round(time.perf_counter() - start, 2)


def engine_plans(examples, neighbors, special, max_length: int, share: bool) -> list[list]:
    """The passes ``score`` runs, chunk by chunk (MIWV only, its default chunks): shared-prefix passes with
    ``share``, else one per row."""
    from miwv_lib.experiments.score import ScoreConfig
    from miwv_lib.method.importance import PACK_TOKENS, chunk_plan, plan_passes

    return [plan_passes(examples, chunk, neighbors, special, max_length, False, PACK_TOKENS if share else 0).sequences
            for chunk in chunk_plan(neighbors, ScoreConfig().chunk_rows)]


def gemm_gflops(m: int, k: int, n: int, dtype, seconds: float = 1.5) -> float:
    """Sustained rate of one (m × k) @ (k × n) matmul shape, on this process's threads, with the weight laid out
    as ``nn.Linear`` keeps it (n × k): a plain ``a @ b`` takes another, on some CPUs much slower, bf16 path. The
    result goes into one reused tensor: the GEMM's own rate, without the page faults of fresh memory (on the
    2-core Xeon VM, 200 against 240 GFLOP/s for the float32 head shape, 250 against 310 for a body one)."""
    import torch

    a, w, out = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.empty(m, n, dtype=dtype)
    torch.mm(a, w.t(), out=out)  # warm-up
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or reps < 2:
        torch.mm(a, w.t(), out=out)
        reps += 1
    return 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9


def measure_roofline(args: argparse.Namespace) -> dict:
    """The model's parameter counts and its GEMM rates: the body's two MLP shapes and the head's."""
    import torch

    from miwv_lib.data.models import load_model
    from miwv_lib.method.layouts import text_config

    model = load_model(args.model, dtype="bfloat16", device="cpu").model
    cfg = text_config(model)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # a tied head is counted once, as the embedding
    body = total - embed.numel() - (0 if head is embed else head.numel())
    d, inter, vocab = cfg.hidden_size, cfg.intermediate_size, head.shape[0]
    rates = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        # The head at 256 and 1,024 rows (the engine's CPU chunk, before and since 2026-12-05), the faster bounds:
        # on the 2-core Xeon VM float32 runs 240 GFLOP/s at 256 rows and 295 at 1,024.
        head_rates = {rows: gemm_gflops(rows, d, vocab, dtype) for rows in HEAD_ROWS}
        rates[name] = {"body": (gemm_gflops(4096, d, inter, dtype) + gemm_gflops(4096, inter, d, dtype)) / 2,
                       "head": max(head_rates.values()), "head_by_rows": head_rates}
    return {"body_params": body, "head_params": head.numel(), "gemm_gflops": rates,
            "shapes": {"body": [4096, d, inter], "head": [[rows, d, vocab] for rows in HEAD_ROWS]},
            "threads": torch.get_num_threads()}


def roofline_seconds(roof: dict, accounting: dict, dtype: str) -> dict:
    body = 2 * roof["body_params"] * accounting["body_tokens_kv_reuse"]
    head = 2 * roof["head_params"] * accounting["response_positions"]
    rate = roof["gemm_gflops"][dtype]
    return {"body_tflop": body / 1e12, "head_tflop": head / 1e12,
            "seconds": body / (rate["body"] * 1e9) + head / (rate["head"] * 1e9)}


def token_accounting(examples, neighbors, special, max_length: int) -> dict[str, int]:
    """Tokens each plan pushes through the model body (the work no head-side trick removes).

    ``engine``: the passes ``score_pool`` runs (one-shot passes that share their neighbour's prefix, plus
    zero-shot where no one-shot pass carries it); ``per_row``: the same with ``--no-share-prefix``.
    ``kv_reuse``: the least: every row's zero-shot pass (which is also the prefix of the one-shot passes
    that use the row as their demo), plus the part of each one-shot sequence after that prefix.
    """
    from miwv_lib.method.layouts import one_shot_sequence, zero_shot_sequence

    zero = [zero_shot_sequence(e, special, max_length)[0] for e in examples]
    one = [one_shot_sequence(e, examples[neighbors[i]], special, max_length)[0] for i, e in enumerate(examples)]
    engine, per_row = (sum(len(seq.input_ids) for seqs in engine_plans(examples, neighbors, special, max_length, share)
                           for seq in seqs) for share in (True, False))
    kv_reuse = 0
    for i in range(len(examples)):
        prefix = zero[neighbors[i]].input_ids
        shared = one[i].input_ids[:len(prefix)] == prefix  # not when the demo was trimmed to fit max_length
        kv_reuse += len(zero[i].input_ids) + len(one[i].input_ids) - (len(prefix) if shared else 0)
    return {"body_tokens_naive": sum(len(s.input_ids) for s in zero + one), "body_tokens_engine": engine,
            "body_tokens_per_row": per_row,
            "body_tokens_kv_reuse": kv_reuse, "response_positions": sum(s.n_targets for s in zero + one)}


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::mkldnn_linear",
              "aten::_mkldnn_linear", "aten::baddbmm"}


def classify(event) -> str:
    """Which part of the engine an operator's own time belongs to, from its enclosing labels."""
    label, attention, node = None, False, event
    while node is not None and label is None:
        attention |= "scaled_dot_product" in node.name or "attention" in node.name.lower()
        label = node.name if node.name.startswith("miwv.") else None
        node = node.cpu_parent
    if label is None:
        return "outside the engine's parts (loss assembly, batching)"
    if event.name == label:
        return {"miwv.layout": "layout: padded tensors and gather indices (Python)"}.get(label, f"{label}: Python")
    if label == "miwv.layout":
        return "layout: padded tensors and gather indices (Python)"
    if label == "miwv.body":
        if attention:
            return "body: attention"
        return "body: matmuls" if event.name in MATMUL_OPS else "body: norms, rotary, activations, copies"
    return "head: matmul" if event.name in MATMUL_OPS else "head: log-sum-exp, target logit"


def profile_mode(args: argparse.Namespace) -> dict:
    """``args.profile_mode`` on ``args.profile`` rows under torch.profiler: where the time goes."""
    from collections import defaultdict

    import torch
    from torch.profiler import ProfilerActivity, profile

    from miwv_lib.data.datasets import load_instructions
    from miwv_lib.data.models import load_model
    from miwv_lib.method.layouts import SpecialTokens
    from miwv_lib.data.prompts import encode_examples
    from miwv_lib.method.losses import (EngineConfig, compile_body, length_batches, span_losses, supports_branches,
                                        warm_up_batches)
    from miwv_lib.experiments.score import find_neighbors

    pool = load_instructions(args.data, limit=args.profile)
    neighbors, _ = find_neighbors(pool, "all-MiniLM-L6-v2", progress=False)
    dtype = "float32" if args.profile_mode in FLOAT32_MODES else "bfloat16"
    loaded = load_model(args.model, dtype=dtype, device="cpu")
    pad, special = loaded.tokenizer.pad_token_id, SpecialTokens.from_tokenizer(loaded.tokenizer)
    start = time.perf_counter()
    examples = encode_examples(pool.rows, loaded.tokenizer)
    tokenise = time.perf_counter() - start
    share = supports_branches(loaded.model)  # the profiled modes all share passes, as score plans them
    plans = engine_plans(examples, neighbors, special, args.max_length, share)
    if args.profile_mode in COMPILED_MODES:
        compile_body(loaded.model)
    engine = EngineConfig(batch_size=args.batch_size, progress=False)
    for batch in warm_up_batches(plans, engine):  # kernels, allocator, and a compiled graph per kind of batch
        span_losses(loaded.model, batch, pad, engine)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for seqs in plans:
            span_losses(loaded.model, seqs, pad, engine)
        wall = time.perf_counter() - start
    parts: dict[str, float] = defaultdict(float)
    for event in prof.events():
        parts[classify(event)] += event.self_cpu_time_total / 1e6
    real = sum(len(q.input_ids) for seqs in plans for q in seqs)
    padded = sum(len(b) * max(len(seqs[i].input_ids) for i in b)
                 for seqs in plans for b in length_batches([len(q.input_ids) for q in seqs], engine))
    return {"mode": args.profile_mode, "rows": len(pool), "wall_s": wall, "tokenise_s": tokenise, "parts_s": dict(parts),
            "padding_fraction": 1 - real / padded, "threads": torch.get_num_threads()}


def profile_table(profiled: dict) -> str:
    total = sum(profiled["parts_s"].values())
    lines = [f"{profiled['mode'].capitalize()} mode under torch.profiler, {profiled['rows']} rows, {profiled['threads']} threads: "
             f"{profiled['wall_s']:.1f} s in the engine (profiler on), plus {profiled['tokenise_s']:.1f} s of "
             f"tokenisation before it. Padding is {profiled['padding_fraction']:.1%} of the body's tokens.", "",
             "| part | seconds | share |", "|---|---|---|"]
    for name, sec in sorted(profiled["parts_s"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {sec:.2f} | {sec / total:.1%} |")
    return "\n".join(lines)


def top_overlap(a: np.ndarray, b: np.ndarray, ratio: float = 0.10) -> float:
    k = max(1, math.floor(ratio * len(a)))
    return len(set(np.argsort(-a, kind="stable")[:k]) & set(np.argsort(-b, kind="stable")[:k])) / k


def summarise(results: dict[str, dict], roof: dict | None = None) -> list[dict]:
    from miwv_lib.experiments.report import spearman

    naive = results.get("naive")
    reference = naive or results.get("exact")  # fidelity against float32: naive, or exact (within 1e-5 of it)
    rows = []
    for mode, r in results.items():
        dtype = "fp32" if mode in FLOAT32_MODES else "bf16"
        bound = roofline_seconds(roof, r, dtype)["seconds"] if roof else None
        losses = np.array(r["losses"])
        miwv = losses[1::2] - losses[0::2]
        row = {"mode": mode, "rows": r["rows"], "seconds": round(r["seconds"], 2),
               "samples_per_s": round(r["rows"] / r["seconds"], 3), "warmup_s": r.get("warmup_s"),
               "compile_s_in_timing": r.get("compile_s_in_timing"),
               "tokens_per_s": round(r["tokens"] / r["seconds"], 1),
               "peak_rss_mb": round(r["peak_rss_mb"]), "threads": r["threads"],
               "body_tokens": r[{"naive": "body_tokens_naive", "per-row": "body_tokens_per_row"}.get(
                   mode, "body_tokens_engine")],
               "of_roofline": round(bound / r["seconds"], 3) if bound else None}
        if reference is not None:
            ref_losses = np.array(reference["losses"], dtype=float)
            ref_miwv = ref_losses[1::2] - ref_losses[0::2]
            if not np.array_equal(np.isnan(losses), np.isnan(ref_losses)):
                raise RuntimeError(f"{mode} and {reference['mode']} disagree on which rows have a loss")
            has = ~np.isnan(miwv)  # rows whose demo does not fit (an explicit --max-length) have no MIWV
            row.update(speedup_vs_naive=round(naive["seconds"] / r["seconds"], 2) if naive else None,
                       max_abs_dloss=float(np.nanmax(np.abs(losses - ref_losses))),
                       max_abs_dloss_f64=float(np.nanmax(np.abs(losses - naive["losses_f64"]))) if naive else None,
                       max_abs_dmiwv=float(np.abs(miwv - ref_miwv)[has].max()),
                       spearman_miwv=round(spearman(miwv[has], ref_miwv[has]), 5),
                       top10_overlap=round(top_overlap(miwv[has], ref_miwv[has]), 3))
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    columns = ["mode", "rows", "seconds", "warmup_s", "compile_s_in_timing", "samples_per_s", "tokens_per_s",
               "speedup_vs_naive", "of_roofline", "max_abs_dloss", "max_abs_dloss_f64", "max_abs_dmiwv",
               "spearman_miwv", "top10_overlap", "peak_rss_mb", "body_tokens"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = ["–" if row.get(c) is None else f"{row[c]:.2e}" if c.startswith("max_abs") else str(row[c])
                 for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def child(what: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--_child", what, "--model", args.model, "--data", args.data,
               "--rows", str(args.rows), "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
               "--profile", str(args.profile), "--profile-mode", args.profile_mode]
    if args.sample_seed is not None:
        command += ["--sample-seed", str(args.sample_seed)]
    print(f"[bench] {what} …", file=sys.stderr, flush=True)
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def roofline_text(roof: dict, accounting: dict) -> str:
    rates = roof["gemm_gflops"]
    bf16, fp32 = roofline_seconds(roof, accounting, "bf16"), roofline_seconds(roof, accounting, "fp32")
    return (f"Roofline: the least work for exact losses is {bf16['body_tflop'] + bf16['head_tflop']:.1f} TFLOP "
            f"(body {bf16['body_tflop']:.1f}: {accounting['body_tokens_kv_reuse']:,} tokens × 2 × "
            f"{roof['body_params'] / 1e6:.1f} M; head {bf16['head_tflop']:.1f}: {accounting['response_positions']:,} "
            f"response positions × 2 × {roof['head_params'] / 1e6:.1f} M). GEMM rates measured in this run "
            f"({roof['threads']} threads), GFLOP/s, body {roof['shapes']['body']} and back / head "
            f"{' or '.join(map(str, roof['shapes']['head']))} (the faster): "
            f"bf16 {rates['bf16']['body']:.0f} / {rates['bf16']['head']:.0f}, "
            f"float32 {rates['fp32']['body']:.0f} / {rates['fp32']['head']:.0f}. At those rates the work takes "
            f"{bf16['seconds']:.1f} s in bf16 and {fp32['seconds']:.1f} s in float32: each mode's of_roofline is "
            f"its own dtype's bound over its time.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--data", default="alpaca", help="file, registry name or hub id (needs MIWV_DATA_DIR)")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--sample-seed", type=int, default=None,
                        help="a seeded random sample of --rows rows instead of the first ones (fidelity on other rows)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    parser.add_argument("--profile", type=int, default=0, help="also profile a mode on this many rows")
    parser.add_argument("--profile-mode", choices=MODES[2:], default="fast")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:  # one mode, the GEMM rates or the profile, in a fresh process
        work = {"roofline": measure_roofline, "profile": profile_mode}.get(args._child)
        print(json.dumps(work(args) if work else run_mode(args._child, args)))
        return

    out = Path(args.out)
    results = {mode: child(mode, args) for mode in args.modes.split(",")}
    roof = child("roofline", args)
    profiled = child("profile", args) if args.profile else None
    rows = summarise(results, roof)
    from miwv_lib.runtime.io import write_json
    from miwv_lib.runtime.runs import environment_info, now

    first = next(iter(results.values()))
    accounting = {k: first[k] for k in ("body_tokens_naive", "body_tokens_per_row", "body_tokens_engine",
                                        "body_tokens_kv_reuse", "response_positions")}
    table = markdown_table(rows) + "\n\n" + roofline_text(roof, accounting) + "\n\n" + (
        f"Tokens through the model body: naive {accounting['body_tokens_naive']:,}, engine per row "
        f"{accounting['body_tokens_per_row']:,}, engine with shared prefixes {accounting['body_tokens_engine']:,}, "
        f"the least (each neighbour's prefix once per row that uses it, not once per chunk) "
        f"{accounting['body_tokens_kv_reuse']:,}.")
    if profiled:
        table += "\n\n" + profile_table(profiled)
    if preload := os.environ.get("LD_PRELOAD"):  # another allocator (tcmalloc) changes the timings: say so
        table += f"\n\nEvery mode ran with LD_PRELOAD={preload}."
    write_json(out / "bench_scoring.json", {"date": now(), "environment": environment_info(), "args": vars(args),
                                            "summary": rows, "token_accounting": accounting, "roofline": roof,
                                            "profile": profiled})
    (out / "bench_scoring.md").write_text(table + "\n", encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
