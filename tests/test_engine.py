"""The engine against the model itself: cache vs recomputation, batching, text and stops."""

import pytest
import torch
import torch.nn.functional as F

import kotonoha.engine as engine_module
from kotonoha.engine import Engine, IncrementalDetokenizer, StopStringMatcher, TokenEvent
from kotonoha.errors import UserError
from kotonoha.model import Transformer, preset
from kotonoha.sampling import SamplingParams, apply_penalties, token_counts

EOS = 0
EURO_HEAD, EURO_TAIL = 500, 501  # "€" split across two tokens, as byte-level BPE does
EN, D_BANG = 502, 503
SPACE, SPACE_EN = 504, 505  # " " and " en": a chat reply's first word carries a space


class FakeTokenizer:
    """id -> fixed bytes: "<id>" for most, half a UTF-8 character for two, nothing for EOS."""

    stop_ids = [EOS]
    pieces = {EOS: b"", EURO_HEAD: "€".encode()[:2], EURO_TAIL: "€".encode()[2:],
              EN: b"en", D_BANG: b"d!", SPACE: b" ", SPACE_EN: b" en"}

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        data = b"".join(self.pieces.get(i, f"<{i}>".encode()) for i in ids)
        return data.decode("utf-8", errors="replace")


TOK = FakeTokenizer()


def make_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", tie_embeddings=False))
    # Random init gives nearly uniform next-token distributions; sharper ones make greedy
    # decoding meaningful (no near-ties) and let different seeds visibly diverge.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> Transformer:
    return make_model()


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 500, (n,), generator=g).tolist()


GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@torch.no_grad()
def greedy_by_recomputation(model: Transformer, ids: list[int], n: int,
                            params: SamplingParams = GREEDY) -> list[int]:
    """The reference: the whole sequence through the model, no cache, every step."""
    ids, out = list(ids), []
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1]
        if params.uses_history:
            logits = apply_penalties(
                logits, token_counts(out, 512), prompt_mask=token_counts(ids, 512) > 0,
                repetition_penalty=params.repetition_penalty,
                presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty)
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


def solo(model: Transformer, ids: list[int], params: SamplingParams) -> list[int]:
    return Engine(model, TOK, max_batch_size=1).generate([ids], params)[0].token_ids


# ---- the cache and the batch ----------------------------------------------------------------


@pytest.mark.parametrize("prefill_tokens", [1024, 10])
def test_greedy_with_cache_equals_recomputation_batched(model, monkeypatch, prefill_tokens):
    # Prompts of different lengths prefilled together (padded; in chunks of 10 // 4 = 2
    # positions in the second case), and 50 + 24 crosses a 64-position kv_len block.
    monkeypatch.setattr(engine_module, "PREFILL_TOKENS", prefill_tokens)
    prompts = [prompt(n, seed) for seed, n in enumerate([1, 6, 23, 50])]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    out = Engine(model, TOK, max_batch_size=4).generate(prompts, params)
    for p, c in zip(prompts, out):
        assert c.token_ids == greedy_by_recomputation(model, p, 24)
        assert c.finish_reason == "length" and c.completion_tokens == 24
        assert c.prompt_tokens == len(p) and c.text == TOK.decode(c.token_ids)


def test_penalties_in_the_engine_match_the_reference(model):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                            repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=1.0)
    p = prompt(7, 3)
    got = Engine(model, TOK, max_batch_size=2).generate([p, prompt(3, 4)], params)[0]
    assert got.token_ids == greedy_by_recomputation(model, p, 16, params)
    assert got.token_ids != greedy_by_recomputation(model, p, 16)  # the penalties did something


def test_same_seed_same_text_different_seed_different(model):
    p = prompt(5, 0)
    a = solo(model, p, SamplingParams(seed=42, max_tokens=16, ignore_eos=True))
    b = solo(model, p, SamplingParams(seed=42, max_tokens=16, ignore_eos=True))
    c = solo(model, p, SamplingParams(seed=43, max_tokens=16, ignore_eos=True))
    assert a == b and a != c


