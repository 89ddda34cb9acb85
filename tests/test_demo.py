"""The README's main job, shortened: extract -> train -> sample -> eval with config/demo.py, the
same entry points."""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT

# the demo trains its stand-in encoders for 600: 200 on 512 images is enough here
ENCODER_STEPS = 200


def run(script, *overrides):
    cmd = [sys.executable, script, 'config/demo.py', *overrides]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, \
        f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_demo_end_to_end_learns_and_reports_both_tasks(tmp_path):
    data, out = tmp_path / 'data', tmp_path / 'out'
    # command-line keys must exist in the stage
    folders = [f'--val_data={data}/val', f'--out_dir={out}']
    clip = f'--clip_pretrained={tmp_path}/tiny-clip.pt'
    run('extract.py', f'--data_dir={data}', "--synthetic_counts={'train': 512, 'val': 64}", clip,
        f'--eva_pretrained={tmp_path}/tiny-eva.pt', f'--train_encoder_steps={ENCODER_STEPS}')
    run('train.py', f'--train_data={data}/train', *folders, '--max_iters=150',
        '--eval_interval=150', '--warmup_iters=10', '--lr_decay_iters=150')
    run('sample.py', *folders, '--sample_batch_size=32')
    # the baselines beside B, as README's command makes them: ridge, and the same DiT trained by
    # plain regression
    run('ridge.py', f'--train_data={data}/train', *folders)
    run('train.py', f'--train_data={data}/train', *folders[:1], f'--out_dir={tmp_path}/regression',
        '--objective=regression', '--max_iters=150', '--eval_interval=150', '--warmup_iters=10',
        '--lr_decay_iters=150')
    run('sample.py', *folders, f'--ckpt_path={tmp_path}/regression/ckpt.pt',
        '--sample_batch_size=32')
    baselines = (f"--baselines=('{out}/samples/ridge/generated.npy', "
                 f"'{out}/samples/ckpt-regression/generated.npy')")
    printed = run('eval.py', *folders, f'--train_data={data}/train', clip, baselines)
    check_training(out)
    recall = check_summaries(data, out, printed)
    check_baselines(out, recall)
    check_fidelity(out)
    check_sweep(tmp_path, data, folders, out)


def check_training(out):
    """The EMA generation check improved over training."""
    evals = [r for r in map(json.loads, open(out / 'metrics.jsonl')) if r['kind'] == 'eval']
    untrained, trained = evals[0], evals[-1]
    assert (untrained['iter'], trained['iter']) == (0, 150)
    assert trained['gen_token_cosine'] > untrained['gen_token_cosine'] + 0.2, (untrained, trained)


def check_fidelity(out):
    """Task 3 ran by default: a headline of finite figures with B in it, and the floor (A's split
    half against the other half) has the real set's spread exactly."""
    [samples] = [f for f in os.listdir(out / 'samples') if f not in ('ridge', 'ckpt-regression')]
    summary = json.load(open(out / 'samples' / samples / 'eval' / 'fidelity_summary.json'))
    values = lambda block: ([block['value']] if 'value' in block else
                            [v for b in block.values() if isinstance(b, dict) for v in values(b)])
    headline = summary['headline']['columns']
    assert {'method_b', 'floor'} <= set(summary['pooled'])
    assert values(headline) and all(math.isfinite(v) for v in values(headline))
    for representation in ('pooled', 'tokens'):
        assert summary[representation]['floor']['variance_ratio']['value'] == \
            pytest.approx(1, abs=1e-12)


