"""Logits processors and the draw, on hand-made logits."""

import math

import pytest
import torch

from kotonoha.errors import UserError
from kotonoha.sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_penalties,
    min_p_filter,
    process_logits,
    sample,
    token_counts,
    top_k_filter,
    top_p_filter,
)

NEG = float("-inf")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("field,value,needle", [
    ("temperature", -0.1, "temperature"),
    ("temperature", float("nan"), "temperature"),
    ("top_p", 0.0, "top_p"),
    ("top_p", 1.5, "top_p"),
    ("min_p", -0.1, "min_p"),
    ("min_p", 1.1, "min_p"),
    ("top_k", -1, "top_k"),
    ("repetition_penalty", 0.0, "repetition_penalty"),
    ("presence_penalty", 2.5, "presence_penalty"),
    ("frequency_penalty", -3.0, "frequency_penalty"),
    ("max_tokens", -1, "max_tokens"),
    ("logprobs", 21, "logprobs"),
    ("logit_bias", {3: 101.0}, "logit_bias"),
    ("logit_bias", {600: 1.0}, "outside the vocabulary"),
    ("stop_token_ids", [-1], "outside the vocabulary"),
    ("stop", [""], "stop"),
])
def test_validate_rejects_out_of_range(field, value, needle):
    params = SamplingParams(**{field: value})
    with pytest.raises(UserError, match=needle):
        params.validate(vocab_size=512)


def test_validate_accepts_defaults_and_edges():
    SamplingParams().validate(512)
    SamplingParams(temperature=0, top_p=1e-9, min_p=1.0, presence_penalty=-2,
                   frequency_penalty=2, logprobs=20, logit_bias={0: -100, 511: 100},
                   max_tokens=None).validate(512)


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    out = top_k_filter(logits, 2)
    assert torch.isfinite(out).tolist() == [False, True, False, True, False]
    assert torch.equal(top_k_filter(logits, 0), logits)
    assert torch.equal(top_k_filter(logits, 99), logits)


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])
    logits = probs.log()
    # 0.5 alone < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is {1, 2}.
    assert torch.isfinite(top_p_filter(logits, 0.7)).tolist() == [False, True, True, False]
    assert torch.isfinite(top_p_filter(logits, 0.45)).tolist() == [False, True, False, False]
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist() == [False, True, True, True]
    # Reaching p exactly is enough (binary-exact probabilities): 0.5 alone reaches 0.5.
    exact = torch.tensor([0.5, 0.25, 0.25]).log()
    assert torch.isfinite(top_p_filter(exact, 0.5)).tolist() == [True, False, False]
    assert torch.isfinite(top_p_filter(exact, 0.75)).tolist() == [True, True, False]
    # Batched rows are filtered independently.
    batch = torch.stack([logits, logits.flip(0)])
    assert torch.isfinite(top_p_filter(batch, 0.7)).sum(-1).tolist() == [2, 2]


def test_min_p_filters_relative_to_the_top_token():
    probs = torch.tensor([0.5, 0.3, 0.12, 0.08])
    out = min_p_filter(probs.log(), 0.2)  # threshold 0.1
    assert torch.isfinite(out).tolist() == [True, True, True, False]
    assert torch.isfinite(min_p_filter(probs.log(), 1.0)).tolist() == [True, False, False, False]


def test_repetition_penalty_hf_semantics():
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0])
    counts = torch.tensor([1.0, 1.0, 0.0, 0.0])
    prompt = torch.tensor([False, False, False, True])
    out = apply_penalties(logits, counts, prompt_mask=prompt, repetition_penalty=2.0)
    # Seen tokens (0, 1 generated; 3 in the prompt) become less likely whatever their sign.
    assert out.tolist() == [1.0, -4.0, 2.0, -4.0]


def test_presence_and_frequency_penalties_openai_semantics():
    logits = torch.zeros(4)
    counts = torch.tensor([0.0, 1.0, 3.0, 0.0])
    out = apply_penalties(logits, counts, presence_penalty=0.5, frequency_penalty=0.25)
    assert out.tolist() == pytest.approx([0.0, -0.75, -1.25, 0.0])
    # Negative penalties encourage repetition.
    out = apply_penalties(logits, counts, presence_penalty=-1.0)
    assert out.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_penalties_lower_the_probability_of_repeats():
    torch.manual_seed(0)
    logits = torch.randn(50)
    counts = token_counts([3, 3, 7], 50)
    params = SamplingParams(temperature=1.0, frequency_penalty=1.0, repetition_penalty=1.3)
    before = logits.softmax(-1)
    after = process_logits(logits, params, counts=counts).softmax(-1)
    assert after[3] < before[3] and after[7] < before[7]
    assert after[11] > before[11]  # the mass moves to tokens not seen


def test_logit_bias_forces_and_bans():
    logits = torch.randn(2, 10, generator=gen())
    biased = apply_logit_bias(logits, {4: 100.0, 0: -100.0})
    assert biased[:, 4].tolist() == pytest.approx((logits[:, 4] + 100).tolist())
    assert not torch.equal(biased, logits) and logits[0, 4] < 10  # the input is not modified
    params = SamplingParams(temperature=1.5, logit_bias={4: 100.0})
    g = gen()
    assert {int(sample(logits[0], params, g)) for _ in range(50)} == {4}


def test_temperature_zero_is_argmax():
    logits = torch.randn(4, 100, generator=gen(1))
    assert torch.equal(sample(logits, SamplingParams(temperature=0)), logits.argmax(-1))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=1.0, top_p=1e-6),
    SamplingParams(temperature=5.0, min_p=1.0),
])
def test_truncation_to_one_token_is_greedy(params):
    logits = torch.randn(64, 300, generator=gen(2))
    g = gen(3)
    for row in logits:
        assert int(sample(row, params, g)) == int(row.argmax())


def test_same_seed_same_draws_and_frequencies_match_softmax():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    params = SamplingParams(temperature=1.0)
    a = [int(sample(logits, params, gen(7))) for _ in range(3)]
    assert len(set(a)) == 1  # one seed, one draw
    g = gen(8)
    draws = sample(logits.expand(20000, 4), params, g)
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    expected = logits.softmax(-1)
    # 4 standard errors of a binomial frequency; fails by chance ~1e-4 of the time at most.
    tol = 4 * (expected * (1 - expected) / draws.numel()).sqrt()
    assert ((freq - expected).abs() <= tol).all(), (freq, expected)


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([0.0, 1.0, 2.0])
    hot = process_logits(logits, SamplingParams(temperature=2.0)).softmax(-1)
    cold = process_logits(logits, SamplingParams(temperature=0.5)).softmax(-1)
    assert cold[2] > logits.softmax(-1)[2] > hot[2]
    assert math.isclose(float(hot.sum()), 1.0, rel_tol=1e-6)
