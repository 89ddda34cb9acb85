"""The data folder: one per split, written by extract.py, read by train.py, sample.py and eval.py.

    data_dir/<split>/
      clip.npy       float16 [N, T, D]  CLIP patch tokens after ln_post, before proj, CLS dropped
                                        (the target); T = grid_size**2 (256 for ViT-L/14 at 224 px),
                                        D = 1024 for ViT-L/14
      eva.npy        float16 [N, M, C]  EVA patch tokens, last hidden state, CLS dropped (the
                                        condition); M = T, C = 4096 for EVA-CLIP-8B, 1792 for
                                        EVA02-E-14-plus
      clip_cls.npy   float32 [N, E]     CLIP's own image embedding ln_post(CLS) @ proj (method R);
                                        E = 768
      clip_samples.npy  float16 [N, S, T, D]  where EVA's view hides something (the partial-view
                                        demo; extract.py's true_samples = S): row i's S true draws
                                        of p(CLIP | EVA), clip.npy's tokens of S re-renders of
                                        image i with the hidden attribute redrawn; meta.json's
                                        true_samples {file, samples: S, rule} says how;
                                        optional; eval.py's Task 3 scores conditional MMD
                                        against them (S >= 2; its true-samples column: S >= 4)
      meta.json      what the arrays hold, below
      captions.json  {image_id: [caption, ...]} where the source has captions (COCO: 5 to 7
                                        an image)

Row i of every array is the same image. The arrays are `np.lib.format.open_memmap` files: the shape
lives in the header, readers open them with `np.load(path, mmap_mode='r')` and never load a whole
array.

meta.json:
  format, version      'blip3o-dit-data', 1
  source               how the images were listed: kind ('coco', 'folder', 'webdataset',
                       'synthetic'), split, and the kind's own keys (annotations file, root folder,
                       shard pattern and max_shards, seed, a hash of the file list)
  clip, eva            the encoders: model, pretrained, tokens, dim (clip also embed_dim)
  dtype                'float16', the token storage dtype
  compute_dtype        {'clip': ..., 'eva': ...}: each encoder's autocast dtype ('float32' on the
                       CPU)
  count                N, the rows of every array
  image_ids, files     per row: the image id (captions.json's key) and its file, relative to the
                       source root (webdataset: the sample key, and 'shard.tar/key.jpg')
  grid_size            the patch grid's side
  clip_mean, clip_std  per-channel statistics of clip.npy's tokens ([D] each): the DiT standardizes
                       its targets with the training folder's and sample.py de-standardizes with
                       them
  skipped              [{image_id, file, reason}]: listed images that did not decode, and have no
                       row
  eva_clamped_values   how many EVA values were beyond float16's range and are stored as +-65504
                       (finite outliers of a pre-norm hidden state; non-finite features and CLIP
                       values beyond float16 stop extract.py instead)
  eva_clamped_files    the first (up to 10) files with clamped EVA values
  complete             false while extract.py is writing, true once every row and statistic is
                       written: readers refuse an incomplete folder, and extract.py continues one
  extraction_id        made when extract.py starts a folder: the folder's identity (`open_folder`
                       sets meta['id'] to it; a folder without one is identified by the sha1 of its
                       meta.json)

The held-out slice of a training folder is its last round(count * val_fraction) rows
(`holdout_range`): train.py validates on it and never trains on it, so checkpoints, samplers,
guidance and baselines are chosen there, never on the reported split. Stages name the rows they read
with `target`: {folder, id, start, count}.

The checkpoint (train.py writes out_dir/ckpt.pt and the kept ckpt_iterNNNNNN.pt; `save_checkpoint`,
`load_checkpoint`): a torch.save zip file of
  ema, model_args        the EMA weights and the DiTConfig fields (model.py); kept copies hold no
                         more than these
  iter_num, config       the iteration it was saved before, and train.py's settings
  data_stats             clip_mean, clip_std of the training folder: the DiT's target
                         standardization
  run                    {id, started}: made when training starts from scratch, kept by every resume
  data                   {train, holdout}: the targets it was trained and validated on (holdout
                         None: val_data)
  objective              'flow' or 'regression' (`checkpoint_objective`; none: 'flow')
  model, optimizer, scaler, best_val_loss, data_position, rng    (ckpt.pt only) what a resume needs
The zip records carry CRC32s (torch writes them): `load_checkpoint` verifies every record, so a
flipped or cut byte is refused with the intact alternatives named. Its identity is {path, run_id,
iter_num, weights, objective}, weights = a digest of the records' CRCs and sizes: another run,
iteration or content is another identity. Older checkpoints lack keys that later versions added;
CHECKPOINT_DEFAULTS gives them their old meaning.

The samples folder (sample.py writes out_dir/samples/<samples_name>/; ridge.py too): generated.npy
float16 [N, T, D], the target's rows in order, de-standardized; generated.json {depends_on:
{settings, checkpoint identity, data target, shape}, method, label, data, data_stats, model_calls,
...}; settings are the sampler's (flow.Sampler.settings). Rows go into generated.partial.npy and are
marked in generated.done.npy once on disk (generated.partial.json holds depends_on); the finished
array is renamed to generated.npy, so that name only ever holds a complete result, and it is reused
only while depends_on is equal.

One writer at a time: train.py locks out_dir, sample.py its samples folder, extract.py each data
folder (`lock`: a lock on <folder>/.lock, which the kernel drops when the holder dies, so a killed
run never blocks the next).
"""
import errno
import fcntl
import functools
import glob
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
import uuid
import zipfile
import zlib

