"""Rendering the daily digest: its text and its progress plot (PNG, matplotlib Agg, after autoresearch's
progress.png). Pure rendering: the numbers come from loop/digest.py through the control API.
"""

from __future__ import annotations

from pathlib import Path

from loop import budget
from loop.digest import Digest, PlotData

STATUS_COLOURS = {"baseline": "#555555", "keep": "#2ca02c", "discard": "#bbbbbb", "crash": "#d62728",
                  "timeout": "#ff7f0e", "refused": "#8c564b", "pruned": "#9467bd"}


MAX_KEPT_LINES = 15  # a phone screen's worth


def _bpb(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def budget_bar(cap: budget.Cap, width: int = 12) -> str:
    """`gpu/day   ███░░░░░░░░░ 3.00 h of 24.00 h` (no bar without a cap)."""
    used = budget.fmt_amount(cap.resource, cap.used)
    if cap.limit is None:
        return f"{cap.name:<13}{'':{width}} {used} (no cap)"
    frac = min(1.0, cap.used / cap.limit) if cap.limit else 1.0
    n = round(frac * width)
    return f"{cap.name:<13}{'█' * n}{'░' * (width - n)} {used} of {budget.fmt_amount(cap.resource, cap.limit)}"


def digest_text(d: Digest) -> str:
    """The digest as plain text: kept changes, best then → now, counts and keep rate, spend, candidates."""
    lines = [f"Ratchet digest · run {d.run} · {d.since:%Y-%m-%d %H:%M} → {d.until:%Y-%m-%d %H:%M} UTC"]
    imp = d.improvement_pct
    lines.append(f"best val_bpb {_bpb(d.best_then)} → {_bpb(d.best_now)}"
                 + (f" ({imp:+.2f}% vs baseline {_bpb(d.baseline)})" if imp is not None else ""))
    if d.kept:
        lines.append(f"kept ({len(d.kept)}):")
        lines += [f"  #{k.id} {k.description}: {_bpb(k.val_bpb)}" + (f" ({k.delta:+.4f})" if k.delta is not None
                                                                      else "") + (f" on {k.hardware}" if k.hardware
                                                                                  else "")
                  for k in d.kept[-MAX_KEPT_LINES:]]
        if len(d.kept) > MAX_KEPT_LINES:
            lines.append(f"  … and {len(d.kept) - MAX_KEPT_LINES} earlier")
    else:
        lines.append("kept: none in this window")
    counts = ", ".join(f"{s} {n}" for s, n in sorted(d.counts.items())) or "none"
    rate = f", keep rate {100 * d.keep_rate:.0f}%" if d.keep_rate is not None else ""
    lines.append(f"experiments: {d.finished} finished ({counts}){rate}; {d.total_experiments} in the run")
    if d.by_direction:
        lines.append("keeps by direction: " + ", ".join(
            f"{name} {k}/{n}" for name, (n, k) in sorted(d.by_direction.items(), key=lambda x: (-x[1][1], x[0]))))
    if d.duplicate_rate is not None:
        lines.append(f"duplicate ideas: {100 * d.duplicate_rate:.0f}% of Claude's proposals")
    if d.pruned_saved_s:
        lines.append(f"early pruning saved {d.pruned_saved_s / 3600:.2f} GPU-hours ({d.counts.get('pruned', 0)} runs)")
    lines.append("budget:")
    lines += ["  " + budget_bar(c) for c in d.caps]
    for pid, scale, status, verdict in d.promotions:
        lines.append(f"promotion #{pid} to {scale}: " + (verdict.replace("_", " ") if verdict else status))
    if d.candidates:
        lines.append("best candidates to promote: " + ", ".join(f"#{k.id} ({k.delta:+.4f})" for k in d.candidates))
    return "\n".join(lines)


def plot_series(plot: PlotData) -> dict:
    """Exactly what render_plot hands to matplotlib: scatter x/y/colour and the step line's x/y."""
    return {"x": [p[0] for p in plot.points], "y": [p[1] for p in plot.points],
            "colour": [STATUS_COLOURS.get(p[2], "#000000") for p in plot.points],
            "head_x": [h[0] for h in plot.head], "head_y": [h[1] for h in plot.head],
            "labels": [(x, y, text) for x, y, text in plot.labels]}


def render_plot(d: Digest, path: Path, max_labels: int = 8) -> dict:
    """Write the progress plot PNG to `path` and return plot_series (the data drawn).

    Every experiment's val_bpb as a dot coloured by status, head's running best as a step line,
    the most recent kept changes labelled.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = plot_series(d.plot)
    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    try:
        keep = STATUS_COLOURS["keep"]
        rest = [i for i, c in enumerate(s["colour"]) if c != keep]
        kept = [i for i, c in enumerate(s["colour"]) if c == keep]
        for idx, size, z in ((rest, 10, 1), (kept, 28, 3)):  # keeps drawn last, so thousands of discards never hide them
            ax.scatter([s["x"][i] for i in idx], [s["y"][i] for i in idx], c=[s["colour"][i] for i in idx], s=size,
                       linewidths=0, rasterized=True, zorder=z)
        if s["head_x"]:
            ax.step(s["head_x"], s["head_y"], where="post", color=STATUS_COLOURS["keep"], linewidth=1.5,
                    label="head (running best)")
        for x, y, text in s["labels"][-max_labels:]:
            ax.annotate(text[:40], (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
        if s["y"]:
            lo = min(s["y"])
            hi = max(s["head_y"] or s["y"])
            pad = max(1e-3, 0.15 * (hi - lo))
            ax.set_ylim(lo - pad, hi + 4 * pad)  # crashes and bad tries go off the top, as in progress.png
        for status, colour in STATUS_COLOURS.items():
            ax.scatter([], [], c=colour, s=10, label=status)
        ax.set_xlabel("experiment")
        ax.set_ylabel("val_bpb (lower is better)")
        ax.set_title(f"Ratchet · run {d.run} · {d.until:%Y-%m-%d}")
        ax.legend(loc="upper right", fontsize=7)
        ax.grid(alpha=0.3)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return s


def render_promotion_plot(result: dict, scale: str, path: Path) -> dict:
    """A small PNG of a promotion: each side's val_bpb at the larger scale (one dot per seed, paired seeds
    joined), with Δ at both scales in the title. Returns the series drawn: {reference, candidate}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref, cand = list(result.get("reference_runs") or []), list(result.get("candidate_runs") or [])
    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    try:
        for r, c in zip(ref, cand):
            ax.plot([0, 1], [r, c], color="#bbbbbb", linewidth=1, zorder=1)
        ax.scatter([0] * len(ref), ref, color=STATUS_COLOURS["baseline"], zorder=2, label="reference")
        ax.scatter([1] * len(cand), cand, color=STATUS_COLOURS["keep"], zorder=2, label="candidate")
        ax.set_xticks([0, 1], ["reference", "candidate"])
        ax.set_xlim(-0.5, 1.5)
        ax.set_ylabel(f"val_bpb at {scale}")
        small, large = result.get("delta_small"), result.get("delta_large")
        ax.set_title(f"{result.get('verdict', '').replace('_', ' ')}: Δ {'n/a' if small is None else f'{small:+.4f}'}"
                     f" → {'n/a' if large is None else f'{large:+.4f}'}", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return {"reference": ref, "candidate": cand}
