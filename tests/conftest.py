"""Shared test fixtures: a small random data folder in the format of data.py's docstring."""
import json
import os
import sys

import numpy as np
import pytest

# Tiny models run fastest on one thread, and pytest often runs beside a script it launched: two OpenMP
# threads that wait on a busy core crawl (20x on the 2-core box). Set before torch is imported; inherited.
os.environ['OMP_NUM_THREADS'] = '1'

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_data_folder(path, n=16, tokens=16, clip_dim=8, eva_dim=12, embed_dim=6, seed=0,
                     captions_per_image=(1, 5, 7)):
    """Write clip.npy, eva.npy, clip_cls.npy, meta.json, captions.json with random contents.

    The CLIP targets are a fixed function of the EVA tokens, so a model can learn them.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    eva = rng.standard_normal((n, tokens, eva_dim)).astype(np.float32)
    mixing = rng.standard_normal((eva_dim, clip_dim)).astype(np.float32) / np.sqrt(eva_dim)
    clip = np.tanh(eva @ mixing) * 2.0 + 0.5
    cls = rng.standard_normal((n, embed_dim)).astype(np.float32)
    for name, array, dtype in [('clip.npy', clip, np.float16), ('eva.npy', eva, np.float16),
                               ('clip_cls.npy', cls, np.float32)]:
        out = np.lib.format.open_memmap(os.path.join(path, name), mode='w+', dtype=dtype, shape=array.shape)
        out[:] = array
        out.flush()
        del out
    clip64 = clip.astype(np.float16).astype(np.float64).reshape(-1, clip_dim)
    image_ids = list(range(100, 100 + n))
    meta = {
        'format': 'blip3o-dit-data', 'version': 1, 'source': {'kind': 'random', 'seed': seed},
        'count': n, 'image_ids': image_ids, 'files': [f'{i}.png' for i in image_ids],
        'clip': {'model': 'random', 'pretrained': None, 'tokens': tokens, 'dim': clip_dim, 'embed_dim': embed_dim},
        'eva': {'model': 'random', 'pretrained': None, 'tokens': tokens, 'dim': eva_dim},
        'dtype': 'float16',
        'clip_mean': clip64.mean(0).tolist(), 'clip_std': clip64.std(0).tolist(),
        'skipped': [], 'complete': True,
    }
    with open(os.path.join(path, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    captions = {str(i): [f'caption {c} of image {i}' for c in range(captions_per_image[k % len(captions_per_image)])]
                for k, i in enumerate(image_ids)}
    with open(os.path.join(path, 'captions.json'), 'w') as f:
        json.dump(captions, f)
    return path


@pytest.fixture
def data_folder(tmp_path):
    return make_data_folder(str(tmp_path / 'data'))
