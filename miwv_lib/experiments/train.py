"""Fine-tuning θ on a (selected) pool: LoRA by default, full fine-tuning as an option. Labels cover exactly what the
scorer measures (``response [EOS]`` of its zero-shot layout), so "what MIWV scored" and "what training optimises" cannot
drift. Defaults follow Stanford Alpaca (3 epochs, cosine, 3 % warm-up, max length 512) with a LoRA-sized learning rate
and an effective batch of 16. CPU runs are slow (an hour for 400 rows on 2 cores): ``response_only_loss`` (1.36× the
speed, benchmarks/RESULTS.md) and resumable ``save_steps`` help."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import closing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase, Trainer, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import PrinterCallback, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint, set_seed

from ..data.datasets import InstructionPool
from ..data.models import DEFAULT_MODEL, LoadedModel, ModelLoadError, bf16_supported, load_model, resolve_device
from ..data.prompts import DEFAULT_TEMPLATE, TEMPLATES, encode_examples
from ..method.layouts import SpecialTokens, max_length_rule, training_sequence
from ..method.losses import logit_transform
from ..runtime.io import atomic_open, stable_hash, write_json
from ..runtime.runs import check_fingerprint, environment_info, now
from ..runtime.schema import boolean, check, integer, number, setting, text

TRAIN_FORMAT_VERSION = 1  # bump when what a saved model directory holds changes
IGNORE_INDEX = -100  # the label value torch's cross_entropy (and every HF model) skips
ADAPTER_DIR, FULL_MODEL_DIR = "adapter", "model"
CONFIG_FILE, LOSS_FILE, MANIFEST_FILE = "train_config.json", "loss.csv", "manifest.json"
CHECKPOINT_DIR = "checkpoints"  # Trainer checkpoints of a run in progress (save_steps > 0)


@dataclass
class TrainConfig:
    model: str = setting(DEFAULT_MODEL, rule=text(), help="the base model (as for 'score')")
    method: str = setting("lora", choices=("lora", "full"), help="full: full fine-tuning (a GPU, fp32 master weights)")
    template: str = setting(DEFAULT_TEMPLATE, choices=TEMPLATES, help="must match the scoring template")
    max_length: int = setting(512, rule=lambda v: max_length_rule(v, allow_auto=False),
                              help="longest training sequence in tokens (Alpaca's model_max_length)")
    epochs: float = setting(3.0, rule=number(0, above=True))
    learning_rate: float | None = setting(None, rule=number(0, above=True, optional=True), parse=float,
                                          help="default: 2e-4 (LoRA), 2e-5 (full)")
    # transformers' schedulers that need no settings of their own (a plateau needs evaluation; a floor, its value)
    lr_scheduler: str = setting("cosine", choices=("linear", "cosine", "cosine_with_restarts", "polynomial",
                                                   "constant", "constant_with_warmup", "inverse_sqrt"))
    warmup_ratio: float = setting(0.03, rule=number(0, 1, below=True))
    weight_decay: float = setting(0.0, rule=number(0))
    batch_size: int = setting(4, rule=integer(1), help="per device")
    gradient_accumulation_steps: int = setting(4, rule=integer(1), flag="--grad-accum", help="effective batch: 4 × 4")
    max_steps: int = setting(-1, rule=lambda v: integer(-1)(v) or ("expected -1 or ≥ 1, got 0" if v == 0 else None),
                             help="> 0 overrides --epochs (smoke runs, throughput); -1: train for --epochs")
    lora_r: int = setting(16, rule=integer(1))
    lora_alpha: int = setting(32, rule=integer(1))
    lora_dropout: float = setting(0.05, rule=number(0, 1, below=True))
    lora_target_modules: str | list[str] = setting("all-linear", cli=False)  # every linear projection but the head
    bf16: bool | None = setting(None, rule=boolean(optional=True), flag="--no-bf16",
                                help="train in float32 even where bf16 is supported (default: bf16 where the "
                                     "hardware has it: CUDA with bf16, CPUs with AVX512-BF16/AMX)")
    dtype: str = setting("auto", choices=("auto", "float32", "bfloat16", "float16"),
                         help="weights as loaded; auto: bf16 frozen base for LoRA, fp32 master weights for full")
    device: str = setting("auto", rule=text())
    gradient_checkpointing: bool = setting(False, rule=boolean(), help="trade compute for memory on large models")
    sampling: str = setting("random", choices=("random", "sequential", "group_by_length"),
                            help="group_by_length pads less but is not Alpaca's order")
    seed: int = setting(42, rule=integer(0), flag="--train-seed", help="LoRA initialisation and data order")
    logging_steps: int = setting(1, rule=integer(1), cli=False)
    progress: bool = setting(True, rule=boolean(), cli=False)
    response_only_loss: bool = setting(True, rule=boolean(), cli=False)  # False: HF's loss over all logits (slower)
    save_steps: int = setting(0, rule=integer(0), help="> 0: a checkpoint every N optimizer steps, to resume from")

    def __post_init__(self):
        check(self)

    def resolved_learning_rate(self) -> float:
        return self.learning_rate if self.learning_rate is not None else 2e-4 if self.method == "lora" else 2e-5


# Not fingerprinted: they do not change the weights (response_only_loss: the same loss; save_steps: where to resume)
_NOT_FINGERPRINTED = {"progress", "logging_steps", "device", "response_only_loss", "save_steps"}


@dataclass
class TrainResult:
    name: str
    out_dir: Path
    fingerprint: str
    n_examples: int
    train_loss: float | None
    steps: int
    seconds: float | None
    tokens_per_second: float | None
    skipped: bool = False  # True when an identical model was already in out_dir
    resumed_from_step: int = 0  # > 0: a killed run was resumed from its checkpoint at this step

    @property
    def model_dir(self) -> Path:
        adapter = self.out_dir / ADAPTER_DIR
        return adapter if adapter.exists() else self.out_dir / FULL_MODEL_DIR


def build_features(rows: list[dict], tokenizer: PreTrainedTokenizerBase, template: str,
                   max_length: int) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """``input_ids``/``labels`` per row (labels are IGNORE_INDEX except on ``response [EOS]``), and how many rows
    ``max_length`` cut: ``{"response": rows that lost their response's end, "prompt": rows that lost their prompt's
    start}``."""
    special = SpecialTokens.from_tokenizer(tokenizer)
    features, cut = [], {"response": 0, "prompt": 0}
    for example in encode_examples(rows, tokenizer, template):
        sequence, truncation = training_sequence(example, special, max_length)
        ids, n_context = list(sequence.input_ids), len(sequence.input_ids) - sequence.n_targets
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": [IGNORE_INDEX] * n_context + ids[n_context:]})
        cut = {part: n + bool(getattr(truncation, part)) for part, n in cut.items()}
    return features, cut


def _right_padding_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    # A copy, so the caller's tokenizer keeps its padding side; EOS may double as PAD (masked by attention).
    tokenizer = copy.copy(tokenizer)
    tokenizer.padding_side = "right"
    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)


def _prepare_model(model, config: TrainConfig):
    """``model`` made trainable: LoRA-wrapped (peft injects layers in place), or whole for full fine-tuning."""
    model.config.use_cache = False  # the KV cache is useless (and warns) during training
    if config.method == "full":
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.lora_target_modules, bias="none", task_type="CAUSAL_LM")
    set_seed(config.seed)  # LoRA's A matrices are random: same seed, same initial adapter
    return get_peft_model(model, lora)


def response_only_loss(model, inputs: dict[str, torch.Tensor],
                       num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """HF's ``ForCausalLMLoss`` of ``model(**inputs)``, with the LM head (and soft-capping) only where a label is
    predicted; the sum over ``num_items_in_batch`` when given (HF's accumulation-correct normalisation), else a mean."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps it
    features = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = causal_lm.get_decoder()(**features, use_cache=False).last_hidden_state
    targets = inputs["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    # float32 as in ForCausalLMLoss: the soft-max over a large vocabulary loses too much in bf16
    logits = logit_transform(causal_lm)(causal_lm.get_output_embeddings()(hidden[:, :-1][keep])).float()
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets[keep])
    total = F.cross_entropy(logits, targets[keep], reduction="sum")
    return total / (num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)


class ResponseOnlyLossTrainer(Trainer):
    """A ``Trainer`` whose loss builds no logits for prompt or padding positions (HF upcasts all of them to float32:
    with Gemma's 262k-token vocabulary that tensor dominates CPU training). ``num_items_in_batch`` is used exactly when
    the stock ``compute_loss`` would pass it, so gradient-accumulation scaling and the logged loss are unchanged."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        # the stock loss where this shortcut does not apply (a distributed wrapper must see the forward)
        if (return_outputs or "labels" not in inputs or self.label_smoother is not None
                or self.compute_loss_func is not None or unwrapped is not model):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        num_items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        # accelerate autocasts model.forward under bf16; the decoder and head are called directly here
        with self.accelerator.autocast():
            loss = response_only_loss(model, inputs, num_items)
        if self.args.average_tokens_across_devices and num_items is not None:  # as Trainer.compute_loss does
            loss = loss * (self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1
                           else self.args.n_gpu)
        return loss


class LossCurveCallback(TrainerCallback):
    """A tqdm bar with loss and tokens/s, and the rows of ``loss.csv`` (also kept in ``state.log_history``, which
    checkpoints save, so a resumed run continues the curve); it vetoes a checkpoint of the last step."""

    CURVE_KEY = "miwv_loss_curve"  # our row's key in a log history entry

    def __init__(self, progress: bool = True, desc: str = "train"):
        self.progress, self.desc, self.rows, self.bar, self.start = progress, desc, [], None, 0.0
        self.seconds_before, self.tokens_at_start, self.resumed_from_step = 0.0, 0, 0  # of earlier sessions

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self.rows = [entry[self.CURVE_KEY] for entry in state.log_history if self.CURVE_KEY in entry]
        self.seconds_before = self.rows[-1]["seconds"] if self.rows else 0.0
        self.tokens_at_start, self.resumed_from_step = state.num_input_tokens_seen, state.global_step
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc, unit="step",
                        disable=not self.progress)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)
        # The model is saved right after the last step, and Trainer resumed from a finished checkpoint would train one
        # step too many; this runs after DefaultFlowCallback, which asks for that final save.
        if state.global_step >= state.max_steps:
            control.should_save = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" not in (logs or {}):  # the final summary log has train_loss instead
            return
        seconds = time.perf_counter() - self.start
        tokens = state.num_input_tokens_seen - self.tokens_at_start
        speed = tokens / seconds if tokens and seconds > 0 else None
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "loss": logs["loss"],
               "learning_rate": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
               "tokens_seen": state.num_input_tokens_seen, "seconds": round(self.seconds_before + seconds, 3),
               "tokens_per_second": round(speed, 1) if speed else None}
        self.rows.append(row)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1][self.CURVE_KEY] = row  # Trainer.log appended this step's entry just before on_log
        self.bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{speed:.0f}" if speed else "-")

    def close(self) -> None:  # not on_train_end: Trainer does not call it when interrupted
        if self.bar is not None:
            self.bar.close()


def write_loss_csv(path: Path, rows: list[dict]) -> None:
    columns = ["step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_seen", "seconds", "tokens_per_second"]
    with atomic_open(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def read_loss_csv(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
                for row in csv.DictReader(handle)]


def rows_fingerprint(rows: list[dict]) -> str:
    """The training rows, in order, as a model's fingerprint knows them."""
    return stable_hash([(r.get("id"), r["instruction"], r.get("input", ""), r["output"]) for r in rows])


def train_fingerprint_inputs(config: TrainConfig, base: LoadedModel, rows: list[dict], use_bf16: bool,
                             rows_cut: dict[str, int]) -> dict:
    """Everything the trained weights depend on; ``auto`` settings enter as what they resolved to here."""
    settings = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in _NOT_FINGERPRINTED}
    settings |= {"learning_rate": config.resolved_learning_rate(), "bf16": use_bf16,
                 "dtype": str(base.dtype).removeprefix("torch.")}
    # Rows cut at max_length enter only when there are some: before 2026-12-05 they lost their prompt's start, not
    # their response's end, so a model trained on them then is not this one; uncut data gives the same model as then.
    return {"base_model": base.identity, "config": settings, "data": rows_fingerprint(rows), "rows": len(rows),
            "layout_version": SpecialTokens.from_tokenizer(base.tokenizer).layout_version,
            "format_version": TRAIN_FORMAT_VERSION, **({"rows_cut": rows_cut} if any(rows_cut.values()) else {})}


