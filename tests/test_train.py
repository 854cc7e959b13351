"""The trainer core through `pretrain`: learning, run directory, accumulation, kill -9 + resume."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kotonoha.checkpoint import load_model
from kotonoha.config import load_config
from kotonoha.data.shards import prepare
from kotonoha.errors import UserError
from kotonoha.model import Transformer, preset
from kotonoha.tokenizer import train_bpe
from kotonoha.train import loop
from kotonoha.train.loop import TrainConfig, lr_at, param_groups
from kotonoha.train.pretrain import PretrainConfig, pretrain_main


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Tiny "world" facts: learnable structure, so the loss has somewhere to go."""
    rng = random.Random(seed)
    places = {"Aru": "Beno", "Cala": "Doma", "Eshu": "Fira", "Gol": "Hanu"}
    out = []
    for _ in range(n):
        lines = []
        for _ in range(rng.randint(2, 6)):
            c = rng.choice(list(places))
            lines.append(f"The capital of {c} is {places[c]}. {rng.randint(1, 9)} + "
                         f"{rng.randint(1, 9)} is a sum.")
        out.append(" ".join(lines))
    return out


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # Tiny models run fastest on one thread, and 2 threads on a busy 2-core machine thrash.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pretrain_data")
    docs = make_docs(400)
    train_bpe(docs, vocab_size=320).save(d / "tok")
    (d / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    prepare([str(d / "c.jsonl")], d / "tok", d / "data", val_fraction=0.1, show_progress=False)
    return d / "data"


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = str(CONFIGS / "tiny.yaml")


def tiny(data_dir: Path, out: Path, *extra: str) -> list[str]:
    """Overrides of configs/tiny.yaml (40 steps, batch 8 x 32, the `tiny` preset)."""
    return [f"data={data_dir}", f"out={out}", "train.progress=false", "train.plot=false", *extra]


def train_losses(run: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


# --- pieces -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "demo", "shakespeare"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(PretrainConfig, CONFIGS / f"{name}.yaml")
    assert cfg.preset in ("tiny", "demo") and cfg.train.steps > 0
    preset(cfg.preset, **cfg.model)  # the model section is a valid override of its preset


def test_lr_schedules() -> None:
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 55) == pytest.approx(0.55)  # cosine midpoint between 1.0 and 0.1
    assert lr_at(cfg, 100) == pytest.approx(0.1)
    wsd = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd",
                      decay_fraction=0.2)
    assert lr_at(wsd, 50) == lr_at(wsd, 79) == 1.0  # stable phase
    assert lr_at(wsd, 89) == pytest.approx(0.5) and lr_at(wsd, 99) == pytest.approx(0.0)
    with pytest.raises(UserError, match="schedule"):
        TrainConfig(schedule="linear")


def test_weight_decay_only_on_matrices() -> None:
    model = Transformer(preset("tiny", bias=True))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert any(p is model.embed.weight for p in decay["params"])  # tied head/embedding
    n = len(decay["params"]) + len(no_decay["params"])
    assert n == len(list(model.parameters()))


# --- whole runs -------------------------------------------------------------------------------


def test_pretrain_learns_and_writes_a_complete_run_dir(data_dir: Path, tmp_path: Path) -> None:
    run = pretrain_main(TINY, tiny(data_dir, tmp_path / "run", "train.steps=60",
                                   "train.plot=true", "sample_prompts=[The capital of]",
                                   "sample_tokens=8"), resume=False)
    losses = train_losses(run)
    assert losses[1] > math.log(320) - 0.5  # starts near uniform over the vocabulary
    assert losses[60] < 2.0  # and learns the facts' structure
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in val] == [20, 40, 60] and val[-1]["val_loss"] < val[0]["val_loss"]
    assert 0 < val[-1]["val_bpb"] < val[-1]["val_loss"]  # several bytes per token
    for r in recs:
        if "loss" in r:
            assert {"lr", "tok_per_s", "mfu", "grad_norm", "tokens"} <= set(r)
    for f in ("config.yaml", "model.safetensors", "model.json", "tokenizer.json",
              "train_state/latest.json"):
        assert (run / f).is_file(), f
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "samples.txt").read_text().startswith("The capital of ")
    state = json.loads((run / "train_state" / "latest.json").read_text())
    assert state["step"] == 60 and len(list((run / "train_state").glob("step_*"))) == 1

    model, tok = load_model(run)
    assert tok is not None and model.cfg.vocab_size == tok.vocab_size
    assert json.loads((run / "model.json").read_text())["step"] == 60
    # config.yaml reproduces the run: the resolved model shape is in it.
    again = load_config(PretrainConfig, run / "config.yaml")
    assert preset(again.preset, **again.model) == model.cfg
    assert again.train.steps == 60


