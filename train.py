"""Train the DiT with flow matching on extracted token folders (format: data.py).

python train.py config/demo.py                                        one GPU or the CPU
torchrun --standalone --nproc_per_node=8 train.py config/dit_large.py     one node (more: README)
torchrun --standalone --nproc_per_node=8 train.py config/dit_large.py --parallel=fsdp   sharded
torchrun ... --max-restarts=3 train.py config/dit_large.py --init_from=auto    survives crashes
    (resumes out_dir/ckpt.pt when it exists; export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)

Determinism: iteration i's global batch is a fixed slice of a seeded per-epoch permutation, in
gradient_accumulation_steps (global) micro-batches of batch_size (per rank); micro-batch j draws its
noise, times and condition drops from a generator seeded by (seed, i, j): any number of ranks
follows the same loss curve, and a resume continues exactly. metrics.jsonl: a JSON object per log
line and per eval (validation loss on a fixed t grid and noise, EMA generation check); a resume
drops the records past its checkpoint. Checkpoints (format: data.py): every eval_interval, at the
end, and EMA-only ckpt_iterN.pt every keep_interval. val_fraction > 0: validate on a held-out slice.
"""
import copy
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import flow
import runtime
from configurator import require_positive
from model import DiT, DiTConfig

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'
data_dir = 'data'  # extract.py's output: data_dir/<split>
splits = ('train2017', 'val2017')
train_data = ''  # '' = data_dir/splits[0]
val_data = ''  # '' = data_dir/splits[1]
val_fraction = data.VAL_FRACTION  # > 0: validate on the last fraction of train_data, not val_data
init_from = 'scratch'  # 'scratch', 'resume' (out_dir/ckpt.pt) or 'auto' (resume if it exists)
overwrite = False  # allow init_from='scratch' to replace an existing out_dir/ckpt.pt
eval_interval = 1000
eval_iters = 20  # validation batches (of batch_size) for the fixed-grid flow loss
eval_gen_items = 64  # validation items generated with the EMA model at each eval
eval_gen_steps = 10  # Euler steps for that generation check
log_interval = 10  # the loss is read from the device only every log_interval iterations
always_save_checkpoint = True  # False: save only when the validation loss improves
keep_interval = 0  # > 0: also keep out_dir/ckpt_iter{N:06d}.pt (EMA weights only) this often
wandb_log = False
wandb_project = 'blip3o-dit'
wandb_run_name = 'dit'
# batch: the global batch is batch_size * gradient_accumulation_steps samples
batch_size = 32  # per rank and micro-step
gradient_accumulation_steps = 8  # global; each of the world_size ranks does 1/world_size of them
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
# objective (flow.py): 'flow' = flow matching; 'regression' = the same DiT trained by plain MSE,
# one forward from the EVA tokens: the equal-architecture baseline beside B
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
t_scale = 1000.0  # time features read t_scale * t: DiT's; 1 = Lumina-Next's (bench/RESULTS.md)
grad_checkpointing = False  # a runtime choice: may change on resume
# system
device = 'auto'  # 'auto' = cuda when available, else cpu; under torchrun cuda:LOCAL_RANK
dtype = 'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32'
compile = True
parallel = 'ddp'  # 'ddp': every rank holds everything; 'fsdp': runtime.parallelize shards it
fsdp_shard_ranks = 0  # 0 = the ranks of one node (LOCAL_WORLD_SIZE): replicate across nodes
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
require_positive(config, 'batch_size', 'gradient_accumulation_steps', 'max_iters', 'eval_interval',
                 'eval_iters', 'log_interval')
sharded = parallel == 'fsdp'  # without torchrun still a process group (of one)
device, rank, local_rank, world_size = runtime.init_device(device, dtype, group=sharded)
device_type = torch.device(device).type
distributed = dist.is_initialized()  # several ranks, or FSDP: collectives
master_process = rank == 0
if gradient_accumulation_steps % world_size:
    raise SystemExit(f"config error: gradient_accumulation_steps={gradient_accumulation_steps} "
                     f"(global) must be a multiple of the number of ranks, {world_size}")
micro_steps = gradient_accumulation_steps // world_size  # per rank
global_batch = batch_size * gradient_accumulation_steps
ckpt_path, metrics_path = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'metrics.jsonl')
if master_process:  # one run per out_dir: the lock is held to the end
    data.check_writable(out_dir, 0, 'out_dir', 'the run needs')
    out_lock = data.lock(out_dir, 'train.py')
