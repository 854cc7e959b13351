"""SQLite store for the web UI: conversations, messages, feedback, arena battles and votes.

WAL mode with `synchronous=FULL`: a write returns only after its transaction is in the
write-ahead log on disk, so a server killed with SIGKILL (or a power cut) loses nothing it
had answered "saved" for. WAL also lets `kotonoha feedback export` read while the server writes.

Messages form a tree: a regenerated answer is a sibling of the answer it replaces (same parent
user message), an edited question a sibling of the question it replaces. A conversation
remembers the leaf the user is looking at (`current_leaf`); the path from the root to it is
the conversation as shown. Siblings with opposite thumbs are the preference pairs that
`preference_pairs` exports, together with decided arena votes.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kotonoha.errors import UserError

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id            TEXT PRIMARY KEY,
    title         TEXT NOT NULL,
    model         TEXT,
    system_prompt TEXT NOT NULL DEFAULT '',
    params        TEXT NOT NULL DEFAULT '{}',  -- JSON: the sampling settings last used
    current_leaf  TEXT,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id                TEXT PRIMARY KEY,
    conversation_id   TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    parent_id         TEXT REFERENCES messages(id) ON DELETE CASCADE,
    role              TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content           TEXT NOT NULL,
    model             TEXT,
    params            TEXT,  -- JSON: system prompt and sampling settings that produced it
    finish_reason     TEXT,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    created_at        REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation_id, created_at);
CREATE INDEX IF NOT EXISTS messages_by_parent ON messages (parent_id);
CREATE TABLE IF NOT EXISTS feedback (
    message_id TEXT PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
    rating     INTEGER NOT NULL CHECK (rating IN (-1, 0, 1)),
    comment    TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS battles (
    id         TEXT PRIMARY KEY,
    messages   TEXT NOT NULL,  -- JSON: the prompt, as chat messages
    model_a    TEXT NOT NULL,
    model_b    TEXT NOT NULL,
    answer_a   TEXT NOT NULL,
    answer_b   TEXT NOT NULL,
    params     TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS votes (
    battle_id  TEXT PRIMARY KEY REFERENCES battles(id) ON DELETE CASCADE,
    winner     TEXT NOT NULL CHECK (winner IN ('a', 'b', 'tie', 'both_bad')),
    created_at REAL NOT NULL
);
"""

WINNERS = ("a", "b", "tie", "both_bad")
TABLES = ("conversations", "messages", "feedback", "battles", "votes")
_JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u9fff]")


class NotFound(LookupError):
    """No row with that id."""


class Conflict(ValueError):
    """The change contradicts what is stored (e.g. a second vote on one battle)."""


def _new_id() -> str:
    return uuid.uuid4().hex


def _now() -> float:
    return time.time()


