"""Fidelity for eval.py: the units tokens are compared in, the mean tokens, and Task 3's draws and
summary.

Token fidelity (under Tasks 1-2's table) and Task 3 standardize tokens with the DiT's own channel
statistics (fidelity_stats): generated.json's data_stats, else train_data's meta.json. Task 3,
distribution fidelity, reads each column's draws: image vectors [N, S, E] (eval.py's pooled and
projected embedding) and standardized tokens at fidelity_tokens positions an image [N, S, P, D].
S > 1 where a column has several draws an image: B with its seed arrays (seed_generated, checked to
be B's run with another seed), the true conditional samples (clip_samples.npy beside clip.npy),
and then the unconditional control (train_data's rows at random, never held-out ones). The
metrics are metrics.py's (fidelity_report). Errors name the file, the expected and the actual value.

fidelity_summary.json: eval.py's summary header; protocol (k, halvings, images, tokens, seed,
seed_generated, rbf_sigma per representation, rbf_sigma_rule, intervals); headline
(conditional_mmd2 where true samples exist, else frechet_distance, coverage and recall, pooled);
pooled and tokens: {column: {metric: {value, ci95}}} for floor (A's split half), method_b,
mean_tokens, unconditional, true_samples, each baseline's key and b_minus_<label> (paired), metrics
frechet_distance, mmd2, recall, coverage, variance_ratio, precision, density (the last two reward
collapse: never headlined); conditional_mmd2 {column: {value, ci95}} or None; seed_spread (draws,
mean_spread, mean_distance_to_real, spread_over_distance) or None; seconds.
"""
import glob
import math
import os

import numpy as np
import torch
from tqdm import tqdm

import data
from metrics import (BETTER, FIDELITY_INTERVALS, HEADLINE_SET, fidelity_report, fidelity_rows,
                     fidelity_summary)

KEYS = {'f': 'floor', 'b': 'method_b', 'm': 'mean_tokens', 'u': 'unconditional',
        't': 'true_samples'}  # fidelity_summary.json's name of each column (baselines by label)
COLUMNS = {'f': 'floor (A half)', 'u': 'unconditional', 't': 'true samples'}  # table headings


def fidelity_stats(sampling, info_path, train_data, meta, val_data):
    """(clip_mean, clip_std, source) that standardize token fidelity in the DiT's own units:
    generated.json's data_stats (the checkpoint's), else train_data's meta.json (the training
    folder's), else val_data's, noted."""
    train_meta = os.path.join(train_data, 'meta.json')
    if (sampling or {}).get('data_stats'):
        stats, path = sampling['data_stats'], info_path
        source = f"{info_path} data_stats ({stats.get('source', 'no source given')})"
    elif os.path.exists(train_meta):
        stats, path = data.read_json(train_meta), train_meta
        source = f"{train_meta} (the training folder)"
    else:
        source = (f"{os.path.join(val_data, 'meta.json')} (the evaluated folder: no data_stats and "
                  f"no {train_meta})")
        print(f"eval: note: token fidelity is standardized with {source}, not in the DiT's own "
              f"units")
        return meta['clip_mean'], meta['clip_std'], source
    D = data.token_shape(meta)[1]
    mean, std = stats.get('clip_mean'), stats.get('clip_std')
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == D
            and all(isinstance(s, (int, float)) and s > 0 and math.isfinite(s) for s in std)):
        describe = lambda v: f"{len(v)} values" if isinstance(v, list) else f"{v!r:.80}"
        raise SystemExit(f"eval.py: {path}: clip_mean and clip_std should be {D} numbers each (the "
                         f"token width; std positive and finite), got {describe(mean)} and "
                         f"{describe(std)}")
    return mean, std, source


@torch.no_grad()
def mean_tokens(train_data, val_fraction, meta, eval_data, max_rows, batch_size, device):
    """The mean tokens [tokens, dim] and where they come from: the per-position, per-channel mean
    of at most max_rows evenly spaced rows (0 = all) of train_data's clip.npy that train.py trains
    on (never held-out ones), a chunk at a time; without it, the evaluated data's channel means."""
    train_clip = os.path.join(train_data, 'clip.npy')
    if not os.path.exists(train_clip):
        source = f"{eval_data}/meta.json clip_mean at every position (no {train_clip})"
        print(f"eval: the mean-tokens row uses {source}")
        channel_mean = torch.tensor(meta['clip_mean'], dtype=torch.float32)
        return channel_mean.expand(data.token_shape(meta)), source
    n, *shape = data.open_array(train_clip, np.float16).shape
    if tuple(shape) != data.token_shape(meta):
        raise SystemExit(f"eval.py: {train_clip} holds tokens of shape {shape}, the evaluated "
                         f"data {list(data.token_shape(meta))} (tokens, dim): train_data should "
                         f"be the same encoder's training folder")
    n = data.holdout_range(n, val_fraction, train_data)[0] if val_fraction > 0 else n
    rows = (np.linspace(0, n, max_rows, endpoint=False).astype(int) if 0 < max_rows < n
            else np.arange(n))
    total = 0
    for s in tqdm(range(0, len(rows), batch_size), desc='mean tokens', unit='batch'):
        chunk = np.load(train_clip, mmap_mode='r')[rows[s:s + batch_size]]
        total = total + torch.from_numpy(chunk).to(device).float().sum(0).double()
    return (total / len(rows)).float(), f"{train_clip}: per-position mean of {len(rows)} rows"