def test_a_row_samples_the_same_alone_or_batched(model):
    params = SamplingParams(seed=7, top_k=50, top_p=0.9, max_tokens=16, ignore_eos=True)
    p = prompt(9, 1)
    others = [prompt(n, 10 + n) for n in (2, 30, 4)]
    batch = [others[0], p, *others[1:]]
    plist = [SamplingParams(seed=s, max_tokens=s, ignore_eos=True) for s in (3, 0, 20, 5)]
    plist[1] = params
    out = Engine(model, TOK, max_batch_size=4).generate(batch, plist)
    assert out[1].token_ids == solo(model, p, params)


def test_logit_bias_forces_a_token(model):
    params = SamplingParams(temperature=1.0, seed=1, logit_bias={7: 100.0}, max_tokens=5)
    assert solo(model, prompt(4, 0), params) == [7] * 5


def test_lstrip_drops_the_space_a_reply_opens_with(model):
    forced = dict(temperature=1.0, seed=1, logit_bias={SPACE_EN: 100.0}, max_tokens=3)
    engine = Engine(model, TOK, max_batch_size=2)
    plain, reply = engine.generate([prompt(4, 0)] * 2, [SamplingParams(**forced),
                                                        SamplingParams(**forced, lstrip=True)])
    assert plain.text == " en en en" and reply.text == "en en en"
    assert reply.token_ids == plain.token_ids == [SPACE_EN] * 3


def test_logprobs_are_the_models_raw_distribution(model):
    p = prompt(6, 5)
    params = SamplingParams(temperature=0.8, top_k=20, seed=3, logprobs=5, max_tokens=8,
                            ignore_eos=True)
    c = Engine(model, TOK, max_batch_size=2).generate([p, prompt(2, 6)], params)[0]
    with torch.no_grad():
        logits = model(torch.tensor([p + c.token_ids]))[0, len(p) - 1:-1]
    lp = torch.log_softmax(logits.float(), dim=-1)
    want = lp.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
    assert c.logprobs == pytest.approx(want.tolist(), abs=1e-4)
    for row, top in zip(lp, c.top_logprobs):
        assert len(top) == 5
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        assert [t for t, _ in top] == row.topk(5).indices.tolist()
        assert values == pytest.approx(row.topk(5).values.tolist(), abs=1e-4)


