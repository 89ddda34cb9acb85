"""Task 3, distribution fidelity: each metric against a known answer or the prdc package, bad input,
and eval.py end to end with true conditional samples and seed arrays."""
import json
import os

import numpy as np
import pytest
import torch

import sweep
from metrics import (conditional_mmd2, fidelity_columns, frechet_distance, halving_terms,
                     knn_radii, knn_terms, mmd2, mmd2_terms, own_kernel_means, prdc, sq_distances,
                     within_distances)
from conftest import run_eval, write_generated


def exact_gaussian(rng, mu, cov, n=500):
    """n points whose sample mean and covariance (n - 1) are exactly mu and cov."""
    z = rng.standard_normal((n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return mu + z @ np.linalg.cholesky(cov).T


def test_frechet_distance_of_two_gaussians_closed_form():
    # diagonal covariances: FD = |mu1 - mu2|^2 + sum (s1 - s2)^2
    rng = np.random.default_rng(0)
    mu1, mu2, s1, s2 = np.zeros(4), np.array([1., 0, -2, .5]), np.array([1., 2, .5, 1]), np.ones(4)
    x, y = exact_gaussian(rng, mu1, np.diag(s1 ** 2)), exact_gaussian(rng, mu2, np.diag(s2 ** 2))
    expected = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-6)
    # commuting full covariances: S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T
    q = np.linalg.qr(rng.standard_normal((4, 4)))[0]
    a, b = np.array([1., 4, 9, .25]), np.array([4., 1, 1, 1])
    x, y = (exact_gaussian(rng, mu, q @ np.diag(v) @ q.T, n=8) for mu, v in ((mu1, a), (mu2, b)))
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize('n, m', [(300, 40), (3, 50), (50, 50)])  # both routes: n < d and n >= d
def test_frechet_distance_matches_scipy_sqrtm(n, m):
    import scipy.linalg
    rng = np.random.default_rng(n)
    x, y = rng.standard_normal((n, 6)), rng.standard_normal((m, 6)) * 1.5 + 0.2
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    expected = (((x.mean(0) - y.mean(0)) ** 2).sum()
                + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-6, abs=1e-8)


def test_mmd_of_a_set_with_itself_and_shifted():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 5))
    assert mmd2(x, x[::-1].copy(), 1.0) == pytest.approx(0, abs=0.01)
    assert abs(mmd2(x[:200], x[200:], 2.0)) < 0.01  # unbiased: near 0, either sign
    shifted = mmd2(x[:200], x[200:] + 1.0, 2.0)
    assert shifted > 0.1
    # the estimator, term by term
    a, b, s = x[:5], x[5:12] + .3, 1.5
    k = lambda u, v: np.exp(-((u[:, None] - v[None]) ** 2).sum(-1) / (2 * s * s))
    kaa, kbb = k(a, a), k(b, b)
    expected = ((kaa.sum() - 5) / 20 + (kbb.sum() - 7) / 42 - 2 * k(a, b).mean())
    assert mmd2(a, b, s) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize('k', [1, 3, 5])
def test_knn_metrics_match_prdc(k):
    from prdc import compute_prdc
    rng = np.random.default_rng(k)
    real, fake = rng.standard_normal((120, 6)), rng.standard_normal((90, 6)) * 0.7 + 0.3
    ours, theirs = prdc(real, fake, k), compute_prdc(real, fake, k)
    assert ours == pytest.approx({key: float(v) for key, v in theirs.items()}, abs=1e-12)


def test_k_at_least_the_images_is_a_clear_error():
    d = within_distances(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"k=5 needs more than k points in each set, got 5"):
        knn_radii(d, 5)
    with pytest.raises(ValueError, match=r"k=9 .* got 6"):
        prdc(np.zeros((6, 2)), np.ones((7, 2)), 9)


def test_coverage_of_collapsed_conditional_means_is_low():
    # each image: a conditional mean and true draws around it; a set collapsed to the means
    # covers little of a true draw, a fresh true draw covers it well
    rng = np.random.default_rng(2)
    means = rng.standard_normal((600, 4)) * 0.5
    truth, fresh = (means + rng.standard_normal((600, 4)) for _ in range(2))
    collapsed = prdc(truth, means, 5)
    drawn = prdc(truth, fresh, 5)
    assert drawn['coverage'] > 0.9 and collapsed['coverage'] < 0.75
    assert drawn['recall'] > collapsed['recall'] + 0.3
    assert collapsed['precision'] >= drawn['precision']  # precision rewards collapse


