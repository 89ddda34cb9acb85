"""Train the DiT with flow matching on extracted token folders (see DESIGN.md).

One GPU or CPU:       python train.py config/demo.py --batch_size=32
One node, 8 GPUs:     torchrun --standalone --nproc_per_node=8 train.py config/dit_large.py
Several nodes:        torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \
                          --rdzv_endpoint=HOST:29500 train.py config/dit_large.py   (node_rank=1 on the other)
Continue a run:       python train.py config/demo.py --init_from=resume
Survive failures:     torchrun --standalone --nproc_per_node=8 --max-restarts=3 train.py config/dit_large.py \
                          --init_from=auto
                      (torchrun re-launches the same command after a crash; 'auto' resumes out_dir/ckpt.pt when it
                      exists, else starts from scratch; the same holds for a requeued cluster job). Export
                      TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun: its shared store otherwise hands the
                      restarted ranks the dead attempt's addresses and they fail to connect (torch 2.14, gloo)

Determinism: the global batch of iteration i is a fixed slice of a seeded per-epoch permutation, split
into gradient_accumulation_steps micro-batches; micro-batch j draws its noise, times and condition drops
from a generator seeded by (seed, i, j). Nothing depends on how micro-batches are spread over ranks, so
1 process and N ranks with the same global batch follow the same loss curve, and a resumed run
continues exactly (no RNG state to save).
"""
import copy
import dataclasses
import functools
import json
import math
import os
import resource
import shutil
import sys
import time
from contextlib import nullcontext
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import flow
from model import DiT, DiTConfig

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'
train_data = 'data/train2017'  # extract.py's default output folders (data_dir/<split>)
val_data = 'data/val2017'
val_fraction = 0.0  # > 0: validate on the last fraction of train_data instead of val_data
init_from = 'scratch'  # 'scratch', 'resume' (from out_dir/ckpt.pt) or 'auto' (resume if out_dir/ckpt.pt exists)
overwrite = False  # allow init_from='scratch' to replace an existing out_dir/ckpt.pt
eval_interval = 1000
eval_iters = 20  # validation batches (of batch_size) for the fixed-grid flow loss
eval_gen_items = 64  # validation items generated with the EMA model at each eval
eval_gen_steps = 10  # Euler steps for that generation check
log_interval = 10
always_save_checkpoint = True  # False: save only when the validation loss improves
wandb_log = False
wandb_project = 'blip3o-dit'
wandb_run_name = 'dit'
# batch: the global batch is batch_size * gradient_accumulation_steps samples
batch_size = 32  # per rank and micro-step
gradient_accumulation_steps = 8  # global; each of the world_size ranks does this / world_size micro-steps
# AdamW, linear warm-up then cosine decay to min_lr at lr_decay_iters
learning_rate = 1e-4
max_iters = 100000
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 disables clipping
warmup_iters = 1000
lr_decay_iters = 100000
min_lr = 1e-5
ema_decay = 0.9999  # warmed up as min(ema_decay, (1 + step) / (10 + step))
# flow matching (flow.py)
t_sampling = 'logit_normal'
sigma_min = 1e-4
cond_drop_prob = 0.1
# model: every DiTConfig field is a setting here (defaults = the seed's DiT, config/dit_large.py)
globals().update({f.name: f.default for f in dataclasses.fields(DiTConfig)})
# system
device = 'auto'  # 'auto' = cuda when available, else cpu; under torchrun each rank takes cuda:LOCAL_RANK
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
compile = True
seed = 1337
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())
config_files = ' '.join(a for a in sys.argv[1:] if not a.startswith('--')) or '<your config>'
# -----------------------------------------------------------------------------

if init_from not in ('scratch', 'resume', 'auto'):
    raise SystemExit(f"config error: init_from should be 'scratch', 'resume' or 'auto', got {init_from!r}")
if dtype not in ('float32', 'bfloat16', 'float16'):
    raise SystemExit(f"config error: dtype should be 'float32', 'bfloat16' or 'float16', got {dtype!r}")
