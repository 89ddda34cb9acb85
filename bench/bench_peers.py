"""Training-step throughput of our DiT next to its peers at one configuration (one JSON line).

Peers, each when importable: diffusers' `LuminaNextDiT2DModel` (pip package) and the seed's
`BLIP3oDiTModel` (github.com/Hafeezmhk7/eva-clip-v6 at commit 3cc389b), from a local checkout named
by `seed_repo` (skipped when empty or absent; the seed also needs `transformers`). Every model gets
the same width, depth, heads, CLIP tokens and widths, EVA tokens and width. A step is forward +
backward + fused AdamW under autocast, eager. The models alternate step by step over `rounds`, so
the load of a shared machine hits all alike; medians over all timed steps of wall time and of
process CPU time (steadier than wall time on a busy machine, where other jobs take the cores).

python bench/bench_peers.py
python bench/bench_peers.py --seed_repo=/path/to/eva-clip-v6 --rounds=7
"""
import contextlib
import importlib
import io
import json
import os
import statistics
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_model import backward_step, random_inputs, seconds_per_call  # noqa: E402
from model import DiT, DiTConfig  # noqa: E402
from runtime import autocast  # noqa: E402

# -----------------------------------------------------------------------------
# every model gets this width, depth, heads, token grid and token widths
dim = 256
n_layers = 4
n_heads = 4
in_dim = 64        # CLIP token width
cond_dim = 128     # EVA token width
grid_size = 16     # 16 x 16 = 256 CLIP tokens and 256 EVA tokens
batch_size = 8
# ours as configured; False with cross_rope=False is the seed's feature set (it has neither)
qk_norm = True
cross_rope = True
dtype = 'bfloat16'  # autocast dtype; weights stay fp32 as in training
seed_repo = ''      # local checkout of Hafeezmhk7/eva-clip-v6 (commit 3cc389b); '' skips the seed
rounds = 10         # each round runs `steps` timed steps of every model in turn
steps = 1
warmup_steps = 2
threads = 0         # torch CPU threads; 0 = torch's default (one per core)
device = 'cpu'
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())
# -----------------------------------------------------------------------------
L = grid_size ** 2


def ours(x, t, cond):
    model = DiT(DiTConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, in_dim=in_dim,
                          cond_dim=cond_dim,
                          grid_size=grid_size, qk_norm=qk_norm, cross_rope=cross_rope))
    return model, lambda: model(x, t, cond)


def diffusers_lumina(x, t, cond):
    """Lumina-Next as diffusers ships it: patch size 1 over the grid, EVA tokens straight into
    cross-attention."""
    from diffusers import LuminaNextDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina
    model = LuminaNextDiT2DModel(sample_size=grid_size, patch_size=1, in_channels=in_dim,
                                 hidden_size=dim, num_layers=n_layers, num_attention_heads=n_heads,
                                 num_kv_heads=n_heads,
                                 learn_sigma=False, qk_norm=True, cross_attention_dim=cond_dim)
    # tokens -> [B, C, H, W]
    image = x.transpose(1, 2).reshape(len(x), in_dim, grid_size, grid_size)
    mask = torch.ones(len(x), cond.shape[1], dtype=torch.int32, device=x.device)
    rope = get_2d_rotary_pos_embed_lumina(dim // n_heads, grid_size, grid_size)
    return model, lambda: model(image, t, cond, mask, rope, cross_attention_kwargs={},
                                return_dict=False)[0]


def seed_blip3o(x, t, cond):
    """The seed's model, from its checkout without its package __init__s (their trainer)."""
    for name in ('src', 'src.modules', 'src.modules.config', 'src.modules.models'):
        package = types.ModuleType(name)
        package.__path__ = [os.path.join(seed_repo, *name.split('.'))]
        sys.modules.setdefault(name, package)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints at construction
        cfg = importlib.import_module('src.modules.config.blip3o_config').BLIP3oDiTConfig(
            input_size=grid_size, in_channels=in_dim, dim=dim, eva_embedding_size=cond_dim,
            n_layers=n_layers, n_heads=n_heads, _gradient_checkpointing=False)
        model = importlib.import_module('src.modules.models.blip3o_dit').BLIP3oDiTModel(cfg)
    return model, lambda: model(x, t, cond, return_dict=False)


def build(name, fn, x, t, cond):
    """(model, forward closure, optimizer), or the reason the peer is missing."""
    if name == 'seed' and not (seed_repo and os.path.isdir(seed_repo)):
        return 'seed_repo not given or not a folder'
    try:
        torch.manual_seed(0)
        model, forward = fn(x, t, cond)
    except ImportError as e:
        return f'not importable: {e}'
    model.to(device).train()
    return model, forward, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def loadavg():
    with contextlib.suppress(OSError), open('/proc/loadavg') as f:
        return float(f.read().split()[0])


if __name__ == '__main__':
    if threads:
        torch.set_num_threads(threads)
    ctx = autocast(device, dtype)
    x, t, cond = random_inputs(DiTConfig(in_dim=in_dim, cond_dim=cond_dim, grid_size=grid_size),
                               batch_size, device)
    models, skipped = {}, {}
    for name, fn in (('ours', ours), ('diffusers', diffusers_lumina), ('seed', seed_blip3o)):
        built = build(name, fn, x, t, cond)
        if isinstance(built, str):
            skipped[name] = built
        else:
            model, forward, optimizer = models[name] = built
            seconds_per_call(lambda: backward_step(model, forward, ctx, optimizer),
                             warmup_steps, device)
    load_start = loadavg()
    times, cpu_times = {name: [] for name in models}, {name: [] for name in models}
    for _ in range(rounds):
        for name, (model, forward, optimizer) in models.items():
            cpu_start = time.process_time()
            times[name].append(seconds_per_call(
                lambda: backward_step(model, forward, ctx, optimizer), steps, device))
            cpu_times[name].append((time.process_time() - cpu_start) / steps)
    seconds = {name: statistics.median(ts) for name, ts in times.items()}
    cpu_seconds = {name: statistics.median(ts) for name, ts in cpu_times.items()}
    print(json.dumps({
        'bench': 'peers',
        'device': f'cpu ({torch.get_num_threads()} threads)' if device == 'cpu' else device,
        'load_start': load_start, 'load_end': loadavg(), 'dim': dim, 'n_layers': n_layers,
        'n_heads': n_heads,
        'clip_tokens': [L, in_dim], 'eva_tokens': [L, cond_dim], 'batch_size': batch_size,
        'dtype': dtype, 'ours_qk_norm': qk_norm, 'ours_cross_rope': cross_rope,
        'timed_steps': rounds * steps,
        'models': {name: {'params': sum(p.numel() for p in built[0].parameters()),
                          'ms_per_step': round(1000 * seconds[name], 2),
                          'cpu_ms_per_step': round(1000 * cpu_seconds[name], 2),
                          'tokens_per_s': round(batch_size * L / seconds[name],
                                                1)} for name, built in models.items()},
        'ours_speedup': {name: round(seconds[name] / seconds['ours'],
                                     3) for name in models if name != 'ours'},
        'ours_speedup_cpu': {name: round(cpu_seconds[name] / cpu_seconds['ours'],
                                         3) for name in models if name != 'ours'},
        'skipped': skipped}))
