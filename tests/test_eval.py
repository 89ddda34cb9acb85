"""eval.py: method A against open_clip's own avg pooling, text features, end to end, bad input,
plots."""
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_data_folder, run_eval, write_generated
from eval import pool_project
from plots import plot_eval, plot_title

def test_method_a_is_open_clip_avg_pooling(tiny_clip):
    import open_clip
    torch.manual_seed(0)
    model = open_clip.create_model(tiny_clip).eval()  # pool_type 'tok': the CLIP extract.py runs
    avg = open_clip.create_model(tiny_clip + '-avg').eval()
    avg.load_state_dict(model.state_dict())  # same weights, only the pooling differs
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.visual.output_tokens = True
        cls, tokens = model.visual(images)  # tokens: after ln_post, CLS dropped, as in clip.npy
        a = pool_project(tokens, model.visual)
        expected = avg.encode_image(images, normalize=True)
    assert tokens.shape == (5, 16, 8)
    torch.testing.assert_close(a, expected, rtol=1e-5, atol=1e-6)
    # A is not the CLS embedding R
    assert not torch.allclose(a, F.normalize(cls, dim=-1), atol=1e-3)


def test_repeated_captions_get_identical_features(tiny_clip, tmp_path):
    # encoded in different batches, one string could round differently; encoded once, its copies tie
    # exactly
    import open_clip
    from eval import load_clip, text_features
    model, tokenizer = load_clip(tiny_clip, '', 'cpu')
    captions = ['a red circle', 'a blue square', 'two shapes', 'a red circle', 'a green triangle',
                'a red circle']
    feats = text_features(model, tokenizer, captions, str(tmp_path), tiny_clip, '', 2, 'cpu')
    assert feats.shape == (6, 6)
    assert np.array_equal(feats[0], feats[3])
    assert np.array_equal(feats[0], feats[5])
    assert not np.array_equal(feats[0], feats[1])
    with torch.no_grad():
        tokens = open_clip.get_tokenizer(tiny_clip)(['a blue square'])
        alone = F.normalize(model.encode_text(tokens), dim=-1)
    np.testing.assert_allclose(feats[1], alone[0].numpy(), atol=1e-6)


def load_summaries(out):
    with open(out / 'eval' / 'alignment_summary.json') as f, \
            open(out / 'eval' / 'recall_summary.json') as g:
        return json.load(f), json.load(g)


def check_header_and_fields(align, recall, train):
    """The summaries' common header, and every method's alignment and recall fields."""
    for s in (align, recall):
        assert s['embedding_space'] == 6 and s['uses_visual_projection'] is True
        assert s['num_images'] == 24 and s['num_captions'] == 8 * 1 + 8 * 5 + 8 * 7
        assert s['captions_per_image'] == {'min': 1, 'max': 7, 'mean': 104 / 24}
        assert s['bootstrap']['samples'] == 1000 and s['mean_tokens_source'].startswith(train)
    assert recall['ties'].startswith('never for the query')
    for m in ('method_a', 'method_b', 'reference', 'mean_tokens'):
        assert set(align[m]) == {'mean_cosine_similarity', 'std_cosine_similarity',
                                 'min_cosine_similarity',
                                 'max_cosine_similarity', 'mean_cosine_similarity_ci95'}
        stats = [align[m][f'{s}_cosine_similarity'] for s in ('min', 'mean', 'max')]
        assert -1 <= stats[0] <= stats[1] <= stats[2] <= 1
        lo, hi = align[m]['mean_cosine_similarity_ci95']
        assert stats[0] <= lo < stats[1] < hi <= stats[2]
        for d in ('image_to_text', 'text_to_image'):
            assert set(recall[m][d]) == {f'recall@{k}{s}' for k in (1, 5, 10)
                                         for s in ('', '_ci95')}
            r = recall[m][d]
            assert 0 <= r['recall@1'] <= r['recall@5'] <= r['recall@10'] <= 1
            for k in (1, 5, 10):
                lo, hi = recall[m][d][f'recall@{k}_ci95']
                assert 0 <= lo <= hi <= 1
                assert lo - 1e-12 <= recall[m][d][f"recall@{k}"] <= hi + 1e-12


