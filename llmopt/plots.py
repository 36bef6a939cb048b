"""Plots every notebook reuses: before/after bars and a metric against a swept knob."""
from __future__ import annotations


def before_after(rows, metric: str, label: str = "label", title: str = "", ax=None):
    """Horizontal bars of `metric` for each row (dicts or a DataFrame), device in the title."""
    import matplotlib.pyplot as plt
    rows = rows.to_dict("records") if hasattr(rows, "to_dict") else list(rows)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.2))
    ax.barh([str(r[label]) for r in rows], [r[metric] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        ax.text(r[metric], i, f" {r[metric]:.3g}", va="center")
    ax.set_xlabel(metric)
    device = rows[0].get("device", "") if rows else ""
    ax.set_title(f"{title} ({device})" if device else title)
    ax.figure.tight_layout()
    return ax


def sweep(rows, x: str, ys: list[str], title: str = "", xlabel: str | None = None,
          ylabel: str = "", ax=None, logx: bool = False):
    """Lines of one or more metrics against a swept parameter."""
    import matplotlib.pyplot as plt
    rows = rows.to_dict("records") if hasattr(rows, "to_dict") else list(rows)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    for y in ys:
        ax.plot([r[x] for r in rows], [r[y] for r in rows], marker="o", label=y)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    ax.legend()
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.figure.tight_layout()
    return ax
