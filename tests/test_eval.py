"""eval.py: recall on hand-built embeddings, method A against open_clip's own avg pooling, end to end, bad input."""
import ast
import importlib.util
import json
import os
import runpy
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import flow
from conftest import ROOT, make_data_folder
from eval import pool_project, recall_at_k, retrieval_ranks

EVAL = os.path.join(ROOT, 'eval.py')
# A tiny CLIP: 16 tokens of width 8 (4x4 patches of a 16 px image), joint space 6, one layer per tower.
TINY_CLIP = {'embed_dim': 6, 'quick_gelu': True,
             'vision_cfg': {'image_size': 16, 'layers': 1, 'width': 8, 'head_width': 8, 'patch_size': 4},
             'text_cfg': {'context_length': 16, 'vocab_size': 49408, 'width': 8, 'heads': 1, 'layers': 1}}


@pytest.fixture(scope='module')
def tiny_clip(tmp_path_factory):
    """Register eval-test-tiny-clip (and its pool_type='avg' twin) with open_clip; return the name."""
    import open_clip
    folder = tmp_path_factory.mktemp('encoders')
    avg = json.loads(json.dumps(TINY_CLIP))
    avg['vision_cfg']['pool_type'] = 'avg'
    for name, cfg in [('eval-test-tiny-clip', TINY_CLIP), ('eval-test-tiny-clip-avg', avg)]:
        with open(folder / f'{name}.json', 'w') as f:
            json.dump(cfg, f)
    open_clip.add_model_config(str(folder))
    return 'eval-test-tiny-clip'


def naive_recall(image_emb, text_emb, text_image, k_values):
    """CLIP_benchmark's way: the full score matrix, top-K indices, membership."""
    scores = image_emb @ text_emb.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[text_image, torch.arange(len(text_image))] = True
    out = {'image_to_text': {}, 'text_to_image': {}}
    for k in k_values:
        top_t = scores.topk(min(k, scores.shape[1]), dim=1).indices
        out['image_to_text'][k] = positive.gather(1, top_t).any(1).float().mean().item()
        top_i = scores.T.topk(min(k, scores.shape[0]), dim=1).indices
        out['text_to_image'][k] = (top_i == text_image[:, None]).any(1).float().mean().item()
    return out


def test_recall_hand_built_known_answers():
    # images 0, 1, 2 own 1, 5 and 7 captions; identity image vectors make text_emb[t] the scores of caption t
    scores = torch.tensor([
        # t0   t1    t2   t3    t4   t5   t6   t7   t8   t9   t10  t11  t12
        [0.5, 0.9, 0.1, 0.1, 0.1, 0.1, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],     # own t0 = 0.5: t1, t6 beat it -> rank 2
        [0.2, 0.95, 0.3, 0.3, 0.3, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2],    # best own t1 = 0.95 is the top -> rank 0
        [0.7, 0.75, 0.8, 0.85, 0.9, 0.1, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])  # best own 0.6: t0..t4 beat it -> rank 5
    text_image = torch.tensor([0] + [1] * 5 + [2] * 7)
    i2t, t2i = retrieval_ranks(torch.eye(3), scores.T, text_image, chunk_size=2)
    assert i2t.tolist() == [2, 0, 5]
    assert t2i.tolist() == [1, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0]
    r = recall_at_k(torch.eye(3), scores.T, text_image, k_values=(1, 2, 3, 5, 6, 10))
    assert r['image_to_text'] == pytest.approx({1: 1 / 3, 2: 1 / 3, 3: 2 / 3, 5: 2 / 3, 6: 1.0, 10: 1.0})
    assert r['text_to_image'] == pytest.approx({1: 8 / 13, 2: 1.0, 3: 1.0, 5: 1.0, 6: 1.0, 10: 1.0})
    # captions in any order (not grouped by image) give the same answers
    perm = torch.randperm(13, generator=torch.Generator().manual_seed(0))
    assert recall_at_k(torch.eye(3), scores.T[perm], text_image[perm], (1, 2, 3, 5, 6, 10)) == r


@pytest.mark.parametrize('chunk_size', [None, 1, 7])
def test_recall_matches_naive_full_matrix(chunk_size):
    g = torch.Generator().manual_seed(1)
    counts = torch.randint(1, 8, (60,), generator=g)  # 1 to 7 captions per image
    text_image = torch.repeat_interleave(torch.arange(60), counts)
    text_image = text_image[torch.randperm(len(text_image), generator=g)]
    images = F.normalize(torch.randn(60, 16, generator=g), dim=-1)
    texts = F.normalize(images[text_image] + 1.2 * torch.randn(len(text_image), 16, generator=g), dim=-1)
    k_values = (1, 5, 10, 50)
    got = recall_at_k(images, texts, text_image, k_values, chunk_size=chunk_size)
    naive = naive_recall(images, texts, text_image, k_values)
    for d in ('image_to_text', 'text_to_image'):
        assert got[d] == pytest.approx(naive[d])
    assert 0 < got['image_to_text'][1] < got['image_to_text'][10] < 1  # the data is neither trivial nor hopeless
    assert 0 < got['text_to_image'][1] < got['text_to_image'][10] < 1


def test_recall_rejects_images_without_captions():
    with pytest.raises(ValueError, match='1 of 3 images have no caption'):
        recall_at_k(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 2]))


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
    assert not torch.allclose(a, F.normalize(cls, dim=-1), atol=1e-3)  # A is not the CLS embedding R


