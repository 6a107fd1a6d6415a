"""`python -m trainer.run`: one harness run from the command line, as every runner invokes it (the trusted parent).

Prints the summary block and exits 0 for `ok`, 1 for `crash`, 3 for `timeout`, 5 for `refused`.

`python -m trainer.run --standby --data DIR [--device D] [sandbox options]` is the same run, started before its
job is known: it starts the sandboxed worker and scorer (which import torch while they wait), then waits for one
JSON line on stdin, {"argv": [...the options above...], "source": "<train.py>"}, writes the script and runs it.
The local runner keeps one standby per slot so an experiment does not wait for interpreters and torch to start.
With `--after DIR` (the directory of the run training on the slot now) a standby for the CPU first waits until
that run's training is over (DIR/training.done or DIR/result.json, DIR gone, or its own job arriving), so its
start-up never takes cores from a run being timed; on a GPU host it starts at once.
End of input before a job: exit 0, nothing run. A start that fails (a full disk, say): exit 4 (STANDBY_FAILED)
without reading the job, which the runner then starts afresh.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import time
from pathlib import Path

from trainer.harness import TRAINING_DONE, launch, run, uses_cuda
from trainer.result import STANDBY_FAILED, summary_block
from trainer.sandbox import SandboxConfig

EXIT_CODES = {"ok": 0, "crash": 1, "timeout": 3, "refused": 5}


def _parser(standby: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.run", description=__doc__.splitlines()[0])
    p.add_argument("--script", type=Path, required=not standby, help="the train.py to run")
    p.add_argument("--data", type=Path, required=True, help="a prepared data directory (manifest.json)")
    p.add_argument("--budget-s", type=float, required=not standby, help="training time budget, seconds")
    p.add_argument("--out", type=Path, required=not standby, help="where to write result.json")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=json.loads, default={}, help='JSON overrides for ctx.scale, e.g. \'{"depth": 12}\'')
    p.add_argument("--eval-tokens", type=int, default=None, help="validation tokens to score (default by device)")
    p.add_argument("--seq-len", type=int, default=None, help="context length (default by device)")
    p.add_argument("--grace-s", type=float, default=None, help="seconds past the budget before a timeout, for the "
                   "last step and the export (default 30 + budget/10)")
    p.add_argument("--curve", type=Path, default=None, help="training curve JSONL (default beside --out)")
    p.add_argument("--warmup-steps", type=int, default=None, help="batches served before the clock starts")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel ranks, one per device (CUDA_VISIBLE_DEVICES "
                   "lists the GPUs; on CPU the gloo backend)")
    p.add_argument("--no-sandbox", action="store_true", help="run the worker and scorer as plain processes")
    d = SandboxConfig()
    p.add_argument("--sandbox-user", default=d.user, help="the user the code runs as when this runs as root")
    p.add_argument("--memory-gb", type=float, default=d.memory_gb, help="RAM per experiment, GiB (0: 80%% of RAM)")
    p.add_argument("--max-processes", type=int, default=d.max_processes)
    p.add_argument("--max-file-gb", type=float, default=d.max_file_gb)
    p.add_argument("--max-open-files", type=int, default=d.max_open_files)
    p.add_argument("--standby", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--after", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return _parser().parse_args(argv)


def sandbox_of(a: argparse.Namespace) -> SandboxConfig:
    """The sandbox settings given on the command line."""
    return SandboxConfig(enabled=not a.no_sandbox, user=a.sandbox_user, memory_gb=a.memory_gb,
                         max_processes=a.max_processes, max_file_gb=a.max_file_gb, max_open_files=a.max_open_files)


def _run(a: argparse.Namespace, started: float | None = None, launched=None) -> int:
    if not isinstance(a.scale, dict):
        print("--scale must be a JSON object", file=sys.stderr)
        return 2
    res = run(script=a.script, data_dir=a.data, budget_s=a.budget_s, out=a.out, device=a.device, seed=a.seed,
              scale=a.scale, eval_tokens=a.eval_tokens, seq_len=a.seq_len, grace_s=a.grace_s, curve=a.curve,
              warmup_steps=a.warmup_steps, sandbox_cfg=sandbox_of(a), started=started, launched=launched,
              nproc=a.nproc)
    if res.log_tail and res.status != "ok":
        print("\n".join(res.log_tail), file=sys.stderr)
    print(summary_block(res), flush=True)
    return EXIT_CODES.get(res.status, 1)


def standby(argv: list[str]) -> int:
    """Start the worker and scorer, wait for a job on stdin (see the module docstring), then run it."""
    s = _parser(standby=True).parse_args(argv)
    if s.after is not None and not uses_cuda(s.device):
        wait_for_training(s.after)
    launched = None
    try:
        launched = launch(s.data, Path.cwd(), s.device, sandbox_of(s), s.nproc, ahead=True)
        launched.wait_ready()
    except Exception as e:  # noqa: BLE001 - whatever it is, the job has not started
        if launched is not None:
            launched.close()
        try:
            print(f"standby: could not start ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        except OSError:
            pass  # the log is on the disk that is full
        return STANDBY_FAILED
    line = sys.stdin.readline()
    started = time.time()
    if not line.strip():
        launched.close()
        return 0  # released: the runner no longer needs this standby (or is gone)
    try:
        job = json.loads(line)
        a = parse_args(list(job["argv"]))
        source = str(job["source"])
    except (ValueError, KeyError, TypeError, SystemExit) as e:
        print(f"standby: bad job line ({type(e).__name__}: {e})", file=sys.stderr)
        launched.close()
        return 2
    if launched.key() != (str(Path(a.data).resolve()), a.device, sandbox_of(a), a.nproc):
        launched.close()  # started for other data or settings: run this job cold
        launched = None
    a.script.write_text(source)
    return _run(a, started, launched)


def wait_for_training(run_dir: Path, poll_s: float = 0.1) -> None:
    """Return once the run in `run_dir` has stopped training (TRAINING_DONE or result.json there, or the directory
    gone) or a line (or the end) is ready on stdin."""
    while run_dir.is_dir() and not (run_dir / TRAINING_DONE).exists() and not (run_dir / "result.json").exists():
        if select.select([sys.stdin], [], [], poll_s)[0]:
            return


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--standby" in argv:
        return standby([x for x in argv if x != "--standby"])
    return _run(parse_args(argv))


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
