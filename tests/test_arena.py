"""Arena ratings: Bradley–Terry recovers known strengths, intervals cover them and shrink with
more votes, ties are half wins, and online Elo moves the way chess Elo does."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kotonoha.serve.arena import (
    BASE_RATING,
    SCALE,
    fit_bradley_terry,
    leaderboard,
    online_elo,
)


def simulate(strengths: dict[str, float], n: int, seed: int = 0,
             tie_rate: float = 0.0) -> list[tuple[str, str, str]]:
    """Votes between random pairs; P(a beats b) = sigmoid(s_a - s_b)."""
    rng = np.random.default_rng(seed)
    names = list(strengths)
    votes = []
    for _ in range(n):
        a, b = rng.choice(len(names), 2, replace=False)
        p = 1 / (1 + math.exp(strengths[names[b]] - strengths[names[a]]))
        if rng.random() < tie_rate:
            winner = "tie" if rng.random() < 0.5 else "both_bad"
        else:
            winner = "a" if rng.random() < p else "b"
        votes.append((names[a], names[b], winner))
    return votes


TRUE = {"small": -1.0, "medium": 0.0, "large": 1.2}


def test_bradley_terry_recovers_known_strengths() -> None:
    board = {r.model: r for r in leaderboard(simulate(TRUE, 3000), n_bootstrap=100)}
    assert [m for m, _ in sorted(board.items(), key=lambda kv: -kv[1].rating)] == [
        "large", "medium", "small"]
    mean = sum(TRUE.values()) / len(TRUE)
    for name, s in TRUE.items():
        expected = BASE_RATING + SCALE * (s - mean)
        r = board[name]
        assert r.rating == pytest.approx(expected, abs=40)
        assert r.ci_low <= expected <= r.ci_high, (name, r, expected)
        assert r.ci_low < r.rating < r.ci_high


def test_intervals_shrink_with_more_votes() -> None:
    few = {r.model: r for r in leaderboard(simulate(TRUE, 60), n_bootstrap=100)}
    many = {r.model: r for r in leaderboard(simulate(TRUE, 2000), n_bootstrap=100)}
    for name in TRUE:
        assert (many[name].ci_high - many[name].ci_low) < (few[name].ci_high - few[name].ci_low)


def test_unbeaten_model_has_a_finite_rating() -> None:
    votes = [("champ", "rookie", "a")] * 20
    board = {r.model: r for r in leaderboard(votes, n_bootstrap=20)}
    assert math.isfinite(board["champ"].rating) and board["champ"].rating > board["rookie"].rating
    assert board["champ"].wins == 20 and board["rookie"].losses == 20


def test_ties_and_both_bad_are_half_wins() -> None:
    even = [("x", "y", "tie"), ("y", "x", "both_bad")] * 10
    board = {r.model: r for r in leaderboard(even, n_bootstrap=10)}
    assert board["x"].rating == pytest.approx(BASE_RATING)
    assert board["y"].rating == pytest.approx(BASE_RATING)
    assert board["x"].ties == 20 and board["x"].wins == 0
    # Equivalent data: one win each way per tie pair.
    a, b, y = np.array([0, 1]), np.array([1, 0]), np.array([0.5, 0.5])
    assert fit_bradley_terry(a, b, y, 2) == pytest.approx([0.0, 0.0])


def test_fit_matches_closed_form_for_two_models() -> None:
    # Two models, 30 wins to 10 with no prior: theta_a - theta_b = log(30 / 10).
    a = np.zeros(40, dtype=np.int64)
    b = np.ones(40, dtype=np.int64)
    y = np.array([1.0] * 30 + [0.0] * 10)
    theta = fit_bradley_terry(a, b, y, 2, prior=0.0)
    assert theta[0] - theta[1] == pytest.approx(math.log(3), rel=1e-6)
    assert theta.sum() == pytest.approx(0.0, abs=1e-9)


def test_online_elo() -> None:
    elo = online_elo([("a", "b", "a")])
    assert elo == {"a": pytest.approx(1016), "b": pytest.approx(984)}  # K=32, equal start
    elo = online_elo([("a", "b", "a"), ("a", "b", "tie")])
    assert elo["a"] < 1016 and elo["a"] + elo["b"] == pytest.approx(2000)  # zero-sum
    # The order of votes matters to Elo (not to Bradley–Terry).
    votes = [("a", "b", "a")] * 5 + [("a", "b", "b")] * 5
    assert online_elo(votes)["a"] != online_elo(votes[::-1])["a"]
    fwd = {r.model: r.rating for r in leaderboard(votes, n_bootstrap=5)}
    back = {r.model: r.rating for r in leaderboard(votes[::-1], n_bootstrap=5)}
    assert fwd == pytest.approx(back)


def test_models_without_votes_are_listed() -> None:
    board = leaderboard([], models=["m1", "m2"])
    assert [r.model for r in board] == ["m1", "m2"]
    assert all(r.rating == BASE_RATING and r.battles == 0 for r in board)
    assert leaderboard([]) == []
