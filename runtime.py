"""Where a stage runs and in what precision: the device rule, torchrun's process group, autocast,
the weights cast once for it, the peak FLOP/s that MFU divides by, the parallel wrapping (DDP or
FSDP2) with its whole-model state dicts, and a rank's clean end. Every stage takes them from here.
"""
import os
import sys
from contextlib import nullcontext
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP


def resolve_device(device):
    """The device rule every stage follows: 'auto' is cuda when available, else cpu."""
    return ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device


def peak_flops(device_name, dtype):
    """Dense bf16/fp16 tensor-core peak FLOP/s of a GPU by name (TF32: half); None if unknown."""
    table = [('H100 PCIe', 756e12), ('H100', 989e12), ('H200', 989e12), ('GH200', 989e12),
             ('A100', 312e12)]
    peak = next((value for key, value in table if key in device_name), None)
    return None if peak is None else peak / (2 if dtype == torch.float32 else 1)


def peak_memory_mb(device):
    """Peak device memory on CUDA; on the CPU this process's peak RSS (not ru_maxrss)."""
    if torch.device(device).type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM:')) / 1024


def to_device(array, device):
    """A numpy array as a tensor on device; on CUDA copied from pinned memory without blocking."""
    x = torch.from_numpy(array)
    if torch.device(device).type == 'cuda':
        x = x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def mfu(flops_per_s, device, dtype, world_size):
    """Model FLOP utilization of world_size GPUs like device; None off CUDA or on an unknown GPU."""
    if torch.device(device).type != 'cuda':
        return None
    peak = peak_flops(torch.cuda.get_device_name(device), dtype)
    return flops_per_s / (peak * world_size) if peak else None


def cast_for_autocast(module, dtype):
    """Cast in place, once, the weights and biases that autocast casts to dtype at every call
    anyway: those of Linear and Conv layers and MultiheadAttention's input projection. The same
    rounding, so under autocast the outputs stay the same; norms and other parameters keep their
    dtype (autocast keeps them too). Returns module."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)):
            for name in ('weight', 'bias', 'in_proj_weight', 'in_proj_bias', 'q_proj_weight',
                         'k_proj_weight', 'v_proj_weight'):
                if isinstance(getattr(layer, name, None), torch.Tensor):
                    getattr(layer, name).data = getattr(layer, name).data.to(dtype)
    return module


def autocast(device, dtype):
    """A stage's compute context: autocast to bfloat16 or float16 (a name or a torch dtype) on the
    device's type; none for float32."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def parallelize(model, ema_model, parallel, shard_ranks, world_size, local_rank, param_dtype):
    """model wrapped for the ranks: DDP when there are several, else itself. parallel='fsdp'
    shards model (param_dtype compute) and ema_model (fp32) in place with FSDP2, per Block and at
    the root, fp32 gradient reduction, over shard_ranks ranks (0 = the ranks of one node) and
    replicated across the groups: model and ema_model then hold their shards (DTensors)."""
    device_type = next(model.parameters()).device.type
    if parallel == 'ddp':
        if not dist.is_initialized():
            return model
        return DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)
    shard_ranks = shard_ranks or int(os.environ.get('LOCAL_WORLD_SIZE', world_size))
    if world_size % shard_ranks:
        raise SystemExit(f"config error: fsdp_shard_ranks={shard_ranks} must divide the number "
                         f"of ranks, {world_size}")
    mesh = init_device_mesh(device_type, (world_size // shard_ranks, shard_ranks),
                            mesh_dim_names=('replicate', 'shard'))
    for module, dtype in ((model, param_dtype), (ema_model, torch.float32)):
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in module.blocks:  # one all-gather a block, in turn: only one block is whole
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, mp_policy=policy)
    return model


def rank_batches(n, batch_size, rank, world_size, every_round):
    """This rank's batches of rows 0..n-1 (round-robin over the ranks), each with its weight in the
    sums. every_round (FSDP: every forward is collective): a rank with no rows left in a round
    reruns the round's first batch at weight 0."""
    for first in range(0, n, world_size * batch_size):
        rows = np.arange(first + rank * batch_size, min(first + (rank + 1) * batch_size, n))
        if len(rows):
            yield rows, 1.0
        elif every_round:
            yield np.arange(first, min(first + batch_size, n)), 0.0


def local_params(module):
    """module's parameters as this rank holds them: under FSDP its shards (local tensors)."""
    return [p.to_local() if isinstance(p, DTensor) else p for p in module.parameters()]


