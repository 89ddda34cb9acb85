"""The BLIP3-o diffusion head: a Lumina-Next style DiT predicting the flow velocity of CLIP tokens.

Input: noisy standardized CLIP patch tokens x [B, L, in_dim] (L = grid_size**2), time t [B] in
[0, 1], EVA patch tokens cond [B, M, cond_dim]. Output: velocity [B, L, in_dim] (flow.py).

  c    = TimestepEmbedder(t) + Linear(mean_M(EVA projected))   conditioning vector, drives adaLN
  h    = Linear(in_dim -> dim)(x)
  kv   = Linear(cond_dim -> dim)(RMSNorm(cond))                computed once, shared by all blocks
  h   += tanh(g1) * SelfAttn(RMSNorm(h) * (1 + s1))            QK-norm, axial RoPE over the grid
  h   += tanh(g2) * CrossAttn(RMSNorm(h) * (1 + s2), kv)       QK-norm, RoPE when EVA is on the grid
  h   += tanh(g3) * SwiGLU(RMSNorm(h) * (1 + s3))              (s1, g1, ..., g3) = Linear(SiLU(c))
  out  = Linear(dim -> in_dim)(LayerNorm(h) * (1 + s))         adaLN-Zero: untrained, it outputs 0
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

# SDPA backends by priority: cuDNN attention first (PyTorch tries flash before it); the CPU picks
# its kernel as before
SDPA_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                 SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class DiTConfig:
    dim: int = 1792
    n_layers: int = 24
    n_heads: int = 28
    n_kv_heads: Optional[int] = None  # None = n_heads; fewer = grouped-query attention
    in_dim: int = 1024                # CLIP ViT-L/14 token width
    cond_dim: int = 4096              # EVA-CLIP-8B token width
    grid_size: int = 16               # 16 x 16 = 256 tokens
    ffn_multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    qk_norm: bool = True
    rope_theta: float = 10000.0
    grad_checkpointing: bool = False
    cross_rope: bool = True           # EVA tokens lie on the same grid: RoPE in cross-attention too
    # time features sin/cos(t_scale * t * freqs): 1000 = DiT's and the seed's; 1 (Lumina-Next's,
    # SiT's) makes samplers converge at their order, learns slower
    t_scale: float = 1000.0

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def kv_heads(self):
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden(self):
        """SwiGLU width, Llama/Lumina-Next: 2/3 of 4*dim, times the multiplier, rounded up."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.ffn_multiple_of * math.ceil(hidden / self.ffn_multiple_of)


def grid_positions(grid_size, n_axes=2):
    """Integer coordinates [grid_size**n_axes, n_axes] of a row-major grid."""
    axes = [torch.arange(grid_size)] * n_axes
    return torch.stack(torch.meshgrid(*axes, indexing='ij'), dim=-1).reshape(-1, n_axes)


def rope_tables(positions, head_dim, theta=10000.0):
    """cos/sin tables [L, head_dim] for axial RoPE: each axis rotates head_dim/n_axes channels.

    Pair-repeated form: channels 2i and 2i+1 share angle i, and sin carries the sign of the
    rotation, so that rope(x) = x * cos + swap_pairs(x) * sin: three passes over x, in its dtype.
    """
    n_axes = positions.shape[-1]
    if head_dim % (2 * n_axes):
        raise ValueError(f"head_dim {head_dim} must be divisible by 2 * n_axes = {2 * n_axes} "
                         "for axial RoPE")
    axis_dim = head_dim // n_axes
    freqs = theta ** (-torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)  # [axis_dim/2]
    angles = torch.cat([positions[:, a, None].double() * freqs for a in range(n_axes)], dim=-1)
    cos, sin = angles.cos(), angles.sin()
    return (cos.repeat_interleave(2, dim=-1).float(),
            torch.stack([-sin, sin], dim=-1).flatten(-2).float())


def swap_pairs(x):
    """(x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...) on the last dim: each channel's RoPE partner.

    A stack of the two strided halves: twice as fast as flip on the CPU.
    """
    x = x.unflatten(-1, (-1, 2))
    return torch.stack([x[..., 1], x[..., 0]], dim=-1).flatten(-2)


