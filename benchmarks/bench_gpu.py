"""MIWV scoring throughput and model FLOP utilisation (MFU) of the real engine on a GPU.

Timing needs no trained weights: a Llama-architecture model with random weights (7B by default)
scores synthetic Alpaca-length rows through the same path as ``score``: neighbour chains cut into
chunks (``chunk_plan``), the passes of each chunk (``plan_passes``: the rows that share a neighbour
share one pass, its example once and their own tokens as branches after it, as ``score`` plans
them for a model whose attention takes the branch mask), and ``span_losses`` (length-sorted padded
batches, LM head at response positions only). Each plan in ``--pack-tokens`` (by default that one
and ``0``, one pass per row) is timed with each engine setting in ``--variants`` on the same rows
in the same run, next to a bare forward of the body over the same batches and masks and a
measured bf16 GEMM rate, and ``--check`` passes spread through the plan are compared with a naive
forward (full logits, each span in its own causal sequence) in the same dtype. Neighbours are drawn at
random: 63 % of rows share theirs with another row (67 % in the local Alpaca pool), but there are
none of the real graph's mutual pairs and chains.

Model FLOPs = 2 · body params · real tokens + 2 · head params · response tokens + attention
(4 · layers · hidden per query-key pair a token sees). MFU = model FLOPs/s ÷ the part's dense
bf16 peak; "of GEMM" divides by the matmul rate measured in this run instead.

    python benchmarks/bench_gpu.py                          # 7B on cuda, 4,000 rows, MIWV passes, both plans
    python benchmarks/bench_gpu.py --size tiny --device cpu --samples 32 --dtype float32   # anywhere
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig

from miwv_lib.method.importance import PACK_TOKENS, chunk_plan, plan_passes
from miwv_lib.method.layouts import EncodedExample, Sequence, SpecialTokens
from miwv_lib.method.losses import (
    EngineConfig,
    batch_inputs,
    compile_body,
    compile_seconds,
    length_batches,
    span_losses,
    supports_branches,
    warm_up_batches,
)

SIZES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM parts (spec sheets)
SPECIAL = SpecialTokens(bos=1, eos=2)


def synthetic_examples(n: int, vocab: int, seed: int = 0) -> list[EncodedExample]:
    """Token counts like Alpaca's under a Llama tokenizer: prompts ~40–110, responses long-tailed (median ~70)."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(40, 110, n)
    responses = np.clip(rng.lognormal(np.log(70), 0.8, n), 2, 400).astype(int)
    return [EncodedExample(tuple(rng.integers(3, vocab, p).tolist()), tuple(rng.integers(3, vocab, r).tolist()))
            for p, r in zip(prompts, responses)]


def synthetic_neighbors(n: int, seed: int = 0) -> np.ndarray:
    """A random other row for each row (real neighbour graphs have chains and mutual pairs too)."""
    rng = np.random.default_rng(seed + 1)
    k = rng.integers(0, n - 1, n)
    return np.where(k >= np.arange(n), k + 1, k)


def build_plans(examples, neighbor_index, chunk_rows: int, max_length: int, ifd: bool, pack_tokens: int):
    """The sequences of every chunk, exactly as ``score_rows`` plans them."""
    return [plan_passes(examples, rows, neighbor_index, SPECIAL, max_length, ifd, pack_tokens).sequences
            for rows in chunk_plan(neighbor_index, chunk_rows)]


def visible_pairs(seq: Sequence) -> int:
    """(query, key) pairs attention computes for one pass: causal, and a branch sees the prefix and itself."""
    if not seq.branches:
        return len(seq.input_ids) * (len(seq.input_ids) + 1) // 2
    prefix = seq.branches[0]
    sizes = np.diff([*seq.branches, len(seq.input_ids)])
    return prefix * (prefix + 1) // 2 + int(sum(n * prefix + n * (n + 1) // 2 for n in sizes))


def causal_context(seq: Sequence, stop: int) -> tuple[int, ...]:
    """The ordinary causal sequence whose last tokens are the span ending at ``stop``: the tokens before it,
    less the branches it does not see. A naive forward over it needs no mask of ours."""
    if not seq.branches or stop <= seq.branches[0]:
        return seq.input_ids[:stop]
    start = max(b for b in seq.branches if b < stop)
    return seq.input_ids[:seq.branches[0]] + seq.input_ids[start:stop]


