"""Train the DiT with flow matching on extracted token folders (format: data.py).

python train.py config/demo.py                                                  one GPU or the CPU
torchrun --standalone --nproc_per_node=8 train.py config/dit_large.py           one node (several: see README)
torchrun --standalone --nproc_per_node=8 train.py config/dit_large.py --parallel=fsdp    sharded (FSDP2)
torchrun --standalone --nproc_per_node=8 --max-restarts=3 train.py config/dit_large.py --init_from=auto
    survives crashes: 'auto' resumes out_dir/ckpt.pt when it exists (export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)

Determinism: iteration i's global batch is a fixed slice of a seeded per-epoch permutation, split into
gradient_accumulation_steps micro-batches; micro-batch j draws noise, times and condition drops from a generator
seeded by (seed, i, j). So any number of ranks follows the same loss curve, and a resume continues exactly.
batch_size is per rank and micro-step, gradient_accumulation_steps global. One train.py at a time holds out_dir (a
lock). Checkpoints (format and identity: data.py) are written every eval_interval and at the end; keep_interval
also keeps EMA-only ckpt_iterN.pt for sample.py and sweep.py. metrics.jsonl has one JSON object per log line (loss,
lr, grad norm, samples/s, MFU on CUDA) and per eval (validation loss on a fixed t grid and fixed noise, the EMA
generation check); a resume first drops the records past its checkpoint. val_fraction > 0 validates on the last
rows of train_data (the held-out slice that also chooses samplers and baselines), never on the reported split.
objective='regression' trains the same DiT by plain MSE to the target in one forward: the baseline beside B.
parallel='fsdp' shards weights, gradients, AdamW state and EMA (FSDP2: per Block and at the root, bf16 compute, fp32
reduction) within a node and replicates them across nodes; its checkpoints are the same whole state dicts (gathered a
tensor at a time onto rank 0's CPU), so sample.py reads them and a run resumes in either mode. Gradient clipping is
folded into the fused AdamW step (grad_scale): the norm is the only extra pass.
"""
import copy
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import flow
from configurator import require_positive
from model import DiT, DiTConfig
from runtime import autocast, end_process_group, init_device, peak_flops

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'
data_dir = 'data'  # extract.py's output: data_dir/<split>
splits = ('train2017', 'val2017')
train_data = ''  # '' = data_dir/splits[0]
val_data = ''  # '' = data_dir/splits[1]
val_fraction = 0.0  # > 0: validate on the last fraction of train_data instead of val_data
init_from = 'scratch'  # 'scratch', 'resume' (from out_dir/ckpt.pt) or 'auto' (resume if out_dir/ckpt.pt exists)
overwrite = False  # allow init_from='scratch' to replace an existing out_dir/ckpt.pt
eval_interval = 1000
eval_iters = 20  # validation batches (of batch_size) for the fixed-grid flow loss
eval_gen_items = 64  # validation items generated with the EMA model at each eval
eval_gen_steps = 10  # Euler steps for that generation check
log_interval = 10  # the loss is read from the device only every log_interval iterations
always_save_checkpoint = True  # False: save only when the validation loss improves
keep_interval = 0  # > 0: also keep out_dir/ckpt_iter{N:06d}.pt (EMA weights only) every keep_interval iterations
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
# objective (flow.py): 'flow' = flow matching; 'regression' = the same DiT trained by plain MSE on the target in one
# forward from the EVA tokens, the equal-architecture baseline beside B
objective = 'flow'
t_sampling = 'logit_normal'  # flow.T_SAMPLINGS; logit-normal: t = sigmoid(N(t_mean, t_std))
t_mean = 0.0
t_std = 1.0
sigma_min = 1e-4
cond_drop_prob = 0.1
# model (model.py DiTConfig; these defaults are the seed's DiT, config/dit_large.py)
dim = 1792
n_layers = 24
n_heads = 28
n_kv_heads = None  # None = n_heads; fewer = grouped-query attention
in_dim = 1024  # CLIP ViT-L/14 token width
cond_dim = 4096  # EVA-CLIP-8B token width
grid_size = 16
ffn_multiple_of = 256
ffn_dim_multiplier = None
norm_eps = 1e-5
qk_norm = True
rope_theta = 10000.0
cross_rope = True
t_scale = 1000.0  # time features read t_scale * t (model.py): DiT's; 1 = Lumina-Next's (bench/RESULTS.md)
grad_checkpointing = False  # a runtime choice: may change on resume
# system
device = 'auto'  # 'auto' = cuda when available, else cpu; under torchrun each rank takes cuda:LOCAL_RANK
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
compile = True
# 'ddp': every rank holds the whole model, gradients, AdamW state and EMA; 'fsdp': FSDP2 shards them (per Block and
# at the root; bf16 compute, fp32 gradient reduction) over fsdp_shard_ranks ranks and replicates across the groups
parallel = 'ddp'
fsdp_shard_ranks = 0  # 0 = the ranks of one node (LOCAL_WORLD_SIZE): shard within a node, replicate across nodes
seed = 1337
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())
config_files = ' '.join(a for a in sys.argv[1:] if not a.startswith('--')) or '<your config>'
train_data, val_data = data.split_folders(data_dir, splits, train_data, val_data)
# -----------------------------------------------------------------------------

