"""Command line: ``python -m miwv_lib score|select`` (also installed as ``miwv``).

The flags are a contract used by people and scripts; add new ones, don't rename old ones.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .data import DataError, load_instructions
from .io import read_jsonl
from .models import DEFAULT_MODEL, ModelLoadError
from .neighbors import DEFAULT_EMBEDDER
from .prompts import TEMPLATES
from .runs import FingerprintMismatch
from .scoring import ScoreConfig, score_pool
from .selection import SELECTION_METHODS, SelectionError, check_scores_match, export_subset, select_indices


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None,
                        help="file (.json/.jsonl/.parquet), registry name or hub id; default: 'alpaca' "
                             "from the data directory, else the hub")
    parser.add_argument("--data-dir", default=None, help="local data mirror (default: $MIWV_DATA_DIR)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N rows")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="miwv", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", help="compute MIWV (and IFD) for every row")
    _add_data_args(score)
    score.add_argument("--out", required=True, help="run directory for scores.jsonl and manifest.json")
    score.add_argument("--model", default=DEFAULT_MODEL)
    score.add_argument("--embedder", default=DEFAULT_EMBEDDER, help="sentence-transformers name/path, or 'self'")
    score.add_argument("--template", choices=TEMPLATES, default="alpaca")
    score.add_argument("--max-length", type=int, default=ScoreConfig.max_length)
    score.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                       help="auto = bf16 (fast); float32 = exact mode")
    score.add_argument("--device", default="auto")
    score.add_argument("--batch-size", type=int, default=ScoreConfig.batch_size)
    score.add_argument("--no-ifd", action="store_true", help="skip the unconditional pass that IFD needs")
    score.add_argument("--overwrite", action="store_true", help="replace results of a different configuration")

    select = commands.add_parser("select", help="write the top floor(ratio·N) rows")
    _add_data_args(select)
    select.add_argument("--scores", required=True, help="scores.jsonl written by 'score'")
    select.add_argument("--ratio", type=float, required=True, help="fraction of rows to keep, e.g. 0.01")
    select.add_argument("--by", choices=SELECTION_METHODS, default="miwv")
    select.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    select.add_argument("--out", required=True, help="subset file (.json or .jsonl)")
    return parser


def run_score(args: argparse.Namespace) -> None:
    pool = load_instructions(args.data, data_dir=args.data_dir, limit=args.limit)
    config = ScoreConfig(model=args.model, embedder=args.embedder, template=args.template,
                         max_length=args.max_length, dtype=args.dtype, device=args.device,
                         batch_size=args.batch_size, compute_ifd=not args.no_ifd)
    scores = score_pool(pool, args.out, config, overwrite=args.overwrite)
    miwvs = sorted(s["miwv"] for s in scores if s["miwv"] is not None)
    print(f"scored {len(scores)} rows -> {Path(args.out) / 'scores.jsonl'}; "
          f"MIWV min {miwvs[0]:+.3f}, median {miwvs[len(miwvs) // 2]:+.3f}, max {miwvs[-1]:+.3f}")


def run_select(args: argparse.Namespace) -> None:
    pool = load_instructions(args.data, data_dir=args.data_dir, limit=args.limit)
    scores = read_jsonl(args.scores)
    check_scores_match(pool, scores, args.scores)
    indices = select_indices(scores, args.ratio, by=args.by, seed=args.seed)
    out = export_subset(pool, scores, indices, args.out, by=args.by)
    print(f"selected {len(indices)} of {len(pool)} rows by {args.by} -> {out}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        {"score": run_score, "select": run_select}[args.command](args)
    except (DataError, ModelLoadError, SelectionError, FingerprintMismatch, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
