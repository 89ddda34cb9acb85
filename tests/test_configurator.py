import subprocess
import sys

import pytest

from conftest import ROOT
from configurator import configure


def settings():
    return dict(learning_rate=1e-4, max_iters=100, compile=True, out_dir='out', n_kv_heads=None, k_values=(1, 5, 10))


def test_overrides_parse_python_literals_and_keep_strings():
    ns = settings()
    config = configure(ns, ['--max_iters=5', '--compile=False', '--out_dir=out/a=b', '--k_values=(1, 2)',
                            '--n_kv_heads=4', '--learning_rate=3e-4'])
    assert ns['max_iters'] == 5 and ns['compile'] is False and ns['out_dir'] == 'out/a=b'
    assert ns['k_values'] == (1, 2) and ns['n_kv_heads'] == 4 and ns['learning_rate'] == 3e-4
    assert config == {k: ns[k] for k in settings()}


def test_int_accepted_where_float_expected_and_string_setting_keeps_numbers_as_text():
    ns = settings()
    configure(ns, ['--learning_rate=1', '--out_dir=123'])
    assert ns['learning_rate'] == 1.0 and isinstance(ns['learning_rate'], float)
    assert ns['out_dir'] == '123'


def test_unknown_key_names_the_closest_valid_keys():
    with pytest.raises(SystemExit, match=r"unknown key 'learning_rat'.*did you mean learning_rate"):
        configure(settings(), ['--learning_rat=1e-3'])


def test_wrong_type_is_refused_with_key_types_and_source():
    with pytest.raises(SystemExit, match=r"max_iters expects int .* got str 'many' from --max_iters=many"):
        configure(settings(), ['--max_iters=many'])
    with pytest.raises(SystemExit, match=r"compile expects bool"):
        configure(settings(), ['--compile=1'])


def test_config_file_sets_known_keys_ignores_other_stages_keys_and_checks_types(tmp_path):
    path = tmp_path / 'c.py'
    path.write_text("max_iters = 7\nlearning_rate = max_iters * 1e-5\nsome_other_stage_key = 'x'\n")
    ns = settings()
    configure(ns, [str(path), '--max_iters=9'])
    assert ns['max_iters'] == 9 and ns['learning_rate'] == pytest.approx(7e-5)
    assert 'some_other_stage_key' not in ns
    path.write_text("compile = 'yes'\n")
    with pytest.raises(SystemExit, match=rf"compile expects bool .* from {path}"):
        configure(settings(), [str(path)])
    with pytest.raises(SystemExit, match="cannot read config file nope.py"):
        configure(settings(), ['nope.py'])


def test_shipped_config_files_parse_for_the_model():
    from model import DiTConfig
    for name, dim in (('dit_large', 1792), ('dit_large_eva02e', 1792), ('dit_base', 768), ('demo', None)):
        ns = {k: v for k, v in vars(DiTConfig()).items()}
        configure(ns, [f'{ROOT}/config/{name}.py'])
        cfg = DiTConfig(**ns)
        assert dim is None or cfg.dim == dim
        assert cfg.dim % cfg.n_heads == 0


def test_gpu_configs_train_epochs_of_train2017_and_validate_on_a_slice_of_it():
    """The schedule derives from `epochs` and the global batch; val2017 stays the test set."""
    keys = ('max_iters', 'lr_decay_iters', 'warmup_iters', 'eval_interval', 'keep_interval', 'batch_size',
            'gradient_accumulation_steps')
    for name in ('dit_large', 'dit_large_eva02e', 'dit_base'):
        c = configure({**dict.fromkeys(keys, 0), 'val_fraction': 0.0}, [f'{ROOT}/config/{name}.py'])
        train_rows = 118287 - round(118287 * c['val_fraction'])  # COCO train2017 less the held-out slice
        epochs = c['max_iters'] * c['batch_size'] * c['gradient_accumulation_steps'] / train_rows
        assert 0.02 <= c['val_fraction'] <= 0.05 and epochs == pytest.approx(10, rel=0.01), (name, c)
        assert c['lr_decay_iters'] == c['max_iters'] and 0 < c['warmup_iters'] <= c['max_iters'] // 10
        assert c['max_iters'] % c['eval_interval'] == 0 and c['max_iters'] % c['keep_interval'] == 0


def test_command_line_error_is_one_clear_line():
    code = "from configurator import configure; x = 1; configure(globals())"
    result = subprocess.run([sys.executable, '-c', code, '--y=2'], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == "config error: unknown key 'y' in '--y=2'"


def test_renamed_key_names_its_new_name():
    ns = {'extract_batch_size': 64}
    with pytest.raises(SystemExit, match=r"--batch_size is now --extract_batch_size"):
        configure(ns, ['--batch_size=8'], renamed={'batch_size': 'extract_batch_size'})
    assert configure(ns, ['--extract_batch_size=8'], renamed={'batch_size': 'extract_batch_size'}) == \
        {'extract_batch_size': 8}
