#!/usr/bin/env bash
# Prepare a GPU host for Ratchet's SSH runner; run once per host, as root (or as the ratchet user itself).
#
# Creates the user (when root), its workdir, and a venv <workdir>/venv with torch (the CUDA build from
# PyPI), numpy and tokenizers; installs the service's public key; installs the proposal sandbox (bubblewrap,
# uidmap and a subordinate uid range for the user: README, Trust model); checks the GPUs; prints the
# [[hosts]] entry for ratchet.toml. Idempotent: run it again to upgrade or to check.
# The runner uploads the trainer package and the data itself at first contact; nothing else is needed.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bootstrap-gpu-host.sh [options]

  --user NAME            account the service logs in as (default: ratchet; created when run as root)
  --workdir DIR          where trainer, data and experiments live (default: ~NAME/ratchet)
  --python PY            Python 3.11+ used to create the venv (default: python3)
  --torch VERSION        torch version (default: 2.13.0; PyPI's Linux wheel is the CUDA build)
  --pip-args "ARGS"      extra pip arguments, e.g. "--index-url https://mirror.example/simple"
  --authorized-key FILE  public key of the ratchet service to allow (appended once to ~NAME/.ssh/authorized_keys)
  --name NAME            host name for the printed [[hosts]] entry (default: this host's short name)
  --cpu-only             a CPU host (tests, debugging): no nvidia-smi check
  --check                only check an existing setup (venv imports, GPUs); change nothing
  --dry-run              print what would be done; change nothing
  -h, --help             this text
EOF
}

USER_NAME=ratchet
WORKDIR=""
PYTHON=python3
TORCH=2.13.0
PIP_ARGS=""
AUTH_KEY=""
HOST_NAME="$(hostname -s 2>/dev/null || hostname)"
CPU_ONLY=0
CHECK=0
DRY=0

while [ $# -gt 0 ]; do
    case "$1" in
        --user) USER_NAME="$2"; shift 2 ;;
        --workdir) WORKDIR="$2"; shift 2 ;;
        --python) PYTHON="$2"; shift 2 ;;
        --torch) TORCH="$2"; shift 2 ;;
        --pip-args) PIP_ARGS="$2"; shift 2 ;;
        --authorized-key) AUTH_KEY="$2"; shift 2 ;;
        --name) HOST_NAME="$2"; shift 2 ;;
        --cpu-only) CPU_ONLY=1; shift ;;
        --check) CHECK=1; shift ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
done

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
run() {  # run a command, as the ratchet user when we are root and it is another account
    if [ "$DRY" = 1 ]; then printf '    would run: %s\n' "$*"; return 0; fi
    if [ "$(id -u)" = 0 ] && [ "$USER_NAME" != root ]; then
        su -s /bin/bash "$USER_NAME" -c "$(printf '%q ' "$@")"
    else
        "$@"
    fi
}

ME="$(id -un)"
if [ "$(id -u)" != 0 ] && [ "$ME" != "$USER_NAME" ]; then
    die "run as root, or as $USER_NAME itself (you are $ME)"
fi

# ---- The account ----
if ! id "$USER_NAME" >/dev/null 2>&1; then
    [ "$CHECK" = 1 ] && die "user $USER_NAME does not exist"
    say "creating user $USER_NAME"
    if [ "$DRY" = 1 ]; then echo "    would run: useradd --create-home --shell /bin/bash $USER_NAME"
    else useradd --create-home --shell /bin/bash "$USER_NAME"; fi
fi
HOME_DIR="$(getent passwd "$USER_NAME" | cut -d: -f6 || true)"

# ---- The proposal sandbox: bubblewrap, and subordinate uids that own nothing for proposals to run as ----
if [ "$CHECK" = 0 ] && [ "$(id -u)" = 0 ]; then
    if ! command -v bwrap >/dev/null || ! command -v newuidmap >/dev/null; then
        say "installing bubblewrap and uidmap"
        if [ "$DRY" = 1 ]; then echo "    would run: apt-get install -y bubblewrap uidmap"
        elif command -v apt-get >/dev/null; then apt-get install -y -q bubblewrap uidmap >/dev/null
        elif command -v dnf >/dev/null; then dnf install -y -q bubblewrap shadow-utils
        else die "install bubblewrap and newuidmap (uidmap / shadow-utils) with this system's package manager"; fi
    fi
    if [ "$USER_NAME" != root ] && ! grep -q "^$USER_NAME:" /etc/subuid 2>/dev/null; then
        say "giving $USER_NAME subordinate uids 100000-165535 (the uids proposals run as)"
        if [ "$DRY" = 1 ]; then echo "    would run: usermod --add-subuids 100000-165535 --add-subgids 100000-165535 $USER_NAME"
        else usermod --add-subuids 100000-165535 --add-subgids 100000-165535 "$USER_NAME"; fi
    fi
