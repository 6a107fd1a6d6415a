"""
Reference GPT-2 for benchmarks: the vanilla architecture behind the same `train(ctx)` contract
as trainer/templates/train.py, so the baseline can be compared with it at an equal time budget.

GPT-2 as in the paper and nanoGPT: learned absolute position embeddings, pre-LayerNorm blocks
with biases, GELU MLP, lm_head tied to the token embedding, AdamW with a warmup + cosine
schedule, gradient clipping at 1.0. Same size and batch tokens as the baseline's presets;
fp32 on CPU / MPS, bf16 autocast + torch.compile on CUDA, as the baseline.
It only trains and returns a model; like a proposal it touches no file, network or process.
Run it through the harness like any train.py.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- Hyperparameters ----
# Device presets carry a _CPU / _CUDA suffix; any non-CUDA device (cpu, mps) uses _CPU.

ASPECT_RATIO = 64  # width = depth * ASPECT_RATIO unless ctx.scale sets it, as the baseline
HEAD_DIM = 64  # attention head size, as GPT-2; the width must be a multiple of it
LEARNING_RATE = 0.001  # peak AdamW lr (GPT-2 small: 6e-4); best of 6e-4, 1e-3, 2e-3, 4e-3 at this size
MIN_LR_FRAC = 0.1  # the cosine decays to this fraction of the peak lr (nanoGPT: lr / 10)
WARMUP_RATIO = 0.05  # fraction of the budget spent ramping the lr up linearly
WEIGHT_DECAY = 0.1  # AdamW decay on 2-D weights (embeddings included), none on biases / norms
ADAM_BETA1 = 0.9  # AdamW beta1
ADAM_BETA2 = 0.95  # AdamW beta2
GRAD_CLIP = 1.0  # max global gradient norm
INIT_STD = 0.02  # std of the normal init; residual projections get INIT_STD / sqrt(2 * depth)

DEPTH_CPU = 4  # transformer blocks (width 256), as the baseline's CPU preset
BATCH_SIZE_CPU = 8  # sequences per step, as the baseline's CPU preset

DEPTH_CUDA = 8  # transformer blocks (width 512), as the baseline's CUDA preset
BATCH_SIZE_CUDA = 64  # sequences per micro-batch
TOTAL_BATCH_TOKENS_CUDA = 524288  # tokens per optimizer step, as the baseline's CUDA preset


# ---- GPT-2 Model ----

@dataclass
class GPTConfig:
    sequence_len: int = 256
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.sequence_len, config.n_embd)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as GPT-2

    @torch.no_grad()
    def init_weights(self):
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=INIT_STD)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # GPT-2: scale the residual projections by 1/sqrt(number of residual additions).
        for block in self.blocks:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(proj.weight, std=INIT_STD / math.sqrt(2 * self.config.n_layer))

    def forward(self, idx, targets=None):
        """idx [B, T] token ids (T <= sequence_len) -> logits [B, T, vocab], or the mean loss."""
        T = idx.size(1)
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x)).float()
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # the tied head counts once

    def estimate_flops(self):
        """Forward+backward FLOPs per token: 6 * non-embedding params + attention (nanochat)."""
        c = self.config
        n = self.num_params() - self.wpe.weight.numel()  # the tied wte is the lm_head matmul
        return 6 * n + 12 * c.n_layer * c.n_embd * c.sequence_len


# ---- Schedule and scale ----

def get_lr(progress):
    """Linear warmup, then cosine decay to MIN_LR_FRAC * LEARNING_RATE; progress in [0, 1]."""
    if progress < WARMUP_RATIO:
        return LEARNING_RATE * (progress + 1e-3) / WARMUP_RATIO
    decay = min(1.0, (progress - WARMUP_RATIO) / (1.0 - WARMUP_RATIO))
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay))
    return LEARNING_RATE * (MIN_LR_FRAC + coeff * (1.0 - MIN_LR_FRAC))


def resolve_shape(scale, depth, batch):
    """Apply ctx.scale overrides -> (depth, width, batch); ValueError on a width off HEAD_DIM."""
    depth = max(1, round(int(scale.get("depth", depth)) * float(scale.get("depth_mult", 1.0))))
    width = int(scale.get("width", depth * ASPECT_RATIO))
    if "width" in scale and width % HEAD_DIM:
        raise ValueError(f"scale width {width} is not a multiple of HEAD_DIM={HEAD_DIM}")
    width = max(1, math.ceil(width * float(scale.get("width_mult", 1.0)) / HEAD_DIM)) * HEAD_DIM
    return depth, width, max(1, int(scale.get("batch", batch)))


# ---- Training loop ----

def train(ctx):
    """Train GPT-2 on ctx.train_batches until ctx.should_stop(); return it in eval mode (fp32)."""
    on_cuda = ctx.device.type == "cuda"
    torch.manual_seed(ctx.seed)
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        depth, width, batch = resolve_shape(ctx.scale or {}, DEPTH_CUDA, BATCH_SIZE_CUDA)
        grad_accum = max(1, TOTAL_BATCH_TOKENS_CUDA // (batch * ctx.seq_len))
    else:
        depth, width, batch = resolve_shape(ctx.scale or {}, DEPTH_CPU, BATCH_SIZE_CPU)
        grad_accum = 1
    config = GPTConfig(sequence_len=ctx.seq_len, vocab_size=ctx.vocab_size,
                       n_layer=depth, n_head=width // HEAD_DIM, n_embd=width)
    model = GPT(config)
    model.init_weights()
    model.to(ctx.device)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [dict(params=decay, weight_decay=WEIGHT_DECAY), dict(params=no_decay, weight_decay=0.0)],
        lr=LEARNING_RATE, betas=(ADAM_BETA1, ADAM_BETA2), fused=on_cuda, foreach=None if on_cuda else True)
    ctx.logger.info("GPT-2 reference depth=%d width=%d params=%.2fM batch=%dx%d accum=%d device=%s",
                    depth, width, model.num_params() / 1e6, batch, ctx.seq_len, grad_accum, ctx.device)

    step_model = torch.compile(model, dynamic=False) if on_cuda else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda)
    batches = ctx.train_batches(batch)
    model.train()
    step = 0
    while not ctx.should_stop():
        lr = get_lr(ctx.progress())
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_loss = 0.0
        for _ in range(grad_accum):
            x, y = next(batches)
            with autocast:
                loss = step_model(x, y)
            (loss / grad_accum).backward()
            train_loss += loss.detach() / grad_accum
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ctx.log(step, train_loss)
        step += 1

    model.eval()
    return model
