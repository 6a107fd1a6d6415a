"""The scorer: loads a trained model's artifact, refuses what it must not run, and computes val_bpb.

    python -m trainer.scorer --fds N --val FILE… --token-bytes FILE     (started by trainer.harness)

It never imports proposal code. The artifact is a `torch.export` program (a graph of ATen ops plus weights); it is
loaded with every pickle entry point of torch's loader closed (weights only), and refused when it holds pickled
objects, mutates its buffers or inputs, or calls an op outside ALLOWED_OPS. The score is computed here, on the
pinned validation tokens, with this module's own cross-entropy; causality is checked on the real scoring windows
at random cut points, mixed into the scoring batches in random order. The program is pure (no state survives a
call), so nothing it sees while being scored can change what it predicts later.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import operator
import os
import pickle
import re
import sys
import time
import zipfile

import numpy as np

from trainer.wire import Channel

CHECK_TOLERANCE = 1e-3  # relative: logits before the cut may differ this much (same shapes: ~0 for causal models)
CHECK_IDS = 8  # secret random vocabulary ids per checked window, besides the window's own targets
CHECK_WINDOWS = 8  # windows checked for causality at least (a batch of them when batches are larger)


class Refused(RuntimeError):
    """The artifact is not something the scorer runs or scores: the message is the one-line reason."""


class ContractError(RuntimeError):
    """The model broke the harness contract (wrong logits shape or type)."""


# ---- What a graph may call ----

# ATen ops a language model's forward pass uses: pure tensor functions. No I/O (aten.from_file), no randomness,
# no in-place or out= variants (refused by schema below), no higher-order ops (control flow, autocast regions).
ALLOWED_OPS = frozenset("""
abs absolute acos acosh add addbmm addcdiv addcmul addmm addmv addr alias all amax amin any arange argmax argmin
as_strided asin asinh atan atan2 atanh avg_pool1d avg_pool2d baddbmm bitwise_and bitwise_not bitwise_or
bitwise_xor bmm broadcast_tensors bucketize cat ceil chunk clamp clamp_max clamp_min clip clone constant_pad_nd
contiguous conv1d conv2d convolution copy cos cosh cumprod cummax cummin cumsum detach diag diag_embed diagonal
div einsum elu embedding empty empty_like eq erf erfc exp exp2 expand expand_as expm1 eye fill flatten flip floor
floor_divide fmod full full_like gather ge gelu glu group_norm gt hardsigmoid hardswish hardtanh index
index_select isfinite isinf isnan layer_norm le leaky_relu lerp lift_fresh_copy linalg_vector_norm linear log
log10 log1p log2 log_sigmoid log_softmax logaddexp logcumsumexp logical_and logical_not logical_or logical_xor
logsumexp lt masked_fill matmul max max_pool1d max_pool2d maximum mean min minimum mish mm movedim mul
nan_to_num narrow native_dropout native_group_norm native_layer_norm ne neg new_empty new_full new_ones
new_zeros norm numel one_hot ones ones_like pad permute pow prod reciprocal reflection_pad1d relu relu6
remainder repeat repeat_interleave replication_pad1d reshape rms_norm roll rot90 round rsqrt rsub
scaled_dot_product_attention scalar_tensor scatter scatter_add select select_scatter selu sigmoid sign silu sin
sinh slice slice_scatter softmax softplus sort split split_with_sizes sqrt square squeeze stack std sub sum
sym_numel sym_size sym_storage_offset sym_stride t take tan tanh tensor_split tile to topk transpose tril triu
true_divide trunc type_as unbind unflatten unfold unsqueeze var view view_as where xlogy zeros zeros_like
_assert_scalar _assert_tensor_metadata _local_scalar_dense _log_softmax _softmax _to_copy _unsafe_view
_scaled_dot_product_flash_attention _scaled_dot_product_flash_attention_for_cpu
_scaled_dot_product_efficient_attention _scaled_dot_product_cudnn_attention sym_constrain_range_for_size
""".split())
# Python callables an exported graph may hold besides ATen ops: tuple indexing and symbolic-size arithmetic.
ALLOWED_CALLABLES = (operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
                     operator.truediv, operator.mod, operator.neg, operator.eq, operator.ne, operator.lt,
                     operator.le, operator.gt, operator.ge)


def _op_name(target) -> str:
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def check_program(program) -> None:
    """Refuse a program that keeps state or does more than compute logits. Raises Refused with the reason."""
    import torch
    from torch.export.graph_signature import InputKind, OutputKind

    sig = program.graph_signature
    user_inputs = [s for s in sig.input_specs if s.kind == InputKind.USER_INPUT]
    for s in sig.input_specs:
        if s.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR, InputKind.USER_INPUT):
            raise Refused(f"the model's graph takes a {s.kind.name.lower()} input (only weights and token ids)")
    if len(user_inputs) != 1:
        raise Refused(f"the model's graph takes {len(user_inputs)} inputs, expected the token ids alone")
    for s in sig.output_specs:
        if s.kind in (OutputKind.BUFFER_MUTATION, OutputKind.USER_INPUT_MUTATION,
                      getattr(OutputKind, "PARAMETER_MUTATION", None)):
            raise Refused(f"the model's graph writes {s.target or 'its input'} (state kept between calls)")
        if s.kind != OutputKind.USER_OUTPUT:
            raise Refused(f"the model's graph has a {s.kind.name.lower()} output")
    for node in program.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op != "call_function":
            raise Refused(f"the model's graph holds a {node.op} node ({node.target}): only tensor ops are run")
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            name = t._schema.name
            if t._schema.is_mutable:
                raise Refused(f"the model calls {name.replace('::', '.')}, which writes a tensor in place "
                              "(state kept between calls)")
            if not name.startswith("aten::") or name[len("aten::"):] not in ALLOWED_OPS:
                raise Refused(f"the model calls {name.replace('::', '.')}, which the scorer does not run "
                              "(allowed: pure tensor ops, README: Trust model)")
        elif t not in ALLOWED_CALLABLES and t is not torch._C._set_grad_enabled:
            raise Refused(f"the model's graph calls {_op_name(t)}, which the scorer does not run")


# ---- Loading without pickle ----

# What a torch.export archive of one model holds (under its top folder). Anything else — pickled tensor
# subclasses, custom or opaque objects, AOTInductor libraries, extra files — is refused before loading.
_ARCHIVE_FILES = re.compile(r"(data/weights/(weight_\d+|model_weights_config\.json)|data/constants/(tensor_\d+|"
                            r"model_constants_config\.json)|models/model\.json|data/sample_inputs/model\.pt|"
                            r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id)")


def check_archive(path: str) -> None:
    """Refuse an archive with anything but one model's graph, raw tensors and its sample input."""
    try:
        z = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise Refused(f"the artifact is not a torch.export archive ({e})") from None
    with z:
        for name in z.namelist():
            rel = name.split("/", 1)[1] if "/" in name else name
            if not _ARCHIVE_FILES.fullmatch(rel):
                raise Refused(f"the artifact holds {rel}, which the scorer does not load (only graph and tensors)")
            if rel.endswith("_config.json"):
                try:
                    config = json.loads(z.read(name))["config"]
                except (ValueError, KeyError, TypeError):
                    raise Refused(f"the artifact's {rel} is not a payload config") from None
                for fqn, meta in config.items():
                    if not isinstance(meta, dict) or meta.get("use_pickle") is not False or \
                            not str(meta.get("path_name", "")).startswith(("weight_", "tensor_")):
                        raise Refused(f"the artifact stores {fqn} as a pickled object (only raw tensors)")