fi
HOME_DIR="${HOME_DIR:-/home/$USER_NAME}"
WORKDIR="${WORKDIR:-$HOME_DIR/ratchet}"
VENV="$WORKDIR/venv"

if [ -n "$AUTH_KEY" ] && [ "$CHECK" = 0 ]; then
    [ -r "$AUTH_KEY" ] || die "cannot read $AUTH_KEY"
    KEY_LINE="$(head -n 1 "$AUTH_KEY")"
    case "$KEY_LINE" in ssh-*|ecdsa-*|sk-*) ;; *) die "$AUTH_KEY does not look like an SSH public key";; esac
    say "allowing the service's key for $USER_NAME"
    run mkdir -p "$HOME_DIR/.ssh"
    run chmod 700 "$HOME_DIR/.ssh"
    if [ "$DRY" = 0 ] && grep -qxF "$KEY_LINE" "$HOME_DIR/.ssh/authorized_keys" 2>/dev/null; then
        echo "    already there"
    else
        run sh -c "printf '%s\n' \"\$1\" >> \"\$2\" && chmod 600 \"\$2\"" sh "$KEY_LINE" "$HOME_DIR/.ssh/authorized_keys"
    fi
fi

# ---- The Python environment ----
if [ "$CHECK" = 0 ]; then
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found (install Python 3.11+, e.g. apt-get install python3 python3-venv)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$PYTHON is $("$PYTHON" -V 2>&1); 3.11+ is needed (--python /path/to/python3.11)"
    say "workdir $WORKDIR, venv $VENV"
    run mkdir -p "$WORKDIR"
    if [ ! -x "$VENV/bin/python" ]; then
        run "$PYTHON" -m venv "$VENV" || die "venv failed (Debian/Ubuntu: apt-get install python3-venv)"
    fi
    say "installing torch==$TORCH numpy tokenizers (a few GB with the CUDA libraries)"
    # shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
    run "$VENV/bin/python" -m pip install --quiet --upgrade pip $PIP_ARGS
    # shellcheck disable=SC2086
    run "$VENV/bin/python" -m pip install --quiet $PIP_ARGS "torch==$TORCH" "numpy>=1.26" "tokenizers>=0.20"
fi

# ---- Checks ----
if [ "$DRY" = 1 ]; then say "dry run: nothing changed"; exit 0; fi
[ -x "$VENV/bin/python" ] || die "no venv at $VENV (run without --check first)"
say "checking the venv"
run "$VENV/bin/python" -c 'import sys, numpy, tokenizers, torch
print("    python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "GPUs visible to torch:", torch.cuda.device_count())'
GPUS=1
if [ "$CPU_ONLY" = 0 ]; then
    command -v nvidia-smi >/dev/null || die "nvidia-smi not found: install the NVIDIA driver (or use --cpu-only)"
    nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader | sed 's/^/    /'
    GPUS="$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)"
    [ "$GPUS" -gt 0 ] || die "nvidia-smi sees no GPU"
    TORCH_GPUS="$(run "$VENV/bin/python" -c 'import torch; print(torch.cuda.device_count())')"
    [ "$TORCH_GPUS" = "$GPUS" ] || die "torch sees $TORCH_GPUS GPUs, nvidia-smi $GPUS (driver too old for this torch's CUDA?)"
fi
command -v setsid >/dev/null || die "setsid not found (util-linux): the runner starts each experiment in its own session"
command -v bwrap >/dev/null || die "bwrap not found: install bubblewrap (proposals run only inside it)"
if [ "$USER_NAME" != root ] && ! grep -q "^$USER_NAME:" /etc/subuid 2>/dev/null; then
    say "warning: $USER_NAME has no subordinate uids: proposals run as its own uid in a user namespace"
fi
FREE="$(df -Pk "$WORKDIR" | tail -n 1 | awk '{print $4}')"
say "free disk in $WORKDIR: $((FREE / 1024 / 1024)) GiB"

ADDR="$(hostname -f 2>/dev/null || hostname)"
say "ready. Add to ratchet.toml on the service:"
cat <<EOF

[[hosts]]
name = "$HOST_NAME"
address = "$ADDR"
user = "$USER_NAME"
key = "~/.ssh/ratchet_ed25519"        # the service's private key (its .pub is what --authorized-key took)
gpus = $GPUS
workdir = "$WORKDIR"
python = "$VENV/bin/python"
EOF
if [ "$CPU_ONLY" = 1 ]; then echo "cpu_only = true"; fi