for key, allowed in (('init_from', ('scratch', 'resume', 'auto')), ('objective', flow.OBJECTIVES),
                     ('t_sampling', flow.T_SAMPLINGS), ('parallel', ('ddp', 'fsdp'))):
    if config[key] not in allowed:
        raise SystemExit(f"config error: {key} should be one of {', '.join(map(repr, allowed))}, "
                         f"got {config[key]!r}")
require_positive(config, 'batch_size', 'gradient_accumulation_steps', 'max_iters', 'eval_interval', 'eval_iters',
                 'log_interval')
device, rank, local_rank, world_size = init_device(device, dtype)
device_type = torch.device(device).type
if parallel == 'fsdp' and not dist.is_initialized():  # one process without torchrun: a group of one
    dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo', store=dist.HashStore(), rank=0, world_size=1)
distributed = dist.is_initialized()  # several ranks, or FSDP: collectives
master_process = rank == 0
if gradient_accumulation_steps % world_size:
    raise SystemExit(f"config error: gradient_accumulation_steps={gradient_accumulation_steps} (global) must be "
                     f"a multiple of the number of ranks, {world_size}")
micro_steps = gradient_accumulation_steps // world_size  # per rank
global_batch = batch_size * gradient_accumulation_steps
ckpt_path, metrics_path = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'metrics.jsonl')
if master_process:  # one run per out_dir: the lock is held to the end
    data.check_writable(out_dir, 0, 'out_dir', 'the run needs')
    out_lock = data.lock(out_dir, 'train.py')
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
if device_type == 'cuda':
    torch.set_float32_matmul_precision('high')  # TF32 matmuls (CUDA only: on CPU it could change float32 results)
ptdtype, ctx = getattr(torch, dtype), autocast(device, dtype)

# model, EMA, optimizer; on resume the model config and objective are the checkpoint's (grad_checkpointing stays a
# runtime choice)
checkpoint = data.load_checkpoint(ckpt_path, 'init_from=resume: out_dir') if init_from == 'resume' else None
model_args = {f.name: globals()[f.name] for f in dataclasses.fields(DiTConfig)}
run = {'id': data.new_id(), 'started': time.strftime('%Y-%m-%dT%H:%M:%S')}
if checkpoint:
    saved = {k: v for k, v in checkpoint['model_args'].items() if k != 'grad_checkpointing'}
    changed = {k: v for k, v in saved.items() if model_args.get(k) != v}
    if data.checkpoint_objective(checkpoint) != objective:
        changed['objective'] = objective = data.checkpoint_objective(checkpoint)
    if changed and master_process:
        print(f"resume: model settings come from {ckpt_path}: {changed}")
    model_args, run = {**saved, 'grad_checkpointing': grad_checkpointing}, checkpoint['run']
model_cfg = DiTConfig(**model_args)
n_tokens = model_cfg.grid_size ** 2
torch.manual_seed(seed)
with torch.device(device):
    raw_model = DiT(model_cfg)
ema_model = copy.deepcopy(raw_model).float().requires_grad_(False).eval()  # fp32, outside DDP
if checkpoint:
    raw_model.load_state_dict(data.model_from_checkpoint(checkpoint, 'model', ckpt_path).state_dict())
    ema_model.load_state_dict(checkpoint['ema'])
