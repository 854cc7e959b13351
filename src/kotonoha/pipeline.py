"""The whole recipe in one command: `kotonoha pipeline --config configs/pipeline-demo.yaml`.

    world -> tokenizer -> data -> pretrain -> sft -> reward -> rl      (dpo: a branch from sft)
                                                  then eval -> report (report.md, report.html)

Every stage writes its own directory under `out` (`world/`, `tokenizer/`, `data/`,
`pretrain/`, `sft/`, `reward/`, `rl/`, `dpo/`, `eval/`) and, last of all, a `DONE.json` in it
(atomically). Running the pipeline again skips every stage that has its `DONE.json`; a stage
whose directory exists without one was interrupted and is resumed (`resume=True`: the trainer
core restarts from its last checkpoint). A stage whose settings changed since it finished is
still skipped, with a warning: delete its directory to redo it (and the stages after it).

The config has a section per stage, and each section *is* that stage's own config dataclass
(`pretrain:` is a `PretrainConfig`, `rl:` an `RLConfig`, ...), so anything `kotonoha sft`
accepts goes in `sft:`. The paths that connect stages (`data`, `out`, `init_from`, `model`,
`world`, `reward_model`, SFT's `replay_data`) are set by the pipeline from `out`; values given
for them are ignored.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from kotonoha.checkpoint import atomic_write_json, atomic_write_text
from kotonoha.config import dump_yaml, load_config
from kotonoha.data.world import PRACTICE_SHARE
from kotonoha.errors import UserError
from kotonoha.eval.chat import CHAT_TASKS
from kotonoha.train.dpo import DPOConfig
from kotonoha.train.pretrain import PretrainConfig
from kotonoha.train.reward import RewardConfig
from kotonoha.train.rl import RLConfig
from kotonoha.train.sft import SFTConfig

DONE = "DONE.json"
STAGES: tuple[str, ...] = ("world", "tokenizer", "data", "pretrain", "sft", "reward", "rl",
                           "dpo", "eval", "report")
# The models the report card compares, in its row order, with the stage each is judged
# against for the win rate (DPO is a branch from SFT, so it is compared with SFT too).
MODELS: tuple[tuple[str, str | None], ...] = (("base", None), ("sft", "base"), ("rl", "sft"),
                                              ("dpo", "sft"))
MODEL_DIRS = {"base": "pretrain", "sft": "sft", "rl": "rl", "dpo": "dpo"}


@dataclass
class WorldStage:
    seed: int = 0
    scale: float = 1.0
    practice_share: float = PRACTICE_SHARE  # countries and families kept for RL/DPO practice
    sft_false_premises: int = 1  # false-premise conversations per one (World.iter_sft)


@dataclass
class TokenizerStage:
    vocab_size: int = 4096
    min_frequency: int = 2


@dataclass
class DataStage:
    val_fraction: float = 0.05
    # World document kinds to pretrain on (article, story, ambiguous, pronoun, arithmetic,
    # analogy); [] = all. A tiny model learns the facts sooner from articles and stories alone.
    kinds: list[str] = field(default_factory=list)


@dataclass
class EvalStage:
    tasks: list[str] = field(default_factory=lambda: list(CHAT_TASKS))
    split: str = "default"  # default (held-out facts, in-range arithmetic) | seen | heldout
    max_items: int | None = 40  # per task and language (the file's first ones)
    batch_size: int = 32  # engine rows
    bpb_tokens: int = 16384  # validation tokens for bits per byte
    samples: int = 6  # sample conversations shown per model in the report


@dataclass
class PipelineConfig:
    out: str = "runs/demo"
    stages: list[str] = field(default_factory=lambda: list(STAGES))  # drop some to skip them
    progress: bool = True  # false: no banners or progress bars from any stage
    world: WorldStage = field(default_factory=WorldStage)
    tokenizer: TokenizerStage = field(default_factory=TokenizerStage)
    data: DataStage = field(default_factory=DataStage)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalStage = field(default_factory=EvalStage)
    # SFT runs to train, with seeds sft.train.seed, +1, ...: the one that answers most of the
    # world's practice questions (a dev set neither SFT nor the eval uses) becomes `sft/`, the
    # others stay in `sft/candidates/`. One SFT run's held-out QA depends on its seed by up to
    # 15 points; 800 practice questions tell a weak run from a strong one, not two similar ones
    # (PIPELINE.md section 5). Each candidate costs a whole SFT run.
    sft_candidates: int = 1

    def __post_init__(self) -> None:
        if self.sft_candidates < 1:
            raise UserError(f"sft_candidates must be at least 1, got {self.sft_candidates}.")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise UserError(f"Unknown pipeline stage(s) {', '.join(unknown)}; the stages are "
                            f"{', '.join(STAGES)}.")

    def path(self, stage: str) -> Path:
        return Path(self.out) / stage


def wire(cfg: PipelineConfig) -> PipelineConfig:
    """The stage configs with the paths that connect them, all under `cfg.out`."""
    p = cfg.path
    world = p("world")

    def train(section: Any) -> Any:
        return section.train if cfg.progress else replace(section.train, progress=False)

    pretrain = replace(cfg.pretrain, data=str(p("data")), out=str(p("pretrain")),
                       tokenizer=None, init_from=None, train=train(cfg.pretrain))
    sft = replace(cfg.sft, data=str(world / "sft.jsonl"), val_data=None,
                  replay_data=str(world / "pretrain.jsonl"),
                  init_from=str(p("pretrain")), out=str(p("sft")), train=train(cfg.sft))
    reward = replace(cfg.reward, data=str(world / "preferences.jsonl"), val_data=None,
                     init_from=str(p("sft")), out=str(p("reward")), train=train(cfg.reward))
    rl = replace(cfg.rl, model=str(p("sft")), reference=None, out=str(p("rl")),
                 world=str(world), reward_model=str(p("reward")), train=train(cfg.rl))
    dpo = replace(cfg.dpo, data=str(world / "preferences.jsonl"), val_data=None,
                  world=str(world), init_from=str(p("sft")), out=str(p("dpo")),
                  train=train(cfg.dpo))
    return replace(cfg, pretrain=pretrain, sft=sft, reward=reward, rl=rl, dpo=dpo)


# ---------------------------------------------------------------------------------------------
# Stages: each gets the wired config and `resume`, and returns a small summary for DONE.json


def stage_world(cfg: PipelineConfig, resume: bool) -> dict[str, Any]:
    from kotonoha.data.world import write_world

    stats = write_world(cfg.path("world"), seed=cfg.world.seed, scale=cfg.world.scale,
                        practice_share=cfg.world.practice_share,
                        sft_false_premises=cfg.world.sft_false_premises,
                        show_progress=_progress(cfg))
    return {name: s["lines"] for name, s in stats.items()}


def stage_tokenizer(cfg: PipelineConfig, resume: bool) -> dict[str, Any]:
    from kotonoha.tokenizer import train_bpe_from_files

    tok = train_bpe_from_files([cfg.path("world") / "pretrain.jsonl"], cfg.tokenizer.vocab_size,
                               min_frequency=cfg.tokenizer.min_frequency,
                               show_progress=_progress(cfg))
    tok.save(cfg.path("tokenizer"))
    return {"vocab_size": tok.vocab_size}


def stage_data(cfg: PipelineConfig, resume: bool) -> dict[str, Any]:
    from kotonoha.data.shards import prepare

    source = cfg.path("world") / "pretrain.jsonl"
    if cfg.data.kinds:
        lines = [line for line in source.read_text(encoding="utf-8").splitlines()
                 if line.strip() and json.loads(line).get("kind") in cfg.data.kinds]
        if not lines:
            raise UserError(f"No world documents of kinds {cfg.data.kinds}; the kinds are "
                            "article, story, ambiguous, pronoun, arithmetic and analogy.")
        cfg.path("data").mkdir(parents=True, exist_ok=True)
        source = cfg.path("data") / "pretrain-selected.jsonl"
        atomic_write_text(source, "".join(line + "\n" for line in lines))
    meta = prepare([str(source)], cfg.path("tokenizer"), cfg.path("data"),
                   val_fraction=cfg.data.val_fraction, show_progress=_progress(cfg))
    return {s: v["tokens"] for s, v in meta["splits"].items()}


def _train_stage(name: str) -> Callable[[PipelineConfig, bool], dict[str, Any]]:
    def run(cfg: PipelineConfig, resume: bool) -> dict[str, Any]:
        from kotonoha.train.dpo import run_dpo
        from kotonoha.train.pretrain import run_pretrain
        from kotonoha.train.reward import run_reward
        from kotonoha.train.rl import run_rl
        from kotonoha.train.sft import run_sft

        runners: dict[str, Callable[[Any, bool], Path]] = {
            "pretrain": run_pretrain, "sft": run_sft, "reward": run_reward, "rl": run_rl,
            "dpo": run_dpo}
        run_dir = runners[name](getattr(cfg, name), resume)
        return _last_metrics(run_dir)

    return run


PRACTICE_TOKENS = 64  # reply length when the SFT candidates answer the practice questions


def stage_sft(cfg: PipelineConfig, resume: bool) -> dict[str, Any]:
    """One SFT run, or `sft_candidates` of them and the best on the practice questions."""
    if cfg.sft_candidates == 1:
        return _train_stage("sft")(cfg, resume)
    from kotonoha.train.sft import run_sft

    sft_dir = cfg.path("sft")
    practice = cfg.path("world") / "practice.jsonl"
    if not practice.is_file():  # before any training, not after the first run
        raise UserError(f"{practice} does not exist; sft_candidates > 1 needs the world's "
                        "practice questions (the world stage writes them).")
    scores: dict[int, dict[str, Any]] = {}
    for k in range(cfg.sft_candidates):
        seed = cfg.sft.train.seed + k
        run_dir = sft_dir / "candidates" / f"seed_{seed}"
        score_path = run_dir / "practice.json"
        if not score_path.is_file():  # written last: the candidate is finished
            if _progress(cfg):
                print(f"sft: candidate {k + 1} of {cfg.sft_candidates} (train.seed={seed})",
                      file=sys.stderr)
            candidate = replace(cfg.sft, out=str(run_dir), train=replace(cfg.sft.train,
                                                                         seed=seed))
            run_sft(candidate, run_dir.exists())
            atomic_write_json(score_path, score_practice(run_dir, practice, cfg.sft.train.device))
        scores[seed] = json.loads(score_path.read_text(encoding="utf-8"))
        if _progress(cfg):
            print(f"sft: seed {seed} answers {100 * scores[seed]['accuracy']:.1f}% of the "
                  f"{scores[seed]['asked']} practice questions", file=sys.stderr)
    best = max(scores, key=lambda seed: scores[seed]["accuracy"])  # a tie keeps the first
    chosen = sft_dir / "candidates" / f"seed_{best}"
    for path in chosen.iterdir():  # the model, its config, metrics and loss plot
        if path.is_file() and path.name != "practice.json":
            shutil.copyfile(path, sft_dir / path.name)
    selection = {"chosen_seed": best, "practice": {str(s): v for s, v in scores.items()}}
    atomic_write_json(sft_dir / "selection.json", selection)
    return {**_last_metrics(chosen), **selection}


def score_practice(model_dir: Path, practice: Path, device: str = "auto") -> dict[str, Any]:
    """Greedy accuracy of the model in `model_dir` on the practice conversations."""
    from kotonoha.checkpoint import load_model
    from kotonoha.eval.practice import answer_checkable, practice_score
    from kotonoha.train.loop import resolve_device

    model, tok = load_model(model_dir, device=resolve_device(device))
    answers = answer_checkable(model, tok, practice, PRACTICE_TOKENS, model.cfg.context_length)
    return practice_score(answers)


def _last_metrics(run_dir: Path) -> dict[str, Any]:
    """The last value of each logged number (the trainer's metrics.jsonl)."""
    from kotonoha.train.loop import read_metrics

    path = run_dir / "metrics.jsonl"
    last: dict[str, Any] = {}
    if path.is_file():
        for rec in read_metrics(path):
            last.update({k: v for k, v in rec.items() if isinstance(v, int | float)})
    return last


def stage_eval(cfg: PipelineConfig, resume: bool) -> dict[str, Any]:
    """Evaluate every finished model (base, SFT, RL, DPO) the same way, one JSON each. A JSON
    is reused while the model (and reward model) it was made from are unchanged, so this stage
    runs every time and only evaluates what is new."""
    from kotonoha.report import evaluate_model

    out = cfg.path("eval")
    out.mkdir(parents=True, exist_ok=True)
    reward_dir = cfg.path("reward")
    reward_done = _finished_at(reward_dir)
    done, seconds = {}, 0.0
    for name, _ in MODELS:
        model_dir = cfg.path(MODEL_DIRS[name])
        stamp = {"model": _finished_at(model_dir), "reward": reward_done,
                 "settings": settings_hash(cfg, "eval")}
        target = out / f"{name}.json"
        if stamp["model"] is None:  # not (or no longer) there: no row in the report either
            target.unlink(missing_ok=True)
            continue
        previous = json.loads(target.read_text(encoding="utf-8")) if target.is_file() else {}
        if previous.get("stamp") != stamp:
            if _progress(cfg):
                print(f"eval: {name} ({model_dir})", file=sys.stderr)
            t0 = time.perf_counter()
            result = evaluate_model(model_dir, cfg.path("world"), data_dir=cfg.path("data"),
                                    reward_model=reward_dir if reward_done else None,
                                    split=cfg.eval.split, max_items=cfg.eval.max_items,
                                    batch_size=cfg.eval.batch_size,
                                    bpb_tokens=cfg.eval.bpb_tokens, tasks=cfg.eval.tasks)
            previous = {**result, "stamp": stamp, "seconds": time.perf_counter() - t0}
            atomic_write_json(target, previous)
        done[name] = previous["accuracy"]
        seconds += previous.get("seconds", 0.0)
    return {"accuracy": done, "seconds": seconds}


def _finished_at(stage_dir: Path) -> str | None:
    marker = stage_dir / DONE
    if not marker.is_file():
        return None
    return json.loads(marker.read_text(encoding="utf-8")).get("finished_at")


def stage_report(cfg: PipelineConfig, resume: bool) -> dict[str, Any]:
    from kotonoha.report import write_report

    paths = write_report(Path(cfg.out), samples=cfg.eval.samples)
    if _progress(cfg):
        print((Path(cfg.out) / "report.md").read_text(encoding="utf-8"), file=sys.stderr)
    return {k: str(v) for k, v in paths.items()}


RUNNERS: dict[str, Callable[[PipelineConfig, bool], dict[str, Any]]] = {
    "world": stage_world, "tokenizer": stage_tokenizer, "data": stage_data,
    "pretrain": _train_stage("pretrain"), "sft": stage_sft,
    "reward": _train_stage("reward"), "rl": _train_stage("rl"), "dpo": _train_stage("dpo"),
    "eval": stage_eval, "report": stage_report,
}
DESCRIPTIONS = {
    "world": "generate the bilingual world (corpus, SFT, preferences, eval items)",
    "tokenizer": "train the byte-level BPE tokenizer",
    "data": "tokenize the corpus into shards",
    "pretrain": "next-token pretraining",
    "sft": "supervised fine-tuning on conversations",
    "reward": "reward model on preference pairs (Bradley-Terry)",
    "rl": "RL: PPO-clip with group-relative advantages and a KL leash",
    "dpo": "DPO from SFT (the reward-model-free branch)",
    "eval": "evaluate base, SFT, RL and DPO with the rule-based checker",
    "report": "write report.md and report.html",
}


def _progress(cfg: PipelineConfig) -> bool:
    return cfg.progress


def _section(cfg: PipelineConfig, stage: str) -> Any:
    if stage in ("eval", "report"):
        return cfg.eval
    return getattr(cfg, stage)


def settings_hash(cfg: PipelineConfig, stage: str) -> str:
    data = asdict(_section(cfg, stage))
    if stage in ("eval", "report"):
        data.pop("samples")  # how many sample conversations the report shows, nothing more
    if stage == "sft" and cfg.sft_candidates > 1:  # one run hashes as it always did
        data["candidates"] = cfg.sft_candidates
    if stage in ("pretrain", "sft", "reward", "rl", "dpo"):
        # Progress and plotting do not change what a stage computes.
        data["train"] = {k: v for k, v in data["train"].items() if k not in ("progress", "plot")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _banner(cfg: PipelineConfig, k: int, n: int, stage: str, note: str = "") -> None:
    if not cfg.progress:
        return
    text = f"[{k}/{n}] {stage}: {DESCRIPTIONS[stage]}{note}"
    print(f"\n== {text} " + "=" * max(3, 88 - len(text)), file=sys.stderr, flush=True)


def run_pipeline(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Run (or skip, or resume) every stage in order; returns {stage: DONE.json contents}."""
    # Settings are fingerprinted before wiring, so a moved run directory still matches.
    digests = {stage: settings_hash(cfg, stage) for stage in STAGES}
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    # The config as given (before wiring), so `--config runs/X/pipeline.yaml` runs it again.
    atomic_write_text(root / "pipeline.yaml", dump_yaml(cfg))
    cfg = wire(cfg)
    stages = [s for s in STAGES if s in cfg.stages]
    results: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()
    for k, stage in enumerate(stages, 1):
        stage_dir = root / stage
        marker = stage_dir / DONE
        digest = digests[stage]
        if marker.is_file() and stage not in ("eval", "report"):  # those two are incremental
            done = json.loads(marker.read_text(encoding="utf-8"))
            _banner(cfg, k, len(stages), stage,
                    f" (done in {done.get('seconds', 0):.0f}s; skipped)")
            if done.get("settings") != digest:  # printed with or without progress
                print(f"WARNING: the settings of {stage} changed since it ran, and the new "
                      f"ones are not used; delete {stage_dir} to redo it.", file=sys.stderr)
            results[stage] = done
            continue
        # World, tokenizer and data simply run again (they are quick and deterministic); eval
        # keeps the models it finished; a training stage restarts from its last checkpoint.
        interrupted = stage_dir.exists() and stage not in ("eval", "report")
        _banner(cfg, k, len(stages), stage, " (resuming)" if interrupted else "")
        t0 = time.perf_counter()
        summary = RUNNERS[stage](cfg, interrupted)
        # Eval's own figure: the time its reused evaluations took when they were made.
        seconds = summary.pop("seconds") if stage == "eval" else time.perf_counter() - t0
        done = {"stage": stage, "seconds": seconds, "settings": digest,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "summary": summary}
        stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(marker, done)  # last: its presence means the stage is complete
        results[stage] = done
    if _progress(cfg):
        total = time.perf_counter() - t_start
        print(f"\npipeline finished in {total / 60:.1f} min; report: {root / 'report.md'} "
              f"and {root / 'report.html'}", file=sys.stderr)
    return results


def pipeline_main(config_path: str | None, overrides: list[str], resume: bool = True,
                  ) -> dict[str, dict[str, Any]]:
    """Entry point for `kotonoha pipeline --config X.yaml [key=value ...]`.

    Re-running always skips finished stages and resumes an interrupted one, so `resume` is
    accepted only for the same signature as the other verbs.
    """
    del resume
    return run_pipeline(load_pipeline_config(config_path, overrides))


def load_pipeline_config(config_path: str | Path | None, overrides: list[str],
                         ) -> PipelineConfig:
    """The YAML and overrides over the stages' own defaults (RL's train defaults too)."""
    return load_config(PipelineConfig, config_path, overrides)


def main(argv: list[str] | None = None) -> int:
    """`python -m kotonoha.pipeline` (a `--resume` flag is accepted; resuming is always on)."""
    from kotonoha.train.loop import module_main

    return module_main(pipeline_main, "python -m kotonoha.pipeline", argv)


if __name__ == "__main__":
    sys.exit(main())
