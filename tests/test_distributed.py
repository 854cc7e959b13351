"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 match a single process, step by step.

Both ranks together see the same global batch as the single process (each takes half of its
rows), so the losses agree up to float reduction order. Gradient accumulation is on
(micro_batch_size=2 of the 4 rows per rank) to cover DDP's no_sync and FSDP2's
set_requires_gradient_sync paths.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kotonoha.checkpoint import load_model
from kotonoha.data.shards import prepare
from kotonoha.tokenizer import train_bpe
from kotonoha.train.pretrain import pretrain_main

pytestmark = pytest.mark.slow

STEPS = 8


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["river", "bank", "money", "bridge", "はし", "橋", "capital", "Aru", "Beno"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) + "."
            for _ in range(n)]



@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # Tiny models run fastest on one thread, and 2 threads on a busy 2-core machine thrash.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[int, float]]:
    d = tmp_path_factory.mktemp("dist")
    docs = make_docs(300)
    train_bpe(docs, vocab_size=300).save(d / "tok")
    (d / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    prepare([str(d / "c.jsonl")], d / "tok", d / "data", show_progress=False)
    single = pretrain_main(None, settings(d / "data", d / "single"), resume=False)
    return d, single, losses(single)


def settings(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"data={data}", f"out={out}", "preset=tiny", "model.context_length=32",
            "train.batch_size=8", f"train.steps={STEPS}", "train.lr=3e-3",
            "train.warmup_steps=2", "train.log_interval=1", f"train.eval_interval={STEPS}",
            "train.eval_tokens=2048", "train.progress=false", "train.device=cpu",
            "train.plot=false", *extra]


def losses(run: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    out = {r["step"]: r["loss"] for r in recs if "loss" in r}
    out[-1] = next(r["val_loss"] for r in recs if "val_loss" in r)
    return out


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "kotonoha.train.pretrain", *args],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(setup: tuple[Path, Path, dict[int, float]],
                                     parallel: str) -> None:
    d, single, expected = setup
    out = d / parallel
    proc = torchrun(*settings(d / "data", out, f"train.parallel={parallel}",
                              "train.micro_batch_size=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = losses(out)
    assert got.keys() == expected.keys()
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-4), step
    a, _ = load_model(out)  # rank 0 gathered the full (unsharded) weights
    b, _ = load_model(single)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-4), name
    if parallel == "fsdp":  # the checkpoint is unsharded: a single process can resume it
        pretrain_main(None, settings(d / "data", out, f"train.steps={STEPS + 2}"), resume=True)
        assert max(losses(out)) == STEPS + 2


def test_muon_under_ddp_matches_one_process_and_fsdp_refuses_it(
        setup: tuple[Path, Path, dict[int, float]]) -> None:
    d = setup[0]
    muon = "train.optimizer=muon"
    single = pretrain_main(None, settings(d / "data", d / "muon_single", muon), resume=False)
    proc = torchrun(*settings(d / "data", d / "muon_ddp", muon, "train.micro_batch_size=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = losses(single), losses(d / "muon_ddp")
    assert got.keys() == expected.keys()
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-4), step
    proc = torchrun(*settings(d / "data", d / "muon_fsdp", muon, "train.parallel=fsdp"))
    assert proc.returncode != 0 and "use parallel=ddp" in proc.stderr, proc.stderr[-3000:]