def check_difference_and_token_fidelity(align, data):
    """B - A's alignment difference, and B's token fidelity against the noise it was given."""
    assert align['difference_mean'] == pytest.approx(
        align['method_b']['mean_cosine_similarity']
        - align['method_a']['mean_cosine_similarity'], abs=1e-9)
    lo, hi = align['difference_mean_ci95']
    assert lo < align['difference_mean'] < hi
    assert align['difference_std'] > 0 and -1 <= align['correlation'] < 1
    fid, mean_fid = align['token_fidelity'], align['mean_tokens_fidelity']
    keys = {f'{k}_{s}' for k in ('token_cosine', 'token_cosine_standardized',
                                 'image_vector_cosine')
            for s in ('mean', 'std')} | {'mse_standardized'}
    assert set(fid) == keys and set(mean_fid) == keys
    assert 0 < fid['token_cosine_mean'] < 1 and 0 < fid['image_vector_cosine_mean'] < 1
    # offsets no longer help
    assert 0 < fid['token_cosine_standardized_mean'] < fid['token_cosine_mean']
    # the noise is 0.5 per channel, so the standardized MSE is 0.25 / std^2 averaged over channels
    meta = json.load(open(os.path.join(data, 'meta.json')))
    expected_mse = np.mean(0.25 / np.square(meta['clip_std']))
    assert fid['mse_standardized'] == pytest.approx(expected_mse, rel=0.1)


def check_mean_tokens(align, recall, out, train):
    """The mean tokens: the train folder's per-position mean; a constant, so its recall is chance
    exactly."""
    fid, mean_fid = align['token_fidelity'], align['mean_tokens_fidelity']
    detailed = np.load(out / 'eval' / 'alignment_detailed.npz')
    train_mean = np.load(os.path.join(train, 'clip.npy')).astype(np.float64).mean(0)
    np.testing.assert_allclose(detailed['mean_tokens'], train_mean, rtol=1e-6, atol=1e-6)
    assert (abs(mean_fid['token_cosine_standardized_mean']) < 0.2
            < fid['token_cosine_standardized_mean'])
    assert mean_fid['mse_standardized'] > 0.9 > fid['mse_standardized']
    assert mean_fid['image_vector_cosine_std'] > 0
    text_image = detailed['text_image']
    # every image ranks them alike
    best_captions = np.argsort(-detailed['similarity_m'], kind='stable')
    mean_recall = recall['mean_tokens']
    for k in (1, 5, 10):
        assert mean_recall['text_to_image'][f'recall@{k}'] == pytest.approx(k / 24, rel=1e-12)
        assert mean_recall['text_to_image'][f'recall@{k}_ci95'] == pytest.approx([k / 24] * 2,
                                                                                 rel=1e-12)
        distinct = len(set(text_image[best_captions[:k]]))
        assert mean_recall['image_to_text'][f'recall@{k}'] == pytest.approx(distinct / 24,
                                                                            rel=1e-12)


def check_recall_difference(recall):
    """B - A's recall difference per direction and K, with its interval and relative change."""
    for d in ('image_to_text', 'text_to_image'):
        diff = recall['difference'][d]
        for k in (1, 5, 10):
            a, b = recall['method_a'][d][f'recall@{k}'], recall['method_b'][d][f'recall@{k}']
            assert diff[f'recall@{k}_difference'] == pytest.approx(b - a)
            lo, hi = diff[f'recall@{k}_difference_ci95']
            assert -1 <= lo <= b - a <= hi <= 1
            assert diff[f'recall@{k}_relative_change'] == (pytest.approx(100 * (b - a) / a)
                                                           if a else None)


def check_detailed_plots_and_table(out, data, recall, printed):
    """The detailed arrays, the figures (or the note without matplotlib), the printed table and
    the text-feature cache."""
    detailed = np.load(out / 'eval' / 'alignment_detailed.npz')
    assert detailed['similarity_a'].shape == (104,)
    assert detailed['image_embedding_b'].shape == (24, 6)
    assert np.load(out / 'eval' / 'recall_detailed.npz')['rank_text_to_image_r'].shape == (104,)
    if importlib.util.find_spec('matplotlib'):  # an optional dependency
        for png in ('alignment_hist.png', 'alignment_scatter.png', 'recall.png'):
            assert os.path.getsize(out / 'eval' / png) > 1000
    else:
        assert 'plots: matplotlib not installed, skipped' in printed
    table = printed[printed.index('A real tokens'):]
    assert 'image->text R@1' in table
    assert 'B generated' in table
    assert 'mean tokens' in table
    assert 'B - A' in table
    r5 = recall['method_b']['image_to_text']
    assert (f"{100 * r5['recall@5']:.1f}% [{100 * r5['recall@5_ci95'][0]:.1f}, "
            f"{100 * r5['recall@5_ci95'][1]:.1f}]") in table
    cache = [f for f in os.listdir(data)
             if f.startswith('text_features_eval-test-tiny-clip_random_')]
    assert len(cache) == 2  # the .npy and its key .json


