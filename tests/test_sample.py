"""sample.py on a tiny trained checkpoint: shapes, determinism across batch sizes and ranks, resume,
output names, kept checkpoints, bad input."""
import dataclasses
import json
import os
import runpy
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
import flow
from conftest import ROOT, make_data_folder
from model import DiT, DiTConfig

SAMPLE = os.path.join(ROOT, 'sample.py')
N = 12


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A data folder and a checkpoint in train.py's format, from a tiny DiT trained briefly on
    it."""
    root = tmp_path_factory.mktemp('sample')
    data = make_data_folder(str(root / 'data'), n=N, tokens=16, clip_dim=8, eva_dim=12)
    meta = json.load(open(os.path.join(data, 'meta.json')))
    mean, std = torch.tensor(meta['clip_mean']).float(), torch.tensor(meta['clip_std']).float()
    x1 = (torch.from_numpy(np.load(os.path.join(data, 'clip.npy'))).float() - mean) / std
    cond = torch.from_numpy(np.load(os.path.join(data, 'eva.npy'))).float()
    cfg = DiTConfig(dim=32, n_layers=2, n_heads=2, in_dim=8, cond_dim=12, grid_size=4,
                    ffn_multiple_of=32)
    torch.manual_seed(0)
    model = DiT(cfg)
    ema = DiT(cfg)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for it in range(150):
        loss = flow.flow_losses(model, x1, cond, generator=g)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 0.1)
    ckpt = {'model': model.state_dict(), 'ema': ema.state_dict(), 'optimizer': opt.state_dict(),
            'scaler': {}, 'model_args': dataclasses.asdict(cfg), 'iter_num': 150,
            'best_val_loss': loss.item(), 'config': {'sigma_min': 1e-4, 'seed': 0},
            'data_stats': {'clip_mean': meta['clip_mean'], 'clip_std': meta['clip_std']},
            'rng': {'seed': 0}, 'data_position': {'samples_seen': 150 * N}}
    os.makedirs(root / 'run')
    torch.save(ckpt, root / 'run' / 'ckpt.pt')
    return data, root / 'run' / 'ckpt.pt'


def out_dir_with(ckpt, path):
    os.makedirs(path)
    os.symlink(ckpt, os.path.join(path, 'ckpt.pt'))
    return str(path)


def samples(out, method='midpoint', steps=10, cfg=1.0, seed=1337, ckpt='ckpt.pt'):
    """The folder sample.py writes for these settings (data.samples_name)."""
    sampler = flow.Sampler(method=method, steps=steps, cfg_scale=cfg, seed=seed)
    return os.path.join(out, 'samples', data.samples_name(ckpt, sampler))


def generated(folder):
    """A samples folder's generated.npy in float32."""
    return np.load(os.path.join(folder, 'generated.npy')).astype(np.float32)


def run_sample(monkeypatch, *args):
    monkeypatch.setattr(sys, 'argv', ['sample.py', *args])
    runpy.run_path(SAMPLE, run_name='__main__')


def test_shapes_settings_and_batch_size_independence(trained, tmp_path, monkeypatch, capsys):
    data, ckpt = trained
    outs = {}
    for bs in (5, 12):
        out = out_dir_with(ckpt, tmp_path / f'bs{bs}')
        run_sample(monkeypatch, f'--out_dir={out}', f'--val_data={data}',
                   f'--sample_batch_size={bs}', '--sample_steps=8', '--seed=3')
        outs[bs] = np.load(os.path.join(samples(out, steps=8, seed=3), 'generated.npy'))
        assert sorted(os.listdir(out)) == ['ckpt.pt', 'samples']
        assert os.listdir(os.path.join(out, 'samples')) == ['ckpt-midpoint8-cfg1-seed3']
        written = sorted(f for f in os.listdir(samples(out, steps=8, seed=3)) if f != '.lock')
        assert written == ['generated.json', 'generated.npy']  # no partials
    assert outs[5].shape == (N, 16, 8) and outs[5].dtype == np.float16
    np.testing.assert_allclose(outs[5].astype(np.float32), outs[12].astype(np.float32), atol=2e-3,
                               rtol=2e-3)
    info = json.load(open(os.path.join(samples(tmp_path / 'bs5', steps=8, seed=3),
                                       'generated.json')))
    assert (info['settings']['sample_steps'], info['settings']['seed'],
            info['settings']['use_ema']) == (8, 3, True)
    assert info['depends_on']['shape'] == [N, 16, 8] and info['samples_per_second'] > 0
    assert info['model_calls'] == 16
    assert info['settings']['checkpoint'] == str(tmp_path / 'bs5' / 'ckpt.pt')
    assert info['settings']['iter_num'] == 150
    # de-standardized with the checkpoint's stats, the samples match their own images (the untrained
    # model gives ~0)
    meta = json.load(open(os.path.join(data, 'meta.json')))
    standardize = lambda x: (x.astype(np.float32) - meta['clip_mean']) / meta['clip_std']
    gen = standardize(outs[5]).mean(1)
    real = standardize(np.load(os.path.join(data, 'clip.npy'))).mean(1)
    pooled_cos = (gen * real).sum(1) / np.linalg.norm(gen, axis=1) / np.linalg.norm(real, axis=1)
    assert pooled_cos.mean() > 0.5
    # per-channel means land on the data's
    assert np.abs(standardize(outs[5]).mean((0, 1))).max() < 0.5
    # another seed or the raw weights give other samples, in folders of their own beside the first
    out = str(tmp_path / 'bs12')
    before = os.stat(os.path.join(samples(out, steps=8, seed=3), 'generated.npy')).st_mtime_ns
    for extra, folder in (('--seed=4', 'ckpt-midpoint8-cfg1-seed4'),
                          ('--use_ema=False', 'ckpt-midpoint8-cfg1-raw-seed3')):
        run_sample(monkeypatch, f'--out_dir={out}', f'--val_data={data}', '--sample_steps=8',
                   '--seed=3', extra)
        other = np.load(os.path.join(out, 'samples', folder, 'generated.npy')).astype(np.float32)
        assert np.abs(other - outs[12]).max() > 1e-2
    assert os.stat(os.path.join(samples(out, steps=8, seed=3),
                                'generated.npy')).st_mtime_ns == before
    # rerunning the same settings is a no-op
    with pytest.raises(SystemExit) as e:
        run_sample(monkeypatch, f'--out_dir={tmp_path / "bs5"}', f'--val_data={data}',
                   '--sample_steps=8', '--seed=3')
    assert e.value.code == 0 and 'already holds these samples' in capsys.readouterr().out


