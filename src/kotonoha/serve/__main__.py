"""`python -m kotonoha.serve`: the server without the `kotonoha` CLI (tests, benchmarks)."""

from __future__ import annotations

import argparse
import sys

from kotonoha.errors import UserError
from kotonoha.serve.cli import add_serve_arguments, run_serve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kotonoha.serve",
                                description="Serve models over an OpenAI-compatible API and "
                                            "a web UI.")
    add_serve_arguments(p)
    try:
        run_serve(p.parse_args(argv))
    except UserError as e:
        print(f"kotonoha: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
