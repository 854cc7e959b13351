"""Interpolated modified Kneser–Ney n-gram language model over token ids.

The pre-neural baseline (Chen & Goodman 1998, "An empirical study of smoothing techniques"):

    p_k(w | h) = (max(c_k(h w) - D_k(c), 0) + γ_k(h) · p_{k-1}(w | h')) / Σ_w' c_k(h w')
    γ_k(h)     = D_k1 · N1(h ·) + D_k2 · N2(h ·) + D_k3+ · N3+(h ·)
    p_0(w)     = 1 / V

where h' is h without its first token; c_k is the raw count at the highest order and the
*continuation* count N1+(· h w) (how many distinct tokens precede h w) at the lower orders;
N_r(h ·) counts the words seen r times after h; and the three discounts per order come from
that order's count-of-counts n_r: Y = n1 / (n1 + 2 n2), D_r = r - (r + 1) Y n_{r+1} / n_r.
Because γ_k(h) returns exactly the mass the discounts removed and the recursion ends in the
uniform distribution, every p_k(· | h) sums to 1 over the vocabulary; a context never seen
in training falls through to the next lower order.

Why written here rather than imported: the maintained tools (KenLM, SRILM) are C++ programs
that estimate from whitespace-separated words and exchange ARPA files; the `kenlm` pip
package is a source-only build that can only *query* such files (estimation needs the
separate `lmplz` binary), and `nltk.lm` is pure-Python dicts, too slow for millions of
tokens and not normalised at the unigram level. We need to score integer token streams from
the shards (any vocabulary size, with the same tokens the neural models see), which sorted
numpy arrays do in a few seconds.

Storage: the k-grams seen in training are numbered in sorted order per k; a k-gram's key is
(id of its first k-1 tokens) · V + last token, so each order is one sorted int64 array, a
k-gram is found with `searchsorted`, and the followers of a context are a contiguous slice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kotonoha.data.shards import read_meta
from kotonoha.eval.bpb import nats_to_bpb, split_tokens


@dataclass
class _Order:
    keys: np.ndarray  # sorted unique keys of the k-grams: prefix_id * V + last token
    counts: np.ndarray  # raw (highest order) or continuation counts, one per key
    total: np.ndarray  # per context id (a (k-1)-gram id): Σ counts of its followers
    gamma: np.ndarray  # per context id: the discounted mass, D1·N1 + D2·N2 + D3+·N3+
    discount: np.ndarray  # [0, D1, D2, D3+], indexed by min(count, 3)


def _discounts(counts: np.ndarray) -> np.ndarray:
    """Chen & Goodman's modified-KN discounts from the count-of-counts of one order."""
    n1, n2, n3, n4 = (int(np.count_nonzero(counts == r)) for r in (1, 2, 3, 4))
    d = np.array([0.0, 0.5, 1.0, 1.5])  # fallback for a corpus too small to estimate them
    if n1 and n2:
        y = n1 / (n1 + 2 * n2)
        d[1] = 1 - 2 * y * n2 / n1
        if n3:
            d[2] = 2 - 3 * y * n3 / n2
            if n4:
                d[3] = 3 - 4 * y * n4 / n3
    # D_r <= r keeps c - D >= 0 (so γ is exactly the removed mass); D > 0 keeps γ > 0, so a
    # word never seen after h still gets lower-order probability.
    return np.clip(d, [0.0, 0.05, 0.05, 0.05], [0.0, 1.0, 2.0, 3.0])


