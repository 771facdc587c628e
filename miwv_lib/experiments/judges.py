"""The judges: ``LLMJudge`` (the Cherry LLM / AlpaGasus review, by a local model or an OpenAI-compatible endpoint) and
three offline judges that need a reference answer: reference NLL, embedding cosine, ROUGE-L F1. Reviews are cached, so
an interrupted evaluation resumes. Tie margins: LLM 0 (integer scores); ROUGE-L F1 0.02 (about one token of a 50-token
answer); embedding cosine 0.02; reference NLL 0.01 nats per token (about 1 % in perplexity)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ..data.models import DEFAULT_EMBEDDER, LoadedModel, load_embedder, load_model
from ..data.prompts import DEFAULT_TEMPLATE, encode_chat, encode_examples, encode_text
from ..method.layouts import SpecialTokens, resolve_max_length, zero_shot_sequence
from ..method.losses import EngineConfig, sequence_losses
from ..method.neighbors import embed_texts
from ..method.pairwise import REVIEW_SYSTEM, Judge, Review, ReviewRequest, parse_review, review_prompt
from ..runtime.io import stable_hash
from ..runtime.runs import PartialResults
from .generate import GenerateConfig, generate_ids

HF_MAX_NEW_TOKENS = 256


class HFChatBackend:
    """A local causal LM: its chat template when it has one, else system and user text one after the other."""

    def __init__(self, loaded: LoadedModel, max_new_tokens: int = HF_MAX_NEW_TOKENS, batch_size: int = 4,
                 progress: bool = True):
        self.loaded, self.max_new_tokens, self.batch_size, self.progress = loaded, max_new_tokens, batch_size, progress
        # a review depends on the weights' dtype and on how long it may be: cached reviews must tell them apart
        longer = f", max_new_tokens={max_new_tokens}" if max_new_tokens != HF_MAX_NEW_TOKENS else ""
        self.id = f"hf:{loaded.identity} ({str(loaded.dtype).removeprefix('torch.')}{longer})"
        self.prefix = SpecialTokens.from_tokenizer(loaded.tokenizer).prefix

    def prompt_text(self, system: str, user: str) -> str:
        """The review request as text (for reading; ``prompt_ids`` is what the model gets)."""
        return self.loaded.tokenizer.decode(self.prompt_ids(system, user)[len(self.prefix):])

    def prompt_ids(self, system: str, user: str) -> list[int]:
        """``[BOS]`` and the review request: the chat template's tokens special, the answers' text always text."""
        tokenizer = self.loaded.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            return [*self.prefix, *encode_text(tokenizer, [f"{system}\n\n{user}"])[0]]
        try:
            ids = encode_chat(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": user}])
        except Exception:  # some templates refuse a system turn: fold it into the user's
            ids = encode_chat(tokenizer, [{"role": "user", "content": f"{system}\n\n{user}"}])
        return [*self.prefix, *ids]

    def complete(self, system: str, users: list[str]) -> list[str]:
        config = GenerateConfig(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, progress=self.progress)
        outputs = generate_ids(self.loaded, [self.prompt_ids(system, u) for u in users], config, desc="judge")
        return [self.loaded.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs]


OPENAI_URL, OPENAI_TEMPERATURE, OPENAI_MAX_TOKENS = "https://api.openai.com/v1", 0.0, 512


class OpenAIChatBackend:
    """Any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp server, …) through the ``openai`` client (an
    optional extra: ``pip install 'miwv-lib[openai]'``), which retries rate limits and server errors with backoff.
    ``id`` is ``openai-compatible:<model>``, then ``@<host/path>`` for an endpoint other than OpenAI's and the
    temperature and max_tokens where not the defaults: local servers often serve different models under one name."""

    def __init__(self, model: str, base_url: str = OPENAI_URL,
                 api_key_env: str | None = "OPENAI_API_KEY", temperature: float = OPENAI_TEMPERATURE,
                 max_tokens: int = OPENAI_MAX_TOKENS, timeout: float = 120.0, retries: int = 3):
        self.model, self.base_url = model, base_url.rstrip("/")
        self.temperature, self.max_tokens, self.timeout, self.retries = temperature, max_tokens, timeout, retries
        # OpenAI's own endpoint with the default settings keeps the old id, so the caches written under it stay valid.
        # Another endpoint's host, port and path: no scheme, for reading, and no user:password, as the id is recorded.
        parts = urlsplit(self.base_url)
        endpoint = parts.netloc.rpartition("@")[2].lower() + parts.path if parts.netloc else self.base_url
        where = "" if self.base_url == OPENAI_URL else f"@{endpoint}"
        settings = [f"{name}={value}" for name, value, default in (("temperature", temperature, OPENAI_TEMPERATURE),
                                                                   ("max_tokens", max_tokens, OPENAI_MAX_TOKENS))
                    if value != default]
        self.id = f"openai-compatible:{model}{where}" + (f" ({', '.join(settings)})" if settings else "")
        self.api_key = None if api_key_env is None else os.environ.get(api_key_env)
        if api_key_env is not None and not self.api_key:
            raise ValueError(f"the API key variable ${api_key_env} is not set "
                             "(pass api_key_env=None for an endpoint without a key)")

    def complete(self, system: str, users: list[str]) -> list[str]:
        try:
            import openai
        except ImportError:
            raise RuntimeError("the openai judge needs the openai client: pip install 'miwv-lib[openai]'") from None
        # an endpoint without a key still gets one: the client refuses to start without any
        client = openai.OpenAI(base_url=self.base_url, api_key=self.api_key or "no-key", timeout=self.timeout,
                               max_retries=self.retries)
        try:
            replies = [client.chat.completions.create(
                model=self.model, temperature=self.temperature, max_tokens=self.max_tokens,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": user}]) for user in users]
        except openai.APIStatusError as exc:
            raise RuntimeError(f"{self.base_url}: HTTP {exc.status_code}: {str(exc.message)[:300]}") from None
        except openai.APIConnectionError as exc:
            raise RuntimeError(f"{self.base_url}: {exc.message}") from None
        return [reply.choices[0].message.content or "" for reply in replies]


class LLMJudge:
    """The Cherry/AlpaGasus pairwise review by ``backend`` (an ``id`` and ``complete(system, users) -> texts``); an
    unparseable review is a tie with its ``error`` set."""

    needs_reference, cacheable = False, True

    def __init__(self, backend: HFChatBackend | OpenAIChatBackend, margin: float = 0.0):
        self.backend, self.margin, self.id = backend, margin, f"llm:{backend.id}"

    def review(self, requests: list[ReviewRequest]) -> list[Review]:
        users = [review_prompt(r.question, r.first.answer, r.second.answer) for r in requests]
        return [read_review(text) for text in self.backend.complete(REVIEW_SYSTEM, users)]


def read_review(text: str, cached: bool = False) -> Review:
    """A judge's words and the two scores ``parse_review`` reads in them (none: a tie, with its ``error`` set)."""
    scores = parse_review(text)
    if scores is None:
        return Review(None, None, raw=text, error="unparseable review", cached=cached)
    return Review(*scores, raw=text, cached=cached)


