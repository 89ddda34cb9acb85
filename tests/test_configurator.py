import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from configurator import configure, require_positive


def settings():
    return dict(learning_rate=1e-4, max_iters=100, compile=True, out_dir='out', n_kv_heads=None,
                k_values=(1, 5, 10))


def test_overrides_parse_python_literals_and_keep_strings():
    ns = settings()
    config = configure(ns,
                       ['--max_iters=5', '--compile=False', '--out_dir=out/a=b',
                        '--k_values=(1, 2)',
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
    with pytest.raises(SystemExit, match=r"max_iters expects int .* got str 'many' from "
                                         r"--max_iters=many"):
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
    for name, dim in (('dit_large', 1792), ('dit_large_eva02e', 1792), ('dit_base', 768),
                      ('demo', None)):
        ns = {k: v for k, v in vars(DiTConfig()).items()}
        configure(ns, [f'{ROOT}/config/{name}.py'])
        cfg = DiTConfig(**ns)
        assert dim is None or cfg.dim == dim
        assert cfg.dim % cfg.n_heads == 0


def test_gpu_configs_train_epochs_of_train2017_and_validate_on_a_slice_of_it():
    """The schedule derives from `epochs` and the global batch; val2017 stays the test set."""
    keys = ('max_iters', 'lr_decay_iters', 'warmup_iters', 'eval_interval', 'keep_interval',
            'batch_size', 'gradient_accumulation_steps')
    for name in ('dit_large', 'dit_large_eva02e', 'dit_base'):
        c = configure({**dict.fromkeys(keys, 0), 'val_fraction': 0.0}, [f'{ROOT}/config/{name}.py'])
        # COCO train2017 less the held-out slice
        train_rows = 118287 - round(118287 * c['val_fraction'])
        epochs = c['max_iters'] * c['batch_size'] * c['gradient_accumulation_steps'] / train_rows
        assert 0.02 <= c['val_fraction'] <= 0.05, (name, c)
        assert epochs == pytest.approx(10, rel=0.01), (name, c)
        assert c['lr_decay_iters'] == c['max_iters']
        assert 0 < c['warmup_iters'] <= c['max_iters'] // 10
        assert c['max_iters'] % c['eval_interval'] == 0 and c['max_iters'] % c['keep_interval'] == 0


def test_command_line_error_is_one_clear_line():
    code = "from configurator import configure; x = 1; configure(globals())"
    result = subprocess.run([sys.executable, '-c', code, '--y=2'], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == "config error: unknown key 'y' in '--y=2'"


def test_renamed_key_names_its_new_name():
    ns = {'extract_batch_size': 64}
    with pytest.raises(SystemExit, match=r"--batch_size is now --extract_batch_size"):
        configure(ns, ['--batch_size=8'], renamed={'batch_size': 'extract_batch_size'})
    assert configure(ns, ['--extract_batch_size=8'],
                     renamed={'batch_size': 'extract_batch_size'}) == \
        {'extract_batch_size': 8}


def run_script(*args, cwd=ROOT):
    env = {**os.environ, 'PYTHONPATH': ROOT}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True)


def test_help_lists_each_setting_with_its_value_where_it_was_set_and_its_comment(tmp_path):
    script = tmp_path / 'stage.py'
    script.write_text(
        "import sys\n"
        "# -----------------------------------------------------------------------------\n"
        "# optimisation\n"
        "max_iters = 100  # iterations to train\n"
        "learning_rate = (1e-3 if sys.argv\n"
        "                 else 1e-4)  # peak rate\n"
        "out_dir = 'out'\n"
        "steps = (5, 10)  # Euler steps, '#' in a string stays: 'a # b'\n"
        "                 # (a second comment line)\n"
        "CONSTANT = 3\n"
        "# -----------------------------------------------------------------------------\n"
        "from configurator import configure\n"
        "configure(globals())\n"
        "print('not reached')\n")
    (tmp_path / 'c.py').write_text("# a config file\nmax_iters = 800\n")
    for flag in ('--help', '-h'):
        result = run_script(script, 'c.py', '--out_dir=x', flag, '--unknown=1', cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == "usage: python stage.py [config/file.py ...] [--key=value ...]"
        assert lines[1] == "# optimisation"
        assert re.fullmatch(r"  max_iters = 800  \(c\.py:2; default 100\) +# iterations to train",
                            lines[2])
        assert re.fullmatch(r"  learning_rate = 0\.001 +# peak rate", lines[3])
        assert lines[4] == "  out_dir = 'x'  (--out_dir=x; default 'out')"
        assert re.fullmatch(r"  steps = \(5, 10\) +# Euler steps, '#' in a string stays: 'a # b' "
                            r"\(a second comment line\)", lines[5])
        assert len(lines) == 6 and 'CONSTANT' not in result.stdout and not result.stderr


def test_help_of_the_real_scripts_needs_no_data():
    result = run_script('sample.py', '--help')
    assert result.returncode == 0, result.stderr
    assert re.search(r"^  sample_steps = 10 +# midpoint 10 ", result.stdout, re.M)
    result = run_script('train.py', 'config/demo.py', '-h')
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python train.py [config/file.py ...] "
                                    "[--key=value ...]\n")
    assert re.search(r"^  max_iters = 800  \(config/demo\.py:\d+; default 100000\)$",
                     result.stdout, re.M)
    assert re.search(r"^  batch_size = 64  \(config/demo\.py:\d+; default 32\) +# per "
                     r"rank and micro-step$", result.stdout, re.M)


def test_type_error_says_where_the_values_came_from_and_shows_an_example(tmp_path):
    path = tmp_path / 'c.py'
    path.write_text("\nmax_iters = 800\nsteps = 5\n")
    ns = {'max_iters': 100000, 'steps': (1,)}
    with pytest.raises(SystemExit, match=re.escape(
            f"max_iters expects int (now 800, set by {path}:2; script default 100000), "
            f"got str 'abc' from "
            "--max_iters=abc; e.g. --max_iters=800")):
        configure(dict(ns, steps=5), [str(path), '--max_iters=abc'])
    with pytest.raises(SystemExit, match=re.escape(
            f"steps expects tuple (default (1,)), got int 5 from {path}:3; e.g. steps = (5,)")):
        configure(dict(ns), [str(path)])
    with pytest.raises(SystemExit, match=re.escape(
            "steps expects tuple (default (5, 10)), got int 5 from --steps=5; "
            "e.g. --steps=\"(5,)\"")):
        configure({'steps': (5, 10)}, ['--steps=5'])


def test_broken_config_file_names_file_line_and_error_without_a_traceback(tmp_path):
    path = tmp_path / 'bad.py'
    path.write_text("max_iters = 5\nmax_iters = = 3\n")
    with pytest.raises(SystemExit, match=re.escape(
            f"config file {path}, line 2: SyntaxError: invalid syntax (`max_iters = = 3`)")):
        configure({'max_iters': 1}, [str(path)])
    path.write_text("def f(n):\n    return 1 // n\n\nmax_iters = f(0)\n")
    with pytest.raises(SystemExit, match=re.escape(
            f"config file {path}, line 2: ZeroDivisionError: integer division or modulo by zero "
            f"(`return 1 // n`)")):
        configure({'max_iters': 1}, [str(path)])
    result = run_script('-c', "from configurator import configure; x = 1; configure(globals())",
                        path)
    assert result.returncode == 1 and result.stderr.startswith("config error: config file ")
    assert 'Traceback' not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_require_positive_names_each_offending_key_and_value():
    config = {'batch_size': 0, 'max_iters': 10, 'eval_batch_size': -2, 'shift': 0.0, 'flag': True}
    require_positive(config, 'max_iters')
    with pytest.raises(SystemExit, match=re.escape(
            "config error: batch_size must be a positive integer, got 0; eval_batch_size "
            "must be a positive integer, got -2; shift must be a positive number, got 0.0; flag "
            "must be a positive integer, got True")):
        require_positive(config, 'batch_size', 'max_iters', 'eval_batch_size', 'shift', 'flag')