@contextlib.contextmanager
def _no_pickle():
    """While loading: torch.load may only read tensors and plain containers (weights_only), and the loader's
    other unpicklers (pickle.loads, torch's object unpickler) raise."""
    import torch

    real_load, real_loads, real_obj = torch.load, pickle.loads, torch._C._pickle_load_obj

    def weights_only_load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        return real_load(f, *args, **kwargs)

    def refuse(*_a, **_k):
        raise Refused("the artifact asks to unpickle an object")

    torch.load, pickle.loads, torch._C._pickle_load_obj = weights_only_load, refuse, refuse
    try:
        yield
    finally:
        torch.load, pickle.loads, torch._C._pickle_load_obj = real_load, real_loads, real_obj


def load_program(path: str):
    """The ExportedProgram in `path`, loaded weights-only and checked (check_archive, check_program)."""
    import torch

    check_archive(path)
    try:
        with _no_pickle():
            program = torch.export.load(path)
    except Refused:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed archive is the artifact's fault
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise Refused(f"the artifact does not load ({type(e).__name__}: {first})") from None
    check_program(program)
    return program


# ---- Scoring ----


def _logits(module, x, vocab_size: int):
    import torch

    out = module(x)
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not torch.is_tensor(out) or tuple(out.shape) != (x.shape[0], x.shape[1], vocab_size):
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ContractError(f"model returned logits of shape {shape}, expected [B, T, V] = "
                            f"{(x.shape[0], x.shape[1], vocab_size)}")
    if not out.is_floating_point():
        raise ContractError(f"model returned {out.dtype} logits, expected floating point")
    return out.float()


