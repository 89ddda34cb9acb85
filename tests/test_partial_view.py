"""The partial-view demo's data (demo.py, extract.py's eva_view and true_samples): EVA's grey_shapes
view hides the shapes' colours, and clip_samples.npy holds true redraws of them, encoded as clip.npy
is."""
import os

import numpy as np
import pytest
import torch

import data
import demo
import extract
from test_extract import TINY, run_extract


def crops(role, name, view='full'):
    """extract.py's uint8 crop transform of a random tiny encoder, seen through `view`."""
    return demo.viewed(extract.open_clip_encoder(role, name, '')[0].crop, view)


def differing_colours():
    """A val scene and a redraw of it whose shapes' colours differ (the same scene otherwise)."""
    for index in range(20):
        scene = demo.synthetic_scene(0, 'val', index)
        for sample in range(8):
            redrawn = demo.recoloured_scene(0, 'val', index, sample)
            if [s[1] for s in redrawn[1]] != [s[1] for s in scene[1]]:
                return scene, redrawn
    raise AssertionError('no redraw changed a colour')


def test_grey_shapes_hides_the_shapes_colours_and_nothing_else():
    scene, redrawn = differing_colours()
    assert scene[0] == redrawn[0]
    assert [(s[0], *s[2:]) for s in scene[1]] == [(s[0], *s[2:]) for s in redrawn[1]]
    images = [demo.draw_scene(*s, 64) for s in (scene, redrawn)]
    assert images[0].tobytes() != images[1].tobytes()
    eva, clip = crops('eva', 'tiny-eva', 'grey_shapes'), crops('clip', 'tiny-clip')
    seen = [eva(image) for image in images]
    assert seen[0].dtype == torch.uint8 and seen[0].numpy().tobytes() == seen[1].numpy().tobytes()
    assert not torch.equal(clip(images[0]), clip(images[1]))  # CLIP sees the colours
    # the view keeps the background's colour and where the shapes are; every shape in one grey
    grey = np.asarray(demo.GreyShapes()(images[0])).reshape(-1, 3)
    colours = {tuple(c) for c in np.unique(grey, axis=0)}
    assert colours == {demo.COLORS[scene[0]], demo.GREY}
    full = np.asarray(images[0]).reshape(-1, 3)
    background = (full == demo.COLORS[scene[0]]).all(1)
    assert np.array_equal((grey == demo.GREY).all(1), ~background)
    # the full view is the crop itself (the first demo's EVA input is unchanged)
    plain = extract.open_clip_encoder('eva', 'tiny-eva', '')[0].crop
    assert demo.viewed(plain, 'full') is plain
    assert not extract.shares_crop(crops('clip', 'tiny-clip'), eva)


def test_recoloured_scene_redraws_by_the_scenes_own_rule():
    draws = [demo.recoloured_scene(0, 'train', 3, s) for s in range(200)]
    assert draws == [demo.recoloured_scene(0, 'train', 3, s) for s in range(200)]  # seeded
    background = draws[0][0]
    seen = {shape[1] for _, shapes in draws for shape in shapes}
    assert seen == set(demo.COLORS) - {background}  # uniform over the other colours
    with pytest.raises(SystemExit, match="eva_view must be one of \\('full', 'grey_shapes'\\), "
                                         "got 'silhouette'"):
        demo.eva_view('silhouette')


def test_extract_writes_true_samples_encoded_as_clip_npy(tmp_path):
    args = [*TINY, '--clip_pretrained=', '--source=synthetic', "--splits=('train', 'val')",
            "--synthetic_counts={'train': 6, 'val': 5}", '--synthetic_image_size=64',
            f'--data_dir={tmp_path}', '--eva_view=grey_shapes', '--true_samples=4']
    run_extract(*args)
    for split, n in (('train', 6), ('val', 5)):
        folder = tmp_path / split
        meta = data.read_json(str(folder / 'meta.json'))
        assert meta['eva']['view'] == 'grey_shapes' and meta['complete']
        assert meta['true_samples'] == {'file': 'clip_samples.npy', 'samples': 4,
                                        'rule': demo.TRUE_SAMPLES_RULE}
        clip = np.load(folder / 'clip.npy', mmap_mode='r')
        samples = np.load(folder / 'clip_samples.npy', mmap_mode='r')
        assert samples.dtype == np.float16 and samples.shape == (n, 4, *clip.shape[1:])
        assert not os.path.exists(folder / 'clip_samples.npy.tmp')
        # a redraw that happens to give the scene its own colours gives clip.npy's row
        same = [(i, s) for i in range(n) for s in range(4)
                if demo.recoloured_scene(0, split, i, s) == demo.synthetic_scene(0, split, i)]
        differ = [(i, s) for i in range(n) for s in range(4) if (i, s) not in same]
        assert same and differ
        for i, s in same:
            np.testing.assert_allclose(samples[i, s].astype(np.float32),
                                       clip[i].astype(np.float32), atol=2e-3, rtol=0)
        assert all(np.abs(samples[i, s].astype(np.float32) - clip[i]).max() > 1e-2
                   for i, s in differ)
    mtime = os.path.getmtime(tmp_path / 'val' / 'clip_samples.npy')
    run_extract(*args)  # a second run keeps what meta.json records
    assert os.path.getmtime(tmp_path / 'val' / 'clip_samples.npy') == mtime


def test_true_samples_need_a_view_that_hides_something(tmp_path):
    with pytest.raises(SystemExit, match="true_samples=2 redraws what a synthetic eva_view hides; "
                                         "got eva_view='full', source='synthetic'"):
        run_extract(*TINY, '--clip_pretrained=', '--source=synthetic', "--splits=('val',)",
                    "--synthetic_counts={'val': 2}", '--synthetic_image_size=64',
                    f'--data_dir={tmp_path}', '--true_samples=2')
