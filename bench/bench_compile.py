"""Compiled step, regional (DiT.compile_blocks()) vs whole model (torch.compile(model)), eager for reference.

One process builds the three from the same weights, compiles them (first steps, untimed), then alternates their
forward + backward steps over `rounds`, so the load of a shared machine hits all alike, and prints the medians
(one JSON line). Compile time: bench_model.py, one cold process per mode and depth (see bench/RESULTS.md).

python bench/bench_compile.py config/demo.py
python bench/bench_compile.py config/demo.py --rounds=20 --batch_size=32
"""
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure  # noqa: E402
from model import DiT, DiTConfig  # noqa: E402

# bench settings, then every DiTConfig field as a setting
batch_size = 8
dtype = 'bfloat16'  # 'bfloat16' | 'float16' | 'float32' (autocast; weights stay fp32 as in training)
rounds = 10         # each round times one step of every mode in turn
warmup_steps = 3    # per mode, the first compiles
threads = 0         # torch CPU threads; 0 = torch's default (one per core)
device = 'cpu'
globals().update(dataclasses.asdict(DiTConfig()))
config = configure(globals())

if __name__ == '__main__':
    if threads:
        torch.set_num_threads(threads)
    ptdtype = {'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float32': torch.float32}[dtype]
    autocast = torch.autocast(device.split(':')[0], dtype=ptdtype, enabled=ptdtype != torch.float32)
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    cfg = DiTConfig(**{f.name: config[f.name] for f in dataclasses.fields(DiTConfig)})
    L = cfg.grid_size ** 2
    x = torch.randn(batch_size, L, cfg.in_dim, device=device)
    cond = torch.randn(batch_size, L, cfg.cond_dim, device=device)
    t = torch.rand(batch_size, device=device)
    models = {}  # mode -> (model, what a step calls)
    for mode, wrap in (('eager', lambda m: m), ('regional', DiT.compile_blocks), ('full', torch.compile)):
        torch.manual_seed(0)
        model = DiT(cfg).to(device)
        models[mode] = (model, wrap(model))

    def step(mode):
        model, step_model = models[mode]
        with autocast:
            loss = step_model(x, t, cond).float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    for mode in models:
        for _ in range(warmup_steps):
            step(mode)
    times = {mode: [] for mode in models}
    for _ in range(rounds):
        for mode in models:
            sync()
            start = time.perf_counter()
            step(mode)
            sync()
            times[mode].append(time.perf_counter() - start)
    seconds = {mode: statistics.median(ts) for mode, ts in times.items()}
    print(json.dumps({
        'bench': 'compile', 'device': f'cpu ({torch.get_num_threads()} threads)' if device == 'cpu' else device,
        'dim': cfg.dim, 'n_layers': cfg.n_layers, 'n_heads': cfg.n_heads, 'tokens': L, 'batch_size': batch_size,
        'dtype': dtype, 'timed_steps': rounds,
        'modes': {mode: {'ms_per_step': round(1000 * seconds[mode], 2),
                         'tokens_per_s': round(batch_size * L / seconds[mode], 1)} for mode in models},
        'regional_over_full_step_time': round(seconds['regional'] / seconds['full'], 3)}))
