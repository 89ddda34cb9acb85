"""Sweep the sampler over checkpoints on held-out rows, then report the chosen cell on the reported
split.

python sweep.py config/demo.py --ckpts="('out/demo/ckpt_iter*.pt',)" \
    --methods="('euler', 'midpoint')" \
    --steps="(5, 10)" --cfg_scales="(1.0, 2.0)" --seeds="(1337, 1338)"

The grid is ckpts x methods x steps x cfg_scales x shifts x seeds (AXES: a flow.Sampler field each;
the other fields at their defaults). Each cell runs sample.py (it writes
out_dir/samples/<name>/generated.npy, name = data.samples_name) and then eval.py on that array (it
writes <that folder>/eval/*.json) as subprocesses, with this command's config files: the stages talk
only through files.
With holdout=True (the default) the grid runs on train_data's held-out slice (its last val_fraction
rows, which train.py never trains on); the cells are ranked there by select_metric (the mean over
seeds; a recall column, or a Task 3 figure in the direction eval.py's fidelity_summary.json gives
it), and only the select_top best are sampled and evaluated on val_data, the reported split,
which so chooses nothing. holdout=False runs the grid on val_data itself: a look at the reported
split, marked as such, that selects nothing. sample.py reuses a finished array only while its
checkpoint (run, iteration, contents), data rows and settings are the same, and stops naming what
changed otherwise; a cell whose eval summaries describe that same array is read, not rerun. So a
killed sweep started again continues where it stopped. Tables: out_dir/<sweep_name>.csv and .json
(the grid on the selection split, its ranking, and the chosen cells on the reported split, each seed
a row and the mean and spread over seeds per cell); with matplotlib, out_dir/<sweep_name>.png
(recall with its intervals and token cosine against model calls).
"""
import csv
import dataclasses
import glob
import itertools
import io
import os
import statistics
import subprocess
import sys
import time

import data
import flow
import plots
from metrics import BETTER

# -----------------------------------------------------------------------------
out_dir = 'out'                # samples: out_dir/samples/<name>/; the table: out_dir/<sweep_name>.*
data_dir = 'data'              # extract.py's output: data_dir/<split>
splits = ('train2017', 'val2017')
train_data = ''                # its held-out slice is the selection split; '' = data_dir/splits[0]
val_data = ''                  # the reported split; '' = data_dir/splits[1]
val_fraction = data.VAL_FRACTION  # the held-out slice (train_data's last rows), as train.py's
holdout = True                 # run the grid on the held-out slice and select; False: on val_data
ckpts = ('',)                  # checkpoint files or globs ('out/demo/ckpt_iter*.pt'); '' = ckpt.pt
methods = ('euler', 'midpoint')  # flow.SOLVERS
steps = (5, 10, 20)
cfg_scales = (1.0,)
shifts = (1.0,)                # time grids (flow.time_grid)
seeds = ()                     # sampling seeds per cell, for the generator's spread; () = (seed,)
# the ranking's figure: a table column, higher is better (t2i_recall@1, token_cosine_mean), or a
# Task 3 headline figure in its own direction (conditional_mmd2 where the data folder has true
# samples, else frechet_distance, coverage, recall): then every cell's eval runs Task 3
select_metric = 'i2t_recall@5'
select_top = 1                 # cells evaluated on val_data after the selection
use_ema = True
seed = 1337
device = 'auto'
sweep_name = 'sweep'
# -----------------------------------------------------------------------------
HERE = os.path.dirname(os.path.abspath(__file__))
DIRECTIONS = {'i2t': 'image_to_text', 't2i': 'text_to_image'}
# the grid's axes, in this order: a flow.Sampler field each, and the setting listing its values
AXES = {'method': 'methods', 'steps': 'steps', 'cfg_scale': 'cfg_scales', 'shift': 'shifts'}


