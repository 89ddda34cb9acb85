"""Benchmark sampling: samples/s and COCO val2017's time for a DiT config, and sample quality
against steps.

Throughput: a randomly initialized DiT of the config's size (no checkpoint needed: speed does not
depend on the weights), random EVA tokens, sample.py's path: the weights cast once to the compute
dtype (autocast on CUDA), compile_blocks when `compile`, flow.generate with the condition encoded
once a batch, batches of sample_batch_size (sample.py pads the last one to it when compiled). One
JSON line without guidance and one at guided_cfg_scale: start-up (model build on the device, compile
and first batch) apart; the mean of the timed batches after it, and that times ceil(coco_images /
batch) batches; executed TFLOP/s and MFU counting the FLOPs the cached forward runs
(DiT.flops_per_sample less flops_skipped_per_sample per row and call, the null half's less its whole
cross-attention, plus encode_cond once a batch), against runtime.peak_flops (none on the CPU).
Quality: a trained checkpoint (ckpt_path, EMA weights) on the first quality_samples rows of
val_data: cosine and relative L2 error (standardized space) between samples at quality_steps and a
reference_steps Heun solution from the same noise, for each of quality_methods on each time grid of
quality_shifts (flow.time_grid); the curve goes to out_dir/bench_sample_quality.png (with
matplotlib).

python bench/bench_sample.py config/demo.py                                # CPU: demo DiT, quality
on the demo run python bench/bench_sample.py config/demo.py --quality_methods="('heun', 'midpoint')"
--quality_shifts="(1.0, 2.0)" python bench/bench_sample.py config/dit_large.py --quality=False
--sample_batch_size=128   # GPU: COCO-5K figures
"""
import dataclasses
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import flow  # noqa: E402
from bench_model import seconds_per_call, synchronize  # noqa: E402
from model import DiT, DiTConfig  # noqa: E402
from runtime import autocast, cast_for_autocast, peak_flops, resolve_device  # noqa: E402

# -----------------------------------------------------------------------------
# throughput: the DiT of these settings (DiTConfig fields; defaults = dit_large)
globals().update({f.name: f.default for f in dataclasses.fields(DiTConfig)})
sample_method, sample_steps = 'midpoint', 10  # sample.py's default sampler
sample_shift = 1.0
guided_cfg_scale = 2.0  # throughput: timed at 1.0 and at this (guidance runs the null half too)
cfg_scale = 1.0  # quality
sample_batch_size = 64
throughput_batches = 3  # timed batches, after the start-up's first one
coco_images = 5000  # COCO val2017: the time for this many images, ceil(coco_images / batch) batches
compile = torch.cuda.is_available()  # DiT.compile_blocks(), as sample.py
# quality: a trained run
quality = True
out_dir = 'out'
ckpt_path = ''  # '' = out_dir/ckpt.pt
data_dir = 'data'
splits = ('train2017', 'val2017')
val_data = ''  # '' = data_dir/splits[1]
quality_samples = 32
quality_steps = (5, 10, 20, 50)
quality_methods = ('euler', 'heun', 'midpoint')  # flow.SOLVERS
quality_shifts = (1.0,)  # time grids (flow.time_grid): 1.0 uniform, > 1 denser near the noise
reference_steps = 200
seed = 1337
device = 'auto'
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())
ckpt_path = ckpt_path or os.path.join(out_dir, 'ckpt.pt')
val_data = val_data or os.path.join(data_dir, splits[1])
# -----------------------------------------------------------------------------
device = resolve_device(device)
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
ctx = autocast(device, dtype)


@torch.no_grad()
def generate(model, cond, x0, sampler):
    with ctx:
        return sampler.generate(model, cond, x0).float()


def seconds(start):
    """Wall seconds since start, the device's queued work included."""
    synchronize(device)
    return time.perf_counter() - start


# throughput
cfg = DiTConfig(**{f.name: globals()[f.name] for f in dataclasses.fields(DiTConfig)})
g = torch.Generator().manual_seed(seed)
L = cfg.grid_size ** 2
cond = torch.randn(sample_batch_size, L, cfg.cond_dim, generator=g).to(device)
x0 = torch.randn(sample_batch_size, L, cfg.in_dim, generator=g).to(device)
machine = (torch.cuda.get_device_name() if device_type == 'cuda'
           else f"{platform.machine()}, {os.cpu_count()} cpus")
