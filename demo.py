"""What only the CPU demo (config/demo.py) and the tests use: synthetic images with captions, and
the tiny stand-in encoders trained on them. A COCO, folder or webdataset extraction never imports
this file.

The synthetic images are coloured shapes on a background, drawn from (seed, split, index); their
captions say what is where. extract.py lists a synthetic split through list_synthetic.

With random encoders every method of Task 1 and Task 2 sits at chance, so the demo could not show
that they work. With `train_encoder_steps > 0`, extract.py first trains each open_clip encoder whose
`clip_pretrained` / `eva_pretrained` names a file that does not exist yet (untrained_encoders,
train_encoders) and writes the weights there; every stage then loads those files as it would load
real weights, open_clip.create_model(name, pretrained=<file>). Later runs reuse them.

Both stand-ins are trained, each from its own seed. The real EVA-CLIP is itself a contrastively
trained CLIP whose features relate to CLIP's by meaning; a random tower keeps each image's pixels
but not that relation. On the demo, B's image->text R@5 was 0.63x A's with a random EVA stand-in and
0.84x with a trained one (classifier-free guidance 1.0; README).

The partial-view demo (config/demo_partial.py): with eva_view='grey_shapes' the stand-in EVA is
trained on, and extracts, every shape in one grey (GreyShapes), so the shapes' colours, which CLIP
and the captions carry, are hidden from it and p(CLIP | EVA) is no longer a point. true_samples > 0
renders each scene that many times more with the colours redrawn by the scene's own rule
(recoloured_scene) and stores their CLIP tokens (write_true_samples): a perfect sampler of
p(CLIP | EVA), for Task 3's conditional measures.
"""
import math
import os
import time
import zlib
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

import data

# --- synthetic images: coloured shapes on a background, captions say what is where -------------

COLORS = {'red': (220, 40, 40), 'green': (40, 170, 70), 'blue': (40, 80, 220),
          'yellow': (240, 210, 40),
          'purple': (140, 60, 180), 'orange': (245, 140, 30), 'white': (245, 245, 245),
          'black': (25, 25, 25)}
SHAPES = ('circle', 'square', 'triangle')
PLACES = ('top left', 'top', 'top right', 'left', 'center', 'right', 'bottom left', 'bottom',
          'bottom right')
NUMBERS = ('one', 'two', 'three')


def synthetic_scene(seed, split, index):
    """(background colour, [(shape, colour, size, place, jitter)]) of synthetic image `index`."""
    # splits never share an image
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
    background = list(COLORS)[rng.integers(len(COLORS))]
    others = [c for c in COLORS if c != background]
    places = rng.choice(len(PLACES), size=rng.integers(1, 4), replace=False)
    return background, [(SHAPES[rng.integers(len(SHAPES))], others[rng.integers(len(others))],
                         ('small', 'large')[rng.integers(2)], PLACES[p],
                         tuple(rng.uniform(-0.05, 0.05, 2)))
                        for p in places]


def synthetic_image(seed, split, size, index):
    """The synthetic image `index` of `split`, drawn at size x size pixels."""
    return draw_scene(*synthetic_scene(seed, split, index), size)


def draw_scene(background, shapes, size):
    """A scene (synthetic_scene's) drawn at size x size pixels."""
    image = Image.new('RGB', (size, size), COLORS[background])
    draw = ImageDraw.Draw(image)
    for shape, color, scale, place, (jx, jy) in shapes:
        row, col = divmod(PLACES.index(place), 3)
        cx, cy = (0.2 + 0.3 * col + jx) * size, (0.2 + 0.3 * row + jy) * size
        r = (0.08 if scale == 'small' else 0.14) * size
        if shape == 'circle':
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[color])
        elif shape == 'square':
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=COLORS[color])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    return image


def recoloured_scene(seed, split, index, sample):
    """synthetic_scene(seed, split, index) with every shape's colour drawn again by the scene's own
    rule (uniform over the colours other than the background) from stream `sample`; background,
    shapes, sizes, places and counts stay: a true draw of the scene that the grey_shapes view
    shows."""
    background, shapes = synthetic_scene(seed, split, index)
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index, sample + 1])
    others = [c for c in COLORS if c != background]
    return background, [(shape, others[rng.integers(len(others))], *rest)
                        for shape, _, *rest in shapes]


