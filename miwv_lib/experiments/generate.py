"""Batched greedy generation with the prompt layout the model was trained and scored on: ``[BOS] prompt`` token IDs,
left-padded so every row's last prompt token sits at the end of the batch, until EOS or ``max_new_tokens``."""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase

from ..data.datasets import InstructionPool
from ..data.models import LoadedModel
from ..data.prompts import DEFAULT_TEMPLATE, TEMPLATES, encode_examples
from ..method.layouts import SpecialTokens
from ..runtime.io import read_jsonl, stable_hash, write_json, write_jsonl
from ..runtime.schema import boolean, check, integer, setting


@dataclass
class GenerateConfig:
    max_new_tokens: int = setting(512, rule=integer(1), help="longest generated answer, in tokens")
    batch_size: int = setting(8, rule=integer(1), help="prompts generated together")
    template: str = setting(DEFAULT_TEMPLATE, choices=TEMPLATES, help="the template the model was fine-tuned with")
    max_prompt_length: int = setting(1024, rule=integer(2))  # longer prompts lose tokens from the left, as in scoring
    progress: bool = setting(True, rule=boolean(), cli=False)

    def __post_init__(self):
        check(self)


def prompt_token_ids(rows: list[dict], tokenizer: PreTrainedTokenizerBase, template: str = DEFAULT_TEMPLATE,
                     max_prompt_length: int = GenerateConfig.max_prompt_length) -> list[list[int]]:
    """``[BOS] prompt`` per row: the scorer's tokenisation with the response left out."""
    special = SpecialTokens.from_tokenizer(tokenizer)
    examples = encode_examples([{**r, "output": ""} for r in rows], tokenizer, template)
    room = max_prompt_length - len(special.prefix)
    return [[*special.prefix, *e.prompt[max(0, len(e.prompt) - room):]] for e in examples]


def _left_padded(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], dtype=torch.long)
    return input_ids, torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], dtype=torch.long)


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    return tokens[:next((i for i, token in enumerate(tokens) if token in stops), len(tokens))]


@contextmanager
def contiguous_head_input(model: torch.nn.Module):
    """Feed the LM head a contiguous copy of its input while generating: ``generate`` hands it ``hidden[:, -1:, :]``, a
    strided view, and with a frozen head weight (every LoRA model's) CPU matmul copies the weight once per row."""
    head = model.get_output_embeddings()
    with (nullcontext() if head is None  # a hook's handle removes it on exit
          else head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]))):
        yield