class Store:
    """One SQLite connection shared by the server's threads, serialised by a lock (SQLite
    allows one writer at a time anyway; each call is a short transaction)."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        """`readonly` (the export): open an existing store without writing to it, not even
        the schema or the WAL switch, and refuse a database that is not a kotonoha store."""
        self.path = Path(path)
        if str(path) != ":memory:" and not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if readonly:  # mode=ro: SQLite itself refuses every write on this connection
                self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                           check_same_thread=False, isolation_level=None,
                                           timeout=30)
            else:
                self._db = sqlite3.connect(str(path), check_same_thread=False,
                                           isolation_level=None, timeout=30)
            self._db.row_factory = sqlite3.Row
            if not readonly:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise UserError(f"{path} was written by a newer kotonoha (store schema "
                                f"{version}); upgrade kotonoha to open it.")
            if readonly:
                tables = {r[0] for r in self._db.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'")}
                if not set(TABLES) <= tables:
                    self._db.close()
                    raise UserError(f"{path} is not a kotonoha feedback database.")
            else:
                self._db.executescript(SCHEMA)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise UserError(f"{path} is not a usable SQLite database ({e}); point --db at "
                            "another file.") from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction; committed (durably) when the block ends without an exception."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    # ---- conversations ---------------------------------------------------------------------

    def create_conversation(self, title: str, *, model: str | None = None,
                            system_prompt: str = "", params: dict[str, Any] | None = None
                            ) -> dict[str, Any]:
        cid, now = _new_id(), _now()
        with self._tx() as db:
            db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?, NULL, ?, ?)",
                       (cid, title, model, system_prompt, json.dumps(params or {}), now, now))
        return self.conversation(cid)

    def conversation(self, cid: str) -> dict[str, Any]:
        rows = self._read("SELECT * FROM conversations WHERE id = ?", (cid,))
        if not rows:
            raise NotFound(f"There is no conversation {cid}.")
        return _decode(rows[0])

    def conversations(self) -> list[dict[str, Any]]:
        """All conversations, most recently updated first."""
        return [_decode(r) for r in self._read(
            "SELECT * FROM conversations ORDER BY updated_at DESC, created_at DESC")]

    def update_conversation(self, cid: str, **fields: Any) -> dict[str, Any]:
        allowed = {"title", "model", "system_prompt", "params", "current_leaf"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)}")
        if "params" in fields:
            fields["params"] = json.dumps(fields["params"] or {})
        if "current_leaf" in fields and fields["current_leaf"] is not None:
            msg = self.message(fields["current_leaf"])
            if msg["conversation_id"] != cid:
                raise Conflict("That message belongs to another conversation.")
        with self._tx() as db:
            sets = ", ".join(f"{k} = ?" for k in fields)
            cur = db.execute(f"UPDATE conversations SET {sets}, updated_at = ? WHERE id = ?",
                             (*fields.values(), _now(), cid))
            if cur.rowcount == 0:
                raise NotFound(f"There is no conversation {cid}.")
        return self.conversation(cid)

    def delete_conversation(self, cid: str) -> None:
        with self._tx() as db:
            if db.execute("DELETE FROM conversations WHERE id = ?", (cid,)).rowcount == 0:
                raise NotFound(f"There is no conversation {cid}.")

    # ---- messages --------------------------------------------------------------------------

    def add_message(self, conversation_id: str, parent_id: str | None, role: str, content: str,
                    *, model: str | None = None, params: dict[str, Any] | None = None,
                    finish_reason: str | None = None, prompt_tokens: int | None = None,
                    completion_tokens: int | None = None) -> dict[str, Any]:
        """Append a message under `parent_id` (None: a first message) and make it the
        conversation's current leaf, in one transaction."""
        mid, now = _new_id(), _now()
        with self._tx() as db:
            if parent_id is not None:
                parent = db.execute("SELECT conversation_id FROM messages WHERE id = ?",
                                    (parent_id,)).fetchone()
                if parent is None or parent[0] != conversation_id:
                    raise NotFound(f"There is no message {parent_id} in conversation "
                                   f"{conversation_id}.")
            db.execute(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (mid, conversation_id, parent_id, role, content, model,
                 None if params is None else json.dumps(params), finish_reason, prompt_tokens,
                 completion_tokens, now))
            cur = db.execute("UPDATE conversations SET current_leaf = ?, updated_at = ? "
                             "WHERE id = ?", (mid, now, conversation_id))
            if cur.rowcount == 0:
                raise NotFound(f"There is no conversation {conversation_id}.")
        return self.message(mid)

    def message(self, mid: str) -> dict[str, Any]:
        rows = self._read(
            "SELECT m.*, f.rating, f.comment FROM messages m "
            "LEFT JOIN feedback f ON f.message_id = m.id WHERE m.id = ?", (mid,))
        if not rows:
            raise NotFound(f"There is no message {mid}.")
        return _decode(rows[0])

    def messages(self, conversation_id: str) -> list[dict[str, Any]]:
        """Every message of a conversation (all branches), oldest first, with feedback."""
        return [_decode(r) for r in self._read(
            "SELECT m.*, f.rating, f.comment FROM messages m "
            "LEFT JOIN feedback f ON f.message_id = m.id "
            "WHERE m.conversation_id = ? ORDER BY m.created_at, m.rowid", (conversation_id,))]

    def path_to(self, mid: str) -> list[dict[str, Any]]:
        """The messages from the root down to `mid`, inclusive."""
        rows = self._read(
            "WITH RECURSIVE up(id, parent_id, depth) AS ("
            "  SELECT id, parent_id, 0 FROM messages WHERE id = ?"
            "  UNION ALL SELECT m.id, m.parent_id, up.depth + 1 FROM messages m"
            "  JOIN up ON m.id = up.parent_id)"
            " SELECT m.* FROM up JOIN messages m ON m.id = up.id ORDER BY up.depth DESC",
            (mid,))
        if not rows:
            raise NotFound(f"There is no message {mid}.")
        return [_decode(r) for r in rows]

    def set_feedback(self, mid: str, rating: int, comment: str = "") -> dict[str, Any]:
        if rating not in (-1, 0, 1):
            raise ValueError("rating must be -1, 0 or 1")
        with self._tx() as db:
            role = db.execute("SELECT role FROM messages WHERE id = ?", (mid,)).fetchone()
            if role is None:
                raise NotFound(f"There is no message {mid}.")
            if role[0] != "assistant":
                raise Conflict("Only the assistant's answers can be rated.")
            db.execute("INSERT INTO feedback VALUES (?, ?, ?, ?) ON CONFLICT (message_id) DO "
                       "UPDATE SET rating = excluded.rating, comment = excluded.comment, "
                       "updated_at = excluded.updated_at", (mid, rating, comment, _now()))
        return self.message(mid)

    # ---- arena -----------------------------------------------------------------------------

    def add_battle(self, messages: list[dict[str, str]], model_a: str, model_b: str,
                   answer_a: str, answer_b: str, params: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
        bid = _new_id()
        with self._tx() as db:
            db.execute("INSERT INTO battles VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (bid, json.dumps(messages, ensure_ascii=False), model_a, model_b,
                        answer_a, answer_b, json.dumps(params or {}), _now()))
        return self.battle(bid)

    def battle(self, bid: str) -> dict[str, Any]:
        rows = self._read("SELECT b.*, v.winner FROM battles b "
                          "LEFT JOIN votes v ON v.battle_id = b.id WHERE b.id = ?", (bid,))
        if not rows:
            raise NotFound(f"There is no battle {bid}.")
        return _decode(rows[0])

    def vote(self, bid: str, winner: str) -> dict[str, Any]:
        if winner not in WINNERS:
            raise ValueError(f"winner must be one of {', '.join(WINNERS)}")
        with self._tx() as db:
            if db.execute("SELECT 1 FROM battles WHERE id = ?", (bid,)).fetchone() is None:
                raise NotFound(f"There is no battle {bid}.")
            try:
                db.execute("INSERT INTO votes VALUES (?, ?, ?)", (bid, winner, _now()))
            except sqlite3.IntegrityError:
                raise Conflict("This battle already has a vote.") from None
        return self.battle(bid)

    def votes(self) -> list[tuple[str, str, str]]:
        """(model_a, model_b, winner) of every vote, oldest first (the order Elo needs)."""
        rows = self._read("SELECT b.model_a, b.model_b, v.winner FROM votes v "
                          "JOIN battles b ON b.id = v.battle_id ORDER BY v.created_at, v.rowid")
        return [(r["model_a"], r["model_b"], r["winner"]) for r in rows]

    # ---- preference data -------------------------------------------------------------------

    def preference_pairs(self) -> Iterator[dict[str, Any]]:
        """Pairs in the format `kotonoha reward` reads: {"prompt": [messages], "chosen",
        "rejected", "kind", "lang", "split"}.

        kind "feedback": two answers to the same question (one regenerated), one thumbed up and
        one thumbed down. kind "arena": a battle voted A or B (ties and "both bad" say nothing
        about which is better, so they are skipped). Two identical texts teach nothing (and
        `kotonoha reward` refuses them): a seeded regeneration or two models that answered
        alike are skipped too.
        """
        rated = self._read(
            "SELECT m.id, m.parent_id, m.content, m.params, m.conversation_id, f.rating "
            "FROM messages m JOIN feedback f ON f.message_id = m.id "
            "WHERE m.role = 'assistant' AND f.rating != 0 AND m.parent_id IS NOT NULL "
            "ORDER BY m.created_at, m.rowid")
        by_parent: dict[str, list[dict[str, Any]]] = {}
        for r in rated:
            by_parent.setdefault(r["parent_id"], []).append(r)
        for parent_id, answers in by_parent.items():
            ups = [a for a in answers if a["rating"] > 0]
            downs = [a for a in answers if a["rating"] < 0]
            if not ups or not downs:
                continue
            path = [{"role": m["role"], "content": m["content"]} for m in self.path_to(parent_id)]
            for up in ups:
                system = json.loads(up["params"] or "{}").get("system") or ""
                prompt = ([{"role": "system", "content": system}] if system else []) + path
                for down in downs:
                    if up["content"] == down["content"]:
                        continue
                    yield _pair(prompt, up["content"], down["content"], "feedback",
                                {"conversation_id": up["conversation_id"],
                                 "chosen_id": up["id"], "rejected_id": down["id"]})
        for b in self._read("SELECT b.*, v.winner FROM battles b JOIN votes v "
                            "ON v.battle_id = b.id WHERE v.winner IN ('a', 'b') "
                            "ORDER BY v.created_at, v.rowid"):
            a_wins = b["winner"] == "a"
            if b["answer_a"] == b["answer_b"]:
                continue
            yield _pair(json.loads(b["messages"]),
                        b["answer_a"] if a_wins else b["answer_b"],
                        b["answer_b"] if a_wins else b["answer_a"], "arena",
                        {"battle_id": b["id"],
                         "chosen_model": b["model_a"] if a_wins else b["model_b"],
                         "rejected_model": b["model_b"] if a_wins else b["model_a"]})


def _pair(prompt: list[dict[str, str]], chosen: str, rejected: str, kind: str,
          source: dict[str, Any]) -> dict[str, Any]:
    text = " ".join(m["content"] for m in prompt)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": kind,
            "lang": "ja" if _JAPANESE.search(text) else "en", "split": "train",
            "source": source}


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    for key in ("params", "messages"):
        if isinstance(row.get(key), str):
            row[key] = json.loads(row[key])
    return row
