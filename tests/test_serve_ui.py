"""The web UI's endpoints: chat turns saved as they stream, regenerate and edit as branches,
feedback, conversations that survive a restart, and the arena with its leaderboard."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from kotonoha.serve.app import create_app
from kotonoha.serve.store import Store
from kotonoha.serve.worker import ModelWorker
from serve_testing import ThreadServer, sse_events, tiny_model, tokenizer

PARAMS = {"max_tokens": 8, "temperature": 0.8}


def start(db: Path, n_models: int = 2) -> ThreadServer:
    workers = [ModelWorker(f"tiny-{i}", tiny_model(i), tokenizer(), max_batch_size=4)
               for i in range(n_models)]
    return ThreadServer(create_app(workers, Store(db)))


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ui") / "ui.db"


@pytest.fixture(scope="module")
def client(db: Path) -> Any:
    with start(db) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def turn(client: httpx.Client, **body: Any) -> list[dict[str, Any]]:
    body.setdefault("params", PARAMS)
    with client.stream("POST", "/ui/api/chat", json=body) as r:
        assert r.status_code == 200, r.read()
        return list(sse_events(r.iter_lines()))


def test_chat_turn_saves_question_and_streamed_answer(client: httpx.Client) -> None:
    events = turn(client, content="What is the capital of Aurel?", model="tiny-0",
                  system="Answer briefly.")
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["conversation", "user"] and kinds[-1] == "done"
    answer = events[-1]["message"]
    streamed = "".join(e["text"] for e in events if e["type"] == "delta")
    assert answer["content"] == streamed and answer["role"] == "assistant"
    assert answer["model"] == "tiny-0" and answer["completion_tokens"] <= 8
    assert answer["params"]["system"] == "Answer briefly."
    conv = events[0]["conversation"]
    assert conv["title"] == "What is the capital of Aurel?"
    saved = client.get(f"/ui/api/conversations/{conv['id']}").json()
    assert saved["conversation"]["current_leaf"] == answer["id"]
    assert saved["conversation"]["system_prompt"] == "Answer briefly."
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]


def test_multi_turn_regenerate_edit_and_feedback(client: httpx.Client) -> None:
    first = turn(client, content="Hello", model="tiny-0")
    cid = first[0]["conversation"]["id"]
    q1, a1 = first[1]["message"], first[-1]["message"]
    second = turn(client, conversation_id=cid, parent_id=a1["id"], content="And then?")
    q2, a2 = second[0]["message"], second[-1]["message"]
    assert q2["parent_id"] == a1["id"] and a2["parent_id"] == q2["id"]

    regen = turn(client, conversation_id=cid, parent_id=q2["id"])  # no content: regenerate
    assert [e["type"] for e in regen][-1] == "done" and "user" not in [e["type"] for e in regen]
    a2b = regen[-1]["message"]
    assert a2b["parent_id"] == q2["id"] and a2b["id"] != a2["id"]

    edited = turn(client, conversation_id=cid, parent_id=a1["id"], content="And after that?")
    q2b = edited[0]["message"]
    assert q2b["parent_id"] == a1["id"]  # a sibling of the question it replaces

    for mid, rating in ((a2["id"], 1), (a2b["id"], -1)):
        r = client.post(f"/ui/api/messages/{mid}/feedback",
                        json={"rating": rating, "comment": "why"})
        assert r.status_code == 200 and r.json()["rating"] == rating
    assert client.post(f"/ui/api/messages/{q1['id']}/feedback",
                       json={"rating": 1}).status_code == 409
    assert client.post(f"/ui/api/messages/{a2['id']}/feedback",
                       json={"rating": 5}).status_code == 400

    saved = client.get(f"/ui/api/conversations/{cid}").json()
    assert len(saved["messages"]) == 7
    assert saved["conversation"]["current_leaf"] == edited[-1]["message"]["id"]
    r = client.patch(f"/ui/api/conversations/{cid}", json={"current_leaf": a2["id"]})
    assert r.json()["current_leaf"] == a2["id"]


def test_turn_errors(client: httpx.Client) -> None:
    assert client.post("/ui/api/chat", json={"params": PARAMS}).status_code == 400
    assert client.post("/ui/api/chat", json={"content": " \n "}).status_code == 400
    r = client.post("/ui/api/chat", json={"content": "x", "model": "nope"})
    assert r.status_code == 404
    r = client.post("/ui/api/chat", json={"conversation_id": "missing", "content": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    first = turn(client, content="Hi")
    cid, answer = first[0]["conversation"]["id"], first[-1]["message"]
    r = client.post("/ui/api/chat", json={"conversation_id": cid, "parent_id": answer["id"]})
    assert r.status_code == 400  # only a question's answer can be regenerated
    r = client.post("/ui/api/chat", json={"content": "x", "params": {"temperature": -1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "params.temperature"


def test_a_rejected_turn_leaves_nothing_behind(client: httpx.Client) -> None:
    """Too long, or a setting the model refuses: a 400, and no conversation or unanswered
    question in the sidebar."""
    before = client.get("/ui/api/conversations").json()
    first = turn(client, content="Hi")
    cid, answer = first[0]["conversation"]["id"], first[-1]["message"]
    n_messages = len(client.get(f"/ui/api/conversations/{cid}").json()["messages"])
    bad_turns = [
        {"content": "Hello " * 400},  # over the context
        {"content": "Hello", "params": {"max_tokens": 4, "logit_bias": {"99999": 1}}},
        {"conversation_id": cid, "parent_id": answer["id"], "content": "Hello " * 400},
        {"conversation_id": cid, "parent_id": answer["id"], "content": "x", "system": "s",
         "params": {"max_tokens": 4, "logit_bias": {"99999": 1}}},
    ]
    for body in bad_turns:
        assert client.post("/ui/api/chat", json=body).status_code == 400
    after = client.get("/ui/api/conversations").json()
    assert len(after) == len(before) + 1
    saved = client.get(f"/ui/api/conversations/{cid}").json()
    assert len(saved["messages"]) == n_messages
    assert saved["conversation"]["system_prompt"] == ""
    other = turn(client, content="Hey")[-1]["message"]  # a message of another conversation
    r = client.post("/ui/api/chat", json={"conversation_id": cid, "parent_id": other["id"],
                                          "content": "x"})
    assert r.status_code == 404


def test_stopped_answer_is_kept(client: httpx.Client) -> None:
    body = {"content": "Tell me a long story", "params": {"max_tokens": 200,
                                                          "ignore_eos": True}}
    with client.stream("POST", "/ui/api/chat", json=body) as r:
        events = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                events += list(sse_events(iter([line])))
            if sum(e["type"] == "delta" for e in events) >= 3:
                break  # the user pressed Stop
    cid = events[0]["conversation"]["id"]
    for _ in range(200):
        messages = client.get(f"/ui/api/conversations/{cid}").json()["messages"]
        if len(messages) == 2:
            break
        time.sleep(0.02)
    answer = messages[-1]
    assert answer["role"] == "assistant" and answer["finish_reason"] == "abort"
    assert answer["content"].startswith("".join(e["text"] for e in events if e["type"] == "delta"))


def test_arena_vote_changes_the_leaderboard(client: httpx.Client) -> None:
    before = client.get("/ui/api/arena/leaderboard").json()
    assert {m["model"] for m in before["models"]} == {"tiny-0", "tiny-1"}
    with client.stream("POST", "/ui/api/arena/battles",
                       json={"prompt": "Which river is longest?", "params": PARAMS}) as r:
        events = list(sse_events(r.iter_lines()))
    assert {e["side"] for e in events if e["type"] == "finished"} == {"a", "b"}
    battle = events[-1]
    assert battle["type"] == "battle" and "model_a" not in battle  # anonymous until the vote
    result = client.post(f"/ui/api/arena/battles/{battle['id']}/vote",
                         json={"winner": "a"}).json()
    assert {result["model_a"], result["model_b"]} == {"tiny-0", "tiny-1"}
    after = client.get("/ui/api/arena/leaderboard").json()
    assert after["votes"] == before["votes"] + 1
    top = after["models"][0]
    assert top["model"] == result["model_a"] and top["rating"] > 1000 and top["elo"] > 1000
    assert top["ci_low"] <= top["rating"] <= top["ci_high"]
    again = client.post(f"/ui/api/arena/battles/{battle['id']}/vote", json={"winner": "b"})
    assert again.status_code == 409
    assert client.post(f"/ui/api/arena/battles/{battle['id']}/vote",
                       json={"winner": "x"}).status_code == 400


def test_conversations_survive_a_restart(client: httpx.Client, db: Path) -> None:
    listed = client.get("/ui/api/conversations").json()
    assert listed
    with start(db, n_models=1) as server, httpx.Client(base_url=server.url) as c:
        assert c.get("/ui/api/conversations").json() == listed
        r = c.post("/ui/api/arena/battles", json={"prompt": "x"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "arena_needs_two_models"
    deleted = client.delete(f"/ui/api/conversations/{listed[-1]['id']}")
    assert deleted.status_code == 200
    assert len(client.get("/ui/api/conversations").json()) == len(listed) - 1


def test_page_and_static_files(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "kotonoha" in page.text
    assert "http://" not in page.text.replace("http://www.w3.org", "")  # nothing external
    for name in ("app.js", "style.css"):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and len(r.text) > 1000
        assert "https://" not in r.text and "cdn" not in r.text.lower()
