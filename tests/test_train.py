"""train.py end to end: a tiny DiT on random data folders, CPU, float32, run as a user would."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, make_data_folder

# global batch 8 = 4 micro-batches of 2: one process does 4 micro-steps, two ranks 2 each
TINY = ['--dim=32', '--n_layers=2', '--n_heads=2', '--in_dim=8', '--cond_dim=12', '--grid_size=4',
        '--batch_size=2', '--gradient_accumulation_steps=4', '--compile=False', '--dtype=float32',
        '--device=cpu', '--eval_interval=10', '--eval_iters=4', '--eval_gen_items=4',
        '--eval_gen_steps=2', '--log_interval=1', '--learning_rate=3e-3', '--warmup_iters=5',
        '--lr_decay_iters=100', '--min_lr=3e-4', '--ema_decay=0.9']
ITERS = 30
TORCHRUN = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2')


def train(*args, launcher=(sys.executable,), check=True):
    result = subprocess.run([*launcher, 'train.py', *TINY, *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def records(out_dir, kind):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [r for r in map(json.loads, f) if r['kind'] == kind]


def losses(out_dir):
    """{iter: loss}; after a resume the re-done iterations overwrite the killed run's."""
    return {r['iter']: r['loss'] for r in records(out_dir, 'train')}


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_data_folder(str(tmp_path_factory.mktemp('train_data') / 'data'), n=64)


@pytest.fixture(scope='module')
def run(data, tmp_path_factory):
    """The reference run: 30 iterations, validation on the last quarter of the folder, a kept
    checkpoint every 10."""
    out = str(tmp_path_factory.mktemp('run') / 'out')
    train(f'--train_data={data}', '--val_fraction=0.25', f'--out_dir={out}', f'--max_iters={ITERS}',
          '--keep_interval=10')
    return out


def test_training_lowers_loss_and_logs_metrics(run):
    train_logs, evals = records(run, 'train'), records(run, 'eval')
    assert [r['iter'] for r in train_logs] == list(range(ITERS))
    assert [r['iter'] for r in evals] == [0, 10, 20, 30]
    for r in train_logs:
        assert {'loss', 'lr', 'grad_norm', 'samples_per_s', 'tokens_per_s', 'mfu',
                'ms_per_iter'} <= r.keys()
        # no MFU on CPU
        assert np.isfinite(r['loss']) and r['samples_per_s'] > 0 and r['mfu'] is None
    first = np.mean([r['loss'] for r in train_logs[:10]])
    last = np.mean([r['loss'] for r in train_logs[-10:]])
    assert last < first, (first, last)
    # the validation loss uses fixed noise and t: it should fall at every evaluation
    val = [r['val_loss'] for r in evals]
    assert all(b < a for a, b in zip(val, val[1:])) and val[-1] < 0.9 * val[0], val
    assert evals[-1]['val_loss_ema'] < evals[0]['val_loss_ema']
    assert -1 <= evals[-1]['gen_token_cosine'] <= 1 and -1 <= evals[-1]['gen_pooled_cosine'] <= 1


def test_checkpoint_is_clean_and_complete(run, data):
    ckpt = torch.load(os.path.join(run, 'ckpt.pt'), weights_only=True)
    assert {'model', 'ema', 'optimizer', 'scaler', 'model_args', 'iter_num', 'best_val_loss',
            'config', 'data_stats', 'rng', 'data_position'} <= ckpt.keys()
    assert not [k for k in ckpt['model'] if k.startswith(('_orig_mod.', 'module.'))]
    assert ckpt['ema'].keys() == ckpt['model'].keys()
    assert all(v.dtype == torch.float32 for v in ckpt['ema'].values())
    assert any(not torch.equal(ckpt['ema'][k], ckpt['model'][k]) for k in ckpt['model'])
    assert ckpt['iter_num'] == ITERS and ckpt['model_args']['dim'] == 32
    assert ckpt['config']['sigma_min'] == 1e-4
    assert ckpt['data_position']['samples_seen'] == ITERS * 8
    with open(os.path.join(data, 'meta.json')) as f:
        assert ckpt['data_stats']['clip_std'] == json.load(f)['clip_std']


def test_keep_interval_keeps_small_sampling_checkpoints(run):
    kept = sorted(f for f in os.listdir(run) if f.startswith('ckpt_iter'))
    assert kept == ['ckpt_iter000010.pt', 'ckpt_iter000020.pt', 'ckpt_iter000030.pt']
    full = torch.load(os.path.join(run, 'ckpt.pt'), weights_only=True)
    first, last = (torch.load(os.path.join(run, name), weights_only=True)
                   for name in (kept[0], kept[-1]))
    assert set(last) == {'ema', 'model_args', 'config', 'data_stats', 'iter_num', 'run', 'data',
                         'objective'}
    assert (first['iter_num'], last['iter_num']) == (10, ITERS)
    # the EMA weights ckpt.pt holds
    assert all(torch.equal(last['ema'][k], v) for k, v in full['ema'].items())
    assert not all(torch.equal(first['ema'][k], v) for k, v in full['ema'].items())
    assert last['model_args'] == full['model_args'] and last['data_stats'] == full['data_stats']
    assert last['config']['keep_interval'] == 10
    size = os.path.getsize
    assert size(os.path.join(run, kept[-1])) < size(os.path.join(run, 'ckpt.pt')) / 3


