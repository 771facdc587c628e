"""Judges: review parsing, the LLM judge's backends and cache, and the offline reference judges."""

from __future__ import annotations

import json
import threading
import warnings
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from miwv_lib.method.pairwise import LOSS, REVIEW_SYSTEM, TIE, WIN, Review, ReviewRequest, Side, parse_review, review_prompt, verdict
from miwv_lib.experiments.judges import EmbeddingJudge, HFChatBackend, JudgementCache, LLMJudge, OpenAIChatBackend, ReferenceLikelihoodJudge, RougeJudge, make_judge, reference_nll, run_judge


@pytest.mark.parametrize(("text", "expected"), [
    ("8 7\nAssistant 1 gave a more detailed answer, while Assistant 2 ...", (8, 7)),
    ("9 6", (9, 6)),
    ("8, 7\n\nBoth answers are relevant.", (8, 7)),
    ("7.5 8\nAssistant 2 is slightly better.", (7.5, 8)),
    ("8/10 and 7/10\nThe first answer is more precise.", (8, 7)),
    ("Assistant 1: 8\nAssistant 2: 6\n\nExplanation: Assistant 1 covers more.", (8, 6)),
    ("**Assistant 1:** 9/10\n**Assistant 2:** 4 out of 10\nAssistant 2 misread the question.", (9, 4)),
    ("Assistant 1 receives a score of 3, while Assistant 2 gets 10.", (3, 10)),
    ("  \n10 10\nBoth are perfect.", (10, 10)),
    ("8-7\nThe first is better.", (8, 7)),
])
def test_parse_realistic_reviews(text, expected):
    assert parse_review(text) == expected


@pytest.mark.parametrize("text", [
    "", "   ", "I cannot evaluate these answers.", "8\nThe first is fine.", "12 7\nscores", "8 7 6", "-3 7\nscores", "Assistant 1: -2\nAssistant 2: 5",
    "Both answers are equally helpful; neither is better.",
])
def test_parse_malformed_reviews(text):
    assert parse_review(text) is None


@pytest.mark.parametrize(("text", "expected"), [
    ("Scores (1-10):\n8 7", (8, 7)),  # a header with the scale, not the scores
    ("On a scale of 1 to 10:\nAssistant 1: 8\nAssistant 2: 7", (8, 7)),
    ("Both answers are rated on a scale from 1 to 10.\n8 6\nAssistant 1 is clearer.", (8, 6)),
    ("Assistant 1: 8 (it covers all 3 points)\nAssistant 2: 6", (8, 6)),  # the 3 is no score
    ("Assistant 1 gave 3 examples, Assistant 2 gave 5.\nAssistant 1: 8\nAssistant 2: 6", (8, 6)),
    ("Assistant 1 (1-10): 9, Assistant 2 (1-10): 4\nAssistant 2 misread it.", (9, 4)),
])
def test_parse_ignores_the_scale_and_numbers_that_are_not_scores(text, expected):
    assert parse_review(text) == expected


@pytest.mark.parametrize("text", [
    "Assistant 1 gave 3 examples and Assistant 2 gave 5; both are fine.",  # counts, not scores
    "Assistant 1 is better than Assistant 2.\nAssistant 2: 6",  # no score for Assistant 1 (not the 2 of a label)
])
def test_parse_refuses_numbers_that_are_not_scores(text):
    assert parse_review(text) is None


@pytest.mark.parametrize(("text", "expected"), [
    ("Assistant 2: 7, Assistant 1: 9", (9, 7)),  # the labels, not the positions, say whose score it is
    ("Assistant 2: 7, Assistant 1: 9 (Assistant 1 is clearer)", (9, 7)),
    ("Scores: 8 7 (Assistant 2 is weaker)", (8, 7)),  # a label in the comment says nothing about the order
    ("Assistant 1 is 2 points better than Assistant 2.\nAssistant 1: 9\nAssistant 2: 7", (9, 7)),  # a margin
    ("Assistant 2 is 1 point behind.\nAssistant 1: 8\nAssistant 2: 7", (8, 7)),
    ("Assistant 1 gets 8 points, Assistant 2 gets 6 points.", (8, 6)),
    ("Assistant 1 scored 2 points higher than Assistant 2 overall: 9 versus 7.", None),  # unclear: unparsed
])
def test_parse_reads_labels_in_any_order_and_skips_margins(text, expected):
    assert parse_review(text) == expected


