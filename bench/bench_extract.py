"""Benchmark extract.py: images/s of the two encoders' forward and of the whole per-split pipeline.

Prints one JSON line. encode: both encoders on ready pixel tensors (what the GPU can do); pipeline:
extract_split on synthetic images (drawn and preprocessed by DataLoader workers, rows written to the
memmaps, state file after each batch), the model build excluded.

python bench/bench_extract.py                 # CPU: tiny encoders (config/encoders), 64 px
python bench/bench_extract.py --gpu=True      # ViT-L-14-quickgelu + EVA02-E-14-plus, random weights, batch 256, bf16
"""
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import extract  # noqa: E402

# -----------------------------------------------------------------------------
gpu = torch.cuda.is_available()  # the GPU setting below; else the tiny CPU one
images = 0  # pipeline images (0 = 1024 on the CPU, 2048 on the GPU)
iters = 0  # timed forward batches (0 = 20 on the CPU, 5 on the GPU)
num_workers = 0  # DataLoader processes (0 = 1 on the CPU, 16 on the GPU)
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())
# -----------------------------------------------------------------------------

if gpu:
    setting = dict(clip_model='ViT-L-14-quickgelu', eva_model='EVA02-E-14-plus', grid_size=16, batch_size=256,
                   image_size=224, dtype='bfloat16', device='cuda')
else:
    setting = dict(clip_model='tiny-clip', eva_model='tiny-eva', grid_size=4, batch_size=64,
                   image_size=64, dtype='float32', device='cpu')
images = images or (2048 if gpu else 1024)
iters = iters or (5 if gpu else 20)
num_workers = num_workers or (16 if gpu else 1)
device, ptdtype = torch.device(setting['device']), getattr(torch, setting['dtype'])
if not gpu:  # as extract.py does: the DataLoader workers have their cores
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - num_workers))


def sync():
    if device.type == 'cuda':
        torch.cuda.synchronize()


t0 = time.time()
with device:  # random init of ~5B parameters runs in seconds on the GPU, minutes on the CPU
    # random weights: no download
    clip = extract.build_encoder('clip', setting['clip_model'], '', device, ptdtype, setting['grid_size'])
    eva = extract.build_encoder('eva', setting['eva_model'], '', device, ptdtype, setting['grid_size'])
build_s = time.time() - t0

x = torch.randn(setting['batch_size'], 3, setting['image_size'], setting['image_size'], device=device)
with torch.no_grad(), extract.autocast(device, ptdtype):
    for _ in range(2):  # warm-up: kernel selection, allocator
        clip.forward(x), eva.forward(x)
    sync()
    t0 = time.time()
    for _ in range(iters):
        clip.forward(x), eva.forward(x)
    sync()
encode = iters * setting['batch_size'] / (time.time() - t0)

out = tempfile.mkdtemp(prefix='bench_extract_')
try:
    t0 = time.time()
    listing = extract.list_split('bench', 'synthetic', synthetic_counts={'bench': images},
                                 synthetic_image_size=setting['image_size'])
    extract.extract_split(listing, out, clip, eva, device, ptdtype, setting['batch_size'], num_workers, overwrite=True)
    pipeline = images / (time.time() - t0)
finally:
    shutil.rmtree(out)

cpu = f'{platform.processor() or platform.machine()} x{os.cpu_count()}'
print(json.dumps({'bench': 'extract', 'device': torch.cuda.get_device_name() if device.type == 'cuda' else cpu,
                  'clip_model': setting['clip_model'], 'eva_model': setting['eva_model'],
                  'batch_size': setting['batch_size'], 'image_size': setting['image_size'], 'dtype': setting['dtype'],
                  'clip_tokens': [clip.spec['tokens'], clip.spec['dim']],
                  'eva_tokens': [eva.spec['tokens'], eva.spec['dim']],
                  'num_workers': num_workers, 'build_s': round(build_s, 1),
                  'encode_images_per_s': round(encode, 1), 'pipeline_images_per_s': round(pipeline, 1),
                  'pipeline_images': images,
                  'peak_gpu_gb': round(torch.cuda.max_memory_allocated() / 1e9, 1) if device.type == 'cuda' else None}))
