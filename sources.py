"""Where a split's images come from: each source lists them (ids, files, captions) and loads one.

'coco': coco_root/images/<split>/*.jpg with annotations/captions_<split>.json (COCO 2017).

'coco_karpathy': Karpathy's split of COCO 2014, from dataset_coco.json (caption_datasets.zip; its
`images`, each with split, filepath, filename, cocoid and sentences[*]['raw']) and the images in
coco_root/images/train2014/ and val2014/. A data folder per split name: 'karpathy_train' = its train
+ restval (113,287 images), 'karpathy_val' and 'karpathy_test' its 5,000 each. karpathy_test is the
split of published COCO retrieval figures (5,000 images, about 25,000 captions); settings are chosen
on karpathy_train's held-out slice (val_fraction), so test chooses nothing. Every listed image must
be on disk (the split is a fixed set), and every entry well formed: else listing stops, naming the
entry.

'folder': image_folder/<split>/** with captions in same-name .txt files, one a line.

'webdataset': img2dataset-style uncompressed tar shards, key.jpg|png|webp with key.txt and/or
key.json ('caption'; the .txt wins), the pattern brace-expanded per split, max_shards the first
shards; the image id is the sample key (unique within a split), the file 'shard.tar/key.jpg'; every
tar header is read once to index the samples.

'synthetic': the CPU demo's shapes (demo.py draws them).

A listing is dict(ids, files, keys, decode_check, load, captions, source): load(key) gives an RGB
image; source is what meta.json records (kind, split, the kind's own keys, root, listed,
files_sha1). Bad input stops at listing time, before any data folder is written. Images of 16-bit or
float modes are scaled to 8 bits (PIL's own convert clips them to white).
"""
import hashlib
import io
import json
import os
import tarfile

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
# a Karpathy data folder -> the `split` values of dataset_coco.json it takes
KARPATHY_SPLITS = {'karpathy_train': ('train', 'restval'), 'karpathy_val': ('val',),
                   'karpathy_test': ('test',)}
KARPATHY_KEYS = ('split', 'filepath', 'filename', 'cocoid', 'sentences')


def to_rgb(image):
    """An 8-bit RGB image of any PIL mode. 16- and 32-bit integer images are scaled from 16 bits
    (PIL's own convert clips them at 255: nearly white), float images from [0, 1]."""
    if image.mode.startswith('I'):  # 'I;16', 'I;16B', ... and 'I': 16-bit PNG / TIFF grayscale
        scaled = np.asarray(image, dtype=np.float64) / 257
    elif image.mode == 'F':
        scaled = np.asarray(image, dtype=np.float64) * 255
    else:
        return image.convert('RGB')
    return Image.fromarray(scaled.round().clip(0, 255).astype(np.uint8)).convert('RGB')


def load_file(path):
    """A file as an RGB image; raises on a missing, unreadable or truncated file."""
    with Image.open(path) as image:
        return to_rgb(image)


def load_member(key):
    """The image at (shard, offset, size) of a tar shard as RGB; raises for a sample without one."""
    shard, offset, size = key
    if offset is None:
        raise FileNotFoundError(f"the sample has no image file ({', '.join(IMAGE_EXTENSIONS)}) "
                                f"in {shard}")
    with open(shard, 'rb') as f:  # opened per image: nothing shared between DataLoader workers
        f.seek(offset)
        raw = f.read(size)
    with Image.open(io.BytesIO(raw)) as image:
        return to_rgb(image)


def files_sha1(files):
    return hashlib.sha1('\n'.join(files).encode()).hexdigest()


def sample_captions(text, meta):
    """[caption] of a webdataset sample from its .txt bytes, else its .json's 'caption'; [] if
    neither."""
    if text is not None:
        caption = text.decode('utf-8', 'replace')
    else:
        try:
            caption = json.loads(meta)['caption'] if meta is not None else None
        except (ValueError, KeyError, TypeError):  # a .json without a caption: the image is used
            caption = None
    return [caption.strip()] if isinstance(caption, str) and caption.strip() else []


