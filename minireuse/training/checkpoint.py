"""Training checkpoints: one .npz holding parameters, optimizer state, the position in the
run (epoch, step), the history, the settings and the reuse strategy's state.

Written atomically (fileio). Read with allow_pickle=False: a checkpoint holds arrays
and one JSON record, nothing that runs code when loaded.
"""
import json
import os

import numpy as np

from ..fileio import atomic_savez


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, bad checkpoint, ...)."""


def save_checkpoint(path, model, opt, epoch, step, history, cfg, strategy=None, epoch_totals=None):
    """Parameters, optimizer state, position (epoch, step) and history in one .npz, atomically.

    epoch_totals: for a save inside an epoch, the sums of its steps so far
    (loss_sum, correct, seen, seconds), so the resumed epoch reports all of them."""
    arrays = {f"param/{k}": v for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    for key, slots in opt_state["state"].items():
        for slot, v in slots.items():
            arrays[f"opt/{key}/{slot}"] = v
    meta = {"epoch": epoch, "step": step, "opt_steps": opt_state["steps"], "lr": opt_state["lr"],
            "history": history, "config": cfg, "format": 1,
            "strategy": strategy.state_dict() if strategy is not None else None,
            "epoch_totals": epoch_totals}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    atomic_savez(path, arrays)


def load_npz(path, kind, what, keys=None):
    """{name: array} of an .npz file (only ``keys`` when given), one open; TrainingError naming
    the file, the ``kind`` of file and ``what`` was expected when it is missing or not an .npz archive."""
    if not os.path.exists(path):
        raise TrainingError(f"{kind} {os.path.abspath(path)} does not exist (expected {what})")
    try:
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise ValueError("a single array")
            return {k: f[k] for k in f.files if keys is None or k in keys}
    except Exception as e:
        raise TrainingError(f"{path} is not a minireuse {kind} (expected {what}; could not read it as one: "
                            f"{type(e).__name__})") from e


def read_checkpoint(path, arrays=True):
    """(meta dict, {name: array}) of a checkpoint written by save_checkpoint (arrays=False: the
    meta record alone, the other arrays left unread); TrainingError otherwise."""
    data = load_npz(path, "checkpoint", "the checkpoint.npz that train writes", keys=None if arrays else ("meta",))
    if "meta" not in data:
        raise TrainingError(f"{path} is not a minireuse training checkpoint (no meta record)")
    try:
        meta = json.loads(bytes(data["meta"]).decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise TrainingError(f"{path} is not a minireuse training checkpoint (unreadable meta record)") from e
    return meta, data


def checkpoint_config(path):
    """The training settings a checkpoint was saved with (reads its meta record only)."""
    return read_checkpoint(path, arrays=False)[0].get("config") or {}


def model_arrays(path):
    """The parameters (and buffers) of a model.npz (Sequential.save) or of a training checkpoint.npz."""
    data = load_npz(path, "model or checkpoint", "RUN/model.npz or RUN/checkpoint.npz")
    if "meta" not in data:
        return data
    return {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}


def load_weights(model, path):
    """Parameters of ``model`` from a model.npz (Sequential.save) or a training checkpoint.npz."""
    arrays = model_arrays(path)
    try:
        model.load_state_dict(arrays)
    except ValueError as e:
        raise TrainingError(f"{path} does not hold this model's parameters: {e}") from e


def load_checkpoint(path, model, opt, checkpoint=None):
    """Restore model and optimizer from ``path`` (or from its already read ``checkpoint`` =
    read_checkpoint(path)); returns its meta dict."""
    meta, data = checkpoint if checkpoint is not None else read_checkpoint(path)
    params = {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}
    own = [k for k, _, _ in model.named_parameters()]
    saved_model = (meta.get("config") or {}).get("model", "?")
    try:
        model.load_state_dict(params)
    except ValueError as e:
        raise TrainingError(f"checkpoint {path} was saved for model {saved_model!r} with parameters "
                            f"{', '.join(sorted(params)[:6])}{', ...' if len(params) > 6 else ''}; this run builds "
                            f"{getattr(model, 'name', type(model).__name__)!r} with "
                            f"{', '.join(sorted(own)[:6])}{', ...' if len(own) > 6 else ''} ({e})") from e
    state = {}
    for k, v in data.items():
        if k.startswith("opt/"):
            key, slot = k[len("opt/"):].rsplit("/", 1)
            state.setdefault(key, {})[slot] = v
    opt.load_state_dict({"steps": meta["opt_steps"], "lr": meta["lr"], "state": state})
    return meta


def _json_value(v):
    return json.loads(json.dumps(v))


def resume_conflicts(saved, cfg, safe=()):
    """[(setting, saved value, given value)] where cfg changes what a resumed run must keep
    (settings in ``safe`` may change)."""
    out = []
    for key in sorted(set(saved) & set(cfg)):
        if key in safe:
            continue
        if _json_value(saved[key]) != _json_value(cfg[key]):
            out.append((key, saved[key], cfg[key]))
    return out
