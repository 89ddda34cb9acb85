"""Generate CLIP tokens with a trained DiT: a checkpoint + EVA tokens -> out_dir/samples/<name>/
generated.npy and generated.json (the samples folder: data.py's docstring; the sampler: flow.py).

python sample.py config/demo.py         one GPU or CPU; --holdout=True: train_data's held-out rows
python sample.py config/demo.py --ckpt_path=out/demo/ckpt_iter000400.pt      any checkpoint
torchrun --standalone --nproc_per_node=8 sample.py config/dit_large.py        several GPUs

Row i starts from noise seeded by (seed, i) alone: the output does not depend on sample_batch_size
or the number of ranks (up to float rounding of batched kernels). A killed run continues; a finished
folder is reused only while the checkpoint, data and settings are the same. A regression checkpoint
is sampled in one model call (no sampler or seed).
"""
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import flow
from configurator import configure, require_positive
from runtime import autocast, cast_for_autocast, end_process_group, init_device

# -----------------------------------------------------------------------------
out_dir = 'out'            # writes out_dir/samples/<name>/generated.npy and generated.json
ckpt_path = ''             # ckpt.pt or a kept ckpt_iterN.pt; '' = out_dir/ckpt.pt
data_dir = 'data'          # extract.py's output: data_dir/<split>
splits = ('train2017', 'val2017')
train_data = ''            # '' = data_dir/splits[0]; holdout=True generates for its held-out slice
val_data = ''              # the reported split (its eva.npy); '' = data_dir/splits[1]
holdout = False            # True: train_data's last val_fraction rows, where samplers are chosen
val_fraction = data.VAL_FRACTION  # the held-out slice, as train.py's
use_ema = True             # the checkpoint's EMA weights; False = the raw weights
sample_method = 'midpoint'  # 'euler' (1 model call a step), 'heun' or 'midpoint' (2): flow.sample
sample_steps = 10          # midpoint 10 (20 calls) beat Euler 50 on the demo DiT (bench/RESULTS.md)
sample_shift = 1.0         # time grid (flow.time_grid): 1.0 uniform, > 1 more steps near the noise
cfg_scale = 1.0            # classifier-free guidance; 1.0 = the plain conditional model
seed = 1337
sample_batch_size = 64     # the last batch is padded to it when compiled
compile = torch.cuda.is_available()  # DiT.compile_blocks(), regional: a CPU gains little
device = 'auto'            # 'auto' = cuda if available, else cpu; under torchrun cuda:LOCAL_RANK
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
# -----------------------------------------------------------------------------
config = configure(globals())
train_data, val_data = data.split_folders(data_dir, splits, train_data, val_data)
ckpt_path = ckpt_path or os.path.join(out_dir, 'ckpt.pt')
# -----------------------------------------------------------------------------

sampler = flow.Sampler.from_settings(config)  # checked here, before the checkpoint is read
require_positive(config, 'sample_batch_size')
device, rank, _, world_size = init_device(device, dtype)
ddp, master_process, ctx = dist.is_initialized(), rank == 0, autocast(device, dtype)
ckpt = data.load_checkpoint(ckpt_path)
objective = data.checkpoint_objective(ckpt)
sampler = sampler.for_objective(objective)
model = data.model_from_checkpoint(ckpt, 'ema' if use_ema else 'model', ckpt_path).to(device).eval()
if dtype != 'float32':  # the weights autocast would cast at every call, cast once: the same values
    cast_for_autocast(model, getattr(torch, dtype))
model = model.compile_blocks() if compile else model
meta, target = data.open_target(holdout, train_data, val_data, val_fraction, ('eva',))
data.check_fits(meta, model.cfg, ('eva',))
data.check_not_trained_on(ckpt, ckpt_path, target, val_fraction)
shape = [target['count'], model.cfg.grid_size ** 2, model.cfg.in_dim]
mean, std = (torch.tensor(ckpt['data_stats'][k], dtype=torch.float32, device=device)
             for k in ('clip_mean', 'clip_std'))