def _training_arguments(config: TrainConfig, device: torch.device, use_bf16: bool,
                        output_dir: str) -> TrainingArguments:
    # Checkpoints hold the adapter (or model), optimizer, scheduler, RNG states and log history: all a resume needs.
    saving = ({"save_strategy": "steps", "save_steps": config.save_steps, "save_total_limit": 1}
              if config.save_steps > 0 else {"save_strategy": "no"})
    return TrainingArguments(
        output_dir=output_dir, num_train_epochs=config.epochs, max_steps=config.max_steps,
        learning_rate=config.resolved_learning_rate(), lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        weight_decay=config.weight_decay, per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, bf16=use_bf16,
        use_cpu=device.type == "cpu", seed=config.seed, data_seed=config.seed, logging_steps=config.logging_steps,
        **saving, report_to="none", disable_tqdm=True, include_num_input_tokens_seen="non_padding",
        activation_checkpointing=config.gradient_checkpointing,
        # non-reentrant checkpointing works with frozen embeddings (LoRA) without forcing input gradients
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        train_sampling_strategy=config.sampling,
        dataloader_pin_memory=device.type == "cuda", remove_unused_columns=False)


def _save_atomically(out_dir: Path, name: str, save) -> None:
    """``save(tmp_dir)`` then rename: a killed run never leaves a half-written adapter that looks finished."""
    target = out_dir / name
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=out_dir, ignore_cleanup_errors=True) as tmp:
        save(Path(tmp))
        Path(tmp).chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # nothing is left for the context to clean up, unless save failed


