"""What trusting a checkpoint costs: save (torch writes the zip records' CRC32s), full verification
at load (every record's CRC32, data.checkpoint_fault), identity (the zip directory's CRCs,
data.checkpoint_weights), one JSON line.

The tensors are fp32 and shaped like a DiT's state, `size_gb` in all; the figures scale with bytes,
so dit_large's 27 GB checkpoint (weights, EMA, two AdamW moments) takes about 27 / size_gb times as
long.

python bench/bench_checkpoint.py [--size_gb=2.0] [--folder=/tmp]
"""
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from configurator import configure  # noqa: E402

size_gb = 2.0  # checkpoint size written and read back
folder = ''  # where it is written; '' = the system's temporary folder
repeats = 3
# -----------------------------------------------------------------------------
configure(globals())


def timed(fn):
    """The least wall time of `repeats` calls (the page cache warm after the first)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


matrix = 1792 * 1792  # a dit_large projection: many records of a few MB, as in the real state dict
n = int(size_gb * 1e9 / 4 / matrix)
state = {f'blocks.{i}.weight': torch.randn(1792, 1792) for i in range(n)}
with tempfile.TemporaryDirectory(dir=folder or None) as tmp:
    path = os.path.join(tmp, 'ckpt.pt')
    save = timed(lambda: data.save_checkpoint(path, {'ema': state, 'iter_num': 0}))
    nbytes = os.path.getsize(path)
    verify = timed(lambda: data.checkpoint_fault(path))
    identity = timed(lambda: data.checkpoint_weights(path))
    load = timed(lambda: torch.load(path, map_location='cpu', mmap=True, weights_only=True))
scale = 27e9 / nbytes
print(json.dumps({'bench': 'checkpoint', 'machine': platform.processor() or platform.machine(),
                  'cpus': os.cpu_count(), 'bytes': nbytes, 'records': n, 'save_s': round(save, 3),
                  'verify_s': round(verify, 3),
                  'identity_s': round(identity, 4), 'mmap_load_s': round(load, 4),
                  'save_gb_per_s': round(nbytes / save / 1e9, 2),
                  'verify_gb_per_s': round(nbytes / verify / 1e9, 2),
                  'verify_over_save': round(verify / save, 3),
                  'dit_large_27gb_estimate_s': {'save': round(save * scale, 1),
                                                'verify': round(verify * scale, 1)}}))