def synthetic_captions(background, shapes):
    """Four to six captions of a scene (a varying number per image, like COCO's five to seven)."""
    a = lambda word: f"{'an' if word[0] in 'aeiou' else 'a'} {word}"
    where = lambda place: {'top': 'at the top', 'bottom': 'at the bottom', 'left': 'on the left',
                           'right': 'on the right'}.get(place, f'in the {place}')
    full = [f'{a(size)} {color} {shape} {where(place)}' for shape, color, size, place, _ in shapes]
    short = [f'{a(color)} {shape}' for shape, color, *_ in shapes]
    noun = 'shape' if len(shapes) == 1 else 'shapes'
    captions = [f"{' and '.join(full)} on {a(background)} background",
                f"{a(background)} background with {' and '.join(short)}",
                f'{NUMBERS[len(shapes) - 1]} {noun} on {a(background)} background', full[0]]
    if len(shapes) > 1:
        captions.append(f"{short[0]} next to {' and '.join(short[1:])}")
    if len(shapes) > 2:
        captions.append(f'three coloured shapes: {", ".join(short)}')
    return captions


def list_synthetic(split, counts, seed=0, image_size=224, limit=0):
    """extract.list_split's listing of synthetic `split`: the first counts[split] (<= limit)."""
    if split not in counts:
        raise SystemExit(f"source='synthetic': split {split!r} has no count in "
                         f"synthetic_counts={counts}")
    n = counts[split] if not limit else min(limit, counts[split])
    ids = list(range(n))
    captions = {str(i): synthetic_captions(*synthetic_scene(seed, split, i)) for i in ids}
    return dict(ids=ids, files=[f'{split}/{i:06d}.png' for i in ids], keys=ids, decode_check=False,
                load=partial(synthetic_image, seed, split, image_size), captions=captions,
                source={'kind': 'synthetic', 'split': split, 'seed': seed,
                        'image_size': image_size, 'listed': n})

# --- the partial-view demo: what EVA sees, and true draws of what it cannot see ------------------

GREY = (128, 128, 128)  # no colour of COLORS
TRUE_SAMPLES_RULE = ("demo.recoloured_scene: each shape's colour drawn again uniformly from the "
                     "colours other than the background, stream [synthetic_seed, crc32(split), "
                     "index, s + 1]; background, shapes, sizes, places and counts kept")


class GreyShapes:
    """EVA's grey_shapes view: every pixel not of the background (the image's most common colour,
    over 3/4 of a synthetic image) in one grey. Two scenes that differ only in the shapes' colours,
    which CLIP and the captions carry, give EVA the same pixels."""

    def __call__(self, image):
        pixels = np.asarray(image.convert('RGB'))
        colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
        shape = (pixels != colours[counts.argmax()]).any(-1, keepdims=True)
        return Image.fromarray(np.where(shape, np.array(GREY, dtype=np.uint8), pixels))

    def __repr__(self):  # extract.py's shared-crop check compares transforms by their repr
        return 'GreyShapes()'


VIEWS = {'full': None, 'grey_shapes': GreyShapes()}  # eva_view: what the stand-in EVA sees


def eva_view(view):
    """The PIL -> PIL transform of eva_view `view` (None: the image itself); SystemExit if
    unknown."""
    if view not in VIEWS:
        raise SystemExit(f"eva_view must be one of {tuple(VIEWS)}, got {view!r}")
    return VIEWS[view]


def viewed(crop, view, true_samples=0, source='synthetic'):
    """An encoder's crop transform (a torchvision Compose) seeing the image through eva_view
    `view`; SystemExit if true_samples > 0 (extract.py's) have nothing to redraw."""
    from torchvision import transforms
    see = eva_view(view)
    if true_samples and (see is None or source != 'synthetic'):
        raise SystemExit(f"true_samples={true_samples} redraws what a synthetic eva_view hides; "
                         f"got eva_view={view!r}, source={source!r}")
    return crop if see is None else transforms.Compose([see, *crop.transforms])


