"""What every "look inside" tool shares: loading, tokens and their text, the residual stream
at every layer, finding a word's tokens in a sentence, and writing figures and summaries.

Layer numbering is the same everywhere: layer 0 is the input to the first block (token
embeddings, scaled and with learned positions where the model has them), layer l >= 1 is the
residual stream after block l, so a model with L blocks has L + 1 layers.
"""

from __future__ import annotations

import contextlib
import io
import re
import unicodedata
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kotonoha.checkpoint import atomic_write_bytes, atomic_write_json, atomic_write_text
from kotonoha.errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from kotonoha.model import ForwardOutput, Transformer
    from kotonoha.tokenizer import Tokenizer

# Tried in order per glyph (matplotlib >= 3.6 falls back across families), so Japanese labels
# render wherever one of these fonts is installed; without one they become boxes, not errors.
CJK_FONTS = ("IPAGothic", "IPAexGothic", "Noto Sans CJK JP", "Noto Sans JP", "TakaoGothic",
             "Hiragino Sans", "Yu Gothic", "MS Gothic")


# ---------------------------------------------------------------------------------------------
# Models and tokens


def load_for_explain(spec: str | Path, *, tokenizer: str | Path | None = None,
                     device: str | None = None) -> tuple[Transformer, Tokenizer]:
    """A model (float32, eval mode) and its tokenizer from anything `load_model` opens, or a
    packaged name like `smollm2`."""
    from kotonoha.checkpoint import load_model
    from kotonoha.models import resolve

    # float32: quantised GGUF weights dequantise to it, and cosines/softmaxes want precision.
    model, tok = load_model(resolve(str(spec)), device=device, dtype=torch.float32)
    if tokenizer is not None:
        from kotonoha.tokenizer import Tokenizer

        tok = Tokenizer.load(tokenizer)
    if tok is None:
        raise UserError(f"{spec} has no tokenizer; pass one with --tokenizer DIR.")
    return model.float().eval(), tok


def document_start_id(tokenizer: Tokenizer) -> int | None:
    """The token that opens a document in pretraining: bos, except for ChatML tokenizers
    (SmolLM2) that name <|im_start|> as bos but separate documents with <|endoftext|>."""
    if tokenizer.bos_token == "<|im_start|>":
        return tokenizer.token_to_id("<|endoftext|>")
    return tokenizer.bos_id


def encode(tokenizer: Tokenizer, text: str, add_bos: bool = True) -> list[int]:
    """Token ids of `text`, after the document-start token with `add_bos` (as a document
    starts in pretraining and in the evals). Without one, the first word of the text becomes
    the "attention sink" that many heads park their attention on, which muddles the maps."""
    ids = tokenizer.encode(text)
    start = document_start_id(tokenizer) if add_bos else None
    if start is not None:
        ids = [start, *ids]
    if not ids:
        raise UserError("The text is empty; give a prompt with at least one token.")
    return ids


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte -> printable character table, inverted (byte-level BPE stores tokens in
    those characters)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    for b in range(256):
        if b not in bs:  # unprintable bytes get the characters from U+0100 up, in order
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTES = _byte_level_decoder()


def token_labels(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """Readable text of each token on its own. A piece of a multi-byte character (which
    decodes to "�") is shown as its bytes, e.g. "\\xe3\\x82"."""
    labels = []
    for i in ids:
        text = tokenizer.decode([i])
        if "\ufffd" in text:
            raw = tokenizer.id_to_token(i) or ""
            if raw and all(ch in _BYTES for ch in raw):
                text = "".join(f"\\x{_BYTES[ch]:02x}" for ch in raw)
        labels.append(_escape_controls(text))
    return labels


_NAMED_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape_controls(text: str) -> str:
    """Control and other invisible characters (a NUL byte token, U+200B) as escapes, so a
    label never writes them into a Markdown table or a plot."""
    out = []
    for ch in text:
        if ch in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[ch])
        elif unicodedata.category(ch).startswith("C"):
            # \u above ASCII: "\x85" would read as a byte of a split character (see above)
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x80 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def quote(label: str) -> str:
    """A token label in quotes, so leading spaces show (labels are already escaped)."""
    return f"'{label}'"


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def residual_stream(model: Transformer, ids: Sequence[int], *, attentions: bool = False,
                    ) -> tuple[torch.Tensor, ForwardOutput]:
    """The residual stream of one sequence at every layer, (L + 1, T, d_model), float32, and
    the forward output (logits (1, T, V); attentions when asked)."""
    model.eval()
    if len(ids) > model.cfg.context_length:
        raise UserError(f"The text is {len(ids)} tokens, longer than the model's context of "
                        f"{model.cfg.context_length}; shorten it.")
    captured: list[torch.Tensor] = []
    # What block 0 receives is exactly layer 0 (embeddings, scaled, plus learned positions),
    # so a hook reads it instead of repeating the model's embedding code here.
    hook = model.blocks[0].register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        idx = torch.tensor([list(ids)], device=model_device(model))
        out = model(idx, output_hidden_states=True, output_attentions=attentions)
    finally:
        hook.remove()
    layers = [captured[0], *out.hidden_states]
    return torch.stack([h[0].float() for h in layers]), out


