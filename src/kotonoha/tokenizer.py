"""Byte-level BPE tokenizer, chat templates and special-token safety.

The heavy lifting (BPE training and encoding) is done by Hugging Face `tokenizers`; this
module adds what a chat system needs on top of it:

- a pre-tokenizer that treats Japanese as well as English (kanji, hiragana and katakana runs
  become separate pre-tokens, so particles and okurigana get their own tokens);
- two encoders: `encode` for untrusted text, where "<|im_start|>" is just characters, and
  `encode_special` for trusted template text, where it is one control token;
- Jinja2 chat templates rendered like `transformers` does, and `encode_chat`, which marks
  the assistant's tokens for supervised fine-tuning;
- HF-compatible `tokenizer.json` + `tokenizer_config.json` files, written atomically.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from kotonoha.errors import UserError

# ChatML, the control tokens SmolLM2 uses; ids 0..3 in every tokenizer trained here.
SPECIAL_TOKENS: list[str] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# A word opening a text is another token than the same word after a space ("Ebos" against
# " Ebos") in a byte-level BPE without a prefix space; text that starts with one of these
# characters reads as running text only after a space. Scripts written without spaces
# (Japanese) need none, and a space before them would be a token pretraining never saw.
LATIN_WORD_START: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

# The ChatML turns of SmolLM2-Instruct (without its default system prompt), with a space
# before a message that opens with a Latin letter or digit, so that its first word is the
# token pretraining met mid-sentence. Without it the demo's SFT model answered 71-79% of the
# English held-out questions right, with it 96% (docs/PIPELINE.md). The space joins the
# message's first token (`encode_chat`) and a reply drops it (`SamplingParams.lstrip`); the
# generation prompt ends at the newline, so the model writes " Ebos" itself.
CHATML_TEMPLATE: str = (
    "{% for message in messages %}{% set text = message['content'] %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if text and text[0] in '" + LATIN_WORD_START + "' %} {% endif %}"
    "{{ text + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Gemma's turn format (a base Gemma has the tokens but no template): the assistant is "model",
# and Gemma has no system role: a leading system prompt opens the first user turn, a later
# one is a user turn.
GEMMA_TEMPLATE: str = (
    "{{ bos_token }}"
    "{% set lead = messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\n\n' if lead else '' %}"
    "{% for message in (messages[1:] if lead else messages) %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user')"
    " + '\n' + (system if loop.first else '') + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# End-of-turn tokens of the chat formats we import (ChatML, Gemma, Llama 3, Phi-3): a chat
# model ends its reply with one of these rather than with eos, so the engine must stop there.
END_OF_TURN_TOKENS: tuple[str, ...] = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")

# Control tokens of those formats (ours, turn openers and closers). User text must never
# produce them, even when a tokenizer.json leaves them unflagged as special.
TURN_MARKERS: tuple[str, ...] = (
    *SPECIAL_TOKENS, *END_OF_TURN_TOKENS, "<start_of_turn>", "<|begin_of_text|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|system|>", "<|user|>", "<|assistant|>",
)

# A message role is a plain name ("user", "tool", "developer"): a template writes it as
# trusted text, so anything else could forge a turn ("user<|im_end|>...").
ROLE_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")

# Markup-looking added tokens ("<|im_start|>", "[INST]"): only these count as control tokens
# for being written in a chat template; added whitespace tokens ("\n\n") are ordinary text.
_MARKUP_TOKEN = re.compile(r"\S*[<>\[\]|]\S*")

_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}ー"  # ー (U+30FC) has script Common, not Katakana
# GPT-2's regex lumps a whole unspaced run of Japanese into one pre-token, so no BPE merge can
# respect a word boundary inside it. Splitting at script changes (kanji / hiragana / katakana,
# and Latin vs CJK) approximates morpheme boundaries for free. Every digit is its own token
# (as in Llama 2, SmolLM2, Gemma): column arithmetic writes digits one at a time and its answer
# must read them back, which a model cannot learn when "1040" is the tokens " 104" + "0".
# Letters include combining marks so decomposed "é" stays in its word.
SPLIT_PATTERN: str = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"| ?\p{Han}+"
    r"| ?\p{Hiragana}+"
    r"| ?[\p{Katakana}ー]+"
    rf"| ?(?:(?![{_CJK}])[\p{{L}}\p{{M}}])+"
    r"| ?\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

_ASSETS = Path(__file__).parent / "assets"


def sample_text_paths() -> list[Path]:
    """The bundled English and Japanese sample texts (demo tokenizer, benchmarks, tests)."""
    return [_ASSETS / "sample_en.txt", _ASSETS / "sample_ja.txt"]


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the token roles and chat template a model needs."""

    def __init__(
        self,
        backend: Backend,
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        extra_stop_tokens: Sequence[str] | None = None,
        model_max_length: int | None = None,
        add_bos_token: bool = False,
    ) -> None:
        # A tokenizer.json may carry padding/truncation settings; they would silently change
        # ids, and batching/cropping is the engine's and trainer's job.
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self._plain: Backend | None = None  # built lazily by `_text_backend`
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.model_max_length = model_max_length
        # Whether a plain-text prompt starts with <bos> (Gemma, Llama: yes; ours, SmolLM2: no).
        # Chat templates write their own <bos>, so this is for `encode_prompt` only.
        self.add_bos_token = add_bos_token
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._role_id(bos_token, "bos_token")
        self.eos_id = self._role_id(eos_token, "eos_token")
        self.pad_id = self._role_id(pad_token, "pad_token")
        if extra_stop_tokens is None:
            self.extra_stop_tokens = self._default_stop_tokens()
        else:
            self.extra_stop_tokens = list(extra_stop_tokens)
        stops = [self.eos_id] + [self._role_id(t, "stop token") for t in self.extra_stop_tokens]
        self.stop_ids: list[int] = list(dict.fromkeys(i for i in stops if i is not None))
        self._compiled: tuple[str, jinja2.Template] | None = None

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        self._chat_template = template
        self._plain = None  # the template's tokens are control tokens: rebuild on next use

    @property
    def _text_backend(self) -> Backend:
        """The backend `encode` uses: control tokens in its input are ordinary characters."""
        if self._plain is None:
            self._plain = _plain_text_backend(self.backend, self._control_tokens())
        return self._plain

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, "
            f"chat_template={'yes' if self.chat_template else 'no'})"
        )

    def __len__(self) -> int:
        return self.vocab_size

    def _role_id(self, token: str | None, role: str) -> int | None:
        if token is None:
            return None
        i = self.backend.token_to_id(token)
        if i is None:
            raise UserError(
                f"The {role} {token!r} is not in the tokenizer's vocabulary; "
                "fix tokenizer_config.json or pass a token that exists."
            )
        return i

    def _default_stop_tokens(self) -> list[str]:
        return [t for t in END_OF_TURN_TOKENS if self.backend.token_to_id(t) is not None]

    def _control_tokens(self) -> set[str]:
        """Token strings that user text must never be able to produce: special tokens, the
        token roles, known turn markers, and markup tokens the chat template writes (some
        tokenizer.json files leave "<|im_start|>" unflagged)."""
        added = self.backend.get_added_tokens_decoder().values()
        special = {t.content for t in added if t.special}
        template = self.chat_template or ""
        markers = {t.content for t in added if t.content in TURN_MARKERS
                   or (_MARKUP_TOKEN.fullmatch(t.content) and t.content in template)}
        roles = {self.bos_token, self.eos_token, self.pad_token, *self.extra_stop_tokens}
        return special | markers | {t for t in roles if t is not None}

    # --- encoding -------------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Encode untrusted text: special-token strings inside it are encoded as plain text."""
        ids = self._text_backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            return [self.bos_id, *ids]
        return ids

    def encode_prompt(self, text: str) -> list[int]:
        """Untrusted text as a model prompt: `encode`, after <bos> when the model expects it."""
        return self.encode(text, add_bos=self.add_bos_token)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once (runs in parallel inside `tokenizers`)."""
        encs = self._text_backend.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encs]

    def encode_special(self, text: str) -> list[int]:
        """Encode trusted text (rendered templates): special-token strings become control ids."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        # int() so numpy / torch integers work too.
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, tok: str) -> int | None:
        return self.backend.token_to_id(tok)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    # --- chat -----------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = False
    ) -> str:
        """Render a conversation to text exactly as `transformers.apply_chat_template` does."""
        return self._render(_normalise_messages(messages), add_generation_prompt)

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Token ids of a rendered conversation and a 0/1 mask of the assistant's tokens.

        The mask covers each assistant message's content and the end-of-turn token that
        closes it (the model must learn to stop). Message contents go through `encode`, so
        a user typing "<|im_end|>" cannot forge a turn; only template text is special.
        """
        msgs = _normalise_messages(messages)
        full = self._render(msgs, add_generation_prompt)
        # Render once with each content replaced by a unique marker, then split at the markers:
        # this tells us which characters are template (trusted) and which are message text.
        nonce = secrets.token_hex(8)
        marker = re.compile("\ue000" + nonce + r":(\d+)\ue001")
        marked = [{**m, "content": f"\ue000{nonce}:{i}\ue001"} for i, m in enumerate(msgs)]
        parts = marker.split(self._render(marked, add_generation_prompt))
        contents = _contents_as_rendered(parts, [m["content"] for m in msgs], full)
        stops = set(self.stop_ids)
        ids: list[int] = []
        mask: list[int] = []
        after_assistant = False
        for k, part in enumerate(parts):
            if k % 2 == 0:  # template text
                piece = self.encode_special(part) if part else []
                flags = [0] * len(piece)
                if after_assistant:
                    # The assistant's turn ends at the first stop token after its content.
                    end = next((j for j, t in enumerate(piece) if t in stops), None)
                    if end is not None:
                        flags[: end + 1] = [1] * (end + 1)
                after_assistant = False
            else:  # message content
                m = int(part)
                piece = self.encode(contents[m])
                after_assistant = msgs[m]["role"] == "assistant"
                flags = [int(after_assistant)] * len(piece)
            ids += piece
            mask += flags
        return ids, mask

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        if not self.chat_template:
            raise UserError(
                "This model has no chat template; it is a base (pretrained-only) model, so "
                "fine-tune it for chat with `kotonoha sft` or use it for plain text completion."
            )
        if self._compiled is None or self._compiled[0] != self.chat_template:
            try:
                compiled = _jinja_env().from_string(self.chat_template)
            except jinja2.TemplateError as e:
                raise UserError(f"The chat template is not valid Jinja2: {e}.") from e
            self._compiled = (self.chat_template, compiled)
        roles = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                 "pad_token": self.pad_token}
        # Like transformers: unset roles are left undefined (so they render as "").
        ctx = {k: v for k, v in roles.items() if v is not None}
        try:
            return self._compiled[1].render(
                messages=messages, add_generation_prompt=add_generation_prompt, **ctx
            )
        except jinja2.TemplateError as e:
            raise UserError(f"The chat template rejected the conversation: {e}.") from e
        except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError,
                RecursionError) as e:  # a bug in the template's own code (`1 / 0`, `'a' + 1`)
            raise UserError(f"The chat template failed while rendering the conversation "
                            f"({type(e).__name__}: {e}); fix the template.") from e

    # --- files ----------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json, loadable by `transformers` too."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            # transformers would otherwise "clean up" spaces before punctuation on decode.
            "clean_up_tokenization_spaces": False,
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        config["add_bos_token"] = self.add_bos_token  # transformers' key
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        if self.extra_stop_tokens != self._default_stop_tokens():
            config["extra_stop_tokens"] = self.extra_stop_tokens  # kotonoha's own key
        _atomic_write_text(d / "tokenizer.json", self.backend.to_str(pretty=True))
        _atomic_write_text(
            d / "tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=2) + "\n"
        )

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load from a directory (ours or a Hugging Face model's) or a tokenizer.json path."""
        path = Path(directory)
        if path.is_file():
            tok_file, path = path, path.parent
        elif path.is_dir():
            tok_file = path / "tokenizer.json"
        else:
            raise UserError(f"Tokenizer directory {path} does not exist; check the path.")
        if not tok_file.is_file():
            raise UserError(
                f"No tokenizer.json in {path}; point to a run or model directory that has one."
            )
        try:
            backend = Backend.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise UserError(
                f"{tok_file} is not a valid tokenizer.json ({e}); re-create or re-download it."
            ) from e
        config = _read_config(path / "tokenizer_config.json")
        template = _pick_template(config.get("chat_template"))
        jinja_file = path / "chat_template.jinja"  # where transformers >= 4.50 saves it
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        max_len = config.get("model_max_length")
        stops = config.get("extra_stop_tokens")
        return cls(
            backend,
            chat_template=template,
            bos_token=_token_text(config.get("bos_token"), "bos_token"),
            eos_token=_token_text(config.get("eos_token"), "eos_token"),
            pad_token=_token_text(config.get("pad_token"), "pad_token"),
            extra_stop_tokens=stops if isinstance(stops, list) else None,
            # HF writes ~1e30 for "no limit".
            model_max_length=max_len if isinstance(max_len, int) and max_len < 2**40 else None,
            add_bos_token=_adds_bos(config, backend),
        )