class _PerAnswerJudge:
    """A symmetric judge that scores each position on its own: the subclass gives ``id``, ``margin`` and
    ``scores(requests, sides) -> list[float | None]``."""

    needs_reference, cacheable = True, False

    def review(self, requests: list[ReviewRequest]) -> list[Review]:
        first = self.scores(requests, [r.first for r in requests])
        second = self.scores(requests, [r.second for r in requests])
        return [Review(a, b) if a is not None and b is not None else Review(None, None, error="no score")
                for a, b in zip(first, second)]


class RougeJudge(_PerAnswerJudge):
    """ROUGE-L F1 of each generation against the reference (stemmed, rouge-score's tokenizer)."""

    def __init__(self, margin: float = 0.02):
        from rouge_score import rouge_scorer

        self.margin, self.id = margin, "rougeL-f1"
        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def scores(self, requests, sides):
        return [self._scorer.score(r.reference, s.answer)["rougeL"].fmeasure for r, s in zip(requests, sides)]


class EmbeddingJudge(_PerAnswerJudge):
    """Cosine similarity of each generation's sentence embedding to the reference's."""

    def __init__(self, embedder: str = DEFAULT_EMBEDDER, margin: float = 0.02, progress: bool = False):
        self.embedder_name, self.margin, self.progress = embedder, margin, progress
        self.id, self._embedder = f"embedding-cosine:{embedder}", None
        # a study judges every model against the same baseline answers and references: each text is embedded once
        self._vectors: dict[str, np.ndarray] = {}

    def _embed(self, texts: list[str]) -> dict[str, np.ndarray]:
        new = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if new:
            self._embedder = self._embedder or load_embedder(self.embedder_name)
            self._vectors.update(zip(new, embed_texts(new, self._embedder, progress=self.progress)))
        return self._vectors

    def scores(self, requests, sides):
        vectors = self._embed([r.reference for r in requests] + [s.answer for s in sides])
        return [float(vectors[r.reference] @ vectors[s.answer]) for r, s in zip(requests, sides)]


class ReferenceLikelihoodJudge(_PerAnswerJudge):
    """The model that gives the reference answer the lower mean response NLL wins (score = −NLL)."""

    def __init__(self, margin: float = 0.01):
        self.margin, self.id = margin, "reference-nll"

    def scores(self, requests, sides):
        return [None if s.reference_nll is None else -s.reference_nll for s in sides]


