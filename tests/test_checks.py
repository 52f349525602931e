"""One range rule (minireuse/checks.py) for the command line, the trainer's settings and the
reuse strategies' options: the same number is refused everywhere, in the same words."""
import numpy as np
import pytest

from minireuse.__main__ import build_parser
from minireuse.checks import check_range, describe_range, in_range
from minireuse.training.adaptive import AdaptiveStrategy
from minireuse.training.trainer import Trainer

LADDER = {"conv2": [{"L": 64, "H": 32, "dx_mode": "cluster"}]}


@pytest.mark.parametrize("value,ok", [
    (0.0, True), (0.99, True), (1.0, False), (-1e-9, False), (float("nan"), False), (float("inf"), False),
    (True, False), (np.float32(0.5), True), ("0.5", False), (None, False),
])
def test_a_half_open_range(value, ok):
    assert in_range(value, 0, 1, open_high=True) is ok


@pytest.mark.parametrize("value,ok", [(1, True), (np.int64(3), True), (0, False), (2.0, False), (True, False)])
def test_positive_integers(value, ok):
    assert in_range(value, 1, integer=True) is ok


def test_the_words_of_each_range():
    assert describe_range(1, integer=True) == "a positive integer"
    assert describe_range(0, integer=True) == "an integer >= 0"
    assert describe_range(0, open_low=True) == "a positive finite number"
    assert describe_range(0, 1, open_low=True) == "a finite number in (0, 1]"
    assert describe_range(0) == "a finite number >= 0"
    assert describe_range(high=5, open_high=True) == "a finite number < 5"
    assert check_range("x", 0.5, 0, 1) == 0.5
    with pytest.raises(ValueError, match=r"^x must be a finite number in \[0, 1\], got 2$"):
        check_range("x", 2, 0, 1)


def test_the_command_line_the_trainer_and_the_strategy_refuse_alike(tmp_path, capsys):
    words = "a finite number in [0, 1)"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--momentum", "1"])
    assert f"expected {words}, got '1'" in capsys.readouterr().err
    with pytest.raises(ValueError) as trainer:
        Trainer(dict(momentum=1.0, out=str(tmp_path / "run")), data=())
    assert str(trainer.value) == f"momentum must be {words}, got 1.0"
    with pytest.raises(ValueError) as strategy:
        AdaptiveStrategy(LADDER, start_after=1.0)
    assert str(strategy.value) == f"adaptive option start_after must be {words}, got 1.0"
    with pytest.raises(ValueError) as option:
        AdaptiveStrategy(LADDER, probe_every=0)
    assert str(option.value) == "adaptive option probe_every must be a positive integer, got 0"


def test_one_settings_schema_behind_the_command_line_the_trainer_and_parity():
    from minireuse.__main__ import train_config
    from minireuse.tools.parity import IGNORED_SETTINGS
    from minireuse.training.config import TrainConfig
    defaults = TrainConfig.defaults()
    assert Trainer.DEFAULTS == defaults
    cli = train_config(build_parser().parse_args(["train"]))
    # what the command line sets without flags is the schema's default (paths are made absolute)
    assert {k: v for k, v in cli.items() if k not in ("out", "data")} == \
        {k: defaults[k] for k in cli if k not in ("out", "data")}
    assert set(defaults) - set(cli) <= {"log_every", "reuse_layers", "reuse_options"}
    assert Trainer.SAFE_TO_CHANGE == TrainConfig.names("resume")
    assert set(TrainConfig.names("run_only")) <= set(TrainConfig.names("resume"))
    assert IGNORED_SETTINGS == set(TrainConfig.names("run_only")) | {"quiet"}
    assert "epochs" in Trainer.SAFE_TO_CHANGE and "epochs" not in IGNORED_SETTINGS
    TrainConfig.defaults()["decay_layers"].append("conv1")     # a copy: the defaults stay
    assert TrainConfig.defaults()["decay_layers"] == ["fc3", "fc4"]
    with pytest.raises(ValueError, match=r"unknown training settings \['lr_max'\]"):
        TrainConfig.check({**defaults, "lr_max": 1})