@contextmanager
def blank_generation_config(model: torch.nn.Module):
    """The model runs ``generate`` with a blank config of its own: ``generate`` fills each setting the caller's config
    leaves unset from it, so a checkpoint's ``repetition_penalty`` or ``suppress_tokens`` would bend greedy decoding."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model  # a LoRA model's own model
    saved, target.generation_config = target.generation_config, GenerationConfig()
    try:
        yield
    finally:
        target.generation_config = saved


@torch.no_grad()
def generate_ids(loaded: LoadedModel, prompts: list[list[int]], config: GenerateConfig | None = None,
                 desc: str = "generate") -> list[list[int]]:
    """Greedy continuations (without the stop token) of token-ID prompts, in input order."""
    config = config or GenerateConfig()
    model, tokenizer = loaded.model, loaded.tokenizer
    # the tokenizer's EOS (what fine-tuning taught), and any the generation config names (chat models' <|im_end|>)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = [int(t) for t in (configured if isinstance(configured, list) else [configured]) if t is not None]
    stops = list(dict.fromkeys([SpecialTokens.from_tokenizer(tokenizer).eos, *configured]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    generation = GenerationConfig(do_sample=False, max_new_tokens=config.max_new_tokens, eos_token_id=stops,
                                  pad_token_id=pad_id, num_beams=1)
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))  # similar lengths pad less
    outputs: list[list[int]] = [[] for _ in prompts]
    model.eval()
    with contiguous_head_input(model), blank_generation_config(model), tqdm(
            total=len(order), desc=desc, unit="prompt", disable=not config.progress, leave=False) as bar:
        for start in range(0, len(order), config.batch_size):
            batch = order[start:start + config.batch_size]
            input_ids, mask = _left_padded([prompts[i] for i in batch], pad_id)
            produced = model.generate(input_ids=input_ids.to(loaded.device), attention_mask=mask.to(loaded.device),
                                      generation_config=generation)
            for row, i in enumerate(batch):
                outputs[i] = _until_stop(produced[row, input_ids.shape[1]:].tolist(), set(stops))
            bar.update(len(batch))
    return outputs


def generate(loaded: LoadedModel, rows: list[dict] | InstructionPool, config: GenerateConfig | None = None,
             desc: str = "generate") -> list[str]:
    """Greedy responses to instruction rows (``instruction`` and optional ``input``), in input order, stripped of the
    whitespace around them (a base model may start with a newline after "### Response:": layout, not content)."""
    config = config or GenerateConfig()
    rows = rows.rows if isinstance(rows, InstructionPool) else rows
    prompts = prompt_token_ids(rows, loaded.tokenizer, config.template, config.max_prompt_length)
    new_tokens = generate_ids(loaded, prompts, config, desc=desc)
    return [loaded.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new_tokens]


def question_text(row: dict) -> str:
    """The instruction as a person reads it: instruction, then the input (if any) after a blank line."""
    return f"{row['instruction']}\n\n{row['input']}" if row.get("input") else row["instruction"]


def generation_records(pool: InstructionPool, outputs: list[str], generator: str, dataset: str) -> list[dict]:
    # AlpacaEval rows name their own source subset (helpful_base, koala, …): keep it for model_outputs.json.
    return [{"id": row["id"], "dataset": dataset, "instruction": row["instruction"], "input": row.get("input", ""),
             "output": output, "generator": generator, "reference": reference,
             "source_dataset": record.get("dataset") if isinstance(record.get("dataset"), str) else dataset}
            for row, record, output, reference in zip(pool.rows, pool.records, outputs, pool.references)]


def write_generations(out_dir: str | Path, records: list[dict], stem: str = "generations") -> tuple[Path, Path]:
    """``<stem>.jsonl`` (everything) and ``<stem>.model_outputs.json`` in AlpacaEval's format."""
    alpaca_eval = [{"instruction": question_text(r), "output": r["output"], "generator": r["generator"],
                    "dataset": r.get("source_dataset") or r["dataset"]} for r in records]
    return (write_jsonl(Path(out_dir) / f"{stem}.jsonl", records),
            write_json(Path(out_dir) / f"{stem}.model_outputs.json", alpaca_eval))


def generate_test_set(loaded: LoadedModel, pool: InstructionPool, out_dir: str | Path, dataset: str,
                      config: GenerateConfig | None = None, generator: str | None = None) -> list[dict]:
    """Generate for every row of a test pool into ``out_dir/<dataset>.jsonl``; an identical earlier run is reused."""
    config = config or GenerateConfig()
    generator = generator or loaded.name
    key = generation_key(loaded.identity, str(loaded.dtype), pool, config, generator)
    if (cached := cached_test_set(out_dir, dataset, key, pool)) is not None:
        return cached
    outputs = generate(loaded, pool, config, desc=f"generate {generator}/{dataset}")
    records = generation_records(pool, outputs, generator, dataset)
    meta = Path(out_dir) / f"{dataset}.meta.json"
    meta.unlink(missing_ok=True)  # a crash before the new meta must not leave the old one vouching for new answers
    write_generations(out_dir, records, stem=dataset)
    write_json(meta, {"fingerprint": stable_hash(key), "key": key, "config": asdict(config)})
    return records


def generation_key(model_identity: str, dtype: str, pool: InstructionPool, config: GenerateConfig,
                   generator: str) -> dict:
    """What a test set's generations depend on; its hash decides whether cached generations are reused."""
    return {"model": model_identity, "data": pool.content_hash, "template": config.template,
            "max_new_tokens": config.max_new_tokens, "max_prompt_length": config.max_prompt_length,
            "dtype": dtype, "generator": generator}


def cached_test_set(out_dir: str | Path, dataset: str, key: dict, pool: InstructionPool) -> list[dict] | None:
    """The generations ``generate_test_set`` wrote under ``key``, or None (no model is needed to ask)."""
    meta, jsonl = Path(out_dir) / f"{dataset}.meta.json", Path(out_dir) / f"{dataset}.jsonl"
    if meta.exists() and jsonl.exists() and json.loads(meta.read_text("utf-8")).get("fingerprint") == stable_hash(key):
        # the key leaves out the references (answers do not depend on them): judge against the pool's current ones
        return [{**r, "reference": ref} for r, ref in zip(read_jsonl(jsonl), pool.references)]
    return None