def read_shard(shard, extensions):
    """{key: {'image': (name, offset, size), 'txt': bytes, 'json': bytes}} from a shard's tar
    headers."""
    from webdataset.tariterators import base_plus_ext
    samples = {}
    try:
        with tarfile.open(shard, 'r:') as tar:
            for member in tar:  # headers only: tarfile seeks past each member's data
                key, ext = base_plus_ext(member.name)
                if not member.isreg() or key is None or key.startswith('__') and key.endswith('__'):
                    continue  # webdataset's convention: __name__ members are shard metadata
                sample, ext = samples.setdefault(key, {}), ext.lower()
                if ext in extensions and 'image' not in sample:
                    sample['image'] = (member.name, member.offset_data, member.size)
                elif ext in ('txt', 'json'):
                    sample[ext] = tar.extractfile(member).read()
    except tarfile.TarError as e:
        raise SystemExit(f"{shard} is not a readable uncompressed tar file (expected "
                         f"img2dataset-style shards): {e}")
    return samples


def list_webdataset(split, shard_patterns, max_shards=0, limit=0):
    """The samples of a split's tar shards in shard and member order, indexed from the tar headers.

    The headers (and the small .txt/.json members; no image is read) give every sample's image a
    fixed (shard, offset, size): the ranks split the list by index, the decode check and a resumed
    run read exactly the samples of an uninterrupted one, and loading an image is one seek and read,
    fork-safe. webdataset gives the shard list (brace expansion) and the sample convention (key =
    the member name up to the first dot of its base name); its streaming pipeline cannot start at a
    given row.
    """
    try:
        from webdataset.shardlists import expand_urls
    except ImportError:
        raise SystemExit("source='webdataset' reads shard lists through the webdataset package, "
                         "which is not installed: pip install webdataset")
    if split not in shard_patterns:
        raise SystemExit(f"source='webdataset': split {split!r} has no shard pattern in "
                         f"webdataset_shards={shard_patterns}")
    pattern = shard_patterns[split]
    shards = expand_urls(pattern)[:max_shards or None]
    root = os.path.dirname(os.path.commonprefix(shards))
    ids, files, keys, captions, shard_of = [], [], [], {}, {}
    for shard in shards:
        if not os.path.isfile(shard):
            raise SystemExit(f"webdataset shard not found: {shard} (webdataset_shards[{split!r}]="
                             f"{pattern!r}); expected local uncompressed .tar files")
        samples = read_shard(shard, {e[1:] for e in IMAGE_EXTENSIONS})
        relative = os.path.relpath(shard, root or '.')
        for key, sample in samples.items():
            if key in shard_of:
                raise SystemExit(f"webdataset_shards[{split!r}]: sample key {key!r} is in "
                                 f"{shard_of[key]} and {shard}: expected unique keys (they are "
                                 f"the image ids)")
            shard_of[key] = shard
            name, offset, size = sample.get('image', (key, None, 0))
            ids.append(key)
            files.append(f'{relative}/{name}')
            keys.append((shard, offset, size))
            if found := sample_captions(sample.get('txt'), sample.get('json')):
                captions[key] = found
        if limit and len(ids) >= limit:
            break
    if not ids:
        raise SystemExit(f"no samples in the shards of webdataset_shards[{split!r}]={pattern!r} "
                         f"({len(shards)} shards): expected tar members like key.jpg, key.txt")
    ids, files, keys = ids[:limit or None], files[:limit or None], keys[:limit or None]
    source = {'kind': 'webdataset', 'split': split, 'shards': pattern, 'max_shards': max_shards,
              'root': root, 'listed': len(ids), 'files_sha1': files_sha1(files)}
    return dict(ids=ids, files=files, keys=keys, decode_check=True, load=load_member,
                captions={i: captions[i] for i in ids if i in captions}, source=source)