import numpy as np

FORMAT, VERSION = 'blip3o-dit-data', 1
ARRAYS = {'clip': np.float16, 'eva': np.float16, 'clip_cls': np.float32}
# open_clip configs of the tiny stand-in encoders that the demo and the tests use
ENCODER_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config', 'encoders')
# every stage's default held-out slice (holdout_range): none; a config sets it for all stages
VAL_FRACTION = 0.0


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_atomic(path, write, mode='w'):
    """write(file) into a temporary file, fsynced and renamed over `path`: a reader or a crash never
    sees half."""
    with open(path + '.tmp', mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + '.tmp', path)
    # the rename itself reaches the disk
    folder = os.open(os.path.dirname(path) or '.', os.O_RDONLY)
    os.fsync(folder)
    os.close(folder)


def write_json(path, obj, indent=None):
    write_atomic(path, lambda f: json.dump(obj, f, indent=indent))


def open_array(path, dtype, remedy='re-run extract.py'):
    """np.load(path, mmap_mode='r'), or SystemExit naming the file, the expected and the actual
    values."""
    if not os.path.exists(path):
        raise SystemExit(f"{path} is missing: {os.path.dirname(path)!r} is not a complete data "
                         f"folder; {remedy}")
    try:
        array = np.load(path, mmap_mode='r')
    except ValueError as e:  # a truncated file: its header promises more bytes than the file holds
        with open(path, 'rb') as f:
            try:
                version = np.lib.format.read_magic(f)
                shape, _, dt = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                else np.lib.format.read_array_header_2_0)(f)
                size = f.tell() + math.prod(shape) * dt.itemsize
                expected = f"{size:,} bytes ({dt} {list(shape)})"
            except ValueError:
                expected = "a .npy header"
        raise SystemExit(f"{path} is truncated or corrupt: expected {expected}, the file has "
                         f"{os.path.getsize(path):,} bytes ({e}); {remedy}")
    if array.dtype != dtype:
        raise SystemExit(f"{path} holds {array.dtype} {list(array.shape)}, expected "
                         f"{np.dtype(dtype)} (the data folder format); {remedy}")
    return array


