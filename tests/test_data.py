"""data.py: the data folder's checks name the file and the values; atomic writes; the training row
stream."""
import json
import os

import numpy as np
import pytest

import data
import flow
from conftest import make_data_folder


def edit_meta(folder, **changes):
    path = os.path.join(folder, 'meta.json')
    meta = {**data.read_json(path), **changes}
    data.write_json(path, meta)
    return path


def test_open_folder_returns_meta_paths_and_shapes(data_folder):
    meta = data.open_folder(data_folder, arrays=tuple(data.ARRAYS))
    assert meta['count'] == 16 and meta['shapes'] == {'clip': (16, 16, 8), 'eva': (16, 16, 12),
                                                      'clip_cls': (16, 6)}
    assert meta['paths']['eva'] == os.path.join(data_folder, 'eva.npy')


@pytest.mark.parametrize('case', ['no_folder', 'incomplete', 'rows', 'tokens', 'stats', 'std'])
def test_open_folder_names_file_expected_and_actual(case, tmp_path):
    folder = make_data_folder(str(tmp_path / 'data'))
    meta_path = os.path.join(folder, 'meta.json')
    if case == 'no_folder':
        folder, expected = str(tmp_path / 'nope'), ["train_data: data folder", 'nope', 'not found',
                                                    'run extract']
    elif case == 'incomplete':
        expected = [edit_meta(folder, complete=False), "'complete' is not true"]
    elif case == 'rows':
        edit_meta(folder, count=17)
        expected = [f'{folder}: clip.npy has 16 rows, eva.npy 16, meta.json count 17']
    elif case == 'tokens':
        meta = data.read_json(meta_path)
        expected = [edit_meta(folder, clip={**meta['clip'], 'dim': 9}),
                    'describes clip tokens [16, 9]', os.path.join(folder, 'clip.npy'),
                    'holds [16, 8]']
    elif case == 'stats':
        expected = [edit_meta(folder, clip_mean=[0.0] * 3), 'clip_mean should have 8 values',
                    'got 3']
    else:
        expected = [edit_meta(folder, clip_std=[1.0] * 7 + [0.0]), 'clip_std must be positive']
    with pytest.raises(SystemExit) as e:
        data.open_folder(folder, setting='train_data', remedy='run extract.py')
    for text in expected:
        assert text in str(e.value), str(e.value)


def test_check_finite_names_the_row(data_folder):
    eva = np.load(os.path.join(data_folder, 'eva.npy'), mmap_mode='r+')
    eva[8, 0, :2] = np.nan
    eva.flush()
    with pytest.raises(SystemExit, match=r'eva.npy: row 8 has 2 NaN and 0 inf values'):
        data.check_finite(os.path.join(data_folder, 'eva.npy'), samples=16)


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / 'state.json')
    data.write_json(path, {'rows_done': 3})

    def half_then_crash(f):
        f.write('{"rows_do')
        raise RuntimeError('killed')
    with pytest.raises(RuntimeError):
        data.write_atomic(path, half_then_crash)
    assert json.load(open(path)) == {'rows_done': 3}


def test_stream_rows_is_a_seeded_permutation_per_epoch():
    stream = data.stream_rows(seed=7, n_rows=10, start=0, count=30)
    for epoch in range(3):
        assert sorted(stream[10 * epoch:10 * epoch + 10]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:20])  # a new order every epoch
    # any window of the stream reads the same rows, whatever the batch boundaries
    assert np.array_equal(data.stream_rows(7, 10, 13, 9), stream[13:22])
    assert not np.array_equal(data.stream_rows(8, 10, 0, 10), stream[:10])


def test_read_rows_reads_ascending(data_folder):
    clip = np.load(os.path.join(data_folder, 'clip.npy'))
    np.testing.assert_array_equal(data.read_rows(os.path.join(data_folder, 'clip.npy'),
                                                 np.array([5, 1, 3])),
                                  clip[[1, 3, 5]])


def test_samples_name_tells_every_setting_the_result_depends_on():
    heun = flow.Sampler(method='heun', steps=5, cfg_scale=1.0, seed=1337)
    assert data.samples_name('out/demo/ckpt.pt', heun) == 'ckpt-heun5-cfg1-seed1337'
    euler = flow.Sampler(method='euler', steps=10, cfg_scale=1.5, seed=7, shift=2.0, use_ema=False)
    assert data.samples_name('/x/ckpt_iter000400.pt',
                             euler) == 'ckpt_iter000400-euler10-shift2-cfg1.5-raw-seed7'
    assert data.samples_name('out/demo/ckpt.pt', heun,
                             holdout=True) == 'ckpt-heun5-cfg1-seed1337-holdout'
    # a regression checkpoint has no sampler: every sampler setting names the same folder
    regression = flow.Sampler(method='heun', steps=5, cfg_scale=2.0,
                              seed=1).for_objective('regression')
    assert data.samples_name('r/ckpt.pt', regression) == 'ckpt-regression'


def test_the_held_out_slice_is_train_pys():
    assert data.holdout_range(118287, 0.02, 'train2017') == (115921, 2366)
    assert data.holdout_range(2000, 0.2, 'train') == (1600, 400)
    for fraction in (0.0, 1.0):
        with pytest.raises(SystemExit,
                           match=f"val_fraction={fraction} of the 10 rows of f holds out"):
            data.holdout_range(10, fraction, 'f')


def test_resume_position_starts_a_new_epoch_on_another_training_set():
    ckpt = {'data_position': {'samples_seen': 250, 'train_rows': 100, 'epoch': 2, 'index': 50}}
    assert data.resume_position(ckpt, 100) == (250, None)
    samples_seen, note = data.resume_position(ckpt, 80)
    assert samples_seen == 3 * 80
    assert note == ("resume: train_data has 80 rows, the checkpoint was trained on 100: "
                    "starting a new epoch")
