"""ridge.py: the streamed fit is the closed form, lambda is chosen on the held-out slice alone,
eval.py takes it."""
import json
import os
import runpy
import shutil
import sys

import numpy as np
import pytest

import data
from conftest import ROOT, make_data_folder
from ridge import choose_lambda, fit_rows, ridge_solutions, token_stats

RIDGE, EVAL = os.path.join(ROOT, 'ridge.py'), os.path.join(ROOT, 'eval.py')


def tokens(folder, rows):
    """Every token of `rows` at once, float64: raw EVA X [tokens, C], standardized CLIP Y."""
    meta = data.read_json(os.path.join(folder, 'meta.json'))
    x, y = (np.load(os.path.join(folder, f'{name}.npy'))[rows].astype(np.float64)
            for name in ('eva', 'clip'))
    y = (y - meta['clip_mean']) / meta['clip_std']
    return x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])


def direct_ridge(X, Y, lam):
    """Closed-form ridge on the whole data: centered (intercept free), penalty lam x mean diag."""
    xm, ym = X.mean(0), Y.mean(0)
    G = (X - xm).T @ (X - xm)
    W = np.linalg.solve(G + lam * np.trace(G) / len(G) * np.eye(len(G)), (X - xm).T @ (Y - ym))
    return np.vstack([W, ym - xm @ W])


def stats_of(folder, rows, batch_size):
    meta = data.open_folder(folder)
    return token_stats(meta['paths']['eva'], meta['paths']['clip'], rows, meta['clip_mean'],
                       meta['clip_std'], batch_size, 'cpu')


def run(monkeypatch, script, *args):
    monkeypatch.setattr(sys, 'argv', [os.path.basename(script), *args])
    runpy.run_path(script, run_name='__main__')


@pytest.mark.parametrize('batch_size', [1, 3, 7, 64])
def test_streamed_fit_is_the_closed_form(tmp_path, batch_size):
    folder = make_data_folder(str(tmp_path / 'train'), n=12, tokens=16, clip_dim=8, eva_dim=12)
    rows = np.arange(9)
    lambdas = (1e-12, 1e-2, 1.0, 1e12)
    X, Y = tokens(folder, rows)
    betas = [beta.numpy() for beta,
             _ in ridge_solutions(stats_of(folder, rows, batch_size), lambdas)]
    for lam, beta in zip(lambdas, betas):
        np.testing.assert_allclose(beta, direct_ridge(X, Y, lam), rtol=1e-8, atol=1e-10)
    least_squares = np.linalg.lstsq(np.hstack([X, np.ones((len(X), 1))]), Y, rcond=None)[0]
    np.testing.assert_allclose(betas[0], least_squares, rtol=1e-7, atol=1e-9)
    # a huge penalty leaves the intercept alone: the map vanishes, the intercept is the rows' mean
    assert np.abs(betas[-1][:-1]).max() < 1e-9
    np.testing.assert_allclose(betas[-1][-1], Y.mean(0), atol=1e-9)


def test_rows_and_held_out_slice_as_train_py_splits():
    assert data.holdout_range(118287, 0.02,
                              'train2017') == (115921, 2366)  # train.py's round(N * val_fraction)
    assert fit_rows(7, 3).tolist() == [0, 2, 4]
    assert fit_rows(7, 0).tolist() == fit_rows(7, 9).tolist() == list(range(7))
    with pytest.raises(SystemExit, match=r"val_fraction=0.0 of the 50 rows of f holds out 0; "
                                         r"the held-out slice"):
        data.holdout_range(50, 0.0, 'f')