def open_folder(folder, arrays=('clip', 'eva'), setting='val_data', remedy='run extract.py'):
    """meta.json of a complete data folder whose `arrays` agree with it; SystemExit naming file and
    values.

    The returned meta also holds 'paths' and 'shapes' of the checked arrays.
    """
    meta_path = os.path.join(folder, 'meta.json')
    if not os.path.exists(meta_path):
        what = (f"{meta_path} is missing: {folder!r} is not a data folder written by extract.py"
                if os.path.isdir(folder) else f"data folder {folder!r} not found (no {meta_path})")
        raise SystemExit(f"{setting}: {what}; {remedy} (it writes data_dir/<split>), or point "
                         f"--{setting} at one")
    with open(meta_path, 'rb') as f:
        raw = f.read()
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise SystemExit(f"{meta_path} is not valid JSON ({e}); {remedy}")
    meta['id'] = meta.get('extraction_id') or hashlib.sha1(raw).hexdigest()
    if not meta.get('complete'):
        raise SystemExit(f"{meta_path}: the extraction is incomplete ('complete' is not true); "
                         f"finish it: {remedy}")
    meta['paths'] = {name: os.path.join(folder, f'{name}.npy') for name in arrays}
    meta['shapes'] = {name: open_array(meta['paths'][name], ARRAYS[name]).shape for name in arrays}
    counts = [(f'{name}.npy', shape[0]) for name, shape in meta['shapes'].items()]
    counts.append(('meta.json count', meta['count']))
    if len({c for _, c in counts}) > 1:
        (first, n), *rest = counts
        others = ', '.join(f"{name} {c}" for name, c in rest)
        raise SystemExit(f"{folder}: {first} has {n} rows, {others}: they must agree; re-run "
                         f"extract.py")
    for name, shape in meta['shapes'].items():
        encoder = meta.get(name.removesuffix('_cls'), {})
        said = [encoder.get('embed_dim')] if name == 'clip_cls' else [encoder.get('tokens'),
                                                                      encoder.get('dim')]
        if list(shape[1:]) != said:
            raise SystemExit(f"{meta_path} describes {name} tokens {said} (model "
                             f"{encoder.get('model')!r}), but "
                             f"{meta['paths'][name]} holds {list(shape[1:])}: meta.json is from "
                             "another extraction; re-run extract.py")
    D = meta['shapes']['clip'][-1] if 'clip' in arrays else meta['clip']['dim']
    for stat in ('clip_mean', 'clip_std'):
        if len(meta.get(stat, [])) != D:
            raise SystemExit(f"{meta_path}: {stat} should have {D} values (the CLIP token width), "
                             f"got {len(meta.get(stat, []))}")
    if not all(s > 0 and math.isfinite(s) for s in meta['clip_std']):
        raise SystemExit(f"{meta_path}: clip_std must be positive and finite in every channel")
    return meta


def token_shape(meta):
    """(tokens, dim) of a data folder's CLIP tokens: every generated array's row shape."""
    return meta['clip']['tokens'], meta['clip']['dim']


def check_captions(captions, path):
    """SystemExit naming the file, the image and the value unless every entry is a non-empty list of
    non-blank strings (a bare string would be read as a list of letters)."""
    for image_id, value in captions.items():
        if not isinstance(value, list) or not value:
            raise SystemExit(f"{path}: image {image_id}: expected a non-empty list of caption "
                             f"strings, got {type(value).__name__} {value!r:.80}")
        bad = next((c for c in value if not isinstance(c, str) or not c.strip()), None)
        if bad is not None:
            raise SystemExit(f"{path}: image {image_id}: expected non-blank caption strings, got "
                             f"{type(bad).__name__} {bad!r:.80}")


