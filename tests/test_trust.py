"""Files you can trust: every file one stage hands another is matched by identity, verified, written
by one process at a time, and every bad input ends in one message that names the file or setting,
the expected and the actual value. Each test is a case that once gave a wrong answer without a word,
or a raw traceback."""
import errno
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import sources
from conftest import ROOT, make_data_folder

TINY = ['--dim=32', '--n_layers=2', '--n_heads=2', '--in_dim=8', '--cond_dim=12', '--grid_size=4',
        '--batch_size=2', '--gradient_accumulation_steps=2', '--compile=False', '--dtype=float32',
        '--device=cpu', '--eval_interval=5', '--eval_iters=1', '--eval_gen_items=2',
        '--eval_gen_steps=1', '--log_interval=1', '--learning_rate=3e-3', '--warmup_iters=2',
        '--lr_decay_iters=10', '--keep_interval=5', '--max_iters=10']
SAMPLE = ['--sample_steps=2', '--sample_method=euler', '--device=cpu']


def train(out, folder, *extra):
    result = subprocess.run([sys.executable, 'train.py', *TINY, f'--train_data={folder}',
                             '--val_fraction=0.25', f'--out_dir={out}', *extra], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out


def stops(monkeypatch, script, *args):
    """The SystemExit message of `python script *args`, run in this process."""
    monkeypatch.setattr(sys, 'argv', [script, *args])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, script), run_name='__main__')
    assert isinstance(e.value.code, str), e.value.code
    return e.value.code


def run(monkeypatch, script, *args):
    monkeypatch.setattr(sys, 'argv', [script, *args])
    runpy.run_path(os.path.join(ROOT, script), run_name='__main__')


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return make_data_folder(str(tmp_path_factory.mktemp('trust') / 'data'), n=24)


@pytest.fixture(scope='module')
def val(tmp_path_factory):
    """The reported split: other images than the training folder's."""
    return make_data_folder(str(tmp_path_factory.mktemp('trust') / 'val'), n=12, seed=1)


@pytest.fixture(scope='module')
def trained(folder, tmp_path_factory):
    """A run of 10 iterations: ckpt.pt and the kept ckpt_iter000005.pt, ckpt_iter000010.pt."""
    return train(str(tmp_path_factory.mktemp('trust') / 'run'), folder)


def test_a_retrained_checkpoint_at_the_same_path_and_iteration_is_not_reused(folder, val, tmp_path,
                                                                             monkeypatch):
    out = train(str(tmp_path / 'run'), folder)
    run(monkeypatch, 'sample.py', f'--out_dir={out}', f'--val_data={val}', *SAMPLE)
    first = data.read_json(data.last_samples(out, False)
                           + '/generated.json')['depends_on']['checkpoint']
    # same path and iteration
    train(out, folder, '--overwrite=True', '--learning_rate=0.0', '--min_lr=0.0')
    message = stops(monkeypatch, 'sample.py', f'--out_dir={out}', f'--val_data={val}', *SAMPLE)
    assert 'holds another result' in message, message
    assert "'checkpoint.run_id': ('" + first['run_id'] in message, message
    # the same iteration
    assert "'checkpoint.weights'" in message and "'checkpoint.iter_num'" not in message


def test_samples_record_the_identity_of_the_checkpoint_and_the_data(trained, folder, val, tmp_path,
                                                                    monkeypatch):
    out = str(tmp_path / 'out')
    ckpt = os.path.join(trained, 'ckpt_iter000010.pt')
    run(monkeypatch, 'sample.py', f'--out_dir={out}', f'--ckpt_path={ckpt}', f'--val_data={val}',
        *SAMPLE)
    info = data.read_json(os.path.join(data.last_samples(out, False), 'generated.json'))
    saved = torch.load(ckpt, weights_only=True)
    assert info['depends_on']['checkpoint'] == {'path': ckpt, 'run_id': saved['run']['id'],
                                                'iter_num': 10,
                                                'weights': data.checkpoint_weights(ckpt),
                                                'objective': 'flow'}
    meta, val_meta = data.open_folder(folder), data.open_folder(val)
    assert info['data'] == {'folder': val, 'id': val_meta['id'], 'start': 0, 'count': 12}
    assert info['data_stats']['clip_mean'] == meta['clip_mean']
    assert 'data_stats' in info['data_stats']['source']
    # the held-out slice is its own target, in its own folder; the rows the checkpoint trained on
    # are refused
    run(monkeypatch, 'sample.py', f'--out_dir={out}', f'--ckpt_path={ckpt}',
        f'--train_data={folder}', '--holdout=True', '--val_fraction=0.25', *SAMPLE)
    held = data.read_json(os.path.join(data.last_samples(out, True), 'generated.json'))
    assert held['data'] == {'folder': folder, 'id': meta['id'], 'start': 18, 'count': 6}
    assert data.last_samples(out, True).endswith('-holdout')
    assert not data.last_samples(out, False).endswith('-holdout')
    message = stops(monkeypatch, 'sample.py', f'--out_dir={out}', f'--ckpt_path={ckpt}',
                    f'--train_data={folder}', '--holdout=True', '--val_fraction=0.5', *SAMPLE)
    assert (f'was trained on rows 0..17 of {folder}, and rows 12..23 are to be generated: '
            f'they overlap') in message