def list_coco(split, coco_root, limit=0):
    """COCO 2017's split: (ids in order, files, captions, root, source)."""
    annotations = os.path.join(coco_root, 'annotations', f'captions_{split}.json')
    images = os.path.join(coco_root, 'images', split)
    layout = (f"expected COCO in coco_root={coco_root!r} as images/{split}/*.jpg and "
              f"annotations/captions_{split}.json (from train2017.zip, val2017.zip, "
              f"annotations_trainval2017.zip)")
    if not os.path.isfile(annotations):
        raise SystemExit(f"COCO captions file not found: {annotations}; {layout}")
    if not os.path.isdir(images):
        raise SystemExit(f"COCO image folder not found: {images}; {layout}")
    from pycocotools.coco import COCO
    try:
        coco = COCO(annotations)
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise SystemExit(f"{annotations} is not a COCO captions file: {type(e).__name__}: {e}")
    ids = sorted(coco.getImgIds())[:limit or None]
    files = [coco.imgs[i]['file_name'] for i in ids]
    captions = {str(i): [a['caption'].strip() if isinstance(a['caption'], str) else a['caption']
                         for a in coco.imgToAnns[i]] for i in ids if coco.imgToAnns[i]}
    source = {'kind': 'coco', 'split': split, 'annotations': annotations}
    return ids, files, captions, images, source


def karpathy_entry(path, k, entry):
    """(split, file, cocoid, captions) of dataset_coco.json's images[k]; SystemExit naming what is
    wrong."""
    where = f"{path}: images[{k}]"
    if not isinstance(entry, dict):
        raise SystemExit(f"{where} is a {type(entry).__name__}, expected an object with "
                         f"{', '.join(KARPATHY_KEYS)}")
    if 'cocoid' in entry or 'filename' in entry:
        where += f" (cocoid {entry.get('cocoid')}, {entry.get('filename')})"
    missing = [key for key in KARPATHY_KEYS if key not in entry]
    if missing:
        raise SystemExit(f"{where} has no {', '.join(map(repr, missing))}: expected the keys "
                         f"{', '.join(KARPATHY_KEYS)}")
    if entry['split'] not in ('train', 'restval', 'val', 'test'):
        raise SystemExit(f"{where} has split {entry['split']!r}: expected 'train', 'restval', "
                         f"'val' or 'test'")
    sentences = entry['sentences'] if isinstance(entry['sentences'], list) else []
    captions = [s.get('raw') if isinstance(s, dict) else None for s in sentences]
    if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        raise SystemExit(f"{where} has sentences {str(entry['sentences'])[:80]}: expected a "
                         f"non-empty list of {{'raw': caption}} with non-blank captions")
    file = f"{entry['filepath']}/{entry['filename']}"
    return entry['split'], file, entry['cocoid'], [c.strip() for c in captions]


def list_karpathy(split, coco_root, karpathy_json='', limit=0):
    """A Karpathy split of COCO 2014: (ids in cocoid order, files, captions, root, source)."""
    path = karpathy_json or os.path.join(coco_root, 'annotations', 'dataset_coco.json')
    if split not in KARPATHY_SPLITS:
        raise SystemExit(f"source='coco_karpathy': split {split!r} is not one of "
                         f"{', '.join(KARPATHY_SPLITS)}")
    if not os.path.isfile(path):
        raise SystemExit(f"Karpathy's split file not found: {path}; expected dataset_coco.json "
                         f"(from caption_datasets.zip) there, or set karpathy_json")
    try:
        with open(path) as f:
            entries = json.load(f)['images']
        assert isinstance(entries, list)
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise SystemExit(f"{path} is not Karpathy's dataset_coco.json: expected "
                         f"{{'images': [...]}} ({type(e).__name__}: {e})")
    root, rows = os.path.join(coco_root, 'images'), {}
    for k, entry in enumerate(entries):  # every entry checked, whichever split is extracted
        which, file, cocoid, captions = karpathy_entry(path, k, entry)
        if which in KARPATHY_SPLITS[split]:
            if cocoid in rows:
                raise SystemExit(f"{path}: images[{k}] repeats cocoid {cocoid} of "
                                 f"images[{rows[cocoid][0]}]: expected one entry an image")
            rows[cocoid] = (k, file, captions)
    ids = sorted(rows)[:limit or None]
    for i in ids:  # the reported split is a fixed set: a missing image stops, it is not skipped
        k, file, _ = rows[i]
        if not os.path.isfile(os.path.join(root, file)):
            raise SystemExit(f"{path}: images[{k}] (cocoid {i}) is not on disk: "
                             f"{os.path.join(root, file)}; expected COCO 2014 in coco_root="
                             f"{coco_root!r} as images/train2014/ and images/val2014/")
    source = {'kind': 'coco_karpathy', 'split': split,
              'karpathy_splits': list(KARPATHY_SPLITS[split]), 'annotations': path}
    return ids, [rows[i][1] for i in ids], {str(i): rows[i][2] for i in ids}, root, source