def test_review_prompt_is_the_cherry_prompt():
    text = review_prompt("What is 2+2?", "4", "5")
    assert text.startswith("[Question]\nWhat is 2+2?\n\n[The Start of Assistant 1's Answer]\n4\n\n"
                           "[The End of Assistant 1's Answer]\n\n[The Start of Assistant 2's Answer]\n5\n\n"
                           "[The End of Assistant 2's Answer]\n\n[System]\nWe would like to request your feedback")
    assert text.endswith("does not affect your judgment.\n\n")
    assert REVIEW_SYSTEM == "You are a helpful and precise assistant for checking the quality of the answer."


def test_verdict_margin():
    assert verdict(Review(8, 7)) == WIN and verdict(Review(7, 8)) == LOSS and verdict(Review(7, 7)) == TIE
    assert verdict(Review(0.50, 0.49), margin=0.02) == TIE and verdict(Review(0.5, 0.4), margin=0.02) == WIN
    assert verdict(Review(None, None, error="unparseable review")) == TIE


def _request(a="answer one", b="answer two", reference=None, question="Why is the sky blue?"):
    return ReviewRequest("q1", "vicuna", question, reference, Side("A", a), Side("B", b))


class _ScriptedBackend:
    id = "scripted"

    def __init__(self, replies):
        self.replies, self.calls = list(replies), 0

    def complete(self, system, users):
        assert system == REVIEW_SYSTEM
        self.calls += len(users)
        return [self.replies.pop(0) for _ in users]


def test_unparseable_review_is_reported_and_counted_as_a_tie():
    judge = LLMJudge(_ScriptedBackend(["7 3\nok", "I refuse."]))
    with pytest.warns(UserWarning, match="1 of 2 reviews have no scores"):
        reviews = run_judge(judge, [_request(), _request("x", "y")])
    assert (reviews[0].score_1, reviews[0].score_2, reviews[0].error) == (7, 3, None)
    assert reviews[1].error == "unparseable review" and reviews[1].raw == "I refuse."
    assert verdict(reviews[1]) == TIE


def test_cache_makes_a_rerun_free(tmp_path):
    requests = [_request(), _request("x", "y"), _request("y", "x")]  # the swapped order is its own entry
    backend = _ScriptedBackend(["8 2", "3 9", "9 3"])
    first = run_judge(LLMJudge(backend), requests, JudgementCache(tmp_path / "cache.jsonl"))
    assert backend.calls == 3

    fresh_backend = _ScriptedBackend([])  # would fail if asked anything
    again = run_judge(LLMJudge(fresh_backend), requests, JudgementCache(tmp_path / "cache.jsonl"))
    assert fresh_backend.calls == 0 and all(r.cached for r in again)
    assert [(r.score_1, r.score_2) for r in again] == [(r.score_1, r.score_2) for r in first]

    other_judge = LLMJudge(_ScriptedBackend(["5 5"] * 3))
    other_judge.id = "llm:another"
    run_judge(other_judge, requests, JudgementCache(tmp_path / "cache.jsonl"))
    assert other_judge.backend.calls == 3  # the judge id is part of the key


def test_a_cached_review_is_read_again_by_today_s_parse_review(tmp_path):
    path = tmp_path / "cache.jsonl"
    run_judge(LLMJudge(_ScriptedBackend(["Assistant 2: 7, Assistant 1: 9"])), [_request()], JudgementCache(path))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert (rows[0]["score_1"], rows[0]["score_2"]) == (9, 7)
    rows[0].update(score_1=7, score_2=9)  # as an earlier parse_review read it: by position, not by label
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    [review] = run_judge(LLMJudge(_ScriptedBackend([])), [_request()], JudgementCache(path))
    assert review.cached and (review.score_1, review.score_2) == (9, 7)


def test_cache_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    run_judge(LLMJudge(_ScriptedBackend(["8 2"])), [_request()], JudgementCache(path))
    with path.open("a") as handle:
        handle.write('{"key": "abc", "judge": "llm:scri')  # a crash in the middle of an append
    backend = _ScriptedBackend(["1 9"])
    reviews = run_judge(LLMJudge(backend), [_request(), _request("new", "pair")], JudgementCache(path))
    assert backend.calls == 1 and reviews[0].cached and (reviews[1].score_1, reviews[1].score_2) == (1, 9)
    idle = _ScriptedBackend([])
    assert all(r.cached for r in run_judge(LLMJudge(idle), [_request("new", "pair")], JudgementCache(path)))