model = raw_model.compile_blocks() if compile else raw_model  # regional: compile time flat in depth; then wrap
if parallel == 'fsdp':  # in place: raw_model and ema_model now hold their shards (DTensors)
    shard_ranks = fsdp_shard_ranks or int(os.environ.get('LOCAL_WORLD_SIZE', world_size))
    if world_size % shard_ranks:
        raise SystemExit(f"config error: fsdp_shard_ranks={shard_ranks} must divide the number of ranks, {world_size}")
    mesh = init_device_mesh(device_type, (world_size // shard_ranks, shard_ranks), mesh_dim_names=('replicate', 'shard'))
    for module, param_dtype in ((raw_model, ptdtype), (ema_model, torch.float32)):
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in module.blocks:  # one all-gather a block, in turn: only a block at a time is whole
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, mp_policy=policy)
elif distributed:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)
params = [p for p in raw_model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(
    [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},  # matrices decay,
     {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}],           # gains and biases not
    lr=learning_rate, betas=(beta1, beta2), fused=True)  # one fused kernel per step, on CUDA and CPU alike
# the checkpoint numbers AdamW's parameters in this order, as optimizer.state_dict() does; FSDP's state dicts name them
names = {p: n for n, p in raw_model.named_parameters()}
optimizer_names = [names[p] for group in optimizer.param_groups for p in group['params']]
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
iter_num, best_val_loss, samples_seen = 0, float('inf'), 0


def renamed(state, keys):
    """An optimizer state dict with its parameter keys mapped through keys (indices <-> names)."""
    return {'state': {keys[k]: v for k, v in state['state'].items()},
            'param_groups': [{**group, 'params': [keys[k] for k in group['params']]} for group in state['param_groups']]}


