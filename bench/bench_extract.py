"""Benchmark extract.py: images/s of the two encoders' forward and of the whole per-split pipeline.

Prints one JSON line. encode: both encoders on ready pixel tensors (what the GPU can do); pipeline:
list_split + extract_split on synthetic images (drawn and cropped by DataLoader workers, normalized
on the device, rows written to the memmaps, state file after each batch), the model build excluded;
pipeline_vs_encode: their ratio (1 = the device never waits for the host). With source='webdataset'
the same images are first written as JPEG samples (quality 95, with .txt captions) into tar shards
in a temporary folder, untimed; the pipeline then indexes the shards' headers and reads every image
from them, twice (the decode check, then the encoding), as extract.py does.

python bench/bench_extract.py                 # CPU: tiny encoders (config/encoders), 64 px
python bench/bench_extract.py --gpu=True      # ViT-L-14-quickgelu + EVA02-E-14-plus, random, 256
python bench/bench_extract.py --source=webdataset   # the pipeline reads tar shards
"""
import io
import json
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import demo  # noqa: E402
import extract  # noqa: E402
import sources  # noqa: E402
from bench_model import seconds_per_call  # noqa: E402

# -----------------------------------------------------------------------------
gpu = torch.cuda.is_available()  # the GPU setting below; else the tiny CPU one
images = 0  # pipeline images (0 = 1024 on the CPU, 2048 on the GPU)
iters = 0  # timed forward batches (0 = 20 on the CPU, 5 on the GPU)
num_workers = 0  # DataLoader processes (0 = 1 on the CPU, 16 on the GPU)
# the pipeline's images: 'synthetic' (drawn) or 'webdataset' (JPEGs in tar shards)
source = 'synthetic'
shard_size = 1000  # 'webdataset': samples per shard
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())
# -----------------------------------------------------------------------------

if gpu:
    setting = dict(clip_model='ViT-L-14-quickgelu', eva_model='EVA02-E-14-plus', grid_size=16,
                   batch_size=256,
                   image_size=224, clip_dtype='float16', eva_dtype='bfloat16', device='cuda')
else:
    setting = dict(clip_model='tiny-clip', eva_model='tiny-eva', grid_size=4, batch_size=64,
                   image_size=64, clip_dtype='float32', eva_dtype='float32', device='cpu')
images = images or (2048 if gpu else 1024)
iters = iters or (5 if gpu else 20)
num_workers = num_workers or (16 if gpu else 1)
if source not in ('synthetic', 'webdataset'):
    raise SystemExit(f"source must be 'synthetic' or 'webdataset', got {source!r}")
device = torch.device(setting['device'])
if not gpu:  # as extract.py does: the DataLoader workers have their cores
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - num_workers))


t0 = time.time()
with device:  # random init of ~5B parameters runs in seconds on the GPU, minutes on the CPU
    # random weights: no download
    clip = extract.build_encoder('clip', setting['clip_model'], '', device,
                                 getattr(torch, setting['clip_dtype']), setting['grid_size'])
    eva = extract.build_encoder('eva', setting['eva_model'], '', device,
                                getattr(torch, setting['eva_dtype']), setting['grid_size'])
build_s = time.time() - t0

x = torch.randn(setting['batch_size'], 3, setting['image_size'], setting['image_size'],
                device=device)


def forward():
    """Both encoders, each under its autocast dtype, as extract.py runs them."""
    for encoder in (clip, eva):
        with extract.autocast(device, encoder.dtype):
            encoder.forward(x)


def write_shards(folder):
    """The synthetic images as img2dataset-style samples (key.jpg, key.txt), shard_size a shard;
    returns the pattern."""
    for first in range(0, images, shard_size):
        with tarfile.open(os.path.join(folder, f'{first // shard_size:05d}.tar'), 'w') as tar:
            for i in range(first, min(first + shard_size, images)):
                buffer = io.BytesIO()
                demo.synthetic_image(0, 'bench', setting['image_size'],
                                     i).save(buffer, format='JPEG', quality=95)
                caption = demo.synthetic_captions(*demo.synthetic_scene(0, 'bench', i))[0].encode()
                for name, raw in ((f'{i:09d}.jpg', buffer.getvalue()), (f'{i:09d}.txt', caption)):
                    info = tarfile.TarInfo(name)
                    info.size = len(raw)
                    tar.addfile(info, io.BytesIO(raw))
    return os.path.join(folder, f'{{00000..{(images - 1) // shard_size:05d}}}.tar')


with torch.no_grad():  # two untimed batches: kernel selection, allocator
    encode = setting['batch_size'] / seconds_per_call(forward, iters, device, warmup=2)

tmp = tempfile.mkdtemp(prefix='bench_extract_')
try:
    if source == 'webdataset':
        os.makedirs(os.path.join(tmp, 'shards'))
        kw = dict(webdataset_shards={'bench': write_shards(os.path.join(tmp, 'shards'))})
    else:
        kw = dict(synthetic_counts={'bench': images}, synthetic_image_size=setting['image_size'])
    t0 = time.time()
    listing = sources.list_split('bench', source, **kw)
    list_s = time.time() - t0
    extract.extract_split(listing, os.path.join(tmp, 'out'), clip, eva, device,
                          setting['batch_size'], num_workers, overwrite=True)
    pipeline = images / (time.time() - t0)
finally:
    shutil.rmtree(tmp)

cpu = f'{platform.processor() or platform.machine()} x{os.cpu_count()}'
print(json.dumps({'bench': 'extract',
                  'device': torch.cuda.get_device_name() if device.type == 'cuda' else cpu,
                  'clip_model': setting['clip_model'], 'eva_model': setting['eva_model'],
                  'batch_size': setting['batch_size'], 'image_size': setting['image_size'],
                  'clip_dtype': setting['clip_dtype'], 'eva_dtype': setting['eva_dtype'],
                  'source': source, 'clip_tokens': [clip.spec['tokens'], clip.spec['dim']],
                  'eva_tokens': [eva.spec['tokens'], eva.spec['dim']],
                  'num_workers': num_workers, 'build_s': round(build_s, 1),
                  'encode_images_per_s': round(encode, 1),
                  'pipeline_images_per_s': round(pipeline, 1),
                  'pipeline_vs_encode': round(pipeline / encode, 3), 'pipeline_images': images,
                  'list_s': round(list_s, 2),
                  'peak_gpu_gb': round(torch.cuda.max_memory_allocated() / 1e9,
                                       1) if device.type == 'cuda' else None}))