def test_score_is_a_log_softmax_gather(model):
    ids = prompt(12, 8)
    got = Engine(model, TOK).score(ids)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids]))[0], dim=-1)
    want = [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert got[0] is None and got[1:] == pytest.approx(want, abs=1e-5)


# ---- lifecycle: admission, abort, limits ------------------------------------------------------


def test_continuous_batching_matches_solo_outputs(model):
    eng = Engine(model, TOK, max_batch_size=3)
    specs = [(prompt(n, 20 + i), SamplingParams(
        temperature=0 if i % 3 == 0 else 1.0, seed=i, max_tokens=4 + 3 * (i % 4),
        ignore_eos=True)) for i, n in enumerate([3, 17, 1, 8, 40, 5, 12, 2])]
    pending = list(specs)
    ids: dict[int, int] = {}
    got: dict[int, list[int]] = {}
    reasons: dict[int, str | None] = {}
    while pending or eng.has_work():
        # Two requests arrive at the first step, then one per step: rows join and leave.
        for _ in range(2 if not ids else 1):
            if pending:
                i = len(specs) - len(pending)
                ids[eng.submit(*pending.pop(0))] = i
        for ev in eng.step():
            got.setdefault(ids[ev.request_id], []).append(ev.token_id)
            if ev.finished:
                reasons[ids[ev.request_id]] = ev.finish_reason
    assert len(got) == len(specs) > eng.max_batch_size
    for i, (p, params) in enumerate(specs):
        assert got[i] == solo(model, p, params), i
        assert reasons[i] == "length"


def test_abort_frees_the_row_and_the_others_continue(model):
    eng = Engine(model, TOK, max_batch_size=2)
    pa, pb, pc = prompt(4, 1), prompt(9, 2), prompt(6, 3)
    a = eng.submit(pa, GREEDY)
    b = eng.submit(pb, GREEDY)
    for _ in range(3):
        eng.step()
    eng.abort(a)
    c = eng.submit(pc, GREEDY)
    events = eng.step()
    # The abort is reported once, and C got A's row at once (B still holds the other one).
    assert [e.finish_reason for e in events if e.request_id == a] == ["abort"]
    assert any(e.request_id == c for e in events)
    tokens: dict[int, list[int]] = {b: [], c: []}
    for ev in events:
        if ev.request_id in tokens:
            tokens[ev.request_id].append(ev.token_id)
    while eng.has_work():
        for ev in eng.step():
            assert ev.request_id != a
            tokens[ev.request_id].append(ev.token_id)
    eng.abort(a)  # aborting a finished or unknown request is a no-op
    assert not eng.has_work()
    assert tokens[b] == greedy_by_recomputation(model, pb, 20)[3:]  # 3 came before the abort
    assert tokens[c] == greedy_by_recomputation(model, pc, 20)


def test_abort_a_waiting_request(model):
    eng = Engine(model, TOK, max_batch_size=1)
    eng.submit(prompt(3, 0), GREEDY)
    waiting = eng.submit(prompt(3, 1), GREEDY)
    eng.abort(waiting)
    events = [e for _ in range(30) for e in eng.step()]
    assert [e.finish_reason for e in events if e.request_id == waiting] == ["abort"]
    assert not eng.has_work()


def test_max_tokens_and_context_limit_end_with_length(model):
    eng = Engine(model, TOK, max_batch_size=2, max_seq_len=16)
    p = prompt(10, 4)
    by_tokens, by_context = eng.generate(
        [p, p], [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                 SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)])
    assert by_tokens.finish_reason == by_context.finish_reason == "length"
    assert len(by_tokens.token_ids) == 3
    # Positions 10..15 are fed (the cache holds 16); the token sampled at 15 still counts.
    assert by_context.token_ids == greedy_by_recomputation(model, p, 16 - 10 + 1)
    zero = eng.generate([p], SamplingParams(max_tokens=0))[0]
    assert zero.token_ids == [] and zero.finish_reason == "length" and zero.text == ""


def test_bad_prompts_are_user_errors(model):
    eng = Engine(model, TOK, max_seq_len=32)
    with pytest.raises(UserError, match="prompt of 32 tokens does not fit the context of 32"):
        eng.submit(prompt(32, 0), GREEDY)
    with pytest.raises(UserError, match="empty"):
        eng.submit([], GREEDY)
    with pytest.raises(UserError, match="outside the vocabulary"):
        eng.submit([1, 512], GREEDY)
    with pytest.raises(UserError, match="temperature"):
        eng.generate([[1], [2]], [GREEDY, SamplingParams(temperature=-1)])
    assert not eng.has_work()  # nothing half-submitted
    with pytest.raises(UserError, match="max_seq_len"):
        Engine(model, TOK, max_seq_len=1000)


def test_stream_yields_until_finished_and_stops_cleanly(model):
    eng = Engine(model, TOK, max_batch_size=2)
    p = prompt(5, 9)
    events = list(eng.stream(p, GREEDY))
    assert [e.finished for e in events] == [False] * 19 + [True]
    assert "".join(e.text for e in events) == eng.generate([p], GREEDY)[0].text
    for i, _ in enumerate(eng.stream(p, GREEDY)):  # a consumer that walks away
        if i == 2:
            break
    assert not eng.has_work()
    eng.submit(p, GREEDY)
    with pytest.raises(RuntimeError, match="idle"):
        eng.generate([p], GREEDY)


# ---- text: stop tokens, stop strings, UTF-8 -------------------------------------------------


