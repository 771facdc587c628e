"""LoRA training speed with and without the response-only loss, measured side by side in one run.

Modes, on the same model, rows and settings (``train_model`` with ``TrainConfig.response_only_loss``):

* ``off`` — HF's loss: the LM head at every position (prompt and padding included), float32 logits;
* ``on``  — ``ResponseOnlyLossTrainer``: the LM head only where a label is predicted.

Trials alternate (``off,on,off,on`` by default) so that other load on the machine hits both modes
alike: on a shared CPU the ratio of interleaved trials is the figure to trust, not the absolute
tokens/s. Each trial runs in its own subprocess, so its peak memory (RSS) is its own. tokens/s is
the non-padding input tokens over the wall time of ``trainer.train()``; ``steady tok/s`` leaves out
the first optimizer step (warm-up) using the rows of ``loss.csv``.

    MIWV_DATA_DIR=/work/shared/data python benchmarks/bench_training.py        # gemma-3-270m, 6 steps of 4 rows
    python benchmarks/bench_training.py --model /path/to/tiny --data pool.json --steps 1 --order off,on
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {"off": False, "on": True}


def run_trial(mode: str, args: argparse.Namespace) -> dict:
    """Train ``args.steps`` optimizer steps in this process with one mode; return speed, loss and peak RSS."""
    from miwv_lib.data.datasets import load_instructions
    from miwv_lib.experiments.train import TrainConfig, read_loss_csv, train_model

    rows = load_instructions(args.data, limit=args.steps * args.batch_size * args.grad_accum).rows
    config = TrainConfig(model=args.model, max_length=args.max_length, max_steps=args.steps,
                         batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
                         response_only_loss=MODES[mode], progress=False)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as out:
        start = time.perf_counter()
        result = train_model(rows, Path(out) / "run", config)
        wall = time.perf_counter() - start
        curve = read_loss_csv(Path(out) / "run" / "loss.csv")
        manifest = json.loads((Path(out) / "run" / "manifest.json").read_text())
    steady = None
    if len(curve) > 1 and curve[-1]["seconds"] > curve[0]["seconds"]:
        steady = (curve[-1]["tokens_seen"] - curve[0]["tokens_seen"]) / (curve[-1]["seconds"] - curve[0]["seconds"])
    return {"mode": mode, "rows": len(rows), "steps": result.steps, "tokens": manifest["tokens_seen"],
            "train_seconds": round(result.seconds, 2), "wall_seconds": round(wall, 2),
            "tokens_per_s": result.tokens_per_second, "steady_tokens_per_s": round(steady, 1) if steady else None,
            "train_loss": result.train_loss, "losses": [r["loss"] for r in curve],
            "bf16": manifest["fingerprint_inputs"]["config"]["bf16"],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def _trial_in_subprocess(mode: str, argv: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, *argv, "--trial", mode], capture_output=True, text=True,
                          cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"trial {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarize(trials: list[dict]) -> dict:
    """Per mode: mean tokens/s and peak RSS; the on/off ratio, and how far the two modes' losses differ."""
    by_mode = {m: [t for t in trials if t["mode"] == m] for m in MODES if any(t["mode"] == m for t in trials)}
    summary = {m: {"tokens_per_s": round(_mean([t["tokens_per_s"] for t in ts]), 1),
                   "steady_tokens_per_s": (round(_mean([t["steady_tokens_per_s"] for t in ts]), 1)
                                           if all(t["steady_tokens_per_s"] for t in ts) else None),
                   "peak_rss_mb": max(t["peak_rss_mb"] for t in ts)} for m, ts in by_mode.items()}
    if set(by_mode) == set(MODES):
        summary["ratio_on_off"] = round(summary["on"]["tokens_per_s"] / summary["off"]["tokens_per_s"], 2)
        # the interleaved pairs, each measured under the same outside load
        pairs = list(zip(by_mode["off"], by_mode["on"]))
        summary["pair_ratios"] = [round(on["tokens_per_s"] / off["tokens_per_s"], 2) for off, on in pairs]
        summary["max_abs_dloss"] = max(abs(a - b) for off, on in pairs for a, b in zip(off["losses"], on["losses"]))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--data", default="alpaca", help="a pool name (with MIWV_DATA_DIR) or a JSON file")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per trial")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--order", default="off,on,off,on", help="trials, in order (off: HF's loss, on: response-only)")
    parser.add_argument("--out", default=None, help="write the trials and summary to this JSON file")
    parser.add_argument("--trial", choices=sorted(MODES), help=argparse.SUPPRESS)  # internal: one trial, JSON to stdout
    args = parser.parse_args(argv)
    if args.trial:
        print(json.dumps(run_trial(args.trial, args)))
        return 0

    forwarded = ["--model", args.model, "--data", args.data, "--steps", str(args.steps), "--batch-size",
                 str(args.batch_size), "--grad-accum", str(args.grad_accum), "--max-length", str(args.max_length)]
    trials = []
    for mode in args.order.split(","):
        trial = _trial_in_subprocess(mode.strip(), forwarded)
        trials.append(trial)
        print(f"{trial['mode']:>3}: {trial['tokens']} tokens in {trial['train_seconds']} s = "
              f"{trial['tokens_per_s']} tok/s (steady {trial['steady_tokens_per_s']}), "
              f"train loss {trial['train_loss']:.4f}, peak RSS {trial['peak_rss_mb']} MB", flush=True)
    summary = summarize(trials)
    print("| mode | tokens/s | steady tokens/s | peak RSS (MB) |\n|---|---|---|---|")
    for mode in MODES:
        if mode in summary:
            s = summary[mode]
            print(f"| {mode} | {s['tokens_per_s']} | {s['steady_tokens_per_s']} | {s['peak_rss_mb']} |")
    if "ratio_on_off" in summary:
        print(f"on/off tokens/s: {summary['ratio_on_off']} (pairs: {summary['pair_ratios']}); "
              f"max |Δloss| between modes: {summary['max_abs_dloss']:.2e}")
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": vars(args), "trials": trials, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
