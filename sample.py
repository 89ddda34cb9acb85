"""Generate CLIP tokens with a trained DiT: a checkpoint + val_data/eva.npy -> generated.npy (+ generated.json) in
out_dir/samples/<name>/, name = flow.samples_name(checkpoint, sampler settings), e.g. ckpt-midpoint10-cfg1-seed1337,
so samples of other checkpoints or settings never overwrite each other (eval.py finds them from the same settings).

One GPU or CPU:   python sample.py config/demo.py
Any checkpoint:   python sample.py config/demo.py --ckpt_path=out/demo/ckpt_iter000400.pt --sample_steps=10
Several GPUs:     torchrun --standalone --nproc_per_node=8 sample.py config/dit_large.py   (each rank writes its rows)

Row i starts from noise drawn from a generator seeded by (seed, i) alone, so the output does not depend on
sample_batch_size or on the number of ranks (up to float rounding of batched kernels). A killed run continues
where it stopped: rows go into generated.partial.npy and are marked in generated.done.npy once written; the
finished array is renamed to generated.npy, so that name only ever holds a complete result.
"""
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import flow
from model import DiT, DiTConfig, autocast, init_device

# -----------------------------------------------------------------------------
out_dir = 'out'                # writes out_dir/samples/<name>/generated.npy and generated.json
ckpt_path = ''                 # the checkpoint to sample: ckpt.pt or a kept ckpt_iterN.pt; '' = out_dir/ckpt.pt
data_dir = 'data'              # extract.py's output: data_dir/<split>
splits = ('train2017', 'val2017')
val_data = ''                  # the data folder to generate for (its eva.npy); '' = data_dir/splits[1]
use_ema = True                 # the checkpoint's EMA weights; False = the raw weights
sample_method = 'midpoint'     # 'euler' (1 model call a step), 'heun' or 'midpoint' (2): flow.sample
sample_steps = 10              # midpoint 10 (20 calls) beat Euler 50 on the demo DiT (bench/RESULTS.md)
sample_shift = 1.0             # time grid (flow.time_grid): 1.0 uniform, > 1 more steps near the noise
cfg_scale = 1.0                # classifier-free guidance; 1.0 = the plain conditional model
seed = 1337
sample_batch_size = 64
device = 'auto'                # 'auto' = cuda when available, else cpu; under torchrun each rank takes cuda:LOCAL_RANK
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'  # autocast on CUDA
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())
val_data = val_data or os.path.join(data_dir, splits[1])
ckpt_path = ckpt_path or os.path.join(out_dir, 'ckpt.pt')
# -----------------------------------------------------------------------------

if sample_method not in flow.SAMPLERS or sample_steps < 1 or sample_batch_size < 1 or not sample_shift > 0:
    raise SystemExit(f"config error: sample_method should be one of {', '.join(map(repr, flow.SAMPLERS))} (got "
                     f"{sample_method!r}), sample_steps, sample_batch_size and sample_shift positive (got "
                     f"{sample_steps}, {sample_batch_size}, {sample_shift})")
device, rank, _, world_size = init_device(device, dtype)
ddp = dist.is_initialized()
master_process = rank == 0
ctx = autocast(device, dtype)


def barrier():
    if ddp:
        dist.barrier()


# checkpoint and data: every disagreement stops here, naming the file and the values
if not os.path.exists(ckpt_path):
    raise SystemExit(f"sample.py: ckpt_path {ckpt_path} not found: train first (python train.py ...) or set "
                     f"--ckpt_path (or --out_dir)")
checkpoint = torch.load(ckpt_path, map_location='cpu', mmap=True, weights_only=True)
weights = 'ema' if use_ema else 'model'
if weights not in checkpoint:
    raise SystemExit(f"sample.py: {ckpt_path} has no {weights!r} weights (keys {sorted(checkpoint)})")
model_cfg = DiTConfig(**{'t_scale': 1000.0, **checkpoint['model_args']})  # no t_scale: written before it existed
meta = data.open_folder(val_data, arrays=('eva',))
eva_path = meta['paths']['eva']
N, M, C = meta['shapes']['eva']
L = model_cfg.grid_size ** 2
if C != model_cfg.cond_dim:
    raise SystemExit(f"sample.py: {eva_path} has EVA width {C}, but {ckpt_path} was trained with cond_dim "
                     f"{model_cfg.cond_dim}: generate with the data the model was trained for")
if (meta['clip']['tokens'], meta['clip']['dim']) != (L, model_cfg.in_dim):
    raise SystemExit(f"sample.py: {ckpt_path} generates [{L}, {model_cfg.in_dim}] tokens (grid_size**2, in_dim) "
                     f"for {N} rows of {eva_path}, but {val_data}/meta.json has count {meta['count']} and CLIP tokens "
                     f"[{meta['clip']['tokens']}, {meta['clip']['dim']}]")
clip_mean = torch.tensor(checkpoint['data_stats']['clip_mean'], dtype=torch.float32, device=device)
clip_std = torch.tensor(checkpoint['data_stats']['clip_std'], dtype=torch.float32, device=device)
if clip_mean.shape != (model_cfg.in_dim,) or clip_std.shape != (model_cfg.in_dim,):
    raise SystemExit(f"sample.py: {ckpt_path} data_stats have {len(clip_mean)} / {len(clip_std)} channels, "
                     f"in_dim is {model_cfg.in_dim}")

model = DiT(model_cfg)
try:
    model.load_state_dict(checkpoint[weights])