def check_finite(path, samples=32):
    """Up to `samples` evenly spaced rows of an array must be finite: a cheap check for a broken
    extraction."""
    array = np.load(path, mmap_mode='r')
    rows = np.arange(0, len(array), -(-len(array) // samples))
    values = array[rows].astype(np.float32).reshape(len(rows), -1)
    bad = ~np.isfinite(values).all(1)
    if bad.any():
        row = values[bad.argmax()]
        raise SystemExit(f"{path}: row {rows[bad.argmax()]} has {int(np.isnan(row).sum())} NaN and "
                         f"{int(np.isinf(row).sum())} inf values, expected finite tokens "
                         f"({int(bad.sum())} of "
                         f"{len(rows)} rows checked are bad); re-run extract.py")


def read_rows(path, rows):
    """Rows of a .npy array in ascending order (kinder to the page cache), from a fresh memmap: a
    long-lived mapping of a huge file keeps growing the resident memory (nanoGPT #287); fancy
    indexing copies just them."""
    return np.load(path, mmap_mode='r')[np.sort(rows)]


@functools.lru_cache(maxsize=2)
def epoch_order(seed, n_rows, epoch):
    """The order of n_rows training rows in one epoch: a permutation seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def stream_rows(seed, n_rows, start, count):
    """Rows at positions [start, start + count) of the endless training stream, epoch after
    epoch."""
    positions = np.arange(start, start + count)
    rows = np.empty(count, dtype=np.int64)
    for epoch in np.unique(positions // n_rows):
        at = positions // n_rows == epoch
        rows[at] = epoch_order(seed, n_rows, int(epoch))[positions[at] % n_rows]
    return rows


def check_writable(folder, needed, setting, what):
    """Stop now, not hours later, unless folder can be created and written and its disk has `needed`
    bytes free."""
    probe = os.path.join(folder, f'.write_test.{os.getpid()}')
    try:
        os.makedirs(folder, exist_ok=True)
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"{setting}={folder!r} is not writable ({e.strerror}: {e.filename}): pick "
                         f"another --{setting}")
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise SystemExit(f"{setting}={folder!r}: {what} about {needed:,} bytes, its disk has "
                         f"{free:,} free: free some space or pick another --{setting}")


def target(meta, folder, start=0, count=None):
    """The rows a stage reads or writes: {folder (absolute), id (the folder's identity), start,
    count}."""
    return {'folder': os.path.abspath(folder), 'id': meta['id'], 'start': start,
            'count': meta['count'] - start if count is None else count}


def split_folders(data_dir, splits, train_data='', val_data=''):
    """(train_data, val_data): data_dir/<split> for each, unless a config names the folder
    itself."""
    return (train_data or os.path.join(data_dir, splits[0]),
            val_data or os.path.join(data_dir, splits[1]))


def holdout_range(count, val_fraction, folder):
    """(start, count) of a training folder's held-out slice: its last round(count * val_fraction)
    rows."""
    n = round(count * val_fraction)
    if not 0 < n < count:
        raise SystemExit(f"config error: val_fraction={val_fraction} of the {count} rows of "
                         f"{folder} holds out {n}; "
                         f"the held-out slice needs at least one row, and training one")
    return count - n, n


def open_target(holdout, train_data, val_data, val_fraction, arrays, remedy='run extract.py'):
    """(meta, target) of the rows to sample or evaluate: val_data's, or train_data's held-out slice
    if holdout."""
    folder, setting = (train_data, 'train_data') if holdout else (val_data, 'val_data')
    meta = open_folder(folder, arrays, setting, remedy)
    return meta, target(meta, folder,
                        *(holdout_range(meta['count'], val_fraction, folder) if holdout else (0,)))


def check_fits(meta, cfg, arrays=('clip', 'eva')):
    """SystemExit unless a data folder's tokens fit a DiTConfig: grid, CLIP width, EVA width (and
    grid, with cross_rope)."""
    L = cfg.grid_size ** 2
    (T, D), (M, C) = [meta['clip']['tokens'], meta['clip']['dim']], meta['shapes']['eva'][1:]
    problems = [(T != L, 'clip',
                 f"{T} tokens per row, but the model's grid_size={cfg.grid_size} needs {L}"),
                (D != cfg.in_dim, 'clip',
                 f"token width {D}, but the model has in_dim={cfg.in_dim}"),
                (C != cfg.cond_dim, 'eva',
                 f"token width {C}, but the model has cond_dim={cfg.cond_dim}"),
                (cfg.cross_rope and M != L, 'eva',
                 f"{M} tokens per row, but cross_rope=True needs the EVA tokens "
                                                   f"on the model's grid ({L} tokens)")]
    for bad, name, message in problems:
        if bad:
            path = meta['paths'].get(name) or os.path.join(os.path.dirname(meta['paths']['eva']),
                                                           f'{name}.npy')
            raise SystemExit(f"{path}: {message}")


# --- the checkpoint ------------------------------------------------------------------------------
CHECKPOINT_DEFAULTS = {'t_scale': 1000.0}  # model_args added later: their value before
CHECKPOINT_KEYS = ('ema', 'model_args', 'iter_num', 'data_stats')  # every checkpoint, kept ones too


def checkpoint_bytes(n_params, full=True):
    """A checkpoint's size: fp32 weights, EMA and two AdamW moments; a kept one holds the EMA
    weights only."""
    return 4 * n_params * (4 if full else 1) + (1 << 20)


def save_checkpoint(path, ckpt):
    """torch.save atomically: a crash, a kill or a full disk leaves the previous file whole and no
    temporary one."""
    import torch
    try:
        write_atomic(path, lambda f: torch.save(ckpt, f), 'wb')
    # a full disk surfaces as either, depending on where torch's writer was
    except (OSError, RuntimeError) as e:
        if os.path.exists(path + '.tmp'):
            os.remove(path + '.tmp')
        free = shutil.disk_usage(os.path.dirname(path) or '.').free
        full = getattr(e, 'errno', None) == errno.ENOSPC or free < (1 << 26)
        raise SystemExit(f"{path}: writing the checkpoint failed "
                         f"({'disk full: ' if full else ''}{e}; {free:,} bytes "
                         f"free); the temporary file is removed and {path} is as it was") from None


def checkpoint_fault(path):
    """Why the file is not an intact checkpoint (a flipped or missing byte: every zip record's CRC32
    is checked), or None."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        if bad is None:
            return None
        return f"record {bad} fails its CRC32 check (its bytes changed after writing)"
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as e:
        size = os.path.getsize(path) if os.path.exists(path) else 0
        return (f"not a whole checkpoint ({size:,} bytes: truncated, empty or not a torch.save "
                f"zip file; {e})")


def checkpoint_weights(path):
    """A digest of the checkpoint's contents from its zip directory (each record's CRC32 and size):
    cheap."""
    with zipfile.ZipFile(path) as z:
        records = sorted((i.filename.split('/', 1)[-1], i.CRC, i.file_size) for i in z.infolist()
                         if not i.filename.endswith('serialization_id'))  # torch's id of a save
    return hashlib.sha1(json.dumps(records).encode()).hexdigest()[:16]


def checkpoint_objective(ckpt):
    """What the checkpoint was trained for, 'flow' or 'regression' (train.py's `objective`): a key
    of its own, not of model_args; a checkpoint without one is from before the regression
    baseline."""
    return ckpt.get('objective', 'flow')


def checkpoint_identity(path, ckpt):
    """What a result made from this checkpoint depends on: the file, the run, the iteration, the
    contents, the objective."""
    return {'path': os.path.abspath(path), 'run_id': ckpt['run']['id'],
            'iter_num': ckpt['iter_num'], 'weights': checkpoint_weights(path),
            'objective': checkpoint_objective(ckpt)}


def check_not_trained_on(ckpt, path, target, val_fraction):
    """SystemExit if the checkpoint at path was trained on any of target's rows."""
    trained = (ckpt['data'] or {}).get('train')
    if not trained or trained['id'] != target['id']:
        return
    (a, n), (b, m) = (trained['start'], trained['count']), (target['start'], target['count'])
    if max(a, b) < min(a + n, b + m):
        raise SystemExit(f"{path} was trained on rows {a}..{a + n - 1} of {target['folder']}, and "
                         f"rows {b}..{b + m - 1} are to be generated: they overlap (val_fraction="
                         f"{val_fraction}; train.py's was {ckpt['config'].get('val_fraction')})")


def load_checkpoint(path, setting='ckpt_path', keys=CHECKPOINT_KEYS):
    """A verified checkpoint (memory-mapped), old-format defaults applied and ckpt['identity'] set;
    SystemExit naming the file, what is wrong and the intact checkpoints beside it."""
    import torch
    if not os.path.isfile(path):
        raise SystemExit(f"{setting}: checkpoint {path} not found: train first (python train.py "
                         f"...) or point --{setting} at one")
    fault = checkpoint_fault(path)
    ckpt = None
    if fault is None:
        try:
            ckpt = torch.load(path, map_location='cpu', mmap=True, weights_only=True)
        # torch's reader raises several kinds; every one means this file cannot be used
        except Exception as e:
            fault = f"torch.load failed: {type(e).__name__}: {e}"
    if fault is None and (not isinstance(ckpt, dict) or set(keys) - set(ckpt)):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt)
        fault = f"expected the keys {list(keys)}, found {found}"
    if fault:
        folder = os.path.dirname(path) or '.'
        others = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                        if f.startswith('ckpt') and
                        f.endswith('.pt') and os.path.join(folder, f) != path)
        intact = [p for p in others if checkpoint_fault(p) is None]
        raise SystemExit(f"{path}: {fault}. Intact checkpoints beside it: "
                         f"{', '.join(intact) or 'none'}")
    ckpt['model_args'] = {**CHECKPOINT_DEFAULTS, **ckpt['model_args']}
    ckpt.setdefault('run', {'id': 'unrecorded', 'started': None})  # written before runs had an id
    ckpt.setdefault('data', None)
    ckpt['identity'] = checkpoint_identity(path, ckpt)
    return ckpt