def find_checkpoints(patterns, out_dir):
    """The checkpoint files of `ckpts`, in order, globs expanded; SystemExit naming an entry that
    finds none."""
    if not patterns:
        raise SystemExit("sweep.py: ckpts is empty: give checkpoint files or glob patterns, e.g. "
                         "--ckpts=\"('out/demo/ckpt_iter*.pt',)\" (or ('',) for out_dir/ckpt.pt)")
    paths = []
    for pattern in patterns:
        pattern = pattern or os.path.join(out_dir, 'ckpt.pt')
        found = sorted(glob.glob(pattern)) if any(c in pattern for c in '*?[') else [pattern]
        if not found or not all(os.path.isfile(p) for p in found):
            raise SystemExit(f"sweep.py: ckpts entry {pattern!r} finds no checkpoint file")
        paths += [p for p in found if p not in paths]
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    twins = sorted({s for s in stems if stems.count(s) > 1})
    if twins:
        raise SystemExit(f"sweep.py: checkpoints {paths} share file names {twins}: their samples "
                         "would share out_dir/samples/ folders; sweep them with separate --out_dir")
    return paths


def check_grid(methods, steps, cfg_scales, shifts):
    """SystemExit naming the setting of a grid value that sample.py would refuse."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    for key, values, ok, expected in [
            ('methods', methods, lambda v: v in flow.SOLVERS, f"names in {tuple(flow.SOLVERS)}"),
            ('steps', steps, lambda v: isinstance(v, int) and v >= 1, "positive ints"),
            ('cfg_scales', cfg_scales, number, "numbers"),
            ('shifts', shifts, lambda v: number(v) and v > 0, "positive numbers")]:
        if not values or not all(map(ok, values)):
            raise SystemExit(f"sweep.py: {key} should be a non-empty tuple of {expected}, got "
                             f"{values!r}")


def cell_is_done(folder, fidelity=False):
    """The eval summaries (Task 3's too when fidelity) describe the generated array now in folder
    (what it depends on, as generated.json says)."""
    tasks = ('alignment', 'recall', 'fidelity') if fidelity else ('alignment', 'recall')
    summaries = [os.path.join(folder, 'eval', f'{task}_summary.json') for task in tasks]
    if not all(map(os.path.exists, [os.path.join(folder, 'generated.json'), *summaries])):
        return False
    sampling = data.read_json(os.path.join(folder, 'generated.json'))
    return all(data.read_json(path).get('sampling') == sampling for path in summaries)


def run_stage(script, config_files, overrides):
    """Run a stage as a subprocess with the config files and --key=value overrides; SystemExit with
    its output."""
    cmd = [sys.executable, os.path.join(HERE, script), *config_files, *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"sweep.py: `{' '.join(cmd)}` failed (exit {result.returncode}):\n"
                         f"{(result.stdout + result.stderr)[-3000:]}")


def flatten(prefix, values):
    """{prefix+key: value} of a nested dict; an interval [lo, hi] becomes _lo and _hi."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(f'{prefix}{key}_', value))
        elif isinstance(value, (list, tuple)) and len(value) == 2:
            out[f'{prefix}{key}_lo'], out[f'{prefix}{key}_hi'] = value
        else:
            out[prefix + key] = value
    return out


def fidelity_headline(folder):
    """B's Task 3 headline figures in a cell's eval/fidelity_summary.json (eval.py --tasks=...,
    fidelity): name, name_ci95_lo / _hi and name_better (the figure's direction, as the summary
    says); {} where eval.py wrote no such file."""
    path = os.path.join(folder, 'eval', 'fidelity_summary.json')
    if not os.path.exists(path):
        return {}
    headline, row = data.read_json(path).get('headline') or {}, {}
    figures = (headline.get('columns') or {}).get('method_b')
    if not isinstance(figures, dict) or not isinstance(headline.get('better'), dict):
        raise SystemExit(f"sweep.py: {path} should hold B's figures under "
                         f"headline.columns.method_b and their directions under headline.better, "
                         f"got {headline!r:.200}")
    if 'value' in figures:  # one figure (conditional MMD^2), else {metric: figure}
        figures = {headline['metric']: figures}
    for name, figure in figures.items():
        row.update({name: figure['value'], **flatten(f'{name}_', {'ci95': figure.get('ci95')}),
                    f'{name}_better': headline['better'][name]})
    return row


def read_cell(folder):
    """One table row from a cell's generated.json and eval summaries; B's fields read generically,
    so fields a newer eval.py adds (confidence intervals) come along."""
    info = data.read_json(os.path.join(folder, 'generated.json'))
    align = data.read_json(os.path.join(folder, 'eval', 'alignment_summary.json'))
    recall = data.read_json(os.path.join(folder, 'eval', 'recall_summary.json'))
    s = info['settings']
    sampler = dataclasses.asdict(flow.Sampler.from_settings(s))  # regression's: method 'regression'
    row = {'split': 'holdout' if folder.endswith('-holdout') else 'val',
           'checkpoint': s['checkpoint'], 'iter_num': s['iter_num'],
           **{k: v for k, v in sampler.items() if k != 'use_ema'},
           'model_calls': info['model_calls']}
    for short, direction in DIRECTIONS.items():
        row.update(flatten(f'{short}_', recall['method_b'][direction]))
    row.update({f'alignment_{k}': v for k, v in flatten('', align['method_b']).items()
                if k.startswith('mean_cosine_similarity')})
    row['alignment_correlation'] = align['correlation']
    row.update(flatten('', align['token_fidelity']))
    row.update(fidelity_headline(folder))
    row['samples'] = folder
    return row, recall['method_a']


def run_cells(cells, seed_list, on_holdout, shared, config_files, objectives, fidelity=False):
    """sample.py for every cell and seed, then eval.py for each (or read back): the table rows, A's
    recall on that split, and the cell of each row's settings (CELL). fidelity: eval.py runs Task 3
    too, each seed's array with the cell's other seeds beside it (B's spread, conditional MMD)."""
    rows, baseline, seen, cell_of = [], None, set(), {}
    where = 'held-out slice of train_data' if on_holdout else 'val_data'
    stage = shared + [f'--holdout={on_holdout}']
    for ckpt, cell in cells:
        started = {}  # this cell's folders, not sampled yet (regression: one folder for every cell)
        for sampler in (dataclasses.replace(cell, seed=s) for s in seed_list):
            name = data.samples_name(ckpt, sampler.for_objective(objectives[ckpt]), on_holdout)
            folder = os.path.join(out_dir, 'samples', name)
            if folder not in seen:
                seen.add(folder)
                started[folder] = time.time()
                run_stage('sample.py', config_files,
                          stage + [f'--ckpt_path={ckpt}', *sampler.arguments()])
        for folder, t0 in started.items():
            # sample.py reused the array (or made it again): are its summaries current?
            done = cell_is_done(folder, fidelity)
            if not done:
                others = tuple(os.path.join(f, 'generated.npy') for f in started if f != folder)
                task3 = ['--tasks=alignment,recall,fidelity', f'--seed_generated={others}']
                run_stage('eval.py', config_files, stage + [
                    f'--generated={os.path.join(folder, "generated.npy")}',
                    *(task3 if fidelity else [])])
            row, baseline = read_cell(folder)
            rows.append(row)
            cell_of[tuple(row[k] for k in CELL)] = (ckpt, cell)
            how = 'reused' if done else f'sampled and evaluated in {time.time() - t0:.1f} s'
            print(f"[{len(rows)}/{len(cells) * len(seed_list)}] {os.path.basename(folder)} on the "
                  f"{where}: {how}, image->text R@5 {100 * row['i2t_recall@5']:.1f}%, token "
                  f"cosine {row['token_cosine_mean']:.4f}")
    return rows, baseline, cell_of


# a cell's settings, its seed aside: the checkpoint and the sampler's
CELL = ('checkpoint', 'iter_num', *(f.name for f in dataclasses.fields(flow.Sampler)
                                    if f.name not in ('use_ema', 'seed')), 'model_calls')
SUMMARIZED = ('i2t_recall@1', 'i2t_recall@5', 'i2t_recall@10', 't2i_recall@1', 't2i_recall@5',
              't2i_recall@10', 'alignment_mean_cosine_similarity', 'token_cosine_mean')


def over_seeds(rows, metric):
    """One entry per cell: its settings, and per metric the mean over its seeds with the spread
    (min, max, std); best first by `metric`'s mean (lowest first where its _better column says
    'lower')."""
    cells = {}
    for row in rows:
        cells.setdefault(tuple(row[k] for k in CELL), []).append(row)
    if metric not in rows[0]:
        raise SystemExit(f"sweep.py: select_metric={metric!r} is not a column of the table nor a "
                         f"headline figure of {rows[0]['samples']}/eval/fidelity_summary.json; "
                         "columns: "
                         f"{', '.join(k for k, v in rows[0].items() if isinstance(v, float))}")
    out = []
    for key, group in cells.items():
        entry = {**dict(zip(CELL, key)), 'seeds': [r['seed'] for r in group]}
        for m in dict.fromkeys((metric, *SUMMARIZED)):
            values = [r[m] for r in group]
            entry[m] = {'mean': statistics.fmean(values), 'min': min(values), 'max': max(values),
                        'std': statistics.stdev(values) if len(values) > 1 else 0.0}
        out.append(entry)
    sign = 1 if rows[0].get(f'{metric}_better') == 'lower' else -1
    return sorted(out, key=lambda e: sign * e[metric]['mean'])


def write_table(path, table, rows):
    """out_dir/<sweep_name>.json (the whole table) and .csv (one row per cell, seed and split),
    atomically."""
    data.write_json(path + '.json', table, indent=2)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    data.write_atomic(path + '.csv', lambda f: f.write(text.getvalue()))


def plot(path, rows, baseline, title):
    """<path>.png: B's R@5 in both directions (95% intervals) and the token cosine against model
    calls, a colour per checkpoint and sampler setting, a line style per seed, A's R@5 (its
    interval shaded) for reference; False where matplotlib is not installed (it is optional)."""
    plt = plots.pyplot()
    if plt is None:
        return False
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter
    panels = [('i2t_recall@5', 'image->text R@5 (%)', 100),
              ('t2i_recall@5', 'text->image R@5 (%)', 100),
              ('token_cosine_mean', 'token cosine to the real tokens (axis not from 0)', 1)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    calls = sorted({r['model_calls'] for r in rows})

    def setting(row):
        """A row's checkpoint and sampler, its seed aside."""
        stem = os.path.splitext(os.path.basename(row['checkpoint']))[0]
        # ckpt.pt names no iteration
        stem += '' if f"iter{row['iter_num']:06d}" in stem else f" iter {row['iter_num']}"
        if row['method'] == 'regression':  # one forward pass: no sampler, no guidance
            return f"{stem} regression"
        shift = f" shift {row['shift']:g}" if row['shift'] != 1 else ''
        return f"{stem} {row['method']}{shift} cfg {row['cfg_scale']:g}"
    lines = {}
    for row in rows:
        lines.setdefault((setting(row), row['seed']), []).append(row)
    settings = list(dict.fromkeys(s for s, _ in lines))
    seeds = list(dict.fromkeys(s for _, s in lines))
    palette = plt.get_cmap('tab10' if len(settings) <= 10 else 'tab20').colors
    color = {s: palette[i % len(palette)] for i, s in enumerate(settings)}
    style = {s: dict(ls=('-', '--', ':', '-.')[i % 4], marker='os^Dv'[i % 5])
             for i, s in enumerate(seeds)}
    # lines side by side, intervals at one call count apart
    step = min(1.04, 1.3 ** (1 / max(len(lines) - 1, 1)))
    for ax, (key, name, scale) in zip(axes, panels):
        for j, ((label, seed), points) in enumerate(lines.items()):
            points = sorted(points, key=lambda r: r['model_calls'])
            dodge = step ** (j - (len(lines) - 1) / 2)
            x, y = [dodge * r['model_calls'] for r in points], [scale * r[key] for r in points]
            err = None
            # a percentile bound may sit a rounding error past the point
            if f'{key}_ci95_lo' in points[0]:
                err = [[max(0, v - scale * r[f'{key}_ci95_lo']) for v, r in zip(y, points)],
                       [max(0, scale * r[f'{key}_ci95_hi'] - v) for v, r in zip(y, points)]]
            ax.errorbar(x, y, yerr=err, color=color[label], ms=4, lw=1.2, elinewidth=0.8, capsize=2,
                        **style[seed])
        if key != 'token_cosine_mean':
            a = baseline[DIRECTIONS[key[:3]]]
            ax.axhline(100 * a['recall@5'], color='k', ls='--', lw=0.8)
            if a.get('recall@5_ci95'):
                ax.axhspan(*(100 * v for v in a['recall@5_ci95']), color='k', alpha=0.08, lw=0)
            ax.set_ylim(0, 100)
        ax.set(xscale='log', xlabel='model calls per sample (points dodged sideways)', title=name)
        ax.set_xticks(calls, [str(c) for c in calls])  # the grid's own call counts, not 10^k
        ax.xaxis.set_minor_formatter(NullFormatter())
    # below the axes: the seeds' line styles and A, and above them a colour per setting
    keys = [Line2D([], [], color='k', ms=4, **style[s],
                   label=f'seed {s}' if s is not None else 'no seed (regression)') for s in seeds]
    keys.append(Line2D([], [], color='k', ls='--', lw=0.8,
                       label='A: real tokens (shaded: its 95% interval)'))
    below = plots.legend_height(fig, fig.legend(handles=keys, loc='lower center', ncol=len(keys),
                                                fontsize=7, frameon=False))
    below += plots.legend_height(fig, fig.legend(
        handles=[Line2D([], [], color=color[s], lw=2, label=s) for s in settings],
        loc='lower center', bbox_to_anchor=(0.5, below), ncol=min(4, len(settings)), fontsize=7,
        frameon=False))
    fig.suptitle(title, fontsize=9)
    plots.save(fig, path + '.png', below)
    return True


def print_table(rows, baseline, where):
    """The table on the terminal: one line per cell and seed, recall in percent."""
    print(f"{where}: A (real tokens) image->text R@1/5/10 " + '/'.join(
        f"{100 * baseline['image_to_text'][f'recall@{k}']:.1f}" for k in (1, 5, 10))
        + ", text->image " + '/'.join(
        f"{100 * baseline['text_to_image'][f'recall@{k}']:.1f}" for k in (1, 5, 10)))
    print(f"{'checkpoint':>18s} {'iter':>6s} {'method':>10s} {'steps':>5s} {'shift':>5s} "
          f"{'cfg':>4s} {'seed':>6s} {'calls':>5s} {'i2t R@1/5/10 (%)':>17s} "
          f"{'t2i R@1/5/10 (%)':>17s} {'tok cos':>7s} {'align':>7s}")
    for r in rows:
        recall = {d: '/'.join(f"{100 * r[f'{d}_recall@{k}']:.1f}" for k in (1, 5, 10))
                  for d in DIRECTIONS}
        print(f"{os.path.splitext(os.path.basename(r['checkpoint']))[0]:>18s} {r['iter_num']:>6d} "
              f"{r['method']:>10s} {r['steps']:>5d} {r['shift']:>5g} {r['cfg_scale']:>4g} "
              f"{str(r['seed']):>6s} {r['model_calls']:>5d} {recall['i2t']:>17s} "
              f"{recall['t2i']:>17s} {r['token_cosine_mean']:>7.4f} "
              f"{r['alignment_mean_cosine_similarity']:>7.4f}")


if __name__ == '__main__':
    from configurator import configure, require_positive
    config = configure(globals())
    config_files = [a for a in sys.argv[1:] if not a.startswith('--')]
    train_data, val_data = data.split_folders(data_dir, splits, train_data, val_data)
    check_grid(methods, steps, cfg_scales, shifts)
    require_positive(config, 'select_top')
    seed_list = tuple(seeds) or (seed,)
    if holdout and not val_fraction > 0:
        raise SystemExit("sweep.py: holdout=True selects on train_data's held-out slice, but "
                         f"val_fraction is {val_fraction}: set it as train.py had it (> 0), or "
                         "--holdout=False to look at val_data without selecting")
    checkpoints = find_checkpoints(ckpts, out_dir)
    objectives = {c: data.checkpoint_objective(data.load_checkpoint(c, 'ckpts'))
                  for c in checkpoints}
    shared = [f'--out_dir={out_dir}', f'--train_data={train_data}', f'--val_data={val_data}',
              f'--val_fraction={val_fraction}', f'--device={device}']
    axes = [globals()[setting] for setting in AXES.values()]
    cells = [(c, flow.Sampler(use_ema=use_ema, seed=seed, **dict(zip(AXES, values))))
             for c in checkpoints for values in itertools.product(*axes)]
    where = 'held-out slice of train_data' if holdout else 'val_data (no selection)'
    print(f"sweep: {len(checkpoints)} checkpoint(s) x {len(methods)} method(s) x {len(steps)} step "
          f"count(s) x {len(cfg_scales)} cfg scale(s) x {len(shifts)} shift(s) x {len(seed_list)} "
          f"seed(s) on the {where}")
    fidelity = select_metric in BETTER  # a Task 3 figure: eval.py runs Task 3 in every cell
    rows, baseline, cell_of = run_cells(cells, seed_list, holdout, shared, config_files, objectives,
                                        fidelity)
    ranking = over_seeds(rows, select_metric)
    table = {'grid': {'ckpts': checkpoints, 'methods': methods, 'steps': steps,
                      'cfg_scales': cfg_scales, 'shifts': shifts, 'seeds': seed_list,
                      'use_ema': use_ema, 'train_data': train_data, 'val_data': val_data,
                      'val_fraction': val_fraction},
             'grid_split': 'holdout' if holdout else 'val', 'method_a': baseline, 'cells': rows,
             'select_metric': select_metric, 'ranking': ranking, 'chosen': None, 'reported': None,
             'reported_over_seeds': None, 'method_a_reported': None}
    all_rows = rows
    if holdout:
        chosen = ranking[:select_top]
        table['chosen'] = chosen
        picked = [cell_of[tuple(e[k] for k in CELL)] for e in chosen]
        print(f"sweep: chose {len(chosen)} cell(s) by the held-out {select_metric}; evaluating on "
              "val_data")
        reported, table['method_a_reported'], _ = run_cells(picked, seed_list, False, shared,
                                                            config_files, objectives, fidelity)
        table['reported'], table['reported_over_seeds'] = reported, over_seeds(reported,
                                                                               select_metric)
        all_rows = rows + reported
    path = os.path.join(out_dir, sweep_name)
    write_table(path, table, all_rows)
    plotted = plot(path, rows, baseline,
                   f"sweep on the {where}: {val_data if not holdout else train_data}")
    print_table(rows, baseline, f"grid on the {where}")
    if holdout:
        print_table(table['reported'], table['method_a_reported'],
                    "chosen on the held-out slice, on val_data")
    for entry in table['reported_over_seeds'] or ranking[:select_top]:
        m = entry[select_metric]
        print(f"{'val_data' if holdout else 'grid'}: {os.path.basename(entry['checkpoint'])} "
              f"{entry['method']} {entry['steps']} cfg {entry['cfg_scale']:g}: {select_metric} "
              f"{m['mean']:.4f} over seeds {entry['seeds']} (min {m['min']:.4f}, max "
              f"{m['max']:.4f}, std {m['std']:.4f})")
    print(f"sweep: wrote {path}.csv, {path}.json" + (f", {path}.png" if plotted else ''))
