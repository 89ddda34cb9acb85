"""Where a stage runs and in what precision: the device rule, torchrun's process group, autocast, the weights cast
once for it, the peak FLOP/s that MFU divides by, and a rank's clean end. Every stage takes these from here."""
import os
import sys
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn


def resolve_device(device):
    """The device rule every stage follows: 'auto' is cuda when available, else cpu; any other value stays."""
    return ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device


def peak_flops(device_name, dtype):
    """Dense bf16/fp16 tensor-core peak FLOP/s of one GPU from its name (TF32 is half); None where unknown."""
    table = [('H100 PCIe', 756e12), ('H100', 989e12), ('H200', 989e12), ('GH200', 989e12), ('A100', 312e12)]
    peak = next((value for key, value in table if key in device_name), None)
    return None if peak is None else peak / (2 if dtype == torch.float32 else 1)


def cast_for_autocast(module, dtype):
    """Cast in place, once, the weights and biases that autocast casts to dtype at every call anyway: those of Linear
    and Conv layers and MultiheadAttention's input projection. The same rounding, so under autocast the outputs stay
    the same; norms and other parameters keep their dtype (autocast keeps them too). Returns module."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)):
            for name in ('weight', 'bias', 'in_proj_weight', 'in_proj_bias', 'q_proj_weight', 'k_proj_weight',
                         'v_proj_weight'):
                if isinstance(getattr(layer, name, None), torch.Tensor):
                    getattr(layer, name).data = getattr(layer, name).data.to(dtype)
    return module


def autocast(device, dtype):
    """A stage's compute context: autocast to bfloat16 or float16 (a name or a torch dtype) on the device's type;
    none for float32."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def init_device(device, dtype):
    """A stage's device and place among the ranks: (device, rank, local_rank, world_size). device 'auto' is cuda
    when available, else cpu; under torchrun (RANK set) this process joins the group and takes cuda:LOCAL_RANK.
    SystemExit for an unknown device string or a CUDA device this machine does not have."""
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise SystemExit(f"config error: dtype should be 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    device = resolve_device(device)
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise SystemExit(f"config error: device should be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    # fail here, naming the setting, rather than at the first tensor moved to a device that is not there
    if parsed.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f"config error: device={device!r} but torch.cuda.is_available() is False on this machine: "
                         "use --device=cpu or --device=auto")
    if parsed.type == 'cuda' and (parsed.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"config error: device={device!r} but this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if 'RANK' not in os.environ:
        return device, 0, 0, 1
    rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    cuda = parsed.type == 'cuda'
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"config error: LOCAL_RANK={local_rank} takes cuda:{local_rank}, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s): start at most that many processes a node")
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    # ranks finish torch.compile (or a partial sampling run) at different times: a generous timeout
    dist.init_process_group(backend='nccl' if cuda else 'gloo', timeout=timedelta(minutes=30),
                            device_id=torch.device(device) if cuda else None)
    return device, rank, local_rank, world_size


def end_process_group(code=0, message=None):
    """A torchrun rank's last call, made by every rank: wait for the others, tear the group down and end the
    process with code (message, if any, to stderr first). Without a group it returns: the caller exits as usual.

    It ends the process with os._exit, not by returning: gloo's worker threads outlive destroy_process_group (FSDP
    and DDP keep the groups alive), and one may still be freeing the last collective's work (a barrier holding the
    all-gather before it, whose tensors are Python objects). Freeing them takes the GIL; once the interpreter is
    finalizing, CPython ends such a thread inside a C++ destructor and the finished rank dies of SIGABRT. Without
    finalization there is no such race; the run's files are closed and renamed before this call."""
    if not dist.is_initialized():
        return
    if message:
        print(message, file=sys.stderr)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