# --- training -------------------------------------------------------------------------------


def new_backend(split_pattern: str | None = SPLIT_PATTERN) -> Backend:
    """An empty byte-level BPE; `split_pattern=None` uses GPT-2's regex (for comparison)."""
    backend = Backend(models.BPE())
    # No normalizer: any normalisation (NFC, ...) would break decode(encode(s)) == s.
    if split_pattern is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    return backend


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    show_progress: bool = False,
    split_pattern: str | None = SPLIT_PATTERN,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on an iterable of texts (streamed, not held in memory).

    Roles follow SmolLM2: the first special token is bos and eos (the document separator);
    with the ChatML tokens present the tokenizer gets the ChatML chat template.
    """
    special = list(special_tokens)
    smallest = 256 + len(special)
    if vocab_size < smallest:
        raise UserError(
            f"vocab_size {vocab_size} is too small; byte-level BPE needs at least {smallest} "
            "(256 bytes + special tokens)."
        )
    seen = [0]

    def counted() -> Iterator[str]:
        for t in texts:
            seen[0] += len(t)
            yield t

    backend = new_backend(split_pattern)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special,
        # Every byte is in the vocabulary even if the corpus never shows it: no <unk>, ever.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(counted(), trainer)
    if seen[0] == 0:
        raise UserError("The tokenizer training corpus is empty; give it some text.")
    first = special[0] if special else None
    chatml = {"<|im_start|>", "<|im_end|>"} <= set(special)
    return Tokenizer(
        backend,
        chat_template=CHATML_TEMPLATE if chatml else None,
        bos_token=first,
        eos_token=first,
        pad_token="<|pad|>" if "<|pad|>" in special else None,
    )


def train_bpe_from_files(paths: Sequence[str | Path], vocab_size: int, **kw: Any) -> Tokenizer:
    """`train_bpe` on .txt files, folders of .txt/.jsonl, and .jsonl files with a "text" field."""
    files = _expand(paths)
    for f in files:
        if f.stat().st_size == 0:
            raise UserError(f"{f} is empty; remove it from the tokenizer corpus.")
    return train_bpe(_stream(files), vocab_size, **kw)


def _expand(paths: Sequence[str | Path]) -> list[Path]:
    if not paths:
        raise UserError("No tokenizer corpus files given; pass at least one .txt or .jsonl.")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl") and f.is_file())
            if not found:
                raise UserError(f"{p} has no .txt or .jsonl files; point to the corpus files.")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"Tokenizer corpus file {p} does not exist; check the path.")
    return files


def _stream(files: list[Path]) -> Iterator[str]:
    for f in files:
        try:
            with f.open(encoding="utf-8") as fh:
                if f.suffix != ".jsonl":
                    yield from fh  # line by line: corpora can be larger than memory
                    continue
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        yield _jsonl_text(line, f, n)
        except UnicodeDecodeError as e:
            raise UserError(f"{f} is not UTF-8 text ({e.reason}); convert it to UTF-8.") from e


def _jsonl_text(line: str, f: Path, n: int) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{f} line {n} is not valid JSON ({e.msg}); fix or remove it.") from e
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise UserError(f'{f} line {n} has no "text" string field; each line needs one.')
    return row["text"]


# --- helpers --------------------------------------------------------------------------------


def _plain_text_backend(backend: Backend, control: set[str]) -> Backend:
    """A copy of `backend` on which control tokens in the input are ordinary characters."""
    text = backend.to_str()
    # encode_special_tokens only covers tokens flagged special; some imported tokenizer.json
    # files leave end-of-turn tokens unflagged, which would let user text forge a turn.
    added = backend.get_added_tokens_decoder().values()
    if any(t.content in control and not t.special for t in added):
        data = json.loads(text)  # slow on a 262k vocabulary (Gemma), so only when needed
        for tok in data.get("added_tokens", []):
            if tok["content"] in control:
                tok["special"] = True
        text = json.dumps(data)
    clone = Backend.from_str(text)
    clone.encode_special_tokens = True
    return clone


def _normalise_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate messages; OpenAI-style content (None, list of text parts) becomes a string."""
    if not isinstance(messages, list):
        raise UserError("messages must be a list of {'role': ..., 'content': ...} objects.")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise UserError(f"Message {i} needs a string 'role' (system, user or assistant).")
        if not ROLE_PATTERN.fullmatch(m["role"]):
            raise UserError(f"Message {i} has the role {m['role']!r}; a role must be a plain "
                            "name such as system, user or assistant.")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            texts = [p.get("text") for p in content if isinstance(p, dict)]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise UserError(f"Message {i} content parts must all be text parts.")
            content = "".join(texts)
        elif not isinstance(content, str):
            raise UserError(f"Message {i} content must be a string.")
        out.append({**m, "content": content})
    return out


