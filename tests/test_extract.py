"""extract.py on the CPU with tiny encoders: sources, token semantics, data folder format, resume,
bad input.

Most runs execute extract.py in this process (runpy, same argv as the command line) so that torch
and open_clip are imported once; the kill test runs it as a real subprocess.
"""
import io
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRACT = os.path.join(ROOT, 'extract.py')
TINY = ['--clip_model=tiny-clip', '--eva_model=tiny-eva', '--grid_size=4', '--extract_batch_size=4',
        '--num_workers=1', '--device=cpu']


def run_extract(*args):
    """`python extract.py *args`, in this process."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, 'argv', ['extract.py', *args])
        runpy.run_path(EXTRACT, run_name='__main__')


def load_folder(path):
    """Arrays, meta and captions of a complete data folder, through data.py's own checks."""
    meta = data.open_folder(str(path), arrays=tuple(data.ARRAYS))
    arrays = {name: np.load(p, mmap_mode='r') for name, p in meta.pop('paths').items()}
    del meta['shapes'], meta['id']  # what open_folder adds: meta is now meta.json as written
    return arrays, meta, data.read_json(os.path.join(path, 'captions.json'))


def open_clip_model(name, pretrained=None):
    import open_clip
    open_clip.add_model_config(os.path.join(ROOT, 'config', 'encoders'))
    torch.manual_seed(0)
    model, _, transform = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    return model.eval(), transform


def reference_tokens(model, transform, images):
    """open_clip's own outputs: (encode_image, patch tokens of visual with output_tokens=True)."""
    x = torch.stack([transform(im) for im in images])
    with torch.no_grad():
        cls = model.encode_image(x)
        model.visual.output_tokens = True
        _, tokens = model.visual(x)
        model.visual.output_tokens = False
    return cls.numpy(), tokens.numpy()


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """Random tiny-clip / tiny-eva weight files (seed 1, unlike the seed-0 random init)."""
    d = tmp_path_factory.mktemp('weights')
    paths = {}
    for name in ('tiny-clip', 'tiny-eva'):
        model, _ = open_clip_model(name)
        torch.manual_seed(1)
        for p in model.parameters():
            p.data.normal_(0, 0.2)
        paths[name] = str(d / f'{name}.pt')
        torch.save(model.state_dict(), paths[name])
    return paths