def _resume_checkpoint(out_dir: Path, previous: dict | None, overwrite: bool) -> str | None:
    """The newest whole checkpoint a killed run of this very training left (``previous`` has this fingerprint, and
    "running" is this training unfinished), or None: then none is kept."""
    checkpoints = out_dir / CHECKPOINT_DIR
    if not overwrite and previous and previous.get("status") == "running":
        while checkpoints.is_dir() and (last := get_last_checkpoint(str(checkpoints))) is not None:
            if (Path(last) / TRAINER_STATE_NAME).exists():  # Trainer writes its state file last
                return last
            shutil.rmtree(last)  # killed while saving: the previous checkpoint (if any) is still whole
    # a fresh start never resumes from another run's (or an overwritten run's) checkpoints
    shutil.rmtree(checkpoints, ignore_errors=True)
    return None


def _whole_run_loss(curve: LossCurveCallback, session_loss: float, steps: int) -> float:
    """Mean loss per step over all sessions (Trainer's ``training_loss`` covers only the steps after a resume).
    Earlier sessions enter through their logged rows: exact when ``save_steps`` is a multiple of ``logging_steps``."""
    before = [r for r in curve.rows if r["step"] <= curve.resumed_from_step]  # none unless resumed: steps start at 1
    if not before:
        return session_loss
    total = sum(row["loss"] * (row["step"] - start) for row, start in zip(before, [0] + [r["step"] for r in before]))
    session_steps = steps - curve.resumed_from_step
    return (total + session_loss * session_steps) / (before[-1]["step"] + session_steps)