class _Rope(torch.autograd.Function):
    """x * cos + swap_pairs(x) * sin. Its backward is the inverse rotation (sin -> -sin): three
    passes, no graph."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return torch.addcmul(x * cos, swap_pairs(x), sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return torch.addcmul(grad * cos, swap_pairs(grad), -sin), None, None


def apply_rope(x, cos, sin):
    """Rotate channel pairs (2i, 2i+1) of x [..., L, D] by rope_tables' [L, D], in x's dtype."""
    return _Rope.apply(x, cos.to(x.dtype), sin.to(x.dtype))


class _RMSNormFn(torch.autograd.Function):
    """x / rms(x) over the last dim: fp32 statistics, passes over x in its dtype, backward by hand.

    torch's CPU rms_norm is a composite of mixed-dtype passes: under bf16 it took 5x as long.
    """

    @staticmethod
    def forward(ctx, x, eps):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True,
                                        dtype=torch.promote_types(x.dtype, torch.float32))
        r = torch.rsqrt(norm.square() / x.shape[-1] + eps).to(x.dtype)
        y = x * r
        ctx.save_for_backward(y, r)  # the backward needs y, not x
        return y

    @staticmethod
    def backward(ctx, grad):
        y, r = ctx.saved_tensors
        # dy/dx: r * (grad - y * mean(grad * y))
        dot = torch.linalg.vecdot(grad, y).unsqueeze(-1) / y.shape[-1]
        return torch.addcmul(grad, y, -dot) * r, None


class RMSNorm(nn.RMSNorm):
    """RMSNorm in the input's dtype; `scale` [B, 1, dim] gives RMSNorm(x) * (1 + scale), weight and
    scale in one pass."""

    def forward(self, x, scale=None):
        weight = self.weight if scale is None else self.weight * (1 + scale)
        return _RMSNormFn.apply(x, self.eps) * weight.to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention with QK-norm; self-attention (with RoPE) when kv is None,
    cross-attention to kv otherwise."""

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wkv = nn.Linear(cfg.dim, 2 * cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        norm = (lambda: RMSNorm(cfg.head_dim, eps=cfg.norm_eps)) if cfg.qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()

    def forward(self, x, kv=None, rope=None):
        H, KV, D = self.n_heads, self.kv_heads, self.head_dim
        if kv is None:  # self-attention: q, k and v from one matmul
            qkv = F.linear(x, torch.cat([self.wq.weight, self.wkv.weight]).to(x.dtype))
            q, k, v = qkv.unflatten(-1, (-1, D)).split([H, KV, KV], dim=2)
            k, v = self.keys(k, v, rope)
        else:
            q, (k, v) = self.wq(x).unflatten(-1, (H, D)), self.cross_keys(kv, rope)
        return self.attend(q, k, v, rope)

    def keys(self, k, v, rope):
        """k, v [B, M, KV, D] -> k_norm-ed, rotated k and v, as [B, KV, M, D] for SDPA."""
        k = self.k_norm(k)
        if rope is not None:  # before the transpose, on the projection's own [B, M, KV, D] layout
            k = apply_rope(k, *rope)
        return k.transpose(1, 2), v.transpose(1, 2)

    def cross_keys(self, kv, rope):
        """Cross-attention k, v [B, KV, M, D] of the projected EVA tokens kv [B, M, dim]."""
        # k and v from the two halves of the weight: contiguous outputs, no stack of their gradients
        wk, wv = self.wkv.weight.to(kv.dtype).chunk(2)
        kv_shape = (self.kv_heads, self.head_dim)
        return self.keys(F.linear(kv, wk).unflatten(-1, kv_shape),
                         F.linear(kv, wv).unflatten(-1, kv_shape), rope)

    def attend(self, q, k, v, rope):
        """wo(SDPA) of raw queries q [B, L, H, D] (q_norm-ed, rotated here), k, v [B, KV, M, D]."""
        q = self.q_norm(q)
        if rope is not None:
            q = apply_rope(q, *rope)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v,
                                             enable_gqa=self.kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).flatten(2))

    def cached(self, x, rope, k, v, null_out, keep):
        """Cross-attention of x [B, L, dim] to encode_cond's k, v for rows `keep`, else null_out."""
        q = self.wq(x if keep is None else x[keep]).unflatten(-1, (self.n_heads, self.head_dim))
        out = self.attend(q, k, v, rope)
        if keep is None:
            return out
        return null_out.to(out.dtype).expand(len(x), *out.shape[1:]).index_copy(0, keep, out)

    def constant_out(self, kv):
        """Cross-attention output [dim] when every EVA token projects to kv [dim]: the softmax
        weights sum to 1, so each head returns its v whatever the queries, k_norm and RoPE."""
        v = F.linear(kv, self.wkv.weight.to(kv.dtype).chunk(2)[1])
        v = v.view(self.kv_heads, self.head_dim)  # then SDPA's GQA grouping
        return self.wo(v.repeat_interleave(self.n_heads // self.kv_heads, dim=0).flatten())


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)  # gate and up projections in one weight
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        # two matmuls from halves of the weight: contiguous outputs make silu, the product and the
        # backward 2x cheaper
        w1, w3 = self.w13.weight.to(x.dtype).chunk(2)
        return self.w2(F.silu(F.linear(x, w1)) * F.linear(x, w3))


class Block(nn.Module):
    """Self-attention, cross-attention to EVA, feed-forward; each pre-normed, adaLN-modulated."""

    def __init__(self, cfg):
        super().__init__()
        self.self_attn, self.cross_attn = Attention(cfg), Attention(cfg)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_hidden)
        self.norm1, self.norm2, self.norm3 = (RMSNorm(cfg.dim, eps=cfg.norm_eps) for _ in range(3))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))

    def forward(self, x, kv, c, rope, cross_rope, cached=None):
        """cached: this block's entry of CondCache.blocks, which replaces kv."""
        # here, not in DiT.forward: gradient checkpointing's recomputation in the backward must pick
        # the same kernels
        with sdpa_kernel(SDPA_PRIORITY, set_priority=True):
            s1, g1, s2, g2, s3, g3 = self.adaLN(c).unsqueeze(1).chunk(6, dim=-1)
            h = self.norm1(x, s1)
            # x + tanh(g1) * attn in one pass
            x = torch.addcmul(x, g1.tanh(), self.self_attn(h, rope=rope))
            h = self.norm2(x, s2)
            if cached is None:
                cross = self.cross_attn(h, kv, cross_rope)
            else:
                cross = self.cross_attn.cached(h, cross_rope, *cached)
            x = torch.addcmul(x, g2.tanh(), cross)
            return torch.addcmul(x, g3.tanh(), self.ffn(self.norm3(x, s3)))


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t_scale * t -> MLP."""

    def __init__(self, dim, freq_dim=256, t_scale=1000.0):
        super().__init__()
        self.freq_dim, self.t_scale = freq_dim, t_scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq_dim // 2
        steps = torch.arange(half, device=t.device, dtype=torch.float32)
        freqs = torch.exp(-math.log(10000.0) * steps / half)
        angles = self.t_scale * t.float()[:, None] * freqs
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1))


@dataclass
class CondCache:
    """DiT.encode_cond's result: the condition's share of DiT.forward, reused each step."""
    # [B, dim] pool_embed of the mean projected EVA token; a dropped row's is the null token's
    pooled: torch.Tensor
    # per block: cross-attention k, v [kept rows, kv_heads, M, head_dim] (k_norm-ed, rotated), the
    # dropped rows' cross-attention output [dim], the kept rows' indices (None: all kept)
    blocks: list


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.dim % cfg.n_heads or cfg.n_heads % cfg.kv_heads:
            raise ValueError(f"dim {cfg.dim} must divide by n_heads {cfg.n_heads}, "
                             f"and n_heads by n_kv_heads {cfg.kv_heads}")
        self.cfg = cfg
        self.x_embed = nn.Linear(cfg.in_dim, cfg.dim)
        self.t_embed = TimestepEmbedder(cfg.dim, t_scale=cfg.t_scale)
        self.cond_norm = RMSNorm(cfg.cond_dim, eps=cfg.norm_eps)
        self.cond_proj = nn.Linear(cfg.cond_dim, cfg.dim)
        self.pool_embed = nn.Linear(cfg.dim, cfg.dim)
        # the condition of a dropped sample (classifier-free guidance): one learned raw EVA token
        self.null_cond = nn.Parameter(torch.randn(cfg.cond_dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.final_proj = nn.Linear(cfg.dim, cfg.in_dim)
        cos, sin = rope_tables(grid_positions(cfg.grid_size), cfg.head_dim, cfg.rope_theta)
        self.register_buffer('rope_cos', cos, persistent=False)
        self.register_buffer('rope_sin', sin, persistent=False)
        self.init_weights()

    def init_weights(self):
        """Xavier for linears, then adaLN-Zero: modulations and the final projection start at 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for linear in [b.adaLN[-1] for b in self.blocks] + [self.final_adaLN[-1], self.final_proj]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def check_inputs(self, caller, B, **tensors):
        """Raise ValueError naming the first given tensor (x, t, cond, drop_cond) not fit for B."""
        cfg, L = self.cfg, self.cfg.grid_size ** 2
        # with cross_rope the EVA tokens must lie on the model's grid; otherwise any count M works
        shapes = dict(x=(B, L, cfg.in_dim), t=(B,),
                      cond=(B, L if cfg.cross_rope else 'M', cfg.cond_dim), drop_cond=(B,))
        for name, tensor in tensors.items():
            shape = shapes[name]
            if tensor is None:
                continue
            if len(tensor.shape) != len(shape) or \
                    any(s != 'M' and s != n for s, n in zip(shape, tensor.shape)):
                raise ValueError(f"DiT.{caller}: {name} should have shape "
                                 f"[{', '.join(map(str, shape))}], got {list(tensor.shape)}")

    def forward(self, x, t, cond=None, drop_cond=None, cond_cache=None):
        """Velocity [B, L, in_dim] for noisy tokens x [B, L, in_dim] at times t [B] given EVA tokens
        cond [B, M, cond_dim], or (sampling) given cond_cache = encode_cond(cond, drop_cond)."""
        if (cond is None) == (cond_cache is None) or \
                (cond_cache is not None and drop_cond is not None):
            raise ValueError("DiT.forward takes either cond (and drop_cond) or cond_cache")
        B = x.shape[0] if cond_cache is None else cond_cache.pooled.shape[0]
        self.check_inputs('forward', B, x=x, t=t, cond=cond, drop_cond=drop_cond)
        pooled = None if cond_cache is None else cond_cache.pooled
        cached = [None] * len(self.blocks) if cond_cache is None else cond_cache.blocks
        h, kv, c, rope, cross_rope = self.embed(x, t, cond, drop_cond, pooled)
        for block, cache in zip(self.blocks, cached):
            if self.cfg.grad_checkpointing and self.training:
                h = checkpoint(block, h, kv, c, rope, cross_rope, cache, use_reentrant=False)
            else:
                h = block(h, kv, c, rope, cross_rope, cache)
        return self.final(h, c)

    def embed(self, x, t, cond, drop_cond, pooled=None):
        """The blocks' inputs: tokens h, projected EVA tokens kv, conditioning vector c, RoPE
        tables. Given the pooled term of a CondCache, cond is not read and kv is None."""
        kv = None
        if pooled is None:
            kv = self.project_cond(cond, drop_cond)
            pooled = self.pool_embed(kv.mean(dim=1))
        c = self.t_embed(t) + pooled
        h = self.x_embed(x)
        # [L, 1, head_dim] in the compute dtype, cast once for all blocks: broadcast over heads
        rope = (self.rope_cos[:, None].to(h.dtype), self.rope_sin[:, None].to(h.dtype))
        return h, kv, c, rope, rope if self.cfg.cross_rope else None

    def project_cond(self, cond, drop_cond=None):
        """EVA tokens cond [B, M, cond_dim] -> kv [B, M, dim]; rows drop_cond [B] take null_cond."""
        if drop_cond is not None:
            cond = torch.where(drop_cond[:, None, None], self.null_cond.to(cond.dtype), cond)
        return self.cond_proj(self.cond_norm(cond))

    def encode_cond(self, cond, drop_cond=None):
        """forward's cond_cache for EVA tokens cond [B, M, cond_dim]: the pooled term and every
        block's cross-attention k, v, once per batch. A dropped row (drop_cond [B]) sees M copies of
        null_cond: its cross-attention output is one vector a layer, and its pooled term one vector,
        so it needs no k, v and no attention."""
        self.check_inputs('encode_cond', cond.shape[0], cond=cond, drop_cond=drop_cond)
        keep = None if drop_cond is None else (~drop_cond).nonzero().squeeze(1)
        kv = self.project_cond(cond if keep is None else cond[keep])
        pooled = self.pool_embed(kv.mean(dim=1))
        null_kv = self.project_cond(self.null_cond.to(cond.dtype))  # [dim]
        if keep is not None:
            pooled = self.pool_embed(null_kv).expand(cond.shape[0], -1).index_copy(0, keep, pooled)
        rope = (self.rope_cos[:, None], self.rope_sin[:, None]) if self.cfg.cross_rope else None
        blocks = [(*b.cross_attn.cross_keys(kv, rope), b.cross_attn.constant_out(null_kv), keep)
                  for b in self.blocks]
        return CondCache(pooled, blocks)

    def final(self, h, c):
        scale = self.final_adaLN(c).unsqueeze(1)
        return self.final_proj(self.final_norm(h) * (1 + scale))

    def compile_blocks(self, **compile_kwargs):
        """Regional compilation: torch.compile each Block in place, and embed and final; returns
        self.

        The blocks are one code object with the same shapes, so dynamo compiles the first and reuses
        that graph for the others (their parameters are graph inputs): compile time does not grow
        with depth as it does for torch.compile(model), and the state dict keeps its keys (no
        `_orig_mod.` prefix). embed and final are compiled too (two small graphs): left eager, their
        ops cost a few % of a small model's compiled step.
        """
        # static shapes: one new batch size (train.py's last validation batch) would otherwise make
        # every later graph dynamic in the batch, the training step's too; a static graph per shape
        # keeps the kernels specialized
        compile_kwargs = {'dynamic': False, **compile_kwargs}
        for block in self.blocks:
            block.compile(**compile_kwargs)
        self.embed = torch.compile(self.embed, **compile_kwargs)
        self.final = torch.compile(self.final, **compile_kwargs)
        return self

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def flops_per_sample(self, cond_tokens=None):
        """Analytic forward FLOPs for one sample (2 per multiply-add; matmuls and attention only).

        Per-token matmuls count once per token, the adaLN / timestep MLPs once per sample.
        A training step (forward + backward) costs 3x this.
        """
        cfg = self.cfg
        L, M, D, hd = cfg.grid_size ** 2, cond_tokens or cfg.grid_size ** 2, cfg.dim, cfg.head_dim
        kv_width = cfg.kv_heads * hd
        per_sample = 2 * (256 * D + D * D) + 2 * D * D + 2 * D * D  # t MLP, pool_embed, final adaLN
        # embed, cond, out
        tokens = 2 * L * cfg.in_dim * D + 2 * M * cfg.cond_dim * D + 2 * L * D * cfg.in_dim
        block = (2 * D * 6 * D                                    # adaLN (per sample)
                 + 2 * L * D * (D + 2 * kv_width) + 2 * L * D * D  # self-attn qkv + out
                 + 4 * L * L * D                                   # self-attn scores and values
                 + 2 * L * D * D + 2 * M * D * 2 * kv_width + 2 * L * D * D  # cross-attn q, kv, out
                 + 4 * L * M * D                                   # cross-attn scores and values
                 + 2 * L * D * 3 * cfg.ffn_hidden)                 # SwiGLU
        return per_sample + tokens + cfg.n_layers * block

    def flops_skipped_per_sample(self, cond_tokens=None, dropped=False):
        """The share of flops_per_sample that forward skips given a cond_cache: the EVA projection,
        pool_embed and the cross-attention k, v (encode_cond's, once per batch); for a dropped row
        its whole cross-attention too."""
        cfg = self.cfg
        L, M, D = cfg.grid_size ** 2, cond_tokens or cfg.grid_size ** 2, cfg.dim
        encoded = (2 * M * cfg.cond_dim * D + 2 * D * D
                   + cfg.n_layers * 2 * M * D * 2 * cfg.kv_heads * cfg.head_dim)
        # q, scores and values, out
        cross = cfg.n_layers * (2 * L * D * D + 4 * L * M * D + 2 * L * D * D)
        return encoded + (cross if dropped else 0)