if init_from == 'auto':  # every rank decides alike: rank 0 writes only after all ranks started
    init_from = 'resume' if os.path.exists(ckpt_path) else 'scratch'
    restart = int(os.environ.get('TORCHELASTIC_RESTART_COUNT', 0))  # > 0: torchrun re-launched
    if master_process:
        print("init_from='auto': " + (f"resuming {ckpt_path}" if init_from == 'resume' else
                                       f"no {ckpt_path}, starting from scratch")
              + (f" (torchrun restart {restart})" if restart else ''))
if init_from == 'scratch' and os.path.exists(ckpt_path) and not overwrite:
    raise SystemExit(f"{ckpt_path} already exists: continue it with --init_from=resume, start over "
                     f"with --overwrite=True (replaces it), or pick another --out_dir")
if device_type == 'cuda':  # TF32 matmuls (on CPU it could change float32 results)
    torch.set_float32_matmul_precision('high')
ptdtype, ctx = getattr(torch, dtype), runtime.autocast(device, dtype)

# model, EMA, optimizer; a resume takes the model config and objective from the checkpoint
checkpoint = (data.load_checkpoint(ckpt_path, 'init_from=resume: out_dir')
              if init_from == 'resume' else None)
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
    raw_model.load_state_dict(
        data.model_from_checkpoint(checkpoint, 'model', ckpt_path).state_dict())
    ema_model.load_state_dict(checkpoint['ema'])
# regional compilation (compile time flat in depth), then DDP, or FSDP shards in place
model = runtime.parallelize(raw_model.compile_blocks() if compile else raw_model, ema_model,
                            parallel, fsdp_shard_ranks, world_size, local_rank, ptdtype)
params = [p for p in raw_model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(
    [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},  # matrices,
     {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}],  # not gains and biases
    lr=learning_rate, betas=(beta1, beta2), fused=True)  # one fused kernel a step, CUDA and CPU
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
iter_num, best_val_loss, samples_seen = 0, float('inf'), 0
if checkpoint:
    runtime.load_optimizer(raw_model, optimizer, checkpoint['optimizer'], sharded)
    if checkpoint['scaler']:  # empty when saved by a disabled (non-float16) scaler
        scaler.load_state_dict(checkpoint['scaler'])
    iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
