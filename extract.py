"""
Images -> memmapped CLIP and EVA patch-token arrays, one data folder per split (format: data.py).

    python extract.py config/demo.py                  # synthetic images, tiny encoders, CPU
    python extract.py --coco_root=/data/coco          # COCO 2017, ViT-L-14-quickgelu + EVA-CLIP-8B
    python extract.py config/coco_karpathy.py --coco_root=/data/coco  # Karpathy's COCO 2014 split
    python extract.py --source=webdataset --splits="('train',)" \
        --webdataset_shards="{'train': 'shards/{00000..00099}.tar'}"  # img2dataset tar shards
    torchrun --standalone --nproc_per_node=8 extract.py --coco_root=/data/coco \
        --extract_batch_size=256

Per split: list the images (sources.py: the sources and their layouts); decode each once to find the
unreadable ones (skipped and listed in meta.json); give every readable image its row; encode in
batches. Each process fills its own rows and, after every written batch, records its progress in a
small state file, so a killed run started again with the same command continues where it stopped and
ends with the arrays of an uninterrupted run. meta.json is written first with "complete": false and
last with "complete": true. One extract.py at a time writes a data folder (a lock); an out folder
from other encoders is refused unless --extract_overwrite=True; captions that are not lists of
non-blank strings are refused before any work.

Encoders. CLIP targets: `ViT-L-14-quickgelu` + `openai` patch tokens after ln_post, before proj, CLS
dropped (plain `ViT-L-14` + `openai` silently builds GELU and is refused). EVA-CLIP-8B loads through
Hugging Face transformers (`hf:BAAI/EVA-CLIP-8B`, custom code, ~33 GB of weights; its vision_model's
last hidden state minus CLS, pre-norm: the final RMSNorm touches CLS only, as the seed extracts it).
Checked against EVA-CLIP's own modeling code on a tiny random config with transformers 4.56.2 and
4.57.6 (requirements.txt pins >=4.56,<5): older versions reject the dtype= argument, and every 5.x
tried (5.0 to 5.24) breaks the 2023 remote code (it builds on the meta device and leaves the
non-persistent position_ids buffer unset: an IndexError or silently wrong positions). With
transformers 5 installed, use open_clip's EVA02-E-14-plus (config/dit_large_eva02e.py).

Precision. clip_dtype='float16' (OpenAI CLIP's own inference precision, as many mantissa bits as the
float16 storage) and eva_dtype='bfloat16' are the autocast dtypes on the GPU (meta.json
compute_dtype); the CPU computes in float32. Non-finite features stop the run naming the image; EVA
values beyond float16's 65504 (a pre-norm hidden state's few huge channels) are stored as +-65504
and counted (meta.json eva_clamped_values / _files); CLIP values beyond float16 stop the run
(ln_post outputs: a broken tower). Disk per 1,000 images: clip.npy 0.52 GB, eva.npy 2.10 GB
(EVA-CLIP-8B) or 0.92 GB (EVA02-E-14-plus): COCO train2017 with EVA-CLIP-8B is about 310 GB, val2017
13 GB.
"""
import collections
import contextlib
import itertools
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import data
from runtime import autocast, cast_for_autocast, end_process_group, resolve_device
from sources import Images, list_split

# -----------------------------------------------------------------------------
# source (sources.py: each source's layout)
source = 'coco'  # 'coco' | 'coco_karpathy' | 'folder' | 'webdataset' | 'synthetic'
coco_root = 'data/coco'  # images/<split>/*.jpg, annotations/captions_<split>.json ('coco_karpathy':
                         # images/train2014/, images/val2014/)
