"""How a torchrun rank ends (runtime.end_process_group): a finished run exits 0 on every rank, a run
that stops on an error exits non-zero with its message on every rank, and a process without a group
just returns."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch.distributed as dist

from conftest import ROOT, make_data_folder
from runtime import end_process_group

TINY = ['--dim=32', '--n_layers=2', '--n_heads=2', '--in_dim=8', '--cond_dim=12', '--grid_size=4',
        '--batch_size=2', '--gradient_accumulation_steps=4', '--compile=False', '--dtype=float32',
        '--device=cpu', '--eval_interval=10', '--eval_iters=4', '--eval_gen_items=4',
        '--eval_gen_steps=2', '--log_interval=1', '--val_fraction=0.25']
TORCHRUN = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2')


def torchrun_train(*args):
    return subprocess.run([*TORCHRUN, 'train.py', *TINY, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_without_a_group_it_returns():
    assert not dist.is_initialized()
    assert end_process_group(1, 'not printed') is None


@pytest.mark.parametrize('parallel', ['ddp', 'fsdp'])
def test_a_two_rank_run_stopped_by_an_error_exits_non_zero_with_its_message_on_every_rank(
        parallel, tmp_path):
    folder = make_data_folder(str(tmp_path / 'data'), n=64)
    clip = np.load(os.path.join(folder, 'clip.npy'), mmap_mode='r+')
    clip[1::2] = np.inf  # odd rows: train.py's start-up check samples the even ones of these 64
    clip.flush()
    del clip
    result = torchrun_train(f'--train_data={folder}', f'--out_dir={tmp_path / "out"}',
                            '--max_iters=10', f'--parallel={parallel}')
    assert result.returncode != 0
    message = ('non-finite validation loss (nan) at iteration 0: stopping; '
               'no checkpoint was saved yet')
    assert result.stderr.count(message) == 2, result.stderr  # rank 0's and rank 1's
    assert 'SIGABRT' not in result.stderr and 'terminate called' not in result.stderr
    for rank in (0, 1):  # torchrun names each failed rank with its exit code: 1, not a signal
        assert f'rank      : {rank} (local_rank: {rank})' in result.stderr, result.stderr
    assert 'exitcode  : 1 ' in result.stderr, result.stderr