def resume_position(ckpt, train_rows):
    """(samples_seen to continue from, a line to print or None): the checkpoint's position, or the
    start of its next epoch when the training set has another number of rows (its epoch orders
    differ)."""
    position = ckpt['data_position']
    if position['train_rows'] == train_rows:
        return position['samples_seen'], None
    return (position['epoch'] + 1) * train_rows, (
        f"resume: train_data has {train_rows} rows, the checkpoint was trained on "
        f"{position['train_rows']}: starting a new epoch")


def model_from_checkpoint(ckpt, weights='ema', path='the checkpoint'):
    """The DiT that ckpt['model_args'] describes, holding its `weights` ('ema' or 'model'), on the
    CPU."""
    from model import DiT, DiTConfig
    if weights not in ckpt:
        raise SystemExit(f"{path} has no {weights!r} weights (keys {sorted(ckpt)}): kept "
                         "checkpoints hold the EMA weights only")
    try:
        model = DiT(DiTConfig(**ckpt['model_args']))
        model.load_state_dict(ckpt[weights])
    # e.g. written by another version of model.py
    except (TypeError, ValueError, RuntimeError) as e:
        raise SystemExit(f"{path}: its {weights!r} weights do not fit the DiT its model_args "
                         f"describe: {e}")
    return model


