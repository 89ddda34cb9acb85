"""Sweep the sampler over checkpoints: sample.py and eval.py per cell, one table (CSV and JSON) and a plot.

python sweep.py config/demo.py --ckpts="('out/demo/ckpt_iter*.pt',)" --methods="('euler', 'midpoint')" \
    --steps="(5, 10, 20)" --cfg_scales="(1.0,)"

The grid is ckpts x methods x steps x cfg_scales x shifts. Each cell runs sample.py (it writes
out_dir/samples/<name>/generated.npy, name = flow.samples_name) and then eval.py on that array (it writes
<that folder>/eval/*.json) as subprocesses, with this command's config files: the stages talk only through files.
A cell whose eval summaries already describe its array is read, not rerun, and sample.py skips a finished array and
continues a partial one, so a killed sweep started again continues where it stopped. The table goes to
out_dir/<sweep_name>.csv and .json, one row per cell: checkpoint, iteration, sampler, model calls per sample,
B's recall@K in both directions, alignment and token fidelity (and any confidence-interval fields the summaries
carry); with matplotlib, out_dir/<sweep_name>.png plots recall and token cosine against model calls.
"""
import csv
import glob
import io
import os
import subprocess
import sys
import time

import data
import flow

# -----------------------------------------------------------------------------
out_dir = 'out'                # samples go to out_dir/samples/<name>/, the table to out_dir/<sweep_name>.*
data_dir = 'data'              # extract.py's output: data_dir/<split>
splits = ('train2017', 'val2017')
val_data = ''                  # the data folder to generate for and evaluate on; '' = data_dir/splits[1]
ckpts = ('',)                  # checkpoint files or glob patterns ('out/demo/ckpt_iter*.pt'); '' = out_dir/ckpt.pt
methods = ('euler', 'midpoint')  # flow.SAMPLERS
steps = (5, 10, 20)
cfg_scales = (1.0,)
shifts = (1.0,)                # time grids (flow.time_grid)
use_ema = True
seed = 1337
device = 'auto'
sweep_name = 'sweep'
# -----------------------------------------------------------------------------
HERE = os.path.dirname(os.path.abspath(__file__))
DIRECTIONS = {'i2t': 'image_to_text', 't2i': 'text_to_image'}


def find_checkpoints(patterns, out_dir):
    """The checkpoint files of `ckpts`, in order, globs expanded; SystemExit naming an entry that finds none."""
    paths = []
    for pattern in patterns or ('',):
        pattern = pattern or os.path.join(out_dir, 'ckpt.pt')
        found = sorted(glob.glob(pattern)) if any(c in pattern for c in '*?[') else [pattern]
        if not found or not all(os.path.isfile(p) for p in found):
            raise SystemExit(f"sweep.py: ckpts entry {pattern!r} finds no checkpoint file (found {found})")
        paths += [p for p in found if p not in paths]
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    twins = sorted({s for s in stems if stems.count(s) > 1})
    if twins:
        raise SystemExit(f"sweep.py: checkpoints {paths} share file names {twins}: their samples would share "
                         f"out_dir/samples/ folders; sweep them with separate --out_dir")
    return paths


