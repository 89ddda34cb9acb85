"""Reliability (issue #7): kills at the worst moment, full or read-only disks, bad input in every
stage.

The kills of extract.py / sample.py / train.py between writes, the unknown and mistyped config keys,
rows that disagree between clip.npy and eva.npy, and partly missing COCO images are tested beside
each stage (see README.md's Reliability section); this file holds the rest. Checks that run before
any work are run in this process (runpy, same argv as the command line); kills and torchrun run real
subprocesses.
"""
import dataclasses
import gc
import io
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, make_data_folder
from model import DiT, DiTConfig

TINY = ['--dim=32', '--n_layers=2', '--n_heads=2', '--in_dim=8', '--cond_dim=12', '--grid_size=4',
        '--batch_size=2', '--gradient_accumulation_steps=4', '--compile=False', '--dtype=float32',
        '--device=cpu',
        '--eval_interval=10', '--eval_iters=2', '--eval_gen_items=2', '--eval_gen_steps=2',
        '--log_interval=1',
        '--learning_rate=3e-3', '--warmup_iters=5', '--lr_decay_iters=100', '--ema_decay=0.9']
EXTRACT = ['--clip_model=tiny-clip', '--eva_model=tiny-eva', '--clip_pretrained=', '--grid_size=4',
           '--extract_batch_size=4', '--num_workers=0', '--device=cpu']

# train.py, except that its second checkpoint write dies (SIGKILL) half-way through the bytes
DIES_IN_SECOND_SAVE = """
import io, os, runpy, signal, sys, torch
save, calls = torch.save, []
def dying_save(obj, f):
    calls.append(obj['iter_num'])
    if len(calls) < 2:
        return save(obj, f)
    buffer = io.BytesIO()
    save(obj, buffer)
    f.write(buffer.getvalue()[:buffer.tell() // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
sys.argv[0] = 'train.py'
runpy.run_path('train.py', run_name='__main__')
"""


def run_script(monkeypatch, script, *args):
    """`python script *args` in this process: for checks that stop before any work."""
    monkeypatch.setattr(sys, 'argv', [script, *args])
    runpy.run_path(os.path.join(ROOT, script), run_name='__main__')


def stops(monkeypatch, script, *args):
    """The SystemExit message of `python script *args`."""
    with pytest.raises(SystemExit) as e:
        run_script(monkeypatch, script, *args)
    assert isinstance(e.value.code, str), e.value.code
    return e.value.code


def records(out_dir, kind):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [r for r in map(json.loads, f) if r['kind'] == kind]


