from dataclasses import dataclass, field

import pytest

from kotonoha.config import load_config, parse_overrides
from kotonoha.errors import UserError


@dataclass
class Optim:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class Cfg:
    name: str = "x"
    steps: int = 10
    compile: bool = False
    warmup: int | None = None
    optim: Optim = field(default_factory=Optim)


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 20\noptim:\n  lr: 3e-4\n")
    cfg = load_config(Cfg, p, ["optim.betas=[0.8,0.9]", "compile=true", "warmup=5"])
    assert cfg.steps == 20 and cfg.optim.lr == 3e-4 and cfg.optim.betas == [0.8, 0.9]
    assert cfg.compile is True and cfg.warmup == 5
    assert load_config(Cfg, None, ["warmup=null"]).warmup is None


def test_parse_overrides_nested():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


@pytest.mark.parametrize("text,overrides,match", [
    ("steps: [1", [], "not valid YAML at line"),
    ("- 1\n- 2\n", [], "must contain a mapping"),
    ("", ["stepz=3"], "Unknown setting"),
    ("", ["steps=abc"], "config.steps must be a int"),
    ("", ["optim.lr=fast"], "must be a float"),
    ("", ["steps"], "must look like key=value"),
    ("", ["compile=1"], "must be a bool"),
])
def test_bad_configs(tmp_path, text, overrides, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(UserError, match=match):
        load_config(Cfg, p, overrides)


def test_missing_file():
    with pytest.raises(UserError, match="does not exist"):
        load_config(Cfg, "/nonexistent/config.yaml")


@dataclass
class Stage:
    optim: Optim = field(default_factory=lambda: Optim(lr=5e-5, betas=[0.5, 0.6]))


def test_partial_nested_section_keeps_the_fields_own_defaults():
    # Setting one key of a nested section must not reset the others to the nested class's
    # generic defaults (a stage's own learning rate, for instance).
    cfg = load_config(Stage, None, ["optim.lr=1e-4"])
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == [0.5, 0.6]
    assert load_config(Stage).optim == Optim(lr=5e-5, betas=[0.5, 0.6])


def test_rl_train_section_keeps_rl_defaults():
    from kotonoha.train.rl import RL_TRAIN_DEFAULTS, RLConfig

    cfg = load_config(RLConfig, None, ["train.steps=3"])
    assert cfg.train.steps == 3 and cfg.train.lr == RL_TRAIN_DEFAULTS["lr"]


@dataclass
class WithMapping:
    model: dict = field(default_factory=dict)
    extra: dict[str, int] | None = None


@pytest.mark.parametrize("overrides,match", [
    (["model=3"], "config.model must be a mapping"),
    (["extra=[1,2]"], "config.extra must be a mapping"),
])
def test_a_non_mapping_for_a_mapping_setting_names_the_key(overrides, match):
    with pytest.raises(UserError, match=match):
        load_config(WithMapping, None, overrides)
    assert load_config(WithMapping, None, ["model.n_layer=2", "extra=null"]) == WithMapping(
        model={"n_layer": 2})


def test_pretrain_model_setting_must_be_a_mapping():
    from kotonoha.train.pretrain import PretrainConfig

    with pytest.raises(UserError, match="config.model must be a mapping"):
        load_config(PretrainConfig, None, ["model=3"])
