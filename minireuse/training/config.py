"""The settings of a training run, in one place: TrainConfig's fields are the settings and
their defaults, and each field's metadata says

- ``resume``: a resumed run may change it (where things are, how long the run goes on, how
  it executes); any other setting must equal the checkpoint's;
- ``run_only``: it says where or how a run ran, not what it computed; parity ignores it when
  it decides whether a stored run is the one it wants.

The command line takes its defaults from here, the Trainer its defaults, checks and what a
resume may change, parity what it ignores. The Trainer keeps the settings as a plain dict
(``TrainConfig.defaults()`` updated with the run's), which is also what a checkpoint and
history.json store.
"""
import dataclasses

from ..checks import check_range


def _setting(default, resume=False, run_only=False):
    meta = dict(resume=resume, run_only=run_only)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class TrainConfig:
    model: str = _setting("cifarnet")                    # a name of models.MODELS
    data: str = _setting("data", resume=True, run_only=True)
    epochs: int = _setting(30, resume=True)
    batch_size: int = _setting(128)
    lr: float = _setting(0.05)                          # the peak learning rate
    optimizer: str = _setting("sgd")                    # sgd or adam
    momentum: float = _setting(0.9)
    nesterov: bool = _setting(True)
    weight_decay: float = _setting(0.004)
    decay_layers: list = _setting(["fc3", "fc4"])       # None: every weight
    schedule: str = _setting("cosine")
    warmup_epochs: float = _setting(1.0)
    augment: bool = _setting(True)
    seed: int = _setting(0)
    out: str = _setting("runs/cifarnet", resume=True, run_only=True)
    limit_train: int = _setting(None)                   # None: every training image
    limit_test: int = _setting(None, resume=True)       # None: every test image
    device: str = _setting("auto", resume=True, run_only=True)
    log_every: int = _setting(25, resume=True, run_only=True)
    download: bool = _setting(True, resume=True, run_only=True)
    reuse: str = _setting("off")                        # off, fixed, schedule or adaptive
    reuse_layers: dict = _setting(None)                 # per layer: a setting or a ladder of them
    reuse_options: dict = _setting(None)                # the strategy's options
    graph: str = _setting("off", resume=True, run_only=True)
    eval_every: float = _setting(1.0, resume=True, run_only=True)   # test evaluations, in epochs

    @classmethod
    def defaults(cls):
        """Every setting's default, as a dict (a fresh copy)."""
        return dataclasses.asdict(cls())

    @classmethod
    def names(cls, flag):
        """The settings whose metadata ``flag`` ('resume' or 'run_only') is set, in field order."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata[flag])

    @staticmethod
    def check(settings):
        """Refuse unknown settings and numbers out of range (ValueError naming the setting)."""
        unknown = set(settings) - set(TrainConfig.defaults())
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}")
        for key in ("epochs", "batch_size"):
            check_range(key, settings[key], 1, integer=True)
        for key, low, high in (("lr", 0, None), ("momentum", 0, 1), ("weight_decay", 0, None),
                               ("warmup_epochs", 0, None)):
            check_range(key, settings[key], low, high, open_low=key == "lr", open_high=key == "momentum")
        check_range("eval_every", settings["eval_every"], 0, 1, open_low=True)