def check_b_is_a(align2, recall2, align, out, train):
    """The real tokens fed as generated: B is A exactly; mean_tokens_rows=7 takes 7 rows."""
    assert align2['method_b'] == align2['method_a'] and align2['method_a'] == align['method_a']
    assert align2['difference_mean'] == 0 and align2['difference_std'] == 0
    assert align2['difference_mean_ci95'] == [0, 0]
    assert align2['correlation'] == pytest.approx(1.0, abs=1e-12)
    assert align2['token_fidelity']['token_cosine_mean'] == pytest.approx(1.0, abs=1e-6)
    assert align2['token_fidelity']['token_cosine_standardized_mean'] == pytest.approx(1.0,
                                                                                       abs=1e-6)
    assert align2['token_fidelity']['mse_standardized'] == 0
    assert recall2['method_b'] == recall2['method_a']
    assert all(v == 0 for d in recall2['difference'].values() for k, v in d.items()
               if k.endswith('_difference'))
    assert all(v == [0, 0] for d in recall2['difference'].values() for k, v in d.items()
               if k.endswith('_ci95'))
    assert '7 rows' in align2['mean_tokens_source']
    # 7 evenly spaced rows of 30
    rows = np.load(os.path.join(train, 'clip.npy'))[[0, 4, 8, 12, 17, 21, 25]]
    np.testing.assert_allclose(np.load(out / 'eval' / 'alignment_detailed.npz')['mean_tokens'],
                               rows.astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)


def test_end_to_end_writes_every_field(eval_setup, monkeypatch, capsys):
    data, out, args = eval_setup
    clip = np.load(os.path.join(data, 'clip.npy'))
    train = make_data_folder(str(out.parent / 'train'), n=30, tokens=16, clip_dim=8, embed_dim=6,
                             seed=1)
    os.makedirs(out)
    noisy = clip.astype(np.float32) + np.random.default_rng(0).normal(0, 0.5, clip.shape)
    write_generated(out / 'generated.npy', noisy)
    run_eval(monkeypatch, *args, f'--generated={out / "generated.npy"}', '--save_detailed=True',
             f'--train_data={train}')
    align, recall = load_summaries(out)
    check_header_and_fields(align, recall, train)
    check_difference_and_token_fidelity(align, data)
    check_mean_tokens(align, recall, out, train)
    check_recall_difference(recall)
    check_detailed_plots_and_table(out, data, recall, capsys.readouterr().out)
    # Task 3 runs by default, beside alignment and recall
    assert os.path.exists(out / 'eval' / 'fidelity_summary.json')

    # the real tokens fed as generated: B is A exactly; the cached text features are reused
    write_generated(out / 'generated.npy', clip)
    run_eval(monkeypatch, *args, f'--generated={out / "generated.npy"}', f'--train_data={train}',
             '--mean_tokens_rows=7',
             '--save_detailed=True')
    align2, recall2 = load_summaries(out)
    assert 'text features: cached' in capsys.readouterr().out
    check_b_is_a(align2, recall2, align, out, train)


