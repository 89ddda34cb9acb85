"""The data folder: one per split, written by extract.py, read by train.py, sample.py and eval.py.

    data_dir/<split>/
      clip.npy       float16 [N, T, D]  CLIP patch tokens after ln_post, before proj, CLS dropped (the target);
                                        T = grid_size**2 (256 for ViT-L/14 at 224 px), D = 1024 for ViT-L/14
      eva.npy        float16 [N, M, C]  EVA patch tokens, last hidden state, CLS dropped (the condition);
                                        M = T, C = 4096 for EVA-CLIP-8B, 1792 for EVA02-E-14-plus
      clip_cls.npy   float32 [N, E]     CLIP's own image embedding ln_post(CLS) @ proj (method R); E = 768
      meta.json      what the arrays hold, below
      captions.json  {image_id: [caption, ...]} where the source has captions (COCO: 5 to 7 an image)

Row i of every array is the same image. The arrays are `np.lib.format.open_memmap` files: the shape lives
in the header, readers open them with `np.load(path, mmap_mode='r')` and never load a whole array.

meta.json:
  format, version      'blip3o-dit-data', 1
  source               how the images were listed: kind ('coco', 'folder', 'webdataset', 'synthetic'), split,
                       and the kind's own keys (annotations file, root folder, shard pattern and max_shards,
                       seed, a hash of the file list)
  clip, eva            the encoders: model, pretrained, tokens, dim (clip also embed_dim)
  dtype                'float16', the token storage dtype
  compute_dtype        {'clip': ..., 'eva': ...}: each encoder's autocast dtype ('float32' on the CPU)
  count                N, the rows of every array
  image_ids, files     per row: the image id (captions.json's key) and its file, relative to the source root
                       (webdataset: the sample key, and 'shard.tar/key.jpg')
  grid_size            the patch grid's side
  clip_mean, clip_std  per-channel statistics of clip.npy's tokens ([D] each): the DiT standardizes its
                       targets with the training folder's and sample.py de-standardizes with them
  skipped              [{image_id, file, reason}]: listed images that did not decode, and have no row
  eva_clamped_values   how many EVA values were beyond float16's range and are stored as +-65504 (finite
                       outliers of a pre-norm hidden state; non-finite features and CLIP values beyond
                       float16 stop extract.py instead)
  eva_clamped_files    the first (up to 10) files with clamped EVA values
  complete             false while extract.py is writing, true once every row and statistic is written:
                       readers refuse an incomplete folder, and extract.py continues one
"""
import functools
import json
import math
import os
import shutil

import numpy as np

FORMAT, VERSION = 'blip3o-dit-data', 1
ARRAYS = {'clip': np.float16, 'eva': np.float16, 'clip_cls': np.float32}
# open_clip configs of the tiny stand-in encoders that the demo and the tests use
ENCODER_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config', 'encoders')


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_atomic(path, write, mode='w'):
    """write(file) into a temporary file, fsynced and renamed over `path`: a reader or a crash never sees half."""
    with open(path + '.tmp', mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + '.tmp', path)
    folder = os.open(os.path.dirname(path) or '.', os.O_RDONLY)  # the rename itself reaches the disk
    os.fsync(folder)
    os.close(folder)


def write_json(path, obj, indent=None):
    write_atomic(path, lambda f: json.dump(obj, f, indent=indent))


def open_array(path, dtype, remedy='re-run extract.py'):
    """np.load(path, mmap_mode='r'), or SystemExit naming the file, the expected and the actual values."""
    if not os.path.exists(path):
        raise SystemExit(f"{path} is missing: {os.path.dirname(path)!r} is not a complete data folder; {remedy}")
    try:
        array = np.load(path, mmap_mode='r')
    except ValueError as e:  # a truncated file: its header promises more bytes than the file holds
        with open(path, 'rb') as f:
            try:
                version = np.lib.format.read_magic(f)
                shape, _, dt = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                else np.lib.format.read_array_header_2_0)(f)
                expected = f"{f.tell() + math.prod(shape) * dt.itemsize:,} bytes ({dt} {list(shape)})"
            except ValueError:
                expected = "a .npy header"
        raise SystemExit(f"{path} is truncated or corrupt: expected {expected}, the file has "
                         f"{os.path.getsize(path):,} bytes ({e}); {remedy}")
    if array.dtype != dtype:
        raise SystemExit(f"{path} holds {array.dtype} {list(array.shape)}, expected {np.dtype(dtype)} "
                         f"(the data folder format); {remedy}")
    return array