ddp = int(os.environ.get('RANK', -1)) != -1
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
if ddp:
    rank, local_rank, world_size = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    if device_type == 'cuda':
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    # ranks finish torch.compile at different times: a generous timeout keeps the watchdog quiet
    dist.init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo', timeout=timedelta(minutes=30),
                            device_id=torch.device(device) if device_type == 'cuda' else None)
else:
    rank, local_rank, world_size = 0, 0, 1
master_process = rank == 0
if gradient_accumulation_steps % world_size:
    raise SystemExit(f"config error: gradient_accumulation_steps={gradient_accumulation_steps} (global) must be "
                     f"a multiple of the number of ranks, {world_size}")
micro_steps = gradient_accumulation_steps // world_size  # per rank
global_batch = batch_size * gradient_accumulation_steps
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
metrics_path = os.path.join(out_dir, 'metrics.jsonl')
if init_from == 'auto':  # every rank decides alike: rank 0 writes a checkpoint only after all ranks have started
    init_from = 'resume' if os.path.exists(ckpt_path) else 'scratch'
    restart = int(os.environ.get('TORCHELASTIC_RESTART_COUNT', 0))  # > 0: torchrun re-launched this command
    if master_process:
        print("init_from='auto': " + (f"resuming {ckpt_path}" if init_from == 'resume' else
                                       f"no {ckpt_path}, starting from scratch")
              + (f" (torchrun restart {restart})" if restart else ''))
if init_from == 'scratch' and os.path.exists(ckpt_path) and not overwrite:
    raise SystemExit(f"{ckpt_path} already exists: continue it with --init_from=resume, start over with "
                     f"--overwrite=True (replaces it), or pick another --out_dir")
if init_from == 'resume' and not os.path.exists(ckpt_path):
    raise SystemExit(f"init_from='resume' but {ckpt_path} does not exist: train with --init_from=scratch first")

if device_type == 'cuda':
    torch.set_float32_matmul_precision('high')  # TF32 matmuls (CUDA only: on CPU it could change float32 results)
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=device_type, dtype=ptdtype)

# model config: the checkpoint's on resume (grad_checkpointing stays a runtime choice)
checkpoint = None
model_args = {f.name: globals()[f.name] for f in dataclasses.fields(DiTConfig)}
if init_from == 'resume':
    # mmap: every rank reads the same file without holding a private copy in RAM
    checkpoint = torch.load(ckpt_path, map_location='cpu', mmap=True, weights_only=True)
    changed = {k: v for k, v in checkpoint['model_args'].items()
               if k != 'grad_checkpointing' and model_args.get(k) != v}
    if changed and master_process:
        print(f"resume: model settings come from {ckpt_path}: {changed}")
    model_args = {**checkpoint['model_args'], 'grad_checkpointing': grad_checkpointing}
model_cfg = DiTConfig(**model_args)
n_tokens = model_cfg.grid_size ** 2


def check_out_dir(folder, needed):
    """Stop now, not hours later, unless folder can be created and written and its disk has `needed` bytes free."""
    probe = os.path.join(folder, f'.write_test.{os.getpid()}')
    try:
        os.makedirs(folder, exist_ok=True)
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"out_dir={folder!r} is not writable ({e.strerror}: {e.filename}): pick another --out_dir")
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise SystemExit(f"out_dir={folder!r}: a checkpoint needs about {needed:,} bytes, its disk has {free:,} "
                         f"free: free some space or pick another --out_dir")


# a checkpoint holds fp32 weights, EMA and two AdamW moments; it is written beside the previous one.
# The meta device counts the parameters without allocating them.
with torch.device('meta'):
    check_out_dir(out_dir, 4 * 4 * DiT(model_cfg).num_params())


