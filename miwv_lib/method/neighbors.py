"""Step 1 of MIWV: embed each instruction(+input), never the response, and find its most similar *other* sample
by cosine similarity."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm


def embed_texts(texts: list[str], embedder, batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Unit-normalised float32 embeddings, one row per text."""
    vectors = embedder.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                              show_progress_bar=progress)
    return np.asarray(vectors, dtype=np.float32)


SELF_MAX_TOKENS = 512  # like a sentence embedder's max_seq_length: a 200,000-character instruction must not take GBs


@torch.no_grad()
def model_embeddings(model, tokenizer, texts: list[str], batch_size: int = 16, progress: bool = True) -> np.ndarray:
    """Unit-normalised mean-pooled last hidden states of a causal LM over each text's first ``SELF_MAX_TOKENS``."""
    device = next(model.parameters()).device
    out = []
    # A with-block closes the bar while an interrupt unwinds, so nothing is drawn after the command's last line.
    with tqdm(total=len(texts), desc="embed (model)", unit="text", disable=not progress) as bar:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            batch = tokenizer(chunk, padding=True, truncation=True, max_length=SELF_MAX_TOKENS, return_tensors="pt",
                              split_special_tokens=True).to(device)
            hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                      use_cache=False).last_hidden_state
            mask = batch.attention_mask.unsqueeze(-1).to(torch.float32)
            pooled = (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
            bar.update(len(chunk))
    return np.concatenate(out).astype(np.float32)


class NonFiniteEmbeddings(ValueError):
    """Rows whose embedding holds NaN or inf (an embedder overflowing in float16, say). ``argmax`` ranks NaN first,
    so one such row would silently become every row's demonstration."""

    def __init__(self, rows: list[int]) -> None:
        self.rows = rows
        super().__init__(f"the embeddings of {len(rows)} rows are not finite (NaN or inf), rows {rows[:5]}")


def nearest_neighbors(embeddings: np.ndarray, chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each row i, the index k ≠ i of maximal cosine similarity (ties: the lowest), and that similarity.
    Exact search in chunks of rows: memory O(chunk_size · N), not N × N."""
    n = len(embeddings)
    if n < 2:
        raise ValueError(f"MIWV needs at least 2 samples to find a neighbour; got {n}")
    if bad := np.flatnonzero(~np.isfinite(np.asarray(embeddings, dtype=np.float32)).all(axis=1)).tolist():
        raise NonFiniteEmbeddings(bad)
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