def test_torchrun_two_ranks_follow_the_single_process_curve(run, data, tmp_path):
    out = str(tmp_path / 'ddp')
    train(f'--train_data={data}', '--val_fraction=0.25', f'--out_dir={out}', '--max_iters=8',
          launcher=TORCHRUN)
    single, ddp = losses(run), losses(out)
    assert sorted(ddp) == list(range(8))
    np.testing.assert_allclose([ddp[i] for i in range(8)], [single[i] for i in range(8)], rtol=1e-5)
    assert records(out, 'eval')[0]['val_loss'] == \
        pytest.approx(records(run, 'eval')[0]['val_loss'], rel=1e-6)


def test_fsdp_follows_the_same_curve_and_resumes_across_modes(run, data, tmp_path):
    """FSDP (2 ranks, sharded) to 10, DDP resumes to 20, hybrid FSDP (2 replicas of 1 shard) to 24,
    one-process FSDP to 26: every leg on the single-process curve, every checkpoint one format."""
    out = str(tmp_path / 'modes')
    common = [f'--train_data={data}', '--val_fraction=0.25', f'--out_dir={out}']
    train(*common, '--max_iters=10', '--parallel=fsdp', launcher=TORCHRUN)
    ckpt, reference = (torch.load(os.path.join(d, 'ckpt.pt'), weights_only=True)
                       for d in (out, run))
    assert ckpt['model'].keys() == reference['model'].keys() == ckpt['ema'].keys()
    assert all(ckpt['model'][k].shape == v.shape and ckpt['model'][k].device.type == 'cpu'
               for k, v in reference['model'].items())
    # AdamW's state keyed by parameter index, as optimizer.state_dict() writes it (a DDP resume
    # loads it as is)
    assert list(ckpt['optimizer']['state']) == list(reference['optimizer']['state'])
    assert [g['params'] for g in ckpt['optimizer']['param_groups']] == \
        [g['params'] for g in reference['optimizer']['param_groups']]
    assert all(ckpt['optimizer']['state'][i]['exp_avg'].shape == state['exp_avg'].shape
               for i, state in reference['optimizer']['state'].items())
    train(*common, '--max_iters=20', '--init_from=resume', launcher=TORCHRUN)
    train(*common, '--max_iters=24', '--init_from=resume', '--parallel=fsdp',
          '--fsdp_shard_ranks=1', launcher=TORCHRUN)
    train(*common, '--max_iters=26', '--init_from=resume', '--parallel=fsdp')
    modes, single = losses(out), losses(run)
    assert sorted(modes) == list(range(26))
    np.testing.assert_allclose([modes[i] for i in range(26)], [single[i] for i in range(26)],
                               rtol=1e-5)
    evals, reference_evals = records(out, 'eval'), records(run, 'eval')
    assert [r['iter'] for r in evals] == [0, 10, 20, 24, 26]
    for k in (0, 1, 2):  # iterations 0, 10 and 20: the raw and the EMA weights
        for key in ('val_loss', 'val_loss_ema', 'gen_token_cosine'):
            assert evals[k][key] == pytest.approx(reference_evals[k][key], rel=1e-5), \
                (evals[k]['iter'], key)


def test_fsdp_resumes_a_regression_run_whose_null_token_has_no_optimizer_state(data, tmp_path):
    """The regression objective never uses null_cond: AdamW holds no state for it, which FSDP's
    loader must accept."""
    out = str(tmp_path / 'fsdp')
    common = [f'--train_data={data}', '--val_fraction=0.25', '--objective=regression']
    train(*common, f'--out_dir={out}', '--max_iters=10', '--parallel=fsdp')
    shutil.copytree(out, str(tmp_path / 'ddp'))
    for mode in ('fsdp', 'ddp'):
        train(*common, f'--out_dir={tmp_path / mode}', '--max_iters=12', '--init_from=resume',
              f'--parallel={mode}')
    fsdp, ddp = losses(out), losses(str(tmp_path / 'ddp'))
    assert sorted(fsdp) == sorted(ddp) == list(range(12))
    np.testing.assert_allclose([fsdp[i] for i in (10, 11)], [ddp[i] for i in (10, 11)], rtol=1e-6)