def model_flops(model, chunks) -> dict:
    cfg = model.config
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - head - model.get_input_embeddings().weight.numel()
    lengths = [len(s.input_ids) for seqs in chunks for s in seqs]
    targets = sum(k for seqs in chunks for s in seqs for _, k in s.spans)
    attention = 4 * cfg.num_hidden_layers * cfg.hidden_size * sum(visible_pairs(s) for seqs in chunks for s in seqs)
    return {"body_params": body, "head_params": head, "tokens": sum(lengths), "response_tokens": targets,
            "passes": len(lengths), "branched_passes": sum(len(s.branches) > 1 for seqs in chunks for s in seqs),
            "flops": 2 * body * sum(lengths) + 2 * head * targets + attention}


def padded_tokens(chunks, engine: EngineConfig) -> int:
    total = 0
    for seqs in chunks:
        lengths = [len(s.input_ids) for s in seqs]
        total += sum(len(b) * max(lengths[i] for i in b) for b in length_batches(lengths, engine))
    return total


def progress(line: str) -> None:
    """To stderr as it happens: a run stopped at a time limit still shows how far it got."""
    print(line, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_engine(model, chunks, engine: EngineConfig, device) -> tuple[float, list]:
    sync(device)
    start = time.perf_counter()
    losses = [span_losses(model, seqs, 0, engine) for seqs in chunks]
    sync(device)
    return time.perf_counter() - start, losses


@torch.no_grad()
def time_bare_forward(model, chunks, engine: EngineConfig, device) -> float:
    """The body alone over the engine's own padded batches and masks: what the engine adds on top of it."""
    sync(device)
    start = time.perf_counter()
    for seqs in chunks:
        for batch in length_batches([len(s.input_ids) for s in seqs], engine):
            ids, attention, positions, *_ = batch_inputs(model, seqs, batch, 0, engine.padding_side, device)
            model.base_model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False)
    sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def naive_losses(model, seq, device) -> list[float]:
    """Each span in its own causal sequence, logits at every position, float32 log-softmax: the reference. It runs
    the body uncompiled, so that it shares no kernels with the engine and costs no compilation of its own."""
    body, head = getattr(model.base_model, "_orig_mod", model.base_model), model.get_output_embeddings()
    out = []
    for stop, k in seq.spans:
        ids = torch.tensor(causal_context(seq, stop), device=device)
        logits = head(body(input_ids=ids[None]).last_hidden_state)[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        out.append(float(-logp[-k - 1:-1].gather(1, ids[-k:, None]).mean()))
    return out


def gemm_tflops(device, dtype, n: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * n**3 / (time.perf_counter() - start) / 1e12


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def parse_variants(text: str) -> list[EngineConfig]:
    """``batch:tokens:head_chunk[:max_padding[:head_block]]``,… e.g. ``256:65536:256`` (the engine's defaults:
    head_chunk 1024 on a CPU, 4096 on a GPU; max_padding 0.05, and 1 batches by size alone, as before 2026-12-03;
    head_block 2048 on a CPU, 32768 on a GPU)."""
    out = []
    for item in text.split(","):
        b, t, h, *rest = item.split(":")
        optional = {"max_padding": float(rest[0])} if rest else {}
        if len(rest) > 1:
            optional["head_block"] = int(rest[1])
        out.append(EngineConfig(batch_size=int(b), max_tokens_per_batch=int(t), head_chunk=int(h), progress=False,
                                **optional))
    return out


def build_model(size: str, device, dtype):
    config = LlamaConfig(**SIZES[size], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    finally:
        torch.set_default_dtype(previous)
    return model


def fidelity(model, chunks, losses, n: int, device) -> float | None:
    """Max |Δloss| against the naive forward over ``n`` passes spread evenly through the plan, so that passes
    with branches are among them (a plan's first passes are zero-shot ones)."""
    seqs, got = [s for c in chunks for s in c], [x for c in losses for x in c]
    m = min(n, len(seqs))
    picked = [round(j * (len(seqs) - 1) / max(m - 1, 1)) for j in range(m)]
    if not picked:
        return None
    return max(abs(a - b) for i in picked for a, b in zip(naive_losses(model, seqs[i], device), got[i]))


def time_variant(model, chunks, work: dict, engine: EngineConfig, args, device, peak, gemm) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    compiling = compile_seconds()
    seconds, losses = time_engine(model, chunks, engine, device)
    compiling = compile_seconds() - compiling
    bare = time_bare_forward(model, chunks, engine, device) if args.bare_forward else None
    achieved = work["flops"] / seconds / 1e12
    return {
        "pack_tokens": work["pack_tokens"], "batch_size": engine.batch_size,
        "max_tokens_per_batch": engine.max_tokens_per_batch, "head_chunk": engine.head_chunk,
        "head_block": engine.head_block, "max_padding": engine.max_padding, "seconds": round(seconds, 2),
        "compile_s_in_timing": round(compiling, 2),  # a graph the warm-up did not cover; 0 when none
        "bare_forward_seconds": round(bare, 2) if bare else None,
        "padding_waste": round(1 - work["tokens"] / padded_tokens(chunks, engine), 3),
        "rows_per_s": round(args.samples / seconds, 1), "tokens_per_s": round(work["tokens"] / seconds),
        "achieved_tflops": round(achieved, 1), "mfu": round(achieved / peak, 3) if peak else None,
        "of_gemm": round(achieved / gemm, 3), "alpaca_52k_minutes": round(52002 / (args.samples / seconds) / 60, 1),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 1) if device.type == "cuda" else None,
        "max_abs_dloss_vs_naive": fidelity(model, chunks, losses, args.check, device),
    }


def measure(args) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = build_model(args.size, device, dtype)
    if args.torch_compile:
        compile_body(model)
    examples = synthetic_examples(args.samples, model.config.vocab_size)
    neighbors = synthetic_neighbors(args.samples)
    peak, gemm = peak_tflops(device), gemm_tflops(device, dtype, 8192 if device.type == "cuda" else 512)
    engines, plans, variants = parse_variants(args.variants), [], []
    for pack_tokens in dict.fromkeys(int(p) if supports_branches(model) else 0 for p in args.pack_tokens.split(",")):
        chunks = build_plans(examples, neighbors, args.chunk_rows, args.max_length, args.ifd, pack_tokens)
        plans.append(work := {"pack_tokens": pack_tokens, **model_flops(model, chunks)})
        kinds = warm_up_batches(chunks, engines[0])
        warm_up, _ = time_engine(model, kinds, engines[0], device)  # kernels, allocator, compilation
        progress(f"pack_tokens {pack_tokens}: {work['passes']} passes, {work['tokens']} tokens, "
                 f"warm-up {warm_up:.0f} s over {len(kinds)} kinds of batch")
        for engine in engines:
            variants.append(time_variant(model, chunks, work, engine, args, device, peak, gemm))
            progress(f"  {engine.batch_size}:{engine.max_tokens_per_batch}:{engine.head_chunk}:{engine.max_padding}:"
                     f"{engine.head_block or 'default'}: "
                     f"{variants[-1]['seconds']} s ({variants[-1]['compile_s_in_timing']} s of it compiling)")
    return {
        "date": date.today().isoformat(), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or str(device), "torch": torch.__version__, "transformers": transformers.__version__,
        "size": args.size, "dtype": args.dtype, "samples": args.samples, "ifd": args.ifd, "chunk_rows": args.chunk_rows,
        "torch_compile": args.torch_compile, "body_params": plans[0]["body_params"],
        "head_params": plans[0]["head_params"], "gemm_tflops": round(gemm, 1), "peak_tflops": peak, "plans": plans,
        "variants": variants,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--chunk-rows", type=int, default=1024, help="rows planned together (score --chunk-rows)")
    parser.add_argument("--pack-tokens", default=f"{PACK_TOKENS},0",
                        help="longest shared-prefix pass, as score plans them (0: one pass per row); each value in "
                             "this comma list is a plan timed with every variant on the same rows")
    parser.add_argument("--ifd", action="store_true", help="also the unconditional pass IFD needs")
    parser.add_argument("--variants", default="256:16384:4096,256:16384:4096:1",
                        help="engine settings to time, batch_size:max_tokens_per_batch:head_chunk[:max_padding[:head_block]],…")
    parser.add_argument("--torch-compile", action="store_true", help="torch.compile the model body (dynamic shapes)")
    parser.add_argument("--bare-forward", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the body alone over the same batches")
    parser.add_argument("--check", type=int, default=16,
                        help="passes compared with a naive forward, spread through the plan")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args()
    result = measure(args)
    print(json.dumps(result, indent=2))
    if args.out:
        from miwv_lib.runtime.io import write_json

        write_json(args.out, result)


if __name__ == "__main__":
    main()