class Scripted(Transformer):
    """The real forward (so the cache is used as usual), but the next token is scripted by
    position: after the token at position p comes script[p + 1]."""

    def __init__(self, script: list[int]) -> None:
        super().__init__(preset("tiny"))
        self.script = torch.tensor(script)

    def forward(self, idx, *, positions=None, **kw):
        super().forward(idx, positions=positions, **kw)
        nxt = self.script[(positions + 1).clamp(max=len(self.script) - 1)]
        return F.one_hot(nxt, self.cfg.vocab_size).float() * 30


def run_script(tokens: list[int], **params) -> tuple[list[TokenEvent], str]:
    p = [1, 2, 3]
    eng = Engine(Scripted(p + tokens), TOK, max_batch_size=2)
    events = list(eng.stream(p, SamplingParams(temperature=0, **params)))
    return events, "".join(e.text for e in events)


def test_stop_token_is_not_text():
    events, text = run_script([10, 11, EOS, 12])
    assert text == "<10><11>" and events[-1].finish_reason == "stop"
    assert [e.token_id for e in events] == [10, 11, EOS]
    events, text = run_script([10, 11, EOS, 12, 13], ignore_eos=True, stop_token_ids=[12])
    assert text == "<10><11>" and events[-1].finish_reason == "stop"
    assert [e.token_id for e in events] == [10, 11, EOS, 12]


def test_stop_string_split_across_tokens_is_caught_and_excluded():
    events, text = run_script([10, EN, D_BANG, 11], stop=["nd"])
    assert text == "<10>e" and events[-1].finish_reason == "stop"
    assert [e.text for e in events] == ["<10>", "e", ""]  # "n" was held, then dropped
    # Spanning three tokens, with an earlier false start that must be released.
    events, text = run_script([10, 11, 12, 13, 14], stop=["1><12><1", "<13>x"], max_tokens=5)
    assert text == "<10><1" and events[-1].finish_reason == "stop"
    assert [e.text for e in events] == ["<10>", "<1", "", ""]
    # A false start is held, then released once the next token rules the stop string out.
    events, text = run_script([10, 11, 12, 13], stop=["<12>x"], max_tokens=4)
    assert [e.text for e in events] == ["<10>", "<11>", "", "<12><13>"]
    assert events[-1].finish_reason == "length"


def test_incomplete_utf8_is_never_emitted():
    tokens = [EURO_HEAD, EURO_TAIL, 5, EURO_HEAD, EURO_TAIL, EURO_HEAD, EURO_TAIL, EOS]
    events, text = run_script(tokens)
    assert text == "€<5>€€"
    assert all("\ufffd" not in e.text for e in events)
    assert [e.text for e in events][:3] == ["", "€", "<5>"]
    # A generation cut in the middle of a character ends with the replacement character.
    _, text = run_script([5, EURO_HEAD, EURO_TAIL], max_tokens=2)
    assert text == "<5>\ufffd"


def test_detokenizer_and_matcher_units():
    detok = IncrementalDetokenizer(TOK, context_ids=[EURO_HEAD])
    assert detok.add(EURO_TAIL) == ""  # completes a character the prompt started
    assert detok.add(7) == "<7>"
    # lstrip drops whitespace until the first visible character, and none after it.
    detok = IncrementalDetokenizer(TOK, context_ids=[5], lstrip=True)
    assert [detok.add(t) for t in (SPACE, SPACE_EN, SPACE, EN)] == ["", "en", " ", "en"]
    m = StopStringMatcher(["abc", "bd"])
    assert m.push("xa") == ("x", False)
    assert m.push("b") == ("", False)  # "ab" and "b" are both stop prefixes
    assert m.push("d") == ("a", True)  # "bd" matched; "a" was safe after all
    m = StopStringMatcher(["aab"])
    assert m.push("aaa") == ("a", False)
    assert m.push("b") == ("", True)


# ---- compile ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_decode_equals_eager(model):
    prompts = [prompt(n, seed) for seed, n in enumerate([2, 11, 30])]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    eager = Engine(model, TOK, max_batch_size=4, max_seq_len=64).generate(prompts, params)
    compiled = Engine(model, TOK, max_batch_size=4, max_seq_len=64, compile=True)
    got = compiled.generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in eager]
