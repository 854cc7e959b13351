"""`make demo`: the whole recipe on the built-in world, then how to talk to the result.

It is `kotonoha pipeline --config configs/pipeline-demo.yaml` (world -> tokenizer -> data ->
pretrain -> SFT -> reward -> RL, DPO as a branch, eval, report card) plus a closing note with
the commands that chat with and serve the models it made. Re-running skips finished stages.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kotonoha.errors import UserError
from kotonoha.pipeline import load_pipeline_config, run_pipeline

DEMO_CONFIG = Path("configs/pipeline-demo.yaml")


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)  # key=value, as for `pipeline`
    if not DEMO_CONFIG.is_file():
        print(f"error: {DEMO_CONFIG} not found; run `make demo` from the repository root.",
              file=sys.stderr)
        return 2
    try:
        cfg = load_pipeline_config(DEMO_CONFIG, overrides)
        run_pipeline(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.out)
    print(f"""
The report card is {out / 'report.md'} (and report.html, with plots). Next:
  .venv/bin/kotonoha chat --model {out / 'rl'}          # talk to the RL model (or sft, dpo)
  .venv/bin/kotonoha serve --model {out / 'rl'}         # OpenAI-compatible API + web UI
  .venv/bin/kotonoha eval --model {out / 'pretrain'} --suite world   # the base model's cloze
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