def test_without_generated_reports_the_clip_baseline(eval_setup, monkeypatch, capsys):
    data, out, args = eval_setup
    run_eval(monkeypatch, *args, '--tasks=recall,alignment', '--k_values=(1, 3)',
             '--bootstrap_samples=0')
    align, recall = load_summaries(out)
    assert align['method_b'] is None
    assert align['difference_mean'] is None
    assert align['token_fidelity'] is None
    assert recall['method_b'] is None and recall['difference'] is None
    assert set(recall['method_a']['image_to_text']) == {'recall@1', 'recall@3', 'recall@1_ci95',
                                                        'recall@3_ci95'}
    assert recall['method_a']['image_to_text']['recall@3_ci95'] is None
    assert recall['bootstrap'] is None
    assert align['generated'] is None
    assert (align['method_a']['mean_cosine_similarity']
            != align['reference']['mean_cosine_similarity'])
    # no train folder: the mean tokens fall back to the evaluated folder's per-channel mean, still
    # at chance
    assert 'meta.json clip_mean' in align['mean_tokens_source']
    assert recall['mean_tokens']['text_to_image'] == {'recall@1': pytest.approx(1 / 24),
                                                      'recall@1_ci95': None,
                                                      'recall@3': pytest.approx(3 / 24),
                                                      'recall@3_ci95': None}
    table = capsys.readouterr().out.split('A real tokens')[1]
    assert 'mean tokens' in table and 'B - A' not in table and '[' not in table


def test_bad_generated_shape_count_and_values(eval_setup, monkeypatch):
    data, out, args = eval_setup
    args = [*args, f'--generated={out / "generated.npy"}']
    os.makedirs(out)
    clip = np.load(os.path.join(data, 'clip.npy'))
    write_generated(out / 'generated.npy', clip[:20])
    with pytest.raises(SystemExit, match=r"generated.npy has shape \[20, 16, 8\].*\[24, 16, 8\]"):
        run_eval(monkeypatch, *args)
    bad = clip.astype(np.float32)
    bad[13, 2, :3] = np.nan
    write_generated(out / 'generated.npy', bad)
    with pytest.raises(SystemExit, match=r"generated.npy row 13 has 3 non-finite values"):
        run_eval(monkeypatch, *args)
    with pytest.raises(SystemExit, match=r"generated='nowhere.npy' not found"):
        run_eval(monkeypatch, *args, '--generated=nowhere.npy')
    write_generated(out / 'generated.npy', clip)
    os.truncate(out / 'generated.npy', 1000)  # a copy cut short
    with pytest.raises(SystemExit,
                       match=r"generated.npy is truncated or corrupt: expected 6,272 bytes "
                                         r"\(float16 \[24, 16, 8\]\), the file has 1,000 bytes"):
        run_eval(monkeypatch, *args)


def test_images_without_captions_named(eval_setup, monkeypatch):
    data, out, args = eval_setup
    path = os.path.join(data, 'captions.json')
    captions = json.load(open(path))
    captions['105'] = []
    del captions['110']
    json.dump(captions, open(path, 'w'))
    with pytest.raises(SystemExit, match=r"captions.json has no captions for 2 of 24 images "
                                         r"\(image ids \[105, 110\]"):
        run_eval(monkeypatch, *args)


def test_clip_model_that_does_not_fit_the_data(tmp_path, tiny_clip, monkeypatch):
    data = make_data_folder(str(tmp_path / 'data'), n=4, tokens=16, clip_dim=12, embed_dim=6)
    with pytest.raises(SystemExit, match=r"projects 8 -> 6, but .* token dim 12"):
        # 4 images: too few for Task 3's k-NN halves, so Tasks 1-2 only
        run_eval(monkeypatch, f'--val_data={data}', f'--out_dir={tmp_path}',
                 f'--clip_model={tiny_clip}', '--clip_pretrained=', '--tasks=alignment,recall')