karpathy_json = ''  # 'coco_karpathy': Karpathy's dataset_coco.json; '' = coco_root/annotations/
image_folder = 'data/images'  # 'folder': image_folder/<split>/ (recursive); same-name .txt captions
# 'webdataset': img2dataset-style uncompressed tar shards per split, brace-expanded, e.g.
# {'train': 'data/blip3o/{00000..00098}.tar', 'val': 'data/blip3o/00099.tar'}
webdataset_shards = {}
max_shards = 0  # 'webdataset': only the first max_shards shards of each split (0 = all)
synthetic_counts = {'train': 2000, 'val': 250}  # 'synthetic': images per split
synthetic_seed = 0
synthetic_image_size = 224
# one data folder per split: data_dir/<split>; 'coco_karpathy' takes 'karpathy_train' (train +
# restval), 'karpathy_val', 'karpathy_test' (the split published COCO retrieval figures use)
splits = ('train2017', 'val2017')
limit = 0  # only the first `limit` images of each split (0 = all)
data_dir = 'data'
# encoders: an open_clip model name, or 'hf:<hub id or local dir>' (Hugging Face) for eva_model
clip_model = 'ViT-L-14-quickgelu'  # target: patch tokens after ln_post, before proj, CLS dropped
clip_pretrained = 'openai'  # open_clip tag or local weight file; '' = random init (manual_seed(0))
eva_model = 'hf:BAAI/EVA-CLIP-8B'  # condition: last hidden state, CLS dropped
eva_pretrained = ''  # for an open_clip eva_model, as clip_pretrained
# 'synthetic' only: an open_clip encoder whose *_pretrained file is missing is first trained on the
# first split for this many steps into it (the demo)
train_encoder_steps = 0
# 'synthetic' only (demo.py): what the EVA encoder sees, 'full' or 'grey_shapes' (every shape in
# one grey: the partial-view demo); true_samples > 0 (a view that hides something): that many
# redraws of each row's hidden colours, encoded as clip.npy, in clip_samples.npy
eva_view = 'full'
true_samples = 0
grid_size = 16  # both encoders must give grid_size**2 patch tokens
# run
extract_batch_size = 64
num_workers = 8  # DataLoader processes decoding images
device = 'auto'  # 'auto' = cuda if available; under torchrun each process takes cuda:LOCAL_RANK
# autocast dtypes on the GPU (the CPU computes in float32): OpenAI CLIP's own inference precision
# for the targets (10 mantissa bits, as many as their float16 storage); bfloat16's range for EVA
clip_dtype = 'float16'
eva_dtype = 'bfloat16'
extract_overwrite = False  # replace an out folder that holds another extraction
# -----------------------------------------------------------------------------

ARRAYS = tuple(f'{name}.npy' for name in data.ARRAYS)
FLOAT16_MAX = 65504.0
CLAMPED_LISTED = 10  # images with clamped EVA values that are named (warning, meta.json) per split

# --- encoders -------------------------------------------------------------------------------------


@dataclass
class Encoder:
    """An image encoder: crop (PIL -> uint8 [3, H, W], in the DataLoader workers), normalize (uint8
    crops on the device -> pixels) and forward (pixels -> patch tokens, pooled or None)."""
    crop: Callable
    mean: torch.Tensor  # [3, 1, 1] float32, Normalize's; on the device once built
    std: torch.Tensor
    forward: Callable
    spec: dict = field(default_factory=dict)  # model, pretrained, tokens, dim (+ clip's embed_dim)
    dtype: torch.dtype = torch.float32  # forward's autocast dtype

    def normalize(self, crops):
        """The pixels the whole transform gives, from its crops: ToTensor's x / 255, then
        Normalize's (x - mean) / std, the same ops in the same order (the same float32 values), on
        the crops' device."""
        return crops.float().div_(255).sub_(self.mean).div_(self.std)


def split_transform(role, transform):
    """open_clip's eval transform (Resize, CenterCrop, RGB, ToTensor, Normalize) -> Encoder's crop,
    mean, std: the workers send uint8 crops, 4x fewer bytes than float32 pixels; the device
    normalizes them."""
    from torchvision import transforms
    steps = getattr(transform, 'transforms', [])
    if len(steps) < 2 or not isinstance(steps[-2], transforms.ToTensor) \
            or not isinstance(steps[-1], transforms.Normalize):
        raise SystemExit(f"{role}: extract.py expects an image transform ending in ToTensor, "
                         f"Normalize; got {transform}")
    mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1)
                 for v in (steps[-1].mean, steps[-1].std))
    return transforms.Compose([*steps[:-2], transforms.PILToTensor()]), mean, std