def run_eval(monkeypatch, *args):
    monkeypatch.setattr(sys, 'argv', ['eval.py', *args])
    runpy.run_path(EVAL, run_name='__main__')


@pytest.fixture
def eval_setup(tmp_path, tiny_clip):
    """A data folder shaped like the tiny CLIP (16 tokens x 8, joint space 6) and an out_dir."""
    data = make_data_folder(str(tmp_path / 'data'), n=24, tokens=16, clip_dim=8, embed_dim=6)
    args = [f'--val_data={data}', f'--out_dir={tmp_path / "out"}', f'--clip_model={tiny_clip}',
            '--clip_pretrained=', '--eval_batch_size=5']
    return data, tmp_path / 'out', args


def write_generated(path, array):
    out = np.lib.format.open_memmap(str(path), mode='w+', dtype=np.float16, shape=array.shape)
    out[:] = array
    out.flush()


def load_summaries(out):
    with open(out / 'eval' / 'alignment_summary.json') as f, open(out / 'eval' / 'recall_summary.json') as g:
        return json.load(f), json.load(g)


def test_end_to_end_writes_every_field(eval_setup, monkeypatch, capsys):
    data, out, args = eval_setup
    clip = np.load(os.path.join(data, 'clip.npy'))
    os.makedirs(out)
    noisy = clip.astype(np.float32) + np.random.default_rng(0).normal(0, 0.5, clip.shape)
    write_generated(out / 'generated.npy', noisy)
    run_eval(monkeypatch, *args, f'--generated={out / "generated.npy"}', '--save_detailed=True')
    align, recall = load_summaries(out)
    for s in (align, recall):
        assert s['embedding_space'] == 6 and s['uses_visual_projection'] is True
        assert s['num_images'] == 24 and s['num_captions'] == 8 * 1 + 8 * 5 + 8 * 7
        assert s['captions_per_image'] == {'min': 1, 'max': 7, 'mean': 104 / 24}
    for m in ('method_a', 'method_b', 'reference'):
        assert set(align[m]) == {'mean_cosine_similarity', 'std_cosine_similarity', 'min_cosine_similarity',
                                 'max_cosine_similarity'}
        stats = [align[m][f'{s}_cosine_similarity'] for s in ('min', 'mean', 'max')]
        assert -1 <= stats[0] <= stats[1] <= stats[2] <= 1
        for d in ('image_to_text', 'text_to_image'):
            assert set(recall[m][d]) == {'recall@1', 'recall@5', 'recall@10'}
            assert 0 <= recall[m][d]['recall@1'] <= recall[m][d]['recall@5'] <= recall[m][d]['recall@10'] <= 1
    assert align['difference_mean'] == pytest.approx(align['method_b']['mean_cosine_similarity']
                                                     - align['method_a']['mean_cosine_similarity'], abs=1e-9)
    assert align['difference_std'] > 0 and -1 <= align['correlation'] < 1
    fid = align['token_fidelity']
    assert set(fid) == {'token_cosine_mean', 'token_cosine_std', 'image_vector_cosine_mean',
                        'image_vector_cosine_std', 'mse_standardized'}
    assert 0 < fid['token_cosine_mean'] < 1 and 0 < fid['image_vector_cosine_mean'] < 1
    # the noise is 0.5 per channel, so the standardized MSE is 0.25 / std^2 averaged over channels
    meta = json.load(open(os.path.join(data, 'meta.json')))
    expected_mse = np.mean(0.25 / np.square(meta['clip_std']))
    assert fid['mse_standardized'] == pytest.approx(expected_mse, rel=0.1)
    for d in ('image_to_text', 'text_to_image'):
        diff = recall['difference'][d]
        for k in (1, 5, 10):
            a, b = recall['method_a'][d][f'recall@{k}'], recall['method_b'][d][f'recall@{k}']
            assert diff[f'recall@{k}_difference'] == pytest.approx(b - a)
            assert diff[f'recall@{k}_relative_change'] == (pytest.approx(100 * (b - a) / a) if a else None)
    detailed = np.load(out / 'eval' / 'alignment_detailed.npz')
    assert detailed['similarity_a'].shape == (104,) and detailed['image_embedding_b'].shape == (24, 6)
    assert np.load(out / 'eval' / 'recall_detailed.npz')['rank_text_to_image_r'].shape == (104,)
    printed = capsys.readouterr().out
    if importlib.util.find_spec('matplotlib'):  # an optional dependency
        for png in ('alignment_hist.png', 'alignment_scatter.png', 'recall.png'):
            assert os.path.getsize(out / 'eval' / png) > 1000
    else:
        assert 'plots: matplotlib not installed, skipped' in printed
    assert 'image->text R@1' in printed and 'B generated' in printed
    cache = [f for f in os.listdir(data) if f.startswith('text_features_eval-test-tiny-clip_random_')]
    assert len(cache) == 2  # the .npy and its key .json

    # the real tokens fed as generated: B is A exactly; the cached text features are reused
    write_generated(out / 'generated.npy', clip)
    run_eval(monkeypatch, *args, f'--generated={out / "generated.npy"}')
    align2, recall2 = load_summaries(out)
    assert 'text features: cached' in capsys.readouterr().out
    assert align2['method_b'] == align2['method_a'] and align2['method_a'] == align['method_a']
    assert align2['difference_mean'] == 0 and align2['difference_std'] == 0
    assert align2['correlation'] == pytest.approx(1.0, abs=1e-12)
    assert align2['token_fidelity']['token_cosine_mean'] == pytest.approx(1.0, abs=1e-6)
    assert align2['token_fidelity']['mse_standardized'] == 0
    assert recall2['method_b'] == recall2['method_a']
    assert all(v == 0 for d in recall2['difference'].values() for k, v in d.items() if k.endswith('_difference'))