def test_resume_after_sigkill_is_exact(run, data, tmp_path):
    out = str(tmp_path / 'killed')
    args = [sys.executable, 'train.py', *TINY, f'--train_data={data}', '--val_fraction=0.25',
            f'--out_dir={out}']
    proc = subprocess.Popen([*args, '--max_iters=100000'], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # kill it once the checkpoint of iteration 10 is written (iteration 11 is logged after it)
        deadline = time.time() + 120
        while not (os.path.exists(os.path.join(out, 'metrics.jsonl')) and
                   any(r['iter'] >= 11 for r in records(out, 'train'))):
            assert proc.poll() is None and time.time() < deadline, \
                'the run died or stalled before iteration 11'
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['iter_num']
    assert 10 <= saved < ITERS
    train(f'--train_data={data}', '--val_fraction=0.25', f'--out_dir={out}', f'--max_iters={ITERS}',
          '--init_from=resume')
    resumed, reference = losses(out), losses(run)
    assert [resumed[i] for i in range(saved, ITERS)] == [reference[i] for i in range(saved, ITERS)]
    # metrics.jsonl holds each iteration once: the killed run's records past its checkpoint dropped
    assert [r['iter'] for r in records(out, 'train')] == list(range(ITERS))
    assert [r['iter'] for r in records(out, 'eval')] == [0, 10, 20, 30]
    assert records(out, 'eval')[-1]['val_loss'] == records(run, 'eval')[-1]['val_loss']


def corrupt_rows(folder):
    """eva.npy one row short of clip.npy."""
    eva = np.load(os.path.join(folder, 'eva.npy'))
    np.save(os.path.join(folder, 'eva.npy'), eva[:-1])
    return folder


@pytest.mark.parametrize('case', ['missing', 'in_dim', 'rows'])
def test_bad_data_and_config_stop_with_a_message(case, data, tmp_path):
    args, expected = {
        'missing': ([f'--train_data={tmp_path}/nope'], ['not found', 'python extract.py']),
        'in_dim': (['--in_dim=16'], ['clip.npy', 'token width 8', 'in_dim=16']),
        'rows': ([f'--train_data={corrupt_rows(make_data_folder(str(tmp_path / "bad"), n=16))}'],
                 ['clip.npy has 16 rows, eva.npy 15']),
    }[case]
    result = train(f'--train_data={data}', f'--val_data={data}', f'--out_dir={tmp_path}/out',
                   '--max_iters=2', *args, check=False)
    assert result.returncode != 0
    for text in expected:
        assert text in result.stderr, result.stderr
    assert 'Traceback' not in result.stderr
    assert not os.path.exists(os.path.join(tmp_path, 'out', 'ckpt.pt'))


def test_scratch_refuses_to_replace_a_checkpoint(run, data):
    before = os.stat(os.path.join(run, 'ckpt.pt'))
    result = train(f'--train_data={data}', '--val_fraction=0.25', f'--out_dir={run}', check=False)
    assert result.returncode != 0 and 'already exists' in result.stderr
    assert '--overwrite=True' in result.stderr
    after = os.stat(os.path.join(run, 'ckpt.pt'))
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)


def test_non_finite_loss_stops_and_keeps_the_checkpoint(run, data, tmp_path):
    out, poisoned = str(tmp_path / 'out'), str(tmp_path / 'poisoned')
    shutil.copytree(run, out)
    shutil.copytree(data, poisoned)
    clip = np.load(os.path.join(poisoned, 'clip.npy'), mmap_mode='r+')
    clip[1::2] = np.inf  # odd rows: train.py's start-up check samples the even ones of these 64
    clip.flush()
    del clip
    with open(os.path.join(out, 'ckpt.pt'), 'rb') as f:
        before = f.read()
    result = train(f'--train_data={poisoned}', '--val_fraction=0.25', f'--out_dir={out}',
                   f'--max_iters={ITERS + 5}', '--init_from=resume', check=False)
    assert result.returncode != 0
    assert f'non-finite loss (nan) at iteration {ITERS}' in result.stderr, result.stderr
    assert f'(iteration {ITERS}) is kept' in result.stderr
    with open(os.path.join(out, 'ckpt.pt'), 'rb') as f:
        assert f.read() == before


def test_regression_keeps_its_best_held_out_checkpoint(data, tmp_path):
    """The demos' regression baseline (--always_save_checkpoint=False): ckpt.pt is saved only at
    the evaluations that lower the held-out loss, so it holds the iteration of the lowest one."""
    out = str(tmp_path / 'out')
    printed = train(f'--train_data={data}', '--val_fraction=0.25', f'--out_dir={out}',
                    '--max_iters=40', '--eval_interval=5', '--learning_rate=3e-2',
                    '--objective=regression', '--always_save_checkpoint=False').stdout
    evals = {r['iter']: r['val_loss'] for r in records(out, 'eval')}
    improved = [i for i in evals if i > 0 and evals[i] < min(v for j, v in evals.items() if j < i)]
    saved = [int(n) for n in re.findall(r'saved \S+ckpt\.pt \(iteration (\d+)\)', printed)]
    assert saved == improved and 0 < len(saved) < len(evals) - 1  # some evaluations did not save
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), map_location='cpu', weights_only=False)
    best = min(evals, key=evals.get)
    assert (ckpt['iter_num'], ckpt['best_val_loss'], ckpt['objective']) == (best, evals[best],
                                                                           'regression')