def open_clip_encoder(role, name, pretrained):
    """An open_clip image tower; tokens carry the tower's final norm, prefix (CLS) tokens
    dropped."""
    import open_clip
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer
    open_clip.add_model_config(data.ENCODER_CONFIGS)
    if name not in open_clip.list_models():
        raise SystemExit(f"{role}_model={name!r} is not an open_clip model "
                         f"(the tiny test encoders live in {data.ENCODER_CONFIGS})")
    if pretrained and not os.path.isfile(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise SystemExit(f"{role}_pretrained={pretrained!r} is neither a weight file nor a tag "
                             f"of {name} (tags: {tags})")
        if open_clip.get_pretrained_cfg(name, pretrained).get('quick_gelu', False) != \
                open_clip.get_model_config(name).get('quick_gelu', False):
            raise SystemExit(f"{role}_model={name!r}: the {pretrained!r} weights need QuickGELU, "
                             f"{name} builds GELU; use {name}-quickgelu")
    model, _, transform = data.open_clip_model(name, pretrained)
    visual = model.visual.eval()  # the text tower is not needed here
    if isinstance(visual, VisionTransformer):
        if role == 'clip' and (visual.attn_pool is not None or visual.final_ln_after_pool
                               or visual.pool_type != 'tok'):
            raise SystemExit(f"clip_model={name!r}: its patch tokens are not ln_post outputs "
                             f"next to a CLS token")
        visual.output_tokens = True  # visual(x) -> (ln_post(CLS) @ proj, ln_post(patch tokens))

        def forward(x):
            pooled, tokens = visual(x)
            return tokens, pooled
    elif isinstance(visual, TimmModel) and role == 'eva':  # e.g. EVA02-E-14-plus
        trunk = visual.trunk

        def forward(x):  # timm's forward_features ends with the final norm
            return trunk.forward_features(x)[:, trunk.num_prefix_tokens:], None
    else:
        raise SystemExit(f"{role}_model={name!r}: extract.py reads patch tokens from open_clip ViT "
                         f"towers{' or timm towers' if role == 'eva' else ''}, "
                         f"not {type(visual).__name__}")
    return Encoder(*split_transform(role, transform), forward), visual


def hf_encoder(role, name, weight_dtype):
    """A Hugging Face vision model (e.g. BAAI/EVA-CLIP-8B, custom code); tokens = last hidden state
    minus CLS."""
    try:
        import transformers
    except ImportError:
        raise SystemExit(f"{role}_model='hf:{name}' loads through Hugging Face transformers, which "
                         f"is not installed: pip install transformers")
    import open_clip
    try:
        model = transformers.AutoModel.from_pretrained(name, dtype=weight_dtype,
                                                       trust_remote_code=True)
    except OSError as e:
        raise SystemExit(f"{role}_model='hf:{name}' does not load: {e}\nexpected a Hugging Face "
                         f"hub id or a local folder with config.json and the weights")
    vision = getattr(model, 'vision_model', model).eval()  # a full CLIP keeps its image tower there
    size = getattr(model.config, 'vision_config', model.config).image_size
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(name, trust_remote_code=True)
        mean, std = processor.image_mean, processor.image_std
    except (OSError, ValueError):  # EVA-CLIP-8B ships none: its card uses OpenAI CLIP's transform
        mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    transform = open_clip.image_transform(size, is_train=False, mean=mean, std=std)

    def forward(x):
        out = vision(pixel_values=x.to(weight_dtype))
        return getattr(out, 'last_hidden_state', out[0])[:, 1:], None
    return Encoder(*split_transform(role, transform), forward), vision


def build_encoder(role, name, pretrained, device, ptdtype, grid_size):
    """An Encoder on `device` that computes under autocast to ptdtype, probed once: grid_size**2
    tokens."""
    if name.startswith('hf:'):
        weight_dtype = ptdtype if device.type == 'cuda' else torch.float32
        encoder, module = hf_encoder(role, name[3:], weight_dtype)
    else:
        encoder, module = open_clip_encoder(role, name, pretrained)
    module.to(device)
    if device.type == 'cuda':  # what autocast would cast at every batch, once (the same values)
        cast_for_autocast(module, ptdtype)
    encoder.mean, encoder.std = encoder.mean.to(device), encoder.std.to(device)
    gray = Image.new('RGB', (64, 64), (127, 127, 127))
    x = encoder.normalize(encoder.crop(gray)[None].to(device))
    with torch.no_grad(), autocast(device, ptdtype):
        tokens, pooled = encoder.forward(x)
    if tokens.shape[1] != grid_size ** 2:
        side = math.isqrt(tokens.shape[1])
        hint = f'; set grid_size={side}' if side * side == tokens.shape[1] else ''
        raise SystemExit(f"{role}_model={name!r} gives {tokens.shape[1]} patch tokens per image, "
                         f"grid_size={grid_size} needs {grid_size ** 2}{hint}")
    encoder.spec = {'model': name, 'pretrained': pretrained, 'tokens': tokens.shape[1],
                    'dim': tokens.shape[2]}
    encoder.dtype = ptdtype
    if role == 'clip':
        encoder.spec['embed_dim'] = pooled.shape[1]
    if rank_world()[0] == 0:
        weights = pretrained or ('hub/local weights' if name.startswith('hf:') else 'random init')
        print(f"{role}: {name} ({weights}) -> [{tokens.shape[1]}, {tokens.shape[2]}] tokens")
    return encoder


# --- processes, files ----------------------------------------------------------------------------


def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_gather(obj):
    """[obj of rank 0, obj of rank 1, ...]."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def state_file(out, rank):
    return os.path.join(out, f'.extract_state.rank{rank}.json')


def reset(state, dim):
    """No rows written yet: progress, the float64 sums of CLIP tokens (per channel), clamped EVA
    values at zero."""
    state.update(rows_done=0, clip_sum=[0.0] * dim, clip_sumsq=[0.0] * dim, eva_clamped_values=0,
                 eva_clamped_files=[])


def folder_plan(out, spec, overwrite=False):
    """'fresh', 'resume' or 'done' for an out folder; SystemExit if it holds another extraction."""
    if overwrite or not os.path.isdir(out):
        return 'fresh'
    meta_path = os.path.join(out, 'meta.json')
    if not os.path.exists(meta_path):
        found = [a for a in ARRAYS if os.path.exists(os.path.join(out, a))]
        if found:
            raise SystemExit(f"{out} holds {', '.join(found)} but no meta.json, so not from this "
                             f"extraction; use another data_dir or --extract_overwrite=True")
        return 'fresh'
    meta = data.read_json(meta_path)
    for key, value in spec.items():
        if meta.get(key) != value:
            raise SystemExit(f"{out} holds an extraction with {key}={meta.get(key)!r}; this run "
                             f"has {key}={value!r}. Use another data_dir, or "
                             f"--extract_overwrite=True to replace it")
    return 'done' if meta.get('complete') else 'resume'


def ensure_arrays(out, shapes):
    """Create each array that is missing or of another shape; True if any was created."""
    created = False
    for name, (shape, dt) in shapes.items():
        path = os.path.join(out, name)
        if os.path.exists(path):
            try:
                a = np.load(path, mmap_mode='r')
                if a.shape == shape and a.dtype == dt:
                    continue
            except ValueError:
                pass
        np.lib.format.open_memmap(path + '.tmp', mode='w+', dtype=dt, shape=shape).flush()
        os.replace(path + '.tmp', path)
        created = True
    return created


def write_batch(out, row, arrays, state_path, state):
    """Rows row.. of each out/<name>, synced to disk, then the state that counts them (a rerun
    redoes what came after it). Positioned writes, not a long-lived memmap (resident memory grows on
    huge arrays), and no GIL held while the disk works: this runs beside the next batch's GPU
    work."""
    for name, values in arrays.items():
        path = os.path.join(out, name)
        offset = np.load(path, mmap_mode='r').offset + row * values[0].nbytes
        buffer = memoryview(np.ascontiguousarray(values)).cast('B')
        fd = os.open(path, os.O_WRONLY)
        try:
            while buffer:
                n = os.pwrite(fd, buffer, offset)
                buffer, offset = buffer[n:], offset + n
            os.fsync(fd)
        finally:
            os.close(fd)
    data.write_json(state_path, state)


def float16_tokens(x):
    """(x as float16, values beyond float16 stored as +-65504; peak |x| per image; count of values
    beyond float16 per image), on x's device: nothing here waits for it."""
    x = x.float()
    peak = x.abs().flatten(1).amax(1)
    over = (x.abs() > FLOAT16_MAX).flatten(1).sum(1)
    return x.clamp_(-FLOAT16_MAX, FLOAT16_MAX).half(), peak, over


def check_float16(peak, files, role, dtype, clamp):
    """SystemExit naming the first image whose features (peak |x| per image, on the host) are
    non-finite, or beyond float16 unless clamp: then they are stored as +-65504."""
    bad = ~torch.isfinite(peak) | (peak > FLOAT16_MAX) & (not clamp)
    if bad.any():
        j = int(bad.nonzero()[0])
        hint = f" (with {role}_dtype='float16', try 'bfloat16')" if dtype == torch.float16 else ''
        problem = (f'non-finite{hint}' if not torch.isfinite(peak[j])
                   else f'up to {peak[j]:.4g}, beyond float16 (65504), the storage dtype')
        raise SystemExit(f"{role.upper()} features of {files[j]} are {problem}; stopping")

# --- one split -----------------------------------------------------------------------------------


def check_images(keys, load, files, lo, hi, desc, batch_size, num_workers):
    """Decode images lo..hi-1 once; [{'index', 'file', 'reason'}] for those that fail (no row)."""
    loader = torch.utils.data.DataLoader(Images(keys[lo:hi], load), batch_size=batch_size,
                                         num_workers=num_workers)
    skipped = []
    with tqdm(total=hi - lo, unit='img', desc=desc, disable=rank_world()[0] != 0) as bar:
        for ks, reasons in loader:
            for k, reason in zip(ks.tolist(), reasons):
                if reason:
                    skipped.append({'index': lo + k, 'file': files[lo + k], 'reason': reason})
                    tqdm.write(f"skipping {files[lo + k]}: {reason}")
            bar.update(len(ks))
    return skipped


def prepare_folder(out, spec, overwrite):
    """Phase 1: 'done', 'resume' or 'fresh'; a fresh folder is emptied and gets meta.json with
    complete=false."""
    plan = folder_plan(out, spec, overwrite)
    barrier()  # every rank has read the folder before rank 0 changes it
    if rank_world()[0] == 0 and plan == 'fresh':
        os.makedirs(out, exist_ok=True)
        for f in os.listdir(out):
            if f in (*ARRAYS, 'meta.json', 'captions.json') or f.startswith('.extract_state.'):
                os.remove(os.path.join(out, f))
        data.write_json(os.path.join(out, 'meta.json'),
                        {**spec, 'extraction_id': data.new_id(), 'complete': False})
    barrier()
    return plan


def assign_rows(listing, out, clip, eva, batch_size, num_workers):
    """Phase 2: this rank's state (progress, skipped images), its readable images and their first
    row, the row count; the arrays exist at their final shapes. Ranks' rows follow each other; the
    decode check runs once."""
    rank, world = rank_world()
    keys, files, n = listing['keys'], listing['files'], len(listing['keys'])
    split = listing['source']['split']
    lo, hi = rank * n // world, (rank + 1) * n // world
    path = state_file(out, rank)
    state = data.read_json(path) if os.path.exists(path) else {}
    if (state.get('world_size'), state.get('lo'), state.get('hi')) != (world, lo, hi):
        if state:
            print(f"rank {rank}: the earlier run had other processes; this rank starts over")
        skipped = check_images(keys, listing['load'], files, lo, hi, f"{split} check", batch_size,
                               num_workers) if listing['decode_check'] else []
        state = {'world_size': world, 'lo': lo, 'hi': hi, 'skipped': skipped}
        reset(state, clip.spec['dim'])
        data.write_json(path, state)
    bad = {s['index'] for s in state['skipped']}
    mine = [i for i in range(lo, hi) if i not in bad]
    counts = all_gather(len(mine))
    first_row, count = sum(counts[:rank]), sum(counts)
    if count == 0:  # e.g. COCO annotations next to an empty or wrong image folder
        skipped = sorted((s for st in all_gather(state['skipped']) for s in st),
                         key=lambda s: s['index'])
        example = (f"; the first, {keys[skipped[0]['index']]}: {skipped[0]['reason']}" if skipped
                   else '')
        os.remove(path)  # a rerun after the images are fixed checks them again
        raise SystemExit(f"no readable image in split {split!r}: expected at least one of the {n} "
                         f"listed{example}")
    tokens = clip.spec['tokens']
    shapes = {'clip.npy': ((count, tokens, clip.spec['dim']), np.dtype(np.float16)),
              'eva.npy': ((count, tokens, eva.spec['dim']), np.dtype(np.float16)),
              'clip_cls.npy': ((count, clip.spec['embed_dim']), np.dtype(np.float32))}
    if all_gather(ensure_arrays(out, shapes) if rank == 0 else False)[0]:
        reset(state, clip.spec['dim'])  # fresh arrays: whatever an earlier run wrote is gone
        data.write_json(path, state)
    return state, mine, first_row, count


def shares_crop(a, b):
    """Whether two crop transforms are one (e.g. both 224 px: cropped once): the same repr and the
    same crop of a noise probe. The probe alone is blind where noise never goes: a view that
    changes only pixels of a few exact colours (a background, say) passes it."""
    probe = Image.fromarray(np.random.default_rng(0).integers(0, 256, (251, 317, 3), np.uint8))
    return repr(a) == repr(b) and torch.equal(a(probe), b(probe))


@torch.no_grad()
def encode_clip(clip, images, device):
    """clip.npy's float16 tokens of PIL images, encoded as launch encodes them (demo.py's true
    samples)."""
    x = torch.stack([clip.crop(image) for image in images]).to(device)
    with autocast(device, clip.dtype):
        tokens, _ = clip.forward(clip.normalize(x))
    tokens, peak, _ = float16_tokens(tokens)
    check_float16(peak.cpu(), ['a true sample'] * len(images), 'clip', clip.dtype, clamp=False)
    return tokens.cpu().numpy()


@torch.no_grad()
def launch(crops, clip, eva, device):
    """A batch's device work, queued and not waited for: both towers on the crops (one [both] or
    [clip's, eva's]), float16 tokens, the checks' values and the stats, all copied into (pinned)
    host tensors; and the event after them (None on the CPU)."""
    cuda = device.type == 'cuda'
    crops = [x.to(device, non_blocking=True) for x in crops]
    with autocast(device, clip.dtype):
        clip_tokens, clip_cls = clip.forward(clip.normalize(crops[0]))
    with autocast(device, eva.dtype):
        eva_tokens, _ = eva.forward(eva.normalize(crops[-1]))
    clip16, clip_peak, _ = float16_tokens(clip_tokens)
    eva16, eva_peak, eva_over = float16_tokens(eva_tokens)
    cls32 = clip_cls.float()
    c = clip16.double()  # stats of the stored float16 values, accumulated in float64
    results = {'clip.npy': clip16, 'eva.npy': eva16, 'clip_cls.npy': cls32, 'clip_peak': clip_peak,
               'eva_peak': eva_peak, 'eva_over': eva_over,
               'cls_finite': torch.isfinite(cls32).all(1), 'sum': c.sum((0, 1)),
               'sumsq': (c * c).sum((0, 1))}
    # pinned: a pageable copy from the GPU runs several times slower, and would wait for the batch
    host = {k: torch.empty(x.shape, dtype=x.dtype, pin_memory=cuda).copy_(x, non_blocking=True)
            for k, x in results.items()}
    ready = torch.cuda.Event() if cuda else None
    if cuda:
        ready.record()
    return host, ready


def check_batch(host, batch_files, clip, eva, clamped_files):
    """A landed batch's checks: SystemExit on broken features; EVA values beyond float16 named (the
    first CLAMPED_LISTED files, appended to clamped_files) and counted (returned)."""
    # CLIP targets are ln_post outputs: beyond float16 means a broken tower, and a clamped target is
    # a wrong one. EVA's last hidden state can be pre-norm with a few huge channels (EVA-CLIP-8B):
    # the DiT RMS-normalizes each token, where a value clamped to 65504 still dominates as the true
    # one did. Per value, so a row does not depend on batch, rank or resume (a scale fitted on a
    # first batch would, and could still overflow later); the clamped values are counted in
    # meta.json.
    check_float16(host['clip_peak'], batch_files, 'clip', clip.dtype, clamp=False)
    check_float16(host['eva_peak'], batch_files, 'eva', eva.dtype, clamp=True)
    over = host['eva_over'].tolist()
    for f, n, p in zip(batch_files, over, host['eva_peak'].tolist()):
        if n and len(clamped_files) < CLAMPED_LISTED:
            clamped_files.append(f)
            tqdm.write(f"warning: {n} EVA values of {f} (up to {p:.4g}) are beyond float16: stored "
                       f"as +-65504")
    if not host['cls_finite'].all():
        bad = batch_files[int((~host['cls_finite']).nonzero()[0])]
        raise SystemExit(f"CLIP embedding of {bad} is non-finite; stopping")
    return sum(over)


def encode_rows(listing, out, clip, eva, device, state, mine, first_row, batch_size, num_workers):
    """Phase 3: encode this rank's images not yet done and write their rows; returns images/s."""
    rank, cuda = rank_world()[0], device.type == 'cuda'
    files, keys = listing['files'], listing['keys']
    done, sums = state['rows_done'], np.array(state['clip_sum'])
    sumsq = np.array(state['clip_sumsq'])
    clamped, clamped_files = state['eva_clamped_values'], list(state['eva_clamped_files'])
    todo = mine[done:]
    crops = [clip.crop] if shares_crop(clip.crop, eva.crop) else [clip.crop, eva.crop]
    images = Images([keys[i] for i in todo], listing['load'], crops)
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, num_workers=num_workers,
                                         pin_memory=cuda)
    t0, pending, queued = time.time(), collections.deque(), None
    desc = f"{listing['source']['split']} encode"
    with tqdm(total=len(mine), initial=done, unit='img', desc=desc, disable=rank != 0) as bar, \
            ThreadPoolExecutor(1) as writer:  # one thread: batches land in order
        # software pipeline: batch k + 1 is queued on the device before batch k is waited for,
        # checked and written
        for batch in itertools.chain(loader, [None]):  # None: finishes the last batch
            launched = None if batch is None else (batch[0], *launch(batch[1:], clip, eva, device))
            if queued is not None:
                ks, host, ready = queued
                if ready is not None:
                    ready.synchronize()  # batch k's copies only; batch k + 1 keeps the device busy
                batch_files = [files[todo[k]] for k in ks.tolist()]
                clamped += check_batch(host, batch_files, clip, eva, clamped_files)
                sums += host['sum'].numpy()
                sumsq += host['sumsq'].numpy()
                state.update(rows_done=done + len(ks), clip_sum=sums.tolist(),
                             clip_sumsq=sumsq.tolist(), eva_clamped_values=clamped,
                             eva_clamped_files=list(clamped_files))
                arrays = {f: host[f].numpy() for f in ARRAYS}
                pending.append(writer.submit(write_batch, out, first_row + done, arrays,
                                             state_file(out, rank), dict(state)))
                if len(pending) > 1:  # at most one batch waits for the disk: bounded memory
                    pending.popleft().result()
                done += len(ks)
                bar.update(len(ks))
            queued = launched
        for future in pending:
            future.result()
    return len(todo) / max(time.time() - t0, 1e-9)