def test_without_generated_reports_the_clip_baseline(eval_setup, monkeypatch):
    data, out, args = eval_setup
    run_eval(monkeypatch, *args, '--tasks=recall,alignment', '--k_values=(1, 3)')
    align, recall = load_summaries(out)
    assert align['method_b'] is None and align['difference_mean'] is None and align['token_fidelity'] is None
    assert recall['method_b'] is None and recall['difference'] is None
    assert set(recall['method_a']['image_to_text']) == {'recall@1', 'recall@3'}
    assert align['generated'] is None
    assert align['method_a']['mean_cosine_similarity'] != align['reference']['mean_cosine_similarity']


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
    with pytest.raises(SystemExit, match=r"generated.npy is truncated or corrupt: expected 6,272 bytes "
                                         r"\(float16 \[24, 16, 8\]\), the file has 1,000 bytes"):
        run_eval(monkeypatch, *args)


def test_images_without_captions_named(eval_setup, monkeypatch):
    data, out, args = eval_setup
    path = os.path.join(data, 'captions.json')
    captions = json.load(open(path))
    captions['105'] = []
    del captions['110']
    json.dump(captions, open(path, 'w'))
    with pytest.raises(SystemExit, match=r"captions.json has no captions for 2 of 24 images \(image ids \[105, 110\]"):
        run_eval(monkeypatch, *args)


