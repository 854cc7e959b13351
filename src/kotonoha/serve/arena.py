"""The arena leaderboard: Bradley–Terry ratings with bootstrap confidence intervals, and Elo.

Bradley–Terry says P(i beats j) = sigmoid(theta_i - theta_j). The ratings are its maximum-
likelihood fit over all votes (a tie counts as half a win for each side, "both bad" as a
tie), as LMSYS's Chatbot Arena does; unlike online Elo they do not depend on the order of
the votes. A small Gaussian prior on theta (like a fraction of a tie against the average model)
keeps an unbeaten model's rating finite. Ratings are shown on the Elo scale:
1000 + 400 * log10(e) * theta. The 95% interval comes from refitting on battles resampled with
replacement.

Online Elo (K=32, start 1000) is the running rating people know from chess; it is shown next to
Bradley–Terry because it moves visibly with each vote, order effects and all.

Written with numpy rather than scikit-learn: the fit is a dozen lines of Newton's method, and
the server should not pull in a machine-learning library for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SCALE = 400 / math.log(10)  # theta (natural log odds) -> Elo points
BASE_RATING = 1000.0
ELO_K = 32.0
PRIOR = 0.1  # L2 penalty on theta: keeps ratings finite for unbeaten / unbeatable models
OUTCOME = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}  # score of model A


@dataclass
class Rating:
    model: str
    rating: float  # Bradley–Terry, Elo scale
    ci_low: float
    ci_high: float
    elo: float  # online Elo
    battles: int
    wins: int
    losses: int
    ties: int

    def as_dict(self) -> dict[str, float | int | str]:
        return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in vars(self).items()}


def _encode(votes: Sequence[tuple[str, str, str]], models: list[str]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    index = {m: i for i, m in enumerate(models)}
    a = np.array([index[v[0]] for v in votes], dtype=np.int64)
    b = np.array([index[v[1]] for v in votes], dtype=np.int64)
    y = np.array([OUTCOME[v[2]] for v in votes], dtype=np.float64)
    return a, b, y


def fit_bradley_terry(a: np.ndarray, b: np.ndarray, y: np.ndarray, n_models: int,
                      weights: np.ndarray | None = None, prior: float = PRIOR,
                      iters: int = 50) -> np.ndarray:
    """Penalised maximum-likelihood theta (mean 0) for battles a[k] vs b[k] with score y[k]
    for a (1 win, 0.5 tie, 0 loss), by Newton's method on the concave log-likelihood."""
    w = np.ones_like(y) if weights is None else weights
    theta = np.zeros(n_models)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(theta[a] - theta[b])))
        r = w * (y - p)  # d loglik / d(theta_a - theta_b)
        s = w * p * (1 - p)
        grad = np.bincount(a, r, n_models) - np.bincount(b, r, n_models) - prior * theta
        hess = np.zeros((n_models, n_models))  # of the negative log-likelihood
        np.add.at(hess, (a, a), s)
        np.add.at(hess, (b, b), s)
        np.add.at(hess, (a, b), -s)
        np.add.at(hess, (b, a), -s)
        # The likelihood ignores a shift of all thetas; the all-ones term pins the mean at 0
        # (theta starts there and the gradient never has a component along it).
        hess += prior * np.eye(n_models) + np.ones((n_models, n_models)) / n_models
        step = np.linalg.solve(hess, grad)
        theta += step
        if np.abs(step).max() < 1e-8:
            break
    return theta - theta.mean()


def online_elo(votes: Sequence[tuple[str, str, str]], k: float = ELO_K,
               start: float = BASE_RATING) -> dict[str, float]:
    """Chess-style Elo, updated vote by vote in the order given."""
    elo: dict[str, float] = {}
    for ma, mb, winner in votes:
        ra, rb = elo.setdefault(ma, start), elo.setdefault(mb, start)
        expected_a = 1 / (1 + 10 ** ((rb - ra) / 400))
        delta = k * (OUTCOME[winner] - expected_a)
        elo[ma], elo[mb] = ra + delta, rb - delta
    return elo


def leaderboard(votes: Sequence[tuple[str, str, str]], models: Sequence[str] = (),
                n_bootstrap: int = 200, seed: int = 0) -> list[Rating]:
    """Ratings of every model that took part in a vote (plus `models`, so that models without
    votes yet are listed), best first. `votes` are (model_a, model_b, winner), oldest first."""
    names = list(dict.fromkeys([*models, *(m for v in votes for m in v[:2])]))
    if not names:
        return []
    n = len(names)
    a, b, y = _encode(votes, names)
    theta = fit_bradley_terry(a, b, y, n)
    low, high = theta.copy(), theta.copy()
    if len(votes):
        rng = np.random.default_rng(seed)
        # Resampling battles with replacement = integer weights drawn from a multinomial.
        samples = np.stack([
            fit_bradley_terry(a, b, y, n, weights=rng.multinomial(len(y), [1 / len(y)] * len(y))
                              .astype(np.float64))
            for _ in range(n_bootstrap)])
        low, high = np.percentile(samples, [2.5, 97.5], axis=0)
    elo = online_elo(votes)
    out = []
    for i, name in enumerate(names):
        mine_a, mine_b = a == i, b == i
        wins = int(((mine_a & (y == 1)) | (mine_b & (y == 0))).sum())
        losses = int(((mine_a & (y == 0)) | (mine_b & (y == 1))).sum())
        battles = int((mine_a | mine_b).sum())
        out.append(Rating(
            model=name, rating=BASE_RATING + SCALE * theta[i],
            ci_low=BASE_RATING + SCALE * low[i], ci_high=BASE_RATING + SCALE * high[i],
            elo=elo.get(name, BASE_RATING), battles=battles, wins=wins, losses=losses,
            ties=battles - wins - losses))
    return sorted(out, key=lambda r: -r.rating)
