"""kotonoha: raw text in, an aligned chat assistant out."""

__version__ = "0.1.0"