depends_on = {'settings': sampler.settings(), 'checkpoint': ckpt['identity'], 'data': target,
              'shape': shape, 'dtype': 'float16'}
run_dir = os.path.join(out_dir, 'samples', data.samples_name(ckpt_path, sampler, holdout))
data.check_samples_space(run_dir, shape, out_dir)
run_lock = data.lock(run_dir, 'sample.py') if master_process else None  # one writer a folder
if data.start_samples(run_dir, depends_on, shape, master_process) is None:
    print(f"sample.py: {run_dir}/generated.npy already holds these samples (same checkpoint, data "
          f"and settings)")
    end_process_group()
    raise SystemExit(0)
if ddp:
    dist.barrier()  # rank 0 has created the partial files

shard = np.array_split(np.arange(shape[0]), world_size)[rank]
todo = data.samples_todo(run_dir, shard)
print(f"rank {rank}: {len(todo)} of {len(shard)} rows to generate ({target['folder']} from row "
      f"{target['start']}), {sampler.label()}, {ckpt_path} (iteration {ckpt['iter_num']}, run "
      f"{ckpt['run']['id']}), {device}")


def read_batch(rows):
    """EVA tokens and starting noise of rows on the host (pinned on CUDA), padded to
    sample_batch_size when compiled (one shape: the graph never recompiles)."""
    cond = torch.from_numpy(data.read_rows(meta['paths']['eva'], rows + target['start'])).float()
    x0 = flow.seeded_noise(seed, rows, shape[1:])
    if compile and len(rows) < sample_batch_size:
        pad = sample_batch_size - len(rows)
        cond, x0 = (torch.cat([t, t[-1:].expand(pad, *t.shape[1:])]) for t in (cond, x0))
    return (cond.pin_memory(), x0.pin_memory()) if 'cuda' in device else (cond, x0)


def write_batch(rows, x):
    """Rows of the result to disk; their count of non-finite values."""
    data.write_samples(run_dir, rows, x.numpy())
    return int((~torch.isfinite(x)).sum())


# the host reads batch k + 1 and writes k - 1 while the device generates k: one sync a batch
batches = [todo[s:s + sample_batch_size] for s in range(0, len(todo), sample_batch_size)]
t0, non_finite, writes = time.time(), 0, []
with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
    ahead = reader.submit(read_batch, batches[0]) if batches else None
    for k, rows in enumerate(tqdm(batches, unit='batch', disable=not master_process)):
        cond, x0 = (t.to(device, non_blocking=True) for t in ahead.result())
        if k + 1 < len(batches):
            ahead = reader.submit(read_batch, batches[k + 1])
        with ctx:
            x = sampler.generate(model, cond, x0)
        writes.append(writer.submit(write_batch, rows, (x[:len(rows)].float() * std + mean).cpu()))
        if len(writes) > 1:  # at most one batch waits for the disk: bounded memory
            non_finite += writes.pop(0).result()
    non_finite += sum(w.result() for w in writes)
seconds = time.time() - t0
if non_finite:
    print(f"rank {rank}: warning: {non_finite} non-finite generated values (the sampler diverged; "
          f"eval.py will refuse them)")
if ddp:
    dist.barrier()
if master_process:
    data.finish_samples(run_dir, {
        'method': objective, 'label': 'regression' if objective == 'regression' else 'DiT',
        'settings': {**sampler.settings(), 'checkpoint': ckpt['identity']['path'],
                     'iter_num': ckpt['iter_num']},
        'data': target, 'data_stats': {**ckpt['data_stats'],
                                       'source': f"{ckpt_path}: data_stats (the training folder)"},
        'model_calls': sampler.model_calls(), 'world_size': world_size, 'device': device,
        'dtype': dtype, 'sample_batch_size': sample_batch_size, 'seconds': seconds,
        'samples_per_second': len(todo) / seconds if seconds > 0 else None})
    print(f"wrote {run_dir}/generated.npy {shape} float16 and generated.json: {len(todo)} rows in "
          f"{seconds:.1f} s")
end_process_group()  # under torchrun: every rank leaves together, exit 0 (runtime.py)