def _contents_as_rendered(parts: list[str], contents: list[str], full: str) -> list[str]:
    """Each message's text as the template wrote it into `full`, between the template texts
    `parts[0], parts[2], ...`: unchanged, after a space the template put before it (ChatML
    here, before Latin text), or trimmed (Llama 3's `| trim`)."""
    out, pos = list(contents), len(parts[0])
    if not full.startswith(parts[0]):
        pos = -1
    for k in range(1, len(parts), 2):
        m, after = int(parts[k]), parts[k + 1]
        for candidate in (contents[m], " " + contents[m], contents[m].strip()):
            if pos >= 0 and full.startswith(candidate + after, pos):
                out[m] = candidate
                pos += len(candidate) + len(after)
                break
        else:
            pos = -1
    if pos != len(full):
        raise UserError(
            "The chat template rewrites message text in a way kotonoha cannot map back "
            "to the messages; use a template that inserts message['content'] unchanged."
        )
    return out


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' version: Jinja's own tojson HTML-escapes, which would corrupt prompts.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _jinja_env() -> jinja2.Environment:
    # The same environment transformers builds, so templates from model repos render the same;
    # sandboxed because a template arrives with a downloaded model and is untrusted code.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); fix or delete it.") from e
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a JSON object; fix or delete it.")
    return config


def _adds_bos(config: dict[str, Any], backend: Backend) -> bool:
    """tokenizer_config.json's add_bos_token, else whether tokenizer.json's post-processor
    puts the bos token first (how Hugging Face files for Gemma and Llama say it)."""
    if isinstance(config.get("add_bos_token"), bool):
        return config["add_bos_token"]
    bos = _token_text(config.get("bos_token"), "bos_token")
    post = json.loads(backend.to_str()).get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        single = step.get("single") or []
        if step.get("type") == "TemplateProcessing" and single:
            first = single[0].get("SpecialToken", {}).get("id")
            return first is not None and first == bos
    return False


def _pick_template(value: Any) -> str | None:
    # HF allows a list of named templates; "default" is the chat one.
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default", next(iter(named.values()), None))
    if value is not None and not isinstance(value, str):
        raise UserError("tokenizer_config.json has a chat_template that is not a string.")
    return value


def _token_text(value: Any, role: str) -> str | None:
    if isinstance(value, dict):  # HF's serialised AddedToken
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise UserError(f"tokenizer_config.json has a {role} that is not a string.")
    return value


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file + fsync + rename, so a crash never leaves a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