def _result_from_manifest(name: str, out_dir: Path, manifest: dict, **overrides) -> TrainResult:
    result = TrainResult(name=name, out_dir=out_dir, fingerprint=manifest["fingerprint"], n_examples=manifest["rows"],
                         train_loss=manifest.get("train_loss"), steps=manifest.get("steps", 0),
                         seconds=manifest.get("seconds"), tokens_per_second=manifest.get("tokens_per_second"))
    return replace(result, **overrides)


def train_model(rows: list[dict] | InstructionPool, out_dir: str | Path, config: TrainConfig | None = None, *,
                base: LoadedModel | None = None, name: str | None = None, overwrite: bool = False) -> TrainResult:
    """Fine-tune on ``rows`` (from ``base``, copied, or ``config.model``) and save the adapter (or full model), config
    and loss curve into ``out_dir``. An ``out_dir`` that already holds the same training is skipped."""
    config = config or TrainConfig()
    rows = rows.rows if isinstance(rows, InstructionPool) else list(rows)
    if not rows:
        raise ValueError("nothing to train on: 0 rows")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or out_dir.name
    device = resolve_device(config.device if base is None else base.device)
    use_bf16 = bf16_supported(device) if config.bf16 is None else config.bf16
    borrowed = base is not None  # the caller's model is copied before training, never modified
    # LoRA: the base is frozen, so bf16 weights lose nothing and halve memory; full FT keeps fp32 masters
    auto_dtype = "bfloat16" if config.method == "lora" and use_bf16 else "float32"
    base = base or load_model(config.model, dtype=auto_dtype if config.dtype == "auto" else config.dtype, device=device)

    features, rows_cut = build_features(rows, base.tokenizer, config.template, config.max_length)
    inputs = train_fingerprint_inputs(config, base, rows, use_bf16, rows_cut)
    manifest = {"status": "running", "fingerprint": stable_hash(inputs), "fingerprint_inputs": inputs, "name": name,
                "base_model": base.name, "started": now(), "environment": environment_info()}
    previous = check_fingerprint(out_dir / MANIFEST_FILE, manifest["fingerprint"], inputs, overwrite=overwrite)
    if previous and previous.get("status") == "complete":
        return _result_from_manifest(name, out_dir, previous, skipped=True)
    resume_from = _resume_checkpoint(out_dir, previous, overwrite)
    if resume_from:
        manifest |= {"started": previous.get("started", manifest["started"]), "resumed": now()}
    write_json(out_dir / MANIFEST_FILE, manifest)

    model = _prepare_model(copy.deepcopy(base.model) if borrowed else base.model, config)
    loss_rows, run = _fit(model, features, base, config, device, use_bf16, out_dir, name, resume_from)
    lora = config.method == "lora"
    _save_atomically(out_dir, ADAPTER_DIR if lora else FULL_MODEL_DIR, model.save_pretrained if lora
                     else lambda d: (model.save_pretrained(d), base.tokenizer.save_pretrained(d)))
    write_loss_csv(out_dir / LOSS_FILE, loss_rows)
    write_json(out_dir / CONFIG_FILE, asdict(config) | {
        "learning_rate": config.resolved_learning_rate(), "bf16": use_bf16,
        "weights_dtype": str(base.dtype).removeprefix("torch."), "base_model_identity": base.identity,
        "n_examples": len(rows)})
    # complete only once everything is saved: then no checkpoint is left to resume
    manifest.update(status="complete", finished=now(), rows=len(rows), rows_cut=rows_cut, **run)
    manifest["seconds"] = round(run["seconds"], 2)  # the returned result keeps them unrounded
    write_json(out_dir / MANIFEST_FILE, manifest)
    shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)
    return _result_from_manifest(name, out_dir, manifest, seconds=run["seconds"],
                                 resumed_from_step=run["resumed_from_step"])


