"""
Ratchet baseline: a small modern GPT trained for a fixed wall-clock budget.

The harness (trainer/) imports this file and calls `train(ctx)`; it owns the data, the
clock and the score (val_bpb), so this file only builds a model, trains it until
`ctx.should_stop()` and returns it. Proposals edit this file and nothing else: no file,
network or process access. Lineage: karpathy/nanochat and karpathy/autoresearch (RoPE,
QK-norm, ReLU^2 MLP, untied head, logit softcap, Muon for hidden matrices on CUDA).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- Hyperparameters ----
# Plain literals only: the offline proposer rewrites these with `ast`.
# Device presets carry a _CPU / _CUDA suffix; any non-CUDA device (cpu, mps) uses _CPU.

# Model shape
ASPECT_RATIO = 64  # model_dim = depth * ASPECT_RATIO (rounded up to HEAD_DIM), as in autoresearch
HEAD_DIM = 128  # attention head size; the model width must be a multiple of it
MLP_RATIO = 4  # MLP hidden width = MLP_RATIO * model_dim
SOFTCAP = 15.0  # logits = SOFTCAP * tanh(logits / SOFTCAP) keeps early logits bounded
ROPE_BASE = 10000.0  # rotary base frequency

# Optimisation, shared by both devices
EMBEDDING_LR = 0.6  # AdamW lr of the token embedding (before the model_dim scaling)
UNEMBEDDING_LR = 0.004  # AdamW lr of lm_head (before the model_dim scaling)
WEIGHT_DECAY = 0.2  # decoupled decay of the hidden matrices only (lr * WEIGHT_DECAY per step)
ADAM_BETA1 = 0.8  # AdamW beta1
ADAM_BETA2 = 0.95  # AdamW beta2
WARMUP_RATIO = 0.0  # fraction of the budget spent ramping the lr up from 0
WARMDOWN_RATIO = 0.5  # fraction of the budget spent decaying the lr linearly at the end
FINAL_LR_FRAC = 0.1  # lr multiplier reached at the end of the warmdown

# CPU preset: fp32, AdamW for everything, no torch.compile (compiling would eat the budget)
DEPTH_CPU = 4  # transformer blocks
BATCH_SIZE_CPU = 8  # sequences per micro-batch
TOTAL_BATCH_TOKENS_CPU = 0  # tokens per optimizer step; 0 = one micro-batch (nothing to gain from accumulating)
MATRIX_LR_CPU = 0.002  # AdamW lr of the hidden matrices (Adam needs a far smaller lr than Muon)

# CUDA preset (sized for one H100): bf16 autocast, torch.compile, Muon + AdamW
DEPTH_CUDA = 8  # transformer blocks
BATCH_SIZE_CUDA = 64  # sequences per micro-batch (x 2048 tokens)
TOTAL_BATCH_TOKENS_CUDA = 524288  # 2**19 tokens per optimizer step (gradient accumulation), as autoresearch
MATRIX_LR_CUDA = 0.04  # Muon lr of the hidden matrices
MUON_MOMENTUM_CUDA = 0.95  # Muon's Nesterov momentum
COMPILE_CUDA = True  # torch.compile the model; the first (uncounted) steps pay for it


# ---- GPT Model ----

@dataclass
class GPTConfig:
    sequence_len: int = 256
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 2
    n_embd: int = 256


def norm(x):
    # Parameter-free RMSNorm: nothing to tune, nothing to decay.
    return F.rms_norm(x, (x.size(-1),))


def rotary_cos_sin(seq_len, head_dim, base, device=None):
    """cos, sin of shape [1, seq_len, 1, head_dim // 2] for rotary embeddings (RoFormer)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]


def apply_rotary_emb(x, cos, sin):
    """Rotate the two halves of x [B, T, H, D] by the per-position angles in cos/sin."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
        # QK-norm after rotary bounds the attention logits without a learned temperature.
        q = norm(apply_rotary_emb(q, cos, sin)).to(v.dtype)
        k = norm(apply_rotary_emb(k, cos, sin)).to(v.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # SDPA picks the flash kernel for bf16 on CUDA and falls back for fp32 evaluation.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, MLP_RATIO * config.n_embd, bias=False)
        self.c_proj = nn.Linear(MLP_RATIO * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin):
        x = x + self.attn(norm(x), cos, sin)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        cos, sin = rotary_cos_sin(config.sequence_len, config.n_embd // config.n_head, ROPE_BASE)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self):
        # nanochat init: unit-variance embedding, tiny head, zero output projections so
        # every block starts as the identity and the residual stream grows from there.
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        bound = 3**0.5 * self.config.n_embd**-0.5  # uniform with std 1/sqrt(n_embd)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)

    def forward(self, idx, targets=None):
        """idx [B, T] token ids -> logits [B, T, vocab] (fp32), or the mean loss if targets given."""
        T = idx.size(1)
        if T <= self.cos.size(1):
            cos, sin = self.cos[:, :T], self.sin[:, :T]
        else:  # longer than trained: extend the table rather than fail
            cos, sin = rotary_cos_sin(T, self.cos.size(-1) * 2, ROPE_BASE, idx.device)
        x = norm(self.wte(idx))
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(norm(x)).float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self):
        """Forward+backward FLOPs per token: 6 * non-embedding params + attention (nanochat)."""
        c = self.config
        n = self.num_params() - self.wte.weight.numel()
        head_dim = c.n_embd // c.n_head
        return 6 * n + 12 * c.n_layer * c.n_head * head_dim * c.sequence_len


# ---- Optimizer ----

def build_optimizers(model, on_cuda, matrix_lr):
    """Muon (CUDA) or AdamW (elsewhere) for the block matrices, AdamW for embedding and head."""
    width_scale = (model.config.n_embd / 768) ** -0.5  # nanochat: lr ~ 1/sqrt(d_model) for AdamW
    matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    special = {id(p) for p in matrices} | {id(model.wte.weight), id(model.lm_head.weight)}
    others = [p for p in model.parameters() if id(p) not in special]
    adam_groups = [
        dict(params=[model.wte.weight], lr=EMBEDDING_LR * width_scale, weight_decay=0.0),
        dict(params=[model.lm_head.weight], lr=UNEMBEDDING_LR * width_scale, weight_decay=0.0),
    ]
    if others:
        # The baseline has none; gains or scalars a proposal adds train like the embedding.
        adam_groups.append(dict(params=others, lr=EMBEDDING_LR * width_scale, weight_decay=0.0))
    adam_kw = dict(betas=(ADAM_BETA1, ADAM_BETA2), eps=1e-10)
    if on_cuda:
        adam = torch.optim.AdamW(adam_groups, fused=True, **adam_kw)
        # torch's Muon scales the lr by sqrt(max(1, rows/cols)), as Keller Jordan's original.
        muon = torch.optim.Muon(matrices, lr=matrix_lr, weight_decay=WEIGHT_DECAY,
                                momentum=MUON_MOMENTUM_CUDA, nesterov=True)
        optimizers = [adam, muon]
    else:
        adam_groups.append(dict(params=matrices, lr=matrix_lr, weight_decay=WEIGHT_DECAY))
        optimizers = [torch.optim.AdamW(adam_groups, foreach=True, **adam_kw)]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def get_lr_multiplier(progress):
    """Warmup, constant, then linear warmdown to FINAL_LR_FRAC; progress in [0, 1]."""
    if progress < WARMUP_RATIO:
        return (progress + 1e-3) / WARMUP_RATIO
    if progress <= 1.0 - WARMDOWN_RATIO:
        return 1.0
    frac = (1.0 - progress) / WARMDOWN_RATIO
    return frac + (1.0 - frac) * FINAL_LR_FRAC


# ---- Scale ----

def resolve_shape(scale, depth, batch):
    """Apply ctx.scale overrides -> (depth, width, batch); ValueError on a width off HEAD_DIM."""
    depth = int(scale.get("depth", depth))
    depth = max(1, round(depth * float(scale.get("depth_mult", 1.0))))
    if "width" in scale:
        width = int(scale["width"])
        if width % HEAD_DIM:
            raise ValueError(f"scale width {width} is not a multiple of HEAD_DIM={HEAD_DIM}")
    else:
        width = depth * ASPECT_RATIO
    width = max(1, math.ceil(width * float(scale.get("width_mult", 1.0)) / HEAD_DIM)) * HEAD_DIM
    batch = max(1, int(scale.get("batch", batch)))
    return depth, width, batch


# ---- Training loop ----

def train(ctx):
    """Train a GPT on ctx.train_batches until ctx.should_stop(); return it (eval mode, fp32)."""
    on_cuda = ctx.device.type == "cuda"
    torch.manual_seed(ctx.seed)  # seeds every device
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls left outside autocast use TF32

    depth, width, batch = resolve_shape(
        ctx.scale or {}, DEPTH_CUDA if on_cuda else DEPTH_CPU, BATCH_SIZE_CUDA if on_cuda else BATCH_SIZE_CPU)
    total_tokens = TOTAL_BATCH_TOKENS_CUDA if on_cuda else TOTAL_BATCH_TOKENS_CPU
    grad_accum = max(1, total_tokens // (batch * ctx.seq_len))
    config = GPTConfig(sequence_len=ctx.seq_len, vocab_size=ctx.vocab_size,
                       n_layer=depth, n_head=width // HEAD_DIM, n_embd=width)

    model = GPT(config)
    model.init_weights()  # on the CPU, so a seed gives the same weights on every device
    model.to(ctx.device)
    optimizers = build_optimizers(model, on_cuda, MATRIX_LR_CUDA if on_cuda else MATRIX_LR_CPU)
    ctx.logger.info(
        "GPT depth=%d width=%d heads=%d params=%.2fM flops/token=%.3g batch=%dx%d accum=%d device=%s",
        depth, width, config.n_head, model.num_params() / 1e6, model.estimate_flops(),
        batch, ctx.seq_len, grad_accum, ctx.device)

    # Several ranks (a multi-GPU scale): gradients are averaged across them; one rank is one device.
    step_model = ctx.data_parallel(model)
    # bf16 autocast is for CUDA only: fp32 matmuls are far faster than bf16 on most CPUs.
    step_model = torch.compile(step_model, dynamic=False) if on_cuda and COMPILE_CUDA else step_model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda)
    batches = ctx.train_batches(batch)

    model.train()
    step = 0
    while not ctx.should_stop():
        lr_mult = get_lr_multiplier(ctx.progress())
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr_mult
        train_loss = 0.0
        for _ in range(grad_accum):
            x, y = next(batches)
            with autocast:
                loss = step_model(x, y)
            (loss / grad_accum).backward()
            train_loss += loss.detach() / grad_accum
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        ctx.log(step, train_loss)  # raises on NaN/inf: let it fail fast
        step += 1

    model.eval()
    return model
