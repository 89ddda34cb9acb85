"""A closed-form ridge baseline: one linear map from a raw EVA token to the standardized CLIP token
at the same grid position, shared by every position, fitted on train_data; its predictions for
val_data are a generated.npy that eval.py sets beside the DiT's (a generator as good as a linear
map is no evidence for the DiT).

python ridge.py config/dit_large.py       writes out_dir/samples/ridge/generated.npy and .json
python eval.py config/dit_large.py --baselines="('out/dit_large/samples/ridge/generated.npy',)"

The fit streams sufficient statistics X^T X [C+1, C+1] and X^T Y [C+1, D] (float64; X = [EVA
token, 1], Y = the CLIP token standardized with train_data's clip_mean/clip_std) over batches of
rows, so memory is O(C^2 + C D) whatever the number of rows (COCO train2017: 118K x 256 tokens
of 4096). The penalty is chosen from ridge_lambdas on the held-out slice of train_data (its last
val_fraction of rows, as train.py splits it; never on val_data, the split eval.py reports), by
the held-out MSE in standardized units from that slice's own streamed statistics. One
eigendecomposition of the centered X^T X serves every lambda; the intercept is not penalized.
"""
import math
import os
import time

import numpy as np
import torch
from tqdm import tqdm

import data

# -----------------------------------------------------------------------------
out_dir = 'out'        # writes out_dir/samples/ridge/ (and ridge-holdout/ with ridge_write_holdout)
data_dir = 'data'      # extract.py's output: data_dir/<split>
splits = ('train2017', 'val2017')
train_data = ''        # fitted on, lambda chosen on its held-out slice; '' = data_dir/splits[0]
val_data = ''          # the reported split, predicted for eval.py; '' = data_dir/splits[1]
val_fraction = data.VAL_FRACTION  # the held-out slice (last round(N * val_fraction) rows of
                                  # train_data, as train.py's): must be > 0, it chooses lambda
ridge_rows = 0         # training rows fitted: 0 = all before the held-out slice, else that many
ridge_lambdas = (1e-6, 1e-4, 1e-2, 1.0, 100.0)  # relative to the centered X^T X's mean diagonal
ridge_batch_size = 32  # rows per streamed batch (32 x 256 EVA tokens of 4096 in float64: 268 MB)
ridge_write_holdout = False  # also write the held-out slice's predictions to samples/ridge-holdout/
device = 'auto'        # 'auto' = cuda when available, else cpu
# -----------------------------------------------------------------------------


def fit_rows(n_fit, max_rows):
    """The training rows fitted: all n_fit of them (max_rows 0), or max_rows evenly spaced ones."""
    if 0 < max_rows < n_fit:
        return np.linspace(0, n_fit, max_rows, endpoint=False).astype(int)
    return np.arange(n_fit)


def check_shapes(train, val, train_data, val_data):
    """SystemExit naming the file and the values unless EVA and CLIP tokens pair up by position
    and the splits agree."""
    (M, C), (T, D) = train['shapes']['eva'][1:], train['shapes']['clip'][1:]
    if M != T:
        raise SystemExit(f"ridge.py: {train['paths']['eva']} has {M} tokens per row, "
                         f"{train['paths']['clip']} {T}: the map pairs the EVA and CLIP tokens at "
                         f"each grid position, so they must agree")
    if val['shapes']['eva'][1:] != (M, C):
        raise SystemExit(f"ridge.py: {val['paths']['eva']} holds EVA tokens "
                         f"{list(val['shapes']['eva'][1:])}, {train['paths']['eva']} {[M, C]}: "
                         f"train_data and val_data must come from the same encoders")
    if (val['clip']['tokens'], val['clip']['dim']) != (T, D):
        raise SystemExit(f"ridge.py: {os.path.join(val_data, 'meta.json')} describes CLIP tokens "
                         f"{[val['clip']['tokens'], val['clip']['dim']]}, {train['paths']['clip']} "
                         f"holds {[T, D]}: train_data ({train_data}) and val_data must come from "
                         f"the same encoders")


@torch.no_grad()
def token_stats(eva_path, clip_path, rows, clip_mean, clip_std, batch_size, device):
    """Streamed sufficient statistics of every token of `rows` (ascending): {'xtx' [C+1, C+1],
    'xty' [C+1, D], 'yy': sum of Y^2, 'tokens'}, float64, X = [raw EVA token, 1], Y = the CLIP
    token there, standardized."""
    mean, std = (torch.as_tensor(v, dtype=torch.float64, device=device)
                 for v in (clip_mean, clip_std))
    xtx = xty = yy = 0
    for s in tqdm(range(0, len(rows), batch_size), desc='ridge statistics', unit='batch'):
        batch = rows[s:s + batch_size]
        x, y = (torch.from_numpy(data.read_rows(path, batch)).to(device).double().flatten(0, 1)
                for path in (eva_path, clip_path))
        y = (y - mean) / std
        x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        xtx, xty, yy = xtx + x.T @ x, xty + x.T @ y, yy + (y * y).sum()
    return {'xtx': xtx, 'xty': xty, 'yy': yy, 'tokens': int(xtx[-1, -1])}


