"""nanoGPT-style configuration: `python X.py config/file.py --key=value ...`

A script declares its settings as plain globals, then calls `configure(globals())`.
- a bare argument is a Python file executed on top of the settings; it may set keys of other
  stages too (one file drives every stage), those are ignored here;
- `--key=value` overrides an existing setting; the value is parsed with ast.literal_eval and
  kept as a plain string when that fails (so `--out_dir=out/run-1` works);
- an unknown `--key` fails and names the closest valid keys, a renamed one its new name;
- a value of the wrong type fails (an int is accepted where the default is a float; a None default
  accepts anything).
"""
import ast
import difflib
import sys

CONFIG_TYPES = (int, float, bool, str, type(None), tuple, list, dict)


def config_keys(namespace):
    """The settings of a script: its public globals of plain types."""
    return [k for k, v in namespace.items() if not k.startswith('_') and isinstance(v, CONFIG_TYPES)]


def checked_value(key, default, value, source):
    """Value converted to the type of the default, or SystemExit naming key, types and source."""
    if default is None or value is None or type(value) is type(default):
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    raise SystemExit(f"config error: {key} expects {type(default).__name__} (default {default!r}), "
                     f"got {type(value).__name__} {value!r} from {source}")


def parse_value(text, default):
    """literal_eval where it parses (and, for a string setting, gives a string); the raw text otherwise."""
    try:
        value = ast.literal_eval(text)
    except (SyntaxError, ValueError):
        return text
    return text if isinstance(default, str) and not isinstance(value, str) else value


def configure(namespace, argv=None, renamed=None):
    """Apply config files and --key=value overrides to `namespace`; return the settings as a dict.

    renamed: {old name: new name} of this script's settings; passing an old name fails naming the new one.
    """
    argv = sys.argv[1:] if argv is None else argv
    renamed = renamed or {}
    keys = config_keys(namespace)
    for arg in argv:
        if not arg.startswith('--'):
            try:
                with open(arg) as f:
                    code = compile(f.read(), arg, 'exec')
            except OSError as e:
                raise SystemExit(f"config error: cannot read config file {arg}: {e.strerror}")
            scope = {k: namespace[k] for k in keys}
            exec(code, scope)
            print(f"config: {arg}")
            for key in keys:
                if scope[key] is not namespace[key]:
                    namespace[key] = checked_value(key, namespace[key], scope[key], arg)
        else:
            key, sep, text = arg[2:].partition('=')
            if not sep:
                raise SystemExit(f"config error: expected --key=value, got {arg!r}")
            if key in renamed:
                raise SystemExit(f"config error: --{key} is now --{renamed[key]} in this script "
                                 f"(a plain {key} belongs to another stage)")
            if key not in keys:
                close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise SystemExit(f"config error: unknown key {key!r} in {arg!r}{hint}")
            namespace[key] = checked_value(key, namespace[key], parse_value(text, namespace[key]), arg)
            print(f"config: {key} = {namespace[key]!r}")
    return {k: namespace[k] for k in keys}