@pytest.fixture(scope='module')
def huge_eva(tmp_path_factory, weights):
    """tiny-eva weights whose ln_post scales 3 of 96 channels by 1e6: most of their values beyond
    float16."""
    model, _ = open_clip_model('tiny-eva', weights['tiny-eva'])
    model.visual.ln_post.weight.data[:3] = 1e6
    path = str(tmp_path_factory.mktemp('huge') / 'huge-eva.pt')
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    """image_folder/set/: five readable images of several sizes and modes, one corrupt, one
    truncated."""
    root = tmp_path_factory.mktemp('images')
    d = root / 'set'
    (d / 'sub').mkdir(parents=True)
    rng = np.random.default_rng(0)
    pixels = lambda h, w, c=3: rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)
    Image.fromarray(pixels(60, 80)).save(d / 'a.jpg')
    Image.fromarray(pixels(64, 64)).save(d / 'b.png')
    Image.fromarray(pixels(70, 50, 1)).save(d / 'c_gray.png')
    Image.fromarray(pixels(64, 96, 4)).save(d / 'd_rgba.png')
    Image.fromarray(pixels(100, 100)).save(d / 'sub' / 'e.jpg')
    (d / 'a.txt').write_text('a noisy picture\n\nanother caption\n')
    (d / 'corrupt.jpg').write_bytes(b'this is not a jpeg' * 10)
    data = (d / 'b.png').read_bytes()
    (d / 'truncated.png').write_bytes(data[:len(data) // 2])
    return str(root)


@pytest.fixture(scope='module')
def folder_run(tmp_path_factory, image_folder, weights):
    out = tmp_path_factory.mktemp('out')
    run_extract(*TINY, '--source=folder', f'--image_folder={image_folder}', "--splits=('set',)",
                f'--data_dir={out}', f"--clip_pretrained={weights['tiny-clip']}",
                f"--eva_pretrained={weights['tiny-eva']}")
    return str(out / 'set')


def test_folder_tokens_equal_open_clip_patch_tokens(folder_run, image_folder, weights):
    arrays, meta, _ = load_folder(folder_run)
    images = [Image.open(os.path.join(image_folder, 'set', f)).convert('RGB')
              for f in meta['files']]
    cls, tokens = reference_tokens(*open_clip_model('tiny-clip', weights['tiny-clip']), images)
    assert arrays['clip'].shape == (5, 16, 64) and arrays['clip_cls'].shape == (5, 32)
    np.testing.assert_allclose(arrays['clip'], tokens, rtol=2e-3, atol=2e-3)  # float16 storage
    np.testing.assert_allclose(arrays['clip_cls'], cls, rtol=1e-5, atol=1e-5)
    _, eva_tokens = reference_tokens(*open_clip_model('tiny-eva', weights['tiny-eva']), images)
    np.testing.assert_allclose(arrays['eva'], eva_tokens, rtol=2e-3, atol=2e-3)
    assert meta['clip']['pretrained'] == weights['tiny-clip']


def old_way_arrays(images, batch_size, encoders):
    """clip.npy, eva.npy, clip_cls.npy as extract.py computed them before the uint8 crops: each
    encoder's whole open_clip transform per image in float32, batches of batch_size, open_clip's
    tower, float16 by clamp and round."""
    arrays = {'clip': [], 'eva': [], 'clip_cls': []}
    for s in range(0, len(images), batch_size):
        for role, (model, transform) in encoders.items():
            cls, tokens = reference_tokens(model, transform, images[s:s + batch_size])
            arrays[role].append(np.clip(tokens, -65504, 65504).astype(np.float16))
            arrays['clip_cls'] += [cls] if role == 'clip' else []
    return {name: np.concatenate(rows) for name, rows in arrays.items()}


def test_arrays_are_bytes_of_the_whole_transforms_and_towers(folder_run, image_folder, weights,
                                                             tmp_path):
    """uint8 crops normalized after the DataLoader, the software pipeline, the writes: every stored
    byte as the old way, with one preprocessing for both encoders (both 64 px) and with two (the EVA
    stand-in at 48 px)."""
    arrays, meta, _ = load_folder(folder_run)
    images = [Image.open(os.path.join(image_folder, 'set', f)).convert('RGB')
              for f in meta['files']]
    encoders = {role: open_clip_model(f'tiny-{role}', weights[f'tiny-{role}'])
                for role in ('clip', 'eva')}
    for name, expected in old_way_arrays(images, 4, encoders).items():
        assert arrays[name].tobytes() == expected.tobytes(), name

    import open_clip
    config = json.load(open(os.path.join(ROOT, 'config', 'encoders', 'tiny-eva.json')))
    config['vision_cfg'].update(image_size=48, patch_size=12)  # the same 4 x 4 grid, other crops
    os.makedirs(tmp_path / 'encoders')
    json.dump(config, open(tmp_path / 'encoders' / 'tiny-eva-48.json', 'w'))
    open_clip.add_model_config(str(tmp_path / 'encoders'))
    run_extract(*TINY, '--source=synthetic', "--splits=('val',)", "--synthetic_counts={'val': 6}",
                '--synthetic_image_size=64', '--clip_pretrained=', '--eva_model=tiny-eva-48',
                f'--data_dir={tmp_path}')
    arrays, _, _ = load_folder(tmp_path / 'val')
    sys.path.insert(0, ROOT)
    import demo
    images = [demo.synthetic_image(0, 'val', 64, i) for i in range(6)]
    encoders = {'clip': open_clip_model('tiny-clip'), 'eva': open_clip_model('tiny-eva-48')}
    assert encoders['eva'][1](images[0]).shape[-1] == 48
    for name, expected in old_way_arrays(images, 4, encoders).items():
        assert arrays[name].tobytes() == expected.tobytes(), name


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_towers_cast_once_give_the_same_tokens_under_autocast(weights, dtype, monkeypatch):
    """On CUDA build_encoder casts the weights autocast casts anyway
    (runtime.cast_for_autocast): the same tokens. Checked under CPU autocast with
    MultiheadAttention's fast path off, as CUDA autocast turns it off (CPU autocast does not, and
    the fast path then runs on the cast weights)."""
    import extract
    from runtime import cast_for_autocast
    monkeypatch.setattr(torch.backends.mha, 'get_fastpath_enabled', lambda: False)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for role in ('clip', 'eva'):
        (plain, _), (cast, tower) = (
            extract.open_clip_encoder(role, f'tiny-{role}', weights[f'tiny-{role}'])
            for _ in range(2))
        cast_for_autocast(tower, dtype)
        assert tower.conv1.weight.dtype == dtype and tower.ln_post.weight.dtype == torch.float32
        with torch.no_grad(), torch.autocast('cpu', dtype=dtype):
            for ref, out in zip(plain.forward(x), cast.forward(x)):
                assert out.dtype == dtype and torch.equal(out, ref), role


def test_corrupt_images_are_skipped_and_recorded(folder_run):
    arrays, meta, captions = load_folder(folder_run)
    assert meta['files'] == ['a.jpg', 'b.png', 'c_gray.png', 'd_rgba.png',
                             os.path.join('sub', 'e.jpg')]
    assert meta['count'] == len(meta['image_ids']) == len(arrays['eva']) == 5
    assert sorted(s['file'] for s in meta['skipped']) == ['corrupt.jpg', 'truncated.png']
    assert all(s['reason'] for s in meta['skipped'])
    assert captions == {'a.jpg': ['a noisy picture', 'another caption']}
    assert not [f for f in os.listdir(folder_run) if f.startswith('.extract_state')]


def test_synthetic_shapes_dtypes_meta_captions(tmp_path):
    run_extract(*TINY, '--source=synthetic', "--splits=('train','val')",
                "--synthetic_counts={'train': 10, 'val': 6}", '--synthetic_image_size=64',
                "--clip_pretrained=", f'--data_dir={tmp_path}')
    train, meta, captions = load_folder(tmp_path / 'train')
    assert train['clip'].shape == (10, 16, 64) and train['clip'].dtype == np.float16
    assert train['eva'].shape == (10, 16, 96) and train['eva'].dtype == np.float16
    assert train['clip_cls'].shape == (10, 32) and train['clip_cls'].dtype == np.float32
    assert meta['format'] == 'blip3o-dit-data' and meta['version'] == 1 and meta['complete'] is True
    assert meta['count'] == 10 and meta['image_ids'] == list(range(10)) and len(meta['files']) == 10
    assert meta['clip'] == {'model': 'tiny-clip', 'pretrained': '', 'tokens': 16, 'dim': 64,
                            'embed_dim': 32}
    assert meta['eva'] == {'model': 'tiny-eva', 'pretrained': '', 'tokens': 16, 'dim': 96}
    assert meta['dtype'] == 'float16' and meta['skipped'] == []
    assert meta['eva_clamped_values'] == 0 and meta['eva_clamped_files'] == []
    flat = np.asarray(train['clip'], dtype=np.float64).reshape(-1, 64)
    np.testing.assert_allclose(meta['clip_mean'], flat.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(meta['clip_std'], flat.std(0), rtol=1e-9, atol=1e-12)
    assert list(captions) == [str(i) for i in range(10)]
    assert all(4 <= len(c) <= 6 for c in captions.values())
    assert len({c[0] for c in captions.values()}) > 5
    val, val_meta, _ = load_folder(tmp_path / 'val')
    assert val_meta['count'] == 6 and not np.array_equal(val['eva'][:6], train['eva'][:6])

    # clip_pretrained='' is open_clip's init under torch.manual_seed(0): eval.py rebuilds this CLIP
    sys.path.insert(0, ROOT)
    import demo
    images = [demo.synthetic_image(0, 'train', 64, i) for i in range(10)]
    cls, tokens = reference_tokens(*open_clip_model('tiny-clip'), images)
    np.testing.assert_allclose(train['clip'], tokens, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(train['clip_cls'], cls, rtol=1e-5, atol=1e-5)


def test_complete_folder_is_kept_and_other_encoders_refused(tmp_path, capsys):
    args = [*TINY, '--source=synthetic', "--splits=('val',)", "--synthetic_counts={'val': 5}",
            '--synthetic_image_size=64', '--clip_pretrained=', f'--data_dir={tmp_path}']
    run_extract(*args)
    stamp = os.path.getmtime(tmp_path / 'val' / 'clip.npy')
    run_extract(*args)
    assert 'already complete' in capsys.readouterr().out
    assert os.path.getmtime(tmp_path / 'val' / 'clip.npy') == stamp
    with pytest.raises(SystemExit, match='extract_overwrite=True'):
        run_extract(*args, '--eva_model=tiny-clip')
    run_extract(*args, '--eva_model=tiny-clip', '--extract_overwrite=True')
    arrays, meta, _ = load_folder(tmp_path / 'val')
    assert arrays['eva'].shape == (5, 16, 64) and meta['eva']['model'] == 'tiny-clip'


def test_token_count_must_match_grid_size(tmp_path):
    match = r'gives 16 patch tokens.*grid_size=5 needs 25; set grid_size=4'
    with pytest.raises(SystemExit, match=match):
        run_extract(*TINY, '--grid_size=5', '--source=synthetic', "--splits=('val',)",
                    "--synthetic_counts={'val': 2}", '--clip_pretrained=', f'--data_dir={tmp_path}')


def test_float16_overflow_stops_naming_the_image(tmp_path, image_folder, weights):
    model, _ = open_clip_model('tiny-clip', weights['tiny-clip'])
    model.visual.ln_post.weight.data.fill_(1e6)  # tokens far beyond float16's 65504
    torch.save(model.state_dict(), tmp_path / 'huge.pt')
    with pytest.raises(SystemExit, match=r'CLIP features of a\.jpg are .*beyond float16'):
        run_extract(*TINY, '--source=folder', f'--image_folder={image_folder}', "--splits=('set',)",
                    f"--clip_pretrained={tmp_path / 'huge.pt'}", f'--data_dir={tmp_path / "out"}')
    model, _ = open_clip_model('tiny-eva', weights['tiny-eva'])
    model.visual.ln_post.bias.data[5] = float('nan')  # the encoder itself fails: EVA stops too
    torch.save(model.state_dict(), tmp_path / 'nan.pt')
    with pytest.raises(SystemExit, match=r'EVA features of a\.jpg are non-finite; stopping'):
        run_extract(*TINY, '--source=folder', f'--image_folder={image_folder}', "--splits=('set',)",
                    f"--clip_pretrained={weights['tiny-clip']}",
                    f"--eva_pretrained={tmp_path / 'nan.pt'}", f'--data_dir={tmp_path / "out2"}')


def test_eva_beyond_float16_is_clamped_counted_and_named(tmp_path, image_folder, weights, huge_eva,
                                                         capsys):
    run_extract(*TINY, '--source=folder', f'--image_folder={image_folder}', "--splits=('set',)",
                f"--clip_pretrained={weights['tiny-clip']}", f'--eva_pretrained={huge_eva}',
                f'--data_dir={tmp_path}')
    arrays, meta, _ = load_folder(tmp_path / 'set')
    images = [Image.open(os.path.join(image_folder, 'set', f)).convert('RGB')
              for f in meta['files']]
    _, reference = reference_tokens(*open_clip_model('tiny-eva', huge_eva), images)
    beyond = np.abs(reference) > 65504
    assert beyond[:, :, :3].mean() > 0.5 and not beyond[:, :, 3:].any()
    assert meta['eva_clamped_values'] == beyond.sum()
    assert meta['eva_clamped_files'] == meta['files']  # every image has some
    np.testing.assert_array_equal(arrays['eva'][beyond], np.sign(reference[beyond]) * 65504)
    np.testing.assert_allclose(arrays['eva'][~beyond], reference[~beyond], rtol=2e-3, atol=2e-3)
    out = capsys.readouterr().out
    assert f"warning: {beyond[0].sum()} EVA values of a.jpg (up to " in out
    assert f"warning: {beyond.sum()} EVA values beyond float16 are stored as +-65504" in out
    # the CPU: float32 whatever is set
    assert meta['compute_dtype'] == {'clip': 'float32', 'eva': 'float32'}


def test_dtype_setting_is_now_clip_dtype_and_eva_dtype(tmp_path):
    args = ['--source=synthetic', "--splits=('val',)", "--synthetic_counts={'val': 2}",
            f'--data_dir={tmp_path}']
    with pytest.raises(SystemExit, match='--dtype is now --clip_dtype and --eva_dtype'):
        run_extract(*TINY, *args, '--dtype=float32')
    match = "eva_dtype must be 'float32', 'bfloat16' or 'float16', got 'fp8'"
    with pytest.raises(SystemExit, match=match):
        run_extract(*TINY, *args, '--eva_dtype=fp8')


def write_coco(root, split, images, captions):
    os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
    os.makedirs(os.path.join(root, 'images', split), exist_ok=True)
    anns = [{'id': 1000 * i + k, 'image_id': i, 'caption': c}
            for i, cs in captions.items() for k, c in enumerate(cs)]
    listed = [{'id': i, 'file_name': f'{i:012d}.jpg', 'height': 48, 'width': 64} for i in images]
    with open(os.path.join(root, 'annotations', f'captions_{split}.json'), 'w') as f:
        json.dump({'images': listed, 'annotations': anns}, f)


def test_coco_source(tmp_path):
    root = str(tmp_path / 'coco')
    captions = {7: [f'seven {k}' for k in range(7)], 42: [f'forty-two {k}' for k in range(5)],
                100: ['hundred'], 5: ['its file is missing']}
    write_coco(root, 'val2017', [42, 7, 100, 5], captions)
    rng = np.random.default_rng(0)
    for i in (42, 7, 100):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
            os.path.join(root, 'images', 'val2017', f'{i:012d}.jpg'))
    coco = ['--source=coco', f'--coco_root={root}', f'--data_dir={tmp_path / "data"}',
            '--clip_pretrained=']
    run_extract(*TINY, *coco, "--splits=('val2017',)")
    arrays, meta, caps = load_folder(tmp_path / 'data' / 'val2017')
    assert meta['image_ids'] == [7, 42, 100] and arrays['clip'].shape == (3, 16, 64)
    assert meta['files'] == ['000000000007.jpg', '000000000042.jpg', '000000000100.jpg']
    assert [s['image_id'] for s in meta['skipped']] == [5]
    assert 'No such file' in meta['skipped'][0]['reason']
    assert caps == {'7': captions[7], '42': captions[42], '100': captions[100]}  # all 7 of image 7

    with pytest.raises(SystemExit, match=r'captions_train2017\.json.*images/train2017/\*\.jpg'):
        run_extract(*TINY, *coco, "--splits=('train2017','val2017')")
    write_coco(root, 'train2017', [42, 8], {42: ['x'], 8: ['y']})
    with pytest.raises(SystemExit, match="'train2017' and 'val2017' share 1 images"):
        run_extract(*TINY, *coco, "--splits=('train2017','val2017')")


def write_shard(path, members):
    """An uncompressed tar of (name, bytes) members in order, as img2dataset writes its shards."""
    with tarfile.open(path, 'w') as tar:
        for name, raw in members:
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def json_caption(text):
    return json.dumps({'caption': text, 'url': 'http://example.com/x.jpg',
                       'status': 'success'}).encode()


@pytest.fixture(scope='module')
def shards(tmp_path_factory, image_folder):
    """Shards 00000..00002 of image_folder's readable images in its order, a corrupt image, a sample
    with a .json caption only, one without an image, a metadata member."""
    d = tmp_path_factory.mktemp('shards')
    raw = lambda f: open(os.path.join(image_folder, 'set', f), 'rb').read()
    write_shard(d / '00000.tar', [
        ('000000000.jpg', raw('a.jpg')), ('000000000.txt', b'a noisy picture\n'),
        ('000000000.json', json_caption('the .txt wins')),
        ('000000001.png', raw('b.png')),
        ('000000001.json', json_caption('a caption from the json')),
        ('000000002.jpg', raw('corrupt.jpg')), ('000000002.txt', b'corrupt'),
        ('000000003.png', raw('c_gray.png'))])
    write_shard(d / '00001.tar', [
        ('__meta__.json', b'{}'), ('000000004.png', raw('d_rgba.png')),
        ('000000005.jpg', raw(os.path.join('sub', 'e.jpg'))), ('000000005.txt', b'e'),
        ('000000006.txt', b'an image that is missing'),
        ('000000006.json', json_caption('missing'))])
    write_shard(d / '00002.tar', [('000000007.jpg', raw('a.jpg'))])
    return str(d)


def test_webdataset_tokens_equal_folder_tokens(tmp_path, shards, folder_run, weights):
    pattern = os.path.join(shards, '{00000..00002}.tar')
    run_extract(*TINY, '--source=webdataset', f'--webdataset_shards={{"set": {pattern!r}}}',
                '--max_shards=2', "--splits=('set',)", f'--data_dir={tmp_path}',
                f"--clip_pretrained={weights['tiny-clip']}",
                f"--eva_pretrained={weights['tiny-eva']}")
    arrays, meta, captions = load_folder(tmp_path / 'set')
    folder, _, _ = load_folder(folder_run)  # the same images from image files: the same rows
    for name in folder:
        assert np.array_equal(arrays[name], folder[name]), name
    assert meta['image_ids'] == ['000000000', '000000001', '000000003', '000000004', '000000005']
    assert meta['files'] == ['00000.tar/000000000.jpg', '00000.tar/000000001.png',
                             '00000.tar/000000003.png', '00001.tar/000000004.png',
                             '00001.tar/000000005.jpg']
    assert [(s['image_id'], s['file']) for s in meta['skipped']] == [
        ('000000002', '00000.tar/000000002.jpg'), ('000000006', '00001.tar/000000006')]
    assert 'no image file' in meta['skipped'][1]['reason']
    assert captions == {'000000000': ['a noisy picture'], '000000001': ['a caption from the json'],
                        '000000005': ['e']}
    assert meta['source']['kind'] == 'webdataset' and meta['source']['shards'] == pattern
    assert meta['source']['max_shards'] == 2 and meta['source']['root'] == shards
    assert meta['source']['listed'] == 7


def test_webdataset_listing_brace_expansion_shard_limit_bad_shards(shards, image_folder, tmp_path):
    import sources
    listed = lambda pattern, **kw: sources.list_split('set', 'webdataset',
                                                      webdataset_shards={'set': pattern}, **kw)
    pattern = os.path.join(shards, '{00000..00002}.tar')
    assert listed(pattern)['ids'] == [f'{i:09d}' for i in range(8)]
    assert len(listed(pattern, max_shards=2)['ids']) == 7
    assert len(listed(pattern, max_shards=1)['ids']) == 4
    assert len(listed(pattern, limit=5)['ids']) == 5
    # webdataset's '::' joins two patterns
    both = listed(os.path.join(shards, '00002.tar') + '::' + os.path.join(shards, '00000.tar'))
    assert both['ids'] == ['000000007', '000000000', '000000001', '000000002', '000000003']
    a = np.asarray(Image.open(os.path.join(image_folder, 'set', 'a.jpg')).convert('RGB'))
    # one seek and read
    assert all(np.array_equal(np.asarray(sources.load_member(both['keys'][k])), a) for k in (0, 1))
    match = r"webdataset shard not found: .*00003\.tar \(webdataset_shards\['set'\]="
    with pytest.raises(SystemExit, match=match):
        listed(os.path.join(shards, '{00000..00003}.tar'))
    match = r"sample key '000000000' is in .*00000\.tar and .*00000\.tar"
    with pytest.raises(SystemExit, match=match):
        listed(os.path.join(shards, '00000.tar::') + os.path.join(shards, '00000.tar'))
    (tmp_path / 'bad.tar').write_bytes(b'not a tar file' * 100)
    with pytest.raises(SystemExit, match=r'bad\.tar is not a readable uncompressed tar file'):
        listed(str(tmp_path / 'bad.tar'))
    match = r"split 'set' has no shard pattern in webdataset_shards=\{'val'"
    with pytest.raises(SystemExit, match=match):
        sources.list_split('set', 'webdataset', webdataset_shards={'val': pattern})
    splits = {'a': os.path.join(shards, '00000.tar'),
              'b': os.path.join(shards, '{00000..00001}.tar')}
    with pytest.raises(SystemExit, match="'a' and 'b' share 4 images"):
        run_extract(*TINY, '--source=webdataset', f'--webdataset_shards={splits!r}',
                    "--splits=('a','b')", f'--data_dir={tmp_path}')


def synthetic_shards(folder, count, per_shard, image_size):
    """The synthetic images 0..count-1 of split 'train' as JPEG samples with .txt captions,
    per_shard a shard."""
    import demo
    os.makedirs(folder)
    for first in range(0, count, per_shard):
        members = []
        for i in range(first, min(first + per_shard, count)):
            buffer = io.BytesIO()
            demo.synthetic_image(0, 'train', image_size, i).save(buffer, format='JPEG', quality=95)
            caption = demo.synthetic_captions(*demo.synthetic_scene(0, 'train', i))[0]
            members += [(f'{i:09d}.jpg', buffer.getvalue()), (f'{i:09d}.txt', caption.encode())]
        write_shard(os.path.join(folder, f'{first // per_shard:05d}.tar'), members)
    return os.path.join(folder, f'{{00000..{(count - 1) // per_shard:05d}}}.tar')


@pytest.mark.parametrize('source', ['synthetic', 'webdataset'])
def test_killed_run_resumes_to_identical_arrays(tmp_path, source, huge_eva):
    args = [*TINY, '--extract_batch_size=2', "--splits=('train',)", '--clip_pretrained=']
    if source == 'synthetic':
        args += ['--source=synthetic', "--synthetic_counts={'train': 120}",
                 '--synthetic_image_size=128']
    else:  # EVA values clamped too: their count must resume as exactly as the rows
        pattern = synthetic_shards(str(tmp_path / 'shards'), 120, 40, 128)
        args += ['--source=webdataset', f'--webdataset_shards={{"train": {pattern!r}}}',
                 f'--eva_pretrained={huge_eva}']
    run_extract(*args, f'--data_dir={tmp_path / "whole"}')

    state = tmp_path / 'killed' / 'train' / '.extract_state.rank0.json'
    proc = subprocess.Popen([sys.executable, EXTRACT, *args, f'--data_dir={tmp_path / "killed"}'],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rows = 0
        while proc.poll() is None and rows < 20:
            try:
                rows = json.loads(state.read_text()).get('rows_done', 0)
            except (OSError, ValueError):  # not there yet
                pass
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and 20 <= rows < 120
    with open(tmp_path / 'killed' / 'train' / 'meta.json') as f:
        started = json.load(f)
    assert started['complete'] is False

    run_extract(*args, f'--data_dir={tmp_path / "killed"}')
    whole, whole_meta, whole_caps = load_folder(tmp_path / 'whole' / 'train')
    resumed, resumed_meta, resumed_caps = load_folder(tmp_path / 'killed' / 'train')
    for name in whole:
        assert np.array_equal(whole[name], resumed[name]), name
    # the same contents; each extraction its own identity, kept by the resume
    resumed_id, whole_id = resumed_meta.pop('extraction_id'), whole_meta.pop('extraction_id')
    assert resumed_id == started['extraction_id'] != whole_id
    assert whole_meta == resumed_meta and whole_caps == resumed_caps
    assert whole_meta['count'] == 120
    assert (whole_meta['eva_clamped_values'] > 0) == (source == 'webdataset')


def test_hf_vision_model_path(tmp_path):
    transformers = pytest.importorskip('transformers')
    config = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=96,
                                           num_hidden_layers=2, num_attention_heads=2,
                                           image_size=64, patch_size=16)
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(config).eval()
    model.save_pretrained(tmp_path / 'hf')
    processor = transformers.CLIPImageProcessor(size={'shortest_edge': 64},
                                                crop_size={'height': 64, 'width': 64},
                                                image_mean=[0.4, 0.5, 0.6],
                                                image_std=[0.2, 0.3, 0.25])
    processor.save_pretrained(tmp_path / 'hf')
    rng = np.random.default_rng(1)
    folder = tmp_path / 'images' / 'set'
    os.makedirs(folder)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f'{k}.png')

    run_extract(*TINY, f"--eva_model=hf:{tmp_path / 'hf'}", '--source=folder',
                f"--image_folder={tmp_path / 'images'}", "--splits=('set',)", '--clip_pretrained=',
                f"--data_dir={tmp_path / 'data'}")
    arrays, meta, _ = load_folder(tmp_path / 'data' / 'set')
    images = [Image.open(tmp_path / 'images' / 'set' / f).convert('RGB') for f in meta['files']]
    with torch.no_grad():
        pixels = processor(images=images, return_tensors='pt').pixel_values
        hidden = model(pixel_values=pixels).last_hidden_state
    assert arrays['eva'].shape == (3, 16, 48) and meta['eva']['dim'] == 48
    np.testing.assert_allclose(arrays['eva'], hidden[:, 1:].numpy(), rtol=2e-3, atol=2e-3)


KARPATHY = [  # (split, filepath, cocoid, captions) of a tiny dataset_coco.json, in its order
    ('test', 'val2014', 42, [f'forty-two {k} ' for k in range(7)]),
    ('train', 'train2014', 9, ['nine']),
    ('restval', 'val2014', 3, ['three', 'three again']),
    ('val', 'val2014', 5, ['five']),
    ('test', 'val2014', 17, ['seventeen']),
    ('train', 'train2014', 1, ['one', 'one more']),
]


def karpathy_entry(k, split, filepath, cocoid, captions):
    """images[k] of Karpathy's dataset_coco.json, with its fields."""
    sentences = [{'tokens': c.split(), 'raw': c, 'imgid': k, 'sentid': 10 * k + j}
                 for j, c in enumerate(captions)]
    return {'filepath': filepath, 'sentids': [s['sentid'] for s in sentences],
            'filename': f'COCO_{filepath}_{cocoid:012d}.jpg', 'imgid': k, 'split': split,
            'sentences': sentences, 'cocoid': cocoid}


def write_karpathy(root, entries):
    """coco_root with annotations/dataset_coco.json of `entries` and a 48 x 64 JPEG for each."""
    rng = np.random.default_rng(0)
    for e in entries:
        os.makedirs(os.path.join(root, 'images', e['filepath']), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
            os.path.join(root, 'images', e['filepath'], e['filename']))
    os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
    path = os.path.join(root, 'annotations', 'dataset_coco.json')
    with open(path, 'w') as f:
        json.dump({'images': entries, 'dataset': 'coco'}, f)
    return path


def test_coco_karpathy_source_rows_captions_splits_and_canary(tmp_path, monkeypatch):
    """train + restval -> karpathy_train, test -> karpathy_test (the reported split), val in
    neither; rows in cocoid order with all their captions; eval.py sets R beside the published
    figures."""
    root = str(tmp_path / 'coco')
    path = write_karpathy(root, [karpathy_entry(k, *e) for k, e in enumerate(KARPATHY)])
    data_dir = tmp_path / 'data'
    run_extract(*TINY, '--source=coco_karpathy', f'--coco_root={root}', f'--data_dir={data_dir}',
                "--splits=('karpathy_train','karpathy_test')", '--clip_pretrained=')
    train, train_meta, train_caps = load_folder(data_dir / 'karpathy_train')
    test, meta, caps = load_folder(data_dir / 'karpathy_test')
    assert train_meta['image_ids'] == [1, 3, 9] and len(train['clip']) == 3
    assert train_meta['files'] == ['train2014/COCO_train2014_000000000001.jpg',
                                   'val2014/COCO_val2014_000000000003.jpg',
                                   'train2014/COCO_train2014_000000000009.jpg']
    assert train_caps == {'1': ['one', 'one more'], '3': ['three', 'three again'], '9': ['nine']}
    assert meta['image_ids'] == [17, 42] and test['clip'].shape == (2, 16, 64)
    # all 7, stripped
    assert caps == {'17': ['seventeen'], '42': [f'forty-two {k}' for k in range(7)]}
    assert meta['source'] == {'kind': 'coco_karpathy', 'split': 'karpathy_test',
                              'karpathy_splits': ['test'], 'annotations': path,
                              'root': os.path.join(root, 'images'), 'listed': 2,
                              'files_sha1': meta['source']['files_sha1']}
    assert train_meta['source']['karpathy_splits'] == ['train', 'restval']
    import sources
    assert sources.list_split('karpathy_val', 'coco_karpathy', coco_root=root)['ids'] == [5]
    match = "split 'val2014' is not one of karpathy_train, karpathy_val"
    with pytest.raises(SystemExit, match=match):
        sources.list_split('val2014', 'coco_karpathy', coco_root=root)

    # eval.py on the reported split: a known row (here the tiny CLIP's, on a 2-image "test split")
    import published
    row = {'image_to_text': {1: 50.0, 5: 90.0, 10: 100.0},
           'text_to_image': {1: 40.0, 5: 100.0, 10: 100.0}}
    monkeypatch.setitem(published.PUBLISHED, ('tiny-clip', ''), row)
    monkeypatch.setattr(published, 'KARPATHY_TEST_IMAGES', 2)
    monkeypatch.setattr(sys, 'argv', [
        'eval.py', f"--val_data={data_dir / 'karpathy_test'}", f"--out_dir={tmp_path / 'out'}",
        '--clip_model=tiny-clip', '--clip_pretrained=', '--tasks=recall', '--bootstrap_samples=0'])
    runpy.run_path(os.path.join(ROOT, 'eval.py'), run_name='__main__')
    summary = data.read_json(str(tmp_path / 'out' / 'eval' / 'recall_summary.json'))
    record = summary['published']
    assert record['comparable'] is True and record['model'] == 'tiny-clip'
    for d, by_k in row.items():
        for k, value in by_k.items():
            figure = record['figures'][d][f'recall@{k}']
            r = 100 * summary['reference'][d][f'recall@{k}']
            assert figure == {'published': value, 'r': r, 'difference': r - value}
    assert record['off_by_more_than_threshold'] == [
        f"{d} R@{k} {100 * summary['reference'][d][f'recall@{k}']:.2f} vs {v:.2f}"
        for d, by_k in row.items() for k, v in by_k.items()
        if abs(100 * summary['reference'][d][f'recall@{k}'] - v) > 1.5]


@pytest.mark.parametrize('fault, message', [
    (lambda e: e[3].pop('split'),
     r"images\[3\] \(cocoid 5, COCO_val2014_000000000005\.jpg\) has no 'split'"),
    (lambda e: e[1].pop('filepath'), r"images\[1\] \(cocoid 9, .*\) has no 'filepath'"),
    (lambda e: e[4].update(sentences=[]), r"images\[4\] \(cocoid 17, .*\) has sentences \[\]: "
                                          r"expected a non-empty list"),
    (lambda e: e[2]['sentences'][1].update(raw='  '),
     r"images\[2\] \(cocoid 3, .*\) has sentences"),
    (lambda e: e[0].update(split='testing'), r"images\[0\] .* has split 'testing': expected"),
    (lambda e: e[5].update(cocoid=9), r"images\[5\] repeats cocoid 9 of images\[1\]"),
    ('missing', r"images\[4\] \(cocoid 17\) is not on disk: .*COCO_val2014_000000000017\.jpg"),
])
def test_coco_karpathy_malformed_entries_stop_before_any_folder(tmp_path, fault, message):
    """Each fault names dataset_coco.json, the entry and what is wrong; no data folder is
    written."""
    root = str(tmp_path / 'coco')
    entries = [karpathy_entry(k, *e) for k, e in enumerate(KARPATHY)]
    path = write_karpathy(root, entries)
    if fault == 'missing':
        os.remove(os.path.join(root, 'images', 'val2014', entries[4]['filename']))
    else:
        fault(entries)
        with open(path, 'w') as f:
            json.dump({'images': entries}, f)
    with pytest.raises(SystemExit, match=re.escape(path) + ': ' + message):
        run_extract(*TINY, '--source=coco_karpathy', f'--coco_root={root}', '--clip_pretrained=',
                    f"--data_dir={tmp_path / 'data'}",
                    "--splits=('karpathy_train','karpathy_test')")
    assert not os.path.exists(tmp_path / 'data')
    with open(path, 'w') as f:
        f.write('{"images": {}}')
    with pytest.raises(SystemExit, match=re.escape(path) + " is not Karpathy's dataset_coco.json"):
        run_extract(*TINY, '--source=coco_karpathy', f'--coco_root={root}',
                    "--splits=('karpathy_test',)")


def test_crops_are_shared_only_by_equal_transforms():
    import extract
    from torchvision import transforms

    class RedToBlue:
        """Changes only pure red pixels: the noise probe has none, so it cannot see this."""
        def __call__(self, image):
            pixels = np.array(image)
            pixels[(pixels == (255, 0, 0)).all(-1)] = (0, 0, 255)
            return Image.fromarray(pixels)

    crop = lambda *first: transforms.Compose([*first, transforms.Resize(32),
                                              transforms.CenterCrop(32), transforms.PILToTensor()])
    probe = Image.fromarray(np.random.default_rng(0).integers(0, 256, (251, 317, 3), np.uint8))
    assert torch.equal(crop()(probe), crop(RedToBlue())(probe))  # the probe is blind to it
    assert not extract.shares_crop(crop(), crop(RedToBlue()))
    assert extract.shares_crop(crop(), crop())  # two equal transforms, built apart
    assert not extract.shares_crop(crop(), transforms.Compose([transforms.Resize(48),
                                                               transforms.CenterCrop(32),
                                                               transforms.PILToTensor()]))