def finish_folder(listing, out, spec, count, tokens):
    """Phase 4 (rank 0): captions.json, then meta.json (returned) with the stats and complete=true;
    no state files."""
    ids, files, n = listing['ids'], listing['files'], len(listing['keys'])
    states = [data.read_json(state_file(out, r)) for r in range(rank_world()[1])]
    assert sum(s['rows_done'] for s in states) == count, 'a rank did not write all its rows'
    skipped = sorted((s for st in states for s in st['skipped']), key=lambda s: s['index'])
    bad = {s['index'] for s in skipped}
    rows = [i for i in range(n) if i not in bad]
    n_tokens = count * tokens
    mean = sum(np.array(s['clip_sum']) for s in states) / n_tokens
    var = sum(np.array(s['clip_sumsq']) for s in states) / n_tokens - mean ** 2
    captions = {str(ids[i]): listing['captions'][str(ids[i])] for i in rows
                if str(ids[i]) in listing['captions']}
    data.write_json(os.path.join(out, 'captions.json'), captions)
    # a folder's identity, made when it was started
    started = data.read_json(os.path.join(out, 'meta.json')).get('extraction_id')
    meta = {**spec, **({'extraction_id': started} if started else {}), 'count': count,
            'image_ids': [ids[i] for i in rows], 'files': [files[i] for i in rows],
            'grid_size': math.isqrt(tokens), 'clip_mean': mean.tolist(),
            'clip_std': np.sqrt(np.maximum(var, 0)).tolist(),
            'skipped': [{'image_id': ids[s['index']], 'file': s['file'], 'reason': s['reason']}
                        for s in skipped],
            'eva_clamped_values': sum(s['eva_clamped_values'] for s in states),
            'eva_clamped_files': [f for s in states
                                  for f in s['eva_clamped_files']][:CLAMPED_LISTED],
            'complete': True}
    data.write_json(os.path.join(out, 'meta.json'), meta)  # last: "complete" marks a finished one
    for f in os.listdir(out):  # this run's state files and any of earlier runs with more processes
        if f.startswith('.extract_state.'):
            os.remove(os.path.join(out, f))
    return meta


