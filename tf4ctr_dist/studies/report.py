"""`tf4ctr report RUN [RUN...]`: PNG plots and a markdown summary of finished runs.

Reads each run folder's metrics.jsonl, result.json and config.json (local path or fsspec URL)
and draws with matplotlib (the `report` extra) on the Agg backend (no display needed):

  curves.png             train loss, valid logloss and valid / test AUC over epochs, one line per run
  tf_loss.png            the Twin Focus loss terms over p_t for several c and gamma (paper Fig 4)
  RUN/difficulty.png     difficulty buckets per epoch on valid and test (Fig 10)
  RUN/histograms.png     prediction histograms on train and valid, first and last epoch (Fig 2)
  RUN/grad_norms.png     ||dL/dz_s|| and ||dL/dz_c|| per step of the first epoch (Fig 5)
  RUN/fusion.png         gate / fusion values per epoch
  RUN/telemetry.png      per window of training steps: the share of samples each branch finds easy
                         (p_t >= 0.5) and the mean weight of each TF term
  summary.md             one table row per run and the figures
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional, Sequence

import fsspec


class ReportError(ValueError):
    """A run folder lacks what a report needs."""


def load_run(url: str) -> dict[str, Any]:
    """{"name", "url", "history" (metrics.jsonl records), "result" (or None), "config" (or {})}."""
    fs, root = fsspec.core.url_to_fs(url.rstrip("/"))
    metrics = f"{root}/metrics.jsonl"
    if not fs.exists(metrics):
        raise ReportError(f"{url}: no metrics.jsonl (expected a run folder written by `tf4ctr train`)")
    history = []
    for i, line in enumerate(fs.cat_file(metrics).decode().splitlines()):
        if line.strip():
            try:
                history.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ReportError(f"{url}/metrics.jsonl line {i + 1}: not JSON ({e})") from None

    def _json(name: str) -> Optional[dict]:
        path = f"{root}/{name}"
        return json.loads(fs.cat_file(path)) if fs.exists(path) else None

    config = _json("config.json") or {}
    name = os.path.basename(root.rstrip("/")) or root
    return {"name": name, "url": url, "history": history, "result": _json("result.json"), "config": config}


def save_figure(fig, path: str) -> None:
    """Lay out, give whole-number ticks to epoch and step axes, write the PNG and free the figure."""
    from matplotlib.ticker import MaxNLocator

    fig.tight_layout()
    for ax in fig.axes:
        label = ax.get_xlabel()
        if label == "epoch" or "step" in label:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReportError("tf4ctr report needs matplotlib: pip install 'tf4ctr_dist[report]' "
                          "(or -r requirements/report.txt)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: Sequence[dict], path: str) -> None:
    plt = _pyplot()
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        h = run["history"]
        epochs = [r["epoch"] for r in h]
        ax_loss.plot(epochs, [r["train_loss"] for r in h], marker="o", label=f"{run['name']} train objective")
        ax_loss.plot(epochs, [r["valid"].get("logloss") for r in h], marker="s", ls="--",
                     label=f"{run['name']} valid logloss")
        ax_auc.plot(epochs, [r["valid"].get("AUC") for r in h], marker="o", label=f"{run['name']} valid AUC")
        test = [(r["epoch"], r.get("analyses", {}).get("test", {}).get("AUC")) for r in h]
        test = [(e, v) for e, v in test if v is not None]
        if test:
            ax_auc.plot(*zip(*test), marker="^", ls=":", label=f"{run['name']} test AUC")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_auc.set(xlabel="epoch", ylabel="AUC", title="AUC")
    for ax in (ax_loss, ax_auc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_tf_loss(path: str, cs: Sequence[float] = (0.3, 0.5, 0.7, 0.9), gammas: Sequence[float] = (1.0, 2.0)) -> None:
    """Fig 4: the two Twin Focus terms, BCE*(c + p_t)^gamma (simple) and BCE*(2 - c - p_t)^gamma
    (complex), over the probability of the true class p_t, from losses.twin_focus_loss itself."""
    import torch

    from tf4ctr_dist.losses import twin_focus_loss

    plt = _pyplot()
    pt = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    z = torch.log(pt) - torch.log1p(-pt)  # logits of a positive sample with p = p_t
    y, ones = torch.ones_like(z), torch.ones_like(z)
    bce = -torch.log(pt)

    def per_sample(alpha: float, c: float, gamma: float) -> torch.Tensor:
        # One sample at a time: twin_focus_loss averages over the batch.
        return torch.stack([twin_focus_loss(z[i:i + 1], z[i:i + 1], y[i:i + 1], ones[i:i + 1], alpha, c, gamma)
                            for i in range(len(z))])

    fig, axes = plt.subplots(1, len(gammas), figsize=(5.5 * len(gammas), 4), squeeze=False)
    for ax, gamma in zip(axes[0], gammas):
        ax.plot(pt, bce, color="black", lw=1, label="BCE")
        for c in cs:
            line, = ax.plot(pt, per_sample(1.0, c, gamma), label=f"simple, c={c}")
            ax.plot(pt, per_sample(0.0, c, gamma), ls="--", color=line.get_color(), label=f"complex, c={c}")
        ax.set(xlabel="p_t (probability of the true class)", ylabel="loss", title=f"Twin Focus terms, gamma={gamma}",
               ylim=(0, 6))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def plot_difficulty(run: dict, path: str) -> bool:
    plt = _pyplot()
    h = run["history"]
    panels = [(s, lab) for s in ("valid", "test") for lab in ("positive", "negative")
              if any(r.get("analyses", {}).get(f"{s}_difficulty") for r in h)]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    for ax, (split, label) in zip(axes[0], panels):
        rows = [(r["epoch"], r["analyses"][f"{split}_difficulty"][label]) for r in h
                if r.get("analyses", {}).get(f"{split}_difficulty")]
        epochs = [e for e, _ in rows]
        for bucket, color in (("well", "tab:green"), ("poorly", "tab:orange"), ("misclassified", "tab:red")):
            ax.plot(epochs, [b[f"{bucket}_frac"] for _, b in rows], marker="o", color=color, label=bucket)
        ax.set(xlabel="epoch", ylabel=f"share of {label} samples", title=f"{split}: {label}", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{run['name']}: difficulty buckets (|y - p|: <0.3 well, <0.6 poorly, else misclassified)", fontsize=9)
    save_figure(fig, path)
    return True


def plot_histograms(run: dict, path: str) -> bool:
    plt = _pyplot()
    h = [r for r in run["history"] if r.get("analyses", {}).get("valid_histogram")]
    if not h:
        return False
    picks = [h[0]] if len(h) == 1 else [h[0], h[-1]]
    fig, axes = plt.subplots(len(picks), 2, figsize=(10, 3.4 * len(picks)), squeeze=False)
    for row, rec in zip(axes, picks):
        for ax, split in zip(row, ("train", "valid")):
            hist = rec["analyses"].get(f"{split}_histogram")
            if not hist:
                ax.set_visible(False)
                continue
            edges = hist["edges"]
            width = edges[1] - edges[0]
            for label, color in (("negative", "tab:blue"), ("positive", "tab:red")):
                counts = hist[label]
                total = max(sum(counts), 1)
                ax.bar(edges[:-1], [c / total for c in counts], width=width, align="edge", alpha=0.5,
                       color=color, label=f"label {1 if label == 'positive' else 0} (n={sum(counts):,})")
            ax.set(xlabel="predicted probability", ylabel="share of the label's samples",
                   title=f"{split}, epoch {rec['epoch']}")
            ax.legend(fontsize=8)
    fig.suptitle(f"{run['name']}: prediction histograms", fontsize=9)
    save_figure(fig, path)
    return True


def plot_grad_norms(run: dict, path: str) -> bool:
    plt = _pyplot()
    rec = next((r for r in run["history"] if r.get("analyses", {}).get("grad_norms")), None)
    if rec is None:
        return False
    g = rec["analyses"]["grad_norms"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(g["simple"]) + 1), g["simple"], label="||dL/dz_s|| (simple)")
    ax.plot(range(1, len(g["complex"]) + 1), g["complex"], label="||dL/dz_c|| (complex)")
    ax.set(xlabel=f"step of epoch {rec['epoch']}", ylabel="L2 norm over the local batch",
           title=f"{run['name']}: logit gradient norms")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
    return True


def plot_fusion(run: dict, path: str) -> bool:
    plt = _pyplot()
    rows = [(r["epoch"], r["analyses"]["fusion"]) for r in run["history"] if r.get("analyses", {}).get("fusion")]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    series: dict[str, list] = {}
    for epoch, f in rows:
        for name, v in f.items():
            values = v["mean"] if "mean" in v else list(v.values())
            keys = [f"{name}[{i}]" for i in range(len(v["mean"]))] if "mean" in v else [f"{name}.{k}" for k in v]
            for k, val in zip(keys, values):
                series.setdefault(k, []).append((epoch, val))
    for k, pts in series.items():
        ax.plot(*zip(*pts), marker="o", label=k)
    ax.set(xlabel="epoch", ylabel="value (gates: mean over valid)", title=f"{run['name']}: gate and fusion values")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def plot_telemetry(run: dict, path: str) -> bool:
    """Two panels over training steps (all epochs, windows of a tenth of an epoch)."""
    plt = _pyplot()
    points = []  # (global step, window)
    offset = 0
    for r in run["history"]:
        windows = r.get("analyses", {}).get("telemetry") or []
        for w in windows:
            points.append((offset + w["step"], w))
        offset += max((w["step"] for w in windows), default=0)
    if not points:
        return False
    steps = [p for p, _ in points]
    fig, (share, weight) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("easy_share_fused", "fused p_t >= 0.5"), ("easy_share_simple", "simple branch p_t,s >= 0.5"),
                       ("easy_share_complex", "complex branch p_t,c >= 0.5")):
        share.plot(steps, [w[key] for _, w in points], label=label)
    share.set(xlabel="training step", ylabel="share of samples", title="samples the branches find easy")
    for key, label in (("mean_weight_simple", "(c + p_t,s)^gamma (simple term)"),
                       ("mean_weight_complex", "(m - p_t,c)^gamma (complex term)")):
        weight.plot(steps, [w[key] for _, w in points], label=label)
    weight.set(xlabel="training step", ylabel="mean weight over the window", title="TF loss term weights")
    for ax in (share, weight):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{run['name']}: difficulty telemetry")
    save_figure(fig, path)
    return True


def _fmt(v: Any) -> str:
    return f"{v:.6f}" if isinstance(v, float) else "-" if v is None else str(v)


def write_report(urls: Sequence[str], out: str) -> list[str]:
    """Write the plots and summary.md of ``urls`` into the local folder ``out``; returns the files."""
    runs = [load_run(u) for u in urls]
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):  # two runs both called "run": number them
        for i, r in enumerate(runs):
            r["name"] = f"{i + 1}-{r['name']}"
    os.makedirs(out, exist_ok=True)
    written = []
    plot_curves(runs, os.path.join(out, "curves.png"))
    plot_tf_loss(os.path.join(out, "tf_loss.png"))
    written += ["curves.png", "tf_loss.png"]
    lines = ["# tf4ctr report", "", "| run | epochs | best epoch | valid AUC | valid logloss | test AUC | test logloss "
             "| first-epoch train s | valid inference s |", "|" + "---|" * 9]
    per_run: list[tuple[str, list[str]]] = []
    for run in runs:
        res = run["result"] or {}
        timing = res.get("timing", {})
        valid, test = res.get("valid", {}), res.get("test", {})
        lines.append(f"| {run['name']} | {len(run['history'])} | {res.get('best_epoch', '-')} | {_fmt(valid.get('AUC'))} "
                     f"| {_fmt(valid.get('logloss'))} | {_fmt(test.get('AUC'))} | {_fmt(test.get('logloss'))} "
                     f"| {_fmt(timing.get('first_epoch_train_seconds'))} | {_fmt(timing.get('valid_inference_seconds'))} |")
        sub = _slug(run["name"])
        os.makedirs(os.path.join(out, sub), exist_ok=True)
        figs = []
        for fname, fn in (("difficulty.png", plot_difficulty), ("histograms.png", plot_histograms),
                          ("grad_norms.png", plot_grad_norms), ("fusion.png", plot_fusion),
                          ("telemetry.png", plot_telemetry)):
            if fn(run, os.path.join(out, sub, fname)):
                figs.append(f"{sub}/{fname}")
        written += figs
        per_run.append((run["name"], figs))
    lines += ["", "## Curves", "", "![loss and AUC](curves.png)", "", "## Twin Focus loss (Fig 4)", "",
              "![TF loss terms](tf_loss.png)", ""]
    for name, figs in per_run:
        lines += [f"## {name}", ""] + [f"![{f}]({f})" for f in figs] + [""]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines))
    written.append("summary.md")
    return written
