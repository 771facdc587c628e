"""MIWV scoring throughput and model FLOP utilisation (MFU) of the real engine on a GPU.

Timing needs no trained weights: a Llama-architecture model with random weights (7B by default)
scores synthetic Alpaca-length rows through the same path as ``score``: neighbour chains cut into
chunks (``chunk_plan``), the passes of each chunk (``plan_passes``: one-shot passes that carry
their neighbour's zero-shot loss, zero-shot passes only where none does), and ``span_losses``
(length-sorted padded batches, LM head at response positions only). Each engine setting in
``--variants`` is timed on the same rows, next to a bare forward of the body over the same
batches and a measured bf16 GEMM rate, and the first ``--check`` sequences are compared with
a naive forward (full logits) in the same dtype.

Model FLOPs = 2 · body params · real tokens + 2 · head params · response tokens + causal
attention (2 · layers · hidden · length² per sequence). MFU = model FLOPs/s ÷ the part's dense
bf16 peak; "of GEMM" divides by the matmul rate measured in this run instead.

    python benchmarks/bench_gpu.py                          # 7B on cuda, 4,000 rows, MIWV passes only
    python benchmarks/bench_gpu.py --size tiny --device cpu --samples 32 --dtype float32   # anywhere
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig

from miwv_lib.method.layouts import EncodedExample, SpecialTokens
from miwv_lib.method.losses import EngineConfig, compile_body, length_batches, span_losses
from miwv_lib.method.importance import chunk_plan, plan_passes

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


def build_plans(examples, neighbor_index, chunk_rows: int, max_length: int, ifd: bool):
    """The sequences of every chunk, exactly as ``score_rows`` plans them."""
    return [plan_passes(examples, rows, neighbor_index, SPECIAL, max_length, ifd).sequences
            for rows in chunk_plan(neighbor_index, chunk_rows)]


def model_flops(model, chunks) -> dict:
    cfg = model.config
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - head - model.get_input_embeddings().weight.numel()
    lengths = [len(s.input_ids) for seqs in chunks for s in seqs]
    targets = sum(k for seqs in chunks for s in seqs for _, k in s.spans)
    attention = 2 * cfg.num_hidden_layers * cfg.hidden_size * sum(n * n for n in lengths)
    return {"body_params": body, "head_params": head, "tokens": sum(lengths), "response_tokens": targets,
            "flops": 2 * body * sum(lengths) + 2 * head * targets + attention}


def padded_tokens(chunks, engine: EngineConfig) -> int:
    total = 0
    for seqs in chunks:
        lengths = [len(s.input_ids) for s in seqs]
        total += sum(len(b) * max(lengths[i] for i in b) for b in length_batches(lengths, engine))
    return total


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
    """The body alone over the engine's own padded batches: what the engine adds on top of it."""
    sync(device)
    start = time.perf_counter()
    for seqs in chunks:
        lengths = [len(s.input_ids) for s in seqs]
        for batch in length_batches(lengths, engine):
            width = max(lengths[i] for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(batch):
                ids[row, :lengths[i]] = torch.tensor(seqs[i].input_ids)
                mask[row, :lengths[i]] = 1
            positions = torch.arange(width).expand(len(batch), width) * mask
            model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device),
                             position_ids=positions.to(device), use_cache=False)
    sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def naive_losses(model, seq, device) -> list[float]:
    """One sequence alone, logits at every position, float32 log-softmax: the reference."""
    logits = model(input_ids=torch.tensor([seq.input_ids], device=device)).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    ids = torch.tensor(seq.input_ids, device=device)
    return [float(-logp[stop - k - 1:stop - 1].gather(1, ids[stop - k:stop, None]).mean()) for stop, k in seq.spans]


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


def parse_variants(text: str, torch_compile: bool = False) -> list[EngineConfig]:
    """``batch:tokens:head_chunk,…`` e.g. ``256:65536:256`` (the engine's head_chunk default is 256)."""
    out = []
    for item in text.split(","):
        b, t, h = (int(x) for x in item.split(":"))
        out.append(EngineConfig(batch_size=b, max_tokens_per_batch=t, head_chunk=h, progress=False,
                                torch_compile=torch_compile))
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
    seqs = [s for c in chunks for s in c][:n]
    got = [x for c in losses for x in c][:n]
    if not seqs:
        return None
    return max(abs(a - b) for s, g in zip(seqs, got) for a, b in zip(naive_losses(model, s, device), g))


def measure(args) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = build_model(args.size, device, dtype)
    if args.torch_compile:
        compile_body(model)
    examples = synthetic_examples(args.samples, model.config.vocab_size)
    chunks = build_plans(examples, synthetic_neighbors(args.samples), args.chunk_rows, args.max_length, args.ifd)
    work = model_flops(model, chunks)
    peak = peak_tflops(device)
    gemm = gemm_tflops(device, dtype, 8192 if device.type == "cuda" else 512)
    variants = []
    for engine in parse_variants(args.variants, args.torch_compile):
        time_engine(model, chunks[:1], engine, device)  # warm-up: kernels, allocator
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, losses = time_engine(model, chunks, engine, device)
        bare = time_bare_forward(model, chunks, engine, device)
        achieved = work["flops"] / seconds / 1e12
        variants.append({
            "batch_size": engine.batch_size, "max_tokens_per_batch": engine.max_tokens_per_batch,
            "head_chunk": engine.head_chunk, "seconds": round(seconds, 2), "bare_forward_seconds": round(bare, 2),
            "padding_waste": round(1 - work["tokens"] / padded_tokens(chunks, engine), 3),
            "rows_per_s": round(args.samples / seconds, 1), "tokens_per_s": round(work["tokens"] / seconds),
            "achieved_tflops": round(achieved, 1), "mfu": round(achieved / peak, 3) if peak else None,
            "of_gemm": round(achieved / gemm, 3), "alpaca_52k_minutes": round(52002 / (args.samples / seconds) / 60, 1),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 1) if device.type == "cuda" else None,
            "max_abs_dloss_vs_naive": fidelity(model, chunks, losses, args.check, device),
        })
    return {
        "date": date.today().isoformat(), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or str(device), "torch": torch.__version__, "transformers": transformers.__version__,
        "size": args.size, "dtype": args.dtype, "samples": args.samples, "ifd": args.ifd, "chunk_rows": args.chunk_rows,
        "torch_compile": args.torch_compile, **work, "gemm_tflops": round(gemm, 1), "peak_tflops": peak, "variants": variants,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--chunk-rows", type=int, default=1024, help="rows planned together (score --chunk-rows)")
    parser.add_argument("--ifd", action="store_true", help="also the unconditional pass IFD needs")
    parser.add_argument("--variants", default="256:65536:256,256:65536:4096,256:16384:4096",
                        help="engine settings to time, batch_size:max_tokens_per_batch:head_chunk,…")
    parser.add_argument("--torch-compile", action="store_true", help="torch.compile the model body (dynamic shapes)")
    parser.add_argument("--check", type=int, default=16, help="sequences compared with a naive forward")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args()
    result = measure(args)
    print(json.dumps(result, indent=2))
    if args.out:
        from miwv_lib.runtime.io import write_json

        write_json(args.out, result)


if __name__ == "__main__":
    main()