def extract_split(listing, out, clip, eva, device, batch_size=64, num_workers=0, overwrite=False):
    """Fill out/ (clip.npy, eva.npy, clip_cls.npy, meta.json, captions.json) from one listed
    split."""
    encoders = (('clip', clip), ('eva', eva))
    compute = {role: str(e.dtype).removeprefix('torch.') for role, e in encoders}
    spec = json.loads(json.dumps({'format': data.FORMAT, 'version': data.VERSION,
                                  'source': listing['source'], 'clip': clip.spec, 'eva': eva.spec,
                                  'dtype': 'float16', 'compute_dtype': compute}))
    if prepare_folder(out, spec, overwrite) == 'done':
        if rank_world()[0] == 0:
            print(f"{out}: already complete, nothing to do (--extract_overwrite=True redoes it)")
        return
    state, mine, first_row, count = assign_rows(listing, out, clip, eva, batch_size, num_workers)
    rate = encode_rows(listing, out, clip, eva, device, state, mine, first_row, batch_size,
                       num_workers)
    barrier()  # every rank has written its rows
    if rank_world()[0] == 0:
        meta = finish_folder(listing, out, spec, count, clip.spec['tokens'])
        gb = sum(os.path.getsize(os.path.join(out, a)) for a in ARRAYS) / 1e9
        shapes = {role: [count, e.spec['tokens'], e.spec['dim']] for role, e in encoders}
        print(f"{out}: {count} images ({len(meta['skipped'])} skipped), clip {shapes['clip']}, "
              f"eva {shapes['eva']}, {gb:.2f} GB, {rate * rank_world()[1]:.1f} images/s")
        if meta['eva_clamped_values']:
            print(f"warning: {meta['eva_clamped_values']} EVA values beyond float16 are stored as "
                  f"+-65504 (meta.json eva_clamped_values; first in "
                  f"{', '.join(meta['eva_clamped_files'][:3])})")
    barrier()