def test_resume_after_kill(trained, tmp_path, monkeypatch, capsys):
    data, ckpt = trained
    common = [f'--val_data={data}', '--sample_steps=60', '--sample_method=heun', '--cfg_scale=1.5']
    ref = out_dir_with(ckpt, tmp_path / 'ref')
    run_sample(monkeypatch, f'--out_dir={ref}', *common)
    out = out_dir_with(ckpt, tmp_path / 'killed')
    proc = subprocess.Popen([sys.executable, SAMPLE, f'--out_dir={out}', *common,
                             '--sample_batch_size=1'],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = samples(out, 'heun', 60, 1.5)
    done_path = os.path.join(folder, 'generated.done.npy')
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(done_path) and np.load(done_path).sum() >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = int(np.load(done_path).sum())
    assert 2 <= done < N and not os.path.exists(os.path.join(folder, 'generated.npy'))
    run_sample(monkeypatch, f'--out_dir={out}', *common, '--sample_batch_size=4')
    printed = capsys.readouterr().out
    assert f'{done} of {N} rows done' in printed
    assert f'{N - done} of {N} rows to generate' in printed
    np.testing.assert_allclose(generated(folder), generated(samples(ref, 'heun', 60, 1.5)),
                               atol=2e-3, rtol=2e-3)
    # partial files written under other settings (another val_data, say) are not continued: the run
    # starts over
    os.remove(os.path.join(folder, 'generated.npy'))
    for name in ('generated.partial.npy', 'generated.done.npy'):
        np.save(os.path.join(folder, name), np.zeros(1))
    json.dump({'stale': True}, open(os.path.join(folder, 'generated.partial.json'), 'w'))
    run_sample(monkeypatch, f'--out_dir={out}', *common)
    assert f'{N} of {N} rows to generate' in capsys.readouterr().out


def test_torchrun_ranks_write_their_rows(trained, tmp_path, monkeypatch):
    data, ckpt = trained
    common = [f'--val_data={data}', '--sample_steps=4', '--sample_batch_size=4']
    single = out_dir_with(ckpt, tmp_path / 'single')
    run_sample(monkeypatch, f'--out_dir={single}', *common)
    ranks = out_dir_with(ckpt, tmp_path / 'ranks')
    torchrun = os.path.join(os.path.dirname(sys.executable), 'torchrun')
    result = subprocess.run([torchrun, '--standalone', '--nproc_per_node=2', SAMPLE,
                             f'--out_dir={ranks}', *common],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'rank 1: 6 of 6 rows to generate' in result.stdout
    info = json.load(open(os.path.join(samples(ranks, steps=4), 'generated.json')))
    assert info['world_size'] == 2
    np.testing.assert_allclose(generated(samples(ranks, steps=4)),
                               generated(samples(single, steps=4)), atol=2e-3, rtol=2e-3)


def test_bad_input_named(trained, tmp_path, monkeypatch):
    data, ckpt = trained
    with pytest.raises(SystemExit, match=r'ckpt.pt not found'):
        run_sample(monkeypatch, f'--out_dir={tmp_path / "nothing"}', f'--val_data={data}')
    out = out_dir_with(ckpt, tmp_path / 'run')
    wide = make_data_folder(str(tmp_path / 'wide'), n=4, tokens=16, clip_dim=8, eva_dim=10)
    with pytest.raises(SystemExit,
                       match=r'wide/eva.npy: token width 10, but the model has cond_dim=12'):
        run_sample(monkeypatch, f'--out_dir={out}', f'--val_data={wide}')
    other = make_data_folder(str(tmp_path / 'other'), n=4, tokens=16, clip_dim=6, eva_dim=12)
    with pytest.raises(SystemExit,
                       match=r'other/clip.npy: token width 6, but the model has in_dim=8'):
        run_sample(monkeypatch, f'--out_dir={out}', f'--val_data={other}')
    with pytest.raises(SystemExit,
                       match=r"sample_method should be one of 'euler', 'heun', 'midpoint' \(got "
                             r"'rk4'\)"):
        run_sample(monkeypatch, f'--out_dir={out}', f'--val_data={data}', '--sample_method=rk4')


def test_kept_checkpoint_and_a_changed_one(trained, tmp_path, monkeypatch):
    """Any checkpoint file samples into a folder named after it; a finished folder whose checkpoint
    has changed since (trained further) is refused, not overwritten."""
    data, ckpt = trained
    full = torch.load(ckpt, weights_only=True)
    # what train.py's keep_interval writes: EMA weights only
    kept = str(tmp_path / 'ckpt_iter000150.pt')
    torch.save({k: full[k] for k in ('ema', 'model_args', 'config', 'data_stats', 'iter_num')},
               kept)
    out = str(tmp_path / 'out')
    run_sample(monkeypatch, f'--out_dir={out}', f'--val_data={data}', f'--ckpt_path={kept}',
               '--sample_steps=4', '--sample_method=midpoint', '--sample_shift=2.0')
    folder = os.path.join(out, 'samples', 'ckpt_iter000150-midpoint4-shift2-cfg1-seed1337')
    info = json.load(open(os.path.join(folder, 'generated.json')))
    assert info['settings']['checkpoint'] == kept and info['model_calls'] == 8
    with pytest.raises(SystemExit, match=r"has no 'model' weights"):
        run_sample(monkeypatch, f'--out_dir={out}', f'--val_data={data}', f'--ckpt_path={kept}',
                   '--use_ema=False')
    torch.save({**torch.load(kept, weights_only=True), 'iter_num': 300}, kept)
    with open(os.path.join(folder, 'generated.npy'), 'rb') as f:
        before = f.read()
    with pytest.raises(SystemExit,
                       match=r"holds another result .*'checkpoint.iter_num': \(150, 300\).*delete"):
        run_sample(monkeypatch, f'--out_dir={out}', f'--val_data={data}', f'--ckpt_path={kept}',
                   '--sample_steps=4', '--sample_method=midpoint', '--sample_shift=2.0')
    with open(os.path.join(folder, 'generated.npy'), 'rb') as f:
        assert f.read() == before


def test_checkpoint_without_t_scale_means_dits_1000(trained, tmp_path, monkeypatch):
    """model_args written before t_scale existed were trained with DiT's 1000, whatever the default
    is now."""
    data, ckpt = trained
    full = torch.load(ckpt, weights_only=True)
    legacy = {k: v for k, v in full['model_args'].items() if k != 't_scale'}
    outs = {}
    for name, model_args in (('explicit', {**legacy, 't_scale': 1000.0}), ('legacy', legacy)):
        os.makedirs(tmp_path / name)
        torch.save({**full, 'model_args': model_args}, tmp_path / name / 'ckpt.pt')
        run_sample(monkeypatch, f'--out_dir={tmp_path / name}', f'--val_data={data}',
                   '--sample_steps=2')
        outs[name] = np.load(os.path.join(samples(tmp_path / name, steps=2), 'generated.npy'))
    assert np.array_equal(outs['explicit'], outs['legacy'])


def test_pipelined_output_is_byte_identical_to_a_plain_loop(trained, tmp_path, monkeypatch):
    """Reading ahead and writing behind in threads changes when the host works, never what is
    written."""
    data_folder, ckpt = trained
    out = out_dir_with(ckpt, tmp_path / 'out')
    run_sample(monkeypatch, f'--out_dir={out}', f'--val_data={data_folder}',
               '--sample_batch_size=5', '--sample_steps=3', '--cfg_scale=2.0')
    written = np.load(os.path.join(samples(out, steps=3, cfg=2.0), 'generated.npy'))
    checkpoint = data.load_checkpoint(ckpt)
    model = data.model_from_checkpoint(checkpoint).eval()
    mean, std = (torch.tensor(checkpoint['data_stats'][k]) for k in ('clip_mean', 'clip_std'))
    eva = torch.from_numpy(np.load(os.path.join(data_folder, 'eva.npy'))).float()
    plain = []
    for s in range(0, N, 5):  # the same batches, one after another on the main thread
        rows = np.arange(s, min(s + 5, N))
        sampler = flow.Sampler(method='midpoint', steps=3, shift=1.0, cfg_scale=2.0)
        x = sampler.generate(model, eva[rows], flow.seeded_noise(1337, rows, (16, 8)))
        plain.append((x.float() * std + mean).numpy().astype(np.float16))
    assert np.array_equal(written, np.concatenate(plain))