peak = peak_flops(machine, getattr(torch, dtype)) if device_type == 'cuda' else None
for scale in dict.fromkeys((1.0, guided_cfg_scale)):
    torch._dynamo.reset()  # each scale compiles from scratch, as a sample.py run does
    start = time.perf_counter()
    # sample.py loads a checkpoint instead; this builds on the device, no download
    with torch.device(device):
        model = DiT(cfg).eval()
    if dtype != 'float32':
        cast_for_autocast(model, getattr(torch, dtype))
    model = model.compile_blocks() if compile else model
    build_s = seconds(start)
    start = time.perf_counter()
    sampler = flow.Sampler(method=sample_method, steps=sample_steps, shift=sample_shift,
                           cfg_scale=scale)
    generate(model, cond, x0, sampler)
    first_s = seconds(start)  # holds the compilation
    times = [seconds_per_call(lambda: generate(model, cond, x0, sampler), 1, device)
             for _ in range(throughput_batches)]
    batch_s = sum(times) / len(times)
    # FLOPs run a row: each forward skips what encode_cond ran once a batch; a null row its
    # cross-attention too
    calls = dataclasses.replace(sampler, cfg_scale=1.0).model_calls()  # batched forwards
    full, encoded = model.flops_per_sample(), model.flops_skipped_per_sample()
    per_row = calls * (full - encoded) + encoded
    if scale != 1.0:
        per_row += calls * (full - model.flops_skipped_per_sample(dropped=True))
    batches = math.ceil(coco_images / sample_batch_size)
    print(json.dumps({
        'bench': 'sample', 'device': device, 'machine': machine, 'dtype': dtype,
        'torch_threads': torch.get_num_threads(),
        'model': {k: getattr(cfg, k)
                  for k in ('dim', 'n_layers', 'n_heads', 'in_dim', 'cond_dim', 'grid_size')},
        'params': model.num_params(), 'sample_method': sample_method, 'sample_steps': sample_steps,
        'sample_shift': sample_shift, 'cfg_scale': scale, 'batch': sample_batch_size,
        'compile': compile, 'model_batch_forwards': sampler.model_calls(),
        'startup_s': round(build_s + first_s, 2), 'build_s': round(build_s, 2),
        'first_batch_s': round(first_s, 2), 'batch_s': [round(t, 3) for t in times],
        'samples_per_s': round(sample_batch_size / batch_s, 2), 'coco_images': coco_images,
        'coco_batches': batches, 'coco_s': round(batches * batch_s, 1),
        'coco_s_with_startup': round(batches * batch_s + build_s + first_s, 1),
        'executed_gflops_per_batch': round(sample_batch_size * per_row / 1e9, 3),
        'executed_tflops_per_s': round(sample_batch_size * per_row / batch_s / 1e12, 4),
        'peak_tflops': peak and round(peak / 1e12),
        'mfu_executed': peak and round(sample_batch_size * per_row / batch_s / peak, 4)}))
    del model
    if device_type == 'cuda':
        torch.cuda.empty_cache()

# quality against steps
result = {'bench': 'sample_quality', 'quality': None}
eva_path = os.path.join(val_data, 'eva.npy')
if quality and not (os.path.exists(ckpt_path) and os.path.exists(eva_path)):
    result['quality_note'] = (f"skipped: needs a trained checkpoint {ckpt_path} and its data "
                              f"{eva_path} "
                              f"(run extract.py and train.py with the same config first)")
elif quality:
    checkpoint = data.load_checkpoint(ckpt_path)
    model = data.model_from_checkpoint(checkpoint, 'ema', ckpt_path).to(device).eval()
    qcfg = model.cfg
    eva = np.load(eva_path, mmap_mode='r')
    n = min(quality_samples, len(eva))
    cond = torch.from_numpy(np.asarray(eva[:n], dtype=np.float32)).to(device)
    x0 = torch.randn(n, qcfg.grid_size ** 2, qcfg.in_dim, generator=g).to(device)
    # compared in the model's standardized space: de-standardized, the channel means would inflate
    # every cosine
    ref = generate(model, cond, x0, flow.Sampler(method='heun', steps=reference_steps,
                                                 cfg_scale=cfg_scale))
    curve = {}
    for method, shift in [(m, s) for s in quality_shifts for m in quality_methods]:
        label = method if shift == 1.0 else f"{method}-shift{shift:g}"
        curve[label] = {}
        for steps in quality_steps:
            sampler = flow.Sampler(method=method, steps=steps, shift=shift, cfg_scale=cfg_scale)
            x = generate(model, cond, x0, sampler)
            curve[label][steps] = {
                'model_calls': sampler.model_calls(),
                'token_cosine': round(float(F.cosine_similarity(x, ref, dim=-1).mean()), 6),
                'pooled_cosine': round(float(
                    F.cosine_similarity(x.mean(1), ref.mean(1), dim=-1).mean()), 6),
                'relative_l2': round(float((x - ref).norm() / ref.norm()), 5)}
    result['quality'] = {'checkpoint': ckpt_path, 'iter_num': checkpoint['iter_num'], 'samples': n,
                         'reference': f'heun {reference_steps} steps, same noise',
                         'space': 'standardized', 'cfg_scale': cfg_scale, **curve}
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method, points in curve.items():
            ax.plot([p['model_calls'] for p in points.values()],
                    [p['relative_l2'] for p in points.values()], 'o-',
                    label=f"{method} ({', '.join(map(str, points))} steps)")
        ax.set(xscale='log', yscale='log', xlabel='model calls per sample',
               ylabel=f'relative L2 error to Heun-{reference_steps}',
               title='sample quality against steps')
        ax.legend()
        fig.tight_layout()
        stem = os.path.splitext(os.path.basename(ckpt_path))[0]
        plot_path = os.path.join(os.path.dirname(ckpt_path), f'bench_sample_quality-{stem}.png')
        fig.savefig(plot_path, dpi=120)
        result['quality']['plot'] = plot_path
    except ImportError:
        pass
if quality:
    print(json.dumps(result))
