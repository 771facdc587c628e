"""MIWV scoring throughput and model FLOP utilisation (MFU) on a GPU.

Timing needs no trained weights: a Llama-architecture model with random bf16 weights (7B by
default) scores synthetic Alpaca-length samples, i.e. the zero-shot, one-shot and unconditional
passes of the real layout, with our engine. MFU = 2 · non-embedding params · tokens/s ÷ peak.

    python benchmarks/bench_gpu.py                          # 7B on cuda, 2,000 samples
    python benchmarks/bench_gpu.py --size tiny --device cpu --samples 32   # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from miwv_lib.prompts import EncodedExample, SpecialTokens
from miwv_lib.scoring import (
    EngineConfig,
    Sequence,
    one_shot_sequence,
    sequence_losses,
    unconditional_sequence,
    zero_shot_sequence,
)

SIZES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM parts


def synthetic_examples(n: int, vocab: int, seed: int = 0) -> list[EncodedExample]:
    """Token counts like Alpaca's under a Llama tokenizer: prompts ~40–110, responses long-tailed (median ~70)."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(40, 110, n)
    responses = np.clip(rng.lognormal(np.log(70), 0.8, n), 2, 400).astype(int)
    return [EncodedExample(tuple(rng.integers(3, vocab, p).tolist()), tuple(rng.integers(3, vocab, r).tolist()))
            for p, r in zip(prompts, responses)]


def build_sequences(examples: list[EncodedExample], max_length: int) -> list[Sequence]:
    special = SpecialTokens(bos=1, eos=2)
    sequences = []
    for i, example in enumerate(examples):
        demo = examples[(i + 1) % len(examples)]
        sequences += [zero_shot_sequence(example, special, max_length)[0],
                      one_shot_sequence(example, demo, special, max_length)[0],
                      unconditional_sequence(example, special, max_length)]
    return sequences


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--max-tokens-per-batch", type=int, default=65536)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args()

    device = torch.device(args.device)
    config = LlamaConfig(**SIZES[args.size], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with device:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    body_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    sequences = build_sequences(synthetic_examples(args.samples, config.vocab_size), args.max_length)
    tokens = sum(len(s.input_ids) for s in sequences)
    engine = EngineConfig(batch_size=args.batch_size, max_tokens_per_batch=args.max_tokens_per_batch)

    sequence_losses(model, sequences[:64], 0, engine)  # warm-up: kernels, allocator
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    sequence_losses(model, sequences, 0, engine)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    tokens_per_s = tokens / seconds
    peak = peak_tflops(device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "size": args.size, "body_params": body_params, "samples": args.samples, "tokens": tokens,
        "seconds": round(seconds, 2), "samples_per_s": round(args.samples / seconds, 1),
        "tokens_per_s": round(tokens_per_s), "achieved_tflops": round(2 * body_params * tokens_per_s / 1e12, 1),
        "mfu": round(2 * body_params * tokens_per_s / (peak * 1e12), 3) if peak else None,
        "alpaca_52k_minutes": round(52002 / (args.samples / seconds) / 60, 1),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 1) if device.type == "cuda" else None,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        from miwv_lib.io import write_json

        write_json(args.out, result)


if __name__ == "__main__":
    main()