def test_halvings_floor_and_paired_differences():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 1, 5, generator=g)
    cols = {'b': real + 0.2 * torch.randn(200, 1, 5, generator=g), 'c': real.clone()}
    out = fidelity_columns(real, cols, {'b_minus_c': ('b', 'c')}, 5, 2.0, 8, 0, 0, 200, 0)
    # a column equal to the real set is the floor exactly: the same halvings
    assert out['c'] == out['f']
    assert out['f']['variance_ratio']['value'] == 1.0
    assert out['f']['variance_ratio']['ci95'] == pytest.approx([1, 1], abs=1e-12)
    for m, v in out['b_minus_c'].items():
        assert v['value'] == pytest.approx(out['b'][m]['value'] - out['c'][m]['value'], abs=1e-12)
        assert v['ci95'][0] - 1e-12 <= v['value'] <= v['ci95'][1] + 1e-12


def test_shared_real_half_statistics_give_the_direct_numbers():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=g), torch.randn(50, 6, generator=g) + 0.3
    d_xx, d_yy, d_xy = within_distances(x), within_distances(y), sq_distances(x, y)
    direct = knn_terms(d_yy, d_xx, d_xy.T, 4)
    shared = knn_terms(d_yy, d_xx, d_xy.T, 4, knn_radii(d_yy, 4))
    assert all(torch.equal(direct[m], shared[m]) for m in direct)
    for u, v in zip(mmd2_terms(d_xx, d_yy, d_xy, 1.5),
                    mmd2_terms(d_xx, d_yy, d_xy, 1.5, own_kernel_means(d_yy, 1.5))):
        assert torch.equal(u, v)
    # one halving round of every column against one real half: prdc's and mmd2's numbers
    real = torch.randn(60, 1, 6, generator=g)
    cols = {'b': real + 0.5 * torch.randn(60, 1, 6, generator=g), 'c': 2 * real}
    sums, counts, _ = halving_terms(real, cols, 4, 1.5, 1, 0, 7)
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(7))
    ref = real[perm[30:], 0]
    for c, col in cols.items():
        gen = col[perm[:30], 0]
        side = {m: s for s, ms in (('generated', ('precision', 'density')),
                                   ('real', ('recall', 'coverage')), ('both', ('mmd2',)))
                for m in ms}
        expected = {**prdc(ref, gen, 4), 'mmd2': mmd2(gen, ref, 1.5)}
        for m, v in expected.items():
            got = float(sums[c, m].sum() / counts[side[m]].sum())
            assert got == pytest.approx(v, rel=1e-12, abs=1e-12), (c, m)


def test_conditional_mmd_point_mass_and_true_draws():
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(300, 1, 4, generator=g)
    true = centre + 0.5 * torch.randn(300, 6, 4, generator=g)
    fresh = centre + 0.5 * torch.randn(300, 6, 4, generator=g)
    assert abs(float(conditional_mmd2(fresh, true, 1.0).mean())) < 0.01
    assert float(conditional_mmd2(centre, true, 1.0).mean()) > 0.05  # the mean is not a sample
    assert float(conditional_mmd2(centre[torch.randperm(300, generator=g)], true, 1.0).mean()) > \
        float(conditional_mmd2(centre, true, 1.0).mean())


TASK_3 = '--tasks=alignment,recall,fidelity'  # the default, spelled out


def write_true_samples(folder, S=4, seed=3):
    clip = np.load(os.path.join(folder, 'clip.npy')).astype(np.float32)
    rng = np.random.default_rng(seed)
    samples = clip[:, None] + rng.normal(0, 0.3, (clip.shape[0], S, *clip.shape[1:]))
    out = np.lib.format.open_memmap(os.path.join(folder, 'clip_samples.npy'), mode='w+',
                                    dtype=np.float16, shape=samples.shape)
    out[:] = samples
    out.flush()
    return samples


def write_run(folder, array, seed):
    os.makedirs(folder, exist_ok=True)
    write_generated(folder / 'generated.npy', array)
    depends_on = {'settings': {'ckpt': 'x.pt', 'seed': seed, 'cfg_scale': 2.0}, 'shape': [1]}
    with open(folder / 'generated.json', 'w') as f:
        json.dump({'depends_on': depends_on}, f)