def checkpoint_for(path, in_dim=8, cond_dim=12, **changed_args):
    """An untrained checkpoint in train.py's format; changed_args alter model_args, not weights."""
    cfg = DiTConfig(dim=32, n_layers=2, n_heads=2, in_dim=in_dim, cond_dim=cond_dim, grid_size=4)
    torch.manual_seed(0)
    model = DiT(cfg)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({'model': model.state_dict(), 'ema': model.state_dict(), 'optimizer': {},
                'scaler': {},
                'model_args': {**dataclasses.asdict(cfg), **changed_args}, 'iter_num': 10,
                'best_val_loss': 1.0, 'config': {},
                'data_stats': {'clip_mean': [0.0] * in_dim, 'clip_std': [1.0] * in_dim}, 'rng': {},
                'data_position': {'samples_seen': 80, 'epoch': 0, 'index': 80,
                                  'train_rows': 64}}, path)
    return path


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_data_folder(str(tmp_path_factory.mktemp('rel') / 'data'), n=64)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (root only): a disk that is nearly full, and can be made read-only."""
    path = tmp_path / 'disk'
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs',
                                            str(path)],
                                           capture_output=True).returncode:
        pytest.skip('mounting a small tmpfs needs root')
    try:
        yield str(path)
    finally:
        subprocess.run(['umount', str(path)], check=True)


# --- faults ---------------------------------------------------------------------------------


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one_and_auto_resumes(data, tmp_path):
    out = str(tmp_path / 'out')
    args = [*TINY, f'--train_data={data}', '--val_fraction=0.25', f'--out_dir={out}',
            '--max_iters=20', '--init_from=auto']
    killed = subprocess.run([sys.executable, '-c', DIES_IN_SECOND_SAVE, *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # iteration 20's write died half-way: its bytes are in ckpt.pt.tmp; ckpt.pt, 10's, is whole
    size = os.path.getsize
    assert size(os.path.join(out, 'ckpt.pt.tmp')) < size(os.path.join(out, 'ckpt.pt'))
    with open(os.path.join(out, 'ckpt.pt'), 'rb') as f:
        before = f.read()
    assert torch.load(io.BytesIO(before), weights_only=True)['iter_num'] == 10
    # the same command again: 'auto' finds the checkpoint and resumes it
    result = subprocess.run([sys.executable, 'train.py', *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"init_from='auto': resuming {out}/ckpt.pt" in result.stdout
    assert [r['iter'] for r in records(out, 'resume')] == [10]
    assert sorted({r['iter'] for r in records(out, 'train')}) == list(range(20))
    assert torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['iter_num'] == 20
    assert not os.path.exists(os.path.join(out, 'ckpt.pt.tmp'))


def descendants(pid):
    """Process ids below pid, read from /proc."""
    children = {}
    for entry in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{entry}/stat') as f:
                ppid = int(f.read().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def environ(pid):
    try:
        with open(f'/proc/{pid}/environ', 'rb') as f:
            return dict(item.split(b'=', 1) for item in f.read().split(b'\0') if b'=' in item)
    except OSError:
        return {}


def test_torchrun_restarts_a_killed_rank_and_the_run_resumes_on_its_own(data, tmp_path):
    out = str(tmp_path / 'ddp')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           '--max-restarts=1', '--monitor-interval=0.1', 'train.py', *TINY,
           f'--train_data={data}', '--val_fraction=0.25', f'--out_dir={out}', '--max_iters=40',
           '--init_from=auto']
    env = {**os.environ, 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE': '1'}  # see train.py's docstring
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    try:
        deadline = time.time() + 180
        while not os.path.exists(os.path.join(out, 'ckpt.pt')):  # the checkpoint of iteration 10
            assert proc.poll() is None and time.time() < deadline, \
                'the run died or stalled before its checkpoint'
            time.sleep(0.01)
        rank1 = [p for p in descendants(proc.pid)
                 if environ(p).get(b'LOCAL_RANK') == b'1'
                 and environ(p).get(b'TORCHELASTIC_RESTART_COUNT') == b'0']
        assert rank1, 'rank 1 not found'
        for pid in rank1:
            os.kill(pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # a failed test leaves no workers behind
            for pid in descendants(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output[-3000:]
    assert 'torchrun restart 1' in output, output[-3000:]
    resumes = [r['iter'] for r in records(out, 'resume')]
    assert len(resumes) == 1 and 10 <= resumes[0] < 40
    assert torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['iter_num'] == 40
    assert records(out, 'eval')[-1]['iter'] == 40


def test_unwritable_out_dir_stops_before_any_work(data, tmp_path, monkeypatch):
    (tmp_path / 'file').write_text('a regular file, not a folder')
    below_a_file = str(tmp_path / 'file' / 'out')  # unwritable even for root
    message = stops(monkeypatch, 'train.py', *TINY, f'--train_data={data}', f'--val_data={data}',
                    f'--out_dir={below_a_file}')
    assert message.startswith(f"out_dir={below_a_file!r} is not writable (Not a directory"), message
    message = stops(monkeypatch, 'extract.py', *EXTRACT, '--source=synthetic', "--splits=('val',)",
                    "--synthetic_counts={'val': 2}", f'--data_dir={below_a_file}')
    assert message.startswith(
        f"data_dir={below_a_file!r} is not writable (Not a directory"), message


def test_full_disk_stops_each_stage_before_any_work(data, tmp_path, small_disk, monkeypatch):
    message = stops(monkeypatch, 'train.py', *TINY, f'--train_data={data}', f'--val_data={data}',
                    f'--out_dir={small_disk}/out')
    # beside train.py's lock file
    free = f'its disk has {shutil.disk_usage(small_disk).free:,} free'
    params = DiT(DiTConfig(dim=32, n_layers=2, n_heads=2, in_dim=8, cond_dim=12,
                           grid_size=4)).num_params()
    # ckpt.pt's temporary copy beside it (twice its size while none exists yet), no kept copies
    assert (f"out_dir='{small_disk}/out': ckpt.pt (and 0 kept copies) need about "
            f"{2 * (16 * params + 2**20):,} bytes, {free}") in message
    message = stops(monkeypatch, 'extract.py', *EXTRACT, '--source=synthetic', "--splits=('val',)",
                    "--synthetic_counts={'val': 40}", '--synthetic_image_size=64',
                    f'--data_dir={small_disk}')
    needed = 40 * (16 * (64 + 96) * 2 + 32 * 4)  # tiny-clip / tiny-eva widths, clip_cls in float32
    assert f"data_dir={small_disk!r}: the arrays need about {needed:,} bytes, {free}" in message
    big = make_data_folder(str(tmp_path / 'big'), n=300)
    os.symlink(checkpoint_for(str(tmp_path / 'run' / 'ckpt.pt')),
               os.path.join(small_disk, 'ckpt.pt'))
    message = stops(monkeypatch, 'sample.py', f'--out_dir={small_disk}', f'--val_data={big}',
                    '--device=cpu')
    assert (f"out_dir={small_disk!r}: the samples need about {300 * 16 * 8 * 2 + 300:,} bytes, "
            f"{free}") in message
    # the stopped runs' lock files (held open by their frames in this process) close: no busy mount
    gc.collect()
    subprocess.run(['mount', '-o', 'remount,ro', small_disk], check=True)
    message = stops(monkeypatch, 'sample.py', f'--out_dir={small_disk}', f'--val_data={big}',
                    '--device=cpu')
    assert f"out_dir={small_disk!r} is not writable (Read-only file system" in message
    # nothing half-written left behind: train.py's empty out folder and the checkpoint link only
    assert sorted(os.listdir(small_disk)) == ['ckpt.pt', 'out']
    # train.py's lock on its out_dir, taken before the checks
    assert os.listdir(os.path.join(small_disk, 'out')) == ['.lock']


# --- bad input ------------------------------------------------------------------------------


def truncate(path):
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
        f.truncate(size - 100)
    return size


def bad_folder(tmp_path, case):
    """A copy of a good data folder with one fault, and what train.py must say about it."""
    folder = make_data_folder(str(tmp_path / case), n=64)
    clip, eva, meta_path = (os.path.join(folder,
                                         name) for name in ('clip.npy', 'eva.npy', 'meta.json'))
    if case == 'truncated':
        size = truncate(clip)
        return folder, [clip, f'expected {size:,} bytes (float16 [64, 16, 8]), the file has '
                              f'{size - 100:,} bytes']
    if case == 'float32':
        np.save(clip, np.load(clip).astype(np.float32))
        return folder, [clip, 'holds float32 [64, 16, 8], expected float16']
    if case == 'no_meta':
        os.remove(meta_path)
        return folder, [meta_path, 'is missing', 'extract.py']
    if case == 'other_encoder':
        meta = json.load(open(meta_path))
        meta['eva'].update(model='EVA02-E-14-plus', dim=1792)
        json.dump(meta, open(meta_path, 'w'))
        return folder, [meta_path, 'eva tokens [16, 1792]', "'EVA02-E-14-plus'", eva,
                        'holds [16, 12]']
    if case == 'nan':
        array = np.load(eva, mmap_mode='r+')
        array[40, 3, :5] = np.nan
        array[40, 7, 0] = np.inf
        array.flush()
        return folder, [eva, 'row 40 has 5 NaN and 1 inf values, expected finite tokens']
    raise ValueError(case)


@pytest.mark.parametrize('case', ['truncated', 'float32', 'no_meta', 'other_encoder', 'nan'])
def test_train_names_the_bad_file_and_the_values(case, data, tmp_path, monkeypatch):
    folder, expected = bad_folder(tmp_path, case)
    message = stops(monkeypatch, 'train.py', *TINY, f'--train_data={folder}', f'--val_data={data}',
                    f'--out_dir={tmp_path}/out')
    for text in expected:
        assert text in message, message
    assert not os.path.exists(os.path.join(tmp_path, 'out', 'ckpt.pt'))


def test_checkpoint_whose_weights_do_not_fit_its_model_config(data, tmp_path, monkeypatch):
    """E.g. from another version of model.py: train resume and sample.py name file and shapes."""
    ckpt = checkpoint_for(str(tmp_path / 'run' / 'ckpt.pt'), dim=48, n_heads=3)
    with open(ckpt, 'rb') as f:
        before = f.read()
    message = stops(monkeypatch, 'train.py', *TINY, f'--train_data={data}', f'--val_data={data}',
                    f'--out_dir={tmp_path}/run', '--init_from=resume')
    assert message.startswith(f"{ckpt}: its 'model' weights do not fit the DiT its "
                              f"model_args describe"), message
    assert ('copying a param with shape torch.Size([32, 8]) from checkpoint, the shape in current '
            'model is torch.Size([48, 8])') in message
    message = stops(monkeypatch, 'sample.py', f'--out_dir={tmp_path}/run', f'--val_data={data}',
                    '--device=cpu')
    assert f"{ckpt}: its 'ema' weights do not fit" in message, message
    assert 'torch.Size([48, 8])' in message, message
    with open(ckpt, 'rb') as f:
        assert f.read() == before


@pytest.mark.parametrize('case', ['truncated', 'float32'])
def test_sample_names_a_bad_eva_array(case, tmp_path, monkeypatch):
    folder = make_data_folder(str(tmp_path / 'data'), n=8)
    eva = os.path.join(folder, 'eva.npy')
    if case == 'truncated':
        size = truncate(eva)
        expected = (f'expected {size:,} bytes (float16 [8, 16, 12]), '
                    f'the file has {size - 100:,} bytes')
    else:
        np.save(eva, np.load(eva).astype(np.float32))
        expected = 'holds float32 [8, 16, 12], expected float16'
    checkpoint_for(str(tmp_path / 'run' / 'ckpt.pt'))
    message = stops(monkeypatch, 'sample.py', f'--out_dir={tmp_path}/run', f'--val_data={folder}',
                    '--device=cpu')
    assert eva in message and expected in message, message


def test_empty_image_folder_and_coco_without_its_images(tmp_path, monkeypatch):
    (tmp_path / 'images' / 'set').mkdir(parents=True)
    (tmp_path / 'images' / 'set' / 'notes.txt').write_text('not an image')
    message = stops(monkeypatch, 'extract.py', *EXTRACT, '--source=folder',
                    f'--image_folder={tmp_path}/images',
                    "--splits=('set',)", f'--data_dir={tmp_path}/data')
    assert message.startswith('no images (.jpg, .jpeg'), message
    assert message.endswith(f'in {tmp_path}/images/set'), message
    # COCO annotations next to an image folder that lacks every file they list
    coco = tmp_path / 'coco'
    (coco / 'annotations').mkdir(parents=True)
    (coco / 'images' / 'val2017').mkdir(parents=True)
    json.dump({'images': [{'id': i, 'file_name': f'{i:012d}.jpg', 'height': 8,
                           'width': 8} for i in (3, 9)],
               'annotations': [{'id': i, 'image_id': i, 'caption': 'x'} for i in (3, 9)]},
              open(coco / 'annotations' / 'captions_val2017.json', 'w'))
    message = stops(monkeypatch, 'extract.py', *EXTRACT, '--source=coco', f'--coco_root={coco}',
                    "--splits=('val2017',)", f'--data_dir={tmp_path}/data')
    missing = f'{coco}/images/val2017/000000000003.jpg'
    assert message.startswith(f"no readable image in split 'val2017': expected at least one "
                              f"of the 2 listed; the first, {missing}: FileNotFoundError"), message
    assert not os.path.exists(tmp_path / 'data' / 'val2017' / 'clip.npy')
    assert not [f for f in os.listdir(tmp_path / 'data' / 'val2017')
                if f.startswith('.extract_state')]
