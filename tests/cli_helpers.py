"""What the command-line tests share: a train command on the small CIFAR-10 fixture
(conftest's ``data``)."""
import json
import os


def base(data, out, *extra):
    """argv of a short CPU train run on the fixture into ``out``."""
    return ["train", "--data", data, "--device", "cpu", "--out", str(out), "--quiet", "--limit-train", "64",
            "--batch-size", "32", "--no-download", *extra]


def history(out):
    with open(os.path.join(out, "history.json")) as f:
        return json.load(f)
