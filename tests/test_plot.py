"""Figures of training runs (python -m minireuse plot): a valid PNG that shows every run given,
from small history fixtures; a clear message without matplotlib."""
import json
import struct
import sys

import numpy as np
import pytest

from minireuse.__main__ import main

matplotlib = pytest.importorskip("matplotlib", reason="matplotlib is in the test extra; install '.[test]'")


def history(path, acc0, events=True):
    epochs = []
    for e in range(1, 5):
        layers = {"conv2": dict(reuse=None if e == 1 else {"L": 64, "H": 32}, r_c=0.1 * e, rel_error=0.3 / e,
                                forward_s=1.0, backward_s=1.0)}
        epochs.append(dict(epoch=e, train_acc=acc0 + 0.05 * e, test_acc=acc0 + 0.04 * e, train_loss=2 - 0.2 * e,
                           test_loss=2.1 - 0.2 * e, seconds=10 + e, layers=layers, reuse_harm=0.01 * e,
                           reuse_events=[{"layer": "conv2", "stage": 0, "epoch": 2}] if events and e == 2 else []))
    path.mkdir(parents=True)
    (path / "history.json").write_text(json.dumps({"settings": {}, "epochs": epochs}))
    return str(path)


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def colour_pixels(image, rgb, tol=0.08):
    return int((np.abs(image[..., :3] - np.array(rgb)) < tol).all(-1).sum())


def test_the_figure_shows_every_run(tmp_path, capsys):
    a, b = history(tmp_path / "runs" / "a", 0.2), history(tmp_path / "runs" / "b", 0.5, events=False)
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    assert main(["plot", a, "-o", str(one)]) == 0
    assert main(["plot", a, b, "-o", str(two), "--labels", "first,second"]) == 0
    assert capsys.readouterr().out.split() == [str(one), str(two)]
    assert png_size(one) == png_size(two) and png_size(one)[0] > 800
    from matplotlib.colors import to_rgb
    import matplotlib.image as mpimg
    img1, img2 = mpimg.imread(str(one)), mpimg.imread(str(two))
    c0, c1 = to_rgb("C0"), to_rgb("C1")
    assert colour_pixels(img1, c0) > 500 and colour_pixels(img1, c1) < 50       # one run: its colour only
    assert colour_pixels(img2, c0) > 500 and colour_pixels(img2, c1) > 500      # two runs: both colours
    assert not np.array_equal(img1, img2)


def test_default_output_and_bad_input(tmp_path, capsys):
    a = history(tmp_path / "a", 0.3)
    assert main(["plot", a]) == 0
    assert png_size(tmp_path / "a" / "history.png")[0] > 800
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "no history.json (no epoch finished yet?)" in capsys.readouterr().err
    assert main(["plot", a, "--labels", "x,y"]) == 2
    assert "expected 1 labels" in capsys.readouterr().err


def test_without_matplotlib_it_says_how_to_install(tmp_path, capsys, monkeypatch):
    a = history(tmp_path / "a", 0.3)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["plot", a]) == 2
    err = capsys.readouterr().err
    assert "plot needs matplotlib" in err and "pip install -e '.[plot]'" in err