def test_gradient_accumulation_matches_the_full_batch(data_dir: Path, tmp_path: Path) -> None:
    full = pretrain_main(TINY, tiny(data_dir, tmp_path / "full", "train.steps=6"), False)
    accum = pretrain_main(TINY, tiny(data_dir, tmp_path / "acc", "train.steps=6",
                                     "train.micro_batch_size=2"), False)
    a, b = train_losses(full), train_losses(accum)
    assert a.keys() == b.keys()
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5)


def test_bf16_autocast_on_cpu(data_dir: Path, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Autocast runs even where this CPU only emulates bf16 (slow, but 3 tiny steps).
    monkeypatch.setattr(loop, "cpu_has_fast_bf16", lambda: True)
    fp32 = train_losses(pretrain_main(TINY, tiny(data_dir, tmp_path / "a", "train.steps=3"),
                                      False))
    bf16 = train_losses(pretrain_main(TINY, tiny(data_dir, tmp_path / "b", "train.steps=3",
                                                 "train.dtype=bf16"), False))
    for step in fp32:
        assert math.isfinite(bf16[step]) and bf16[step] == pytest.approx(fp32[step], abs=0.05)


def test_bf16_falls_back_to_fp32_on_a_cpu_that_would_emulate_it(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    cpu, cfg = torch.device("cpu"), TrainConfig(dtype="bf16")
    monkeypatch.setattr(loop, "cpu_has_fast_bf16", lambda: True)
    assert loop.autocast_dtype(cfg, cpu) == torch.bfloat16
    monkeypatch.setattr(loop, "cpu_has_fast_bf16", lambda: False)
    assert loop.autocast_dtype(cfg, cpu) is None
    assert "training in fp32" in capsys.readouterr().err
    assert loop.autocast_dtype(TrainConfig(dtype="auto"), cpu) is None


def test_fast_bf16_needs_the_bf16_instructions_not_just_avx512(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # oneDNN calls bf16 "supported" on any AVX-512 CPU; on an Ice Lake (no AVX512_BF16) the
    # demo model then trained 3x slower than in fp32. On x86 the ISA flags decide.
    monkeypatch.setattr(loop.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    flags = {"avx512_bf16": False, "amx": False}
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: flags["avx512_bf16"])
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: flags["amx"])
    assert not loop.cpu_has_fast_bf16()
    flags["avx512_bf16"] = True
    assert loop.cpu_has_fast_bf16()
    flags.update(avx512_bf16=False, amx=True)
    assert loop.cpu_has_fast_bf16()
    monkeypatch.setattr(loop.platform, "machine", lambda: "aarch64")  # oneDNN's answer there
    flags["amx"] = False
    assert loop.cpu_has_fast_bf16()


def test_compile_auto_compiles_only_where_it_was_measured_to_pay(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda, bf16 = torch.device("cpu"), torch.device("cuda"), torch.bfloat16
    auto = load_config(TrainConfig, None, ["compile=auto"])
    assert auto.compile == "auto"
    monkeypatch.setattr(loop, "cpp_compiler", lambda: "/usr/bin/g++")
    assert loop.compile_pays(auto, cpu, bf16)
    assert not loop.compile_pays(auto, cpu, None)  # fp32 on the CPU: little or nothing gained
    assert not loop.compile_pays(auto, cuda, bf16)  # not measured on a GPU yet
    monkeypatch.setattr(loop, "cpp_compiler", lambda: None)
    assert not loop.compile_pays(auto, cpu, bf16)  # inductor could not build its kernels
    assert loop.compile_pays(TrainConfig(compile=True), cpu, None)  # asked for: always
    assert not loop.compile_pays(TrainConfig(compile=False), cpu, bf16)
    with pytest.raises(UserError, match="true, false or auto"):
        load_config(TrainConfig, None, ["compile=sometimes"])


def test_a_compiled_cpu_run_compiles_ordered_kernels_and_evaluates_eagerly(
        data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A backend that records, for each graph it is given, the grad mode (a no-grad graph would
    # be evaluation compiled: 27 s cold for the demo on a 2-core CPU) and whether deterministic
    # mode is on (inductor's atomic adds made two compiled runs of one seed part ways).
    seen: list[tuple[bool, bool]] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        seen.append((torch.is_grad_enabled(), torch.are_deterministic_algorithms_enabled()))
        return gm.forward

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: compile_module(self, backend=recording_backend))
    torch._dynamo.reset()
    run = pretrain_main(TINY, tiny(data_dir, tmp_path / "a", "train.steps=4", "train.compile=true",
                                   "train.eval_interval=2", "train.eval_tokens=64"), False)
    torch._dynamo.reset()
    vals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in vals if "val_loss" in r] == [2, 4]
    assert seen and all(grad for grad, _ in seen)  # only training graphs were compiled
    assert all(ordered for _, ordered in seen)
    assert not torch.are_deterministic_algorithms_enabled()  # as it was before the run


def test_cpp_compiler_is_the_one_inductor_would_use(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    from torch._inductor import config as inductor_config

    fake = tmp_path / "my-c++"  # answers `--version` like a compiler
    fake.write_text("#!/bin/sh\necho my-c++ 1.0\n")
    fake.chmod(0o755)
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, str(fake)))
    assert loop.cpp_compiler() == str(fake)
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, str(tmp_path / "missing")))
    assert loop.cpp_compiler() is None

