"""The figures eval.py and sweep.py draw, and what they share: matplotlib (optional) behind one
import guard with the Agg backend, legends below the axes, one way to save.

plot_eval writes eval.py's alignment_hist.png, alignment_scatter.png and recall.png, each titled
with plot_title (the evaluated rows, the checkpoint that made B, its sampler); sweep.py's plot
draws its own panels with pyplot(), legend_height() and save().
"""
import os

import numpy as np

import flow
from metrics import DIRECTIONS


def pyplot():
    """matplotlib.pyplot on the Agg backend (files, no display); None, with a note, where matplotlib
    is not installed (it is optional)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots: matplotlib not installed, skipped")
        return None
    return plt


def legend_height(fig, legend):
    """The legend's height as a share of the figure's: the axes go above it."""
    return legend.get_window_extent(fig.canvas.get_renderer()).height / fig.bbox.height


def legend_below(fig, ax, ncol):
    """A legend of ax's lines centred below the axes (outside the data); its height share."""
    legend = fig.legend(*ax.get_legend_handles_labels(), loc='lower center', ncol=ncol, fontsize=8,
                        frameon=False)
    return legend_height(fig, legend)


def save(fig, path, below=0):
    """Write the figure, the axes above the bottom `below` share (the legends), and close it."""
    import matplotlib.pyplot as plt
    fig.tight_layout(rect=(0, below, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_title(common):
    """What a plot shows, a line each: the evaluated rows, the checkpoint that made B, and its
    sampler."""
    rows = common['data']
    last = rows['start'] + rows['count'] - 1
    where = (f"{common['val_data']}: held-out rows {rows['start']}-{last}" if common['holdout']
             else f"{common['val_data']}: {rows['count']} images (not the held-out slice)")
    if not common['generated']:
        return f"{where}\nno generated array: the CLIP baseline only"
    ckpt, info = common['checkpoint'], common['sampling'] or {}
    if not (ckpt and ckpt['path']):  # no generated.json, or another generator's (ridge.py)
        return (f"{where}\nB: {common['generated']}\n"
                f"{info.get('label') or 'no checkpoint named in generated.json'}")
    path = ckpt['path']
    made = (f"B: {os.path.basename(os.path.dirname(path))}/"
            f"{os.path.splitext(os.path.basename(path))[0]}, iteration "
            f"{ckpt['iter_num']}{', EMA weights' if ckpt['use_ema'] else ''}")
    return f"{where}\n{made}\n{flow.Sampler.from_settings(common['sampler']).label()}"


def method_colors(labels):
    """A colour per method: A, B, R, the mean tokens and Task 3's columns fixed, the baselines
    after them."""
    others = ['tab:red', 'tab:purple', 'tab:brown', 'tab:pink', 'tab:olive']
    colors = {'a': 'tab:blue', 'b': 'tab:orange', 'r': 'tab:green', 'm': 'tab:gray',
              'f': 'tab:blue', 't': 'k', 'u': 'tab:cyan'}  # f, t, u: Task 3's floor and controls
    baselines = [m for m in labels if m not in colors]
    return {**colors, **{m: others[j % len(others)] for j, m in enumerate(baselines)}}


def alignment_hist(plt, path, sims, labels, colors, title):
    """Per-pair cosines of every method, their means dotted."""
    fig, ax = plt.subplots(figsize=(8, 5.2))
    bins = np.linspace(min(s.min() for s in sims.values()), max(s.max() for s in sims.values()), 61)
    for m, s in sims.items():
        ax.hist(s, bins=bins, histtype='step', lw=1.5, color=colors[m],
                label=f"{labels[m]} (mean {s.mean():.3f})")
        ax.axvline(s.mean(), color=colors[m], ls=':', lw=1)  # the summary compares the means
    ax.set(xlabel='cosine(image, caption) per pair (dotted: each mean)', ylabel='pairs')
    ax.set_title(f"Task 1: alignment\n{title}", fontsize=8, wrap=True)
    save(fig, path, legend_below(fig, ax, 2))


def alignment_scatter(plt, path, a, b, title):
    """B's per-pair cosines against A's."""
    fig, ax = plt.subplots(figsize=(5.5, 5.8))
    few = len(a) < 5000  # bigger, darker points where they do not cover each other
    ax.scatter(a, b, s=8 if few else 2, alpha=0.6 if few else 0.3, linewidths=0)
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    ax.plot([lo, hi], [lo, hi], 'k--', lw=0.8)
    ax.set(xlabel='A: real tokens', ylabel='B: generated tokens', aspect='equal')
    ax.set_title(f"per-pair cosine(image, caption), B vs A (dashed: B = A)\n{title}", fontsize=7,
                 wrap=True)
    save(fig, path)


def recall_bars(plt, path, recalls, intervals, k_values, labels, colors, title):
    """Recall@K per method, both directions, with 95% interval bars where there are intervals."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    width = 0.8 / len(recalls)
    for ax, direction in zip(axes, DIRECTIONS):
        for j, (m, r) in enumerate(recalls.items()):
            values = [100 * r[direction][k] for k in k_values]
            cis = [intervals.get((m, direction, k)) for k in k_values]
            # a percentile bound may sit a rounding error past the point itself
            err = np.maximum(np.array([[v - 100 * c[0], 100 * c[1] - v]
                                       for v, c in zip(values, cis)]).T, 0) if all(cis) else None
            ax.bar(np.arange(len(k_values)) + j * width, values, width, color=colors[m],
                   label=labels[m], yerr=err, error_kw=dict(lw=0.8, capsize=2, ecolor='k'))
        ax.set(xticks=np.arange(len(k_values)) + width * (len(recalls) - 1) / 2,
               xticklabels=[f"R@{k}" for k in k_values], title=direction.replace('_', ' '),
               ylim=(0, 100))
    has_ci = any(intervals.values())
    axes[0].set_ylabel('recall (%), 95% interval bars' if has_ci else 'recall (%)')
    fig.suptitle(f"Task 2: recall\n{title}", fontsize=8, wrap=True)
    save(fig, path, legend_below(fig, axes[0], 3))


def plot_eval(eval_dir, sims, recalls, intervals, k_values, labels, common):
    """eval.py's alignment_hist.png, alignment_scatter.png, recall.png (with the 95% intervals,
    (method, direction, k) -> [lo, hi] or None), a colour per method (labels: its legend), titled
    with plot_title(common); only where matplotlib is importable (optional)."""
    plt = pyplot()
    if plt is None:
        return
    colors, title = method_colors(labels), plot_title(common)
    if sims:
        alignment_hist(plt, os.path.join(eval_dir, 'alignment_hist.png'), sims, labels, colors,
                       title)
    if 'a' in sims and 'b' in sims:
        alignment_scatter(plt, os.path.join(eval_dir, 'alignment_scatter.png'), sims['a'],
                          sims['b'], title)
    if recalls:
        recall_bars(plt, os.path.join(eval_dir, 'recall.png'), recalls, intervals, k_values, labels,
                    colors, title)


def fidelity_bars(plt, path, report, labels, colors, title):
    """The headline metrics per column (pooled embeddings; conditional MMD^2 where it ran), with
    their 95% intervals."""
    blocks = [(m, report['pooled'], 1) for m in ('frechet_distance', 'coverage', 'recall')]
    if report['conditional_mmd2']:
        blocks.insert(0, ('conditional MMD2 x1e3', {c: {'cmmd': v} for c, v in
                                                   report['conditional_mmd2'].items()}, 1e3))
    fig, axes = plt.subplots(1, len(blocks), figsize=(3.6 * len(blocks), 4.2))
    for ax, (m, block, scale) in zip(axes, blocks):
        cols = [c for c in block if c in colors and not c.startswith('b_minus_')]
        key = 'cmmd' if scale != 1 else m
        values = [scale * block[c][key]['value'] for c in cols]
        cis = [block[c][key]['ci95'] for c in cols]
        err = (np.maximum(np.array([[v - scale * c[0], scale * c[1] - v] for v, c in
                                    zip(values, cis)]).T, 0) if all(cis) else None)
        ax.bar(range(len(cols)), values, color=[colors[c] for c in cols], yerr=err,
               error_kw=dict(lw=0.8, capsize=2, ecolor='k'))
        ax.set_xticks(range(len(cols)), [labels[c] for c in cols], rotation=45, ha='right',
                      fontsize=7)
        ax.set_title({'recall': 'k-NN recall'}.get(m, m.replace('_', ' ')), fontsize=9)
        if key == 'cmmd':  # the generators' differences, not the controls' far bars, set the scale
            near = [scale * c[1] for c, col in zip(cis, cols) if col not in ('m', 'u')]
            top = 2.5 * max(near) if near else None
            for i, v in enumerate(values):
                if top and v > top:
                    ax.text(i, top * 0.97, f"{v:.0f}", ha='center', va='top', fontsize=7)
            ax.set_ylim(top=top)
    fig.suptitle(f"Task 3: distribution fidelity (95% intervals)\n{title}", fontsize=8, wrap=True)
    save(fig, path)


def fidelity_projection(plt, path, real, draws, labels, images=4):
    """A 2-D PCA (fitted on the real and true samples) of a few images: the true conditional
    samples, B's draws and each other column's point."""
    true, vecs = draws['t'][0], {c: d[0] for c, d in draws.items() if c not in ('t', 'u', 'm')}
    fit = np.concatenate([real[:, 0], true.reshape(-1, true.shape[-1])]).astype(np.float64)
    centre = fit.mean(0)
    axes2 = np.linalg.svd(fit - centre, full_matrices=False)[2][:2].T
    proj = lambda x: (np.asarray(x, np.float64) - centre) @ axes2
    colors = method_colors([*labels, 't'])
    fig, axes = plt.subplots(1, images, figsize=(3.2 * images, 3.6))
    for i, ax in enumerate(np.atleast_1d(axes)):
        ax.scatter(*proj(true[i]).T, s=14, c='k', marker='o', label=labels['t'])
        for c, v in vecs.items():
            ax.scatter(*proj(v[i]).T, s=24, color=colors[c], marker='x', label=labels[c])
        ax.scatter(*proj(real[i])[0], s=40, facecolors='none', edgecolors='tab:blue', label='real')
        ax.set_title(f"val image {i}", fontsize=8)
    save(fig, path, legend_below(fig, np.atleast_1d(axes)[0], 4))


def plot_fidelity(eval_dir, report, real, draws, labels, common):
    """eval.py's fidelity.png (headline bars) and, with true samples, fidelity_projection.png."""
    plt = pyplot()
    if plt is None:
        return
    colors = method_colors(labels)
    fidelity_bars(plt, os.path.join(eval_dir, 'fidelity.png'), report, labels, colors,
                  plot_title(common))
    if 't' in draws:
        fidelity_projection(plt, os.path.join(eval_dir, 'fidelity_projection.png'),
                            real[0].numpy(), {c: (d[0].numpy(),) for c, d in draws.items()},
                            labels, min(4, len(real[0])))