def write_true_samples(out, samples, encode, batch_size=64):
    """out/clip_samples.npy, float16 [N, S, T, D] with S = samples: row i holds the CLIP tokens
    (`encode`: PIL images -> clip.npy's float16 tokens) of S redraws of row i's scene
    (recoloured_scene), true draws of p(CLIP | EVA) when EVA's view hides the colours; meta.json
    records true_samples {file, samples, rule}. Written to a temporary name and renamed, then
    recorded; a folder that records the same is kept."""
    meta_path, path = os.path.join(out, 'meta.json'), os.path.join(out, 'clip_samples.npy')
    meta = data.read_json(meta_path)
    record = {'file': 'clip_samples.npy', 'samples': samples, 'rule': TRUE_SAMPLES_RULE}
    if meta.get('true_samples') == record and os.path.exists(path):
        return
    source, ids = meta['source'], meta['image_ids']
    shape = (len(ids), samples, meta['clip']['tokens'], meta['clip']['dim'])
    array = np.lib.format.open_memmap(path + '.tmp', mode='w+', dtype=np.float16, shape=shape)
    for lo in tqdm(range(0, len(ids), batch_size), desc=f"{source['split']} true samples"):
        rows = ids[lo:lo + batch_size]
        images = [draw_scene(*recoloured_scene(source['seed'], source['split'], i, s),
                             source['image_size']) for i in rows for s in range(samples)]
        array[lo:lo + len(rows)] = encode(images).reshape(len(rows), *shape[1:])
    array.flush()
    del array
    os.replace(path + '.tmp', path)
    data.write_json(meta_path, {**meta, 'true_samples': record})  # last: marks the array done

# --- the stand-in encoders: tiny open_clip CLIPs trained contrastively on a synthetic split ------


def listed_split(listing, preprocess, tokenizer, view='full'):
    """The images of a list_synthetic listing, seen through eva_view `view` and preprocessed as
    extraction does [count, 3, S, S]; their captions, tokenized [C, 77]; and the image row of every
    caption [C]."""
    see = eva_view(view) or (lambda image: image)
    images = torch.stack([preprocess(see(listing['load'](key))) for key in listing['keys']])
    captions = [listing['captions'][str(i)] for i in listing['ids']]
    owner = torch.repeat_interleave(torch.arange(len(images)),
                                    torch.tensor([len(c) for c in captions]))
    return images, tokenizer([c for cs in captions for c in cs]), owner


def encode_text(model, text, embedding):
    """model.encode_text(text, normalize=True) with two shortcuts that give the same features: token
    ids index `embedding` (the rows of model.token_embedding that the captions use, renumbered in
    order), and only the positions up to the last end-of-text token are run (attention is causal:
    later positions never reach it)."""
    length = int(text.argmax(1).max()) + 1  # the end-of-text token has the largest id
    text = text[:, :length]
    x = embedding[text] + model.positional_embedding[:length]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    # pooled at the end-of-text token, as open_clip's 'argmax'
    x = x[torch.arange(len(x)), text.argmax(1)]
    return F.normalize(x @ model.text_projection, dim=-1)


