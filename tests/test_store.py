"""The SQLite store: message trees, feedback, battles, the preference export, and durability
(a server killed with SIGKILL keeps every message and vote it acknowledged)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from pathlib import Path

import httpx
import pytest

from kotonoha.errors import UserError
from kotonoha.feedback import export_preferences, feedback_export_main
from kotonoha.serve.store import Conflict, NotFound, Store
from serve_testing import save_tiny, sse_events, subprocess_server


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "kotonoha.db")
    yield s
    s.close()


def test_wal_mode_and_schema(store: Store) -> None:
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"conversations", "messages", "feedback", "battles", "votes"} <= tables
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1


def test_message_tree_and_current_leaf(store: Store) -> None:
    c = store.create_conversation("capitals", model="m", system_prompt="Be brief.")
    q = store.add_message(c["id"], None, "user", "Capital of Aurel?")
    a1 = store.add_message(c["id"], q["id"], "assistant", "Velm.", model="m",
                           params={"temperature": 0.8}, finish_reason="stop")
    a2 = store.add_message(c["id"], q["id"], "assistant", "Dorn.", model="m")  # regenerated
    q2 = store.add_message(c["id"], None, "user", "Capital of Aurel, please?")  # edited
    assert store.conversation(c["id"])["current_leaf"] == q2["id"]
    assert [m["id"] for m in store.path_to(a2["id"])] == [q["id"], a2["id"]]
    assert [m["id"] for m in store.messages(c["id"])] == [q["id"], a1["id"], a2["id"], q2["id"]]
    assert store.message(a1["id"])["params"] == {"temperature": 0.8}
    store.update_conversation(c["id"], current_leaf=a1["id"], title="renamed")
    assert store.conversation(c["id"])["current_leaf"] == a1["id"]
    assert store.conversations()[0]["title"] == "renamed"
    with pytest.raises(NotFound):
        store.add_message(c["id"], "no-such-message", "user", "x")
    other = store.create_conversation("other")
    with pytest.raises(NotFound):  # a parent from another conversation
        store.add_message(other["id"], q["id"], "assistant", "x")
    with pytest.raises(Conflict):
        store.update_conversation(other["id"], current_leaf=q["id"])
    store.delete_conversation(c["id"])
    with pytest.raises(NotFound):
        store.message(q["id"])  # cascaded


def test_feedback_is_one_per_answer(store: Store) -> None:
    c = store.create_conversation("t")
    q = store.add_message(c["id"], None, "user", "Hi")
    a = store.add_message(c["id"], q["id"], "assistant", "Hello")
    store.set_feedback(a["id"], 1, "nice")
    assert (store.message(a["id"])["rating"], store.message(a["id"])["comment"]) == (1, "nice")
    store.set_feedback(a["id"], -1, "changed my mind")
    assert store.message(a["id"])["rating"] == -1
    with pytest.raises(Conflict):
        store.set_feedback(q["id"], 1)  # questions are not rated
    with pytest.raises(NotFound):
        store.set_feedback("missing", 1)
    with pytest.raises(ValueError):
        store.set_feedback(a["id"], 2)


def test_votes(store: Store) -> None:
    b = store.add_battle([{"role": "user", "content": "Hi"}], "m1", "m2", "Hello", "Yo")
    assert b["winner"] is None
    assert store.vote(b["id"], "b")["winner"] == "b"
    with pytest.raises(Conflict):
        store.vote(b["id"], "a")
    with pytest.raises(NotFound):
        store.vote("missing", "a")
    with pytest.raises(ValueError):
        store.vote(b["id"], "draw")
    assert store.votes() == [("m1", "m2", "b")]


def test_preference_pairs_and_export(store: Store, tmp_path: Path) -> None:
    c = store.create_conversation("t", system_prompt="Be kind.")
    q1 = store.add_message(c["id"], None, "user", "Capital of Aurel?")
    a1 = store.add_message(c["id"], q1["id"], "assistant", "Velm.", params={"system": "Be kind."})
    q2 = store.add_message(c["id"], a1["id"], "user", "And its river?")
    good = store.add_message(c["id"], q2["id"], "assistant", "The Sorn.",
                             params={"system": "Be kind."})
    bad = store.add_message(c["id"], q2["id"], "assistant", "No idea, go away.",
                            params={"system": "Be kind."})
    unrated = store.add_message(c["id"], q2["id"], "assistant", "Hmm.")
    store.set_feedback(good["id"], 1)
    store.set_feedback(bad["id"], -1, "rude")
    store.set_feedback(a1["id"], 1)  # no sibling: no pair
    del unrated
    b1 = store.add_battle([{"role": "user", "content": "橋とは？"}], "m1", "m2", "川を渡る道。", "箸。")
    b2 = store.add_battle([{"role": "user", "content": "Hi"}], "m1", "m2", "Hello", "Hey")
    store.vote(b1["id"], "b")
    store.vote(b2["id"], "tie")  # says nothing about which is better

    pairs = list(store.preference_pairs())
    assert len(pairs) == 2
    fb, arena = pairs
    assert fb["kind"] == "feedback" and fb["lang"] == "en"
    assert fb["prompt"] == [{"role": "system", "content": "Be kind."},
                            {"role": "user", "content": "Capital of Aurel?"},
                            {"role": "assistant", "content": "Velm."},
                            {"role": "user", "content": "And its river?"}]
    assert (fb["chosen"], fb["rejected"]) == ("The Sorn.", "No idea, go away.")
    assert arena["kind"] == "arena" and arena["lang"] == "ja"
    assert (arena["chosen"], arena["rejected"]) == ("箸。", "川を渡る道。")
    assert arena["source"]["chosen_model"] == "m2"

    out = tmp_path / "prefs.jsonl"
    counts = export_preferences(store.path, out)
    assert counts == {"feedback": 1, "arena": 1}
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert lines == pairs
    for pair in lines:  # the keys `kotonoha reward` reads, as in the built-in world's pairs
        assert {"prompt", "chosen", "rejected", "kind"} <= set(pair)


def test_export_main_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError, match="does not exist"):
        feedback_export_main(tmp_path / "missing.db", tmp_path / "out.jsonl")
    Store(tmp_path / "empty.db").close()
    feedback_export_main(tmp_path / "empty.db", tmp_path / "out.jsonl")
    assert "wrote 0 preference pairs" in capsys.readouterr().out
    assert (tmp_path / "out.jsonl").read_text() == ""


def test_not_a_database(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UserError, match="not a usable SQLite database"):
        Store(bad)


@pytest.mark.slow
def test_sigkill_loses_no_acknowledged_message_or_vote(tmp_path: Path) -> None:
    """Chat turns and votes that the server answered are on disk even when the server is killed
    with SIGKILL straight after (no shutdown, no checkpoint of the WAL)."""
    save_tiny(tmp_path / "m1", seed=0)
    save_tiny(tmp_path / "m2", seed=1)
    db = tmp_path / "ui.db"
    models = [f"m1={tmp_path / 'm1'}", f"m2={tmp_path / 'm2'}"]
    saved_messages, voted = [], []
    with subprocess_server(models, db) as (proc, url), httpx.Client(base_url=url,
                                                                    timeout=60) as c:
        conversation, parent = None, None
        for i in range(3):
            body = {"conversation_id": conversation, "parent_id": parent, "model": "m1",
                    "content": f"question {i}", "params": {"max_tokens": 6}}
            with c.stream("POST", "/ui/api/chat", json=body) as r:
                events = list(sse_events(r.iter_lines()))
            for ev in events:
                if ev["type"] == "conversation":
                    conversation = ev["conversation"]["id"]
                if ev["type"] in ("user", "done"):
                    saved_messages.append(ev["message"]["id"])
            parent = events[-1]["message"]["id"]
        for _ in range(3):
            with c.stream("POST", "/ui/api/arena/battles",
                          json={"prompt": "Hello?", "params": {"max_tokens": 4}}) as r:
                battle = [e for e in sse_events(r.iter_lines()) if e["type"] == "battle"][0]
            assert c.post(f"/ui/api/arena/battles/{battle['id']}/vote",
                          json={"winner": "a"}).status_code == 200
            voted.append(battle["id"])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    reopened = Store(db)
    try:
        assert [m["id"] for m in reopened.messages(conversation)] == saved_messages
        assert len(saved_messages) == 6
        assert [reopened.battle(b)["winner"] for b in voted] == ["a"] * 3
        assert len(reopened.votes()) == 3
    finally:
        reopened.close()


def test_identical_answers_make_no_pair(store: Store, tmp_path: Path) -> None:
    """A seeded regeneration (or two models that answer alike) gives the same text twice;
    `kotonoha reward` refuses chosen == rejected, so the export must leave such pairs out."""
    c = store.create_conversation("same")
    q = store.add_message(c["id"], None, "user", "Capital of Aurel?")
    up = store.add_message(c["id"], q["id"], "assistant", "Velm.")
    down = store.add_message(c["id"], q["id"], "assistant", "Velm.")
    store.set_feedback(up["id"], 1)
    store.set_feedback(down["id"], -1)
    battle = store.add_battle([{"role": "user", "content": "Hi"}], "m1", "m2", "Hey", "Hey")
    store.vote(battle["id"], "a")
    out = tmp_path / "prefs.jsonl"
    assert export_preferences(store.path, out) == {}
    assert out.read_text(encoding="utf-8") == ""


def test_export_never_writes_to_its_input(tmp_path: Path) -> None:
    """The export opens the store read-only: an unrelated SQLite file or an empty file is
    refused and left as it was, and --out may not be the database itself or a directory."""
    other = tmp_path / "other.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    for path in (other, empty):
        before = path.read_bytes()
        with pytest.raises(UserError, match="is not a kotonoha feedback database"):
            export_preferences(path, tmp_path / "out.jsonl")
        assert path.read_bytes() == before
        assert not (tmp_path / "out.jsonl").exists()

    fb = tmp_path / "fb.db"
    s = Store(fb)
    c = s.create_conversation("c")
    q = s.add_message(c["id"], None, "user", "Q?")
    for text, rating in (("yes", 1), ("no", -1)):
        s.set_feedback(s.add_message(c["id"], q["id"], "assistant", text)["id"], rating)
    s.close()
    before = fb.read_bytes()
    for out in (fb, tmp_path / "." / "fb.db"):
        with pytest.raises(UserError, match="is the database itself"):
            export_preferences(fb, out)
    with pytest.raises(UserError, match="is a directory"):
        export_preferences(fb, tmp_path)
    assert export_preferences(fb, tmp_path / "prefs.jsonl") == {"feedback": 1}
    assert fb.read_bytes() == before
    reopened = Store(fb)  # the server's read-write use is unchanged
    try:
        assert len(list(reopened.preference_pairs())) == 1
        reopened.create_conversation("more")
    finally:
        reopened.close()