FAULTS_OF_REPEATED_BIG_ALLOCATIONS = """
import resource, sys, torch
from kotonoha.train.loop import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():  # two 64 MB blocks, like the demo's logits and their gradient
    a, b = torch.zeros(1 << 24), torch.zeros(1 << 24)
for _ in range(4):  # the heap settles into its steady size
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _huge_pages_always() -> bool:  # then even fresh blocks fault only once per 2 MB
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return thp.is_file() and "[always]" in thp.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux") or _huge_pages_always(),
                    reason="glibc's mallopt, counted in 4 kB page faults")
def test_keep_freed_memory_reuses_big_blocks_instead_of_faulting_them_in_again() -> None:
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS_OF_REPEATED_BIG_ALLOCATIONS, mode],
                             capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    # Each fresh 64 MB block costs 16k page faults with 4 kB pages; a reused one none.
    assert faults("keep") < 1000
    assert faults("default") > 16 * 1000


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(data_dir: Path,
                                                          tmp_path: Path) -> None:
    steps = ["train.steps=150", "train.checkpoint_interval=10", "train.eval_interval=0"]
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kotonoha.train.pretrain", "--config", TINY,
                             *tiny(data_dir, killed, *steps)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = killed / "train_state" / "latest.json"
    deadline = time.monotonic() + 120
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    at = json.loads(latest.read_text())["step"]
    assert 10 <= at < 150  # it really died mid-run, after a checkpoint

    pretrain_main(TINY, tiny(data_dir, killed, *steps), resume=True)
    whole = pretrain_main(TINY, tiny(data_dir, tmp_path / "whole", *steps), resume=False)
    resumed, reference = train_losses(killed), train_losses(whole)
    assert resumed[150] == pytest.approx(reference[150], abs=1e-4)
    # Log lines the killed run wrote after its checkpoint were dropped, not duplicated.
    lines = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 151))
    a, _ = load_model(killed)
    b, _ = load_model(tmp_path / "whole")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_pretraining_with_muon_learns_and_resumes_exactly(data_dir: Path,
                                                          tmp_path: Path) -> None:
    # A schedule that does not depend on train.steps, so 20 + 20 steps = 40 steps.
    muon = ["train.optimizer=muon", "train.eval_interval=0", "train.log_interval=1",
            "train.schedule=constant", "train.warmup_steps=5"]
    first = train_losses(pretrain_main(TINY, tiny(data_dir, tmp_path / "whole", *muon),
                                       resume=False))
    assert first[40] < first[1] - 2.0  # it learns (configs/tiny.yaml: 40 steps)
    half = tiny(data_dir, tmp_path / "half", *muon, "train.checkpoint_interval=20")
    pretrain_main(TINY, [*half, "train.steps=20"], resume=False)
    resumed = train_losses(pretrain_main(TINY, [*half, "train.steps=40"], resume=True))
    # The momentum buffers and AdamW moments came back from the checkpoint.
    assert resumed[40] == pytest.approx(first[40], abs=1e-5)


def test_resuming_with_another_optimizer_is_refused(data_dir: Path, tmp_path: Path) -> None:
    run = tiny(data_dir, tmp_path / "r", "train.steps=2")
    pretrain_main(TINY, run, resume=False)
    with pytest.raises(UserError, match="optimizer=adamw"):
        pretrain_main(TINY, [*run, "train.optimizer=muon", "train.steps=4"], resume=True)


def test_resume_is_required_to_reuse_a_run_dir(data_dir: Path, tmp_path: Path) -> None:
    pretrain_main(TINY, tiny(data_dir, tmp_path / "r", "train.steps=2"), False)
    saved = (tmp_path / "r" / "config.yaml").read_text()
    with pytest.raises(UserError, match="--resume"):
        pretrain_main(TINY, tiny(data_dir, tmp_path / "r", "train.steps=2", "train.lr=1e-2"),
                      False)
    assert (tmp_path / "r" / "config.yaml").read_text() == saved  # nothing was overwritten
    # --resume can extend a finished run.
    run = pretrain_main(TINY, tiny(data_dir, tmp_path / "r", "train.steps=4"), True)
    assert max(train_losses(run)) == 4


def test_continued_pretraining_from_an_existing_model(data_dir: Path, tmp_path: Path) -> None:
    base = pretrain_main(TINY, tiny(data_dir, tmp_path / "base"), False)
    settings = [f"data={data_dir}", f"out={tmp_path / 'cont'}", f"init_from={base}",
                "context_length=32", "train.batch_size=8", "train.steps=2", "train.lr=1e-4",
                "train.warmup_steps=1", "train.log_interval=1", "train.eval_tokens=1024",
                "train.progress=false", "train.device=cpu", "train.plot=false"]
    cont = pretrain_main(None, settings, False)
    assert train_losses(cont)[1] < train_losses(base)[1] - 1.0  # starts from what base learnt
    assert load_model(cont)[0].cfg == load_model(base)[0].cfg
    with pytest.raises(UserError, match="init_from"):
        pretrain_main(None, [*settings, f"out={tmp_path / 'x'}", "model.n_layer=3"], False)


def test_unprepared_data_dir_says_to_prepare(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="kotonoha data prepare"):
        pretrain_main(None, [f"data={tmp_path}", f"out={tmp_path / 'run'}"], False)


def test_throughput_leaves_out_evaluations_between_log_lines(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a fake clock every step takes 1 s and every evaluation 100 s; evaluations fall
    between log lines (every 5 steps, logs every 4), and every log line still reads one
    step's tokens per second."""
    clock = [0.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])

    def loss_fn(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        clock[0] += 1.0
        return model(batch["x"]).pow(2).mean(), {}

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        clock[0] += 100.0
        return {"val_loss": 0.0}

    cfg = TrainConfig(steps=12, batch_size=8, log_interval=4, eval_interval=5,
                      checkpoint_interval=0, device="cpu", progress=False, plot=False)
    trainer = loop.Trainer(torch.nn.Linear(4, 1), cfg, tmp_path,
                           get_batch=lambda step, rows: {"x": torch.ones(len(rows), 4)},
                           loss_fn=loss_fn, evaluate=evaluate)
    trainer.fit()
    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rates = {r["step"]: r["tok_per_s"] for r in logs if "tok_per_s" in r}
    assert rates == {4: 32.0, 8: 32.0, 12: 32.0}  # 8 rows x 4 values per 1-s step
    assert [r["step"] for r in logs if "val_loss" in r] == [5, 10, 12]
    assert max(r["elapsed_s"] for r in logs if "elapsed_s" in r) == 12.0


def test_measuring_the_peak_leaves_the_global_rng_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Else a run that measures it and one that resumes draw different dropout or noise."""
    monkeypatch.setattr(loop, "_measured_peak", {})
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    assert loop.measure_matmul_peak(torch.device("cpu"), n=64, seconds=0.01) > 0
    assert torch.equal(torch.rand(4), expected)


def test_an_mfu_above_100_percent_measures_the_peak_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A peak measured while another process kept the cores busy is too low; the first MFU
    above 100% measures it once more, and the better measurement is kept."""
    monkeypatch.setattr(loop, "_measured_peak", {})
    calls: list[bool] = []

    def fake_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024,
                  seconds: float = 0.5, again: bool = False) -> float:
        calls.append(again)
        return 1e18 if again else 1.0  # the first measurement: a busy moment

    monkeypatch.setattr(loop, "measure_matmul_peak", fake_peak)
    cfg = TrainConfig(steps=6, batch_size=8, log_interval=2, checkpoint_interval=0,
                      device="cpu", progress=False, plot=False)
    trainer = loop.Trainer(torch.nn.Linear(4, 1), cfg, tmp_path,
                           get_batch=lambda step, rows: {"x": torch.ones(len(rows), 4)},
                           loss_fn=lambda m, b: (m(b["x"]).pow(2).mean(), {}),
                           flops_per_token=1e6)
    trainer.fit()
    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    mfus = [r["mfu"] for r in logs if "mfu" in r]
    assert len(mfus) == 3 and all(0 < m < 1 for m in mfus)
    assert calls == [False, True]  # measured again once, not at every log line