def _fit(model, features: list[dict], base: LoadedModel, config: TrainConfig, device: torch.device, use_bf16: bool,
         out_dir: Path, name: str, resume_from: str | None) -> tuple[list[dict], dict]:
    """Train with ``Trainer``: the rows of the loss curve, and the run's figures for its manifest."""
    curve = LossCurveCallback(progress=config.progress, desc=f"train {name}")
    trainer_class = ResponseOnlyLossTrainer if config.response_only_loss else Trainer
    with tempfile.TemporaryDirectory(prefix="miwv-trainer-") as scratch:
        # checkpoints go where a restarted run finds them; without them Trainer still wants a directory
        output_dir = str(out_dir / CHECKPOINT_DIR) if config.save_steps > 0 else scratch
        trainer = trainer_class(model=model, args=_training_arguments(config, device, use_bf16, output_dir),
                                train_dataset=features, data_collator=_right_padding_collator(base.tokenizer),
                                processing_class=base.tokenizer, callbacks=[curve])
        trainer.remove_callback(PrinterCallback)  # our bar shows the loss; don't print every log dict (disable_tqdm)
        t0 = time.perf_counter()
        with closing(curve):  # the bar is closed before the command's last line, also when interrupted
            output = trainer.train(resume_from_checkpoint=resume_from)
        seconds, tokens = time.perf_counter() - t0, trainer.state.num_input_tokens_seen
    session_tokens = tokens - curve.tokens_at_start  # a resumed session did not process the checkpoint's
    # seconds: the whole run's training time (earlier sessions up to their checkpoint); tokens/s: this session's
    return curve.rows, {
        "steps": output.global_step, "train_loss": _whole_run_loss(curve, output.training_loss, output.global_step),
        "seconds": curve.seconds_before + seconds, "session_seconds": round(seconds, 2), "tokens_seen": tokens,
        "tokens_per_second": round(session_tokens / seconds, 1) if session_tokens and seconds else None,
        "resumed_from_step": curve.resumed_from_step}