def check_k(k, images, N):
    """fidelity_k must leave k neighbours inside each half of the images a round draws."""
    half = min(N, images or N) // 2
    if not 0 < k < half:
        raise SystemExit(f"eval.py: fidelity_k={k} should be at least 1 and below the "
                         f"images of each half: {N} images give halves of {half} (Task 3 needs "
                         f"more images; --tasks=alignment,recall leaves it out)")


def seed_draws(gen_path, sampling, paths):
    """The arrays of B's sampling run that differ from it only in the seed ([] without any);
    SystemExit naming both files where generated.json's depends_on differs elsewhere."""
    paths = sorted({p for pattern in paths for p in glob.glob(pattern) or [pattern]})
    paths = [p for p in paths if os.path.abspath(p) != os.path.abspath(gen_path or '')]
    if paths and not (sampling or {}).get('depends_on'):
        raise SystemExit(f"eval.py: seed_generated needs generated.json's depends_on beside B "
                         f"({gen_path}) to check that the seed arrays come from the same run")
    for path in paths:
        info = os.path.splitext(path)[0] + '.json'
        theirs = data.read_json(info).get('depends_on', {}) if os.path.exists(info) else {}
        changed = {k: v for k, v in data.differences(sampling['depends_on'], theirs).items()
                   if k.split('.')[-1] != 'seed'}
        if changed or not theirs:
            raise SystemExit(f"eval.py: seed_generated {path} is not B's sampling run with another "
                             f"seed: {info} and {os.path.splitext(gen_path)[0]}.json differ in "
                             f"{changed or 'everything (no depends_on)'} (then, now)")
    return paths


@torch.no_grad()
def pooled_rows(path, rows, embed, batch_size, device):
    """Image vectors [n, S, E] of an array's rows (S = 1 for [N, L, D]; S draws for
    clip_samples.npy's [N, S, L, D]) by embed (tokens [n, L, D] -> [n, E]), a chunk at a time."""
    out = []
    for s in range(0, len(rows), batch_size):
        x = np.load(path, mmap_mode='r')[rows[s:s + batch_size]].astype(np.float32)
        x = torch.from_numpy(x).to(device)
        e = embed(x.flatten(0, -3))
        out.append(e.view(len(x), -1, e.shape[-1]))
    return torch.cat(out).cpu()


def token_rows(path, rows, positions, mean, std):
    """Standardized tokens [n, S, P, D] at each row's positions [n, P], read alone from the
    memmap."""
    array = np.load(path, mmap_mode='r')
    array = array[:, None] if array.ndim == 3 else array
    S = np.arange(array.shape[1])[None, :, None]
    return (torch.from_numpy(array[rows[:, None, None], S, positions[:, None]].astype(np.float32))
            - mean) / std


def true_draws(meta, shape, target, rows, read):
    """The true conditional samples' draws (clip_samples.npy beside clip.npy), or None without
    one; a clear error for one of another shape."""
    true = os.path.join(target['folder'], 'clip_samples.npy')
    if not os.path.exists(true):
        return None
    found = data.open_array(true, np.float16, remedy='regenerate it').shape
    if found[0] != meta['count'] or found[2:] != shape or found[1] < 2:
        raise SystemExit(f"eval.py: {true} has shape {list(found)}, expected [{meta['count']}, "
                         f"S >= 2, {', '.join(map(str, shape))}] (count, draws, tokens, dim)")
    return read(true, rows)


def unconditional_draws(train_data, val_fraction, N, S, positions, rng, embed, token_read,
                        batch_size, device):
    """The unconditional control: S of train_data's rows at random an image (never held-out
    ones), or None without train_data's clip.npy."""
    train_clip = os.path.join(train_data, 'clip.npy')
    if not os.path.exists(train_clip):
        return None
    n = len(np.load(train_clip, mmap_mode='r'))
    n = data.holdout_range(n, val_fraction, train_data)[0] if val_fraction > 0 else n
    pick = rng.choice(n, N * S, replace=n < N * S)
    order = np.argsort(pick)  # read in file order
    in_order = pooled_rows(train_clip, pick[order], embed, batch_size, device)
    vec = torch.empty_like(in_order)
    vec[order] = in_order
    toks = token_read(train_clip, pick, np.repeat(positions, S, 0))
    return vec.view(N, S, -1), toks.view(N, S, *toks.shape[2:])


