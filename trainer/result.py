"""The result of one training run: the JSON the loop reads and the summary block a person reads.

The loop trusts only this file, written by the harness's trusted parent where the proposal's code cannot write;
its text fields that came from that code (`error` of a crash, `log_tail`) are cleaned (trainer/untrusted.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

STATUSES = ("ok", "crash", "timeout", "refused")
# trainer.run's exit code when a standby harness failed before it took a job (its warm-up raised: e.g. a full
# disk, where tempfile finds no usable directory). The job is not at fault; the runner starts it afresh.
STANDBY_FAILED = 4


@dataclass
class Result:
    """One harness run. Units: seconds, MiB, tokens; val_bpb in bits per UTF-8 byte (lower is better)."""

    status: str = "crash"  # ok | crash | timeout | refused (the scorer would not score the trained model)
    error: str = ""  # one line; empty when ok
    val_bpb: float | None = None
    training_seconds: float = 0.0  # counted training time, warm-up steps excluded
    total_seconds: float = 0.0  # wall time of the whole process
    peak_memory_mb: float = 0.0  # on CUDA the GPU memory torch allocated at most; else the experiment's peak RAM
    mfu_percent: float | None = None  # CUDA only: model FLOPs ÷ (peak bf16 FLOPs × time)
    tokens: int = 0  # training tokens consumed
    epochs: float = 0.0  # tokens ÷ the training split's tokens: how many times the run saw the corpus
    steps: int = 0  # last step passed to ctx.log
    params: int = 0
    device: str = ""  # cpu | cuda | mps
    device_name: str = ""  # the hardware: GPU model and count (`NVIDIA H100 80GB HBM3 x1`), or the CPU model
    seed: int = 0
    log_tail: list[str] = field(default_factory=list)  # last lines of the traceback, for crashes (cleaned)
    disk_full: str = ""  # set by the parent's own free-space check: where, and how much was free
    timings: dict = field(default_factory=dict)  # seconds of the harness's phases: start, export, load, score

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "Result":
        """Build from parsed JSON, ignoring unknown keys (newer harness, older loop)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def write(self, path: Path) -> None:
        """Atomically write the JSON (temp file + rename), so a reader never sees half a result."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)


def read_result(path: Path) -> Result:
    """Parse a result file. Raises FileNotFoundError or ValueError (bad JSON)."""
    return Result.from_dict(json.loads(Path(path).read_text()))


def summary_block(r: Result) -> str:
    """The autoresearch-style summary: a `---` line, then `key: value` lines a program can grep."""
    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    lines = [
        "---",
        f"status:           {r.status}",
        f"val_bpb:          {num(r.val_bpb, '.6f')}",
        f"training_seconds: {r.training_seconds:.1f}",
        f"total_seconds:    {r.total_seconds:.1f}",
        f"peak_memory_mb:   {r.peak_memory_mb:.1f}",
        f"mfu_percent:      {num(r.mfu_percent, '.2f')}",
        f"total_tokens_M:   {r.tokens / 1e6:.2f}",
        f"num_steps:        {r.steps}",
        f"num_params_M:     {r.params / 1e6:.2f}",
        f"device:           {r.device_name or r.device}",
        f"seed:             {r.seed}",
    ]
    if r.error:
        lines.append(f"error:            {r.error}")
    return "\n".join(lines)