class _ChatHandler(BaseHTTPRequestHandler):
    seen: list[dict] = []
    failures_left = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if type(self).failures_left:
            type(self).failures_left -= 1
            self.send_response(503)
            self.end_headers()
            return
        reply = {"choices": [{"message": {"role": "assistant", "content": "9 4\nAssistant 1 is better."}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    server = HTTPServer(("127.0.0.1", 0), _ChatHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _ChatHandler.seen, _ChatHandler.failures_left = [], 0
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_compatible_backend_against_a_local_server(chat_server, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "secret-123")
    judge = make_judge("openai:judge-model", base_url=chat_server, api_key_env="MY_JUDGE_KEY")
    _ChatHandler.failures_left = 1  # one 503 first: the client retries
    reviews = run_judge(judge, [_request()])
    assert (reviews[0].score_1, reviews[0].score_2) == (9, 4)
    assert judge.id == f"llm:openai-compatible:judge-model@{chat_server.split('://')[1]}"
    last = _ChatHandler.seen[-1]
    assert len(_ChatHandler.seen) == 2 and last["path"] == "/v1/chat/completions"
    assert last["auth"] == "Bearer secret-123"
    assert last["body"]["model"] == "judge-model" and last["body"]["temperature"] == 0.0
    assert [m["role"] for m in last["body"]["messages"]] == ["system", "user"]
    assert last["body"]["messages"][1]["content"].startswith("[Question]\nWhy is the sky blue?")


def test_openai_judge_id_names_the_endpoint_and_settings():
    def judge_id(**kwargs):
        return OpenAIChatBackend("local", api_key_env=None, **kwargs).id

    assert judge_id() == judge_id(base_url="https://api.openai.com/v1/") == "openai-compatible:local"  # as before
    assert judge_id(base_url="http://server-a:8000/v1") == "openai-compatible:local@server-a:8000/v1"
    assert judge_id(base_url="http://user:secret@server-b:8000/v1/") == "openai-compatible:local@server-b:8000/v1"
    assert judge_id(temperature=0.7, max_tokens=64) == "openai-compatible:local (temperature=0.7, max_tokens=64)"


def test_two_servers_serving_one_model_name_do_not_share_cached_reviews(tmp_path):
    def judge(base_url, replies):
        backend = OpenAIChatBackend("local", base_url=base_url, api_key_env=None)
        scripted = _ScriptedBackend(replies)
        backend.complete = scripted.complete
        return LLMJudge(backend), scripted

    judge_a, backend_a = judge("http://server-a:8000/v1", ["9 2"])
    judge_b, backend_b = judge("http://server-b:8000/v1", ["1 9"])
    [review_a] = run_judge(judge_a, [_request()], JudgementCache(tmp_path / "cache.jsonl"))
    [review_b] = run_judge(judge_b, [_request()], JudgementCache(tmp_path / "cache.jsonl"))
    assert backend_b.calls == 1 and not review_b.cached and (review_b.score_1, review_b.score_2) == (1, 9)
    assert (review_a.score_1, review_a.score_2) == (9, 2) and judge_a.id != judge_b.id


def test_openai_backend_needs_its_key(monkeypatch):
    monkeypatch.delenv("ABSENT_KEY_VAR", raising=False)
    with pytest.raises(ValueError, match="ABSENT_KEY_VAR"):
        OpenAIChatBackend("m", base_url="http://127.0.0.1:9", api_key_env="ABSENT_KEY_VAR")
    assert OpenAIChatBackend("m", base_url="http://127.0.0.1:9", api_key_env=None).api_key is None


def test_hf_backend_on_the_tiny_model(tiny):
    backend = HFChatBackend(tiny, max_new_tokens=4, progress=False)
    assert backend.prompt_text("SYS", "USER") == "SYS\n\nUSER"  # no chat template: plain text
    judge = LLMJudge(backend)
    assert judge.id == f"llm:hf:{tiny.identity} ({str(tiny.dtype).removeprefix('torch.')}, max_new_tokens=4)"
    assert HFChatBackend(tiny).id == f"hf:{tiny.identity} ({str(tiny.dtype).removeprefix('torch.')})"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random model's review is unparseable: reported, a tie
        reviews = run_judge(judge, [_request(), _request("b", "a")])
    assert len(reviews) == 2 and all(isinstance(r.raw, str) for r in reviews)
    assert all(verdict(r) == TIE for r in reviews if r.error)


def test_hf_backend_uses_the_chat_template_without_doubling_the_bos(tiny):
    import copy

    from miwv_lib.data.models import LoadedModel

    tokenizer = copy.deepcopy(tiny.tokenizer)
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    backend = HFChatBackend(LoadedModel(tiny.model, tokenizer, "tiny", "tiny"), progress=False)
    text = backend.prompt_text("SYS", "USER")
    assert text == "<system>SYS\n<user>USER\n<assistant>"  # <s> is prepended as a token ID instead


def test_rouge_prefers_the_reference_copy():
    reference = "The mitochondria is the powerhouse of the cell, producing ATP through respiration."
    judge = RougeJudge()
    [review] = judge.review([_request(reference, "I like trains and long walks.", reference=reference)])
    assert review.score_1 == pytest.approx(1.0) and review.score_2 < 0.2
    assert verdict(review, judge.margin) == WIN
    [swapped] = judge.review([_request("I like trains and long walks.", reference, reference=reference)])
    assert verdict(swapped, judge.margin) == LOSS


def test_embedding_prefers_a_paraphrase_of_the_reference():
    reference = "Paris is the capital city of France."
    judge = EmbeddingJudge()
    [review] = judge.review([_request("The capital of France is Paris.", "Bananas are rich in potassium.",
                                      reference=reference)])
    assert review.score_1 > review.score_2 + judge.margin
    assert verdict(review, judge.margin) == WIN


def test_embedding_judge_embeds_each_text_once_whatever_the_order_or_batch():
    reference = "Paris is the capital city of France."
    judge = EmbeddingJudge()
    first = judge.review([_request("The capital of France is Paris.", "Bananas are rich in potassium.",
                                   reference=reference)])
    encoded: list[str] = []
    real = judge._embedder

    class CountingEmbedder:
        def encode(self, texts, **kwargs):
            encoded.extend(texts)
            return real.encode(texts, **kwargs)

    judge._embedder = CountingEmbedder()
    swapped = judge.review([_request("Bananas are rich in potassium.", "The capital of France is Paris.",
                                     reference=reference),
                            _request("Paris is in France.", "The capital of France is Paris.", reference=reference)])
    assert encoded == ["Paris is in France."]  # the only text not seen before
    assert (swapped[0].score_1, swapped[0].score_2) == (first[0].score_2, first[0].score_1)
    fresh = EmbeddingJudge().review([_request("Paris is in France.", "Bananas.", reference=reference)])
    assert fresh[0].score_1 == pytest.approx(swapped[1].score_1, abs=1e-5)


def test_likelihood_judge_prefers_the_model_trained_on_the_reference(tmp_path, tiny_model_dir):
    from miwv_lib import load_model
    from miwv_lib.experiments.train import TrainConfig, load_trained, train_model

    rows = [{"instruction": "Name the capital of France.", "input": ""},
            {"instruction": "Say something about the sea.", "input": ""}]
    references = ["The capital of France is Paris.", "The sea and the moon at night."]
    config = TrainConfig(model=str(tiny_model_dir), dtype="float32", bf16=False, max_steps=12, batch_size=2,
                         gradient_accumulation_steps=1, learning_rate=1e-2, warmup_ratio=0.0, progress=False)
    train_model([{**r, "output": ref} for r, ref in zip(rows, references)], tmp_path / "trained", config)
    base = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    trained = load_trained(tmp_path / "trained", dtype="float32", device="cpu")
    nll_base, nll_trained = reference_nll(base, rows, references), reference_nll(trained, rows, references)
    assert all(t < b - 0.5 for t, b in zip(nll_trained, nll_base))

    judge = ReferenceLikelihoodJudge()
    request = ReviewRequest("q", "sinstruct", "Name the capital of France.", references[0],
                            Side("trained", "", nll_trained[0]), Side("base", "", nll_base[0]))
    assert verdict(judge.review([request])[0], judge.margin) == WIN


def test_make_judge_names():
    assert make_judge("rougeL").id == "rougeL-f1"
    assert make_judge("reference-nll").margin == 0.01
    assert make_judge("embedding", margin=0.05).margin == 0.05
    with pytest.raises(ValueError, match="unknown judge"):
        make_judge("gpt-4")