# ---------------------------------------------------------------------------------------------
# Words inside sentences


def find_word(text: str, word: str, start: int = 0) -> tuple[int, int] | None:
    """Character span of the first occurrence of `word` at or after `start`.

    Latin-script words match whole words only, case-insensitively ("he" is not in "the");
    anything else (Japanese) is a plain substring search, since it has no spaces.
    """
    if word.isascii():
        m = re.search(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", text[start:],
                      flags=re.IGNORECASE)
        return (start + m.start(), start + m.end()) if m else None
    i = text.find(word, start)
    return (i, i + len(word)) if i >= 0 else None


def token_offsets(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` (as `tokenizer.encode` gives them) and each token's character span."""
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    if enc.ids != tokenizer.encode(text):
        raise UserError("The text contains control-token strings (like <|im_start|>); remove "
                        "them to look inside.")
    return list(enc.ids), [tuple(o) for o in enc.offsets]


def span_positions(offsets: Sequence[tuple[int, int]], span: tuple[int, int],
                   shift: int = 0) -> list[int]:
    """Positions of the tokens that overlap the character span (+ `shift` for a BOS)."""
    lo, hi = span
    return [i + shift for i, (a, b) in enumerate(offsets) if a < hi and b > lo]


# ---------------------------------------------------------------------------------------------
# Output: figures, tables, summaries


_cjk_fonts: list[str] | None = None


def _installed_cjk_fonts() -> list[str]:
    global _cjk_fonts
    if _cjk_fonts is None:
        from matplotlib import font_manager

        fm = font_manager.fontManager

        def present() -> list[str]:
            names = {f.name for f in fm.ttflist}
            return [f for f in CJK_FONTS if f in names]

        if not present():
            # matplotlib's font cache predates fonts installed later; register those files.
            # One sans-serif Japanese file is enough (and each costs ~0.5 s to read).
            keys = ("ipag", "ipaexg", "notosanscjk", "notosansjp", "takaogothic")
            for path in sorted(font_manager.findSystemFonts()):
                if any(k in Path(path).name.lower().replace("-", "") for k in keys):
                    with contextlib.suppress(Exception):
                        fm.addfont(path)
                        if present():
                            break
        _cjk_fonts = present()
    return _cjk_fonts


@contextlib.contextmanager
def plot_style() -> Iterator[None]:
    """Matplotlib settings for every figure here: Agg-safe, Japanese-capable where possible."""
    import matplotlib

    families = ["DejaVu Sans", *_installed_cjk_fonts()]
    with matplotlib.rc_context({"font.family": families}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        yield


def save_figure(fig: Figure, path: str | Path) -> Path:
    """PNG, written atomically. Figures are built with `matplotlib.figure.Figure`, never
    pyplot, so no global backend or display is involved."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        text = f"{v:.4f}" if isinstance(v, float) else "–" if v is None else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def check_out_dir(out: str | Path) -> Path:
    """Refuse an output folder that is an existing file before any work: the writes at the
    end would fail on it after minutes of computing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the figures and summary.")
    return out


def check_at_least_one(value: int, option: str) -> None:
    """Counts of things to show or generate: zero or a negative number means nothing sensible
    (a negative slice bound would silently drop items from the end instead)."""
    if value < 1:
        raise UserError(f"{option} must be at least 1, not {value}.")


def write_summary(out: str | Path, name: str, markdown: str, data: dict[str, Any]) -> Path:
    """`out/NAME.md` and `out/NAME.json` (atomically); returns the markdown's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{name}.json", data)
    atomic_write_text(out / f"{name}.md", markdown)
    return out / f"{name}.md"
