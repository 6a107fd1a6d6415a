#!/usr/bin/env bash
# Measure the CUDA path on a GPU host that has torch but no network (a lent or air-gapped machine).
#
#   bash bench/gpu_bundle.sh prepare [DIR]    here, with network: fill DIR (default <checkout>/.gpu/, ~35 MB)
#                                             with what such a host lacks: the service's wheels for its Python
#                                             (PY_VERSION, default 3.12), bubblewrap and git binaries, and the
#                                             prepared default corpus
#   bash bench/gpu_bundle.sh run [DIR]        there, from a copy of the checkout with DIR beside it: install the
#                                             wheels into /tmp/site and run the CUDA benches under `timeout`
#
# `run` prints the benches' figures and copies their JSON to $OUT (when set) or bench/results/. BENCHES (default
# "trainer loop") picks bench/trainer.py (the baseline alone) and bench/loop_overhead.py (two baseline repeats and
# one experiment through the real engine); BENCH_BUDGET_S (default 60) is each run's time budget. On an H100-class
# GPU a 60 s run takes about 100 s (torch.compile adds ~30 s of start), so both fit in 10 minutes.
set -euo pipefail
cmd=${1:?usage: gpu_bundle.sh prepare|run [DIR]}
root=$(cd "$(dirname "$0")/.." && pwd)
dir=$(realpath -m "${2:-$root/.gpu}")
cd "$root"  # the benches, PYTHONPATH and prepared_data() all start from the checkout

prepare() {
    mkdir -p "$dir/whl" "$dir/bin" "$dir/home/data"
    # pyproject.toml's dependencies, less torch and numpy (the GPU host's image has its own, built for its CUDA) and
    # what the benches never import (matplotlib, psycopg, uvicorn).
    pip download -q -d "$dir/whl" --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        sqlmodel sqlalchemy dulwich alembic "apscheduler<4" pydantic pydantic-settings slack-bolt slack-sdk rich typer \
        httpx anthropic tokenizers asyncssh
    # Packages torch imports too are left out, so that torch gets the host's own versions (/tmp/site comes first).
    rm -f "$dir"/whl/{huggingface_hub,hf_xet,filelock,fsspec,tqdm}-*.whl
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -q bubblewrap git >/dev/null && for deb in *.deb; do dpkg -x "$deb" x; done)
    cp "$tmp/x/usr/bin/bwrap" "$tmp/x/usr/bin/git" "$dir/bin/"  # git's builtins are all the workspace uses
    rm -rf "$tmp"
    data=$(python -c "from bench.common import prepared_data; print(prepared_data())")
    cp -r "$data" "$dir/home/data/"
    du -sh "$dir"
}

run() {
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
    python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__)"
    # The sandbox runs bwrap from the service's PATH; the workspace needs git: the carried ones only where missing.
    command -v bwrap >/dev/null || export PATH="$PATH:$dir/bin"
    command -v git >/dev/null || export PATH="$PATH:$dir/bin"
    timeout 120 pip install -q --no-deps --no-index --target /tmp/site "$dir"/whl/*.whl
    # The local runner starts `python -s -P -m trainer.run`: the checkout must be importable without its directory.
    export PYTHONPATH="/tmp/site:$PWD" RATCHET_HOME="$dir/home"
    out=${OUT:-bench/results}
    budget=${BENCH_BUDGET_S:-60}
    benches=" ${BENCHES:-trainer loop} "
    case "$benches" in *" trainer "*)
        timeout 180 python3 bench/trainer.py --device cuda --scripts baseline --budget-s "$budget" || true ;;
    esac
    case "$benches" in *" loop "*)
        timeout 400 python3 bench/loop_overhead.py --device cuda --budget-s "$budget" --experiments 1 \
            --noise-repeats 2 || true ;;
    esac
    cp bench/results/trainer.json bench/results/loop_overhead.json "$out/" 2>/dev/null || true
}

"$cmd"
