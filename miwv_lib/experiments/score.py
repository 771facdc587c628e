"""The ``score`` stage: MIWV (and IFD) of every row of a pool, into ``out_dir/scores.jsonl``. Kill-safe: finished chunks
are appended to a partial file per rank, the manifest's fingerprint ties the directory to its settings, and
``scores.jsonl`` appears only when every row is scored."""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..data.datasets import InstructionPool, format_source_text
from ..data.models import (
    DEFAULT_EMBEDDER,
    DEFAULT_MODEL,
    SELF_EMBEDDER,
    EmbedderError,
    LoadedModel,
    ModelLoadError,
    embedder_identity,
    load_embedder,
    load_model,
)
from ..data.prompts import DEFAULT_TEMPLATE, TEMPLATES, encode_examples
from ..method.importance import PACK_TOKENS, _score_row, chunk_plan, plan_passes
from ..method.layouts import (
    AUTO_MAX_LENGTH,
    EncodedExample,
    SpecialTokens,
    context_window,
    max_length_rule,
    one_shot_lengths,
    parse_max_length,
    resolve_max_length,
)
from ..method.losses import EngineConfig, compile_body, span_losses, supports_branches
from ..method.neighbors import NonFiniteEmbeddings, embed_texts, model_embeddings, nearest_neighbors
from ..runtime.distributed import Shard, barrier, from_main, init_from_env
from ..runtime.io import file_sha256, read_jsonl, stable_hash, write_json, write_jsonl
from ..runtime.runs import FingerprintMismatch, PartialResults, check_fingerprint, environment_info, now, run_lock
from ..runtime.schema import boolean, check, integer, setting, text
from .select import scores_changed

PARTIAL_FILE = "scores.partial.jsonl"  # rank 0's finished chunks; rank r writes scores.partial.rank{r}.jsonl
RUN_FILES = ("manifest.json", "neighbors.json", "scores.jsonl")  # and the partial files: what 'score' keeps


def is_run_file(path: str | Path, run_dir: str | Path) -> bool:
    """Whether ``path`` is, or would be, a file that 'score' keeps in ``run_dir``."""
    path = Path(path).resolve()
    return path.parent == Path(run_dir).resolve() and (path.name in RUN_FILES or path.name.startswith("scores.partial"))


@dataclass
class ScoreConfig:
    model: str = setting(DEFAULT_MODEL, rule=text(), help="built-in name, local directory, .gguf file or hub id")
    embedder: str = setting(DEFAULT_EMBEDDER, rule=text(), help="sentence-transformers name/path, or 'self'")
    template: str = setting(DEFAULT_TEMPLATE, choices=TEMPLATES)
    max_length: int | str = setting(
        AUTO_MAX_LENGTH, rule=max_length_rule, parse=parse_max_length,
        help="longest sequence in tokens; auto (default): the pool's longest one-shot sequence, capped at the "
             "model's context window, so nothing is cut")
    dtype: str = setting("auto", choices=("auto", "float32", "bfloat16"),
                         help="auto = bf16 where the hardware computes it natively (recent GPUs, AVX512-BF16 or "
                              "AMX CPUs), float16 on older GPUs, else float32; float32 = exact mode")
    device: str = setting("auto", rule=text())
    batch_size: int = setting(EngineConfig.batch_size, rule=integer(1), help="most sequences in one forward pass")
    max_tokens_per_batch: int = setting(EngineConfig.max_tokens_per_batch, rule=integer(1),
                                        help="padded tokens per forward pass (memory bound)")
    compute_ifd: bool = setting(True, rule=boolean(), flag="--no-ifd",
                                help="skip the unconditional pass that IFD needs")
    share_prefix: bool = setting(True, rule=boolean(), flag="--no-share-prefix",
                                 help="a pass for every row, instead of one pass for the rows that share a neighbour "
                                      "(its example once, each row's own tokens after it; the same losses)")
    chunk_rows: int = setting(64, rule=integer(1), help="advanced: rows per checkpoint in scores.partial.jsonl (at "
                              "most this much work is lost when the job is killed; a resumed run must use the same "
                              "value to be byte-identical)")
    torch_compile: bool = setting(
        False, rule=boolean(), help="torch.compile the model body: MFU 0.53 instead of 0.42 on a GPU (7B, "
                                    "H200), after a minute of compiling; not part of the configuration")
    progress: bool = setting(True, rule=boolean(), cli=False)

    def __post_init__(self):
        check(self)


