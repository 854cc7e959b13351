"""Chat data for post-training: conversations (SFT) and preference pairs (reward model, DPO).

File formats (JSONL, one object per line; the built-in world writes both, and
`kotonoha feedback export` writes the second):

    {"messages": [{"role": "system"|"user"|"assistant", "content": str, "train"?: bool}, ...]}
    {"prompt": [messages] | str, "chosen": str, "rejected": str, "margin"?: float,
     "split"?: "train"|"test", "kind"?: str}          ("messages" may stand for "prompt")

Everything is rendered with the model's own chat template (`Tokenizer.encode_chat`), so the
model is trained on exactly the token layout it will see when chatting. Loss masks cover the
assistant's tokens and the end-of-turn token that closes each of its turns; an assistant turn
with `"train": false` (the world's deliberately wrong answers) is context only.

Batches are pure functions of (step, rows) (the trainer core's contract, so a resumed run sees
the same data): the examples are shuffled once per epoch by a seeded permutation.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kotonoha.errors import UserError
from kotonoha.tokenizer import CHATML_TEMPLATE, GEMMA_TEMPLATE, ROLE_PATTERN, Tokenizer

IGNORE = -100  # label value that F.cross_entropy skips

# --- reading files --------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; a bad line is a UserError naming it."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"Data file {p} does not exist; check the path.")
    try:
        with p.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{p} line {n} is not valid JSON ({e.msg}); fix or remove "
                                    "that line.") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{p} line {n} is not a JSON object; each line must be one "
                                    "object like {\"messages\": [...]}.")
                yield n, obj
    except UnicodeDecodeError as e:
        raise UserError(f"{p} is not UTF-8 text ({e.reason}); convert it to UTF-8.") from None


def _paths(data: str | Sequence[str]) -> list[str]:
    paths = [data] if isinstance(data, str) else list(data)
    if not paths:
        raise UserError("No data files given; set data to a .jsonl file (or a list of them).")
    return paths


def _check_messages(msgs: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: messages must be a non-empty list of "
                        "{\"role\": ..., \"content\": ...} objects.")
    for i, m in enumerate(msgs):
        if (not isinstance(m, dict) or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)):
            raise UserError(f"{where}: message {i} needs a string \"role\" and a string "
                            "\"content\".")
        if not ROLE_PATTERN.fullmatch(m["role"]):  # templates write roles as trusted text
            raise UserError(f"{where}: message {i} has the role {m['role']!r}; a role must be "
                            "a plain name such as system, user or assistant.")
    return msgs


def load_conversations(data: str | Sequence[str]) -> list[list[dict[str, Any]]]:
    """The conversations of one or more JSONL files, each with >= 1 assistant turn to learn."""
    convs = []
    for path in _paths(data):
        for n, obj in read_jsonl(path):
            where = f"{path} line {n}"
            msgs = _check_messages(obj.get("messages"), where)
            if not any(m["role"] == "assistant" and m.get("train", True) for m in msgs):
                raise UserError(f"{where} has no assistant turn to learn from; every SFT "
                                "conversation needs at least one assistant message.")
            convs.append(msgs)
        if not convs:
            raise UserError(f"{path} holds no conversations; add lines like "
                            "{\"messages\": [{\"role\": \"user\", ...}, ...]}.")
    return convs


def clean_message(m: dict[str, Any]) -> dict[str, str]:
    return {"role": str(m["role"]), "content": str(m["content"])}


def cut_before_last_reply(messages: list[dict[str, Any]]) -> tuple[list[dict[str, str]],
                                                                   str | None]:
    """A conversation as a prompt: the turns before its last assistant reply, and that reply
    (None when it has none: then every turn is the prompt)."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        return [clean_message(m) for m in messages], None
    return [clean_message(m) for m in messages[:last]], str(messages[last].get("content", ""))


@dataclass
class PreferencePair:
    prompt: list[dict[str, Any]]  # the conversation before the answer
    chosen: str
    rejected: str
    margin: float = 0.0  # how much better chosen is (Llama 2's margin term); 0 = plain BT
    split: str = "train"
    kind: str | None = None


