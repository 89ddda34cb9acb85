"""Forward + backward throughput of the DiT alone: params, samples/s, tokens/s, FLOP/s, MFU (one
JSON line).

With compile: `compile_mode='regional'` compiles each block (DiT.compile_blocks(), one graph shared
by all blocks), 'full' compiles the whole model (torch.compile(model)); `first_step_s` is the wall
time of the first step, which holds the compilation (inductor's caches off unless `compile_cache`,
so it is a cold compile), `first_step_cpu_s` its CPU time, this process's and its C++ compilers'
(steadier than wall time on a busy machine; inductor compiles in this process, one thread).

python bench/bench_model.py [config/file.py] [--key=value]
    e.g. bench/bench_model.py config/dit_large.py --batch_size=64
`attention` forces one SDPA backend for the A/B of the kernels ('auto' = model.SDPA_PRIORITY, the
model's order).

python bench/bench_model.py config/demo.py --compile=True --compile_mode=full
python bench/bench_model.py config/dit_large.py --compile=True --batch_size=64 --attention=flash
    (GPU: the A/B)
"""
import dataclasses
import functools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure  # noqa: E402
from torch.nn.attention import SDPBackend  # noqa: E402
from model import SDPA_PRIORITY, DiT, DiTConfig  # noqa: E402
from runtime import autocast, peak_flops  # noqa: E402

# bench settings, then every DiTConfig field as a setting
batch_size = 8
# 'bfloat16' | 'float16' | 'float32' (autocast; weights stay fp32 as in training)
dtype = 'bfloat16'
compile = False
compile_mode = 'regional'  # 'regional': DiT.compile_blocks() | 'full': torch.compile(model)
# reuse inductor's on-disk caches (then first_step_s is no longer a cold compile)
compile_cache = False
# SDPA backend: 'auto' (model.SDPA_PRIORITY) | 'cudnn' | 'flash' | 'efficient' | 'math'
attention = 'auto'
device = 'auto'
warmup_steps = 3
steps = 10
globals().update(dataclasses.asdict(DiTConfig()))
# -----------------------------------------------------------------------------
# the other benches time their steps with these


def synchronize(device):
    """Wait for the device's queued work, so that a timer reads finished work (CPU: no-op)."""
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()


def seconds_per_call(fn, calls, device, warmup=0):
    """Mean wall seconds of fn() over `calls` timed calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def random_inputs(cfg, batch_size, device):
    """(x, t, cond) for the DiT of cfg, seeded: noisy CLIP tokens, times, EVA tokens."""
    g = torch.Generator().manual_seed(0)
    tokens = cfg.grid_size ** 2
    return (torch.randn(batch_size, tokens, cfg.in_dim, generator=g).to(device),
            torch.rand(batch_size, generator=g).to(device),
            torch.randn(batch_size, tokens, cfg.cond_dim, generator=g).to(device))


def backward_step(model, forward, ctx, optimizer=None):
    """A training step on a stand-in loss (mean square of the output): forward under ctx, backward,
    the optimizer's step when given, gradients cleared."""
    with ctx:
        loss = forward().float().square().mean()
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)


def cpu_matmul_peak(dim, dtype):
    """Measured CPU peak: FLOP/s of a dim x dim matmul in the run's dtype, best of a few."""
    a, b = torch.randn(dim, dim, dtype=dtype), torch.randn(dim, dim, dtype=dtype)
    best = float('inf')
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * dim ** 3 / best


if __name__ == '__main__':
    config = configure(globals())
    device = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
    ptdtype = getattr(torch, dtype)
    backends = {'cudnn': SDPBackend.CUDNN_ATTENTION, 'flash': SDPBackend.FLASH_ATTENTION,
                'efficient': SDPBackend.EFFICIENT_ATTENTION, 'math': SDPBackend.MATH}
    if attention not in ('auto', *backends) or \
            attention not in ('auto', 'math') and not device.startswith('cuda'):
        raise SystemExit(f"attention should be 'auto' or 'math' on the CPU, or one of 'cudnn', "
                         f"'flash', 'efficient' on CUDA; got {attention!r} on {device}")
    # Block.forward reads this list at every call: that one backend, or an error
    if attention != 'auto':
        SDPA_PRIORITY[:] = [backends[attention]]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg = DiTConfig(**{f.name: config[f.name] for f in dataclasses.fields(DiTConfig)})
    torch.manual_seed(0)
    model = DiT(cfg).to(device)
    flops_per_sample = model.flops_per_sample()
    if compile_mode not in ('regional', 'full'):
        raise ValueError(f"compile_mode should be 'regional' or 'full', got {compile_mode!r}")
    torch.compiler.config.force_disable_caches = not compile_cache
    # compile in this process: first_step_cpu_s then counts all of it
    torch._inductor.config.compile_threads = 1
    step_model = model
    if compile:
        step_model = model.compile_blocks() if compile_mode == 'regional' else torch.compile(model)
    x, t, cond = random_inputs(cfg, batch_size, device)
    ctx = autocast(device, dtype)

    step = functools.partial(backward_step, model, functools.partial(step_model, x, t, cond), ctx)
    cpu_start = os.times()
    first_step = seconds_per_call(step, 1, device)  # holds the compilation, if any
    cpu_end = os.times()
    # user + system, this process and its compilers
    first_step_cpu = sum(cpu_end[:4]) - sum(cpu_start[:4])
    seconds = seconds_per_call(step, steps, device, warmup=warmup_steps)
    if device.startswith('cuda'):
        name = torch.cuda.get_device_name()
        peak = peak_flops(name, ptdtype)
        memory = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        name = f'cpu ({torch.get_num_threads()} threads)'
        peak = cpu_matmul_peak(cfg.dim, ptdtype)
        memory = None
    achieved = 3 * flops_per_sample * batch_size / seconds
    print(json.dumps({
        'bench': 'model', 'device': name, 'dim': cfg.dim, 'n_layers': cfg.n_layers,
        'n_heads': cfg.n_heads,
        'params': model.num_params(), 'batch_size': batch_size, 'dtype': dtype, 'compile': compile,
        'compile_mode': compile_mode if compile else None, 'attention': attention,
        'first_step_s': round(first_step, 2), 'first_step_cpu_s': round(first_step_cpu, 2),
        'ms_per_step': round(1000 * seconds, 2), 'samples_per_s': round(batch_size / seconds, 2),
        'tokens_per_s': round(batch_size * cfg.grid_size ** 2 / seconds, 1),
        'train_flops_per_sample': 3 * flops_per_sample,
        'achieved_tflops': round(achieved / 1e12, 4), 'peak_tflops': peak and round(peak / 1e12, 4),
        'mfu': peak and round(achieved / peak, 4), 'peak_memory_gib': memory and round(memory, 2)}))