def reference_nll(loaded: LoadedModel, rows: list[dict], references: list[str], template: str = DEFAULT_TEMPLATE,
                  max_length: int | str = 1024, batch_size: int = EngineConfig.batch_size,
                  progress: bool = False) -> list[float]:
    """Mean NLL of each reference answer given its prompt: the scorer's zero-shot loss with y = reference."""
    special = SpecialTokens.from_tokenizer(loaded.tokenizer)
    examples = encode_examples([{**r, "output": ref} for r, ref in zip(rows, references)], loaded.tokenizer, template)
    needed = [len(special.prefix) + len(e.prompt) + len(e.response) + 1 for e in examples]
    max_length = resolve_max_length(max_length, needed, loaded.model)
    sequences = [zero_shot_sequence(e, special, max_length)[0] for e in examples]
    losses = sequence_losses(loaded.model, sequences, loaded.tokenizer.pad_token_id,
                             EngineConfig(batch_size=batch_size, progress=progress, progress_desc="reference NLL"))
    return [float(x) for x in losses]


OFFLINE_JUDGES = ("reference-nll", "embedding", "rougeL")
_OFFLINE = {"reference-nll": ReferenceLikelihoodJudge, "embedding": EmbeddingJudge, "rougeL": RougeJudge,
            "rouge": RougeJudge}


def judge_rule(spec: Any) -> str | None:
    """What is wrong with a judge's short name, or None: asked before any model loads, not after hours of work."""
    if isinstance(spec, str) and (spec in _OFFLINE or spec.partition(":")[0] in ("hf", "openai")
                                  and spec.partition(":")[2].strip()):
        return None
    return f"unknown judge {spec!r}: use one of {', '.join(OFFLINE_JUDGES)}, hf:<model> or openai:<model>"


def make_judge(spec: str | Judge, **kwargs) -> Judge:
    """A judge from a short name: ``reference-nll``, ``embedding``, ``rougeL``, ``hf:<model name or path>``
    or ``openai:<model>`` (``base_url=``, ``api_key_env=`` as keyword arguments); judge objects pass through."""
    if not isinstance(spec, str):
        return spec
    if problem := judge_rule(spec):
        raise ValueError(problem)
    if spec in _OFFLINE:
        return _OFFLINE[spec](**kwargs)
    kind, name = spec.split(":", 1)
    margin = kwargs.pop("margin", 0.0)
    if kind == "openai":
        return LLMJudge(OpenAIChatBackend(name, **kwargs), margin=margin)
    loaded = load_model(name, dtype=kwargs.pop("dtype", "auto"), device=kwargs.pop("device", "auto"))
    return LLMJudge(HFChatBackend(loaded, **kwargs), margin=margin)


class JudgementCache:
    """Reviews already asked for, in an append-only log (one fsynced write per batch), so a rerun asks the judge
    nothing it was asked before; a line torn by a crash is cut off on load (that review is simply asked again)."""

    def __init__(self, path: str | Path):
        self.log = PartialResults(Path(path), key="key", key_type=str)
        self._rows = self.log.load()

    def get(self, key: str) -> Review | None:
        row = self._rows.get(key)
        if row is None:
            return None
        if row.get("raw") is not None:  # read again: a reading fixed since reaches it too
            return read_review(row["raw"], cached=True)
        return Review(row["score_1"], row["score_2"], error=row.get("error"), cached=True)

    def put(self, entries: list[tuple[str, str, Review]]) -> None:
        rows = [{"key": key, "judge": judge_id, **review.as_dict()} for key, judge_id, review in entries]
        self.log.append(rows)
        self._rows.update((row["key"], row) for row in rows)


def run_judge(judge: Judge, requests: list[ReviewRequest], cache: JudgementCache | None = None,
              chunk: int = 32) -> list[Review]:
    """Reviews of ``requests``; cached ones are reused, new ones are appended to the cache as they finish."""
    use_cache = cache is not None and judge.cacheable
    # the key: judge, question and both answers in their positions (the order is which answer is Assistant 1)
    keys = [stable_hash({"judge": judge.id, "question": r.question, "answer_1": r.first.answer,
                         "answer_2": r.second.answer}, length=24) for r in requests] if use_cache else []
    reviews: list[Review | None] = [cache.get(k) for k in keys] if use_cache else [None] * len(requests)
    todo = [i for i, review in enumerate(reviews) if review is None]
    for start in range(0, len(todo), chunk):
        batch = todo[start:start + chunk]
        for i, review in zip(batch, judge.review([requests[i] for i in batch])):
            reviews[i] = review
        if use_cache:
            cache.put([(keys[i], judge.id, reviews[i]) for i in batch])
    if failed := [requests[i].item_id for i, r in enumerate(reviews) if not r.scored]:
        warnings.warn(f"judge {judge.id}: {len(failed)} of {len(requests)} reviews have no scores and count as "
                      f"ties (first ids: {failed[:5]})", stacklevel=2)
    return reviews
