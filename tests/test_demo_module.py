"""demo.py: the demo's synthetic split, and its encoders, trained by extract.py once, then loaded
from their files like real weights."""
import os
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch

import data
import demo
from conftest import ROOT
from test_extract import TINY, run_extract


def test_demo_does_not_import_extract():
    code = "import sys, demo; assert 'extract' not in sys.modules, 'demo.py imports extract.py'"
    subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True)


def test_encode_text_shortcut_equals_open_clip():
    model = data.open_clip_model('tiny-clip', '')[0].eval()
    captions = [c for i in range(8)
                for c in demo.synthetic_captions(*demo.synthetic_scene(0, 'train', i))]
    text = open_clip.get_tokenizer('tiny-clip')(captions)
    used = torch.unique(text)
    with torch.no_grad():
        shortcut = demo.encode_text(model, torch.searchsorted(used, text),
                                    model.token_embedding.weight[used])
        reference = model.encode_text(text, normalize=True)
    assert shortcut.shape == (len(captions), 32)
    torch.testing.assert_close(shortcut, reference, atol=1e-6, rtol=0)


def test_training_is_seeded_and_changes_only_the_used_token_rows(tmp_path):
    paths = [str(tmp_path / f'{name}.pt') for name in ('a', 'b')]
    for path in paths:
        demo.train_encoder('tiny-clip', path, 'train', 16, 64, 0, steps=3, batch_size=8, warmup=1)
    a, b = (torch.load(p, weights_only=True) for p in paths)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    initial = data.open_clip_model('tiny-clip', '')[0].state_dict()
    assert not torch.equal(a['visual.conv1.weight'], initial['visual.conv1.weight'])
    changed = (a['token_embedding.weight'] != initial['token_embedding.weight']).any(1)
    assert 0 < changed.sum() < 200  # the captions' few dozen token ids, not the 49,408 rows


def test_extract_trains_the_encoders_once_and_loads_them_like_real_weights(tmp_path, capsys):
    weights = {role: str(tmp_path / 'encoders' / f'{role}.pt') for role in ('clip', 'eva')}
    args = [*TINY, '--source=synthetic', "--splits=('train', 'val')",
            "--synthetic_counts={'train': 24, 'val': 4}",
            '--synthetic_image_size=64', f'--data_dir={tmp_path / "data"}',
            f"--clip_pretrained={weights['clip']}",
            f"--eva_pretrained={weights['eva']}", '--train_encoder_steps=2']
    run_extract(*args)
    printed = capsys.readouterr().out
    assert 'clip: training tiny-clip on the 24 images of split train for 2 steps' in printed
    assert 'eva: training tiny-eva on the 24 images of split train for 2 steps' in printed
    clip_state, eva_state = (torch.load(weights[role],
                                        weights_only=True) for role in ('clip', 'eva'))
    assert not torch.equal(clip_state['visual.conv1.weight'],
                           data.open_clip_model('tiny-clip',
                                                '')[0].state_dict()['visual.conv1.weight'])
    mtimes = [os.path.getmtime(p) for p in weights.values()]
    # the tokens come from the trained weights, loaded the way a user loads real ones
    model, _, preprocess = open_clip.create_model_and_transforms('tiny-clip',
                                                                 pretrained=weights['clip'])
    with torch.no_grad():
        model.eval().visual.output_tokens = True
        tokens = model.visual(preprocess(demo.synthetic_image(0, 'val', 64, 0))[None])[1][0]
    stored = np.load(tmp_path / 'data' / 'val' / 'clip.npy', mmap_mode='r')[0].astype(np.float32)
    np.testing.assert_allclose(stored, tokens.numpy(), atol=2e-3, rtol=2e-3)  # stored as float16
    meta = data.read_json(str(tmp_path / 'data' / 'val' / 'meta.json'))
    assert (meta['clip']['pretrained'],
            meta['eva']['pretrained']) == (weights['clip'], weights['eva'])

    run_extract(*args)  # a second run reuses the files
    assert 'training' not in capsys.readouterr().out
    assert [os.path.getmtime(p) for p in weights.values()] == mtimes


def test_train_encoder_steps_needs_synthetic_images(tmp_path):
    with pytest.raises(SystemExit, match=f"got source='folder': the files "
                                         f"{tmp_path}/c.pt do not exist"):
        run_extract(*TINY, "--splits=('val',)", f'--data_dir={tmp_path}', '--train_encoder_steps=2',
                    '--source=folder', f'--image_folder={tmp_path}',
                    f'--clip_pretrained={tmp_path}/c.pt')
