"""Stress check: do finished 2-rank runs exit 0 on every rank? Runs train.py's 2-rank FSDP phase,
then a DDP resume, again and again on a tiny random data folder (as tests/test_train.py does),
optionally with busy processes loading the CPU, and stops at the first run whose torchrun does not
exit 0 (printing its output).

    python bench/stress_exit.py --runs=40 --load=1

Prints one JSON line: runs, consecutive_passes, the first failure (phase, exit code, last lines) if
any, seconds. A teardown race shows up rarely (2 pytest runs in 42 before the fix): run it long
enough that a pass means something. With `ulimit -c unlimited`, a crashed rank leaves a core file
whose backtrace names the thread (bench/RESULTS.md has the one that found the race).
"""
import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402

TINY = ['--dim=32', '--n_layers=2', '--n_heads=2', '--in_dim=8', '--cond_dim=12', '--grid_size=4',
        '--batch_size=2', '--gradient_accumulation_steps=4', '--compile=False', '--dtype=float32',
        '--device=cpu', '--eval_interval=10', '--eval_iters=4', '--eval_gen_items=4',
        '--eval_gen_steps=2', '--log_interval=1', '--val_fraction=0.25']
PHASES = (('fsdp', ['--max_iters=10', '--parallel=fsdp']),
          ('ddp resume', ['--max_iters=20', '--init_from=resume']))


def busy():
    while True:
        pass


def run_phase(folder, out_dir, args):
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               'train.py', *TINY, f'--train_data={folder}', f'--out_dir={out_dir}', *args]
    # faulthandler: a crashed rank prints its Python threads' stacks
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONFAULTHANDLER': '1'}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument('--runs', type=int, default=40)
    parser.add_argument('--load', type=int, default=1, help='busy processes beside the runs')
    args = parser.parse_args()
    loaders = [multiprocessing.Process(target=busy, daemon=True) for _ in range(args.load)]
    for p in loaders:
        p.start()
    t0, passes, failure = time.time(), 0, None
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, 'data')
        data.write_random_folder(folder, n=64, tokens=16, clip_dim=8, eva_dim=12)
        for run in range(args.runs):
            out_dir = os.path.join(tmp, f'out{run}')
            for phase, phase_args in PHASES:
                result = run_phase(folder, out_dir, phase_args)
                if result.returncode != 0:
                    tail = (result.stdout + result.stderr).splitlines()[-25:]
                    failure = {'run': run, 'phase': phase, 'returncode': result.returncode,
                               'tail': tail}
                    break
            if failure:
                break
            passes += 1
            print(f"run {run}: both phases exited 0 on every rank ({time.time() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    for p in loaders:
        p.terminate()
    print(json.dumps({'runs': passes + bool(failure), 'consecutive_passes': passes,
                      'load': args.load,
                      'failure': failure, 'seconds': round(time.time() - t0, 1)}))
    return 1 if failure else 0


if __name__ == '__main__':
    sys.exit(main())