def train_encoder(model_name, out_path, split, count, image_size, synthetic_seed, steps=600,
                  batch_size=128,
                  lr=1e-3, weight_decay=0.1, warmup=30, token_loss=0.25, seed=0, threads=1,
                  view='full'):
    """Train open_clip `model_name`, both towers, with open_clip's ClipLoss on the synthetic images
    of `split` (each step: batch_size images from a seeded per-epoch order, one of each image's
    captions at random; AdamW, linear warm-up then cosine decay; no augmentation, extraction sees
    the same pixels) and write its state_dict to out_path. token_loss weighs the same loss on the
    mean of the patch tokens @ proj, Method A's image vector: a CLIP trained through its CLS token
    alone leaves A near chance on this data (R@5 11-19% at 600 steps). Seeded: the same settings
    give the same file. About 80-90 s for the demo, on one thread: on a model this small a second
    thread costs more than it brings. `view`: the images as eva_view shows them (the stand-in EVA
    learns from what it sees)."""
    import open_clip
    from open_clip.loss import ClipLoss
    torch.set_num_threads(threads)
    model, _, preprocess = data.open_clip_model(model_name, '')
    listing = list_synthetic(split, {split: count}, synthetic_seed,
                             image_size)  # the images extraction lists
    images, text, owner = listed_split(listing, preprocess, open_clip.get_tokenizer(model_name),
                                       view)
    first_caption = torch.searchsorted(owner, torch.arange(count))
    captions_per_image = torch.bincount(owner, minlength=count)
    # the captions use a few dozen of the 49,408 token ids: train only those rows, then write back
    used = torch.unique(text)
    # renumbered in order: the end-of-text token keeps the largest id
    text = torch.searchsorted(used, text)
    embedding = torch.nn.Parameter(model.token_embedding.weight.detach()[used].clone())
    model.token_embedding.requires_grad_(False)
    model.visual.output_tokens = True  # model.visual(x) -> (CLS embedding, ln_post patch tokens)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2 and 'embedding' not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and 'embedding' not in n)] + [embedding]
    optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                                   {'params': no_decay,
                                    'weight_decay': 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()
    g = torch.Generator().manual_seed(seed)
    order, position = torch.randperm(count, generator=g), 0
    start = time.time()
    for step in range(steps):
        cosine = 0.5 * (1 + math.cos(math.pi * max(step - warmup, 0) / max(steps - warmup, 1)))
        for group in optimizer.param_groups:
            group['lr'] = lr * min((step + 1) / warmup, cosine)
        if position + batch_size > count:
            order, position = torch.randperm(count, generator=g), 0
        rows = order[position:position + batch_size]
        position += batch_size
        draw = torch.rand(len(rows), generator=g) * captions_per_image[rows]
        caption = first_caption[rows] + draw.long()
        pooled, tokens = model.visual(images[rows])
        text_features = encode_text(model, text[caption], embedding)
        scale = model.logit_scale.exp()
        loss = loss_fn(F.normalize(pooled, dim=-1), text_features, scale)
        if token_loss:
            mean_tokens = F.normalize(tokens.mean(1) @ model.visual.proj, dim=-1)
            loss = loss + token_loss * loss_fn(mean_tokens, text_features, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the logit scale
        if step % 100 == 0 or step == steps - 1:
            print(f"{model_name} step {step}/{steps}: loss {loss.item():.3f}, "
                  f"{time.time() - start:.0f} s", flush=True)
    model.visual.output_tokens = False
    with torch.no_grad():
        model.token_embedding.weight[used] = embedding
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    data.write_atomic(out_path, lambda f: torch.save(model.state_dict(), f), mode='wb')


def untrained_encoders(encoders):
    """{role: (model name, weight file)} of the `encoders` ({role: (name, pretrained)}) that
    extract.py's train_encoder_steps trains first: open_clip models whose pretrained names neither a
    file nor a tag."""
    import open_clip
    return {role: (name, pretrained) for role, (name, pretrained) in encoders.items()
            if pretrained and not os.path.exists(pretrained) and not name.startswith('hf:')
            and pretrained not in open_clip.list_pretrained_tags_by_model(name)}


def train_encoders(untrained, steps, source, view='full'):
    """Train the `untrained` encoders for `steps` steps on the synthetic split a listing's `source`
    describes (EVA through eva_view `view`), both at once, a process and a core each; SystemExit
    naming one that failed."""
    split, count = source['split'], source['listed']
    jobs = {}
    for role, (name, pretrained) in untrained.items():
        print(f"{role}: training {name} on the {count} images of split {split} for {steps} "
              f"steps -> {pretrained}")
        jobs[role] = torch.multiprocessing.get_context('spawn').Process(target=train_encoder, args=(
            name, pretrained, split, count, source['image_size'], source['seed']),
            kwargs=dict(steps=steps, seed={'clip': 0, 'eva': 1}[role],  # independent towers
                        view=view if role == 'eva' else 'full'))
        jobs[role].start()
    for role, job in jobs.items():
        job.join()
        if job.exitcode:
            raise SystemExit(f"training the {role} encoder {untrained[role][0]} into "
                             f"{untrained[role][1]} failed (exit code {job.exitcode}; its error "
                             f"is printed above)")
