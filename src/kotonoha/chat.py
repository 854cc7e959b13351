"""Multi-turn chat in the terminal, on top of the shared engine and the model's chat template."""

from __future__ import annotations

import dataclasses
from typing import Any, TextIO

from kotonoha.config import parse_overrides
from kotonoha.errors import UserError

HELP = """commands:
  /reset           forget the conversation (keeps the system prompt)
  /system TEXT     set the system prompt and reset
  /params          show sampling settings; /params key=value ... changes them
  /quit            leave (Ctrl-D works too)"""


class ChatSession:
    """Holds a conversation and keeps it inside the model's context window."""

    def __init__(self, engine: Any, tokenizer: Any, params: Any, system: str | None = None):
        self.engine, self.tokenizer = engine, tokenizer
        self.params = dataclasses.replace(params, lstrip=True)  # replies drop the template's space
        self.system = system
        self.history: list[dict[str, str]] = []

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
                changes = parse_overrides(rest.split())
                fields = {f.name for f in dataclasses.fields(self.params)}
                unknown = sorted(set(changes) - fields)
                if unknown:
                    raise UserError(f"Unknown sampling setting(s): {', '.join(unknown)}.")
                candidate = dataclasses.replace(self.params, **changes)
                candidate.validate()
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
                if line.startswith("/"):
                    if not self.command(line, out):
                        break
                    continue
                if not interactive:
                    out.write(f"> {line}\n")
                self.reply(line, out)
            except UserError as e:  # a bad command must not end the conversation
                out.write(f"error: {e}\n")
