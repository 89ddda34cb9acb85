"""Full training-step throughput of train.py (data + forward + backward + optimizer + EMA) and its
overhead over the model's own forward + backward (bench_model.py); one JSON line.

python bench/bench_train.py config/dit_large.py --batch_size=64 --gradient_accumulation_steps=1
python bench/bench_train.py config/demo.py --compile=False      # CPU: skip the (slow) compiled run
python bench/bench_train.py config/demo.py --compile=False --parallel=fsdp

Runs train.py itself (one process) on a random data folder shaped like the config's model, for each
of compiled and eager (or only the mode --compile names) and each of parallel='ddp' and 'fsdp' (or
the one --parallel names; FSDP then shards over a group of one, so the figure is its machinery's
cost), reads its metrics.jsonl and stops it after bench_warmup + bench_iters iterations. train.py
reads the loss from the device only every log_interval iterations (here bench_log_interval), as in a
real run; each log line holds the mean time of the iterations since the previous one. Reports over
the timed iterations: ms/iter, samples/s, tokens/s, MFU (CUDA only) and peak memory (device memory
on CUDA, train.py's own peak RSS on the CPU), and overhead = ms/iter over
gradient_accumulation_steps x bench_model.py's ms/step at the same settings and batch, minus 1
(bench_model runs once per compile mode, after the train.py runs, unless model_ms_per_step gives its
figure). Any other --key=value goes to train.py.
"""
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
from configurator import configure  # noqa: E402
from model import DiTConfig  # noqa: E402

bench_warmup = 5  # iterations not timed (compilation, allocator warm-up)
bench_iters = 20  # timed iterations
bench_rows = 256  # rows of the random data folder
bench_log_interval = 5  # train.py's log_interval: its only host sync
compile = None  # None: both compiled and eager; True / False: only that one
parallel = None  # None: both 'ddp' and 'fsdp'; or only that one
# > 0: bench_model.py's figure for these settings (e.g. from bench/gpu.sh): not run again
model_ms_per_step = 0.0
# train.py's default: one process runs this many micro-steps an iteration
gradient_accumulation_steps = 8
globals().update({f.name: f.default for f in dataclasses.fields(DiTConfig)})
model_keys = ['batch_size', 'dtype', 'device'] + [  # bench_model's too
    f.name for f in dataclasses.fields(DiTConfig)]
own_keys = ['bench_warmup', 'bench_iters', 'bench_rows', 'bench_log_interval', 'compile',
            'parallel', 'model_ms_per_step', 'gradient_accumulation_steps'] + model_keys[3:]
args = sys.argv[1:]
configure(globals(),
          [a for a in args if not a.startswith('--') or a[2:].partition('=')[0] in own_keys])
train_args = [a for a in args if not a.startswith(
    ('--bench_', '--compile=', '--parallel=', '--model_ms_per_step='))]
model_args = [a for a in args if not a.startswith('--') or a[2:].partition('=')[0] in model_keys]


def bench(folder, out_dir, compiled, mode):
    """Run train.py until bench_warmup + bench_iters are logged; the timed ones' medians."""
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), *train_args, f'--train_data={folder}',
           f'--val_data={folder}', f'--out_dir={out_dir}', '--init_from=scratch',
           '--overwrite=True', f'--compile={compiled}', f'--parallel={mode}',
           '--max_iters=1000000000', '--eval_interval=1000000000', '--eval_iters=1',
           '--eval_gen_items=1',
           '--eval_gen_steps=1', f'--log_interval={bench_log_interval}', '--wandb_log=False',
           '--keep_interval=0']
    metrics = os.path.join(out_dir, 'metrics.jsonl')
    with open(os.path.join(out_dir + '.log'), 'w') as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    records = []
    try:
        while not records or records[-1]['iter'] < bench_warmup + bench_iters:
            if proc.poll() is not None:
                with open(out_dir + '.log') as f:
                    raise SystemExit(f"bench_train: train.py stopped (exit "
                                     f"{proc.returncode}):\n{f.read()[-3000:]}")
            time.sleep(0.2)
            if os.path.exists(metrics):
                with open(metrics) as f:
                    records = [r for r in map(json.loads,
                                              f.read().splitlines()[:-1]) if r['kind'] == 'train']
    finally:
        proc.kill()
        proc.wait()
    # each record's ms_per_iter is the mean over the iterations since the previous record
    timed = [(r, r['iter'] - prev['iter']) for prev,
             r in zip(records, records[1:]) if prev['iter'] >= bench_warmup]
    iters = sum(n for _, n in timed)
    ms = sum(r['ms_per_iter'] * n for r, n in timed) / iters
    # global batch / seconds
    samples_per_s = records[-1]['samples_per_s'] * records[-1]['ms_per_iter'] / ms
    mfu = [r['mfu'] for r, _ in timed if r['mfu'] is not None]
    return {'compile': compiled, 'parallel': mode, 'ms_per_iter': ms,
            'samples_per_s': samples_per_s,
            'tokens_per_s': samples_per_s * grid_size ** 2, 'timed_iters': iters,
            'mfu': statistics.median(mfu) if mfu else None,
            'peak_mem_mb': max(r['peak_mem_mb'] for r, _ in timed),
            'first_iter_s': records[0]['ms_per_iter'] / 1000}


with tempfile.TemporaryDirectory() as tmp:
    folder = data.write_random_folder(os.path.join(tmp, 'data'), n=bench_rows,
                                      tokens=grid_size ** 2, clip_dim=in_dim,
                                      eva_dim=cond_dim, embed_dim=8, captions_per_image=(1,))
    runs = [bench(folder, os.path.join(tmp, f'out_{compiled}_{mode}'), compiled, mode)
            for compiled in ([True, False] if compile is None else [compile])
            for mode in (['ddp', 'fsdp'] if parallel is None else [parallel])]


def model_ms(compiled):
    """bench_model.py's forward + backward ms/step at these settings and batch (compiled or not)."""
    if model_ms_per_step > 0:
        return model_ms_per_step
    cmd = [sys.executable, os.path.join(ROOT, 'bench', 'bench_model.py'), *model_args,
           f'--compile={compiled}']
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"bench_train: bench_model.py failed (exit "
                         f"{result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])['ms_per_step']


for compiled in {r['compile'] for r in runs}:
    step = model_ms(compiled) * gradient_accumulation_steps  # one process does every micro-step
    for r in runs:
        if r['compile'] == compiled:
            r.update(model_ms_per_iter=step, overhead=r['ms_per_iter'] / step - 1)
device = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'
print(json.dumps({'bench': 'train', 'args': args, 'device': device, 'warmup': bench_warmup,
                  'iters': bench_iters, 'runs': runs}))