def test_end_to_end_with_true_samples_and_seeds(eval_setup, monkeypatch, capsys):
    data, out, args = eval_setup
    clip = np.load(os.path.join(data, 'clip.npy')).astype(np.float32)
    write_true_samples(data)
    true = np.load(os.path.join(data, 'clip_samples.npy'), mmap_mode='r+')
    true[:, 0] = np.load(os.path.join(data, 'clip.npy'))  # the first draw: the real tokens
    true.flush()
    del true
    rng = np.random.default_rng(0)
    for seed in (1, 2, 3):
        write_run(out / f'seed{seed}', clip + rng.normal(0, 0.3, clip.shape), seed)
    write_run(out / 'ridge', clip * 0.9, 0)
    with open(out / 'ridge' / 'generated.json', 'w') as f:
        json.dump({'label': 'ridge'}, f)
    run_eval(monkeypatch, *args, f'--generated={out / "seed1" / "generated.npy"}', TASK_3,
             f"--seed_generated=({str(out / 'seed*' / 'generated.npy')!r},)",
             f"--baselines=({str(out / 'ridge' / 'generated.npy')!r},)", '--fidelity_k=3',
             '--fidelity_halvings=4', f'--train_data={data}')
    with open(out / 'seed1' / 'eval' / 'fidelity_summary.json') as f:
        s = json.load(f)
    assert s['headline']['metric'] == 'conditional_mmd2'
    assert s['headline']['better'] == {'conditional_mmd2': 'lower'}
    # sweep.py ranks cells by this figure, read from the summary eval.py wrote
    assert sweep.fidelity_headline(str(out / 'seed1'))['conditional_mmd2'] == \
        s['conditional_mmd2']['method_b']['value']
    cols = s['conditional_mmd2']
    assert set(cols) >= {'method_b', 'baseline_ridge', 'mean_tokens', 'true_samples',
                         'unconditional', 'b_minus_ridge'}
    for c in cols.values():
        assert c['ci95'][0] <= c['value'] <= c['ci95'][1]
    assert cols['unconditional']['value'] > cols['method_b']['value']
    assert set(s['pooled']) >= {'floor', 'method_b', 'baseline_ridge', 'unconditional'}
    assert set(s['pooled']['floor']) == {'frechet_distance', 'mmd2', 'recall', 'coverage',
                                         'variance_ratio', 'precision', 'density'}
    assert s['seed_spread']['draws'] == 3 and s['protocol']['k'] == 3
    # Tasks 1-2 score the true samples' first draw and the unconditional control too; the first
    # draw here is the real tokens themselves, so it scores exactly A's recall and alignment
    with open(out / 'seed1' / 'eval' / 'recall_summary.json') as f:
        recall = json.load(f)
    with open(out / 'seed1' / 'eval' / 'alignment_summary.json') as f:
        align = json.load(f)
    for d in ('image_to_text', 'text_to_image'):
        for k in (1, 5, 10):
            assert recall['true_samples'][d][f'recall@{k}'] == recall['method_a'][d][f'recall@{k}']
        assert recall['unconditional'][d]['recall@5'] is not None
    assert align['true_samples']['mean_cosine_similarity'] == \
        align['method_a']['mean_cosine_similarity']
    assert align['unconditional']['mean_cosine_similarity'] is not None
    assert len(s['protocol']['seed_generated']) == 2
    printed = capsys.readouterr().out
    assert 'conditional MMD2 x1e3' in printed and 'pooled coverage' in printed
    # a seed array from another run: refused, naming both files
    write_run(out / 'seed9', clip, 9)
    with open(out / 'seed9' / 'generated.json', 'w') as f:
        json.dump({'depends_on': {'settings': {'ckpt': 'y.pt', 'seed': 9, 'cfg_scale': 2.0},
                                  'shape': [1]}}, f)
    with pytest.raises(SystemExit, match=r"seed9/generated.npy is not B's sampling run .*"
                                         r"seed9/generated.json and .*seed1/generated.json differ"):
        run_eval(monkeypatch, *args, f'--generated={out / "seed1" / "generated.npy"}', TASK_3,
                 f"--seed_generated=({str(out / 'seed*' / 'generated.npy')!r},)")


def test_fidelity_k_too_large_for_the_halves(eval_setup, monkeypatch):
    data, out, args = eval_setup
    with pytest.raises(SystemExit, match=r"fidelity_k=12 .* 24 images .* halves of 12"):
        run_eval(monkeypatch, *args, TASK_3, '--fidelity_k=12')