def ridge_solutions(stats, lambdas):
    """beta [C+1, D] (the map W, then the intercept) minimizing ||Y - X W - b||^2 + lam * s *
    ||W||^2 for every lam, s = the mean diagonal of the centered X^T X; centering leaves the
    intercept unpenalized. One eigendecomposition."""
    xtx, xty, n = stats['xtx'], stats['xty'], stats['xtx'][-1, -1]
    sx, sy = xtx[:-1, -1], xty[-1]
    sxx = xtx[:-1, :-1] - torch.outer(sx, sx) / n
    sxy = xty[:-1] - torch.outer(sx, sy) / n
    scale = sxx.diagonal().mean()
    e, V = torch.linalg.eigh(sxx)
    e, P = e.clamp(min=0), V.T @ sxy  # eigenvalues below zero are rounding of a singular X^T X
    for lam in lambdas:
        W = V @ (P / (e + lam * scale)[:, None])
        yield torch.cat([W, ((sy - sx @ W) / n)[None]]), float(lam * scale)


def heldout_mse(beta, stats):
    """Mean squared error per standardized value of X beta on the tokens `stats` sum over: from
    X^T X, X^T Y, Y^T Y."""
    sse = stats['yy'] - 2 * (stats['xty'] * beta).sum() + ((stats['xtx'] @ beta) * beta).sum()
    return float(sse) / (stats['tokens'] * beta.shape[1])


def choose_lambda(fit, holdout, lambdas):
    """(lambda, beta, [{lambda, absolute, heldout_mse}]): the grid value whose fit has the least
    held-out error."""
    grid, best = [], None
    for lam, (beta, absolute) in zip(lambdas, ridge_solutions(fit, lambdas)):
        mse = heldout_mse(beta, holdout)
        grid.append({'lambda': lam, 'absolute': absolute, 'heldout_mse': mse})
        if best is None or grid[-1]['heldout_mse'] < best[2]:
            best = (lam, beta, grid[-1]['heldout_mse'])
    return best[0], best[1], grid


@torch.no_grad()
def predict(eva_path, beta, clip_mean, clip_std, start, stop, device):
    """CLIP tokens [stop - start, T, D] float16 for rows [start, stop) of eva.npy: X beta,
    de-standardized."""
    mean, std = (torch.as_tensor(v, dtype=torch.float64, device=device)
                 for v in (clip_mean, clip_std))
    x = torch.from_numpy(np.array(np.load(eva_path, mmap_mode='r')[start:stop])).to(device).double()
    y = ((x @ beta[:-1] + beta[-1]) * std + mean).cpu().numpy()
    if np.abs(y).max() > np.finfo(np.float16).max:
        row = int(np.abs(y).reshape(len(y), -1).max(1).argmax())
        raise SystemExit(f"ridge.py: the prediction for row {start + row} of {eva_path} reaches "
                         f"{np.abs(y[row]).max():.4g}, beyond float16's "
                         f"{np.finfo(np.float16).max:.0f}: pick larger ridge_lambdas")
    return y.astype(np.float16)


def write_generated(folder, shape, rows_fn, depends_on, info, batch_size):
    """folder/generated.npy (float16 `shape`, rows [s, e) from rows_fn(s, e)) and its
    generated.json, through the samples folder's protocol (data.py): reused while depends_on is
    equal, continued after a kill."""
    t0 = time.time()
    done = os.path.exists(os.path.join(folder, 'generated.npy'))  # start_samples reuses or refuses
    data.check_writable(folder, 0 if done else math.prod(shape) * 2, 'out_dir',
                        'the predictions need')
    with data.lock(folder, 'ridge.py'):
        if data.start_samples(folder, depends_on, shape) is None:
            print(f"ridge: {folder}/generated.npy already holds these predictions")
            return os.path.join(folder, 'generated.npy')
        todo = data.samples_todo(folder, np.arange(shape[0]))
        desc = f'predict {os.path.basename(folder)}'
        for s in tqdm(range(0, len(todo), batch_size), desc=desc, unit='batch'):
            rows = todo[s:s + batch_size]
            data.write_samples(folder, rows, rows_fn(rows[0], rows[-1] + 1))
        data.finish_samples(folder, {**info, 'seconds': time.time() - t0})
    return os.path.join(folder, 'generated.npy')