def test_clip_model_that_does_not_fit_the_data(tmp_path, tiny_clip, monkeypatch):
    data = make_data_folder(str(tmp_path / 'data'), n=4, tokens=16, clip_dim=12, embed_dim=6)
    with pytest.raises(SystemExit, match=r"projects 8 -> 6, but .* token dim 12"):
        run_eval(monkeypatch, f'--val_data={data}', f'--out_dir={tmp_path}', f'--clip_model={tiny_clip}',
                 '--clip_pretrained=')


def test_default_finds_what_sample_py_wrote_and_names_its_maker(eval_setup, monkeypatch):
    """With no --generated, eval.py derives sample.py's output folder from the same settings and writes its
    summaries there, recording the checkpoint and the sampler from generated.json."""
    data, out, args = eval_setup
    folder = out / 'samples' / flow.samples_name(str(out / 'ckpt.pt'), 'heun', 5, 1.0, 1337)
    os.makedirs(folder)
    write_generated(folder / 'generated.npy', np.load(os.path.join(data, 'clip.npy')))
    settings = {'checkpoint': str(out / 'ckpt.pt'), 'iter_num': 800, 'use_ema': True, 'sample_method': 'heun',
                'sample_steps': 5, 'sample_shift': 1.0, 'cfg_scale': 1.0, 'seed': 1337, 'val_data': data}
    with open(folder / 'generated.json', 'w') as f:
        json.dump({'settings': settings, 'model_calls': 10}, f)
    run_eval(monkeypatch, *args, '--sample_method=heun', '--sample_steps=5')
    align, recall = load_summaries(folder)
    assert not os.path.exists(out / 'eval')
    for s in (align, recall):
        assert s['generated'] == str(folder / 'generated.npy') and s['model_calls'] == 10
        assert s['checkpoint'] == {'path': str(out / 'ckpt.pt'), 'iter_num': 800, 'use_ema': True}
        assert s['sampler'] == {'sample_method': 'heun', 'sample_steps': 5, 'sample_shift': 1.0, 'cfg_scale': 1.0,
                                'seed': 1337}
    assert recall['method_b'] == recall['method_a']


def test_naming_settings_default_alike_in_sample_and_eval():
    """eval.py's default `generated` is sample.py's default output only while their defaults agree."""
    def defaults(script):
        values = {}
        for node in ast.parse(open(os.path.join(ROOT, script)).read()).body:  # the first assignment: the default
            name = getattr(node.targets[0], 'id', None) if isinstance(node, ast.Assign) else None
            if name in ('ckpt_path', 'use_ema', 'sample_method', 'sample_steps', 'sample_shift', 'cfg_scale', 'seed',
                        'out_dir') and name not in values:
                values[name] = ast.literal_eval(node.value)
        return values
    assert defaults('eval.py') == defaults('sample.py') and len(defaults('eval.py')) == 8