def test_lambda_is_chosen_on_the_held_out_slice_only(tmp_path, monkeypatch):
    # 7 training rows of 4 tokens, 20 EVA channels: the smallest penalty overfits, the largest not
    train = make_data_folder(str(tmp_path / 'train'), n=10, tokens=4, clip_dim=8, eva_dim=20,
                             seed=1)
    lambdas = (1e-6, 1e-4, 1e-2, 1.0, 100.0)
    X, Y = tokens(train, np.arange(7))
    Xh, Yh = tokens(train, np.arange(7, 10))
    Xh1 = np.hstack([Xh, np.ones((len(Xh), 1))])
    direct = [np.mean((Xh1 @ direct_ridge(X, Y, lam) - Yh) ** 2) for lam in lambdas]
    lam, _, grid = choose_lambda(stats_of(train, np.arange(7), 3),
                                 stats_of(train, np.arange(7, 10), 2), lambdas)
    assert [g['heldout_mse'] for g in grid] == pytest.approx(direct, rel=1e-9)
    # an inner grid value: the choice does something
    assert lam == lambdas[int(np.argmin(direct))] == 1e-2
    chosen = []
    # two reported splits: different rows, the same choice
    for seed, name in [(5, 'val'), (6, 'other-val')]:
        val = make_data_folder(str(tmp_path / name), n=6, tokens=4, clip_dim=8, eva_dim=20,
                               seed=seed)
        out = tmp_path / f'out-{name}'
        run(monkeypatch, RIDGE, f'--train_data={train}', f'--val_data={val}', f'--out_dir={out}',
            '--val_fraction=0.3', '--ridge_batch_size=2', '--ridge_write_holdout=True')
        info = data.read_json(str(out / 'samples' / 'ridge' / 'generated.json'))
        chosen.append((info['settings']['lambda'], info['settings']['grid']))
    assert chosen[0] == chosen[1] and chosen[0][0] == 1e-2
    assert [g['heldout_mse'] for g in chosen[0][1]] == pytest.approx(direct, rel=1e-9)
    s = info['settings']
    assert (s['fit_rows'], s['fit_tokens'], s['holdout_tokens']) == (7, 28, 12)
    assert info['train_data']['holdout_start'] == 7 and info['train_data']['holdout_count'] == 3
    assert info['data_stats']['source'] == os.path.join(train, 'meta.json')
    assert info['data_stats']['clip_std'] == \
        data.read_json(os.path.join(train, 'meta.json'))['clip_std']
    assert info['data']['start'] == 0 and info['data']['count'] == 6 and info['shape'] == [6, 4, 8]
    # the held-out slice's predictions: X beta de-standardized, stored as float16
    holdout = out / 'samples' / 'ridge-holdout'
    meta = data.read_json(os.path.join(train, 'meta.json'))
    expected = Xh1 @ direct_ridge(X, Y, 1e-2) * meta['clip_std'] + meta['clip_mean']
    np.testing.assert_allclose(np.load(holdout / 'generated.npy').astype(np.float64).reshape(-1, 8),
                               expected, rtol=2e-3, atol=2e-3)
    assert data.read_json(str(holdout / 'generated.json'))['data'] == {
        'folder': train, 'id': info['train_data']['id'], 'start': 7, 'count': 3}
    assert not os.path.exists(holdout / 'generated.partial.npy')
    # other settings into the same folder are refused, naming what changed; evenly spaced rows when
    # asked: 3 of 7
    with pytest.raises(SystemExit, match=r"ridge/generated.npy holds another result "
                                         r".*'settings.ridge_rows': \(0, 3\)"):
        run(monkeypatch, RIDGE, f'--train_data={train}', f'--val_data={val}', f'--out_dir={out}',
            '--val_fraction=0.3', '--ridge_rows=3')
    shutil.rmtree(out / 'samples' / 'ridge')
    run(monkeypatch, RIDGE, f'--train_data={train}', f'--val_data={val}', f'--out_dir={out}',
        '--val_fraction=0.3', '--ridge_rows=3')
    info = data.read_json(str(out / 'samples' / 'ridge' / 'generated.json'))
    assert info['settings']['fit_tokens'] == 12


def test_mismatched_splits_refused(tmp_path, monkeypatch):
    train = make_data_folder(str(tmp_path / 'train'), n=10, tokens=4, clip_dim=8, eva_dim=20)
    val = make_data_folder(str(tmp_path / 'val'), n=6, tokens=4, clip_dim=8, eva_dim=16)
    with pytest.raises(SystemExit, match=r"val/eva.npy holds EVA tokens \[4, 16\], "
                                         r".*train/eva.npy \[4, 20\]"):
        run(monkeypatch, RIDGE, f'--train_data={train}', f'--val_data={val}',
            f'--out_dir={tmp_path}')
    val = make_data_folder(str(tmp_path / 'val2'), n=6, tokens=4, clip_dim=8, eva_dim=20)
    with pytest.raises(SystemExit, match=r"val_fraction=0.0 of the 10 rows .* holds out 0; the "
                                         r"held-out slice needs at least one row"):
        run(monkeypatch, RIDGE, f'--train_data={train}', f'--val_data={val}',
            f'--out_dir={tmp_path}', '--val_fraction=0.0')


def test_eval_takes_the_ridge_output(tmp_path, monkeypatch, capsys):
    # shaped like config/encoders/tiny-clip.json: 16 tokens of width 64, joint space 32
    shape = {'tokens': 16, 'clip_dim': 64, 'eva_dim': 24, 'embed_dim': 32}
    train = make_data_folder(str(tmp_path / 'train'), n=40, seed=0, **shape)
    val = make_data_folder(str(tmp_path / 'val'), n=12, seed=3, **shape)
    out = tmp_path / 'out'
    run(monkeypatch, RIDGE, f'--train_data={train}', f'--val_data={val}', f'--out_dir={out}',
        '--val_fraction=0.25')
    ridge = str(out / 'samples' / 'ridge' / 'generated.npy')
    # the ridge array as B and as a baseline: eval.py accepts it, checks its rows, gets the same
    # numbers both ways
    run(monkeypatch, EVAL, f'--val_data={val}', f'--train_data={train}', f'--out_dir={out}',
        '--clip_model=tiny-clip',
        '--clip_pretrained=', f'--generated={ridge}', f'--baselines={(ridge,)!r}',
        '--bootstrap_samples=200')
    with open(out / 'samples' / 'ridge' / 'eval' / 'recall_summary.json') as f:
        recall = json.load(f)
    with open(out / 'samples' / 'ridge' / 'eval' / 'alignment_summary.json') as f:
        align = json.load(f)
    assert recall['baselines_skipped'] == [] and 'skipped' not in capsys.readouterr().out
    assert {k: v for k,
            v in recall['baselines']['ridge'].items() if k != 'generated'} == recall['method_b']
    assert align['baselines']['ridge']['token_fidelity'] == align['token_fidelity']
    assert align['token_fidelity_stats'].endswith(
        f"data_stats ({os.path.join(train, 'meta.json')})")
    assert align['b_minus_ridge']['difference_mean'] == 0
