"""Step 1: nearest *other* sample by cosine similarity of instruction(+input) embeddings."""

import numpy as np
import pytest

from miwv_lib.data.datasets import format_source_text
from miwv_lib.method.neighbors import NonFiniteEmbeddings, embed_texts, model_embeddings, nearest_neighbors
from miwv_lib.data.models import load_embedder


def test_self_is_never_its_own_neighbour():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 8)).astype(np.float32)
    index, sim = nearest_neighbors(emb, chunk_size=7)
    assert (index != np.arange(50)).all()
    assert (sim <= 1.0 + 1e-6).all()


def test_chunked_search_equals_the_full_matrix():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(103, 16)).astype(np.float32)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    full = unit @ unit.T
    np.fill_diagonal(full, -np.inf)
    for chunk in (1, 10, 103, 1000):
        index, sim = nearest_neighbors(emb, chunk_size=chunk)
        assert (index == full.argmax(1)).all()
        assert np.allclose(sim, full.max(1), atol=1e-6)


def test_exact_duplicates_are_each_others_neighbours_and_ties_go_to_lowest_index():
    emb = np.array([[1, 0], [0, 1], [1, 0], [1, 0], [0.6, 0.8]], dtype=np.float32)
    index, sim = nearest_neighbors(emb)
    assert index[0] == 2  # rows 2 and 3 tie at similarity 1: lowest index wins
    assert index[2] == 0 and index[3] == 0
    assert sim[0] == pytest.approx(1.0)


def test_a_row_whose_embedding_is_not_finite_is_an_error_not_everyones_neighbour():
    emb = np.random.default_rng(2).normal(size=(6, 4)).astype(np.float32)
    emb[3, 1], emb[5, 0] = np.nan, np.inf  # argmax ranks NaN first: row 3 would be every row's neighbour
    with pytest.raises(NonFiniteEmbeddings) as error:
        nearest_neighbors(emb)
    assert error.value.rows == [3, 5]


def test_one_row_has_no_neighbour():
    with pytest.raises(ValueError, match="at least 2"):
        nearest_neighbors(np.ones((1, 4), dtype=np.float32))


def test_embedding_text_never_contains_the_response():
    row = {"instruction": "Summarise", "input": "A long text", "output": "SECRET ANSWER"}
    assert format_source_text(row) == "Summarise\nA long text"
    assert "SECRET" not in format_source_text(row)


def test_bundled_minilm_embeds_offline_and_finds_paraphrases():
    embedder = load_embedder("all-MiniLM-L6-v2", device="cpu")
    texts = ["How do I bake bread at home?", "Name three primary colours.", "Give me a recipe for homemade bread.",
             "What are the primary colors?"]
    vectors = embed_texts(texts, embedder, progress=False)
    assert vectors.shape == (4, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    index, _ = nearest_neighbors(vectors)
    assert list(index) == [2, 3, 0, 1]


def test_model_hidden_state_embeddings_are_unit_norm(tiny):
    vectors = model_embeddings(tiny.model, tiny.tokenizer, ["a cat", "the dog runs", "a cat"], progress=False)
    assert vectors.shape == (3, tiny.model.config.hidden_size)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert nearest_neighbors(vectors)[0][0] == 2


def test_self_embeddings_read_at_most_the_first_tokens_of_a_huge_text(tiny):
    from miwv_lib.method.neighbors import SELF_MAX_TOKENS

    huge = "the river runs past the green city " * 20_000  # ~140,000 tokens: untruncated, GBs of activations
    vectors = model_embeddings(tiny.model, tiny.tokenizer, [huge, huge + " and more", "a cat"], progress=False)
    assert vectors.shape == (3, tiny.model.config.hidden_size) and np.isfinite(vectors).all()
    assert np.allclose(vectors[0], vectors[1], atol=1e-6)  # what lies past SELF_MAX_TOKENS is not read
    assert SELF_MAX_TOKENS < len(tiny.tokenizer(huge).input_ids)
