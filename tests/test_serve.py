"""The OpenAI-compatible API against a live server on 127.0.0.1 (uvicorn in a thread) serving
two tiny random-weight models with a tokenizer trained in-process."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kotonoha.engine import Engine
from kotonoha.sampling import SamplingParams
from kotonoha.serve.app import create_app
from kotonoha.serve.store import Store
from kotonoha.serve.worker import ModelWorker
from serve_testing import ThreadServer, sse_events, tiny_model, tokenizer

CONTEXT = 256
HELLO = [{"role": "user", "content": "What is the capital of Aurel?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    workers = [ModelWorker("tiny-a", tiny_model(0, CONTEXT), tokenizer()),
               ModelWorker("tiny-b", tiny_model(1, CONTEXT), tokenizer())]
    store = Store(tmp_path_factory.mktemp("serve") / "store.db")
    with ThreadServer(create_app(workers, store)) as s:
        s.workers = {w.name: w for w in workers}
        yield s


@pytest.fixture
def client(server: Any) -> Any:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def solo_text(prompt: list[int], params: SamplingParams, seed: int = 0) -> str:
    """What the engine itself generates, alone, for a fresh copy of model tiny-a."""
    engine = Engine(tiny_model(seed, CONTEXT), tokenizer(), max_batch_size=1)
    return engine.generate([prompt], params)[0].text


def chat(client: httpx.Client, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/chat/completions", json={"model": "tiny-a", "messages": HELLO, **body})
    assert r.status_code == 200, r.text
    return r.json()


def stream_lines(client: httpx.Client, path: str, body: dict[str, Any]) -> list[str]:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return [line for line in r.iter_lines() if line]


# ---- models, health, chat -------------------------------------------------------------------


def test_models_and_health(client: httpx.Client) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny-a", "tiny-b"]
    assert models["data"][0]["max_model_len"] == CONTEXT
    assert client.get("/v1/models/tiny-b").json()["id"] == "tiny-b"
    health = client.get("/health").json()
    assert health["status"] == "ok" and set(health["models"]) == {"tiny-a", "tiny-b"}


def test_chat_completion_is_the_engines_answer(client: httpx.Client) -> None:
    body = chat(client, max_tokens=12, seed=7, temperature=0.9, ignore_eos=True)
    prompt, _ = tokenizer().encode_chat(HELLO, add_generation_prompt=True)
    expected = solo_text(prompt, SamplingParams(temperature=0.9, seed=7, max_tokens=12,
                                                ignore_eos=True, lstrip=True))
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and body["model"] == "tiny-a"
    assert body["id"].startswith("chatcmpl-")
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 12,
                             "total_tokens": len(prompt) + 12}


def test_max_completion_tokens_wins_over_max_tokens(client: httpx.Client) -> None:
    body = chat(client, max_tokens=20, max_completion_tokens=3, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 3


def test_stream_equals_non_stream_and_ends_with_done(client: httpx.Client) -> None:
    args = {"model": "tiny-a", "messages": HELLO, "max_tokens": 16, "seed": 3}
    whole = chat(client, **{k: v for k, v in args.items() if k not in ("model", "messages")})
    lines = stream_lines(client, "/v1/chat/completions",
                         {**args, "stream": True, "stream_options": {"include_usage": True}})
    assert lines[-1] == "data: [DONE]"
    chunks = list(sse_events(iter(lines)))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finals[-1] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])


def test_stop_string_cuts_the_answer(client: httpx.Client) -> None:
    free = chat(client, max_tokens=40, seed=21, ignore_eos=True)
    text = free["choices"][0]["message"]["content"]
    stop = next(text[i:i + 2] for i in range(8, len(text) - 2)
                if text[i:i + 2].isalpha() and text[i:i + 2].isascii())
    cut = chat(client, max_tokens=40, seed=21, ignore_eos=True, stop=["@@@", stop])
    assert cut["choices"][0]["message"]["content"] == text[:text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_logit_bias_forces_a_token(client: httpx.Client) -> None:
    token = tokenizer().encode(" river")[0]
    body = chat(client, max_tokens=5, logit_bias={str(token): 100}, logprobs=True,
                ignore_eos=True)
    tokens = [e["token"] for e in body["choices"][0]["logprobs"]["content"]]
    assert tokens == [tokenizer().decode([token])] * 5


def test_a_chat_reply_drops_its_opening_space_a_completion_keeps_it(client: httpx.Client,
                                                                     ) -> None:
    token = tokenizer().encode(" river")[0]
    piece = tokenizer().decode([token])
    assert piece.startswith(" ")
    bias = {str(token): 100}
    reply = chat(client, max_tokens=2, logit_bias=bias, ignore_eos=True)
    assert reply["choices"][0]["message"]["content"] == (piece * 2).lstrip()
    text = complete(client, prompt="The", max_tokens=2, logit_bias=bias, ignore_eos=True)
    assert text["choices"][0]["text"] == piece * 2


def test_seed_and_n(client: httpx.Client) -> None:
    three = chat(client, n=3, seed=11, max_tokens=10, ignore_eos=True)
    texts = [c["message"]["content"] for c in three["choices"]]
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert len(set(texts)) == 3
    assert three["usage"]["completion_tokens"] == 30
    again = chat(client, n=3, seed=11, max_tokens=10, ignore_eos=True)
    assert [c["message"]["content"] for c in again["choices"]] == texts
    # Choice i is seeded with seed + i.
    second = chat(client, seed=12, max_tokens=10, ignore_eos=True)
    assert second["choices"][0]["message"]["content"] == texts[1]


def test_penalties_change_sampling(client: httpx.Client) -> None:
    plain = chat(client, seed=5, max_tokens=30, temperature=0, ignore_eos=True)
    penalised = chat(client, seed=5, max_tokens=30, temperature=0, ignore_eos=True,
                     frequency_penalty=2.0, presence_penalty=2.0)
    assert plain["choices"][0]["message"] != penalised["choices"][0]["message"]


def test_chat_logprobs(client: httpx.Client) -> None:
    body = chat(client, max_tokens=6, logprobs=True, top_logprobs=3, ignore_eos=True)
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 6
    for entry in content:
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry["logprob"] <= tops[0] + 1e-6
        assert isinstance(entry["bytes"], list)
    assert chat(client, max_tokens=2)["choices"][0]["logprobs"] is None


def test_stop_token_ends_with_stop(client: httpx.Client) -> None:
    end = tokenizer().token_to_id("<|im_end|>")
    body = chat(client, max_tokens=20, logit_bias={str(end): 100}, logprobs=True)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == ""
    assert body["usage"]["completion_tokens"] == 1
    assert choice["logprobs"]["content"] == []  # the end-of-turn token is not text


# ---- completions ----------------------------------------------------------------------------


def complete(client: httpx.Client, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/completions", json={"model": "tiny-a", **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_completion_prompt_forms(client: httpx.Client) -> None:
    tok = tokenizer()
    texts = ["The river", "首都は"]
    ids = [tok.encode(t) for t in texts]
    as_text = complete(client, prompt=texts, n=2, max_tokens=4, seed=1, ignore_eos=True)
    assert as_text["object"] == "text_completion"
    assert [c["index"] for c in as_text["choices"]] == [0, 1, 2, 3]
    assert as_text["usage"]["prompt_tokens"] == sum(map(len, ids))
    assert as_text["usage"]["completion_tokens"] == 16
    as_ids = complete(client, prompt=ids, n=2, max_tokens=4, seed=1, ignore_eos=True)
    assert [c["text"] for c in as_ids["choices"]] == [c["text"] for c in as_text["choices"]]
    single = complete(client, prompt=ids[1], max_tokens=4, seed=1, ignore_eos=True)
    assert single["choices"][0]["text"] == as_text["choices"][2]["text"]
    one = complete(client, prompt="The river", max_tokens=4, seed=1, ignore_eos=True)
    assert one["choices"][0]["text"] == as_text["choices"][0]["text"]
    assert one["choices"][0]["finish_reason"] == "length"
    assert complete(client, prompt="The river")["usage"]["completion_tokens"] <= 16  # default


def test_echo_scores_the_prompt_like_engine_score(client: httpx.Client,
                                                   server: Any) -> None:
    ids = tokenizer().encode("The bank of the river is green.")
    body = complete(client, prompt=ids, max_tokens=0, echo=True, logprobs=2)
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == tokenizer().decode(ids)
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                             "total_tokens": len(ids)}
    expected = Engine(tiny_model(0, CONTEXT), tokenizer(), max_batch_size=1).score(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(expected[1:], abs=1e-4)
    assert all(len(t) <= 2 for t in lp["top_logprobs"][1:])
    assert lp["text_offset"] == sorted(lp["text_offset"])


def test_lm_eval_harness_loglikelihood_request(client: httpx.Client) -> None:
    """What lm-evaluation-harness's local-completions sends for a log-likelihood task, and
    how it reads the answer (sum of token_logprobs[ctxlen:-1], greedy check on top_logprobs)."""
    context, continuation = tokenizer().encode("The capital of"), tokenizer().encode(" Aurel")
    body = complete(client, prompt=[context + continuation], max_tokens=1, echo=True,
                    logprobs=1, temperature=0, seed=1234)
    lp = body["choices"][0]["logprobs"]
    n = len(context) + len(continuation)
    assert len(lp["token_logprobs"]) == n + 1  # the prompt, then the one generated token
    ctxlen = len(context)
    token_logprobs = lp["token_logprobs"][ctxlen:-1]
    tops = lp["top_logprobs"][ctxlen:-1]
    assert len(token_logprobs) == len(continuation)
    total = sum(token_logprobs)
    assert total < 0
    is_greedy = all(tok == max(top.values()) for tok, top in zip(token_logprobs, tops))
    assert isinstance(is_greedy, bool)


def test_completion_stream(client: httpx.Client) -> None:
    whole = complete(client, prompt="The river", max_tokens=10, seed=2, logprobs=1)
    lines = stream_lines(client, "/v1/completions",
                         {"model": "tiny-a", "prompt": "The river", "max_tokens": 10, "seed": 2,
                          "logprobs": 1, "stream": True, "echo": True})
    assert lines[-1] == "data: [DONE]"
    chunks = list(sse_events(iter(lines)))
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == "The river" + whole["choices"][0]["text"]
    tokens = [t for c in chunks for t in (c["choices"][0]["logprobs"] or {}).get("tokens", [])]
    assert tokens[-10:] == whole["choices"][0]["logprobs"]["tokens"]


# ---- tokenize -------------------------------------------------------------------------------


def test_tokenize_and_detokenize(client: httpx.Client) -> None:
    text = "The bridge はしを渡る。"
    r = client.post("/tokenize", json={"model": "tiny-b", "prompt": text}).json()
    assert r["tokens"] == tokenizer().encode(text) and r["count"] == len(r["tokens"])
    back = client.post("/detokenize", json={"model": "tiny-b", "tokens": r["tokens"]}).json()
    assert back["prompt"] == text
    chat_ids = client.post("/tokenize", json={"messages": HELLO}).json()["tokens"]
    assert chat_ids == tokenizer().encode_chat(HELLO, add_generation_prompt=True)[0]


# ---- the Inside tab's endpoints ---------------------------------------------------------------


def test_inside_lens_last_layer_is_the_models_own_prediction(client: httpx.Client,
                                                             server: Any) -> None:
    from kotonoha.explain.common import encode

    text = "The capital of Aurel is"
    r = client.post("/v1/inside/lens", json={"model": "tiny-b", "prompt": text,
                                              "answer": " Beno", "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    model = server.workers["tiny-b"].engine.model
    assert len(body["layers"]) == model.cfg.n_layer + 1
    assert all(len(row["top"]) == 3 and row["answer_rank"] >= 1 for row in body["layers"])
    with torch.inference_mode():
        logits = model(torch.tensor([encode(tokenizer(), text)]))[0, -1]
    assert body["layers"][-1]["top"][0]["id"] == int(logits.argmax()) == body["output_top"]


def test_inside_attention_rows_are_causal_distributions(client: httpx.Client) -> None:
    r = client.post("/v1/inside/attention", json={"text": "The river bank was green.",
                                                   "layer": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    w = torch.tensor(body["attention"])  # (heads, queries, keys) of layer 0
    n = len(body["tokens"])
    assert body["layer"] == 0 and w.shape == (body["n_head"], n, n)
    assert torch.allclose(w.sum(-1), torch.ones(body["n_head"], n), atol=1e-3)
    assert torch.all(w.triu(1) == 0)  # no token looks ahead
    last = client.post("/v1/inside/attention", json={"text": "A b c."}).json()
    assert last["layer"] == last["n_layer"] - 1


def test_inside_neighbours_match_the_explain_tool(client: httpx.Client, server: Any) -> None:
    from kotonoha.explain.embeddings import nearest_neighbours

    r = client.post("/v1/inside/neighbours", json={"model": "tiny-b", "word": "river", "k": 4})
    assert r.status_code == 200, r.text
    want = nearest_neighbours(server.workers["tiny-b"].engine.model, tokenizer(), "river", 4)
    assert [n["id"] for n in r.json()["neighbours"]] == [n["id"] for n in want["neighbours"]]


@pytest.mark.parametrize("path,body,param", [
    ("/v1/inside/attention", {"text": "hello", "layer": 99}, "layer"),
    ("/v1/inside/attention", {"text": "word " * 200}, "text"),
    ("/v1/inside/attention", {"text": ""}, "text"),
    ("/v1/inside/lens", {"prompt": ""}, "prompt"),
    ("/v1/inside/lens", {"prompt": "x", "model": "nope"}, "model"),
    ("/v1/inside/neighbours", {"word": " "}, "word"),
])
def test_inside_bad_requests(client: httpx.Client, path: str, body: dict[str, Any],
                             param: str) -> None:
    r = client.post(path, json=body)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param


# ---- errors ---------------------------------------------------------------------------------

LONG = "word " * 400
ERRORS = [
    ("/v1/chat/completions", b'{"model": "tiny-a", "messages": [', 400, None),
    ("/v1/chat/completions", {"model": "nope", "messages": HELLO}, 404, "model"),
    ("/v1/chat/completions", {"messages": HELLO, "temperature": 5}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": HELLO, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": HELLO, "n": 0}, 400, "n"),
    ("/v1/chat/completions", {"messages": HELLO, "stop": list("abcde")}, 400, "stop"),
    ("/v1/chat/completions", {"messages": HELLO, "presence_penalty": 3}, 400,
     "presence_penalty"),
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 10_000}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400,
     "messages"),
    ("/v1/chat/completions", {"messages": HELLO, "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": HELLO, "logit_bias": {"99999": 1}}, 400, None),
    ("/v1/chat/completions", {"messages": HELLO, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, None),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], '
                             b'"temperature": NaN}', 400, "temperature"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], '
                             b'"logit_bias": {"5": Infinity}}', 400, "logit_bias"),
    ("/v1/completions", {"prompt": [[1, 2], [100000]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": LONG, "max_tokens": 0, "echo": True, "logprobs": 1}, 400,
     "prompt"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/tokenize", {}, 400, None),
    # int() reads "²" and "--1" nowhere: keys are ASCII token ids.
    ("/v1/chat/completions", {"messages": HELLO, "logit_bias": {"²": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"--1": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": HELLO, "repetition_penalty": 1e-45}, 400,
     "repetition_penalty"),
    # JSON can carry a lone surrogate, which no tokenizer or UTF-8 writer accepts.
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400,
     None),
    ("/v1/completions", b'{"prompt": "\\udfff"}', 400, None),
    ("/v1/chat/completions", b'{"model": "\\ud800", "messages": [{"role": "user", '
                             b'"content": "x"}]}', 400, None),
    ("/tokenize", b'{"prompt": "\\ud800"}', 400, None),
]


@pytest.mark.parametrize("path,body,status,param", ERRORS)
def test_errors_are_openai_shaped(client: httpx.Client, path: str, body: Any, status: int,
                                  param: str | None) -> None:
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"].endswith((".", "?")) and "Traceback" not in error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    if status == 404:
        assert error["code"] == "model_not_found"


def test_lone_surrogate_is_named(client: httpx.Client) -> None:
    r = client.post("/v1/chat/completions", headers={"content-type": "application/json"},
                    content=b'{"messages": [{"role": "user", "content": "a\\ud800"}]}')
    assert r.status_code == 400
    assert "messages.0.content" in r.json()["error"]["message"]


def test_a_tiny_temperature_is_greedy_and_fails_no_one(client: httpx.Client) -> None:
    """1e-45 used to divide the logits into infinities: the NaN distribution failed every
    request in the batch."""
    greedy = chat(client, max_tokens=8, temperature=0)["choices"][0]["message"]["content"]
    for t in (1e-45, 1e-39, 1e-6):
        reply = chat(client, max_tokens=8, temperature=t)["choices"][0]["message"]["content"]
        assert reply == greedy


def test_completion_text_offsets_count_characters(client: httpx.Client) -> None:
    """A byte-level token can be half a character: it must not push later offsets past the
    text (it used to add the length of its `bytes:\\xe6` label)."""
    r = client.post("/v1/completions", json={"model": "tiny-a", "prompt": "日本の首都",
                                             "max_tokens": 0, "echo": True, "logprobs": 0})
    choice = r.json()["choices"][0]
    offsets, tokens = choice["logprobs"]["text_offset"], choice["logprobs"]["tokens"]
    assert any(t.startswith("bytes:") for t in tokens)  # the case under test happens
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert max(offsets) < len(choice["text"]) == 5


def test_special_tokens_are_not_text(client: httpx.Client, server: Any) -> None:
    """A reply that opens a new turn shows no `<|im_start|>` (it is not a stop token)."""
    start = server.workers["tiny-a"].tokenizer.token_to_id("<|im_start|>")
    assert start is not None
    out = chat(client, max_tokens=3, temperature=0, logit_bias={str(start): 100})
    assert out["usage"]["completion_tokens"] == 3
    assert "<|im_start|>" not in out["choices"][0]["message"]["content"]


def test_context_overflow_has_its_code(client: httpx.Client) -> None:
    r = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 10_000})
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_oversize_body_and_unknown_routes(client: httpx.Client) -> None:
    big = b'{"prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    r = client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks() -> Any:  # no Content-Length: the limit must hold for a streamed body too
        for _ in range(10):
            yield b"a" * (1024 * 1024)

    r = client.post("/v1/completions", content=chunks(),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


JSONS = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12)
FIELDS = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["tiny-a", "x", 3]), "messages": JSONS | st.just(HELLO),
    "prompt": JSONS, "max_tokens": JSONS | st.integers(-2, 300), "temperature": JSONS,
    "top_p": JSONS, "n": st.integers(-1, 20), "stop": JSONS, "logit_bias": JSONS,
    "logprobs": JSONS, "top_logprobs": JSONS, "stream": st.booleans(), "echo": JSONS,
    "seed": JSONS, "stream_options": JSONS,
})


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), body=FIELDS)
def test_random_bodies_never_break_the_server(client: httpx.Client, path: str,
                                              body: dict[str, Any]) -> None:
    if isinstance(body.get("max_tokens"), int) and body.get("n", 1) == 1:
        body["max_tokens"] = min(body["max_tokens"], 8)
    else:
        body["max_tokens"] = 4
    r = client.post(path, json=body)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# ---- continuous batching --------------------------------------------------------------------


def stream_text(url: str, body: dict[str, Any], out: dict[int, str], key: int) -> None:
    with httpx.Client(base_url=url, timeout=120) as c, \
            c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        finish = None
        parts = []
        for chunk in sse_events(r.iter_lines()):
            for choice in chunk["choices"]:
                parts.append(choice["delta"].get("content", ""))
                finish = choice["finish_reason"] or finish
        assert finish in ("stop", "length")
        out[key] = "".join(parts)


def test_sixteen_concurrent_streams_match_solo_runs(client: httpx.Client, server: Any) -> None:
    """Each client's streamed text equals what the same request gets alone: nothing is lost or
    mixed between rows that join and leave the batch at different steps."""
    bodies = {i: {"model": "tiny-a", "seed": 100 + i, "temperature": 0.8 + 0.02 * i,
                  "max_tokens": 8 + 3 * i, "ignore_eos": i % 2 == 0,
                  "messages": [{"role": "user", "content": f"Question number {i}?"}]}
              for i in range(16)}
    alone: dict[int, str] = {}
    for i, body in bodies.items():
        alone[i] = chat(client, **{k: v for k, v in body.items() if k != "model"}
                        )["choices"][0]["message"]["content"]
    before = server.workers["tiny-a"].stats.peak_running
    together: dict[int, str] = {}
    threads = [threading.Thread(target=stream_text, args=(server.url, b, together, i))
               for i, b in bodies.items()]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert together == alone
    assert server.workers["tiny-a"].stats.peak_running >= max(before, 8)  # they shared steps


def test_disconnect_mid_stream_frees_the_row(client: httpx.Client, server: Any) -> None:
    worker = server.workers["tiny-b"]
    aborted = worker.stats.aborted
    body = {"model": "tiny-b", "messages": HELLO, "max_tokens": 200, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as c, \
            c.stream("POST", "/v1/chat/completions", json=body) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                break  # leaving the block closes the connection mid-stream
    deadline = time.time() + 10
    while (worker.running or worker.stats.aborted == aborted) and time.time() < deadline:
        time.sleep(0.02)
    assert worker.running == 0 and worker.stats.aborted == aborted + 1
    health = client.get("/health").json()["models"]["tiny-b"]
    assert health["running"] == 0
    # The freed row is usable straight away.
    r = client.post("/v1/chat/completions", json={"model": "tiny-b", "messages": HELLO,
                                                  "max_tokens": 3})
    assert r.status_code == 200


# ---- auth -----------------------------------------------------------------------------------


def test_api_key(tmp_path: Path) -> None:
    worker = ModelWorker("tiny", tiny_model(0, CONTEXT), tokenizer(), max_batch_size=2)
    app = create_app([worker], Store(tmp_path / "s.db"), api_key="sekrit")
    with ThreadServer(app) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        r = c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/ui/api/chat", json={}).status_code == 401
        ok = c.get("/v1/models", headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200
        assert c.get("/health").json()["auth"] is True  # the page must learn it needs a key
        assert c.get("/").status_code == 200


def test_api_key_with_non_ascii_characters(tmp_path: Path) -> None:
    worker = ModelWorker("tiny", tiny_model(0, CONTEXT), tokenizer(), max_batch_size=2)
    app = create_app([worker], Store(tmp_path / "s.db"), api_key="sécret")
    with ThreadServer(app) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        utf8 = {"Authorization": "Bearer sécret".encode()}
        assert c.get("/v1/models", headers=utf8).status_code == 200
        latin1 = {"Authorization": "Bearer sécret".encode("latin-1")}
        assert c.get("/v1/models", headers=latin1).status_code == 401


def test_responses_are_json_with_utf8(client: httpx.Client) -> None:
    r = client.post("/tokenize", json={"prompt": "言の葉"})
    assert r.headers["content-type"].startswith("application/json")
    assert json.loads(r.content.decode("utf-8"))["count"] > 0


# ---- the official openai client -------------------------------------------------------------


def test_official_openai_client(server: Any) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny-a", "tiny-b"]

    reply = client.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=8,
                                           seed=4, logprobs=True, top_logprobs=2)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens <= 8
    assert choice.logprobs is not None and len(choice.logprobs.content[0].top_logprobs) == 2

    stream = client.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=8,
                                            seed=4, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == reply.usage.total_tokens

    done = client.completions.create(model="tiny-b", prompt=["The river", "The bank"],
                                     max_tokens=4, seed=1, echo=True, logprobs=1)
    assert len(done.choices) == 2 and done.choices[0].text.startswith("The river")
    pieces = [c.choices[0].text for c in client.completions.create(
        model="tiny-b", prompt="The river", max_tokens=4, seed=1, stream=True)]
    assert "".join(pieces) == done.choices[0].text[len("The river"):]

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=HELLO)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-a", messages=HELLO, temperature=7)
    assert info.value.param == "temperature"


def test_non_streaming_client_that_hangs_up_is_aborted(server: Any) -> None:
    worker = server.workers["tiny-b"]
    aborted = worker.stats.aborted
    body = {"model": "tiny-b", "messages": HELLO, "max_tokens": 200, "ignore_eos": True,
            "n": 16}  # 3200 tokens: far more than can come back before the client gives up
    with pytest.raises(httpx.TimeoutException), httpx.Client(base_url=server.url) as c:
        c.post("/v1/chat/completions", json=body, timeout=0.1)
    deadline = time.time() + 10
    while worker.running and time.time() < deadline:
        time.sleep(0.02)
    assert worker.running == 0 and worker.stats.aborted > aborted