def list_folder(split, image_folder, limit=0):
    """image_folder/<split>/**: (files as ids, files, captions from .txt files, root, source)."""
    root = os.path.join(image_folder, split)
    if not os.path.isdir(root):
        raise SystemExit(f"image folder not found: {root}; expected image_folder/<split>/ with "
                         f"images ({', '.join(IMAGE_EXTENSIONS)}), searched recursively")
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root)
                   for f in names if f.lower().endswith(IMAGE_EXTENSIONS))[:limit or None]
    if not files:
        raise SystemExit(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root}")
    captions = {}
    for f in files:
        text = os.path.join(root, os.path.splitext(f)[0] + '.txt')
        if os.path.isfile(text):
            with open(text) as fh:
                lines = [line.strip() for line in fh if line.strip()]
            captions.update({f: lines} if lines else {})
    return files, files, captions, root, {'kind': 'folder', 'split': split}


def list_split(split, source, limit=0, coco_root=None, image_folder=None, synthetic_counts=None,
               synthetic_seed=0, synthetic_image_size=224, webdataset_shards=None, max_shards=0,
               karpathy_json=''):
    """The images of one split: ids, file names, what the loader reads, the loader, captions,
    source.

    source 'coco' reads coco_root, 'coco_karpathy' karpathy_json (or coco_root's) and coco_root,
    'folder' image_folder, 'webdataset' the tar shards webdataset_shards[split] (the first
    max_shards), 'synthetic' draws synthetic_counts[split] images.
    """
    if source == 'webdataset':
        return list_webdataset(split, webdataset_shards, max_shards, limit)
    if source == 'synthetic':  # the CPU demo's images: demo.py draws them
        import demo
        return demo.list_synthetic(split, synthetic_counts, synthetic_seed, synthetic_image_size,
                                   limit)
    if source == 'coco':
        ids, files, captions, root, kind = list_coco(split, coco_root, limit)
    elif source == 'coco_karpathy':
        ids, files, captions, root, kind = list_karpathy(split, coco_root, karpathy_json, limit)
    elif source == 'folder':
        ids, files, captions, root, kind = list_folder(split, image_folder, limit)
    else:
        raise SystemExit(f"source must be 'coco', 'coco_karpathy', 'folder', 'webdataset' or "
                         f"'synthetic', got {source!r}")
    kind.update(root=root, listed=len(ids), files_sha1=files_sha1(files))
    return dict(ids=ids, files=files, keys=[os.path.join(root, f) for f in files],
                decode_check=True, load=load_file, captions=captions, source=kind)


class Images(torch.utils.data.Dataset):
    """Item k: (k, each transform of load(keys[k])); with no transforms, (k, '' or why it does not
    decode)."""

    def __init__(self, keys, load, transforms=None):
        self.keys, self.load, self.transforms = keys, load, transforms

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, k):
        if self.transforms is None:
            try:
                self.load(self.keys[k])
                return k, ''
            except Exception as e:  # whatever the decoder raises: skipped, with the reason
                return k, f'{type(e).__name__}: {e}'
        image = self.load(self.keys[k])
        return (k, *[t(image) for t in self.transforms])
