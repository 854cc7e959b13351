"""`kotonoha feedback export`: preference pairs from the web UI's store, for `kotonoha reward`.

Pairs come from answers to the same question rated thumbs-up vs thumbs-down (a regenerated
answer next to the one it replaced) and from arena battles voted A or B. One JSON object per
line, in the format of the built-in world's preference data:
`{"prompt": [messages...], "chosen": str, "rejected": str, "kind": "feedback"|"arena", ...}`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from kotonoha.checkpoint import atomic_write_text
from kotonoha.errors import UserError


def export_preferences(db: str | Path, out: str | Path) -> Counter[str]:
    """Write the pairs to `out` (atomically); returns how many of each kind."""
    from kotonoha.serve.store import Store

    if not Path(db).is_file():
        raise UserError(f"Store {db} does not exist; give the --db file the server used.")
    if Path(out).is_dir():
        raise UserError(f"--out {out} is a directory; give the path of the JSONL file to write.")
    if Path(out).exists() and os.path.samefile(db, out):  # the export would replace its input
        raise UserError(f"--out {out} is the database itself; give another file to write.")
    store = Store(db, readonly=True)  # the export never writes to the store
    try:
        pairs = list(store.preference_pairs())
    finally:
        store.close()
    atomic_write_text(out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    return Counter(p["kind"] for p in pairs)


def feedback_export_main(db: str | Path, out: str | Path) -> None:
    counts = export_preferences(db, out)
    detail = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "none yet"
    print(f"wrote {sum(counts.values())} preference pairs ({detail}) to {out}")
