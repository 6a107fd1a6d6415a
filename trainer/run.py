"""`python -m trainer.run`: one harness run from the command line, as the runners invoke it.

Prints the summary block and exits 0 for `ok`, 1 for `crash`, 3 for `timeout`.

`python -m trainer.run --standby` is the same run, started before its job is known: it imports torch and warms
the lazily loaded parts, then waits for one JSON line on stdin, {"argv": [...the options above...], "source":
"<train.py>"}, writes the script and runs it. The local runner keeps one standby per slot so an experiment does not
wait for the interpreter and torch to start (seconds on CPU). End of input before a job: exit 0, nothing run. A
warm-up that fails (a full disk, say): exit 4 (STANDBY_FAILED) without reading the job, which the runner then
starts afresh.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from trainer.harness import run, warm_up
from trainer.result import STANDBY_FAILED, summary_block

EXIT_CODES = {"ok": 0, "crash": 1, "timeout": 3}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.run", description=__doc__.splitlines()[0])
    p.add_argument("--script", type=Path, required=True, help="the train.py to run")
    p.add_argument("--data", type=Path, required=True, help="a prepared data directory (manifest.json)")
    p.add_argument("--budget-s", type=float, required=True, help="training time budget, seconds")
    p.add_argument("--out", type=Path, required=True, help="where to write result.json")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=json.loads, default={}, help='JSON overrides for ctx.scale, e.g. \'{"depth": 12}\'')
    p.add_argument("--eval-tokens", type=int, default=None, help="validation tokens to score (default by device)")
    p.add_argument("--seq-len", type=int, default=None, help="context length (default by device)")
    p.add_argument("--grace-s", type=float, default=None, help="seconds past the budget before a timeout "
                   "(default 60 + budget/2)")
    p.add_argument("--curve", type=Path, default=None, help="training curve JSONL (default beside --out)")
    p.add_argument("--warmup-steps", type=int, default=None, help="steps not counted against the budget")
    return p.parse_args(argv)


def standby() -> int:
    """Wait for a job on stdin (see the module docstring), then run it as main() would. Exit 2 on a bad job,
    STANDBY_FAILED when the warm-up raises (before the job is read: it is not the job's failure)."""
    try:
        warm_up()  # before the wait: the job's run() finds it done
    except Exception as e:  # noqa: BLE001 -- whatever it is, the job has not started
        try:
            print(f"standby: warm-up failed ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        except OSError:
            pass  # the log is on the disk that is full
        return STANDBY_FAILED
    line = sys.stdin.readline()
    started = time.time()
    if not line.strip():
        return 0  # released: the runner no longer needs this standby (or is gone)
    try:
        job = json.loads(line)
        argv, source = list(job["argv"]), str(job["source"])
        script = parse_args(argv).script
    except (ValueError, KeyError, TypeError, SystemExit) as e:
        print(f"standby: bad job line ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    script.write_text(source)
    return main(argv, started=started)


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    if argv is None and sys.argv[1:] == ["--standby"]:
        return standby()
    a = parse_args(argv)
    if not isinstance(a.scale, dict):
        print("--scale must be a JSON object", file=sys.stderr)
        return 2
    res = run(script=a.script, data_dir=a.data, budget_s=a.budget_s, out=a.out, device=a.device, seed=a.seed,
              scale=a.scale, eval_tokens=a.eval_tokens, seq_len=a.seq_len, grace_s=a.grace_s, curve=a.curve,
              warmup_steps=a.warmup_steps, started=started)
    if res.log_tail and res.status != "ok":
        print("\n".join(res.log_tail), file=sys.stderr)
    print(summary_block(res), flush=True)
    return EXIT_CODES.get(res.status, 1)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the result is written; tearing torch down would add most of a second to every experiment