if checkpoint:
    if parallel == 'fsdp':  # every rank reads the whole state and keeps its shards of it; a parameter that never had
        # a gradient (regression's null_cond) has no state, as optimizer.load_state_dict allows
        set_optimizer_state_dict(raw_model, optimizer, renamed(checkpoint['optimizer'], optimizer_names),
                                 options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        optimizer.load_state_dict(checkpoint['optimizer'])
    if checkpoint['scaler']:  # empty when saved by a disabled (non-float16) scaler
        scaler.load_state_dict(checkpoint['scaler'])
    iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
# stop now, not at a save: ckpt.pt's temporary copy is written beside it (twice its size while there is none yet),
# and every kept copy still to come (EMA only) stays
kept = (max_iters // keep_interval - iter_num // keep_interval) if keep_interval else 0
data.check_writable(out_dir, data.checkpoint_bytes(raw_model.num_params()) * (1 if os.path.exists(ckpt_path) else 2)
                    + kept * data.checkpoint_bytes(raw_model.num_params(), full=False), 'out_dir',
                    f'ckpt.pt (and {kept} kept copies) need')


def open_split(setting, folder):
    """A data folder that fits the model, checked for inf/NaN: its target rows with the arrays' paths, and meta."""
    meta = data.open_folder(folder, setting=setting, remedy=f"run `python extract.py {config_files}`")
    data.check_fits(meta, model_cfg)
    for path in meta['paths'].values():
        data.check_finite(path)
    return {**data.target(meta, folder), **meta['paths']}, meta


train_split, train_meta = open_split('train_data', train_data)
if val_fraction > 0:
    start, n_val = data.holdout_range(train_split['count'], val_fraction, train_data)
    val_split, train_split['count'] = {**train_split, 'start': start, 'count': n_val}, start
else:
    val_split, val_meta = open_split('val_data', val_data)
    if val_meta['shapes']['eva'][1:] != train_meta['shapes']['eva'][1:]:
        raise SystemExit(f"{val_split['eva']} holds {list(val_meta['shapes']['eva'])}, {train_split['eva']} "
                         f"{list(train_meta['shapes']['eva'])}: the splits must agree")
n_train = train_split['count']
data_stats = checkpoint['data_stats'] if checkpoint else {k: train_meta[k] for k in ('clip_mean', 'clip_std')}
clip_mean, clip_std = (torch.tensor(data_stats[k], device=device).float() for k in ('clip_mean', 'clip_std'))
if checkpoint:
    samples_seen = checkpoint['data_position']['samples_seen']
    if checkpoint['data_position']['train_rows'] != n_train:
        # another training set: its epoch orders differ, so start a fresh epoch of it
        samples_seen = (checkpoint['data_position']['epoch'] + 1) * n_train
        if master_process:
            print(f"resume: train_data has {n_train} rows, the checkpoint was trained on "
                  f"{checkpoint['data_position']['train_rows']}: starting a new epoch")
    del checkpoint  # drop the mapped file before training
resumed_at = iter_num if init_from == 'resume' else None
flops_per_iter = raw_model.flops_per_sample(train_meta['shapes']['eva'][1]) * 3 * global_batch
trained_on = {name: {k: split[k] for k in ('folder', 'id', 'start', 'count')} if split else None
              for name, split in (('train', train_split), ('holdout', val_split if val_fraction > 0 else None))}


def read_rows(split, rows):
    """Standardized CLIP targets [B, L, in_dim] and raw EVA tokens [B, M, cond_dim] of split rows, on device."""
    clip, eva = (torch.from_numpy(data.read_rows(split[name], rows + split['start'])) for name in ('clip', 'eva'))
    if device_type == 'cuda':
        clip, eva = clip.pin_memory().to(device, non_blocking=True), eva.pin_memory().to(device, non_blocking=True)
    return (clip.to(device).float() - clip_mean) / clip_std, eva.to(device).float()


def get_lr(it):
    """Linear warm-up to learning_rate, then cosine decay to min_lr at lr_decay_iters (nanoGPT's schedule)."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def peak_memory_mb():
    """Peak device memory on CUDA; on the CPU this process's own peak RSS (ru_maxrss would count its launcher)."""
    if device_type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM:')) / 1024


def log_record(record, line):
    """Print a human line and append the record to metrics.jsonl (and wandb) on rank 0."""
    if not master_process:
        return
    print(line, flush=True)
    with open(metrics_path, 'a') as f:
        f.write(json.dumps(record) + '\n')
    if wandb_log:
        wandb.log(record, step=record['iter'])


@torch.no_grad()
def update_ema(step):
    """EMA of the weights, its decay warmed up so early averages are not dominated by the random init."""
    decay = min(ema_decay, (1 + step) / (10 + step))
    ema_params, model_params = ([p.to_local() if isinstance(p, DTensor) else p for p in m.parameters()]
                                for m in (ema_model, raw_model))  # what this rank holds: under FSDP its shards
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)


def eval_batches(n):
    """This rank's batches of rows 0..n-1 (round-robin over the ranks), each with its weight in the sums. Under
    FSDP every forward is collective, so every rank runs every round: one with no rows left reruns the round's
    first batch at weight 0."""
    for first in range(0, n, world_size * batch_size):
        rows = np.arange(first + rank * batch_size, min(first + (rank + 1) * batch_size, n))
        if len(rows):
            yield rows, 1.0
        elif parallel == 'fsdp':
            yield np.arange(first, min(first + batch_size, n)), 0.0


@torch.no_grad()
def evaluate():
    """Validation loss (raw and EMA weights; flow: on a fixed t grid); EMA generation check. Row i's noise is
    flow.seeded_noise(seed, i), as in sample.py. Batches go round-robin to the ranks and the sums are
    all-reduced, so the numbers do not depend on the number of ranks."""
    raw_model.eval()
    n_loss, n_gen = min(val_split['count'], eval_iters * batch_size), min(val_split['count'], eval_gen_items)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss raw, loss EMA, token cos, pooled cos
    for rows, weight in eval_batches(n_loss):
        x1, cond = read_rows(val_split, rows)
        x0 = flow.seeded_noise(seed, rows, x1.shape[1:], device)
        for k, m in enumerate((raw_model, ema_model)):
            with ctx:
                losses = (flow.regression_losses(m, x1, cond)[0] if objective == 'regression' else
                          flow.validation_loss(m, x0, x1, cond, sigma_min))
                sums[k] += weight * losses.sum()
    check = flow.Sampler(method='euler', steps=eval_gen_steps).for_objective(objective)
    for rows, weight in eval_batches(n_gen):
        x1, cond = read_rows(val_split, rows)
        x0 = flow.seeded_noise(seed, rows, x1.shape[1:], device)
        with ctx:  # forward calls only (FSDP's hooks do not see DiT.encode_cond): the same result
            x = check.generate(ema_model, cond, x0, encode_once=False)
        generated, real = x.float() * clip_std + clip_mean, x1 * clip_std + clip_mean
        sums[2] += weight * F.cosine_similarity(generated, real, dim=-1).mean(dim=1).sum()
        sums[3] += weight * F.cosine_similarity(generated.mean(dim=1), real.mean(dim=1), dim=-1).sum()
    if distributed:
        dist.all_reduce(sums)
    if parallel == 'fsdp':  # a forward without backward leaves the roots' parameters whole: back to the shards
        raw_model.reshard()
        ema_model.reshard()
    raw_model.train()
    sums = sums.tolist()
    return {'val_loss': sums[0] / n_loss, 'val_loss_ema': sums[1] / n_loss,
            'gen_token_cosine': sums[2] / n_gen, 'gen_pooled_cosine': sums[3] / n_gen}


def state_dicts(keep):
    """The EMA, model and optimizer state dicts in the checkpoint's format: whole, on rank 0 (model and optimizer
    None when keep). Under FSDP every rank takes part: one tensor at a time is gathered and moved to rank 0's CPU,
    so no device ever holds the whole model."""
    if parallel == 'ddp':
        return ema_model.state_dict(), raw_model.state_dict(), optimizer.state_dict()
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    ema = get_model_state_dict(ema_model, options=whole)
    if keep:
        return ema, None, None
    optim = get_optimizer_state_dict(raw_model, optimizer, options=whole)  # {} off rank 0
    return ema, get_model_state_dict(raw_model, options=whole), optim and renamed(
        optim, {name: i for i, name in enumerate(optimizer_names)})


def save_checkpoint(path=ckpt_path, keep=False):
    """Write a checkpoint (format: data.py) atomically from rank 0 (every rank calls it); keep=True: the EMA
    weights only, for sampling."""
    ema, weights, optim = state_dicts(keep)
    if not master_process:
        return
    ckpt = {'ema': ema, 'model_args': dataclasses.asdict(model_cfg), 'iter_num': iter_num,
            'config': config, 'data_stats': data_stats, 'run': run, 'data': trained_on, 'objective': objective}
    if not keep:
        ckpt.update(model=weights, optimizer=optim, scaler=scaler.state_dict(),
                    best_val_loss=best_val_loss, data_position={'samples_seen': samples_seen, 'train_rows': n_train,
                    'epoch': samples_seen // n_train, 'index': samples_seen % n_train},
                    # training draws come from generators seeded by (seed, iter, micro-batch): the seed is the RNG state
                    rng={'seed': seed, 'scheme': 'torch.Generator seeded per (seed, iter_num, global micro-batch)'})
    data.save_checkpoint(path, ckpt)


def stop(reason):
    """End every rank (all reach this together) with a message and exit code 1; the last good checkpoint stays."""
    kept = f"{ckpt_path} (iteration {saved_iter}) is kept" if saved_iter else "no checkpoint was saved yet"
    message = f"{reason}: stopping; {kept}. Check the data for inf/NaN, or lower learning_rate"
    end_process_group(1, message)
    raise SystemExit(message)


def read_losses():
    """The global mean loss of each iteration since the last read: one device sync (and all-reduce) for all of
    them. A non-finite one stops the run here, before any checkpoint is written."""
    if not pending_losses:
        return []
    sums = torch.stack(pending_losses)
    if distributed:
        dist.all_reduce(sums)
    values = (sums / gradient_accumulation_steps).tolist()
    first_iter = iter_num - len(values) + 1
    pending_losses.clear()
    for i, value in enumerate(values):
        if not math.isfinite(value):
            stop(f"non-finite loss ({value}) at iteration {first_iter + i}")
    return values


if master_process:
    if init_from == 'scratch':
        open(metrics_path, 'w').close()  # a fresh run starts a fresh log
    else:  # records past the checkpoint (a killed run's last iterations) are logged again from here
        data.truncate_metrics(metrics_path, iter_num)
    if wandb_log:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)
    if init_from == 'resume':
        log_record({'kind': 'resume', 'iter': iter_num, 'run_id': run['id']},
                   f"resuming {ckpt_path} (run {run['id']}) at iteration {iter_num}")
    print(f"DiT: {raw_model.num_params() / 1e6:.2f}M parameters, {flops_per_iter / global_batch / 3 / 1e9:.3f} GFLOPs "
          f"per sample forward; {world_size} rank(s) x {micro_steps} micro-step(s) x {batch_size} = "
          f"{global_batch} samples per iteration; {n_train} train rows, {val_split['count']} val rows; "
          f"{device} {dtype}{' compiled' if compile else ''}; objective {objective}, run {run['id']}")

# training loop
saved_iter = resumed_at
flow_generator = torch.Generator(device=device)
pending_losses = []  # per-iteration loss sums on the device, read every log_interval iterations
first_start = samples_seen + rank * micro_steps * batch_size  # this rank's first micro-batch
x1, cond = read_rows(train_split, data.stream_rows(seed, n_train, first_start, batch_size))
if device_type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)
t0, logged_iter = time.time(), iter_num
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group['lr'] = lr

    if keep_interval and iter_num % keep_interval == 0 and 0 < iter_num != resumed_at:
        save_checkpoint(os.path.join(out_dir, f'ckpt_iter{iter_num:06d}.pt'), keep=True)
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
            save_checkpoint()
            if master_process:
                print(f"saved {ckpt_path} (iteration {iter_num})")
            saved_iter = iter_num
            if distributed:
                dist.barrier()
        t0, logged_iter = time.time(), iter_num
    if iter_num >= max_iters:
        break

    loss_sum = torch.zeros((), device=device)
    for micro_step in range(micro_steps):
        j = rank * micro_steps + micro_step  # global micro-batch index: the same work whatever the world size
        if isinstance(model, DDP):
            model.require_backward_grad_sync = micro_step == micro_steps - 1  # all-reduce on the last only
        elif parallel == 'fsdp':  # reduce-scatter every micro-step (sharded gradients); across nodes on the last
            model.set_requires_all_reduce(micro_step == micro_steps - 1)
        flow_generator.manual_seed(flow.seed_for(seed, iter_num, j))
        with ctx:
            losses, t = (flow.regression_losses(model, x1, cond) if objective == 'regression' else
                         flow.flow_losses(model, x1, cond, cond_drop_prob, t_sampling, t_mean,
                                          t_std, sigma_min, flow_generator))
            loss = losses.mean()  # [B] at times t [B]: weight over t here, (w(t) * losses).mean()
        scaler.scale(loss / micro_steps).backward()
        loss_sum += loss.detach()
        # read the next micro-batch (of this iteration or the next) while the device works through this one
        next_start = samples_seen + (j + 1 if micro_step + 1 < micro_steps
                                     else gradient_accumulation_steps + rank * micro_steps) * batch_size
        x1, cond = read_rows(train_split, data.stream_rows(seed, n_train, next_start, batch_size))
    scaler.unscale_(optimizer)  # float16 only
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])  # regression: no null_cond
    grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm  # FSDP: already reduced
    # clipping folded into the fused step, which divides each gradient by grad_scale as it reads it: no pass of its own
    optimizer.grad_scale = ((grad_norm + 1e-6) / grad_clip).clamp(min=1.0) if grad_clip > 0 else None
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    update_ema(iter_num)
    pending_losses.append(loss_sum)
    # the next iteration may evaluate and save: its losses are read (and checked) before that
    if iter_num % log_interval == 0 or (iter_num + 1) % eval_interval == 0 or iter_num == max_iters - 1:
        lossf = read_losses()[-1]
        t1 = time.time()
        dt, t0 = (t1 - t0) / (iter_num + 1 - logged_iter), t1  # mean over the iterations since the last read
        logged_iter = iter_num + 1
        samples_per_s = global_batch / dt
        peak = peak_flops(torch.cuda.get_device_name(device), ptdtype) if device_type == 'cuda' else None
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
end_process_group()  # every rank: barrier, group torn down, exit 0 (runtime.py says why not by returning)