def test_default_finds_what_sample_py_wrote_and_names_its_maker(eval_setup, monkeypatch):
    """With no --generated, eval.py takes the flow DiT's samples folder finished last in
    out_dir/samples for the target (val or held-out), writes its summaries there, and records the
    checkpoint and the sampler."""
    data_dir, out, args = eval_setup
    settings = {'checkpoint': str(out / 'ckpt.pt'), 'iter_num': 800, 'use_ema': True,
                'sample_method': 'heun',
                'sample_steps': 5, 'sample_shift': 1.0, 'cfg_scale': 1.0, 'seed': 1337}
    folders = []
    for method, name in (('flow', 'ckpt-heun5-cfg1-seed1337'),
                         ('flow', 'ckpt-euler5-cfg1-seed1337'),
                         ('ridge', 'ridge'), ('flow', 'ckpt-euler5-cfg1-seed1337-holdout')):
        folder = out / 'samples' / name
        os.makedirs(folder)
        write_generated(folder / 'generated.npy', np.load(os.path.join(data_dir, 'clip.npy')))
        with open(folder / 'generated.json', 'w') as f:
            json.dump({'settings': settings, 'model_calls': 10, 'method': method}, f)
        folders.append(folder)
        time.sleep(0.01)  # distinct modification times: the newest is the last one finished
    # heun finished after euler: it is the last flow samples for val
    os.utime(folders[0] / 'generated.json')
    run_eval(monkeypatch, *args)
    align, recall = load_summaries(folders[0])
    assert not os.path.exists(out / 'eval') and not os.path.exists(folders[1] / 'eval')
    for s in (align, recall):
        assert s['generated'] == str(folders[0] / 'generated.npy') and s['model_calls'] == 10
        assert s['checkpoint'] == {'path': str(out / 'ckpt.pt'), 'iter_num': 800, 'use_ema': True}
        assert s['sampler'] == {'sample_method': 'heun', 'sample_steps': 5, 'sample_shift': 1.0,
                                'cfg_scale': 1.0,
                                'seed': 1337}
    assert recall['method_b'] == recall['method_a']
    for folder in folders:
        shutil.rmtree(folder)


@pytest.mark.parametrize('value, expected', [
    # not letters
    ('a red circle',
     r"image 105: expected a non-empty list of caption strings, got str 'a red circle'"),
    (['a red circle', 7], r"image 105: expected non-blank caption strings, got int 7"),
    (['a red circle', '  '], r"image 105: expected non-blank caption strings, got str '  '"),
    ([], r"no captions for 1 of 24 images \(image ids \[105\]\); every image needs at least one: "
         r"expected a non-empty list of caption strings, got \[\] for 105"),
])
def test_bad_captions_named(eval_setup, monkeypatch, value, expected):
    data, out, args = eval_setup
    path = os.path.join(data, 'captions.json')
    captions = json.load(open(path))
    captions['105'] = value
    json.dump(captions, open(path, 'w'))
    with pytest.raises(SystemExit, match=re.escape(path) + r'.*' + expected):
        run_eval(monkeypatch, *args)


def write_info(npy_path, info):
    with open(str(npy_path)[:-len('.npy')] + '.json', 'w') as f:
        json.dump(info, f)


def test_token_fidelity_in_the_dits_units(eval_setup, monkeypatch, capsys):
    """Standardized fidelity uses generated.json's data_stats, else train_data's meta.json, else
    val_data's (noted)."""
    data, out, args = eval_setup
    train = make_data_folder(str(out.parent / 'train'), n=30, tokens=16, clip_dim=8, embed_dim=6,
                             seed=1)
    os.makedirs(out)
    clip = np.load(os.path.join(data, 'clip.npy')).astype(np.float32)
    noisy = clip + np.random.default_rng(0).normal(0, 0.5, clip.shape)
    write_generated(out / 'generated.npy', noisy)
    args = [*args, f'--generated={out / "generated.npy"}', '--tasks=alignment',
            '--bootstrap_samples=0']
    write_info(out / 'generated.npy', {'data_stats': {'clip_mean': [0.0] * 8, 'clip_std': [1.0] * 8,
                                                      'source': 'identity stats'}})
    run_eval(monkeypatch, *args, f'--train_data={train}')
    align = json.load(open(out / 'eval' / 'alignment_summary.json'))
    assert 'identity stats' in align['token_fidelity_stats']
    assert 'generated.json' in align['token_fidelity_stats']
    fid = align['token_fidelity']
    assert fid['token_cosine_standardized_mean'] == pytest.approx(fid['token_cosine_mean'],
                                                                  abs=1e-6)
    os.remove(out / 'generated.json')
    run_eval(monkeypatch, *args, f'--train_data={train}')  # the training folder's
    train_align = json.load(open(out / 'eval' / 'alignment_summary.json'))
    assert train_align['token_fidelity_stats'].startswith(os.path.join(train, 'meta.json'))
    train_std = np.array(json.load(open(os.path.join(train, 'meta.json')))['clip_std'])
    assert train_align['token_fidelity']['mse_standardized'] == pytest.approx(
        np.mean(0.25 / train_std ** 2), rel=0.1)
    run_eval(monkeypatch, *args)  # no training folder: the evaluated one's, with a note
    val_align = json.load(open(out / 'eval' / 'alignment_summary.json'))
    assert val_align['token_fidelity_stats'].startswith(os.path.join(data, 'meta.json'))
    assert 'note: token fidelity is standardized with' in capsys.readouterr().out
    cosines = [s['token_fidelity']['token_cosine_standardized_mean'] for s in (align, train_align,
                                                                               val_align)]
    assert len(set(cosines)) == 3  # the standardized cosine depends on the statistics used
    assert (align['token_fidelity']['token_cosine_mean']
            == val_align['token_fidelity']['token_cosine_mean'])
    write_info(out / 'generated.npy', {'data_stats': {'clip_mean': [0.0] * 7,
                                                      'clip_std': [1.0] * 8}})
    with pytest.raises(SystemExit, match=r"generated.json: clip_mean and clip_std should be 8 "
                                         r"numbers each .* got 7 values and 8 values"):
        run_eval(monkeypatch, *args)