except RuntimeError as e:  # e.g. written by another version of model.py
    raise SystemExit(f"sample.py: {ckpt_path}: its {weights!r} weights do not fit the DiT its model_args describe: {e}")
model.to(device).eval()

# what the output depends on; a partial run continues only under the same settings
settings = {'checkpoint': os.path.abspath(ckpt_path), 'iter_num': checkpoint['iter_num'], 'use_ema': use_ema,
            'sample_method': sample_method, 'sample_steps': sample_steps, 'sample_shift': sample_shift,
            'cfg_scale': cfg_scale, 'seed': seed, 'val_data': os.path.abspath(val_data),
            'shape': [N, L, model_cfg.in_dim], 'dtype': 'float16'}
del checkpoint
run_dir = os.path.join(out_dir, 'samples', flow.samples_name(ckpt_path, sample_method, sample_steps, cfg_scale, seed,
                                                              sample_shift, use_ema))
out_path, info_path = os.path.join(run_dir, 'generated.npy'), os.path.join(run_dir, 'generated.json')
partial_path, done_path = os.path.join(run_dir, 'generated.partial.npy'), os.path.join(run_dir, 'generated.done.npy')
partial_info = os.path.join(run_dir, 'generated.partial.json')
if os.path.exists(out_path) and os.path.exists(info_path):
    before = data.read_json(info_path).get('settings', {})
    if before == settings:
        print(f"sample.py: {out_path} already holds these samples ({info_path}); delete it to generate again")
        raise SystemExit(0)
    changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
    raise SystemExit(f"sample.py: {out_path} holds samples made with other settings (setting: (then, now)): "
                     f"{changed}; it is kept: delete {run_dir} to replace it, or sample into another --out_dir")
# stop now, not hours later, on an out_dir that cannot take the result (less what a killed run already wrote;
# the finished array is a rename of the partial one)
needed = N * L * model_cfg.in_dim * 2 + N
if os.path.exists(partial_path):
    needed -= os.stat(partial_path).st_blocks * 512
data.check_writable(out_dir, needed, 'out_dir', 'the samples need')
if master_process:
    os.makedirs(run_dir, exist_ok=True)
    if all(map(os.path.exists, (partial_info, partial_path, done_path))) and data.read_json(partial_info) == settings:
        print(f"resuming {partial_path}: {int(np.load(done_path).sum())} of {N} rows done")
    else:
        for path, dt, shape in [(partial_path, np.float16, (N, L, model_cfg.in_dim)), (done_path, np.bool_, (N,))]:
            np.lib.format.open_memmap(path, mode='w+', dtype=dt, shape=shape).flush()  # a new file reads as zeros
        data.write_json(partial_info, settings, indent=2)
barrier()

shard = np.array_split(np.arange(N), world_size)[rank]
todo = shard[~np.load(done_path)[shard]]
print(f"rank {rank}: {len(todo)} of {len(shard)} rows to generate, {sample_method} {sample_steps} steps "
      f"(shift {sample_shift:g}), cfg {cfg_scale}, {'EMA' if use_ema else 'raw'} weights of {ckpt_path} "
      f"(iteration {settings['iter_num']}), {device}")
t0, non_finite = time.time(), 0
with tqdm(total=len(todo), unit='sample', disable=not master_process, smoothing=0.1) as bar:
    for s in range(0, len(todo), sample_batch_size):
        rows = todo[s:s + sample_batch_size]
        cond = torch.from_numpy(np.load(eva_path, mmap_mode='r')[rows]).to(device).float()
        with torch.no_grad(), ctx:
            x0 = flow.seeded_noise(seed, rows, (L, model_cfg.in_dim), device)
            x = flow.sample(flow.guided(model, cond, cfg_scale), x0, sample_steps, sample_method, sample_shift)
        x = x.float() * clip_std + clip_mean
        non_finite += int((~torch.isfinite(x)).sum())
        # open the memmaps afresh per batch (a long-lived mapping keeps growing resident memory, nanoGPT #287);
        # the rows are flushed to disk before they are marked done
        out = np.load(partial_path, mmap_mode='r+')
        out[rows] = x.cpu().numpy().astype(np.float16)
        out.flush()
        done = np.load(done_path, mmap_mode='r+')
        done[rows] = True
        done.flush()
        del out, done
        bar.update(len(rows))
seconds = time.time() - t0
if non_finite:
    print(f"rank {rank}: warning: {non_finite} non-finite generated values "
          f"(the sampler diverged; eval.py will refuse them)")
barrier()
if master_process:
    missing = int((~np.load(done_path)).sum())
    if missing:
        raise SystemExit(f"sample.py: {missing} rows of {partial_path} are still missing; run again to finish them")
    os.replace(partial_path, out_path)
    data.write_json(info_path, {'settings': settings,
                                'model_calls': flow.model_calls(sample_method, sample_steps, cfg_scale),
                                'world_size': world_size, 'device': device, 'dtype': dtype,
                                'sample_batch_size': sample_batch_size, 'seconds': seconds,
                                'samples_per_second': len(todo) / seconds if seconds > 0 else None}, indent=2)
    os.remove(done_path)
    os.remove(partial_info)
    print(f"wrote {out_path} [{N}, {L}, {model_cfg.in_dim}] float16 and {info_path}: "
          f"{len(todo)} rows in {seconds:.1f} s ({len(todo) / max(seconds, 1e-9):.2f} samples/s on rank 0)")
if ddp:
    dist.destroy_process_group()
