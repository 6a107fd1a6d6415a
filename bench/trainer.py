"""Trainer benchmark: the baseline train.py vs a vanilla GPT-2-style reference under the same harness.

    python bench/trainer.py [--budget-s 60] [--seeds 1] [--device auto] [--scripts baseline,reference]
                            [--corpus shakespeare] [--vocab-size N]

Prints tokens/s, val_bpb, peak memory and the uncounted start (job hand-over to the clock's start: model building,
warm-up batches and, on CUDA, torch.compile) for each, and MFU on CUDA; writes bench/results/trainer.json.
Target: the baseline's val_bpb at 60 s is lower than the reference's; on an H100, MFU ≥ 40%. On a GPU give a web
corpus already prepared (`--corpus climbmix:10`): the CUDA preset reads Shakespeare dozens of times a minute, so its
val_bpb there measures memorisation.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import prepared_data, write_json  # noqa: E402
from trainer.result import read_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"baseline": ROOT / "trainer" / "templates" / "train.py", "reference": ROOT / "bench" / "reference_gpt.py"}


def run_once(script: Path, data_dir: Path, budget_s: float, seed: int, device: str, eval_tokens: int | None):
    out = Path(tempfile.mkdtemp(prefix="bench-trainer-")) / "result.json"
    cmd = [sys.executable, "-m", "trainer.run", "--script", str(script), "--data", str(data_dir),
           "--budget-s", str(budget_s), "--out", str(out), "--seed", str(seed), "--device", device]
    if eval_tokens:
        cmd += ["--eval-tokens", str(eval_tokens)]
    subprocess.run(cmd, cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
    return read_result(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=60.0)
    ap.add_argument("--seeds", type=int, default=1, help="runs per script (different seeds)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--eval-tokens", type=int, default=None)
    ap.add_argument("--scripts", default=",".join(SCRIPTS), help="which of them to run, comma-separated")
    ap.add_argument("--corpus", default="shakespeare", help="as `ratchet data prepare --corpus`")
    ap.add_argument("--vocab-size", type=int, default=None, help="default: the corpus's (4096, 8192 for web ones)")
    a = ap.parse_args()
    names = [n.strip() for n in a.scripts.split(",") if n.strip()]
    if unknown := sorted(set(names) - set(SCRIPTS)):
        ap.error(f"unknown script(s) {', '.join(unknown)}; choose from {', '.join(SCRIPTS)}")
    data_dir = prepared_data(a.corpus, a.vocab_size)
    figures = {"budget_s": a.budget_s, "device": a.device, "corpus": a.corpus, "scripts": {}}
    for name in names:
        script = SCRIPTS[name]
        results = [run_once(script, data_dir, a.budget_s, seed, a.device, a.eval_tokens) for seed in range(a.seeds)]
        ok = [r for r in results if r.status == "ok"]
        if not ok:
            print(f"{name}: {results[0].status}: {results[0].error}")
            figures["scripts"][name] = {"status": results[0].status, "error": results[0].error}
            continue
        bpb = [r.val_bpb for r in ok]
        row = {
            "val_bpb": statistics.fmean(bpb),
            "val_bpb_runs": bpb,
            "tokens_per_s": statistics.fmean(r.tokens / max(r.training_seconds, 1e-9) for r in ok),
            "steps": statistics.fmean(r.steps for r in ok),
            "params_M": ok[0].params / 1e6,
            "peak_memory_mb": max(r.peak_memory_mb for r in ok),
            "mfu_percent": ok[0].mfu_percent,
            "training_seconds": statistics.fmean(r.training_seconds for r in ok),
            "total_seconds": statistics.fmean(r.total_seconds for r in ok),
            "start_s": max((r.timings.get("start_s") or 0.0 for r in ok), default=0.0),
            "device": ok[0].device,
        }
        figures["scripts"][name] = row
        mfu = f", MFU {row['mfu_percent']:.1f}%" if row["mfu_percent"] is not None else ""
        print(f"{name:9s} val_bpb {row['val_bpb']:.4f} ({len(ok)} run(s)) · {row['tokens_per_s']:,.0f} tokens/s · "
              f"{row['steps']:.0f} steps · {row['params_M']:.2f}M params · peak {row['peak_memory_mb']:.0f} MiB{mfu}"
              f" · start {row['start_s']:.1f} s"
              f" · {row['device']}")
    s = figures["scripts"]
    if "val_bpb" in s.get("baseline", {}) and "val_bpb" in s.get("reference", {}):
        gain = s["reference"]["val_bpb"] - s["baseline"]["val_bpb"]
        figures["baseline_beats_reference"] = gain > 0
        print(f"target: baseline val_bpb < reference at {a.budget_s:g} s: "
              f"{'met' if gain > 0 else 'NOT met'} (Δ {gain:+.4f})")
    write_json("trainer", figures)


if __name__ == "__main__":
    main()