def check_disjoint(listings, source):
    """Train on one split, evaluate on another: SystemExit if two splits share an image."""
    seen = {s: set(listing['ids']) if source in ('coco', 'coco_karpathy') else
            {os.path.realpath(os.path.join(listing['source']['root'], f)) for f in listing['files']}
            for s, listing in listings.items()}
    splits = list(listings)
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            if seen[a] & seen[b]:
                raise SystemExit(f"splits {a!r} and {b!r} share {len(seen[a] & seen[b])} images "
                                 f"(e.g. {min(seen[a] & seen[b])}): train and evaluation images "
                                 f"must differ")


if __name__ == '__main__':
    from configurator import configure, require_positive
    config = configure(globals(), renamed={'batch_size': 'extract_batch_size',
                                           'overwrite': 'extract_overwrite',
                                           'dtype': 'clip_dtype and --eva_dtype'})
    require_positive(config, 'extract_batch_size')
    # torchrun: gloo carries only small objects; ranks may finish far apart
    if int(os.environ.get('RANK', -1)) != -1:
        dist.init_process_group('gloo', timeout=timedelta(hours=12))
    rank, world = rank_world()
    device = resolve_device(device)
    if device == 'cuda' and world > 1:
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    device = torch.device(device)
    for key, value in (('clip_dtype', clip_dtype), ('eva_dtype', eva_dtype)):
        if value not in ('float32', 'bfloat16', 'float16'):
            raise SystemExit(f"{key} must be 'float32', 'bfloat16' or 'float16', got {value!r}")
    ptdtypes = {role: getattr(torch, value) if device.type == 'cuda' else torch.float32
                for role, value in (('clip', clip_dtype), ('eva', eva_dtype))}
    if device.type == 'cpu':  # the DataLoader workers have their cores; oversubscribed ones crawl
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - num_workers))

    untrained = {}
    if train_encoder_steps:  # the CPU demo trains its stand-in encoders first (demo.py)
        import demo
        untrained = demo.untrained_encoders({'clip': (clip_model, clip_pretrained),
                                             'eva': (eva_model, eva_pretrained)})
    if untrained and source != 'synthetic':
        raise SystemExit(f"train_encoder_steps={train_encoder_steps} trains encoders on synthetic "
                         f"images, got source={source!r}: the files "
                         f"{', '.join(p for _, p in untrained.values())} do not exist")
    # every split listed and checked before any folder is written
    listings = {split: list_split(split, source, limit, coco_root, image_folder, synthetic_counts,
                                  synthetic_seed, synthetic_image_size, webdataset_shards,
                                  max_shards, karpathy_json) for split in splits}
    for split, listing in listings.items():  # refused now: eval.py would refuse them later
        data.check_captions(listing['captions'],
                            f"the captions of split {split!r} ({listing['source']['kind']})")
    if source != 'synthetic':
        check_disjoint(listings, source)
    if untrained and rank == 0:  # on the first split
        demo.train_encoders(untrained, train_encoder_steps, listings[splits[0]]['source'],
                            eva_view)
    barrier()
    clip = build_encoder('clip', clip_model, clip_pretrained, device, ptdtypes['clip'], grid_size)
    eva = build_encoder('eva', eva_model, eva_pretrained, device, ptdtypes['eva'], grid_size)
    if eva_view != 'full' or true_samples:  # the partial-view demo (demo.py)
        import demo
        eva.crop = demo.viewed(eva.crop, eva_view, true_samples, source)
        eva.spec['view'] = eva_view
    # stop now, not hours later, on a data_dir that cannot take the arrays (less what a killed run
    # already wrote)
    row_bytes = (grid_size ** 2 * (clip.spec['dim'] + eva.spec['dim']) * 2
                 + clip.spec['embed_dim'] * 4)
    written = lambda split: sum(os.stat(p).st_blocks * 512 for p in
                                (os.path.join(data_dir, split, a) for a in ARRAYS)
                                if os.path.exists(p))
    needed = sum(len(listings[split]['ids']) * row_bytes - written(split) for split in splits)
    data.check_writable(data_dir, needed, 'data_dir', 'the arrays need')
    for split in splits:
        out = os.path.join(data_dir, split)
        if rank == 0:
            print(f"split {split}: {len(listings[split]['ids'])} images -> {out}")
        with data.lock(out, 'extract.py') if rank == 0 else contextlib.nullcontext():  # one writer
            extract_split(listings[split], out, clip, eva, device, extract_batch_size, num_workers,
                          extract_overwrite)
            if true_samples and rank == 0:
                demo.write_true_samples(out, true_samples,
                                        lambda images: encode_clip(clip, images, device),
                                        extract_batch_size)
    end_process_group()  # under torchrun: every rank leaves together, exit 0 (runtime.py)