def _saved_run(model_dir: Path) -> tuple[dict, str]:
    """The run's saved config, and the identity ``load_trained`` gives its model."""
    saved = json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    fingerprint = json.loads((model_dir / MANIFEST_FILE).read_text(encoding="utf-8"))["fingerprint"]
    return saved, f"{saved['base_model_identity']}+{saved['method']}:{fingerprint}"


def trained_model_signature(model_dir: str | Path) -> tuple[str, str]:
    """``(identity, dtype)`` that ``load_trained(model_dir)`` reports, from the run's records alone: enough to find
    cached generations of a model whose weights are not on this machine (a study continued in a fresh checkout)."""
    saved, identity = _saved_run(Path(model_dir))
    return identity, f"torch.{saved['weights_dtype']}"


def has_weights(model_dir: str | Path) -> bool:
    return (Path(model_dir) / ADAPTER_DIR).is_dir() or (Path(model_dir) / FULL_MODEL_DIR).is_dir()


def load_trained(model_dir: str | Path, *, dtype: str | None = None, device: str = "auto") -> LoadedModel:
    """A fine-tuned model from a ``train_model`` directory, in eval mode and (by default) the dtype it was trained in.
    LoRA adapters stay unmerged (merging a small update into bf16 weights would round much of it away), inside the base
    architecture, so the scorer's ``model.base_model`` / ``get_output_embeddings()`` work unchanged."""
    model_dir = Path(model_dir)
    saved, identity = _saved_run(model_dir)
    dtype = dtype or saved["weights_dtype"]
    if (model_dir / FULL_MODEL_DIR).exists():
        loaded = load_model(str(model_dir / FULL_MODEL_DIR), dtype=dtype, device=device)
    else:
        from peft import PeftModel

        loaded = load_model(saved["model"], dtype=dtype, device=device)
        if loaded.identity != saved["base_model_identity"]:  # the adapter would be applied to other weights, silently
            raise ModelLoadError(f"{model_dir} was trained on {saved['base_model_identity']}, but {saved['model']} is "
                                 f"now {loaded.identity}: train it again")
        loaded.model = PeftModel.from_pretrained(loaded.model, str(model_dir / ADAPTER_DIR)).get_base_model().eval()
    loaded.name, loaded.identity = model_dir.name, identity
    return loaded


def estimated_steps(n_rows: int, config: TrainConfig) -> int:
    if config.max_steps > 0:
        return config.max_steps
    per_epoch = math.ceil(math.ceil(n_rows / config.batch_size) / config.gradient_accumulation_steps)
    return math.ceil(per_epoch * config.epochs)