def test_measuring_the_peak_again_keeps_the_better_measurement(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(loop, "_measured_peak", {(str(cpu), torch.float32): 1e30})
    assert loop.measure_matmul_peak(cpu, n=64, seconds=0.01) == 1e30  # cached
    assert loop.measure_matmul_peak(cpu, n=64, seconds=0.01, again=True) == 1e30  # kept
    monkeypatch.setattr(loop, "_measured_peak", {(str(cpu), torch.float32): 1.0})
    assert loop.measure_matmul_peak(cpu, n=64, seconds=0.01, again=True) > 1.0  # replaced


# --- settings, resume and export edge cases -------------------------------------------------


def test_bad_micro_batch_and_warmup_settings_are_refused(data_dir: Path, tmp_path: Path) -> None:
    for bad, match in [("train.micro_batch_size=0", "micro_batch_size must be positive"),
                       ("train.warmup_steps=-1", "warmup_steps must be 0 or more")]:
        with pytest.raises(UserError, match=match):
            pretrain_main(TINY, tiny(data_dir, tmp_path / "r", bad), resume=False)
    assert TrainConfig(warmup_steps=0, micro_batch_size=None).warmup_steps == 0


def test_a_run_killed_while_exporting_exports_when_resumed(
        data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The final checkpoint commits before the model files are written: a run that died in
    that export resumes at its last step, and the resume must still write the model."""
    from kotonoha.train import pretrain

    real, calls = pretrain.save_model, []

    def dies_the_first_time(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("killed while exporting")
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain, "save_model", dies_the_first_time)
    run = tiny(data_dir, tmp_path / "r", "train.steps=2")
    with pytest.raises(RuntimeError, match="killed"):
        pretrain_main(TINY, run, resume=False)
    assert json.loads((tmp_path / "r" / "train_state" / "latest.json").read_text())["step"] == 2
    assert not (tmp_path / "r" / "model.safetensors").exists()
    pretrain_main(TINY, run, resume=True)
    assert json.loads((tmp_path / "r" / "model.json").read_text())["step"] == 2
    model, _ = load_model(tmp_path / "r")
    saved = loop.read_safetensors(tmp_path / "r" / "train_state" / "step_00000002"
                                  / "model.safetensors")
    for name, p in model.state_dict().items():
        assert torch.equal(p, saved[name]), name
    assert max(train_losses(tmp_path / "r")) == 2  # no step was trained again


def test_resuming_with_another_model_shape_is_a_user_error(data_dir: Path,
                                                            tmp_path: Path) -> None:
    run = tiny(data_dir, tmp_path / "r", "train.steps=2")
    pretrain_main(TINY, run, resume=False)
    config = tmp_path / "r" / "config.yaml"
    trained_with = config.read_text()
    with pytest.raises(UserError, match="different model shape.*start a new out="):
        pretrain_main(TINY, [*run, "model.d_model=96", "train.steps=4"], resume=True)
    assert config.read_text() == trained_with  # the refused settings did not replace it
    pretrain_main(TINY, [*run, "train.steps=4"], resume=True)
    assert "steps: 4" in config.read_text() and "steps: 2" in trained_with


@pytest.mark.parametrize("resumed_lora", [8, None])
def test_resuming_with_another_lora_is_a_user_error(tmp_path: Path,
                                                    resumed_lora: int | None) -> None:
    from kotonoha.train.lora import LoRAConfig, apply_lora

    def trainer(r: int | None) -> loop.Trainer:
        model = Transformer(preset("tiny", vocab_size=64, context_length=16))
        if r is not None:
            apply_lora(model, LoRAConfig(r=r))
        cfg = TrainConfig(steps=1, batch_size=2, device="cpu", progress=False, plot=False)
        return loop.Trainer(model, cfg, tmp_path, get_batch=lambda step, rows: None,
                            loss_fn=lambda model, batch: (torch.zeros(()), {}))

    trainer(4).save_checkpoint()
    with pytest.raises(UserError, match="different model shape"):
        trainer(resumed_lora).load_checkpoint()
