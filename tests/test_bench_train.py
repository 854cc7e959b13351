import json
import subprocess
import sys
from pathlib import Path

from kotonoha.model import preset

ROOT = Path(__file__).resolve().parents[1]


def _bench(*extra: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench/train.py"), "--preset", "tiny", "--batch-size", "2",
         "--steps", "1", "--warmup", "1", "--modes", "eager", "--dtypes", "fp32", "--json",
         *extra],
        capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout)


def test_bench_train_times_the_untied_head_the_demo_config_trains():
    tied, untied = _bench(), _bench("--untied")
    assert not tied["untied"] and untied["untied"]
    # The untied model has an output matrix of its own: vocab x d_model more parameters.
    tiny = preset("tiny")
    assert untied["params"] - tied["params"] == tiny.vocab_size * tiny.d_model
    assert {r["model"] for r in untied["rows"]} == {"kotonoha", "nanogpt"}
    assert all(r["tok_per_s"] > 0 for r in untied["rows"])
