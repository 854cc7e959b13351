from pathlib import Path

import yaml

from kotonoha import demo
from kotonoha.pipeline import load_pipeline_config

ROOT = Path(__file__).resolve().parents[1]


def test_demo_outside_the_repository_says_where_to_run_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert demo.main([]) == 2
    assert "repository root" in capsys.readouterr().err


def test_demo_config_is_the_pretrain_config_of_configs_demo():
    # configs/demo.yaml (the stand-alone pretraining run) and the pipeline's pretrain section
    # must describe the same run, so the README's numbers hold for both.
    standalone = yaml.safe_load((ROOT / "configs/demo.yaml").read_text(encoding="utf-8"))
    pipeline = load_pipeline_config(ROOT / demo.DEMO_CONFIG, []).pretrain
    assert pipeline.preset == standalone["preset"]
    for key, value in standalone["train"].items():
        assert getattr(pipeline.train, key) == value, key
    for key, value in standalone["model"].items():
        assert pipeline.model[key] == value, key


def test_demo_names_the_run_it_made(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "d"
    assert demo.main([f"out={out}", "stages=[world]", "progress=false"]) == 0
    printed = capsys.readouterr().out
    assert f"--model {out / 'rl'}" in printed and "runs/demo" not in printed
