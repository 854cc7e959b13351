"""Sampling: from a row of next-token logits to one token.

The processing order is the one of HF transformers and vLLM: logit bias, then the
repetition/presence/frequency penalties, then temperature, then the truncations (top-k,
top-p, min-p) on the tempered distribution, then a draw. Temperature 0 (or below 1e-5) is
greedy: the argmax after bias and penalties.

Every function works on the last dimension, so it takes a row (V,) or a batch (..., V).

Log-probabilities that the engine reports are `log_softmax` of the *raw* model logits, not of
the processed distribution. That is what OpenAI reports, what evals compare across settings,
and what RL needs (the policy's own probability of the token it produced); the processed
distribution is an artefact of the knobs and is 0 for every truncated token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kotonoha.errors import UserError

MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs
# Below this a temperature is greedy (vLLM's threshold): dividing fp32 logits by 1e-39 gives
# infinities, and one request's NaN distribution would fail every request in its batch.
GREEDY_BELOW = 1e-5
# The smallest repetition penalty: dividing a logit by 1e-45 overflows the same way.
MIN_REPETITION_PENALTY = 0.01


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # CTRL / HF: over prompt and generated tokens
    presence_penalty: float = 0.0  # OpenAI: over generated tokens
    frequency_penalty: float = 0.0  # OpenAI: over generated tokens
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None  # None = a fresh seed drawn from torch's global RNG
    max_tokens: int | None = 256  # None = until a stop or the end of the context
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False  # ignore the tokenizer's stop ids (not `stop_token_ids`)
    logprobs: int = 0  # top alternatives per token; the chosen token's logprob is always kept
    # Drop the whitespace a reply opens with: a chat reply's first word carries the space that
    # separates it from the turn header in the template (kotonoha's ChatML; SentencePiece).
    lstrip: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def uses_history(self) -> bool:
        """Whether sampling depends on the tokens seen so far (the penalties)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise `UserError` with one sentence for the first out-of-range setting."""

        def bad(msg: str) -> None:
            raise UserError(msg)

        if not self.temperature >= 0:  # `not >=` also catches NaN
            bad(f"temperature must be >= 0 (0 is greedy), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}.")
        if not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.top_k < 0:
            bad(f"top_k must be >= 0 (0 turns it off), got {self.top_k}.")
        if not self.repetition_penalty >= MIN_REPETITION_PENALTY:
            bad(f"repetition_penalty must be >= {MIN_REPETITION_PENALTY} (1 turns it off), "
                f"got {self.repetition_penalty}.")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                bad(f"{name} must be in [-2, 2], got {value}.")
        # The range torch.Generator.manual_seed accepts (it reads a 64-bit integer).
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            bad(f"seed must be a whole number from {-(2**63)} to {2**64 - 1}, got {self.seed}.")
        if self.max_tokens is not None and self.max_tokens < 0:
            bad(f"max_tokens must be >= 0, got {self.max_tokens}.")
        if not 0 <= self.logprobs <= MAX_LOGPROBS:
            bad(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}.")
        if any(not s for s in self.stop):
            bad("stop strings must not be empty.")
        for token, bias in self.logit_bias.items():
            if not -100 <= bias <= 100:
                bad(f"logit_bias for token {token} must be in [-100, 100], got {bias}.")
        if vocab_size is not None:
            ids = [*self.logit_bias, *self.stop_token_ids]
            for token in ids:
                if not 0 <= token < vocab_size:
                    bad(f"token id {token} is outside the vocabulary of {vocab_size}.")


def token_counts(ids: list[int] | torch.Tensor, vocab_size: int,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """How often each vocabulary entry occurs in `ids`: a (vocab_size,) float tensor."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    return torch.bincount(ids, minlength=vocab_size).float()


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    if not bias:
        return logits
    ids = torch.tensor(list(bias), device=logits.device)
    values = torch.tensor(list(bias.values()), device=logits.device, dtype=logits.dtype)
    out = logits.clone()
    out[..., ids] += values
    return out


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor | None, *,
                    prompt_mask: torch.Tensor | None = None, repetition_penalty: float = 1.0,
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                    ) -> torch.Tensor:
    """Penalise tokens already seen.

    `counts` (..., V) counts the *generated* tokens; `prompt_mask` (..., V) marks the prompt's.
    Repetition penalty (CTRL, HF semantics): a seen token's logit is divided by the penalty when
    positive and multiplied when negative, so a penalty > 1 always makes it less likely.
    Presence/frequency (OpenAI): subtract `presence` once and `frequency` per occurrence.
    """
    if counts is None:
        counts = torch.zeros_like(logits)
    if repetition_penalty != 1.0:
        seen = counts > 0
        if prompt_mask is not None:
            seen = seen | prompt_mask
        penalised = torch.where(logits > 0, logits / repetition_penalty,
                                logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if presence_penalty or frequency_penalty:
        logits = logits - frequency_penalty * counts - presence_penalty * (counts > 0).to(
            logits.dtype)
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (ties at the k-th value are kept too)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # A token goes when the tokens ranked above it already reach p; the top one stays (p > 0).
    drop = probs.cumsum(dim=-1) - probs >= p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the most likely one's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, *,
                   counts: torch.Tensor | None = None,
                   prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bias, penalties, temperature and truncation: the distribution that is sampled from
    (as logits; for greedy only bias and penalties apply)."""
    logits = apply_logit_bias(logits.float(), params.logit_bias)
    if params.uses_history:
        logits = apply_penalties(
            logits, counts, prompt_mask=prompt_mask,
            repetition_penalty=params.repetition_penalty,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
        )
    if params.greedy:
        return logits
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None = None, *, counts: torch.Tensor | None = None,
           prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Token id(s) drawn from `logits` (V,) or (B, V): a 0-d or (B,) long tensor.

    `generator` must live on the logits' device; one generator per request is what makes a
    seeded request reproducible whatever else shares its batch.
    """
    logits = process_logits(logits, params, counts=counts, prompt_mask=prompt_mask)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    tokens = torch.multinomial(flat, 1, generator=generator)
    return tokens.reshape(probs.shape[:-1])