def check_grid(methods, steps, cfg_scales, shifts):
    """SystemExit naming the setting of a grid value that sample.py would refuse."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    for key, values, ok, expected in [
            ('methods', methods, lambda v: v in flow.SAMPLERS, f"names in {tuple(flow.SAMPLERS)}"),
            ('steps', steps, lambda v: isinstance(v, int) and v >= 1, "positive ints"),
            ('cfg_scales', cfg_scales, number, "numbers"),
            ('shifts', shifts, lambda v: number(v) and v > 0, "positive numbers")]:
        if not values or not all(map(ok, values)):
            raise SystemExit(f"sweep.py: {key} should be a non-empty tuple of {expected}, got {values!r}")


def cell_is_done(folder, ckpt):
    """Both eval summaries describe the generated array now in folder, and the checkpoint is not newer than it."""
    info_path = os.path.join(folder, 'generated.json')
    summaries = [os.path.join(folder, 'eval', f'{task}_summary.json') for task in ('alignment', 'recall')]
    if not all(map(os.path.exists, [info_path, *summaries])):
        return False
    if os.path.getmtime(ckpt) > os.path.getmtime(info_path):
        return False  # sample.py decides: a checkpoint trained further refuses, naming the folder to delete
    sampling = data.read_json(info_path)
    return all(data.read_json(path).get('sampling') == sampling for path in summaries)


def run_stage(script, config_files, overrides):
    """Run a stage as a subprocess with the config files and --key=value overrides; SystemExit with its output."""
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


def read_cell(folder):
    """One table row from a cell's generated.json and eval summaries; B's fields read generically, so fields a
    newer eval.py adds (confidence intervals) come along."""
    info = data.read_json(os.path.join(folder, 'generated.json'))
    align = data.read_json(os.path.join(folder, 'eval', 'alignment_summary.json'))
    recall = data.read_json(os.path.join(folder, 'eval', 'recall_summary.json'))
    s = info['settings']
    row = {'checkpoint': s['checkpoint'], 'iter_num': s['iter_num'], 'method': s['sample_method'],
           'steps': s['sample_steps'], 'shift': s['sample_shift'], 'cfg_scale': s['cfg_scale'], 'seed': s['seed'],
           'model_calls': info['model_calls']}
    for short, direction in DIRECTIONS.items():
        row.update(flatten(f'{short}_', recall['method_b'][direction]))
    row.update({f'alignment_{k}': v for k, v in flatten('', align['method_b']).items()
                if k.startswith('mean_cosine_similarity')})
    row['alignment_correlation'] = align['correlation']
    row.update(flatten('', align['token_fidelity']))
    row['samples'] = folder
    return row, recall['method_a']


def write_table(path, rows, baseline, grid):
    """out_dir/<sweep_name>.json (grid, A's recall, rows) and .csv (the rows), each written atomically."""
    data.write_json(path + '.json', {'grid': grid, 'method_a': baseline, 'cells': rows}, indent=2)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    data.write_atomic(path + '.csv', lambda f: f.write(text.getvalue()))


def plot(path, rows, baseline):
    """<path>.png: B's R@5 in both directions and the token cosine against model calls, a line per sampler;
    False where matplotlib is not installed (it is optional)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib not installed, skipped")
        return False
    panels = [('i2t_recall@5', 'image->text R@5 (%)', 100), ('t2i_recall@5', 'text->image R@5 (%)', 100),
              ('token_cosine_mean', 'token cosine to the real tokens', 1)]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    calls = sorted({r['model_calls'] for r in rows})
    lines = {}
    for row in rows:
        label = (f"{os.path.splitext(os.path.basename(row['checkpoint']))[0]} {row['method']}"
                 + (f" shift {row['shift']:g}" if row['shift'] != 1 else '') + f" cfg {row['cfg_scale']:g}")
        lines.setdefault(label, []).append(row)
    for ax, (key, title, scale) in zip(axes, panels):
        for label, points in lines.items():
            points = sorted(points, key=lambda r: r['model_calls'])
            ax.plot([r['model_calls'] for r in points], [scale * r[key] for r in points], 'o-', label=label)
        if key != 'token_cosine_mean':
            ax.axhline(100 * baseline[DIRECTIONS[key[:3]]]['recall@5'], color='k', ls='--', lw=0.8,
                       label='A: real tokens')
        ax.set(xscale='log', xlabel='model calls per sample', title=title)
        ax.set_xticks(calls, [str(c) for c in calls])  # the grid's own call counts, not powers of ten
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + '.png', dpi=120)
    plt.close(fig)
    return True


def print_table(rows, baseline):
    """The table on the terminal: one line per cell, recall in percent."""
    print("A (real tokens): image->text R@1/5/10 " + '/'.join(
        f"{100 * baseline['image_to_text'][f'recall@{k}']:.1f}" for k in (1, 5, 10)) + ", text->image " + '/'.join(
        f"{100 * baseline['text_to_image'][f'recall@{k}']:.1f}" for k in (1, 5, 10)))
    print(f"{'checkpoint':>18s} {'iter':>6s} {'method':>8s} {'steps':>5s} {'shift':>5s} {'cfg':>4s} {'calls':>5s} "
          f"{'i2t R@1/5/10 (%)':>17s} {'t2i R@1/5/10 (%)':>17s} {'tok cos':>7s} {'align':>7s}")
    for r in rows:
        recall = {d: '/'.join(f"{100 * r[f'{d}_recall@{k}']:.1f}" for k in (1, 5, 10)) for d in DIRECTIONS}
        print(f"{os.path.splitext(os.path.basename(r['checkpoint']))[0]:>18s} {r['iter_num']:>6d} {r['method']:>8s} "
              f"{r['steps']:>5d} {r['shift']:>5g} {r['cfg_scale']:>4g} {r['model_calls']:>5d} {recall['i2t']:>17s} "
              f"{recall['t2i']:>17s} {r['token_cosine_mean']:>7.4f} {r['alignment_mean_cosine_similarity']:>7.4f}")


if __name__ == '__main__':
    from configurator import configure
    config = configure(globals())
    config_files = [a for a in sys.argv[1:] if not a.startswith('--')]
    val_data = val_data or os.path.join(data_dir, splits[1])
    check_grid(methods, steps, cfg_scales, shifts)
    checkpoints = find_checkpoints(ckpts, out_dir)
    shared = [f'--out_dir={out_dir}', f'--val_data={val_data}', f'--seed={seed}', f'--device={device}',
              f'--use_ema={use_ema}']
    grid = [(c, m, n, g, s) for c in checkpoints for m in methods for n in steps for g in cfg_scales for s in shifts]
    print(f"sweep: {len(checkpoints)} checkpoint(s) x {len(methods)} method(s) x {len(steps)} step count(s) x "
          f"{len(cfg_scales)} cfg scale(s) x {len(shifts)} shift(s) = {len(grid)} cells, on {val_data}")
    rows, baseline = [], None
    for i, (ckpt, method, n_steps, scale, shift) in enumerate(grid):
        folder = os.path.join(out_dir, 'samples', flow.samples_name(ckpt, method, n_steps, scale, seed, shift, use_ema))
        t0, done = time.time(), cell_is_done(folder, ckpt)
        if not done:
            run_stage('sample.py', config_files, shared + [f'--ckpt_path={ckpt}', f'--sample_method={method}',
                      f'--sample_steps={n_steps}', f'--cfg_scale={scale}', f'--sample_shift={shift}'])
            run_stage('eval.py', config_files, shared + [f'--generated={os.path.join(folder, "generated.npy")}'])
        row, baseline = read_cell(folder)
        rows.append(row)
        print(f"[{i + 1}/{len(grid)}] {os.path.basename(folder)}: "
              + ('reused' if done else f'sampled and evaluated in {time.time() - t0:.1f} s')
              + f", image->text R@5 {100 * row['i2t_recall@5']:.1f}%, token cosine {row['token_cosine_mean']:.4f}")
    path = os.path.join(out_dir, sweep_name)
    write_table(path, rows, baseline, {'ckpts': checkpoints, 'methods': methods, 'steps': steps,
                                       'cfg_scales': cfg_scales, 'shifts': shifts, 'seed': seed,
                                       'use_ema': use_ema, 'val_data': val_data})
    plotted = plot(path, rows, baseline)
    print_table(rows, baseline)
    print(f"sweep: wrote {path}.csv, {path}.json" + (f", {path}.png" if plotted else ''))