def _response_text(value: Any, key: str, where: str) -> str:
    # Also the conversational form of TRL datasets: [{"role": "assistant", "content": ...}].
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise UserError(f"{where}: \"{key}\" must be the text of an assistant reply.")
    return value


def load_preferences(data: str | Sequence[str]) -> list[PreferencePair]:
    pairs = []
    for path in _paths(data):
        for n, obj in read_jsonl(path):
            where = f"{path} line {n}"
            prompt = obj.get("prompt", obj.get("messages"))
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            prompt = _check_messages(prompt, where)
            chosen = _response_text(obj.get("chosen"), "chosen", where)
            rejected = _response_text(obj.get("rejected"), "rejected", where)
            if chosen == rejected:
                raise UserError(f"{where} has the same text as chosen and rejected, so it "
                                "prefers nothing; fix one of the two or remove the pair.")
            margin = obj.get("margin", 0.0)
            if not isinstance(margin, int | float) or isinstance(margin, bool):
                raise UserError(f"{where}: \"margin\" must be a number.")
            pairs.append(PreferencePair(prompt, chosen, rejected, float(margin),
                                        str(obj.get("split", "train")), obj.get("kind")))
        if not pairs:
            raise UserError(f"{path} holds no preference pairs; add lines like "
                            "{\"prompt\": [...], \"chosen\": ..., \"rejected\": ...}.")
    return pairs


