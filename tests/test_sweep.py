"""sweep.py: a small grid end to end (every cell present, a second run reuses every array, a killed
sweep continues), its table's fields, and bad grid settings."""
import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, make_data_folder
from model import DiT, DiTConfig
from sweep import check_grid, find_checkpoints, over_seeds, read_cell

SWEEP = os.path.join(ROOT, 'sweep.py')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """A data folder shaped like config/encoders/tiny-clip (16 tokens x 64, joint space 32), two
    kept checkpoints of a tiny random DiT, and a config file for every stage."""
    root = tmp_path_factory.mktemp('sweep')
    data = make_data_folder(str(root / 'data'), n=10, tokens=16, clip_dim=64, eva_dim=12,
                            embed_dim=32)
    meta = json.load(open(os.path.join(data, 'meta.json')))
    cfg = DiTConfig(dim=32, n_layers=1, n_heads=2, in_dim=64, cond_dim=12, grid_size=4,
                    ffn_multiple_of=32)
    os.makedirs(root / 'run')
    for it in (10, 20):
        torch.manual_seed(it)
        model = DiT(cfg)
        # the zero-initialized output layers too, so the velocity depends on the inputs
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        torch.save({'ema': model.state_dict(), 'model_args': dataclasses.asdict(cfg),
                    'iter_num': it, 'config': {}, 'data_stats': {k: meta[k] for k in ('clip_mean',
                                                                                      'clip_std')}},
                   root / 'run' / f'ckpt_iter{it:06d}.pt')
    config = root / 'tiny.py'
    # 10 images: too few for Task 3's k-NN halves, so eval.py runs Tasks 1-2
    config.write_text("clip_model = 'tiny-clip'\nclip_pretrained = ''\ndevice = 'cpu'\ndtype = "
                      "'float32'\nsample_batch_size = 5\neval_batch_size = 5\n"
                      "tasks = 'alignment,recall'\n")
    return data, root, str(config)


def sweep_cmd(data, root, config):
    """The grid on the held-out slice (the folder's last 3 rows), then the chosen cell on the whole
    folder."""
    return [sys.executable, SWEEP, config, f'--out_dir={root / "out"}', f'--val_data={data}',
            f'--train_data={data}', '--val_fraction=0.3',
            f"--ckpts=('{root / 'run'}/ckpt_iter*.pt',)", "--methods=('euler', 'midpoint')",
            '--steps=(2,)']


def mtimes(out):
    return {os.path.join(folder, path): os.stat(os.path.join(folder, path)).st_mtime_ns
            # a lock: no data
            for folder, _, files in os.walk(out / 'samples') for path in files if path != '.lock'}