if __name__ == '__main__':
    from configurator import configure
    from runtime import resolve_device
    config = configure(globals())
    train_data, val_data = data.split_folders(data_dir, splits, train_data, val_data)
    if not ridge_lambdas or not all(isinstance(v, (int, float)) and v > 0 for v in ridge_lambdas) \
            or ridge_batch_size < 1 or ridge_rows < 0:
        raise SystemExit(f"ridge.py: ridge_lambdas should be positive numbers (got "
                         f"{ridge_lambdas!r}), ridge_batch_size positive (got {ridge_batch_size}), "
                         f"ridge_rows >= 0 (got {ridge_rows})")
    device = resolve_device(device)
    t_start = time.time()
    train = data.open_folder(train_data, arrays=('clip', 'eva'), setting='train_data')
    val = data.open_folder(val_data, arrays=('eva',), setting='val_data')
    check_shapes(train, val, train_data, val_data)
    for path in [*train['paths'].values(), val['paths']['eva']]:
        data.check_finite(path)
    n_fit, n_hold = data.holdout_range(train['count'], val_fraction, train_data)
    hold_start = n_fit
    rows = fit_rows(n_fit, ridge_rows)
    eva_path, clip_path = train['paths']['eva'], train['paths']['clip']
    mean, std = train['clip_mean'], train['clip_std']
    (M, C), (T, D) = train['shapes']['eva'][1:], train['shapes']['clip'][1:]
    print(f"ridge: fitting EVA [{C}] -> standardized CLIP [{D}] on {len(rows)} of {n_fit} "
          f"training rows of {train_data} ({len(rows) * T} tokens), lambda chosen on rows "
          f"{hold_start}..{hold_start + n_hold - 1}, device {device}")
    fit = token_stats(eva_path, clip_path, rows, mean, std, ridge_batch_size, device)
    holdout = token_stats(eva_path, clip_path, np.arange(hold_start, hold_start + n_hold), mean,
                          std, ridge_batch_size, device)
    lam, beta, grid = choose_lambda(fit, holdout, ridge_lambdas)
    constant = float(holdout['yy']) / (holdout['tokens'] * D)  # predicting the training mean
    seconds_fit = time.time() - t_start
    for g in grid:
        print(f"ridge: lambda {g['lambda']:g} (absolute {g['absolute']:.4g}): held-out MSE "
              f"{g['heldout_mse']:.5f}" + (' <- chosen' if g['lambda'] == lam else ''))
    print(f"ridge: held-out MSE of the training mean: {constant:.5f}; fitted in "
          f"{seconds_fit:.2f} s")

    settings = {'train_data': os.path.abspath(train_data), 'val_data': os.path.abspath(val_data),
                'val_fraction': val_fraction, 'ridge_rows': ridge_rows,
                'ridge_lambdas': list(ridge_lambdas), 'ridge_batch_size': ridge_batch_size,
                'lambda': lam, 'lambda_relative_to': 'the mean diagonal of the centered X^T X',
                'grid': grid, 'heldout_mse': min(g['heldout_mse'] for g in grid),
                'heldout_mse_constant': constant, 'fit_rows': len(rows),
                'fit_tokens': fit['tokens'], 'holdout_tokens': holdout['tokens'], 'device': device}
    train_info = {'folder': os.path.abspath(train_data), 'id': train['id'], 'fit_rows': len(rows),
                  'fit_tokens': fit['tokens'], 'holdout_start': hold_start, 'holdout_count': n_hold}
    stats = {'clip_mean': mean, 'clip_std': std,
             'source': os.path.join(os.path.abspath(train_data), 'meta.json')}
    targets = [('ridge', val, val_data, 0, val['count'], data.target(val, val_data))]
    if ridge_write_holdout:
        targets.append(('ridge-holdout', train, train_data, hold_start, n_hold,
                        data.target(train, train_data, hold_start, n_hold)))
    fitted_by = {k: v for k, v in settings.items()
                 if k not in ('val_data', 'ridge_batch_size', 'device')}
    for name, split, folder, start, count, rows_of in targets:
        def rows_fn(s, e, path=split['paths']['eva'], start=start):
            return predict(path, beta, mean, std, start + s, start + e, device)
        info = {'method': 'ridge', 'label': name, 'settings': settings, 'data': rows_of,
                'train_data': train_info, 'data_stats': stats, 'shape': [count, T, D],
                'dtype': 'float16', 'fit_seconds': seconds_fit}
        depends_on = {'settings': fitted_by, 'train': train_info, 'data': rows_of,
                      'shape': [count, T, D], 'dtype': 'float16'}
        path = write_generated(os.path.join(out_dir, 'samples', name), [count, T, D], rows_fn,
                               depends_on, info, ridge_batch_size)
        print(f"ridge: wrote {path} [{count}, {T}, {D}] float16 for rows "
              f"{start}..{start + count - 1} of {folder}")
    print(f"ridge: done in {time.time() - t_start:.1f} s")