def open_folder(folder, arrays=('clip', 'eva'), setting='val_data', remedy='run extract.py'):
    """meta.json of a complete data folder whose `arrays` agree with it; SystemExit naming file and values.

    The returned meta also holds 'paths' and 'shapes' of the checked arrays.
    """
    meta_path = os.path.join(folder, 'meta.json')
    if not os.path.exists(meta_path):
        what = (f"{meta_path} is missing: {folder!r} is not a data folder written by extract.py"
                if os.path.isdir(folder) else f"data folder {folder!r} not found (no {meta_path})")
        raise SystemExit(f"{setting}: {what}; {remedy} (it writes data_dir/<split>), or point --{setting} at one")
    meta = read_json(meta_path)
    if not meta.get('complete'):
        raise SystemExit(f"{meta_path}: the extraction is incomplete ('complete' is not true); finish it: {remedy}")
    meta['paths'] = {name: os.path.join(folder, f'{name}.npy') for name in arrays}
    meta['shapes'] = {name: open_array(meta['paths'][name], ARRAYS[name]).shape for name in arrays}
    counts = [(f'{name}.npy', shape[0]) for name, shape in meta['shapes'].items()]
    counts.append(('meta.json count', meta['count']))
    if len({c for _, c in counts}) > 1:
        (first, n), *rest = counts
        raise SystemExit(f"{folder}: {first} has {n} rows, " + ', '.join(f"{name} {c}" for name, c in rest)
                         + ": they must agree; re-run extract.py")
    for name, shape in meta['shapes'].items():
        encoder = meta.get(name.removesuffix('_cls'), {})
        said = [encoder.get('embed_dim')] if name == 'clip_cls' else [encoder.get('tokens'), encoder.get('dim')]
        if list(shape[1:]) != said:
            raise SystemExit(f"{meta_path} describes {name} tokens {said} (model {encoder.get('model')!r}), but "
                             f"{meta['paths'][name]} holds {list(shape[1:])}: meta.json is from another "
                             f"extraction; re-run extract.py")
    D = meta['shapes']['clip'][-1] if 'clip' in arrays else meta['clip']['dim']
    for stat in ('clip_mean', 'clip_std'):
        if len(meta.get(stat, [])) != D:
            raise SystemExit(f"{meta_path}: {stat} should have {D} values (the CLIP token width), "
                             f"got {len(meta.get(stat, []))}")
    if not all(s > 0 and math.isfinite(s) for s in meta['clip_std']):
        raise SystemExit(f"{meta_path}: clip_std must be positive and finite in every channel")
    return meta


