"""Outbox events: the one-line text and payload for each thing the loop has to say.

Builds rows only; the caller adds them in the same transaction as the change they report.
"""

from __future__ import annotations

import statistics

from db.models import Event, Experiment, Run


def _bpb(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def experiment_event(exp: Experiment, run: Run, head_before: float | None = None) -> Event:
    """The event for a finished experiment: kept / discarded / crashed / timeout / invalid / aborted / baseline.
    A confirmed change's val_bpb is the mean of its runs (payload and text); `first_run_val_bpb` its first."""
    what = exp.description or exp.edit_key or f"experiment {exp.id}"
    # a confirmed change is judged on the mean of its runs (decision["runs"]); its own val_bpb is the first
    runs = (exp.decision or {}).get("runs") or []
    val = statistics.fmean(runs) if runs else exp.val_bpb
    over = f" (mean of {len(runs)} runs)" if runs else ""
    payload = {"status": exp.status, "val_bpb": val, "head_val_bpb": head_before, "sigma": run.noise_sigma,
               "description": exp.description, "hypothesis": exp.hypothesis, "training_seconds": exp.training_seconds,
               "host": exp.host, "slot": exp.slot, "device_name": exp.device_name, "commit": exp.commit,
               "decision": exp.decision,
               "first_run_val_bpb": exp.val_bpb}
    if exp.kind == "baseline":
        kind = "baseline_run" if exp.status == "keep" else "crashed"
        text = (f"baseline run #{exp.id} (seed {exp.seed}): val_bpb {_bpb(exp.val_bpb)}" if exp.status == "keep"
                else f"baseline run #{exp.id} {exp.status}: {exp.reason}")
    elif exp.status == "keep":
        kind = "kept"
        d = val - head_before
        text = (f"kept #{exp.id} {what}: val_bpb {_bpb(head_before)} → {_bpb(val)}{over} "
                f"({d:+.4f}, {100 * d / head_before:+.2f}%, noise σ {_bpb(run.noise_sigma)})")
    elif exp.status == "discard":
        kind = "discarded"
        text = f"discarded #{exp.id} {what}: val_bpb {_bpb(val)}{over} vs head {_bpb(head_before)}"
        if runs:
            text += f" (first run {_bpb(exp.val_bpb)})"
    elif exp.status in ("crash", "timeout", "refused"):  # refused: the scorer would not score it (README: Trust model)
        kind = "crashed"
        text = f"{exp.status} #{exp.id} {what}: {exp.reason}"
    else:  # invalid, pruned, aborted: the status names the event
        kind = exp.status
        text = f"{exp.status} #{exp.id} {what}: {exp.reason}"
    if exp.device_name and kind in ("baseline_run", "kept", "discarded"):
        text += f" · on {exp.device_name}"  # the hardware class it was compared within
    return Event(run_id=run.id, experiment_id=exp.id, kind=kind, text=text, payload=payload)


def run_event(run: Run, kind: str, text: str, **payload) -> Event:
    """A run-level event: baseline measured, paused, resumed, exhausted, … (experiment_id is left to the caller)."""
    return Event(run_id=run.id, kind=kind, text=text, payload=payload)