def test_baselines_beside_b(eval_setup, monkeypatch, capsys):
    data, out, args = eval_setup
    clip = np.load(os.path.join(data, 'clip.npy')).astype(np.float32)
    rng = np.random.default_rng(0)
    with open(os.path.join(data, 'meta.json'), 'rb') as f:
        ours = {'folder': data, 'id': hashlib.sha1(f.read()).hexdigest(), 'start': 0, 'count': 24}
    arrays = {'b': clip + rng.normal(0, 0.5, clip.shape), 'noisier': clip + rng.normal(0, 1.5,
                                                                                       clip.shape)}
    arrays['twin'], arrays['other'], arrays['slice'] = arrays['b'], clip, clip
    # twin: no 'data'
    infos = {'b': {'data': ours}, 'noisier': {'label': 'noisier', 'data': ours}, 'twin': {},
             'other': {'label': 'other', 'data': {**ours, 'id': 'another-extraction'}},
             'slice': {'label': 'slice', 'data': {**ours, 'start': 4, 'count': 20}}}
    for name, array in arrays.items():
        os.makedirs(out / name)
        write_generated(out / name / 'generated.npy', array)
        write_info(out / name / 'generated.npy', infos[name])
    baselines = tuple(str(out / n / 'generated.npy') for n in ('noisier', 'twin', 'other', 'slice'))
    run_eval(monkeypatch, *args, f'--generated={out / "b" / "generated.npy"}',
             f'--baselines={baselines!r}')
    align, recall = load_summaries(out / 'b')
    printed = capsys.readouterr().out
    assert "baseline 'twin'" in printed and "has no 'data'" in printed  # compared on its shape only
    assert (f"baseline 'other' ({baselines[2]}) skipped: made for {data} (id another-extraction, "
            f"rows 0 + 24), the evaluated data is {data} (id {ours['id']}, rows 0 + 24)"
            in printed)
    assert "baseline 'slice'" in printed and "rows 4 + 20" in printed
    for s in (align, recall):
        assert set(s['baselines']) == {'noisier', 'twin'}
        assert s['baselines_skipped'] == list(baselines[2:])
    # the same array as B gets B's numbers exactly, and a zero paired difference
    twin = {k: v for k, v in recall['baselines']['twin'].items() if k != 'generated'}
    assert twin == recall['method_b'] and recall['baselines']['twin']['generated'] == baselines[1]
    assert {k: align['baselines']['twin'][k] for k in align['method_b']} == align['method_b']
    assert align['baselines']['twin']['token_fidelity'] == align['token_fidelity']
    assert align['baselines']['twin']['correlation'] == align['correlation']
    assert align['b_minus_twin'] == {'difference_mean': 0, 'difference_mean_ci95': [0, 0],
                                     'difference_std': 0}
    assert all(v == 0 for d in recall['b_minus_twin'].values() for k, v in d.items()
               if k.endswith('_difference'))
    assert all(v == [0, 0] for d in recall['b_minus_twin'].values() for k, v in d.items()
               if k.endswith('_ci95'))
    # a worse baseline: its own rows, and B - baseline with paired intervals
    noisier, b = align['baselines']['noisier'], align['method_b']
    assert (noisier['token_fidelity']['mse_standardized']
            > align['token_fidelity']['mse_standardized'])
    diff = align['b_minus_noisier']
    assert diff['difference_mean'] == pytest.approx(b['mean_cosine_similarity']
                                                    - noisier['mean_cosine_similarity'])
    lo, hi = diff['difference_mean_ci95']
    assert lo < diff['difference_mean'] < hi
    for d in ('image_to_text', 'text_to_image'):
        for k in (1, 5, 10):
            x = recall['method_b'][d][f'recall@{k}']
            y = recall['baselines']['noisier'][d][f'recall@{k}']
            lo, hi = recall['b_minus_noisier'][d][f'recall@{k}_difference_ci95']
            assert recall['b_minus_noisier'][d][f'recall@{k}_difference'] == pytest.approx(x - y)
            assert lo - 1e-12 <= x - y <= hi + 1e-12
            lo, hi = recall['baselines']['noisier'][d][f'recall@{k}_ci95']
            assert lo - 1e-12 <= y <= hi + 1e-12
    table = printed[printed.index('A real tokens'):]
    assert 'noisier' in table
    assert 'B - noisier' in table
    assert 'B - twin' in table
    assert 'B - A' in table
    assert 'B - A, B - noisier, B - twin paired' in table
    # the evaluated array itself made for other rows is an error, not a skip
    write_info(out / 'b' / 'generated.npy', infos['other'])
    with pytest.raises(SystemExit,
                       match=r"b/generated.json says it was made for .* \(id another-extraction"):
        run_eval(monkeypatch, *args, f'--generated={out / "b" / "generated.npy"}')