def test_sweep_fills_the_grid_reuses_and_resumes(setup):
    data, root, config = setup
    out = root / 'out'
    first = out / 'samples' / 'ckpt_iter000010-euler2-cfg1-seed1337-holdout'
    proc = subprocess.Popen(sweep_cmd(data, root, config), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:  # kill the sweep and the stage it runs once the first cell is evaluated
        deadline = time.time() + 300
        while not os.path.exists(first / 'eval' / 'recall_summary.json'):
            assert proc.poll() is None and time.time() < deadline, \
                'the sweep died or stalled in its first cell'
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not os.path.exists(out / 'sweep.csv')
    before = os.stat(first / 'generated.npy').st_mtime_ns

    result = subprocess.run(sweep_cmd(data, root, config), cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert ('[1/4] ckpt_iter000010-euler2-cfg1-seed1337-holdout on the held-out slice of '
            'train_data: reused') in \
        result.stdout
    assert os.stat(first / 'generated.npy').st_mtime_ns == before
    rows = list(csv.DictReader(open(out / 'sweep.csv')))
    cells = [(r['split'], os.path.basename(r['checkpoint']), r['method'], r['steps'],
              r['model_calls']) for r in rows]
    table = json.load(open(out / 'sweep.json'))
    chosen = table['chosen'][0]
    assert cells[:4] == [('holdout', 'ckpt_iter000010.pt', 'euler', '2', '2'),
                         ('holdout', 'ckpt_iter000010.pt', 'midpoint', '2', '4'),
                         ('holdout', 'ckpt_iter000020.pt', 'euler', '2', '2'),
                         ('holdout', 'ckpt_iter000020.pt', 'midpoint', '2', '4')]
    # the chosen cell is the best on the held-out slice, and only it is evaluated on the reported
    # split
    best = max(rows[:4], key=lambda r: float(r['i2t_recall@5']))
    assert float(best['i2t_recall@5']) == chosen['i2t_recall@5']['mean'] == \
        table['ranking'][0]['i2t_recall@5']['mean']
    assert cells[4:] == [('val', os.path.basename(best['checkpoint']), best['method'], '2',
                          best['model_calls'])]
    for r in rows:
        for d in ('i2t', 't2i'):
            recall = [float(r[f'{d}_recall@{k}']) for k in (1, 5, 10)]
            assert 0 <= recall[0] <= recall[1] <= recall[2] <= 1
        assert -1 <= float(r['token_cosine_mean']) <= 1
        assert -1 <= float(r['alignment_mean_cosine_similarity']) <= 1
        summary = json.load(open(os.path.join(r['samples'], 'eval', 'recall_summary.json')))
        assert summary['checkpoint']['iter_num'] == int(r['iter_num'])
        assert summary['sampler']['sample_steps'] == 2
        assert (summary['num_images'],
                summary['holdout']) == ((3, True) if r['split'] == 'holdout' else (10, False))
    assert len(table['cells']) == 4 and table['grid']['methods'] == ['euler', 'midpoint']
    assert {'image_to_text',
            'text_to_image'} <= set(table['method_a']) <= set(table['method_a_reported'])
    assert os.path.getsize(out / 'sweep.png') > 1000

    # a second run: every cell is read back, no array is written again
    stamps = mtimes(out)
    again = subprocess.run(sweep_cmd(data, root, config), cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and again.stdout.count(': reused,') == 5, again.stdout[-2000:]
    assert mtimes(out) == stamps
    assert list(csv.DictReader(open(out / 'sweep.csv'))) == rows


def test_seeds_give_the_generator_spread_and_a_changed_checkpoint_stops_the_sweep(setup):
    data, root, config = setup
    cmd = [*sweep_cmd(data, root, config), f"--ckpts=('{root / 'run'}/ckpt_iter000010.pt',)",
           "--methods=('euler',)", '--seeds=(1, 2)', '--sweep_name=seeds']
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = json.load(open(root / 'out' / 'seeds.json'))
    cell = table['reported_over_seeds'][0]
    values = [r['token_cosine_mean'] for r in table['reported']]
    assert cell['seeds'] == [1, 2] and len(values) == 2 and values[0] != values[1]
    assert cell['token_cosine_mean']['min'] == min(values)
    assert cell['token_cosine_mean']['max'] == max(values)
    assert 'over seeds [1, 2]' in result.stdout
    # the same path, another checkpoint: sample.py refuses the old arrays, naming what changed
    path = root / 'run' / 'ckpt_iter000010.pt'
    saved = torch.load(path, weights_only=True)
    torch.save({**saved, 'ema': {k: v + 0.01 for k, v in saved['ema'].items()}}, str(path) + '.new')
    os.replace(str(path) + '.new', path)
    try:
        again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert again.returncode == 1 and "'checkpoint.weights'" in again.stderr, \
            again.stderr[-2000:]
    finally:
        torch.save(saved, path)


def cell_folder(path, recall_b, align_b):
    """A cell folder as sample.py and eval.py leave it, with the given method_b fields."""
    os.makedirs(path / 'eval')
    settings = {'checkpoint': 'run/ckpt.pt', 'iter_num': 5, 'sample_method': 'heun',
                'sample_steps': 3, 'sample_shift': 1.0, 'cfg_scale': 2.0, 'seed': 1}
    json.dump({'settings': settings, 'model_calls': 12}, open(path / 'generated.json', 'w'))
    json.dump({'method_a': {'image_to_text': {}}, 'method_b': recall_b},
              open(path / 'eval' / 'recall_summary.json', 'w'))
    json.dump({'method_b': align_b, 'correlation': 0.9,
               'token_fidelity': {'token_cosine_mean': 0.99}},
              open(path / 'eval' / 'alignment_summary.json', 'w'))
    return path


def test_table_reads_new_fields_generically(tmp_path):
    """Fields a newer eval.py adds (e.g. confidence intervals) become columns; an interval gives _lo
    and _hi."""
    recall = {d: {'recall@1': 0.1, 'recall@5': 0.5, 'recall@5_ci95': [0.4, 0.6]}
              for d in ('image_to_text', 'text_to_image')}
    align = {'mean_cosine_similarity': 0.3, 'mean_cosine_similarity_ci95': [0.25, 0.35],
             'std_cosine_similarity': 0.1}
    row, baseline = read_cell(str(cell_folder(tmp_path / 'cell', recall, align)))
    assert (row['iter_num'], row['method'], row['steps'], row['cfg_scale']) == (5, 'heun', 3, 2.0)
    assert row['model_calls'] == 12
    assert (row['i2t_recall@5'], row['i2t_recall@5_ci95_lo'], row['t2i_recall@5_ci95_hi']) == (0.5,
                                                                                               0.4,
                                                                                               0.6)
    assert (row['alignment_mean_cosine_similarity'],
            row['alignment_mean_cosine_similarity_ci95_lo']) == (0.3, 0.25)
    assert 'alignment_std_cosine_similarity' not in row and row['token_cosine_mean'] == 0.99
    assert baseline == {'image_to_text': {}}


def test_cells_ranked_by_a_task3_figure_in_its_direction(tmp_path):
    """select_metric may name B's headline figure in eval.py's fidelity_summary.json: lower first
    where the summary says lower is better (conditional MMD^2), higher first where it says higher;
    recall still ranks highest first."""
    recall = {d: {'recall@1': 0.2, 'recall@5': 0.5, 'recall@10': 0.7}
              for d in ('image_to_text', 'text_to_image')}
    rows = []
    for k, (mmd, r5) in enumerate([(0.3, 0.6), (0.1, 0.4), (0.2, 0.5)]):
        i2t = {**recall['image_to_text'], 'recall@5': r5}
        folder = cell_folder(tmp_path / f'cell{k}', {**recall, 'image_to_text': i2t},
                             {'mean_cosine_similarity': 0.3})
        headline = {'metric': 'conditional_mmd2', 'better': {'conditional_mmd2': 'lower'},
                    'columns': {'floor': {'value': 0.0, 'ci95': [-0.1, 0.1]},
                                'method_b': {'value': mmd, 'ci95': [mmd - 0.05, mmd + 0.05]}}}
        json.dump({'headline': headline}, open(folder / 'eval' / 'fidelity_summary.json', 'w'))
        row, _ = read_cell(str(folder))
        rows.append({**row, 'cfg_scale': float(k), 'seed': 1})  # three cells
    assert (rows[1]['conditional_mmd2'], rows[1]['conditional_mmd2_ci95_lo'],
            rows[1]['conditional_mmd2_better']) == (0.1, 0.05, 'lower')
    assert [e['cfg_scale'] for e in over_seeds(rows, 'conditional_mmd2')] == [1.0, 2.0, 0.0]
    assert [e['cfg_scale'] for e in over_seeds(rows, 'i2t_recall@5')] == [0.0, 2.0, 1.0]
    assert over_seeds(rows, 'conditional_mmd2')[0]['conditional_mmd2']['mean'] == 0.1
    with pytest.raises(SystemExit, match=r"select_metric='pooled_fd' is not a column of the table "
                                         r"nor a headline figure of .*cell0/eval/fidelity_summary"):
        over_seeds(rows, 'pooled_fd')
    # without true samples the headline is a set of figures, each in its own direction
    sets = cell_folder(tmp_path / 'sets', recall, {})
    figures = {m: {'value': v, 'ci95': [v, v]} for m, v in
               (('frechet_distance', 2.0), ('coverage', 0.8), ('recall', 0.9))}
    json.dump({'headline': {'metrics': list(figures), 'embedding': 'pooled',
                            'better': {'frechet_distance': 'lower', 'coverage': 'higher',
                                       'recall': 'higher'},
                            'columns': {'method_b': figures}}},
              open(sets / 'eval' / 'fidelity_summary.json', 'w'))
    row = read_cell(str(sets))[0]
    assert (row['frechet_distance'], row['frechet_distance_better'], row['coverage_better']) == \
        (2.0, 'lower', 'higher')
    # a cell that eval.py evaluated without Task 3 has no such columns; a bad headline is named
    assert 'conditional_mmd2' not in read_cell(str(cell_folder(tmp_path / 'old', recall, {})))[0]
    bad = cell_folder(tmp_path / 'bad', recall, {})
    json.dump({'headline': {'metric': 'conditional_mmd2', 'columns': {}}},
              open(bad / 'eval' / 'fidelity_summary.json', 'w'))
    with pytest.raises(SystemExit, match=r"bad/eval/fidelity_summary.json should hold B's figures "
                                         r"under headline.columns.method_b"):
        read_cell(str(bad))


def test_bad_grid_and_checkpoints_named(tmp_path):
    with pytest.raises(SystemExit,
                       match=r"methods should be a non-empty tuple of names in \('euler', 'heun', "
                                         r"'midpoint'\), got \('rk4',\)"):
        check_grid(('rk4',), (5,), (1.0,), (1.0,))
    with pytest.raises(SystemExit,
                       match=r"steps should be a non-empty tuple of positive ints, got \(0, 5\)"):
        check_grid(('euler',), (0, 5), (1.0,), (1.0,))
    with pytest.raises(SystemExit,
                       match=r"ckpts entry '.*ckpt_iter\*.pt' finds no checkpoint file"):
        find_checkpoints((str(tmp_path / 'ckpt_iter*.pt'),), str(tmp_path))
    for name in ('a', 'b'):
        os.makedirs(tmp_path / name)
        (tmp_path / name / 'ckpt.pt').write_bytes(b'')
    with pytest.raises(SystemExit, match=r"share file names \['ckpt'\]"):
        find_checkpoints((str(tmp_path / 'a' / 'ckpt.pt'), str(tmp_path / 'b' / 'ckpt.pt')),
                         str(tmp_path))
    assert find_checkpoints(('',), str(tmp_path / 'a')) == [str(tmp_path / 'a' / 'ckpt.pt')]