def score(module, tokens: np.ndarray, token_bytes: np.ndarray, *, seq_len: int, vocab_size: int, device,
          eval_tokens: int, eval_batch: int, rng: np.random.Generator) -> dict:
    """val_bpb of `module` on the first `eval_tokens` targets, with a causality check on the same windows.

    val_bpb = Σ cross-entropy (nats) ÷ (ln 2 × Σ UTF-8 bytes) over non-overlapping windows of seq_len; targets
    whose token has 0 bytes (BOS) are left out of both sums, as nanochat's evaluate_bpb does.
    Causality: max(CHECK_WINDOWS, eval_batch) windows get a twin that keeps the first k tokens (k random per
    window) and takes the rest from another scoring window; twins and originals go through the model in one random
    order, in full batches of `eval_batch`. Before k, each twin's logits (at the window's own targets and
    CHECK_IDS secret ids, and their log-sum-exp) must equal the original's within CHECK_TOLERANCE, else Refused.
    Returns {val_bpb, windows, checked, max_check_diff}. Raises ContractError on a bad output.
    """
    import torch
    import torch.nn.functional as F

    T = seq_len
    if len(tokens) < T + 1:
        raise ContractError(f"validation split has {len(tokens)} tokens, fewer than seq_len+1")
    n = max(1, min(eval_tokens, len(tokens) - 1) // T)
    windows = tokens[np.arange(n)[:, None] * T + np.arange(T + 1)].astype(np.int64)  # [n, T+1]
    m = max(CHECK_WINDOWS, eval_batch)
    checked = rng.choice(n, size=m, replace=n < m)
    cuts = rng.integers(1, T, size=m)
    donors = (checked + rng.integers(1, max(2, n), size=m)) % n
    twins = windows[checked, :T].copy()
    for j in range(m):
        twins[j, cuts[j]:] = windows[donors[j], cuts[j]:T]
    ids = rng.integers(0, vocab_size, size=(m, CHECK_IDS))
    rows = [("orig", i) for i in range(n)] + [("twin", j) for j in range(m)]
    order = rng.permutation(len(rows))
    pad = (-len(order)) % eval_batch
    order = np.concatenate([order, order[:pad]]) if pad else order
    first_of = {}  # window → (batch position in the order) of its first appearance: it is scored there
    for pos, r in enumerate(order):
        if rows[int(r)][0] == "orig":
            first_of.setdefault(rows[int(r)][1], pos)
    wanted: dict = {("twin", j): [j] for j in range(m)}  # row → the checks it takes part in
    for j, i in enumerate(checked):
        wanted.setdefault(("orig", int(i)), []).append(j)
    tb = torch.from_numpy(token_bytes.astype(np.int64)).to(device)
    prints: dict = {}
    total_nats, total_bytes = 0.0, 0
    with torch.inference_mode():
        for b in range(0, len(order), eval_batch):
            picks = [rows[int(r)] for r in order[b:b + eval_batch]]
            x = np.stack([windows[i, :T] if kind == "orig" else twins[i] for kind, i in picks])
            logits = _logits(module, torch.from_numpy(x).to(device), vocab_size)
            scored = [r for r, (kind, i) in enumerate(picks) if kind == "orig" and first_of[i] == b + r]
            if scored:
                y = torch.from_numpy(windows[[picks[r][1] for r in scored], 1:]).to(device)
                nats = F.cross_entropy(logits[scored].flatten(0, 1), y.flatten(), reduction="none")
                nbytes = tb[y.flatten()]
                total_nats += nats[nbytes > 0].double().sum().item()
                total_bytes += int(nbytes.sum().item())
            for r, key in enumerate(picks):
                for j in wanted.get(key, ()):
                    if (key[0], j) in prints:
                        continue
                    k = int(cuts[j])
                    own = torch.from_numpy(windows[checked[j], 1:k + 1]).to(device)
                    lg = logits[r, :k]
                    prints[(key[0], j)] = torch.cat([lg.gather(1, own[:, None]),
                                                     lg[:, torch.from_numpy(ids[j]).to(device)],
                                                     torch.logsumexp(lg, dim=1, keepdim=True)], dim=1).cpu()
    worst = 0.0
    for j in range(m):
        a, b_ = prints[("orig", j)], prints[("twin", j)]
        diff = ((a - b_).abs() / (1.0 + a.abs())).max().item()
        if not diff <= CHECK_TOLERANCE:
            raise Refused(f"model is not causal: changing tokens from position {int(cuts[j])} on changed its "
                          f"logits before it (by {diff:.3g}, relative)")
        worst = max(worst, diff)
    if total_bytes == 0:
        raise ContractError("validation targets hold no bytes")
    return {"val_bpb": total_nats / (math.log(2) * total_bytes), "windows": n, "checked": m,
            "max_check_diff": worst}


# ---- The process ----


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.scorer")
    ap.add_argument("--fds", type=int, required=True, help="the channel to the parent (a Unix socket)")
    ap.add_argument("--val", action="append", required=True, help="validation token shards (uint16), in order")
    ap.add_argument("--token-bytes", required=True)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    chan = Channel.from_fd(a.fds)
    import torch.export  # noqa: F401 - imported while waiting for the job: the loader's machinery loads lazily
    from torch._export.serde import serialize  # noqa: F401

    from trainer.worker import device_name, pick_device

    device = pick_device(a.device)
    tokens = np.concatenate([np.fromfile(p, dtype=np.uint16) for p in a.val])
    token_bytes = np.load(a.token_bytes)
    chan.send({"op": "ready", "device_name": device_name(device)})
    got = chan.recv()
    if got is None or got[0].get("op") != "score":
        return 0
    job = got[0]
    t = {"start": time.monotonic()}
    try:
        program = load_program(job["artifact"])
        t["loaded"] = time.monotonic()
        params = sum(program.state_dict[s.target].numel() for s in program.graph_signature.input_specs
                     if s.kind.name == "PARAMETER" and s.target in program.state_dict)
        module = program.module()
        rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))  # unknowable to the proposal
        got = score(module, tokens, token_bytes, seq_len=int(job["seq_len"]), vocab_size=int(job["vocab_size"]),
                    device=device, eval_tokens=int(job["eval_tokens"]), eval_batch=int(job["eval_batch"]), rng=rng)
        t["scored"] = time.monotonic()
        chan.send({"op": "scored", **got, "params": params, "device_name": device_name(device),
                   "load_s": round(t["loaded"] - t["start"], 3), "score_s": round(t["scored"] - t["loaded"], 3)})
    except Refused as e:
        chan.send({"op": "refused", "reason": str(e)})
    except ContractError as e:
        chan.send({"op": "crash", "reason": str(e)})
    except Exception as e:  # noqa: BLE001 - the graph raised while running (e.g. out of memory)
        chan.send({"op": "crash", "reason": f"scoring failed: {type(e).__name__}: {str(e).strip()[:200]}"})
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