def check_finite(path, samples=32):
    """Up to `samples` evenly spaced rows of an array must be finite: a cheap check for a broken extraction."""
    array = np.load(path, mmap_mode='r')
    rows = np.arange(0, len(array), -(-len(array) // samples))
    values = array[rows].astype(np.float32).reshape(len(rows), -1)
    bad = ~np.isfinite(values).all(1)
    if bad.any():
        row = values[bad.argmax()]
        raise SystemExit(f"{path}: row {rows[bad.argmax()]} has {int(np.isnan(row).sum())} NaN and "
                         f"{int(np.isinf(row).sum())} inf values, expected finite tokens ({int(bad.sum())} of "
                         f"{len(rows)} rows checked are bad); re-run extract.py")


def read_rows(path, rows):
    """Rows of a .npy array in ascending order (kinder to the page cache), from a fresh memmap: a long-lived
    mapping of a huge file keeps growing the resident memory (nanoGPT #287); fancy indexing copies just them."""
    return np.load(path, mmap_mode='r')[np.sort(rows)]


@functools.lru_cache(maxsize=2)
def epoch_order(seed, n_rows, epoch):
    """The order of n_rows training rows in one epoch: a permutation seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def stream_rows(seed, n_rows, start, count):
    """Rows at positions [start, start + count) of the endless training stream, epoch after epoch."""
    positions = np.arange(start, start + count)
    rows = np.empty(count, dtype=np.int64)
    for epoch in np.unique(positions // n_rows):
        at = positions // n_rows == epoch
        rows[at] = epoch_order(seed, n_rows, int(epoch))[positions[at] % n_rows]
    return rows


def check_writable(folder, needed, setting, what):
    """Stop now, not hours later, unless folder can be created and written and its disk has `needed` bytes free."""
    probe = os.path.join(folder, f'.write_test.{os.getpid()}')
    try:
        os.makedirs(folder, exist_ok=True)
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"{setting}={folder!r} is not writable ({e.strerror}: {e.filename}): pick another --{setting}")
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise SystemExit(f"{setting}={folder!r}: {what} about {needed:,} bytes, its disk has {free:,} free: "
                         f"free some space or pick another --{setting}")


def write_random_folder(path, n=16, tokens=16, clip_dim=8, eva_dim=12, embed_dim=6, seed=0,
                        captions_per_image=(1, 5, 7)):
    """A complete data folder of random contents, for tests and benchmarks: every file, in this format.

    The CLIP targets are a fixed function of the EVA tokens, so a model can learn them.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    eva = rng.standard_normal((n, tokens, eva_dim)).astype(np.float32)
    mixing = rng.standard_normal((eva_dim, clip_dim)).astype(np.float32) / np.sqrt(eva_dim)
    clip = np.tanh(eva @ mixing) * 2.0 + 0.5
    cls = rng.standard_normal((n, embed_dim)).astype(np.float32)
    for name, array in [('clip', clip), ('eva', eva), ('clip_cls', cls)]:
        out = np.lib.format.open_memmap(os.path.join(path, f'{name}.npy'), mode='w+', dtype=ARRAYS[name],
                                        shape=array.shape)
        out[:] = array
        out.flush()
        del out
    clip64 = clip.astype(np.float16).astype(np.float64).reshape(-1, clip_dim)
    image_ids = list(range(100, 100 + n))
    meta = {
        'format': FORMAT, 'version': VERSION, 'source': {'kind': 'random', 'seed': seed},
        'count': n, 'image_ids': image_ids, 'files': [f'{i}.png' for i in image_ids],
        'clip': {'model': 'random', 'pretrained': None, 'tokens': tokens, 'dim': clip_dim, 'embed_dim': embed_dim},
        'eva': {'model': 'random', 'pretrained': None, 'tokens': tokens, 'dim': eva_dim},
        'dtype': 'float16',
        'clip_mean': clip64.mean(0).tolist(), 'clip_std': clip64.std(0).tolist(),
        'skipped': [], 'complete': True,
    }
    write_json(os.path.join(path, 'meta.json'), meta)
    captions = {str(i): [f'caption {c} of image {i}' for c in range(captions_per_image[k % len(captions_per_image)])]
                for k, i in enumerate(image_ids)}
    write_json(os.path.join(path, 'captions.json'), captions)
    return path


def open_clip_model(name, pretrained):
    """An open_clip model (the tiny stand-ins' configs registered); pretrained '' = random init under seed 0."""
    import open_clip
    import torch
    open_clip.add_model_config(ENCODER_CONFIGS)
    torch.manual_seed(0)  # pretrained '' gives this random init in extract.py and eval.py alike
    return open_clip.create_model_and_transforms(name, pretrained=pretrained or None)
