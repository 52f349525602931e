"""Make the figures of docs/ (make figures). Each runs in seconds on a CPU.

    python docs/figures/make_figures.py              # every figure
    python docs/figures/make_figures.py hash_cells   # some of them
    python docs/figures/make_figures.py --rerun rc_over_training   # train its runs again

Figures come from small runs made here (fixed seeds) or from numbers recorded in
the docs, named where they are drawn. rc_over_training draws two training runs
kept under docs/figures/runs/ (their history.json, with the command, commit and
machine that made them); --rerun trains them again on CIFAR-10 in $DATA (default
data/): 200 steps each, minutes on an idle 2-core CPU (about 15 minutes each for
the stored runs, on a machine shared with other jobs).
"""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from minireuse.layers import im2col  # noqa: E402
from minireuse.reuse import clustering, lsh  # noqa: E402

OUT = Path(__file__).resolve().parent
CELL_COLOURS = "tab20"


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, name):
    fig.savefig(OUT / f"{name}.png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)


def cloud(n, seed):
    """2-D vectors like post-ReLU activations: a correlated cloud away from the origin."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 2)) @ np.array([[1.0, 0.5], [0.0, 0.4]])
    return (z + np.array([2.0, 1.2])).astype(np.float32)


def family_params(family, vectors, H):
    """(planes (1, 2, H), thresholds (1, H)) of a family for 2-D vectors (one group)."""
    if family == "pca":
        return lsh.pca_params(vectors[:, None, :], H, shared=True)
    planes, unit = lsh.draw_hash_params(2, H, 1, seed=3, shared=True)
    return planes, lsh.offsets(unit, family, lsh.input_scale(vectors))


def hash_cells():
    """The cells of three hash families on the same 2-D vectors (L = 2, H = 4)."""
    plt = pyplot()
    pts = cloud(300, 0)
    grid = np.stack(np.meshgrid(np.linspace(-1, 5, 300), np.linspace(-1, 3.5, 220)), -1).reshape(-1, 2)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), sharey=True)
    for ax, family in zip(axes, ("origin", "offset", "pca")):
        planes, thr = family_params(family, pts, 4)
        cells = lsh.hash_codes(grid[:, None, :].astype(np.float32), planes, thr)[:, 0]
        codes = lsh.hash_codes(pts[:, None, :], planes, thr)[:, 0]
        ax.imshow(cells.reshape(220, 300) % 20, origin="lower", extent=(-1, 5, -1, 3.5), cmap=CELL_COLOURS,
                  alpha=0.45, aspect="auto", vmin=0, vmax=19)
        ax.scatter(pts[:, 0], pts[:, 1], s=5, c="k")
        ax.scatter([0], [0], marker="+", s=80, c="r")
        ax.set_title(f"'{family}': {len(np.unique(codes))} clusters of {len(pts)} vectors")
        ax.set_xlabel("x[0]")
    axes[0].set_ylabel("x[1]")
    fig.suptitle("Each colour is one 4-bit code (a cell); + is the origin")
    save(fig, "hash_cells")


def conv_as_matmul():
    """im2col rows, their groups of width L, and the pixel-aligned variant's pixels."""
    plt = pyplot()
    from matplotlib.patches import Rectangle
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw=dict(width_ratios=[1, 1.6]))
    for y in range(6):
        for x in range(6):
            a.add_patch(Rectangle((x, 5 - y), 1, 1, fill=False, ec="0.6"))
    a.add_patch(Rectangle((1, 2), 3, 3, fill=True, fc="tab:orange", alpha=0.35, ec="tab:orange", lw=2))
    a.add_patch(Rectangle((2, 2), 3, 3, fill=False, ec="tab:blue", lw=2, ls="--"))
    a.text(2.5, 5.3, "output pixel n: a 3x3 window", ha="center", color="tab:orange")
    a.text(3.5, 1.5, "n + 1 shares 6 of its 9 pixels", ha="center", color="tab:blue")
    a.set_xlim(-0.2, 6.2), a.set_ylim(0.8, 6.2), a.set_aspect("equal"), a.axis("off")
    a.set_title("input, one channel block of c_in")
    K, L = 9, 3
    for row, colour in ((0, "tab:orange"), (1, "tab:blue")):
        for k in range(K):
            b.add_patch(Rectangle((k, 2 - row), 1, 0.8, fc=colour, alpha=0.25 + 0.2 * (k // L % 2), ec="k"))
            b.text(k + 0.5, 2.4 - row, f"p{k // 3}{k % 3}", ha="center", va="center", fontsize=8)
    for g in range(K // L):
        b.annotate("", xy=(g * L, 3.0), xytext=(g * L + L, 3.0), arrowprops=dict(arrowstyle="<->"))
        b.text(g * L + L / 2, 3.15, f"group g={g}: a neuron vector", ha="center", fontsize=8)
    b.text(0, 0.6, "row n of X (N x K): the window's pixels in (kh, kw, c) order.\n"
           "Each group of L columns is hashed and clustered on its own.\n"
           "With L dividing c_in each group is one pixel's channels: the pixel-aligned\n"
           "variant hashes every pixel once and reuses its code under all kh*kw offsets.",
           fontsize=9, va="top")
    b.set_xlim(-0.2, K + 0.2), b.set_ylim(-0.6, 3.5), b.axis("off")
    b.set_title("im2col: rows of X (here c_in = 1, L = 3)")
    save(fig, "conv_as_matmul")


def example_vectors():
    """The start-here example: 8 vectors, L = 2, H = 2 (the same arrays the page prints)."""
    x = np.array([[1.0, 0.2], [0.9, 0.3], [1.1, 0.1], [0.2, 1.0],
                  [0.1, 0.8], [-0.9, -0.1], [-1.0, 0.1], [0.3, 0.9]], np.float32)
    planes = np.array([[[1.0, 1.0], [-1.0, 1.0]]], np.float32)             # (1, L, H)
    return x, planes, np.zeros((1, 2), np.float32)


def assignment():
    """The start-here example: vectors, hash lines, clusters, centroids and the matrix R."""
    plt = pyplot()
    x, planes, thr = example_vectors()
    codes = lsh.hash_codes(x[:, None, :], planes, thr)
    ids, n = clustering.assign_clusters(codes, 2)
    cent, _ = clustering.centroids(x[:, None, :], ids, n)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw=dict(width_ratios=[1.2, 1]))
    t = np.linspace(-1.4, 1.4, 2)
    for h in range(2):
        p = planes[0, :, h]
        a.plot(t * p[1], -t * p[0], "k--", lw=1)                             # the line x . p = 0
    colours = plt.get_cmap("tab10")(ids[:, 0])
    a.scatter(x[:, 0], x[:, 1], c=colours, s=50)
    for i, (u, v) in enumerate(x):
        a.text(u + 0.04, v + 0.04, f"x{i}", fontsize=9)
    a.scatter(cent[0, :n[0], 0], cent[0, :n[0], 1], marker="*", s=220, c=plt.get_cmap("tab10")(range(n[0])),
              ec="k")
    a.set_aspect("equal"), a.set_xlim(-1.4, 1.4), a.set_ylim(-1.1, 1.4)
    a.set_title("8 vectors, 2 hash lines: 3 clusters, centroids *")
    R = np.zeros((len(x), n[0]))
    R[np.arange(len(x)), ids[:, 0]] = 1
    b.imshow(R, cmap="Greys", vmin=0, vmax=1.5)
    b.set_xticks(range(n[0])), b.set_yticks(range(len(x)))
    b.set_yticklabels([f"x{i}" for i in range(len(x))]), b.set_xlabel("cluster c")
    b.set_title("assignment matrix R: y = R (C W)")
    save(fig, "assignment")


def error_vs_clusters():
    """Output error of a reused conv against the fraction of clusters kept, per family (a run of seconds)."""
    plt = pyplot()
    from minireuse.data import sample_images
    images, _, source = sample_images(ROOT / "data", 16, seed=0)
    rng = np.random.default_rng(0)
    x = images.astype(np.float32) / 255 - 0.5
    X, _ = im2col(x, 5, 5, 1, (2, 2, 2, 2))                         # conv1: K = 75
    W = rng.standard_normal((75, 64)).astype(np.float32) / np.sqrt(75)
    exact = X @ W
    Xg = lsh.split_groups(X, 15)
    fig, ax = plt.subplots(figsize=(6, 4))
    for family in ("origin", "offset", "pca"):
        points = []
        for H in (2, 4, 6, 8, 10, 12, 16):
            if family == "pca":
                planes, thr = lsh.pca_params(Xg, H, shared=False)
            else:
                planes, unit = lsh.draw_hash_params(15, H, Xg.shape[1], seed=0, shared=False)
                planes = planes.astype(np.float32)
                thr = lsh.offsets(unit.astype(np.float32), family, lsh.input_scale(X))
            ids, n = clustering.assign_clusters(lsh.hash_codes(Xg, planes, thr), H)
            cent, _ = clustering.centroids(Xg, ids, n)
            approx = np.take_along_axis(cent, ids.T[:, :, None], axis=1).transpose(1, 0, 2).reshape(len(X), -1)
            err = np.linalg.norm(approx[:, :75] @ W - exact) / np.linalg.norm(exact)
            points.append((n.sum() / ids.size, err))
        r, e = zip(*points)
        ax.plot(r, e, "o-", label=family)
    ax.set_xscale("log"), ax.set_xlabel("r_c (clusters / vectors)"), ax.set_ylabel("||Y~ - Y|| / ||Y||")
    ax.set_title(f"5x5 conv, L = 15, H = 2..16\n{source.split(' (')[0]}", fontsize=9)
    ax.legend()
    save(fig, "error_vs_clusters")


# docs/results.md, "Accuracy at the small budget" (commits named there): conv2's time ratio over the run,
# reuse - exact in points, its spread over seeds 0-2 (or 3-5)
PARITY = [("control (exact gradients, other rounding)", 0.60, -0.34, 0.30),
          ("backward only (default), seeds 0-2", 1.34, -0.74, 0.31),
          ("backward only (default), seeds 3-5", 1.47, -1.26, 0.77), ("forward too, offset H=32", 1.52, -2.12, 0.42),
          ("forward too, pca H=16", 2.12, -2.02, 0.23), ("reuse from step 0 (first default)", 2.32, -5.17, 4.23)]


def accuracy_vs_speed():
    """Points lost against conv2's speed-up over the run, from the recorded parity runs."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, speed, loss, spread in PARITY:
        ax.errorbar(speed, loss, yerr=spread, fmt="o", capsize=3, label=label)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("conv2 speed-up over the run (x exact)"), ax.set_ylabel("test accuracy, reuse - exact (points)")
    ax.set_title("5,000 images, 8 epochs, 2-core CPU (docs/results.md)", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    save(fig, "accuracy_vs_speed")


def controller():
    """The adaptive strategy's states and what moves a layer between them (docs/adaptive.md)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 3.2))
    boxes = [("exact\n(warm-up, until the\nloss falls steadily)", 0.5), ("stage 1\nmost error\n(fewest clusters)", 3.0),
             ("stage 2\nless error", 5.5), ("...", 7.2), ("exact\n(speed guard, or the\nlast exact_tail of training)", 9.4)]
    for text, x in boxes:
        ax.text(x, 1, text, ha="center", va="center", fontsize=9,
                bbox=dict(boxstyle="round", fc="tab:green" if "exact" in text else "tab:orange", alpha=0.3))
    arrows = [(1.45, 2.2, "start: loss fell by\nsteady_drop after warm-up"),
              (3.8, 4.8, "harm > harm_bound, or\nloss rose (divergence)"), (6.2, 6.9, ""),
              (7.5, 8.3, "")]
    for x0, x1, label in arrows:
        ax.annotate("", xy=(x1, 1), xytext=(x0, 1), arrowprops=dict(arrowstyle="->", lw=1.5))
        ax.text((x0 + x1) / 2, 1.45, label, ha="center", fontsize=8)
    ax.annotate("", xy=(9.4, 0.55), xytext=(3.0, 0.55), arrowprops=dict(arrowstyle="->", ls="--", color="0.4",
                                                                        connectionstyle="arc3,rad=0.15"))
    ax.text(6.2, 0.1, "slower than exact for speed_patience epochs: straight to exact", ha="center", fontsize=8,
            color="0.3")
    ax.set_xlim(-0.6, 10.8), ax.set_ylim(-0.1, 1.9), ax.axis("off")
    ax.set_title("One reuse layer under the adaptive strategy: checked at the end of every epoch", fontsize=10)
    save(fig, "controller")


# r_c over training: conv2 of CifarNet on the first 2,560 CIFAR-10 training images, 10 epochs of 20 steps
RC_BUDGET = ["--limit-train", "2560", "--limit-test", "2000", "--epochs", "10", "--seed", "0", "--device", "cpu"]
RC_RUNS = {"rc_fixed": ("fixed: L64 H32, forward + backward, from step 0", ["--reuse", "fixed"]),
           "rc_adaptive": ("adaptive (default): L64 H32, backward only,\nafter the warm-up", ["--reuse", "adaptive"])}
RUNS = OUT / "runs"


def machine():
    """'2-core AMD EPYC' from /proc/cpuinfo (else the platform's processor name)."""
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return f"{os.cpu_count()}-core {names[0] if names else platform.processor() or platform.machine()}"


def commit():
    """HEAD's short hash, '-dirty' when minireuse/ differs from it (the code a run ran)."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(git + ["status", "--porcelain", "minireuse"], capture_output=True, text=True).stdout
    return (head or "unknown") + ("-dirty" if dirty.strip() else "")


def rc_args(name, data="data"):
    """The arguments of `python -m minireuse` that train run NAME of RC_RUNS."""
    return ["train", "--data", data, *RC_BUDGET, *RC_RUNS[name][1]]


def train_rc_run(name):
    """Train one of RC_RUNS into runs/figures/NAME and keep its history.json (plus how it was
    made) as docs/figures/runs/NAME.json."""
    args = rc_args(name, os.environ.get("DATA", "data"))
    out = ROOT / "runs" / "figures" / name
    made_by = dict(command="python -m minireuse " + " ".join(rc_args(name)), commit=commit(), machine=machine())
    subprocess.run([sys.executable, "-m", "minireuse", *args, "--out", str(out), "--overwrite", "--quiet"],
                   cwd=ROOT, check=True)
    history = json.loads((out / "history.json").read_text())
    history["made_by"] = made_by
    RUNS.mkdir(exist_ok=True)
    (RUNS / f"{name}.json").write_text(json.dumps(history, indent=1) + "\n")


def rc_over_training(rerun=False):
    """conv2's remaining ratio r_c and test accuracy per epoch of two runs kept under runs/."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    for (name, (label, _)), colour in zip(RC_RUNS.items(), ("tab:red", "tab:blue")):
        if rerun or not (RUNS / f"{name}.json").exists():
            train_rc_run(name)
        run = json.loads((RUNS / f"{name}.json").read_text())
        epochs = [e["epoch"] for e in run["epochs"]]
        conv2 = [e["layers"]["conv2"] for e in run["epochs"]]
        r_c = [rec.get("r_c") if rec.get("reuse") else None for rec in conv2]
        a.plot(epochs, [np.nan if r is None else r for r in r_c], "o-", color=colour, label=label)
        for e, r in zip(epochs, r_c):
            if r is None:
                a.annotate("exact", (e, 0), textcoords="offset points", xytext=(0, 4 + 10 * (colour == "tab:red")),
                           ha="center", fontsize=7, color=colour)
        for event in (ev for e in run["epochs"] for ev in e.get("reuse_events", [])):
            a.axvline(event["epoch"], color=colour, ls=":", lw=1)
        b.plot(epochs, [100 * e["test_acc"] for e in run["epochs"]], "o-", color=colour,
               label=f"{name.split('_')[1]}: {100 * run['epochs'][-1]['test_acc']:.1f} % at the end")
        made = run["made_by"]
    a.set_ylim(bottom=0)
    a.set_xlabel("epoch (20 steps of 128 images)"), a.set_ylabel("conv2 r_c (clusters / neuron vectors, epoch mean)")
    a.set_title("conv2's r_c per epoch ('exact': no reuse in that epoch;\ndotted: a stage change during or at the "
                "end of that epoch)", fontsize=9)
    a.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 0.15))
    b.set_xlabel("epoch"), b.set_ylabel("test accuracy (%, 2,000 test images)")
    b.set_title("the same runs' test accuracy (one seed: about +-1 point of noise)", fontsize=9)
    b.legend(fontsize=8, loc="lower right")
    budget = made["command"].split(" --reuse")[0]
    fig.text(0.5, -0.02, f"{budget} --reuse fixed | adaptive; commit {made['commit']}, {made['machine']}",
             ha="center", va="top", fontsize=8)
    save(fig, "rc_over_training")


# full training: the histories of the full-data runs (docs/results.md, "Full training"), kept under
# docs/figures/runs/full15/seedS/KIND/history.json; their seconds are steps times the mean step times
# of two idle `bench step --weights` runs at commit c28c581 (FULL_STEP_MS: the runs shared the machine)
FULL_RUNS = RUNS / "full15"
FULL_STEPS_PER_EPOCH = 391          # 50,000 images in batches of 128
FULL_KINDS = {"exact": "exact", "reuse": "default (conv2 backward only, exact dX)",
              "fast": "fastest (conv2 pca H16, forward too)", "fast_exact_dx": "pca H16 forward, exact dX",
              "forward_h32": "conv2 offset H32, forward too"}
# fast_exact_dx: 1.17x exact in a third idle run (--reuse-config), applied to exact's mean here;
# forward_h32 (--reuse fixed's setting): 0.87x exact in an idle run at 0816fe2, applied the same way
FULL_STEP_MS = {"exact": 269.6, "reuse": 342.6, "fast": 209.8, "fast_exact_dx": 230.8, "forward_h32": 310.8}


def full_training_panels():
    """[(title, {label: curve}, [(target label, accuracy)])] per stored seed, as parity draws them."""
    from minireuse.tools.parity_results import seed_targets, step_time_curve
    panels = []
    for seed_dir in sorted(FULL_RUNS.glob("seed*")):
        curves = {}
        for kind, label in FULL_KINDS.items():
            path = seed_dir / kind / "history.json"
            if path.exists():
                history = json.loads(path.read_text())["epochs"]
                curves[label] = step_time_curve(history, FULL_STEPS_PER_EPOCH, FULL_STEP_MS["exact"],
                                                None if kind == "exact" else FULL_STEP_MS[kind])
        if "exact" in curves:
            final = curves["exact"][-1][2]
            targets = seed_targets(final, [70, 75])
            panels.append((f"{seed_dir.name.replace('seed', 'seed ')}, 15 epochs", curves, targets))
    return panels


def full_training():
    """Test accuracy against training seconds of the full-data runs, one panel per seed."""
    from minireuse.tools.plot import accuracy_time_figure
    fig = accuracy_time_figure(full_training_panels())
    fig.suptitle("all 50,000 images, 15 epochs; seconds = steps x idle step times (docs/results.md)", fontsize=9)
    fig.tight_layout()
    save(fig, "full_training")


def mapping(name, title, shape, block, note, run=1):
    """A grid of outputs coloured by the block that computes them; the numbers are thread ids."""
    plt = pyplot()
    from matplotlib.patches import Rectangle
    rows, cols = shape
    br, bc = block
    fig, ax = plt.subplots(figsize=(0.45 * cols + 1, 0.4 * rows + 1.2))
    cmap = plt.get_cmap("Pastel1")
    for r in range(rows):
        for c in range(cols):
            blk = (r // (br * run)) * (-(-cols // bc)) + c // bc
            tid = (r % (br * run)) // run * bc + c % bc
            ax.add_patch(Rectangle((c, rows - 1 - r), 1, 1, fc=cmap(blk % 9), ec="0.5"))
            ax.text(c + 0.5, rows - 0.5 - r, str(tid), ha="center", va="center", fontsize=7)
    ax.set_xlim(0, cols), ax.set_ylim(0, rows), ax.set_aspect("equal")
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(note, fontsize=8)
    save(fig, name)


def batched_gemm():
    """cuda.batched_gemm: one cuBLAS call whose batch index is the group g; cuBLAS maps the threads."""
    plt = pyplot()
    from matplotlib.patches import Rectangle
    fig, ax = plt.subplots(figsize=(11, 3.4))
    cap, L, M = 3.0, 1.2, 2.4
    for g in range(3):
        x0 = g * 8.8
        for x, w, h, fc, label in ((x0, L, cap, "tab:orange", f"C_{g}\ncap x L"), (x0 + L + 0.8, M, L, "tab:blue",
                                   f"W_{g}\nL x M"), (x0 + L + M + 1.6, M, cap, "tab:green", f"P_{g}\ncap x M")):
            ax.add_patch(Rectangle((x, 0.4 + cap - h), w, h, fc=fc, alpha=0.3, ec="k"))
            ax.text(x + w / 2, 0.4 + cap - h / 2, label, ha="center", va="center", fontsize=8)
        ax.text(x0 + L + 0.4, 0.4 + cap / 2, "@", ha="center", va="center", fontsize=12)
        ax.text(x0 + L + M + 1.2, 0.4 + cap / 2, "=", ha="center", va="center", fontsize=12)
        ax.text(x0 + 3.2, 3.75, f"batch index i = g = {g}", ha="center", fontsize=9)
    ax.text(25.6, 2.0, "...", fontsize=14, va="center")
    ax.text(13.2, 0.0, "one cublasSgemmStridedBatched call: matrix i starts one matrix (stride) after matrix i - 1; "
            "no Python loop over groups,\nno transpose copy (transposes are cuBLAS flags); inside each product "
            "cuBLAS picks the tiles and threads", ha="center", va="top", fontsize=8)
    ax.set_xlim(-0.3, 26.6), ax.set_ylim(-0.9, 4.1), ax.axis("off")
    ax.set_title("batched_gemm, the forward's centroid GEMM: G products of the same shape in one launch "
                 "(pixel path: Q channel groups, M -> kh*kw*M)", fontsize=9)
    save(fig, "map_batched_gemm")


def kernel_mappings():
    mapping("map_rows", "hash_rows_h*: one thread per row, blockIdx.y = group\n(block of 4 shown; 128 in the kernel)",
            (8, 3), (4, 1), "columns: groups g (one block column each); rows: rows r of X or pixels")
    mapping("map_run_columns", "reconstruct / cluster_sums: lanes along the outputs m,\n"
            "each thread a run of REUSE_RUN = 4 rows (block 4 x 2 shown; 32 x 8 in the kernel)",
            (16, 8), (2, 4), "columns: outputs m; each number is the thread owning that (row, m)", run=4)
    mapping("map_elements", "one thread per element, grid-stride\n(block of 8 shown; 256 in the kernel)",
            (4, 8), (1, 8), "each row of cells is one block's pass; the grid then strides by blocks x threads")
    mapping("map_columns_run", "centroid_sums: one thread per column k of a run of 4 rows\n(block of 8 shown; 256 in "
            "the kernel)", (8, 8), (1, 8), "columns: k = g*L + l; each thread adds the 4 rows of its run", run=4)


FIGURES = {"hash_cells": hash_cells, "conv_as_matmul": conv_as_matmul, "assignment": assignment,
           "error_vs_clusters": error_vs_clusters, "accuracy_vs_speed": accuracy_vs_speed, "controller": controller,
           "rc_over_training": rc_over_training, "full_training": full_training,
           "map_rows": kernel_mappings, "map_run_columns": kernel_mappings, "map_elements": kernel_mappings,
           "map_columns_run": kernel_mappings, "map_batched_gemm": batched_gemm}


def main(names):
    rerun = "--rerun" in names
    names = [n for n in names if n != "--rerun"]
    for make in dict.fromkeys(FIGURES[n] for n in (names or FIGURES)):
        make(rerun=True) if rerun and make is rc_over_training else make()
        print(f"made {make.__name__}")


if __name__ == "__main__":
    main(sys.argv[1:])
