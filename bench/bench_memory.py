"""What fits on each GPU of a training run: per-rank memory under parallel='ddp' and 'fsdp' (one
JSON line).

python bench/bench_memory.py config/dit_large.py --gpus=8 --gpu_memory_gib=80 --batch_size=32

Model state is exact arithmetic on the parameter count (fp32 weights, gradients, AdamW's two
moments, EMA: 20 bytes a parameter; FSDP divides it by the shard group and adds the largest block's
bf16 weights and fp32 gradient, whole while it runs). Activations are measured on the CPU: the bytes
autograd saves for the backward in an eager bf16 forward (torch.autograd.graph.saved_tensors_hooks,
each storage once), for 1 and 2 blocks at batch 1 and 2, so that per-sample and per-block parts
separate; the config's depth and batch_size are extrapolated from them. Compiled training saves less
(inductor recomputes cheap ops in the backward), so these activations are an upper bound; not
counted: the CUDA context, cuBLAS/attention workspaces and the allocator's fragmentation (allow 3-5
GiB).
"""
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import DiT, DiTConfig  # noqa: E402

gpus = 8
shard_ranks = 0  # FSDP's shard group; 0 = gpus (one node)
gpu_memory_gib = 80.0
batch_size = 32  # per rank and micro-step
globals().update(dataclasses.asdict(DiTConfig()))
from configurator import configure  # noqa: E402
config = configure(globals())
shard_ranks = shard_ranks or gpus
GiB = 2 ** 30


def saved_bytes(cfg, batch):
    """Bytes autograd keeps for the backward of one bf16-autocast forward, parameters aside."""
    torch.manual_seed(0)
    model = DiT(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t
    L = cfg.grid_size ** 2
    x, t = torch.randn(batch, L, cfg.in_dim), torch.rand(batch)
    cond = torch.randn(batch, L, cfg.cond_dim)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast('cpu', dtype=torch.bfloat16):
        model(x, t, cond, drop_cond=torch.zeros(batch, dtype=torch.bool))
    return sum(seen.values())


cfg = DiTConfig(**{f.name: config[f.name] for f in dataclasses.fields(DiTConfig)})
with torch.device('meta'):
    full = DiT(cfg)
n_params = full.num_params()
block_params = sum(p.numel() for p in full.blocks[0].parameters())
m = {(layers, b): saved_bytes(dataclasses.replace(cfg, n_layers=layers),
                              b) for layers in (1, 2) for b in (1, 2)}
per_sample_block = (m[2, 2] - m[2, 1]) - (m[1, 2] - m[1, 1])
per_sample_root = (m[1, 2] - m[1, 1]) - per_sample_block
# batch-independent: autocast's bf16 copy of the weights
fixed_block = (m[2, 1] - m[1, 1]) - per_sample_block
activations = batch_size * (per_sample_root + cfg.n_layers * per_sample_block)
state = {'weights_fp32': 4 * n_params, 'grads_fp32': 4 * n_params, 'adamw_moments': 8 * n_params,
         'ema_fp32': 4 * n_params}
ddp = {**state, 'autocast_bf16_weight_copies': cfg.n_layers * fixed_block,
       'activations': activations}
fsdp = {**{k: v / shard_ranks for k, v in state.items()},
        'whole_block_while_it_runs': block_params * (2 + 4),
        'activations': activations}  # bf16 weights, fp32 grads
result = {'bench': 'memory', 'params': n_params, 'block_params': block_params, 'gpus': gpus,
          'shard_ranks': shard_ranks, 'batch_size': batch_size,
          'activation_mib_per_sample': round(activations / batch_size / 2 ** 20, 1),
          'activation_mib_per_sample_block': round(per_sample_block / 2 ** 20, 2)}
for name, parts in (('ddp', ddp), ('fsdp', fsdp)):
    total = sum(parts.values())
    free = gpu_memory_gib * GiB - total
    result[name] = {**{k: round(v / GiB, 2) for k, v in parts.items()},
                    'total_gib': round(total / GiB, 1), 'fits': free > 0,
                    'max_batch_size': int((gpu_memory_gib * GiB - total + activations) // (
                        activations / batch_size))}
print(json.dumps(result))