def split_pairs(pairs: list[PreferencePair], test_fraction: float, seed: int,
                ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Pairs marked `"split": "test"` are held out; without any, a seeded random fraction is."""
    test = [p for p in pairs if p.split == "test"]
    if test:
        return [p for p in pairs if p.split != "test"], test
    if test_fraction <= 0 or len(pairs) < 2:
        return pairs, []
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_test = max(1, int(len(pairs) * test_fraction))
    held = set(order[:n_test].tolist())
    return ([p for i, p in enumerate(pairs) if i not in held],
            [p for i, p in enumerate(pairs) if i in held])


def train_test_pairs(data: str | Sequence[str], val_data: str | Sequence[str] | None,
                     test_fraction: float, seed: int, stage: str,
                     ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """The pairs a preference stage (reward, DPO) trains and evaluates on: `val_data` when
    given, else the held-out part of `data` (see `split_pairs`)."""
    train, test = split_pairs(load_preferences(data), test_fraction, seed)
    if val_data:
        test = load_preferences(val_data)
    if not train:
        raise UserError(f"{data} holds only test pairs; {stage} needs pairs to train on.")
    return train, test


def conversation_kinds(data: str | Sequence[str]) -> list[str | None]:
    """The "kind" field of each conversation, in `load_conversations`' order."""
    return [obj.get("kind") if isinstance(obj.get("kind"), str) else None
            for path in _paths(data) for _, obj in read_jsonl(path)]


def repeat_by_kind(convs: list[Any], kinds: list[str | None], weights: dict[str, float],
                   seed: int) -> list[Any]:
    """Each conversation of a kind with weight w counted w times: floor(w) copies, and one more
    for a seeded random (w - floor(w)) share of them; kinds without a weight count once."""
    rng = np.random.default_rng(seed)
    out = []
    for conv, kind in zip(convs, kinds):
        w = weights.get(kind, 1.0) if kind is not None else 1.0
        out += [conv] * (int(w) + (rng.random() < w - int(w)))
    return out


def split_conversations(convs: list[list[dict[str, Any]]], val_fraction: float, seed: int,
                        ) -> tuple[list[list[dict[str, Any]]], list[list[dict[str, Any]]]]:
    if val_fraction <= 0 or len(convs) < 2:
        return convs, []
    order = np.random.default_rng(seed).permutation(len(convs))
    held = set(order[:max(1, int(len(convs) * val_fraction))].tolist())
    return ([c for i, c in enumerate(convs) if i not in held],
            [c for i, c in enumerate(convs) if i in held])


# --- chat templates and encoding ------------------------------------------------------------


def ensure_chat_template(tok: Tokenizer, template: str | None, source: str) -> Tokenizer:
    """Give `tok` the chat template to train with: `template` (Jinja text or a .jinja file)
    if set, else its own, else Gemma's turn format or ChatML when its vocabulary has that
    format's control tokens."""
    if template:
        path = Path(template)
        if "{" not in template and path.is_file():
            template = path.read_text(encoding="utf-8")
        elif "{" not in template:
            raise UserError(f"chat_template '{template}' is neither a Jinja template nor an "
                            "existing .jinja file.")
        tok.chat_template = template
    elif tok.chat_template is None and _has_tokens(tok, "<start_of_turn>", "<end_of_turn>"):
        tok.chat_template = GEMMA_TEMPLATE  # a base Gemma: its turn tokens, never trained yet
    elif tok.chat_template is None:
        if not _has_tokens(tok, "<|im_start|>", "<|im_end|>"):
            raise UserError(f"{source} has no chat template and its vocabulary lacks the ChatML "
                            "tokens <|im_start|> and <|im_end|>; set chat_template= to a Jinja "
                            "template (text or a .jinja file) that uses the model's own tokens.")
        tok.chat_template = CHATML_TEMPLATE
    # The model must learn to end its turn with a token the engine stops at, or it never stops.
    ids, mask = tok.encode_chat([{"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello"}])
    if not any(m and i in tok.stop_ids for i, m in zip(ids, mask)):
        raise UserError(f"The chat template of {source} ends an assistant turn with no token "
                        "the tokenizer treats as a stop (eos or an end-of-turn token); fix "
                        "the template or the tokenizer's eos_token.")
    return tok


def _has_tokens(tok: Tokenizer, *tokens: str) -> bool:
    return all(tok.token_to_id(t) is not None for t in tokens)


def encode_conversation(tok: Tokenizer, messages: list[dict[str, Any]],
                        ) -> tuple[list[int], list[int]]:
    """Token ids and the 0/1 loss mask: assistant turns, minus those marked "train": false."""
    ids, mask = tok.encode_chat(messages)
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and m.get("train", True) is False:
            # The turn's tokens are what rendering messages[:i+1] adds to messages[:i].
            start = len(tok.encode_chat(messages[:i])[0]) if i else 0
            end = len(tok.encode_chat(messages[:i + 1])[0])
            mask[start:end] = [0] * (end - start)
    return ids, mask


def encode_response(tok: Tokenizer, prompt: list[dict[str, Any]], response: str,
                    ) -> tuple[list[int], list[int]]:
    """A prompt plus one assistant reply; the mask covers only that reply (and its end)."""
    n_prompt = len(tok.encode_chat(prompt, add_generation_prompt=True)[0])
    ids, mask = tok.encode_chat([*prompt, {"role": "assistant", "content": response}])
    mask[:n_prompt] = [0] * min(n_prompt, len(mask))
    if not any(mask):
        raise UserError("The chat template renders an assistant reply differently from its "
                        "generation prompt, so the reply's tokens cannot be located.")
    return ids, mask


# --- batches --------------------------------------------------------------------------------


def epoch_rows(step: int, batch_size: int, rows: Sequence[int], n: int, seed: int,
               ) -> list[int]:
    """Example indices of rows `rows` of step `step`: a new seeded permutation every epoch."""
    out = []
    for r in rows:
        g = step * batch_size + r
        out.append(int(_permutation(n, seed, g // n)[g % n]))
    return out


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def pad_id(tok: Tokenizer) -> int:
    """Filler for padded positions (never a target, and causal attention never looks ahead)."""
    return tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)


class SFTData:
    """Encoded conversations, truncated to the context, optionally packed, as (x, y, mask).

    Batches are padding-free: the step's examples are laid end to end in as few rows of
    `context` tokens as they fit in, with `segments` (which example each token belongs to)
    and `positions` (restarting at 0 per example), so that each example is computed exactly
    as if it had its own row. Padding every example to the longest of the step instead wasted
    half the work on the world's SFT set (short conversations next to long replay documents).
    """

    def __init__(self, tok: Tokenizer, convs: list[list[dict[str, Any]]], context: int, *,
                 pack: bool = False, seed: int = 0, replay: Sequence[str] = ()) -> None:
        """`replay`: plain documents mixed in with loss on every token, framed by the
        end-of-text token as in the pretraining shards (keeps pretraining knowledge alive)."""
        self.seed, self.context = seed, context
        self.pad_id = pad_id(tok)
        encoded = [encode_conversation(tok, msgs) for msgs in convs]
        if replay:
            if tok.eos_id is None:
                raise UserError("Replay needs the tokenizer's end-of-text token, which it has "
                                "not got.")
            for ids in tok.encode_batch(list(replay)):
                ids = [tok.eos_id, *ids, tok.eos_id]
                encoded.append((ids, [1] * len(ids)))
        examples, self.truncated, emptied = [], 0, 0
        for ids, mask in encoded:
            if len(ids) > context + 1:  # x and y are windows of `context` tokens
                self.truncated += 1
                ids, mask = ids[:context + 1], mask[:context + 1]
                emptied += not any(mask[1:])  # the cut took every token it had to learn
            examples.append((ids, mask))
        if encoded and emptied == len(encoded):
            raise UserError(f"The context ({context} tokens) cuts off every assistant reply, "
                            "so no token is left to learn or score; raise context_length or "
                            "shorten the conversations.")
        if emptied:
            print(f"warning: {emptied} of {len(encoded)} examples lost all their assistant "
                  f"tokens to the context ({context} tokens) and teach nothing.",
                  file=sys.stderr)
        if pack:
            examples = _pack(examples, context + 1)
        self.examples = examples
        # Tokens with loss per example; a whole step's count normalises the loss (see batch).
        self.n_targets = [sum(m[1:]) for _, m in examples]
        if self.truncated:
            print(f"note: {self.truncated} of {len(encoded)} examples were longer than the "
                  f"context ({context} tokens) and were cut.", file=sys.stderr)

    def __len__(self) -> int:
        return len(self.examples)

    def logits_share(self) -> float:
        """The share of tokens in the loss: the only ones the output head runs on."""
        return sum(self.n_targets) / max(1, sum(len(ids) - 1 for ids, _ in self.examples))

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        """Examples `idx` in padding-free rows (`collate_replies`): x, y, mask, positions and
        segments, each (rows, width <= context)."""
        b = collate_replies([self.examples[i] for i in idx], self.pad_id, self.context + 1)
        return {"x": b["ids"][:, :-1], "y": b["ids"][:, 1:], "mask": b["mask"],
                "positions": b["positions"][:, :-1], "segments": b["segments"][:, :-1]}

    def batch(self, step: int, batch_size: int, rows: range) -> dict[str, torch.Tensor]:
        """Rows `rows` of step `step`'s batch. `scale` makes the accumulated gradient that of
        the mean over every assistant token of the whole step, however they fall into
        micro-batches and ranks (a mean per micro-batch would over-weight short replies)."""
        out = self.collate(epoch_rows(step, batch_size, rows, len(self), self.seed))
        step_idx = epoch_rows(step, batch_size, range(batch_size), len(self), self.seed)
        n_step = sum(self.n_targets[i] for i in step_idx)
        # The trainer averages micro-batches (1/accum) and DDP averages ranks (1/world):
        # batch_size / len(rows) = accum * world undoes both.
        out["scale"] = torch.tensor(batch_size / len(rows) / max(1, n_step))
        return out


def pack_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows holding at most `width` tokens each (first fit,
    longest first: deterministic, and within a row or two of the fewest possible)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
        if r is None:
            rows.append([])
            free.append(width)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= lengths[i]
    return rows


def _pack(examples: list[tuple[list[int], list[int]]], width: int,
          ) -> list[tuple[list[int], list[int]]]:
    """Greedily concatenate whole conversations into rows of at most `width` tokens.

    Conversations in one row can attend to the ones before them (no block-diagonal mask):
    the usual simple packing, and harmless since every turn is still rendered in full.
    """
    rows: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    mask: list[int] = []
    for e_ids, e_mask in examples:
        if ids and len(ids) + len(e_ids) > width:
            rows.append((ids, mask))
            ids, mask = [], []
        ids, mask = ids + e_ids, mask + e_mask
    if ids:
        rows.append((ids, mask))
    return rows


class PairData:
    """Encoded preference pairs. A batch holds the chosen replies in its first half of rows
    and the rejected ones in the second, so one forward pass scores both."""

    def __init__(self, tok: Tokenizer, pairs: list[PreferencePair], context: int, *,
                 seed: int = 0) -> None:
        self.seed, self.context = seed, context
        self.pad_id = pad_id(tok)
        self.pairs = pairs
        self.chosen = [fit_context(*encode_response(tok, p.prompt, p.chosen), context)
                       for p in pairs]
        self.rejected = [fit_context(*encode_response(tok, p.prompt, p.rejected), context)
                         for p in pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def logits_share(self) -> float:
        """The share of tokens in the replies: the only ones the output head runs on."""
        seqs = self.chosen + self.rejected
        return sum(sum(m) for _, m in seqs) / max(1, sum(len(ids) for ids, _ in seqs))

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        out = collate_replies([self.chosen[i] for i in idx] + [self.rejected[i] for i in idx],
                              self.pad_id, self.context)
        out["margin"] = torch.tensor([self.pairs[i].margin for i in idx], dtype=torch.float32)
        return out

    def batch(self, step: int, batch_size: int, rows: range) -> dict[str, torch.Tensor]:
        return self.collate(epoch_rows(step, batch_size, rows, len(self), self.seed))

    def chunks(self, size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Every pair once, in order (evaluation)."""
        for i in range(0, len(self), size):
            yield self.collate(list(range(i, min(len(self), i + size))))


def fit_context(ids: list[int], mask: list[int], context: int) -> tuple[list[int], list[int]]:
    """Keep the last `context` tokens: the reply (and its end) matters more than the start."""
    return ids[-context:], mask[-context:]


def collate_replies(seqs: list[tuple[list[int], list[int]]], fill: int,
                    width: int | None = None) -> dict[str, torch.Tensor]:
    """Prompt + reply sequences laid end to end, padding-free, in rows of at most `width`
    tokens (default: the longest sequence), each its own segment with positions from 0.

    ids, positions, segments: (rows, W); mask: the reply mask aligned with the targets
    ids[:, 1:]; seq: which sequence each target belongs to (-1: none); last: (sequences,)
    the index in ids.flatten() of each reply's last token (its end-of-turn token: where a
    reward model reads its score; a sequence's last token if it has no reply). `per_sequence`
    sums per-target values by sequence. SFT batches are these rows shifted into (x, y).
    """
    lengths = [len(s[0]) for s in seqs]
    rows = pack_rows(lengths, max(width or 0, *lengths))
    W = max(sum(lengths[j] for j in row) for row in rows)
    ids = torch.full((len(rows), W), fill, dtype=torch.long)
    positions, segments = torch.zeros_like(ids), torch.full_like(ids, -1)
    mask = torch.zeros(ids.shape)
    last = torch.zeros(len(seqs), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for j in row:
            s_ids, s_mask = seqs[j]
            end = start + len(s_ids)
            ids[r, start:end] = torch.tensor(s_ids)
            mask[r, start:end] = torch.tensor(s_mask, dtype=mask.dtype)
            positions[r, start:end] = torch.arange(end - start)
            segments[r, start:end] = j
            last[j] = r * W + start + max((k for k, m in enumerate(s_mask) if m),
                                          default=len(s_ids) - 1)
            start = end
    # Targets are ids[:, 1:]; a sequence's first token is no target of the one before it.
    own = (positions[:, 1:] > 0) & (segments[:, 1:] >= 0)
    return {"ids": ids, "positions": positions, "segments": segments,
            "mask": mask[:, 1:] * own, "seq": torch.where(own, segments[:, 1:], -1),
            "last": last}


def per_sequence(values: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sums of per-target `values` (rows, W - 1) over each sequence of `collate_replies`."""
    keep = batch["seq"] >= 0
    return values.new_zeros(len(batch["last"])).index_add(0, batch["seq"][keep], values[keep])