class KneserNey:
    """An order-`order` interpolated modified Kneser–Ney model; build it with `fit`."""

    def __init__(self, order: int, vocab_size: int, orders: list[_Order]) -> None:
        self.order, self.vocab_size, self.orders = order, vocab_size, orders

    @classmethod
    def fit(cls, tokens: np.ndarray | list[int], order: int, vocab_size: int) -> KneserNey:
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        t = np.asarray(tokens, dtype=np.int64)
        if len(t) < order:
            raise ValueError(f"{len(t)} training tokens are too few for order {order}")
        if t.min() < 0 or t.max() >= vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size})")
        V = vocab_size
        keys: list[np.ndarray] = []
        counts: list[np.ndarray] = []
        prev = np.zeros(len(t), dtype=np.int64)  # id of the (k-1)-gram starting at each position
        for k in range(1, order + 1):
            m = len(t) - k + 1
            key = prev[:m] * V + t[k - 1:k - 1 + m]
            uniq, first_pos, inverse, count = np.unique(key, return_index=True,
                                                        return_inverse=True, return_counts=True)
            if k > 1:
                # The (k-1)-grams' continuation counts: each distinct k-gram type adds 1 to the
                # (k-1)-gram it ends with, the one starting a position after its first occurrence.
                counts[-1] = np.bincount(prev[first_pos + 1], minlength=len(keys[-1]))
            keys.append(uniq)
            counts.append(count)  # raw counts: kept only at the highest order
            prev = inverse.reshape(-1)
        orders = []
        for k in range(1, order + 1):
            c = counts[k - 1].astype(np.int64)
            prefix = keys[k - 1] // V  # the context: a (k-1)-gram id
            n_ctx = len(keys[k - 2]) if k > 1 else 1
            disc = _discounts(c)
            total = np.bincount(prefix, weights=c, minlength=n_ctx)
            gamma = np.bincount(prefix, weights=disc[np.minimum(c, 3)], minlength=n_ctx)
            orders.append(_Order(keys[k - 1], c, total, gamma, disc))
        return cls(order, vocab_size, orders)

    @property
    def num_ngrams(self) -> int:
        """Stored n-grams of every order (each holds one count): the model's 'parameters'."""
        return int(sum(len(o.keys) for o in self.orders))

    # --- scoring ---------------------------------------------------------------------------

    def _lookup(self, k: int, key: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Ids of k-grams with these keys, -1 where absent (or not `valid`)."""
        keys = self.orders[k - 1].keys
        pos = np.searchsorted(keys, key)
        pos_c = np.minimum(pos, len(keys) - 1)
        return np.where(valid & (pos < len(keys)) & (keys[pos_c] == key), pos, -1)

    def token_logprobs(self, tokens: np.ndarray | list[int]) -> np.ndarray:
        """ln p(tokens[i] | tokens[:i]) for every i (the first one from the unigram level)."""
        s = np.asarray(tokens, dtype=np.int64)
        V = self.vocab_size
        p = np.full(len(s), 1.0 / V)
        ctx = np.zeros(len(s), dtype=np.int64)  # id of the (k-1)-gram ending just before i
        for k, o in enumerate(self.orders, 1):
            valid = ctx >= 0
            gram = self._lookup(k, np.maximum(ctx, 0) * V + s, valid)  # k-gram ending at i
            c_safe = np.maximum(ctx, 0)
            tot = np.where(valid, o.total[c_safe], 0.0)
            c = np.where(gram >= 0, o.counts[np.maximum(gram, 0)], 0)
            kept = np.maximum(c - o.discount[np.minimum(c, 3)], 0.0)
            use = tot > 0
            p = np.where(use, (kept + o.gamma[c_safe] * p) / np.where(use, tot, 1.0), p)
            ctx = np.concatenate([[-1], gram[:-1]])  # next order's context: this k-gram
        return np.log(p)

    def _context_id(self, k: int, context: np.ndarray) -> int:
        """Id of the (k-1)-gram `context[-(k-1):]` (0 for the empty one), or -1 if unseen."""
        if k == 1:
            return 0
        if len(context) < k - 1:
            return -1
        gid = 0
        for j, w in enumerate(context[len(context) - (k - 1):], 1):
            gid = int(self._lookup(j, np.array([gid * self.vocab_size + int(w)]),
                                   np.array([True]))[0])
            if gid < 0:
                return -1
        return gid

    def distribution(self, context: np.ndarray | list[int]) -> np.ndarray:
        """p(w | context) for every w in the vocabulary (sums to 1)."""
        ctx = np.asarray(context, dtype=np.int64)
        V = self.vocab_size
        p = np.full(V, 1.0 / V)
        for k, o in enumerate(self.orders, 1):
            h = self._context_id(k, ctx)
            if h < 0:
                break  # a longer context that contains an unseen one is unseen too
            if o.total[h] <= 0:
                continue
            lo, hi = np.searchsorted(o.keys, [h * V, (h + 1) * V])
            words, c = o.keys[lo:hi] - h * V, o.counts[lo:hi]
            new = o.gamma[h] * p
            new[words] += np.maximum(c - o.discount[np.minimum(c, 3)], 0.0)
            p = new / o.total[h]
        return p

    def next_logprobs(self, contexts: list[list[int]]) -> np.ndarray:
        """(B, V) log-probabilities of the next token after each context."""
        return np.log(np.stack([self.distribution(c) for c in contexts]))


# ---------------------------------------------------------------------------------------------
# On shards


def load_split(data_dir: str | Path, split: str, max_tokens: int | None = None) -> np.ndarray:
    """The first `max_tokens` (None: all) token ids of a split, as int64."""
    tokens, _ = split_tokens(data_dir, split)
    return np.asarray(tokens[:max_tokens], dtype=np.int64)


def fit_ngram(data_dir: str | Path, order: int, *, max_tokens: int | None = None) -> KneserNey:
    """Fit on the train split of a shard folder (its first `max_tokens` tokens)."""
    meta = read_meta(data_dir)
    return KneserNey.fit(load_split(data_dir, "train", max_tokens), order, meta["vocab_size"])


def ngram_bits_per_byte(model: KneserNey, data_dir: str | Path, split: str = "val", *,
                        max_tokens: int | None = None) -> dict[str, Any]:
    """Bits per byte of `model` on `split`, the same formula as `eval.bpb.bits_per_byte`.

    Every token of the split is scored (with its full n-1 tokens of history), so with
    `max_tokens=None` the byte count is exact.
    """
    meta = read_meta(data_dir)
    info = meta["splits"][split]
    tokens = load_split(data_dir, split, max_tokens)
    total_nats = -float(model.token_logprobs(tokens).sum())
    bytes_per_token = info["bytes"] / info["tokens"]
    n_bytes = info["bytes"] if len(tokens) == info["tokens"] else len(tokens) * bytes_per_token
    return {"split": split, "bpb": nats_to_bpb(total_nats, n_bytes),
            "loss": total_nats / len(tokens), "tokens": len(tokens), "bytes": n_bytes,
            "bytes_per_token": bytes_per_token}


def run_ngram(data_dir: str | Path, order: int, *, max_train_tokens: int | None = None,
              max_eval_tokens: int | None = None) -> tuple[KneserNey, dict[str, Any]]:
    """Fit and evaluate one order; returns (model, {"bpb", ..., "params", "time_s"})."""
    t0 = time.perf_counter()
    model = fit_ngram(data_dir, order, max_tokens=max_train_tokens)
    fit_s = time.perf_counter() - t0
    result = ngram_bits_per_byte(model, data_dir, max_tokens=max_eval_tokens)
    result.update(params=model.num_ngrams, time_s=fit_s, flops=None)  # counting, no FLOPs
    return model, result
