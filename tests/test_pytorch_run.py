"""The same recipe in PyTorch: the same weights, batches, dropout masks and updates as minireuse exact."""
import json

import numpy as np
import pytest

from minireuse.training.trainer import Trainer

from cli_helpers import config, learnable_data

torch = pytest.importorskip("torch", reason="PyTorch is the optional .[compare] extra")

from minireuse.tools.pytorch_run import TorchRun, torch_weights  # noqa: E402


def test_converted_weights_give_minireuse_outputs():
    """NHWC -> NCHW, conv and dense layouts, fc3's input order: the same logits."""
    from minireuse.models import cifarnet
    from minireuse.tools.pytorch_run import build_network
    model = cifarnet(seed=3)
    net, _, _ = build_network(torch, model)
    net.eval()
    x = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)
    ours = model.forward(x, train=False)
    theirs = net(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).detach().numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)
    assert torch_weights(model)["conv1"][0].shape == (64, 3, 5, 5)


def test_pytorch_run_trains_as_minireuse_exact_and_resumes(tmp_path, monkeypatch):
    """Two epochs of 3 steps with augmentation, dropout (the same masks) and weight decay: the
    losses and accuracies equal minireuse exact's within float32 rounding, the history has its
    fields, and a run interrupted in epoch 2 resumes from epoch 1's end to the same result."""
    data = learnable_data(n_train=96, n_test=32)
    cfg = config(tmp_path, weight_decay=0.004, momentum=0.9, warmup_epochs=0.5, eval_every=0.5)
    exact = Trainer(dict(cfg, out=str(tmp_path / "exact")), data=data, quiet=True)
    exact.fit()
    straight = TorchRun(dict(cfg, out=str(tmp_path / "pt")), data=data, quiet=True)
    straight.fit()
    for ours, theirs in zip(exact.history, straight.history):
        for key in ("train_loss", "test_loss"):
            assert theirs[key] == pytest.approx(ours[key], rel=1e-4), key
        assert theirs["train_acc"] == ours["train_acc"] and theirs["lr"] == ours["lr"]
        assert set(theirs) == set(ours)
        assert [m["step"] for m in theirs["mid_evals"]] == [m["step"] for m in ours["mid_evals"]] == [2]
    saved = json.load(open(tmp_path / "pt" / "history.json"))
    assert saved["settings"]["framework"] == "pytorch" and saved["device"].startswith("pytorch")

    first, calls = TorchRun(dict(cfg, out=str(tmp_path / "pt1")), data=data, quiet=True), []
    real_step = first.step

    def step_then_interrupt(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(*args)
    monkeypatch.setattr(first, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    resumed = TorchRun(dict(cfg, out=str(tmp_path / "pt1")), data=data, quiet=True)
    assert resumed.resume(str(tmp_path / "pt1" / "checkpoint.npz"))["epoch"] == 1
    resumed.fit()
    assert [e["train_loss"] for e in resumed.history] == [e["train_loss"] for e in straight.history]
    for (n, a), b in zip(straight.net.named_parameters(), resumed.net.parameters()):
        assert torch.equal(a, b), n