def truncate_metrics(path, iter_num):
    """Drop metrics.jsonl records past a checkpoint saved before iteration iter_num's step: a resume
    logs them again (its train records from iter_num on, its evals after iter_num)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    keep = [r for r in records
            if r['iter'] < iter_num or r['iter'] == iter_num and r.get('kind') != 'train']
    write_atomic(path, lambda f: f.writelines(json.dumps(r) + '\n' for r in keep))


# --- one writer at a time ------------------------------------------------------------------------
def lock(folder, what):
    """Hold <folder>/.lock for this process's life (keep the returned file open); SystemExit naming
    the holder if another process has it. The kernel drops the lock with its holder, so a killed run
    leaves no stale lock."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, '.lock')
    f = open(path, 'a+')
    try:  # a POSIX lock: owned by this process alone, not by the workers it forks (a DataLoader's)
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or 'unknown'
        f.close()
        raise SystemExit(f"{folder} is in use by another {what} ({holder}): wait for it to finish "
                         "or stop it, or pick another folder") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}")
    f.flush()
    return f


# --- the samples folder --------------------------------------------------------------------------
def samples_name(ckpt_path, sampler, holdout=False):
    """The folder of one sampling run under out_dir/samples/: <checkpoint file stem>-
    <sampler.name()>[-holdout], e.g. ckpt-midpoint5-cfg2-seed1337 (sampler: a flow.Sampler)."""
    stem = os.path.splitext(os.path.basename(ckpt_path))[0]
    return f"{stem}-{sampler.name()}{'-holdout' if holdout else ''}"


