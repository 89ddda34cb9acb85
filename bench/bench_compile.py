"""Compiled step, regional (DiT.compile_blocks()) vs whole model (torch.compile(model)), eager for
reference.

One process builds the three from the same weights, compiles them (first steps, untimed), then
alternates their forward + backward steps over `rounds`, so the load of a shared machine hits all
alike, and prints the medians (one JSON line). Compile time: bench_model.py, one cold process per
mode and depth (see bench/RESULTS.md).

python bench/bench_compile.py config/demo.py
python bench/bench_compile.py config/demo.py --rounds=20 --batch_size=32
"""
import dataclasses
import functools
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_model import backward_step, random_inputs, seconds_per_call  # noqa: E402
from configurator import configure  # noqa: E402
from model import DiT, DiTConfig  # noqa: E402
from runtime import autocast  # noqa: E402

# bench settings, then every DiTConfig field as a setting
batch_size = 8
# 'bfloat16' | 'float16' | 'float32' (autocast; weights stay fp32 as in training)
dtype = 'bfloat16'
rounds = 10         # each round times one step of every mode in turn
warmup_steps = 3    # per mode, the first compiles
threads = 0         # torch CPU threads; 0 = torch's default (one per core)
device = 'cpu'
globals().update(dataclasses.asdict(DiTConfig()))
config = configure(globals())

if __name__ == '__main__':
    cfg = DiTConfig(**{f.name: config[f.name] for f in dataclasses.fields(DiTConfig)})
    if threads:
        torch.set_num_threads(threads)
    ctx = autocast(device, dtype)
    x, t, cond = random_inputs(cfg, batch_size, device)
    steps = {}  # mode -> one training step
    for mode, wrap in (('eager', lambda m: m), ('regional', DiT.compile_blocks),
                       ('full', torch.compile)):
        torch.manual_seed(0)
        model = DiT(cfg).to(device)
        forward = functools.partial(wrap(model), x, t, cond)
        steps[mode] = functools.partial(backward_step, model, forward, ctx)
    for step in steps.values():
        seconds_per_call(step, warmup_steps, device)  # the first compiles
    times = {mode: [] for mode in steps}
    for _ in range(rounds):
        for mode, step in steps.items():
            times[mode].append(seconds_per_call(step, 1, device))
    seconds = {mode: statistics.median(ts) for mode, ts in times.items()}
    print(json.dumps({
        'bench': 'compile',
        'device': f'cpu ({torch.get_num_threads()} threads)' if device == 'cpu' else device,
        'dim': cfg.dim, 'n_layers': cfg.n_layers, 'n_heads': cfg.n_heads,
        'tokens': cfg.grid_size ** 2, 'batch_size': batch_size,
        'dtype': dtype, 'timed_steps': rounds,
        'modes': {mode: {'ms_per_step': round(1000 * seconds[mode], 2),
                         'tokens_per_s': round(batch_size * cfg.grid_size ** 2 / seconds[mode],
                                               1)} for mode in steps},
        'regional_over_full_step_time': round(seconds['regional'] / seconds['full'], 3)}))