def find_neighbors(pool: InstructionPool, embedder: str, loaded: LoadedModel | None = None,
                   progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Nearest other sample of every row by cosine similarity of instruction+input embeddings."""
    texts = [format_source_text(row) for row in pool.rows]
    if embedder == SELF_EMBEDDER:
        if loaded is None:
            raise ValueError("embedder='self' needs the scored model")
        vectors = model_embeddings(loaded.model, loaded.tokenizer, texts, progress=progress)
    else:
        vectors = embed_texts(texts, load_embedder(embedder), progress=progress)
    try:
        return nearest_neighbors(vectors)
    except NonFiniteEmbeddings as exc:
        first, more = exc.rows[0], f" (and {len(exc.rows) - 1} more rows)" if len(exc.rows) > 1 else ""
        raise EmbedderError(f"--embedder {embedder}: {pool.source}, row {first} (id {pool.ids[first]}), fields "
                            f"'instruction' and 'input'{more}: the embedding is not finite (NaN or inf), so no "
                            f"neighbour is right; the embedder overflows or its weights are damaged (with --embedder "
                            f"{SELF_EMBEDDER}, try --dtype float32)") from None


def _cached_neighbors(path: Path, key: dict, rows: int, compute) -> tuple[np.ndarray, np.ndarray]:
    """The neighbours saved in ``path`` for ``key``, else ``compute()``'s, saved there (they are deterministic); the
    checksum of the saved numbers catches a hand edit that stays valid JSON (another row's index, say)."""
    if path.exists():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("key") == key:  # another key is another setting's neighbours, not damage
                numbers = {name: saved[name] for name in ("neighbor_index", "neighbor_similarity")}
                index = np.asarray(numbers["neighbor_index"], dtype=np.int64)
                similarity = np.asarray(numbers["neighbor_similarity"], dtype=np.float32)
                if (saved.get("checksum") == stable_hash(numbers) and index.shape == similarity.shape == (rows,)
                        and ((index >= 0) & (index < rows) & (index != np.arange(rows))).all()):
                    return index, similarity
                raise ValueError("checksum, shape or an index is wrong")
        except (OSError, ValueError, TypeError, KeyError, AttributeError, OverflowError):
            warnings.warn(f"{path} is damaged; the neighbours are computed again", stacklevel=2)
    index, similarity = compute()
    index, similarity = np.asarray(index, dtype=np.int64), np.asarray(similarity, dtype=np.float32)
    numbers = {"neighbor_index": index.tolist(), "neighbor_similarity": similarity.tolist()}
    write_json(path, {"key": key, **numbers, "checksum": stable_hash(numbers)})
    return index, similarity


def score_rows(loaded: LoadedModel, examples: list[EncodedExample], ids: list[str], indices: list[int],
               neighbor_index: np.ndarray, neighbor_similarity: np.ndarray, config: ScoreConfig) -> list[dict]:
    """Zero-shot, one-shot (and unconditional) losses of the rows ``indices``, batched together."""
    special = SpecialTokens.from_tokenizer(loaded.tokenizer)
    # "auto" cuts only what exceeds the context window, so resolving it per chunk gives the pool's numbers.
    max_length = resolve_max_length(config.max_length, one_shot_lengths(examples, neighbor_index, special, indices),
                                    loaded.model)
    pack_tokens = PACK_TOKENS if config.share_prefix and supports_branches(loaded.model) else 0
    plan = plan_passes(examples, indices, neighbor_index, special, max_length, config.compute_ifd, pack_tokens)
    engine = EngineConfig(batch_size=config.batch_size, max_tokens_per_batch=config.max_tokens_per_batch,
                          progress=config.progress)
    losses = span_losses(loaded.model, plan.sequences, loaded.tokenizer.pad_token_id, engine)

    def loss(kind: str, i: int) -> float:
        sequence, span = plan.where.get((kind, i), (None, None))
        return math.nan if sequence is None else losses[sequence][span]

    return [_score_row(i, int(neighbor_index[i]), ids, examples, plan.one_shot[i], plan.cuts[i], neighbor_similarity[i],
                       loss("zero", i), loss("one", i), loss("uncond", i), config.compute_ifd) for i in indices]


@dataclass
class _Run:
    pool: InstructionPool
    out_dir: Path
    config: ScoreConfig
    loaded: LoadedModel
    shard: Shard

    @property
    def partials(self) -> list[Path]:
        """Every partial file in the directory, of any earlier world size too."""
        return sorted(self.out_dir.glob("scores.partial*.jsonl"))

    def done(self, repair: bool = False) -> dict[int, dict]:
        """Rows already scored. Only rank 0, before any rank appends, may ``repair`` (cut torn tails)."""
        return {i: row for path in self.partials for i, row in PartialResults(path).load(repair=repair).items()}


def _check_model_fits(config: ScoreConfig, loaded: LoadedModel) -> None:
    """Settings the loaded model cannot honour, refused before any run file is written."""
    if config.template == "chat" and not getattr(loaded.tokenizer, "chat_template", None):
        raise ModelLoadError(f"{config.model}: --template chat needs a chat template, and this model's tokenizer has "
                             "none; use --template alpaca or plain")
    window = context_window(loaded.model)
    if window and config.max_length != AUTO_MAX_LENGTH and config.max_length > window:
        raise ModelLoadError(f"{config.model}: --max-length {config.max_length} is beyond the model's context window "
                             f"({window} tokens), where losses look right and are not; use at most {window}, or auto")


def score_pool(pool: InstructionPool, out_dir: str | Path, config: ScoreConfig | None = None, *,
               loaded: LoadedModel | None = None, overwrite: bool = False) -> list[dict]:
    """Score every row of ``pool`` into ``out_dir/scores.jsonl`` (+ ``manifest.json``), resuming if possible. Under
    ``torchrun`` each rank scores every world_size-th chunk and rank 0 merges (see ``distributed``)."""
    shard, out_dir, config = init_from_env(), Path(out_dir), config or ScoreConfig()
    # One scoring run per directory, whoever starts it (the CLI, a notebook, a study, Python): two would merge each
    # other's rows. The ranks of one torchrun share it on purpose, so rank 0 alone holds the lock.
    with run_lock(out_dir) if shard.is_main else contextlib.nullcontext():
        loaded = loaded or load_model(config.model, dtype=config.dtype, device=config.device)
        _check_model_fits(config, loaded)
        if config.torch_compile:
            compile_body(loaded.model)
        run = _Run(pool, out_dir, config, loaded, shard)
        # Rank 0 alone checks the directory, writes the manifest, searches neighbours and repairs torn lines.
        status = from_main(shard, _start(run, overwrite) if shard.is_main else None)
        if status["error"] is not None:
            raise status["error"]
        if not status["finished"]:
            max_length, seconds, todo = _score_missing_chunks(run, *status["neighbors"])
            barrier(shard)
            if shard.is_main:
                _finish(run, status["manifest"], max_length, seconds, todo)
            barrier(shard)
        return read_jsonl(out_dir / "scores.jsonl")


def _start(run: _Run, overwrite: bool) -> dict:
    """Rank 0: refuse another configuration's directory, then the manifest and the neighbours; never raises."""
    status: dict = {"error": None, "finished": False, "manifest": {}}
    try:
        config, loaded = run.config, run.loaded  # the inputs: all that the numbers depend on (not the batch size)
        inputs = {"model": loaded.identity, "template": config.template, "embedder": embedder_identity(config.embedder),
                  "max_length": config.max_length, "dtype": str(loaded.dtype).removeprefix("torch."),
                  "ifd": config.compute_ifd, "data": run.pool.content_hash, "rows": len(run.pool),
                  "layout_version": SpecialTokens.from_tokenizer(loaded.tokenizer).layout_version}
        fingerprint = stable_hash(inputs)
        previous = check_fingerprint(run.out_dir / "manifest.json", fingerprint, inputs, overwrite=overwrite)
        scores_path = run.out_dir / "scores.jsonl"
        status["finished"] = bool(previous and previous.get("status") == "complete" and scores_path.exists())
        if status["finished"]:
            if scores_changed(scores_path, previous):  # a row lost or a number edited is an error, not a result
                raise FingerprintMismatch(
                    f"{scores_path} was changed after the run finished (its checksum differs from the one in "
                    f"{run.out_dir / 'manifest.json'}): restore it, or score again with --overwrite")
            return status
        if previous is None:  # a new run, or an overwrite: drop what an older configuration left
            for old in [*run.partials, scores_path]:
                old.unlink(missing_ok=True)
        status["manifest"] = manifest = {
            "status": "running", "fingerprint": fingerprint, "fingerprint_inputs": inputs,
            "config": asdict(config), "data_source": run.pool.source, "started": now(),
            "world_size": run.shard.world_size, "environment": environment_info()}
        write_json(run.out_dir / "manifest.json", manifest)
        t0 = time.perf_counter()
        own = config.embedder == SELF_EMBEDDER  # the model's hidden states: its weights and their dtype
        key = {"embedder": inputs["embedder"], "data": run.pool.content_hash, "model": loaded.identity if own else None,
               **({"dtype": inputs["dtype"]} if own else {})}
        status["neighbors"] = _cached_neighbors(  # broadcast to every rank with the status
            run.out_dir / "neighbors.json", key, len(run.pool),
            lambda: find_neighbors(run.pool, config.embedder, loaded, progress=config.progress))
        manifest["seconds_neighbors"] = round(time.perf_counter() - t0, 2)
        run.done(repair=True)
    except Exception as exc:  # noqa: BLE001 - raised on every rank by score_pool
        status["error"] = exc
    return status


def _score_missing_chunks(run: _Run, neighbor_index: np.ndarray, neighbor_similarity: np.ndarray) -> tuple:
    """This rank's unfinished chunks, appended to its partial file; returns (max length, seconds, rows to do)."""
    examples = encode_examples(run.pool.rows, run.loaded.tokenizer, run.config.template)
    special = SpecialTokens.from_tokenizer(run.loaded.tokenizer)
    max_length = resolve_max_length(run.config.max_length, one_shot_lengths(examples, neighbor_index, special),
                                    run.loaded.model)
    config, ids = replace(run.config, max_length=max_length), run.pool.ids
    mine = PartialResults(run.out_dir / (PARTIAL_FILE if run.shard.is_main
                                         else f"scores.partial.rank{run.shard.rank}.jsonl"))
    done = run.done()
    # A chunk is scored whole even if a crash left part of it on disk: its batches stay the same.
    my_chunks = [chunk for number, chunk in enumerate(chunk_plan(neighbor_index, config.chunk_rows))
                 if run.shard.owns(number) and any(i not in done for i in chunk)]
    world = run.shard.world_size
    label = "MIWV scoring" if world == 1 else f"MIWV scoring (rank 0 of {world})"
    t0 = time.perf_counter()
    new = [sum(i not in done for i in chunk) for chunk in my_chunks]  # a chunk cut short counts its new rows
    with tqdm(total=len(done) + sum(new), initial=len(done), desc=label, unit="sample",
              disable=not (config.progress and run.shard.is_main)) as bar:
        for chunk, n in zip(my_chunks, new):
            rows = score_rows(run.loaded, examples, ids, chunk, neighbor_index, neighbor_similarity, config)
            mine.append([row for row in rows if row["index"] not in done])
            bar.update(n)
    return max_length, time.perf_counter() - t0, sum(i not in done for i in range(len(run.pool)))


def _finish(run: _Run, manifest: dict, max_length: int, seconds: float, todo: int) -> None:
    """Rank 0: merge every rank's partial file into ``scores.jsonl`` in input order; complete the manifest."""
    done = run.done()
    scores = [done[i] for i in range(len(run.pool))]
    write_jsonl(run.out_dir / "scores.jsonl", scores)
    try:
        manifest.update(status="complete", scores_sha256=file_sha256(run.out_dir / "scores.jsonl"), finished=now(),
                        rows=len(scores), rows_scored_this_run=todo, rows_resumed=len(run.pool) - todo,
                        seconds_scoring=round(seconds, 2),
                        seconds_per_sample=round(seconds / todo, 4) if todo else None,
                        max_length=max_length, truncated_rows=sum(r["truncated"] for r in scores),
                        demo_trimmed_rows=sum(bool(r["truncation"].get("demo")) for r in scores),
                        no_miwv_rows=sum(r["miwv"] is None for r in scores))
        write_json(run.out_dir / "manifest.json", manifest)
    except BaseException:  # a full disk, say: no complete-looking scores.jsonl beside a "running" manifest
        (run.out_dir / "scores.jsonl").unlink(missing_ok=True)  # the partial files stay: a re-run merges them again
        raise
    for partial in run.partials:
        partial.unlink(missing_ok=True)
