"""nanoGPT-style configuration: `python X.py config/file.py --key=value ...`

A script declares its settings as plain globals, then calls `configure(globals())`.
- a bare argument is a Python file executed on top of the settings; it may set keys of other
  stages too (one file drives every stage), those are ignored here;
- `--key=value` overrides an existing setting; the value is parsed with ast.literal_eval and
  kept as a plain string when that fails (so `--out_dir=out/run-1` works);
- an unknown `--key` fails and names the closest valid keys, a renamed one its new name;
- a value of the wrong type fails naming where it and the current value came from, with an
  example (an int is accepted where the default is a float; a None default accepts anything);
- `--help` / `-h` prints each setting, its value after the arguments before it, where that was
  set and the script's comment beside it, then exits; UPPER_CASE globals are constants.
After configure, `require_positive(config, 'batch_size', ...)` stops on sizes and counts not > 0.
"""
import ast
import difflib
import io
import os
import re
import shlex
import sys
import tokenize
import traceback

CONFIG_TYPES = (int, float, bool, str, type(None), tuple, list, dict)
HELP_FLAGS = ('-h', '--help')


def config_keys(namespace):
    """The settings of a script: its public, not UPPER_CASE globals of plain types."""
    return [k for k, v in namespace.items()
            if not k.startswith('_') and not k.isupper() and isinstance(v, CONFIG_TYPES)]


def assignments(tree):
    """{name: [(first line, last line) of each module-level statement that assigns it]}."""
    lines = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for name in (n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)):
                lines.setdefault(name, []).append((node.lineno, node.end_lineno))
    return lines


def setting_comments(path):
    """{name: (comment lines directly above, comment beside)} of a script's source; {} if unread."""
    try:
        with open(path) as f:
            source = f.read()
        tree = ast.parse(source)
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
                  if t.type == tokenize.COMMENT]
    except (OSError, SyntaxError, tokenize.TokenError):
        return {}
    comments = {t.start[0]: (t.start[1], t.string.lstrip('#').strip()) for t in tokens}
    own_line = {t.start[0] for t in tokens if not t.line[:t.start[1]].strip()}
    result = {}
    for name, [(first, last), *_] in assignments(tree).items():  # where the script declares it
        beside = [comments[r][1] for r in range(first, last + 1) if r in comments]
        row = last + 1
        # an indented comment line continues the one beside
        while row in own_line and comments[row][0] > 0:
            beside.append(comments[row][1])
            row += 1
        above, row = [], first - 1
        # stop at a # --- rule
        while row in own_line and comments[row][0] == 0 and comments[row][1].strip('-'):
            above.insert(0, comments[row][1])
            row -= 1
        result[name] = (above, ' '.join(beside))
    return result


def print_help(namespace, keys, defaults, sources):
    """The usage line, then each setting: its value, where set if not the default, its comment."""
    path = namespace.get('__file__', '')
    comments = setting_comments(path) if path else {}
    print(f"usage: python {os.path.basename(path) or '<script>'} [config/file.py ...] "
          f"[--key=value ...]")
    for key in keys:
        above, beside = comments.get(key, ([], ''))
        left = f"  {key} = {namespace[key]!r}"
        if key in sources and namespace[key] != defaults[key]:
            left += f"  ({sources[key]}; default {defaults[key]!r})"
        print(''.join(f"# {line}\n" for line in above)
              + (f"{left:40}  # {beside}" if beside else left))


def shell_word(value):
    """value as a --key= argument that reads it back: bare if the shell allows, else quoted."""
    text = repr(value)
    if re.fullmatch(r'[\w@%+=:,./-]+', text):
        return text
    return shlex.quote(text) if re.search(r'["$`\\!]', text) else f'"{text}"'


def checked_value(key, value, source, default, current, current_source):
    """value as the default's type, or SystemExit naming key, types, sources and an example."""
    if default is None or value is None or type(value) is type(default):
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    now = f"now {current!r}, set by {current_source}; script " if current_source else ""
    if isinstance(default, (tuple, list)) and isinstance(value, (int, float, str)):
        # a bare item where a sequence is expected: show it wrapped
        current = type(default)([value])
    example = (f"--{key}={shell_word(current)}" if source.startswith('--') else
               f"{key} = {current!r}")
    raise SystemExit(f"config error: {key} expects {type(default).__name__} "
                     f"({now}default {default!r}), got {type(value).__name__} {value!r} from "
                     f"{source}; e.g. {example}")


def parse_value(text, default):
    """literal_eval where it parses (giving a string for a string setting); else the raw text."""
    try:
        value = ast.literal_eval(text)
    except (SyntaxError, ValueError):
        return text
    return text if isinstance(default, str) and not isinstance(value, str) else value


def run_config_file(path, settings):
    """Run a config file on settings: [(key, value, "file:line")] it set; SystemExit on errors."""
    try:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        code = compile(tree, path, 'exec')
    except OSError as e:
        raise SystemExit(f"config error: cannot read config file {path}: {e.strerror}")
    except SyntaxError as e:
        raise SystemExit(f"config error: config file {path}, line {e.lineno}: "
                         f"{type(e).__name__}: {e.msg}"
                         + (f" (`{e.text.strip()}`)" if e.text else "")) from None
    scope = dict(settings)
    try:
        exec(code, scope)
    except Exception as e:
        frame = [f for f in traceback.extract_tb(e.__traceback__)
                 if f.filename == path][-1]  # innermost in the file
        raise SystemExit(f"config error: config file {path}, line {frame.lineno}: "
                         f"{type(e).__name__}: {e} (`{frame.line}`)") from None
    lines = assignments(tree)
    return [(k, scope[k], f"{path}:{lines[k][-1][0]}" if k in lines else path) for k in settings
            if scope[k] is not settings[k]]


def parse_override(arg, keys, renamed, defaults):
    """(key, value) of a --key=value argument; SystemExit if malformed, renamed or unknown."""
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
    return key, parse_value(text, defaults[key])


def configure(namespace, argv=None, renamed=None):
    """Apply config files and --key=value overrides to `namespace`; return the settings as a dict.

    renamed: {old name: new name} of this script's settings; passing an old name fails naming the
    new one.
    """
    argv = sys.argv[1:] if argv is None else argv
    keys = config_keys(namespace)
    defaults = {k: namespace[k] for k in keys}
    sources = {}  # key -> where its current value was set: for --help and error messages
    verbose = not set(HELP_FLAGS) & set(argv)
    for arg in argv:
        if arg in HELP_FLAGS:
            print_help(namespace, keys, defaults, sources)
            raise SystemExit(0)
        if arg.startswith('--'):
            key, value = parse_override(arg, keys, renamed or {}, defaults)
            changes = [(key, value, arg)]
        else:
            changes = run_config_file(arg, {k: namespace[k] for k in keys})
        for key, value, source in changes:
            namespace[key] = checked_value(key, value, source, defaults[key], namespace[key],
                                           sources.get(key))
            sources[key] = source
        if verbose:
            print(f"config: {key} = {namespace[key]!r}" if arg.startswith('--') else
                  f"config: {arg}")
    return {k: namespace[k] for k in keys}


def require_positive(config, *keys):
    """SystemExit naming each of keys whose value in config is not a number > 0 (sizes, counts)."""
    bad = [f"{k} must be a positive {'number' if isinstance(config[k], float) else 'integer'}, "
           f"got {config[k]!r}" for k in keys
           if isinstance(config[k], bool) or not isinstance(config[k], (int, float))
           or not config[k] > 0]
    if bad:
        raise SystemExit("config error: " + "; ".join(bad))