def inputs(image_emb, gen_paths, meta, shape, target, mean_tok, train_data, val_fraction,
           settings, embed, stats, batch_size, device):
    """Task 3's draws {column: (image vectors [N, S, E], tokens [N, S, P, D])} of B (with its
    seed arrays), the baselines, the mean tokens, the unconditional control and the true
    conditional samples (where they exist); and the real ones, A's."""
    N = target['count']
    rng = np.random.default_rng(settings['seed'])
    positions = rng.integers(shape[0], size=(N, settings['tokens']))
    mean, std = (torch.tensor(x, dtype=torch.float32) for x in stats)
    token_read = lambda path, rows, at=positions: token_rows(path, rows, at, mean, std)
    read = lambda path, rows: (pooled_rows(path, rows, embed, batch_size, device),
                               token_read(path, rows))
    rows = np.arange(target['start'], target['start'] + N)  # the data folder's rows
    own = rows - target['start']  # a generated array's rows: row 0 is the target's first
    real = (torch.from_numpy(image_emb['a'])[:, None], token_read(meta['paths']['clip'], rows))
    draws = {key: (torch.from_numpy(image_emb[key])[:, None], token_read(path, own))
             for key, path in gen_paths.items()}
    if 'b' in draws:
        for path in settings['seed_paths']:
            draws['b'] = tuple(torch.cat(d, 1) for d in zip(draws['b'], read(path, own)))
    m_tokens = (mean_tok.cpu()[torch.from_numpy(positions)] - mean) / std
    draws['m'] = (torch.from_numpy(image_emb['m'])[:, None], m_tokens[:, None])
    true = true_draws(meta, shape, target, rows, read)
    if true is not None:
        draws['t'] = true
    S = 2 if 't' in draws else 1  # two draws an image where conditional MMD needs them
    control = unconditional_draws(train_data, val_fraction, N, S, positions, rng, embed,
                                  token_read, batch_size, device)
    if control is not None:
        draws['u'] = control
    return real, draws


def first_draws(draws):
    """Tasks 1-2's columns from Task 3's draws, where they exist: the true samples' first draw
    and the unconditional control's (image vectors [N, E])."""
    return {key: draws[key][0][:, 0].numpy() for key in ('t', 'u') if key in draws}


def task(real, draws, differences, settings, common, bootstrap):
    """Task 3 on the draws: metrics.fidelity_report's report, fidelity_summary.json (KEYS' names,
    baselines by key), the printed table's rows and its columns (B - baseline paired)."""
    pairs = {c: xy for c, xy in differences.items() if c != 'd'}
    report = fidelity_report(real, draws, pairs, settings, *bootstrap)
    name = lambda c: KEYS.get(c, c)
    named = lambda block: block and {name(c): v for c, v in block.items()}
    cond = report['conditional_mmd2']
    headline = ({'metric': 'conditional_mmd2', 'columns': named(cond)} if cond else
                {'metrics': list(HEADLINE_SET), 'embedding': 'pooled',
                 'columns': {name(c): {m: b[m] for m in HEADLINE_SET}
                             for c, b in report['pooled'].items()}})
    headline['better'] = {m: BETTER[m] for m in headline.get('metrics', [headline.get('metric')])}
    protocol = {**{k: v for k, v in settings.items() if k != 'seed_paths'},
                'seed_generated': settings['seed_paths'], 'rbf_sigma': report['sigma'],
                'rbf_sigma_rule': 'median distance between real rows (median heuristic)',
                'intervals': FIDELITY_INTERVALS}
    summary = {'task': 'fidelity', **common, 'protocol': protocol, 'headline': headline,
               'pooled': named(report['pooled']), 'tokens': named(report['tokens']),
               'conditional_mmd2': named(cond), 'seed_spread': report['seed_spread']}
    columns = [c for c in report['pooled'] if c not in pairs] + list(pairs)
    return report, summary, fidelity_rows(report, columns), columns


def print_tokens(per_image, headings, stats_source):
    """Token fidelity's lines under eval.py's table: each generator's and the mean tokens'."""
    tokens_line = lambda f: (f"per-token cosine {f['token_cosine_mean']:.4f} (standardized "
                             f"{f['token_cosine_standardized_mean']:.4f}), standardized MSE "
                             f"{f['mse_standardized']:.4f}")
    for key in per_image:
        if key != 'm':
            short = 'B' if key == 'b' else headings[key]
            print(f"token fidelity, {short}: {tokens_line(fidelity_summary(per_image[key]))}, "
                  f"A.{short} image cosine {per_image[key]['image_vector_cosine'].mean():.4f}")
    print(f"token fidelity, mean tokens: {tokens_line(fidelity_summary(per_image['m']))}")
    print(f"token fidelity: standardized with {stats_source}")