def check_samples_space(run_dir, shape, out_dir):
    """Stop now, not hours later, on a disk that cannot take a [N, T, D] float16 result in run_dir
    (less what a killed run already wrote; nothing when a finished one is there: start_samples
    reuses it or refuses)."""
    partial = os.path.join(run_dir, 'generated.partial.npy')
    written = os.stat(partial).st_blocks * 512 if os.path.exists(partial) else 0
    done = os.path.exists(os.path.join(run_dir, 'generated.npy'))
    check_writable(out_dir, 0 if done else math.prod(shape) * 2 + shape[0] - written, 'out_dir',
                   'the samples need')


def last_samples(out_dir, holdout):
    """The folder of the flow DiT's samples finished last in out_dir/samples for this kind of
    target, or None."""
    done = [f for f in (os.path.dirname(p) for p in glob.glob(os.path.join(out_dir, 'samples', '*',
                                                                           'generated.json')))
            if f.endswith('-holdout') == holdout
            and read_json(os.path.join(f, 'generated.json')).get('method') == 'flow']
    return max(done, key=lambda f: os.path.getmtime(os.path.join(f, 'generated.json')),
               default=None)


def differences(before, now, prefix=''):
    """{dotted key: (before, now)} of the leaves where two nested dicts differ."""
    out = {}
    for key in dict.fromkeys([*before, *now]):
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(differences(a, b, f'{prefix}{key}.'))
        elif a != b:
            out[prefix + key] = (a, b)
    return out


def start_samples(run_dir, depends_on, shape, master=True):
    """Prepare run_dir for rows of a [N, T, D] float16 result that depends on `depends_on`: None
    when generated.npy already holds exactly it (nothing to do); else a partial run of the same to
    continue, or a new one. SystemExit naming what changed when the folder holds another result."""
    out_path, info_path = os.path.join(run_dir, 'generated.npy'), os.path.join(run_dir,
                                                                               'generated.json')
    partial, done, partial_info = (os.path.join(run_dir, f) for f in ('generated.partial.npy',
                                                                      'generated.done.npy',
                                                                      'generated.partial.json'))
    if os.path.exists(out_path) and os.path.exists(info_path):
        before = read_json(info_path).get('depends_on', {})
        if before == depends_on:
            return None
        raise SystemExit(f"{out_path} holds another result (what changed: (then, now)): "
                         f"{differences(before, depends_on)}; it is kept: "
                         f"delete {run_dir} to replace it, or write into another out_dir")
    if master:
        same = all(map(os.path.exists, (partial_info, partial, done))) and \
            read_json(partial_info) == depends_on
        if same:
            print(f"resuming {partial}: {int(np.load(done).sum())} of {shape[0]} rows done")
        else:
            for path, dt, s in [(partial, np.float16, tuple(shape)),
                                (done, np.bool_, tuple(shape[:1]))]:
                # a new file reads as zeros
                np.lib.format.open_memmap(path, mode='w+', dtype=dt, shape=s).flush()
            write_json(partial_info, depends_on, indent=2)
    return done


def samples_todo(run_dir, rows):
    """Those of `rows` that are not written yet."""
    return rows[~np.load(os.path.join(run_dir, 'generated.done.npy'))[rows]]