def open_array(path):
    """np.load(path, mmap_mode='r') of a float16 array, or SystemExit naming the file, expected and actual values."""
    try:
        array = np.load(path, mmap_mode='r')
    except ValueError as e:  # a truncated file: its header promises more bytes than the file holds
        with open(path, 'rb') as f:
            try:
                version = np.lib.format.read_magic(f)
                shape, _, dt = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                else np.lib.format.read_array_header_2_0)(f)
                expected = f"{f.tell() + math.prod(shape) * dt.itemsize:,} bytes ({dt} {list(shape)})"
            except ValueError:
                expected = "a .npy header"
        raise SystemExit(f"{path} is truncated or corrupt: expected {expected}, the file has "
                         f"{os.path.getsize(path):,} bytes ({e}); re-run extract.py")
    if array.dtype != np.float16:
        raise SystemExit(f"{path}: dtype {array.dtype}, expected float16 (the data folder format); re-run extract.py")
    return array


def open_split(key, folder):
    """Check one data folder against meta.json and the model; return its paths, meta, rows and EVA token count."""
    meta_path = os.path.join(folder, 'meta.json')
    if os.path.isdir(folder) and not os.path.exists(meta_path):
        raise SystemExit(f"{key}: {meta_path} is missing: {folder!r} is not a data folder written by extract.py; "
                         f"re-run `python extract.py {config_files}`")
    if not os.path.exists(meta_path):
        raise SystemExit(f"{key}: data folder {folder!r} not found (no {meta_path}); create it with "
                         f"`python extract.py {config_files}` (it writes data_dir/<split>), or point --{key} "
                         f"at an existing folder")
    with open(meta_path) as f:
        meta = json.load(f)
    if not meta.get('complete'):
        raise SystemExit(f"{meta_path}: the extraction is incomplete ('complete' is not true); "
                         f"finish it with `python extract.py {config_files}`")
    paths = {name: os.path.join(folder, f'{name}.npy') for name in ('clip', 'eva')}
    shapes = {}
    for name, path in paths.items():
        if not os.path.exists(path):
            raise SystemExit(f"{path} is missing: {folder!r} is not a complete data folder")
        shapes[name] = open_array(path).shape
        if len(shapes[name]) != 3:
            raise SystemExit(f"{path}: expected a 3-d array [rows, tokens, dim], got shape {shapes[name]}")
    (n, T, D), (n_eva, M, C) = shapes['clip'], shapes['eva']
    for name in ('clip', 'eva'):
        said = [meta.get(name, {}).get('tokens'), meta.get(name, {}).get('dim')]
        if said != list(shapes[name][1:]):
            raise SystemExit(f"{meta_path} describes {name} tokens {said} (model {meta.get(name, {}).get('model')!r}), "
                             f"but {paths[name]} holds {list(shapes[name][1:])}: meta.json is from another "
                             f"extraction; re-run extract.py")
    if not n == n_eva == meta['count']:
        raise SystemExit(f"{folder}: clip.npy has {n} rows, eva.npy {n_eva}, meta.json count {meta['count']}: "
                         f"they must agree; re-run extract.py")
    if T != n_tokens:
        raise SystemExit(f"{paths['clip']}: {T} tokens per row, but the model's grid_size={model_cfg.grid_size} "
                         f"needs {n_tokens}")
    if D != model_cfg.in_dim:
        raise SystemExit(f"{paths['clip']}: token width {D}, but the model has in_dim={model_cfg.in_dim}")
    if C != model_cfg.cond_dim:
        raise SystemExit(f"{paths['eva']}: token width {C}, but the model has cond_dim={model_cfg.cond_dim}")
    if model_cfg.cross_rope and M != n_tokens:
        raise SystemExit(f"{paths['eva']}: {M} tokens per row, but cross_rope=True needs the EVA tokens on the "
                         f"model's {model_cfg.grid_size}x{model_cfg.grid_size} grid ({n_tokens} tokens)")
    for stat in ('clip_mean', 'clip_std'):
        if len(meta.get(stat, [])) != D:
            raise SystemExit(f"{meta_path}: {stat} should have {D} values (the CLIP token width), "
                             f"got {len(meta.get(stat, []))}")
    if not all(s > 0 and math.isfinite(s) for s in meta['clip_std']):
        raise SystemExit(f"{meta_path}: clip_std must be positive and finite in every channel")
    rows = np.arange(0, n, -(-n // 32))  # up to 32 evenly spaced rows: a cheap check for a broken extraction
    for name, path in paths.items():
        values = np.load(path, mmap_mode='r')[rows].astype(np.float32)
        bad = ~np.isfinite(values).reshape(len(rows), -1).all(1)
        if bad.any():
            row = values[bad.argmax()]
            raise SystemExit(f"{path}: row {rows[bad.argmax()]} has {int(np.isnan(row).sum())} NaN and "
                             f"{int(np.isinf(row).sum())} inf values, expected finite tokens ({int(bad.sum())} of "
                             f"{len(rows)} rows checked are bad); re-run extract.py")
    return {'clip': paths['clip'], 'eva': paths['eva'], 'meta': meta, 'start': 0, 'count': n, 'eva_tokens': M}


train_split = open_split('train_data', train_data)
if val_fraction > 0:
    n_val = round(train_split['count'] * val_fraction)
    if not 0 < n_val < train_split['count']:
        raise SystemExit(f"config error: val_fraction={val_fraction} of {train_split['count']} rows leaves "
                         f"{n_val} validation rows; it needs at least one, and one training row")
    val_split = {**train_split, 'start': train_split['count'] - n_val, 'count': n_val}
    train_split['count'] -= n_val
else:
    if not val_data:
        raise SystemExit("config error: set val_data to a data folder, "
                         "or val_fraction > 0 to hold out part of train_data")
    val_split = open_split('val_data', val_data)
    if val_split['eva_tokens'] != train_split['eva_tokens']:
        raise SystemExit(f"{val_split['eva']} has {val_split['eva_tokens']} tokens per row, "
                         f"{train_split['eva']} has {train_split['eva_tokens']}: the splits must agree")
n_train = train_split['count']
data_stats = checkpoint['data_stats'] if checkpoint else {k: train_split['meta'][k] for k in ('clip_mean', 'clip_std')}
clip_mean = torch.tensor(data_stats['clip_mean'], dtype=torch.float32, device=device)
clip_std = torch.tensor(data_stats['clip_std'], dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=2)
def epoch_order(epoch):
    """The order of the training rows in one epoch: a permutation seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_train)


def stream_rows(start, count):
    """Rows at positions [start, start + count) of the endless training stream (epoch after epoch)."""
    positions = np.arange(start, start + count)
    rows = np.empty(count, dtype=np.int64)
    for epoch in np.unique(positions // n_train):
        at = positions // n_train == epoch
        rows[at] = epoch_order(int(epoch))[positions[at] % n_train]
    return rows


def read_rows(split, rows):
    """Standardized CLIP targets [B, L, in_dim] and raw EVA tokens [B, M, cond_dim] of split rows, on device."""
    rows = np.sort(rows) + split['start']  # ascending reads are kinder to the page cache
    # open the arrays afresh for every batch: a long-lived mapping of a huge file keeps growing the
    # resident memory (nanoGPT #287); fancy indexing copies just these rows
    clip = torch.from_numpy(np.load(split['clip'], mmap_mode='r')[rows])
    eva = torch.from_numpy(np.load(split['eva'], mmap_mode='r')[rows])
    if device_type == 'cuda':
        clip, eva = clip.pin_memory().to(device, non_blocking=True), eva.pin_memory().to(device, non_blocking=True)
    else:
        clip, eva = clip.to(device), eva.to(device)
    return (clip.float() - clip_mean) / clip_std, eva.float()


def micro_batch_start(samples_seen, j):
    """Stream position of global micro-batch j of the iteration that starts at samples_seen."""
    return samples_seen + j * batch_size


def draw_seed(*key):
    """A well-mixed 64-bit generator seed for (seed, *key)."""
    return int(np.random.SeedSequence([seed, *key]).generate_state(1, np.uint64)[0])


def get_lr(it):
    """Linear warm-up to learning_rate, then cosine decay to min_lr at lr_decay_iters (nanoGPT's schedule)."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def peak_flops():
    """Dense bf16/fp16 tensor-core peak of one GPU from its name (TF32 is half); None where unknown (CPU)."""
    if device_type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    table = [('H100 PCIe', 756e12), ('H100', 989e12), ('H200', 989e12), ('GH200', 989e12), ('A100', 312e12)]
    peak = next((value for key, value in table if key in name), None)
    return None if peak is None else peak / (2 if ptdtype == torch.float32 else 1)


def peak_memory_mb():
    """Peak device memory allocated on CUDA; the process's peak resident memory on CPU."""
    if device_type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def log_record(record, line):
    """Print a human line and append the record to metrics.jsonl (and wandb) on rank 0."""
    if not master_process:
        return
    print(line, flush=True)
    with open(metrics_path, 'a') as f:
        f.write(json.dumps(record) + '\n')
    if wandb_log:
        wandb.log(record, step=record['iter'])


# model, EMA, optimizer
torch.manual_seed(seed)
with torch.device(device):
    raw_model = DiT(model_cfg)
ema_model = copy.deepcopy(raw_model).float().requires_grad_(False).eval()  # fp32, outside DDP
if checkpoint:
    try:
        raw_model.load_state_dict(checkpoint['model'])
        ema_model.load_state_dict(checkpoint['ema'])
    except RuntimeError as e:  # e.g. written by another version of model.py
        raise SystemExit(f"{ckpt_path}: its weights do not fit the DiT its model_args describe: {e}")
params = [p for p in raw_model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(
    [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},  # matrices decay,
     {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}],           # gains and biases not
    lr=learning_rate, betas=(beta1, beta2), fused=True)  # one fused kernel per step, on CUDA and CPU alike
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
iter_num, best_val_loss, samples_seen = 0, float('inf'), 0
if checkpoint:
    optimizer.load_state_dict(checkpoint['optimizer'])
    if checkpoint['scaler']:  # empty when saved by a disabled (non-float16) scaler
        scaler.load_state_dict(checkpoint['scaler'])
    iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
    samples_seen = checkpoint['data_position']['samples_seen']
    if checkpoint['data_position']['train_rows'] != n_train:
        # another training set: its epoch orders differ, so start a fresh epoch of it
        samples_seen = (checkpoint['data_position']['epoch'] + 1) * n_train
        if master_process:
            print(f"resume: train_data has {n_train} rows, the checkpoint was trained on "
                  f"{checkpoint['data_position']['train_rows']}: starting a new epoch")
    del checkpoint  # drop the mapped file before training
resumed_at = iter_num if init_from == 'resume' else None
model = torch.compile(raw_model) if compile else raw_model  # compile the raw model, then wrap it
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)
ema_params, model_params = list(ema_model.parameters()), list(raw_model.parameters())
flops_per_iter = raw_model.flops_per_sample(train_split['eva_tokens']) * 3 * global_batch
flow_generator = torch.Generator(device=device)

if master_process:
    os.makedirs(out_dir, exist_ok=True)
    if init_from == 'scratch':
        open(metrics_path, 'w').close()  # a fresh run starts a fresh log
    if wandb_log:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)
    if init_from == 'resume':
        log_record({'kind': 'resume', 'iter': iter_num}, f"resuming {ckpt_path} at iteration {iter_num}")
    print(f"DiT: {raw_model.num_params() / 1e6:.2f}M parameters, {flops_per_iter / global_batch / 3 / 1e9:.3f} GFLOPs "
          f"per sample forward; {world_size} rank(s) x {micro_steps} micro-step(s) x {batch_size} = "
          f"{global_batch} samples per iteration; {n_train} train rows, {val_split['count']} val rows; "
          f"{device} {dtype}{' compiled' if compile else ''}")


@torch.no_grad()
def update_ema(step):
    """EMA of the weights, its decay warmed up so early averages are not dominated by the random init."""
    decay = min(ema_decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)


def eval_noise(first, count, shape):
    """Noise for val items [first, first + count): item i's is fixed by seed i alone (same in every run)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(i))
                        for i in range(first, first + count)]).to(device)


@torch.no_grad()
def evaluate():
    """Validation flow loss (raw and EMA weights) on a fixed t grid with fixed noise; EMA generation check.

    Batches are dealt round-robin to the ranks and the sums all-reduced, so the numbers do not depend
    on the number of ranks.
    """
    raw_model.eval()
    t_grid = (torch.arange(8, device=device) + 0.5) / 8
    n_loss, n_gen = min(val_split['count'], eval_iters * batch_size), min(val_split['count'], eval_gen_items)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss raw, loss EMA, token cos, pooled cos
    for b, first in enumerate(range(0, max(n_loss, n_gen), batch_size)):
        if b % world_size != rank:
            continue
        count = min(batch_size, max(n_loss, n_gen) - first)
        x1, cond = read_rows(val_split, np.arange(first, first + count))
        x0 = eval_noise(first, count, x1.shape[1:])
        n = max(0, min(count, n_loss - first))  # items of this batch in the loss set
        v = flow.velocity_target(x0[:n], x1[:n], sigma_min)
        for t in t_grid if n else []:
            t = t.expand(n)
            xt = flow.interpolate(x0[:n], x1[:n], t, sigma_min)
            for k, m in enumerate((raw_model, ema_model)):
                with ctx:
                    pred = m(xt, t, cond[:n])
                sums[k] += F.mse_loss(pred.float(), v, reduction='none').mean(dim=(1, 2)).sum() / len(t_grid)
        n = max(0, min(count, n_gen - first))  # items of this batch in the generation set
        if n:
            with ctx:
                x = flow.sample(flow.guided(ema_model, cond[:n]), x0[:n], steps=eval_gen_steps, method='euler')
            generated, real = x.float() * clip_std + clip_mean, x1[:n] * clip_std + clip_mean
            sums[2] += F.cosine_similarity(generated, real, dim=-1).mean(dim=1).sum()
            sums[3] += F.cosine_similarity(generated.mean(dim=1), real.mean(dim=1), dim=-1).sum()
    if ddp:
        dist.all_reduce(sums)
    raw_model.train()
    sums = sums.tolist()
    return {'val_loss': sums[0] / n_loss, 'val_loss_ema': sums[1] / n_loss,
            'gen_token_cosine': sums[2] / n_gen, 'gen_pooled_cosine': sums[3] / n_gen}


def save_checkpoint():
    """Write ckpt.pt atomically: temporary file, fsync, rename; a crash leaves the previous one intact."""
    ckpt = {
        'model': raw_model.state_dict(), 'ema': ema_model.state_dict(),
        'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
        'model_args': dataclasses.asdict(model_cfg), 'iter_num': iter_num, 'best_val_loss': best_val_loss,
        'config': config, 'data_stats': data_stats,
        # training draws come from generators seeded by (seed, iter, micro-batch): the seed is the whole RNG state
        'rng': {'seed': seed, 'scheme': 'torch.Generator seeded per (seed, iter_num, global micro-batch)'},
        'data_position': {'samples_seen': samples_seen, 'epoch': samples_seen // n_train,
                          'index': samples_seen % n_train, 'train_rows': n_train},
    }
    tmp = ckpt_path + '.tmp'
    with open(tmp, 'wb') as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_path)
    dir_fd = os.open(out_dir, os.O_RDONLY)
    os.fsync(dir_fd)
    os.close(dir_fd)


def stop(reason):
    """End every rank with a message; the last good checkpoint stays as it is."""
    if ddp:
        dist.destroy_process_group()
    kept = f"{ckpt_path} (iteration {saved_iter}) is kept" if saved_iter else "no checkpoint was saved yet"
    raise SystemExit(f"{reason}: stopping; {kept}. Check the data for inf/NaN, or lower learning_rate")


# training loop
saved_iter = resumed_at
x1, cond = read_rows(train_split, stream_rows(micro_batch_start(samples_seen, rank * micro_steps), batch_size))
if device_type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)
t0 = time.time()
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr

    # evaluate and save at every eval_interval and at the end (not again at the iteration we resumed from)
    if (iter_num % eval_interval == 0 or iter_num == max_iters) and iter_num != resumed_at:
        t_eval = time.time()
        metrics = evaluate()
        log_record({'kind': 'eval', 'iter': iter_num, **metrics, 'eval_s': time.time() - t_eval},
                   f"eval {iter_num}: val loss {metrics['val_loss']:.4f} (EMA {metrics['val_loss_ema']:.4f}), "
                   f"EMA generation cosine: tokens {metrics['gen_token_cosine']:.4f}, "
                   f"pooled {metrics['gen_pooled_cosine']:.4f}")
        if not math.isfinite(metrics['val_loss']):  # never overwrite a good checkpoint with broken weights
            stop(f"non-finite validation loss ({metrics['val_loss']}) at iteration {iter_num}")
        improved = metrics['val_loss'] < best_val_loss
        best_val_loss = min(best_val_loss, metrics['val_loss'])
        if iter_num > 0 and (improved or always_save_checkpoint):
            if master_process:
                save_checkpoint()
                print(f"saved {ckpt_path} (iteration {iter_num})")
            saved_iter = iter_num
            if ddp:
                dist.barrier()
        t0 = time.time()
    if iter_num >= max_iters:
        break

    loss_sum = torch.zeros((), device=device)
    for micro_step in range(micro_steps):
        j = rank * micro_steps + micro_step  # global micro-batch index: the same work whatever the world size
        if ddp:
            model.require_backward_grad_sync = micro_step == micro_steps - 1  # all-reduce on the last only
        flow_generator.manual_seed(draw_seed(iter_num, j))
        with ctx:
            loss = flow.flow_loss(model, x1, cond, cond_drop_prob=cond_drop_prob, t_sampling=t_sampling,
                                  sigma_min=sigma_min, generator=flow_generator)
        scaler.scale(loss / micro_steps).backward()
        loss_sum += loss.detach()
        # read the next micro-batch (of this iteration or the next) while the device works through this one
        next_start = (micro_batch_start(samples_seen, j + 1) if micro_step + 1 < micro_steps
                      else micro_batch_start(samples_seen + global_batch, rank * micro_steps))
        x1, cond = read_rows(train_split, stream_rows(next_start, batch_size))
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model_params, grad_clip if grad_clip > 0 else float('inf'))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    update_ema(iter_num)
    if ddp:
        dist.all_reduce(loss_sum)
    lossf = loss_sum.item() / gradient_accumulation_steps  # mean over the global batch, the same on every rank
    if not math.isfinite(lossf):
        stop(f"non-finite loss ({lossf}) at iteration {iter_num}")
    t1 = time.time()
    dt, t0 = t1 - t0, t1
    if iter_num % log_interval == 0 or iter_num == max_iters - 1:
        samples_per_s = global_batch / dt
        peak = peak_flops()
        mfu = flops_per_iter / dt / (peak * world_size) if peak else None
        record = {'kind': 'train', 'iter': iter_num, 'loss': lossf, 'lr': lr, 'grad_norm': grad_norm.item(),
                  'samples_per_s': samples_per_s, 'tokens_per_s': samples_per_s * n_tokens, 'mfu': mfu,
                  'ms_per_iter': dt * 1000, 'epoch': samples_seen / n_train, 'peak_mem_mb': peak_memory_mb()}
        log_record(record, f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, grad norm {record['grad_norm']:.3f}, "
                           f"{samples_per_s:.1f} samples/s, " + (f"mfu {mfu * 100:.1f}%, " if mfu else "")
                           + f"{dt * 1000:.1f} ms/iter")
    iter_num += 1
    samples_seen += global_batch

if master_process:
    print(f"done: {iter_num} iterations, best val loss {best_val_loss:.4f}, checkpoint {ckpt_path}")
    if wandb_log:
        wandb.finish()
if ddp:
    dist.destroy_process_group()
