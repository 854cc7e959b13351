"""Multi-turn chat in the terminal, on top of the shared engine and the model's chat template."""

from __future__ import annotations

import dataclasses
from typing import Any, TextIO

import yaml

from kotonoha.errors import UserError

# The answer length when none is given: 256 tokens, but at most half the context, so that a
# small model (the demo's context is 256) keeps room for the conversation.
DEFAULT_MAX_TOKENS = 256

# What /params may change, by the type its value must have; the other SamplingParams fields
# (lstrip, ignore_eos, stop_token_ids) are set by the chat itself.
FLOAT_SETTINGS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty")
INT_SETTINGS = ("top_k", "max_tokens", "logprobs", "seed")
SETTINGS = (*FLOAT_SETTINGS, *INT_SETTINGS, "logit_bias", "stop")
INTERNAL_SETTINGS = ("lstrip", "ignore_eos", "stop_token_ids")

HELP = """commands:
  /reset           forget the conversation (keeps the system prompt)
  /system TEXT     set the system prompt and reset
  /params          show sampling settings; /params key=value ... changes them
  /quit            leave (Ctrl-D works too)"""


def require_utf8(text: str, what: str) -> str:
    """`text` unchanged, or a UserError when it holds bytes that were not UTF-8 (Python keeps
    them as lone surrogates, which the tokenizer cannot take)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{what} is not valid UTF-8 text; check the terminal's or file's "
                        "encoding.") from None
    return text


def _parse_logit_bias(raw: str) -> dict[int, float]:
    """"42=-100,7=5" (as --logit-bias spells it) -> {42: -100.0, 7: 5.0}; "" or {} clears."""
    bias: dict[int, float] = {}
    for item in raw.split(","):
        if item.strip() in ("", "{}"):
            continue
        tok, sep, val = item.partition("=")
        if not sep:
            raise ValueError(item)
        bias[int(tok)] = float(val)
    return bias


def parse_setting(name: str, raw: str) -> Any:
    """The value of one `/params name=raw` as its field's type; one sentence when it is not."""
    if name in INTERNAL_SETTINGS:
        raise UserError(f"{name} is set by the chat itself and cannot be changed with /params.")
    if name not in SETTINGS:
        raise UserError(f"Unknown sampling setting '{name}'; /params takes "
                        f"{', '.join(SETTINGS)}.")
    try:
        if name in FLOAT_SETTINGS:
            return float(raw)
        if name == "seed" and raw.lower() in ("none", "null"):
            return None  # a fresh seed for every answer
        if name in INT_SETTINGS:
            return int(raw)
        if name == "logit_bias":
            return _parse_logit_bias(raw)
        if raw[:1] in ('"', "'", "["):  # YAML: stop="\n" (escapes), stop=[a,b] (several)
            stops = yaml.safe_load(raw)
            stops = [stops] if isinstance(stops, str) else stops
            if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
                raise ValueError(raw)
            return stops
        return [raw] if raw else []  # one stop string, even of several characters
    except (ValueError, yaml.YAMLError):
        kind = ("a number" if name in FLOAT_SETTINGS
                else "a whole number (or none)" if name == "seed"
                else "a whole number" if name in INT_SETTINGS
                else "TOKEN_ID=BIAS pairs separated by commas, e.g. 42=-100"
                if name == "logit_bias" else "a string, or a list like [a,b]")
        raise UserError(f"{name}={raw} is not valid; {name} must be {kind}.") from None


class ChatSession:
    """Holds a conversation and keeps it inside the model's context window."""

    def __init__(self, engine: Any, tokenizer: Any, params: Any, system: str | None = None):
        self.engine, self.tokenizer = engine, tokenizer
        self.system = system
        self.history: list[dict[str, str]] = []
        if params.max_tokens is None:  # not given: see DEFAULT_MAX_TOKENS
            params = dataclasses.replace(
                params, max_tokens=min(DEFAULT_MAX_TOKENS, engine.max_seq_len // 2))
        self.check_max_tokens(params.max_tokens)
        self.params = dataclasses.replace(params, lstrip=True)  # replies drop the template's space

    def check_max_tokens(self, max_tokens: int) -> None:
        """Refuse an answer length that leaves no room for even a one-token message."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        ids, _ = self.tokenizer.encode_chat([*head, {"role": "user", "content": "x"}],
                                            add_generation_prompt=True)
        room = self.engine.max_seq_len - len(ids)
        if max_tokens > room:
            raise UserError(f"max_tokens={max_tokens} leaves no room for a message in the "
                            f"{self.engine.max_seq_len}-token context; use at most "
                            f"{max(room, 0)}.")

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def prompt_ids(self) -> list[int]:
        """Token ids of the conversation, dropping the oldest turns until the answer fits."""
        budget = self.engine.max_seq_len - self.params.max_tokens
        while True:
            ids, _ = self.tokenizer.encode_chat(self.messages(), add_generation_prompt=True)
            if len(ids) <= budget or len(self.history) <= 1:
                break
            # Drop the oldest user/assistant exchange; the newest user message always stays.
            self.history = self.history[2:] if len(self.history) > 2 else self.history[1:]
        if len(ids) > budget:
            raise UserError(
                f"This message needs {len(ids)} tokens but only {budget} fit in the context "
                f"after reserving {self.params.max_tokens} for the answer; shorten it or lower "
                "max_tokens with /params max_tokens=N."
            )
        return ids

    def reply(self, user_text: str, out: TextIO) -> str:
        self.history.append({"role": "user", "content": user_text})
        try:
            ids = self.prompt_ids()
        except UserError:
            self.history.pop()
            raise
        pieces = []
        for event in self.engine.stream(ids, self.params):
            pieces.append(event.text)
            out.write(event.text)
            out.flush()
        out.write("\n")
        answer = "".join(pieces).strip()
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def command(self, line: str, out: TextIO) -> bool:
        """Handle a /command; returns False when the session should end."""
        name, _, rest = line.partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.history = []
            out.write("(conversation cleared)\n")
        elif name == "/system":
            self.system = rest.strip() or None
            self.history = []
            out.write("(system prompt set; conversation cleared)\n")
        elif name == "/params":
            if rest.strip():
                changes = {}
                for item in rest.split():
                    key, sep, raw = item.partition("=")
                    if not sep or not key:
                        raise UserError(f"'{item}' must look like key=value, e.g. "
                                        "temperature=0.7.")
                    changes[key] = parse_setting(key, raw)
                candidate = dataclasses.replace(self.params, **changes)
                candidate.validate(self.engine.vocab_size)
                self.check_max_tokens(candidate.max_tokens)
                self.params = candidate
            for f in dataclasses.fields(self.params):
                out.write(f"  {f.name} = {getattr(self.params, f.name)!r}\n")
        else:
            out.write(HELP + "\n")
        return True

    def repl(self, inp: TextIO, out: TextIO) -> None:
        interactive = inp.isatty()
        out.write("kotonoha chat — /help for commands, Ctrl-D to leave\n")
        while True:
            if interactive:
                out.write("\n> ")
                out.flush()
            line = inp.readline()
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            try:
                require_utf8(line, "This line")
                if line.startswith("/"):
                    if not self.command(line, out):
                        break
                    continue
                if not interactive:
                    out.write(f"> {line}\n")
                self.reply(line, out)
            except UserError as e:  # a bad command must not end the conversation
                out.write(f"error: {e}\n")