def grad_norm(params):
    """The global norm of params' gradients (those that have one); under FSDP reduced, whole."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def global_values(sums, divisor):
    """Device scalars summed over the ranks (when several) and divided: floats, in one sync."""
    sums = torch.stack(sums)
    if dist.is_initialized():
        dist.all_reduce(sums)
    return (sums / divisor).tolist()


def renamed(state, keys):
    """An optimizer state dict with its parameter keys mapped through keys (indices <-> names)."""
    return {'state': {keys[k]: v for k, v in state['state'].items()},
            'param_groups': [{**group, 'params': [keys[k] for k in group['params']]}
                             for group in state['param_groups']]}


def optimizer_names(model, optimizer):
    """The parameters' names in the optimizer's order: a checkpoint numbers AdamW's parameters so
    (as optimizer.state_dict() does); FSDP's state dicts name them."""
    names = {p: n for n, p in model.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group['params']]


def load_optimizer(model, optimizer, state, sharded):
    """Load a whole optimizer state dict (the checkpoint's). sharded (FSDP): every rank reads the
    whole state and keeps its shards of it; a parameter that never had a gradient (regression's
    null_cond) has no state, as optimizer.load_state_dict allows."""
    if not sharded:
        return optimizer.load_state_dict(state)
    set_optimizer_state_dict(model, optimizer, renamed(state, optimizer_names(model, optimizer)),
                             options=StateDictOptions(full_state_dict=True, strict=False))


def whole_state_dicts(model, ema_model, optimizer, sharded, keep):
    """The EMA, model and optimizer state dicts, whole, on rank 0 (model and optimizer None when
    keep). sharded (FSDP): every rank takes part; one tensor at a time is gathered and moved to
    rank 0's CPU, so no device ever holds the whole model."""
    if not sharded:
        return ema_model.state_dict(), model.state_dict(), optimizer.state_dict()
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    ema = get_model_state_dict(ema_model, options=whole)
    if keep:
        return ema, None, None
    optim = get_optimizer_state_dict(model, optimizer, options=whole)  # {} off rank 0
    indices = {name: i for i, name in enumerate(optimizer_names(model, optimizer))}
    return ema, get_model_state_dict(model, options=whole), optim and renamed(optim, indices)


def init_device(device, dtype, group=False):
    """A stage's device and place among the ranks: (device, rank, local_rank, world_size). device
    'auto' is cuda when available, else cpu; under torchrun (RANK set) this process joins the
    group and takes cuda:LOCAL_RANK; without it, group=True makes a group of one (FSDP's
    collectives need one). SystemExit for an unknown device string or a missing CUDA device."""
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise SystemExit(f"config error: dtype should be 'float32', 'bfloat16' or 'float16', "
                         f"got {dtype!r}")
    device = resolve_device(device)
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise SystemExit(f"config error: device should be 'auto', 'cpu', 'cuda' or 'cuda:N', "
                         f"got {device!r}") from None
    # fail here, naming the setting, rather than at the first tensor moved to a missing device
    if parsed.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f"config error: device={device!r} but torch.cuda.is_available() is "
                         "False on this machine: use --device=cpu or --device=auto")
    if parsed.type == 'cuda' and (parsed.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"config error: device={device!r} but this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s), cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")
    if 'RANK' not in os.environ:
        if group:
            dist.init_process_group('nccl' if parsed.type == 'cuda' else 'gloo',
                                    store=dist.HashStore(), rank=0, world_size=1)
        return device, 0, 0, 1
    rank, local_rank, world_size = (int(os.environ[k])
                                    for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    cuda = parsed.type == 'cuda'
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"config error: LOCAL_RANK={local_rank} takes cuda:{local_rank}, "
                             f"but this machine has {torch.cuda.device_count()} CUDA device(s): "
                             "start at most that many processes a node")
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    # ranks finish torch.compile (or a partial sampling run) at different times: a generous timeout
    dist.init_process_group(backend='nccl' if cuda else 'gloo', timeout=timedelta(minutes=30),
                            device_id=torch.device(device) if cuda else None)
    return device, rank, local_rank, world_size


def end_process_group(code=0, message=None):
    """A torchrun rank's last call, made by every rank: wait for the others, tear the group down and
    end the process with code (message, if any, to stderr first). Without a group it returns, and
    the caller exits as usual.

    It ends the process with os._exit, not by returning. gloo's worker threads outlive
    destroy_process_group (FSDP and DDP keep the groups alive), and one may still be freeing the
    last collective's work: a barrier that holds the all-gather before it, whose tensors are Python
    objects. Freeing them takes the GIL; once the interpreter is finalizing, CPython ends that
    thread inside a C++ destructor, and the finished rank dies of SIGABRT. With no finalization
    there is no such race; the run's files are closed and renamed before this call."""
    if not dist.is_initialized():
        return
    if message:
        print(message, file=sys.stderr)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