def test_a_regression_checkpoints_samples_record_regression(folder, val, tmp_path, monkeypatch):
    """The objective is a key of the checkpoint, not of model_args: every identity used to say
    'flow'."""
    out = train(str(tmp_path / 'run'), folder, '--objective=regression', '--max_iters=5')
    run(monkeypatch, 'sample.py', f'--out_dir={out}', f'--val_data={val}', *SAMPLE)
    info = data.read_json(os.path.join(out, 'samples', 'ckpt-regression', 'generated.json'))
    assert info['depends_on']['checkpoint']['objective'] == 'regression'
    assert info['depends_on']['settings'] == {'use_ema': True} and info['model_calls'] == 1
    assert info['method'] == 'regression' and data.load_checkpoint(os.path.join(out, 'ckpt.pt'))[
        'identity']['objective'] == 'regression'


@pytest.mark.parametrize('damage', ['bit_flip', 'truncated', 'empty'])
def test_a_damaged_checkpoint_is_refused_naming_the_intact_ones(trained, folder, val, tmp_path,
                                                                monkeypatch, damage):
    run_dir = str(tmp_path / 'run')
    shutil.copytree(trained, run_dir)
    path = os.path.join(run_dir, 'ckpt.pt' if damage != 'bit_flip' else 'ckpt_iter000005.pt')
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
        # 64 bytes inside the weights: it used to load and sample without a word
        if damage == 'bit_flip':
            f.seek(size // 2)
            chunk = f.read(64)
            f.seek(size // 2)
            f.write(bytes(b ^ 0xFF for b in chunk))
        else:
            f.truncate(size // 2 if damage == 'truncated' else 0)
    intact = sorted(os.path.join(run_dir, f) for f in ('ckpt.pt', 'ckpt_iter000005.pt',
                                                       'ckpt_iter000010.pt')
                    if os.path.join(run_dir, f) != path)
    expected = 'fails its CRC32 check' if damage == 'bit_flip' else 'not a whole checkpoint'
    message = stops(monkeypatch, 'sample.py', f'--ckpt_path={path}', f'--val_data={val}',
                    f'--out_dir={tmp_path}/out', *SAMPLE)
    assert message.startswith(f'{path}: ') and expected in message and message.endswith(
        f"Intact checkpoints beside it: {', '.join(intact)}"), message
    if damage != 'bit_flip':  # train.py's resume says the same, before any work
        message = stops(monkeypatch, 'train.py', *TINY, f'--train_data={folder}',
                        '--val_fraction=0.25', f'--out_dir={run_dir}', '--init_from=auto')
        assert message.startswith(f'{path}: not a whole checkpoint '
                                  f'({size // 2 if damage == "truncated" else 0:,} '
                                  f'bytes') and 'ckpt_iter000010.pt' in message, message


def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint_and_no_temporary_file(
        tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pt')
    data.save_checkpoint(path, {'iter_num': 1})
    before = open(path, 'rb').read()

    def full_disk(obj, f):
        f.write(b'x' * 1000)
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(SystemExit) as e:
        data.save_checkpoint(path, {'iter_num': 2})
    assert e.value.code.startswith(f'{path}: writing the checkpoint failed (disk full: ')
    assert 'is as it was' in e.value.code
    assert os.listdir(tmp_path) == ['ckpt.pt'] and open(path, 'rb').read() == before


def test_the_start_check_counts_the_temporary_file_and_the_kept_copies(folder, tmp_path,
                                                                       monkeypatch):
    from model import DiT, DiTConfig
    cfg = DiTConfig(dim=32, n_layers=2, n_heads=2, in_dim=8, cond_dim=12, grid_size=4)
    params = DiT(cfg).num_params()
    full, kept = data.checkpoint_bytes(params), data.checkpoint_bytes(params, full=False)
    usage = shutil.disk_usage(str(tmp_path))
    # two copies short
    monkeypatch.setattr(data.shutil, 'disk_usage', lambda p: usage._replace(free=2 * full + kept))
    message = stops(monkeypatch, 'train.py', *TINY, f'--train_data={folder}', '--val_fraction=0.25',
                    f'--out_dir={tmp_path}/out')
    assert f"ckpt.pt (and 2 kept copies) need about {2 * full + 2 * kept:,} bytes" in message, \
        message


HOLD = ("import sys, time, data; held = data.lock(sys.argv[1], 'x'); print('held', flush=True); "
        "time.sleep(120)")


@pytest.mark.parametrize('script', ['train.py', 'sample.py', 'extract.py'])
def test_one_writer_at_a_time_and_a_killed_holder_blocks_nothing(script, trained, folder, val,
                                                                 tmp_path, monkeypatch):
    args = {'train.py': [*TINY, f'--train_data={folder}', '--val_fraction=0.25',
                         f'--out_dir={tmp_path}/out'],
            'sample.py': [f'--out_dir={tmp_path}/out', f'--ckpt_path={trained}/ckpt.pt',
                          f'--val_data={val}', *SAMPLE],
            'extract.py': ['--clip_model=tiny-clip', '--eva_model=tiny-eva', '--clip_pretrained=',
                           '--grid_size=4', '--extract_batch_size=4', '--num_workers=0',
                           '--device=cpu', '--source=synthetic', "--splits=('val',)",
                           "--synthetic_counts={'val': 4}", '--synthetic_image_size=32',
                           f'--data_dir={tmp_path}/data']}[script]
    folder_of = {'train.py': f'{tmp_path}/out', 'extract.py': f'{tmp_path}/data/val',
                 'sample.py': f'{tmp_path}/out/samples/ckpt-euler2-cfg1-seed1337'}[script]
    holder = subprocess.Popen([sys.executable, '-c', HOLD, folder_of], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        message = stops(monkeypatch, script, *args)
        assert message.startswith(f"{folder_of} is in use by another {script} (pid {holder.pid} "
                                  f"on "), message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    run(monkeypatch, script, *args)  # the lock file stays behind; its lock died with its holder


def test_captions_that_are_not_lists_of_strings_are_refused():
    for captions, expected in [({'7': 'a dog on a sofa'},
                                "image 7: expected a non-empty list of caption strings, "
                                                          "got str 'a dog on a sofa'"),
                               ({'7': []}, 'image 7: expected a non-empty list of caption strings, '
                                           'got list []'),
                               ({'7': ['a dog', 42]}, 'image 7: expected non-blank caption '
                                                      'strings, got int 42'),
                               ({'7': ['a dog', '  ']}, "image 7: expected non-blank caption "
                                                        "strings, got str '  '")]:
        escaped = expected.replace('[', r'\[').replace(']', r'\]')
        with pytest.raises(SystemExit, match='^captions.json: ' + escaped):
            data.check_captions(captions, 'captions.json')
    data.check_captions({'7': ['a dog', 'a sofa']}, 'captions.json')


def test_a_16_bit_png_reads_like_the_8_bit_picture(tmp_path):
    # a ramp over [0, 1]
    picture = np.add.outer(np.arange(64), np.arange(64)).astype(np.float64) / 126
    Image.fromarray((picture * 65535).round().astype(np.uint16)).save(tmp_path / 'deep.png')
    Image.fromarray((picture * 255).round().astype(np.uint8)).save(tmp_path / 'plain.png')
    assert Image.open(tmp_path / 'deep.png').mode == 'I;16'
    deep, plain = (np.asarray(sources.load_file(str(tmp_path / f)), dtype=np.int16)
                   for f in ('deep.png', 'plain.png'))
    assert deep.shape == plain.shape == (64, 64, 3) and np.abs(deep - plain).max() <= 1
    assert plain.mean() < 150  # not the near-white that PIL's convert('RGB') makes of it


def test_sizes_that_are_not_positive_are_named(folder, tmp_path, monkeypatch):
    message = stops(monkeypatch, 'train.py', *TINY, '--batch_size=0', f'--train_data={folder}',
                    f'--out_dir={tmp_path}/out')
    assert message == 'config error: batch_size must be a positive integer, got 0'
    message = stops(monkeypatch, 'sample.py', f'--out_dir={tmp_path}/out', '--sample_batch_size=0')
    assert message == 'config error: sample_batch_size must be a positive integer, got 0'
    message = stops(monkeypatch, 'eval.py', f'--out_dir={tmp_path}/out', '--eval_batch_size=0')
    assert message == 'config error: eval_batch_size must be a positive integer, got 0'


def test_an_empty_sweep_says_so(tmp_path, monkeypatch):
    message = stops(monkeypatch, 'sweep.py', '--ckpts=()', f'--out_dir={tmp_path}',
                    '--holdout=False')
    assert message.startswith('sweep.py: ckpts is empty: give checkpoint files or glob '
                              'patterns'), message


def test_metrics_after_a_resume_hold_each_iteration_once(tmp_path):
    path = str(tmp_path / 'metrics.jsonl')
    written = [{'kind': 'eval', 'iter': 0}, *({'kind': 'train', 'iter': i} for i in range(8)),
               {'kind': 'eval', 'iter': 5}]  # killed at 8 with a checkpoint at 5
    with open(path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in written)
    data.truncate_metrics(path, 5)
    with open(path) as f:
        assert [json.loads(line) for line in f] == [written[0], *written[1:6], written[-1]]