# stop now, not at a save: room for ckpt.pt's temporary copy beside it and the kept copies
kept = (max_iters // keep_interval - iter_num // keep_interval) if keep_interval else 0
data.check_writable(
    out_dir, data.checkpoint_bytes(raw_model.num_params()) * (1 if os.path.exists(ckpt_path) else 2)
    + kept * data.checkpoint_bytes(raw_model.num_params(), full=False), 'out_dir',
    f'ckpt.pt (and {kept} kept copies) need')


def open_split(setting, folder):
    """A data folder that fits the model, checked for inf/NaN: (target rows and paths, meta)."""
    remedy = f"run `python extract.py {config_files}`"
    meta = data.open_folder(folder, setting=setting, remedy=remedy)
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
        raise SystemExit(f"{val_split['eva']} holds {list(val_meta['shapes']['eva'])}, "
                         f"{train_split['eva']} {list(train_meta['shapes']['eva'])}: "
                         "the splits must agree")
n_train = train_split['count']
stats = ('clip_mean', 'clip_std')
data_stats = checkpoint['data_stats'] if checkpoint else {k: train_meta[k] for k in stats}
clip_mean, clip_std = (torch.tensor(data_stats[k], device=device).float() for k in stats)
if checkpoint:
    samples_seen, note = data.resume_position(checkpoint, n_train)
    if note and master_process:
        print(note)
    del checkpoint  # drop the mapped file before training
resumed_at = iter_num if init_from == 'resume' else None
flops_per_iter = raw_model.flops_per_sample(train_meta['shapes']['eva'][1]) * 3 * global_batch
trained_on = {name: {k: split[k] for k in ('folder', 'id', 'start', 'count')} if split else None
              for name, split in (('train', train_split),
                                  ('holdout', val_split if val_fraction > 0 else None))}


def read_rows(split, rows):
    """Standardized CLIP targets [B, L, in_dim] and raw EVA tokens [B, M, cond_dim], on device."""
    clip, eva = (runtime.to_device(data.read_rows(split[name], rows + split['start']), device)
                 for name in ('clip', 'eva'))
    return (clip.float() - clip_mean) / clip_std, eva.float()


def get_lr(it):
    """Linear warm-up to learning_rate, then cosine decay to min_lr at lr_decay_iters (nanoGPT)."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


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
    """EMA of the weights, its decay warmed up so early averages are not dominated by the init."""
    decay = min(ema_decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(*map(runtime.local_params, (ema_model, raw_model)), 1.0 - decay)


@torch.no_grad()
def evaluate():
    """Validation loss (raw and EMA weights; flow: on a fixed t grid); EMA generation check. Row
    i's noise is flow.seeded_noise(seed, i), as in sample.py. Batches go round-robin to the ranks
    and the sums are all-reduced, so the numbers do not depend on the number of ranks."""
    raw_model.eval()
    n_loss = min(val_split['count'], eval_iters * batch_size)
    n_gen = min(val_split['count'], eval_gen_items)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss raw, EMA, token, pooled cos
    for rows, weight in runtime.rank_batches(n_loss, batch_size, rank, world_size, sharded):
        x1, cond = read_rows(val_split, rows)
        x0 = flow.seeded_noise(seed, rows, x1.shape[1:], device)
        for k, m in enumerate((raw_model, ema_model)):
            with ctx:
                losses = (flow.regression_losses(m, x1, cond)[0] if objective == 'regression' else
                          flow.validation_loss(m, x0, x1, cond, sigma_min))
                sums[k] += weight * losses.sum()
    check = flow.Sampler(method='euler', steps=eval_gen_steps).for_objective(objective)
    for rows, weight in runtime.rank_batches(n_gen, batch_size, rank, world_size, sharded):
        x1, cond = read_rows(val_split, rows)
        x0 = flow.seeded_noise(seed, rows, x1.shape[1:], device)
        with ctx:  # forward calls only (FSDP's hooks do not see DiT.encode_cond): the same result
            x = check.generate(ema_model, cond, x0, encode_once=False)
        generated, real = x.float() * clip_std + clip_mean, x1 * clip_std + clip_mean
        sums[2] += weight * F.cosine_similarity(generated, real, dim=-1).mean(dim=1).sum()
        sums[3] += weight * F.cosine_similarity(generated.mean(dim=1), real.mean(dim=1),
                                                dim=-1).sum()
    if distributed:
        dist.all_reduce(sums)
    if sharded:  # a forward without backward leaves the roots whole: back to shards
        raw_model.reshard()
        ema_model.reshard()
    raw_model.train()
    sums = sums.tolist()
    return {'val_loss': sums[0] / n_loss, 'val_loss_ema': sums[1] / n_loss,
            'gen_token_cosine': sums[2] / n_gen, 'gen_pooled_cosine': sums[3] / n_gen}


def save_checkpoint(path=ckpt_path, keep=False):
    """Write a checkpoint (format: data.py) from rank 0 (every rank calls it); keep: EMA only."""
    ema, weights, optim = runtime.whole_state_dicts(raw_model, ema_model, optimizer, sharded, keep)
    if not master_process:
        return
    ckpt = {'ema': ema, 'model_args': dataclasses.asdict(model_cfg), 'iter_num': iter_num,
            'config': config, 'data_stats': data_stats, 'run': run, 'data': trained_on,
            'objective': objective}
    if not keep:
        position = {'samples_seen': samples_seen, 'train_rows': n_train,
                    'epoch': samples_seen // n_train, 'index': samples_seen % n_train}
        rng = {'seed': seed,  # training draws come from generators seeded per micro-batch
               'scheme': 'torch.Generator seeded per (seed, iter_num, global micro-batch)'}
        ckpt.update(model=weights, optimizer=optim, scaler=scaler.state_dict(),
                    best_val_loss=best_val_loss, data_position=position, rng=rng)
    data.save_checkpoint(path, ckpt)


def stop(reason):
    """End every rank (all reach this together) with a message and exit code 1; the last good
    checkpoint stays."""
    kept = (f"{ckpt_path} (iteration {saved_iter}) is kept" if saved_iter else
            "no checkpoint was saved yet")
    message = f"{reason}: stopping; {kept}. Check the data for inf/NaN, or lower learning_rate"
    runtime.end_process_group(1, message)
    raise SystemExit(message)


def read_losses():
    """The global mean loss of each iteration since the last read, in one sync (and all-reduce);
    a non-finite one stops the run here, before any checkpoint."""
    values = runtime.global_values(pending_losses, gradient_accumulation_steps)
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
    print(f"DiT: {raw_model.num_params() / 1e6:.2f}M parameters, "
          f"{flops_per_iter / global_batch / 3 / 1e9:.3f} GFLOPs per sample forward; "
          f"{world_size} rank(s) x {micro_steps} micro-step(s) x {batch_size} = {global_batch} "
          f"samples per iteration; {n_train} train rows, {val_split['count']} val rows; "
          f"{device} {dtype}{' compiled' if compile else ''}; objective {objective}, "
          f"run {run['id']}")

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
    # evaluate and save at every eval_interval and at the end (not again at the resumed iteration)
    if (iter_num % eval_interval == 0 or iter_num == max_iters) and iter_num != resumed_at:
        t_eval = time.time()
        metrics = evaluate()
        log_record({'kind': 'eval', 'iter': iter_num, **metrics, 'eval_s': time.time() - t_eval},
                   f"eval {iter_num}: val loss {metrics['val_loss']:.4f} "
                   f"(EMA {metrics['val_loss_ema']:.4f}), EMA generation cosine: tokens "
                   f"{metrics['gen_token_cosine']:.4f}, pooled {metrics['gen_pooled_cosine']:.4f}")
        if not math.isfinite(metrics['val_loss']):  # never overwrite a good checkpoint with this
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
        j = rank * micro_steps + micro_step  # global micro-batch index: the same whatever the ranks
        last = micro_step == micro_steps - 1
        if isinstance(model, DDP):  # all-reduce on the last micro-step only
            model.require_backward_grad_sync = last
        elif sharded:  # reduce-scatter every micro-step; across nodes on the last only
            model.set_requires_all_reduce(last)
        flow_generator.manual_seed(flow.seed_for(seed, iter_num, j))
        with ctx:
            losses, t = (flow.regression_losses(model, x1, cond) if objective == 'regression' else
                         flow.flow_losses(model, x1, cond, cond_drop_prob, t_sampling, t_mean,
                                          t_std, sigma_min, flow_generator))
            loss = losses.mean()  # [B] at times t [B]: weight over t here, (w(t) * losses).mean()
        scaler.scale(loss / micro_steps).backward()
        loss_sum += loss.detach()
        # read the next micro-batch (of this iteration or the next) while the device works
        next_start = samples_seen + (j + 1 if not last else
                                     gradient_accumulation_steps + rank * micro_steps) * batch_size
        x1, cond = read_rows(train_split, data.stream_rows(seed, n_train, next_start, batch_size))
    scaler.unscale_(optimizer)  # float16 only
    grad_norm = runtime.grad_norm(params)  # regression: null_cond has no gradient
    # clipping folded into the fused step, which divides each gradient by grad_scale as it reads it
    optimizer.grad_scale = (((grad_norm + 1e-6) / grad_clip).clamp(min=1.0) if grad_clip > 0
                            else None)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    update_ema(iter_num)
    pending_losses.append(loss_sum)
    # the next iteration may evaluate and save: its losses are read (and checked) before that
    if iter_num % log_interval == 0 or (iter_num + 1) % eval_interval == 0 or \
            iter_num == max_iters - 1:
        lossf = read_losses()[-1]
        t1 = time.time()
        dt, t0 = (t1 - t0) / (iter_num + 1 - logged_iter), t1  # mean since the last read
        logged_iter = iter_num + 1
        samples_per_s = global_batch / dt
        mfu = runtime.mfu(flops_per_iter / dt, device, ptdtype, world_size)
        record = {'kind': 'train', 'iter': iter_num, 'loss': lossf, 'lr': lr,
                  'grad_norm': grad_norm.item(), 'samples_per_s': samples_per_s,
                  'tokens_per_s': samples_per_s * n_tokens, 'mfu': mfu, 'ms_per_iter': dt * 1000,
                  'epoch': samples_seen / n_train, 'peak_mem_mb': runtime.peak_memory_mb(device)}
        log_record(record, f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, "
                           f"grad norm {record['grad_norm']:.3f}, {samples_per_s:.1f} samples/s, "
                           + (f"mfu {mfu * 100:.1f}%, " if mfu else "")
                           + f"{dt * 1000:.1f} ms/iter")
    iter_num += 1
    samples_seen += global_batch

if master_process:
    print(f"done: {iter_num} iterations, best val loss {best_val_loss:.4f}, checkpoint {ckpt_path}")
    if wandb_log:
        wandb.finish()
runtime.end_process_group()  # every rank: barrier, group torn down, exit 0 (runtime.py: why)