def test_plots_are_titled_with_the_rows_checkpoint_and_sampler(tmp_path):
    common = {'val_data': '/d/train', 'data': {'start': 1600, 'count': 400}, 'holdout': True,
              'generated': '/o/g.npy',
              'checkpoint': {'path': '/o/demo/ckpt_iter000800.pt', 'iter_num': 800,
                             'use_ema': True},
              'sampler': {'sample_method': 'midpoint', 'sample_steps': 5, 'sample_shift': 1.0,
                          'cfg_scale': 2.0, 'seed': 1337}, 'model_calls': 20, 'sampling': {}}
    assert plot_title(common) == ('/d/train: held-out rows 1600-1999\nB: demo/ckpt_iter000800, '
                                  'iteration 800, EMA weights\nmidpoint 5 steps, cfg 2, seed 1337 '
                                  '(20 model calls)')
    regression = {**common, 'holdout': False, 'sampler': dict.fromkeys(common['sampler'])}
    assert plot_title(regression).endswith('(not the held-out slice)\nB: demo/ckpt_iter000800, '
                                           'iteration 800, EMA weights\nregression: one forward '
                                           'pass')
    ridge = {**common, 'checkpoint': dict.fromkeys(common['checkpoint']),
             'sampling': {'label': 'ridge'}}
    assert plot_title(ridge).endswith('\nB: /o/g.npy\nridge')
    assert plot_title({**common,
                       'generated': None}).endswith('\nno generated array: the CLIP baseline only')
    if importlib.util.find_spec('matplotlib'):  # an optional dependency
        sims = {m: np.random.default_rng(0).uniform(-1, 1, 50) for m in ('a', 'b',
                                                                         'baseline_ridge')}
        recalls = {m: {d: {1: 0.2, 5: 0.5} for d in ('image_to_text',
                                                     'text_to_image')} for m in sims}
        intervals = {(m, d, k): [0.9 * v, min(1, 1.1 * v)] for m, r in recalls.items() for d,
                     by_k in r.items()
                     for k, v in by_k.items()}
        labels = {'a': 'A', 'b': 'B', 'baseline_ridge': 'ridge'}
        plot_eval(str(tmp_path), sims, recalls, intervals, (1, 5), labels, common)
        assert sorted(os.listdir(tmp_path)) == ['alignment_hist.png', 'alignment_scatter.png',
                                                'recall.png']


def test_plots_skip_without_matplotlib(tmp_path, monkeypatch, capsys):
    import plots
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # import matplotlib raises ImportError
    assert plots.pyplot() is None
    plots.plot_eval(str(tmp_path), {'a': np.zeros(3)}, {}, {}, (1,), {'a': 'A'}, {})
    assert 'plots: matplotlib not installed, skipped' in capsys.readouterr().out
    assert os.listdir(tmp_path) == []
