"""Shared test fixtures: a small random data folder (data.write_random_folder), and a tiny
CLIP with eval.py run in this process (tests/test_eval.py, tests/test_fidelity.py)."""
import json
import os
import runpy
import sys

import pytest

# Tiny models run fastest on one thread, and pytest often runs beside a script it launched: two
# OpenMP threads that wait on a busy core crawl (20x on the 2-core box). Set before torch is
# imported; inherited.
os.environ['OMP_NUM_THREADS'] = '1'
import numpy as np  # noqa: E402  (after the setting: numpy's BLAS reads it at import)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data import write_random_folder as make_data_folder  # noqa: E402  (tests import it)


@pytest.fixture
def data_folder(tmp_path):
    return make_data_folder(str(tmp_path / 'data'))


EVAL = os.path.join(ROOT, 'eval.py')
# A tiny CLIP: 16 tokens of width 8 (4x4 patches of a 16 px image), joint space 6, one layer per
# tower.
TINY_CLIP = {'embed_dim': 6, 'quick_gelu': True,
             'vision_cfg': {'image_size': 16, 'layers': 1, 'width': 8, 'head_width': 8,
                            'patch_size': 4},
             'text_cfg': {'context_length': 16, 'vocab_size': 49408, 'width': 8, 'heads': 1,
                          'layers': 1}}


@pytest.fixture(scope='module')
def tiny_clip(tmp_path_factory):
    """Register eval-test-tiny-clip (and its pool_type='avg' twin) with open_clip; return the
    name."""
    import open_clip
    folder = tmp_path_factory.mktemp('encoders')
    avg = json.loads(json.dumps(TINY_CLIP))
    avg['vision_cfg']['pool_type'] = 'avg'
    for name, cfg in [('eval-test-tiny-clip', TINY_CLIP), ('eval-test-tiny-clip-avg', avg)]:
        with open(folder / f'{name}.json', 'w') as f:
            json.dump(cfg, f)
    open_clip.add_model_config(str(folder))
    return 'eval-test-tiny-clip'


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