def check_summaries(data, out, printed):
    """The flow DiT's alignment and recall summaries and printed table; returns the recall."""
    # eval.py found the flow DiT's folder by itself, beside the baselines'
    [samples] = [f for f in os.listdir(out / 'samples') if f not in ('ridge', 'ckpt-regression')]
    alignment = json.load(open(out / 'samples' / samples / 'eval' / 'alignment_summary.json'))
    recall = json.load(open(out / 'samples' / samples / 'eval' / 'recall_summary.json'))
    # tiny CLIP: 32-d
    assert alignment['embedding_space'] == 32 and alignment['uses_visual_projection'] is True
    assert alignment['token_fidelity']['token_cosine_mean'] > 0.5
    assert 0 < alignment['correlation'] <= 1
    for method in ('method_a', 'method_b', 'reference', 'mean_tokens'):
        assert -1 <= alignment[method]['mean_cosine_similarity'] <= 1
        for direction in ('image_to_text', 'text_to_image'):
            r = [recall[method][direction][f'recall@{k}'] for k in (1, 5, 10)]
            assert 0 <= r[0] <= r[1] <= r[2] <= 1
    # the training set's mean tokens: one embedding for all 64 images, so text -> image is chance
    # exactly, even with the synthetic captions that many images share; image -> text ranks every
    # image's captions alike
    assert str(data / 'train') in alignment['mean_tokens_source']
    assert [recall['mean_tokens']['text_to_image'][f'recall@{k}'] for k in (1, 5, 10)] == \
        pytest.approx([1 / 64, 5 / 64, 10 / 64], rel=1e-12)
    assert recall['mean_tokens']['image_to_text']['recall@5'] < 0.2
    assert alignment['mean_tokens_fidelity']['mse_standardized'] > \
        alignment['token_fidelity']['mse_standardized']

    # the trained encoders make both tasks mean something (chance at R@5: 5/64 = 7.8%). Measured
    # with these settings for synthetic seeds 0 / 1 / 2 (one thread): R@5 image->text A 61.7 / 65.2
    # / 63.5%, R 67.5 / 61.7 / 65.6%; text->image A 48.3 / 47.5 / 47.3%, R 47.0 / 50.0 / 48.6%; B /
    # A at R@5, image->text 0.97 / 0.90 / 0.94 and text->image 0.90 / 0.95 / 0.95; per-pair
    # correlation of A and B 0.963 / 0.951 / 0.966; alignment mean A - B 0.005 / 0.007 / 0.008, B -
    # mean tokens 0.28 / 0.29 / 0.28
    a, b, r = recall['method_a'], recall['method_b'], recall['reference']
    for method in (a, r):
        assert method['image_to_text']['recall@5'] > 0.4
        assert method['text_to_image']['recall@5'] > 0.3
    for direction in ('image_to_text', 'text_to_image'):
        assert b[direction]['recall@5'] > 0.75 * a[direction]['recall@5'], (direction, a, b)
    assert alignment['correlation'] > 0.85
    cosine = {k: alignment[k]['mean_cosine_similarity']
              for k in ('method_a', 'method_b', 'mean_tokens')}
    assert abs(cosine['method_b'] - cosine['method_a']) < 0.03
    assert cosine['method_b'] > cosine['mean_tokens'] + 0.1
    # the printed table has all three methods and both tasks
    table = printed[printed.index('A real tokens'):]
    assert 'B generated' in table and 'R CLIP CLS' in table
    assert 'image->text R@1' in table and 'text->image R@10' in table
    assert alignment['generated'] == str(out / 'samples' / samples / 'generated.npy')
    assert alignment['checkpoint']['path'] == str(out / 'ckpt.pt')
    assert alignment['checkpoint']['iter_num'] == 150
    assert 'mean tokens' in table and 'B - A' in table
    return recall


def check_baselines(out, recall):
    """The ridge and regression baselines beside B."""
    # fitted and trained on the same rows, far above chance (R@5 5/64) in both directions
    assert set(recall['baselines']) == {'ridge', 'regression'}, recall['baselines'].keys()
    for label, baseline in recall['baselines'].items():
        for direction in ('image_to_text', 'text_to_image'):
            assert baseline[direction]['recall@5'] > 3 * 5 / 64, (label, direction, baseline)
        assert recall[f'b_minus_{label}']['image_to_text']['recall@5_difference_ci95'] is not None
    ridge = json.load(open(out / 'samples' / 'ridge' / 'generated.json'))
    # 0.2 of 512
    assert ridge['train_data']['holdout_start'] == 410
    assert ridge['train_data']['holdout_count'] == 102


def check_sweep(tmp_path, data, folders, out):
    """Selection on held-out rows: the grid runs on train's last 102 images, only the chosen cell
    on val."""
    # sweep.py hands its stages its config files: a second one points eval.py at this test's encoder
    encoders = tmp_path / 'encoders.py'
    encoders.write_text(f"clip_pretrained = '{tmp_path}/tiny-clip.pt'\n")
    printed = run('sweep.py', str(encoders), f'--train_data={data}/train', *folders,
                  "--methods=('midpoint',)", '--steps=(5,)', '--cfg_scales=(1.0, 2.0)',
                  f'--ckpts=("{out}/ckpt.pt",)', '--sweep_name=guidance')
    table = json.load(open(out / 'guidance.json'))
    assert table['grid_split'] == 'holdout'
    assert [r['split'] for r in table['cells']] == ['holdout', 'holdout']
    assert all(json.load(open(os.path.join(r['samples'], 'eval',
                                           'recall_summary.json')))['data']['start'] == 410
               for r in table['cells'])
    best = max(table['cells'], key=lambda r: r['i2t_recall@5'])
    assert [(r['split'], r['cfg_scale']) for r in table['reported']] == [('val', best['cfg_scale'])]
    assert 'chose 1 cell(s) by the held-out i2t_recall@5' in printed