def write_samples(run_dir, rows, values):
    """Rows of the partial result, on disk before they are marked done; memmaps opened afresh each
    time (a long-lived mapping keeps growing resident memory, nanoGPT #287)."""
    for name, value in (('generated.partial.npy', values.astype(np.float16)),
                        ('generated.done.npy', True)):
        array = np.load(os.path.join(run_dir, name), mmap_mode='r+')
        array[rows] = value
        array.flush()
        del array


def finish_samples(run_dir, info):
    """Rename the complete partial result to generated.npy and write generated.json (info +
    depends_on);
    SystemExit if rows are missing."""
    partial = os.path.join(run_dir, 'generated.partial.npy')
    missing = int((~np.load(os.path.join(run_dir, 'generated.done.npy'))).sum())
    if missing:
        raise SystemExit(f"{missing} rows of {partial} are still missing; run again to finish them")
    depends_on = read_json(os.path.join(run_dir, 'generated.partial.json'))
    os.replace(partial, os.path.join(run_dir, 'generated.npy'))
    write_json(os.path.join(run_dir, 'generated.json'), {'depends_on': depends_on, **info},
               indent=2)
    for name in ('generated.done.npy', 'generated.partial.json'):
        os.remove(os.path.join(run_dir, name))


def new_id():
    """A fresh identity: of a training run (made at its start from scratch), of an extraction."""
    return uuid.uuid4().hex[:12]


def write_random_folder(path, n=16, tokens=16, clip_dim=8, eva_dim=12, embed_dim=6, seed=0,
                        captions_per_image=(1, 5, 7)):
    """A complete data folder of random contents, for tests and benchmarks: every file, in this
    format.

    The CLIP targets are a fixed function of the EVA tokens, so a model can learn them.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    eva = rng.standard_normal((n, tokens, eva_dim)).astype(np.float32)
    mixing = rng.standard_normal((eva_dim, clip_dim)).astype(np.float32) / np.sqrt(eva_dim)
    clip = np.tanh(eva @ mixing) * 2.0 + 0.5
    cls = rng.standard_normal((n, embed_dim)).astype(np.float32)
    for name, array in [('clip', clip), ('eva', eva), ('clip_cls', cls)]:
        out = np.lib.format.open_memmap(os.path.join(path, f'{name}.npy'), mode='w+',
                                        dtype=ARRAYS[name], shape=array.shape)
        out[:] = array
        out.flush()
        del out
    clip64 = clip.astype(np.float16).astype(np.float64).reshape(-1, clip_dim)
    image_ids = list(range(100, 100 + n))
    meta = {
        'format': FORMAT, 'version': VERSION, 'source': {'kind': 'random', 'seed': seed},
        'count': n, 'image_ids': image_ids, 'files': [f'{i}.png' for i in image_ids],
        'clip': {'model': 'random', 'pretrained': None, 'tokens': tokens, 'dim': clip_dim,
                 'embed_dim': embed_dim},
        'eva': {'model': 'random', 'pretrained': None, 'tokens': tokens, 'dim': eva_dim},
        'dtype': 'float16',
        'clip_mean': clip64.mean(0).tolist(), 'clip_std': clip64.std(0).tolist(),
        'skipped': [], 'complete': True,
    }
    write_json(os.path.join(path, 'meta.json'), meta)
    captions = {str(i): [f'caption {c} of image {i}'
                         for c in range(captions_per_image[k % len(captions_per_image)])]
                for k, i in enumerate(image_ids)}
    write_json(os.path.join(path, 'captions.json'), captions)
    return path


def open_clip_model(name, pretrained):
    """An open_clip model (the tiny stand-ins' configs registered); pretrained '' = random init
    under seed 0."""
    import open_clip
    import torch
    open_clip.add_model_config(ENCODER_CONFIGS)
    torch.manual_seed(0)  # pretrained '' gives this random init in extract.py and eval.py alike
    return open_clip.create_model_and_transforms(name, pretrained=pretrained or None)
