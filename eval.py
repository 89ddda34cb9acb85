"""Evaluate generated CLIP tokens on a captioned data folder (COCO val2017): Task 1 alignment, Task 2 recall.

Image embeddings, all in CLIP's joint image-text space (embed_dim, 768 for ViT-L/14):
  A = normalize(mean_tokens(clip.npy) @ visual.proj)        the seed's "CLIP baseline", from the real tokens
  B = the same function of generated.npy (sample.py)         the model under test; same function, fair comparison
  R = normalize(clip_cls.npy)                                 CLIP's own CLS embedding: what published numbers use
  mean tokens = the same function of train_data's mean tokens, one vector for every image: what a generator that
  ignores EVA gets (recall at chance, alignment the floor)
  baselines = the same function of other generators' arrays (ridge.py's linear map; a DiT trained by plain regression),
  each compared with B on the same bootstrap draws
Without a generated.npy only A, R, mean tokens and any baselines are reported (the CLIP baseline). In recall,
competitors tied with a query because their embeddings are equal stand in a random order (expected recall), other
exact ties count against it; every recall and alignment mean carries a bootstrap 95% interval, resampling images
with all their captions (the independent unit: an image's captions share its embedding). Token fidelity is
standardized in the DiT's own units: generated.json's data_stats (the checkpoint's), else train_data's meta.json.
The summaries go next to the generated array (<its folder>/eval/; out_dir/eval/ without one) and name the
checkpoint and sampler that made it; an array made for other rows (its generated.json 'data') is refused, so an
eval of another folder never overwrites the summaries of the one it was made for.

python eval.py config/demo.py                          # the flow DiT's samples sample.py finished last in out_dir
python eval.py config/demo.py --generated=out/demo/samples/ckpt_iter000400-euler10-cfg1-seed1337/generated.npy
python eval.py config/demo.py --holdout=True           # train_data's held-out slice: where settings are chosen

Why A is below R: CLIP was trained through its CLS token; its patch tokens were never trained to be mean-pooled and
projected. Published CLIP COCO figures use R, on the Karpathy 5K test split of COCO 2014, not val2017.
Ties: recall reads every score from one score matrix, computed in blocks that are GEMMs of one shape (padded to a
multiple of 16 images), so equal embeddings score exactly equal; a constant embedding scores exactly chance (K/N
text -> image). The seed's rule (ties for the query, the own score from a separate product) gave 1,000 identical
images 65% text -> image R@1.

alignment_summary.json (Task 1, every image-caption pair): method_a, method_b, reference, mean_tokens, and
baselines {label: ...}, each with mean_cosine_similarity (and _ci95), std_, min_, max_cosine_similarity;
difference_mean (_ci95), difference_std (B - A per pair) and b_minus_<label> for each baseline; correlation
(Pearson, per-pair A vs B), reference_correlation (A vs R); embedding_space, uses_visual_projection; token_fidelity
(B's), mean_tokens_fidelity: token_cosine_mean/_std, token_cosine_standardized_mean/_std (after standardizing with
token_fidelity_stats, named in the summary), image_vector_cosine_mean/_std (to A), mse_standardized; the data
target (folder, id, start, count), counts, caption statistics, and sample.py's generated.json under sampling.
recall_summary.json (Task 2): per method and baseline, image_to_text and text_to_image recall@K in [0, 1] with
recall@K_ci95, and median_rank; difference (B - A) and b_minus_<label> per direction: recall@K_difference (_ci95)
and recall@K_relative_change (percent). save_detailed=True adds per-pair and per-image arrays (npz); with
matplotlib, alignment_hist.png, alignment_scatter.png and recall.png. The recall core is a plain function:
`from eval import recall_at_k`.
"""
import hashlib
import json
import math
import os
import re
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import published

# -----------------------------------------------------------------------------
out_dir = 'out'                        # A and R only: results go to out_dir/eval/
data_dir = 'data'                      # extract.py's output: data_dir/<split>
splits = ('train2017', 'val2017')
val_data = ''                          # data folder with clip.npy, clip_cls.npy, captions.json; '' = data_dir/splits[1]
train_data = ''                        # its clip.npy gives the mean-tokens row; '' = data_dir/splits[0]
holdout = False                        # True: evaluate train_data's held-out slice (where settings are chosen)
val_fraction = 0.0                     # the held-out slice: train_data's last val_fraction rows, as train.py's
mean_tokens_rows = 10000               # evenly spaced train rows averaged for it (0 = all; never held-out ones)
generated = ''                         # generated tokens; results go to <its folder>/eval/. '' = the samples folder
                                       # finished last in out_dir/samples for this target (val or holdout), if any,
                                       # else A and R only
clip_model = 'ViT-L-14-quickgelu'      # open_clip name: visual.proj and the text tower
clip_pretrained = 'openai'             # tag or local weight file; '' = random init under torch.manual_seed(0)
tasks = 'alignment,recall'
k_values = (1, 5, 10)
eval_batch_size = 256                  # images per token chunk, captions per text-tower batch
save_detailed = False                  # also write per-sample arrays (npz)
bootstrap_samples = 1000               # resamples for the 95% intervals (0 = none)
bootstrap_seed = 0
baselines = ()                         # generated.npy arrays of baseline generators, each with its generated.json
                                       # (ridge.py; a DiT trained by plain regression, sampled by sample.py): one more
                                       # column each, B - baseline paired; one made for other rows is skipped
device = 'auto'
# -----------------------------------------------------------------------------
SCORE_CHUNK_ELEMENTS = 1 << 24         # scores per image chunk (64 MB of float32; three such buffers exist at once)
METHODS = {'a': 'A: real tokens, mean-pooled + proj', 'b': 'B: generated tokens, mean-pooled + proj',
           'r': 'R: CLIP CLS embedding (clip_cls)',
           'm': "mean tokens: the training set's mean CLIP tokens for every image, mean-pooled + proj"}
COLUMNS = {'a': 'A real tokens', 'b': 'B generated', 'r': 'R CLIP CLS', 'm': 'mean tokens', 'd': 'B - A'}
SUMMARY_KEYS = {'a': 'method_a', 'b': 'method_b', 'r': 'reference', 'm': 'mean_tokens'}
DIRECTIONS = ('image_to_text', 'text_to_image')
TIES = ('never for the query: competitors whose embedding equals the best correct item\'s stand in a uniformly '
        'random order with it and recall is the expectation over that order (a constant embedding scores exactly '
        'chance); a different embedding with exactly the same score counts against the query')


def duplicate_groups(emb):
    """Group id of every row [R]: rows with exactly equal embeddings share one (their scores tie exactly)."""
    return torch.unique(emb, dim=0, return_inverse=True)[1]


def retrieval_counts(image_emb, text_emb, text_image, chunk_images=None, text_groups=None):
    """What decides every query's rank, counted on one score matrix S = text_emb @ image_emb.T.

    Returns ({'image_to_text': (greater, ties, correct) per image [N], 'text_to_image': (greater, ties, correct)
    per caption [T]}, pair): `ties` competitors tie with the query's best correct item and `correct` of its correct
    items do (a caption's image: 1), because their embeddings equal its embedding; `greater` competitors score
    above it, or exactly level with a different embedding (a float coincidence: it counts against the query);
    pair [T] is each caption's score with its own image.
    S is computed once, in blocks that are GEMMs of one shape (rounding can depend on a GEMM's shape; one shape
    makes equal embeddings score exactly equal), and every score, a query's own and its competitors', is read from
    it: one comparison per score and direction. Block (k, c) scores the captions of image chunk k against image
    chunk c, so the diagonal blocks hold every own pair: they go first, as text -> image needs each caption's own
    score before it can compare. text_groups: duplicate_groups(text_emb), to share it between calls.
    """
    text_emb = torch.as_tensor(text_emb).float()
    device = text_emb.device
    image_emb = torch.as_tensor(image_emb).float().to(device)
    text_image = torch.as_tensor(text_image).to(device).long()
    (N, D), (T, D_text) = image_emb.shape, text_emb.shape
    if D != D_text or text_image.shape != (T,):
        raise ValueError(f"recall: image_emb [N, D], text_emb [T, D] and text_image [T] expected, got "
                         f"{list(image_emb.shape)}, {list(text_emb.shape)}, {list(text_image.shape)}")
    if T == 0 or text_image.min() < 0 or text_image.max() >= N:
        raise ValueError(f"recall: text_image should hold image rows in [0, {N}), got "
                         f"{text_image.unique()[:10].tolist() if T else 'no captions'}")
    captions_per_image = torch.bincount(text_image, minlength=N)
    if (captions_per_image == 0).any():
        missing = torch.nonzero(captions_per_image == 0).flatten()
        raise ValueError(f"recall: {len(missing)} of {N} images have no caption (rows {missing[:10].tolist()})")
    text_groups = duplicate_groups(text_emb) if text_groups is None else torch.as_tensor(text_groups).to(device)
    image_groups = duplicate_groups(image_emb)
    n = -(-N // (chunk_images or max(1, SCORE_CHUNK_ELEMENTS // T)))
    # images per chunk, equal chunks, a multiple of 16: a BLAS can take a GEMM's last few columns through another
    # kernel (seen with MKL at 5-7 and 9-11 columns), and then equal images would not score exactly alike
    r = -(-N // n)
    r = -(-r // 16) * 16
    n = -(-N // r)
    order = torch.argsort(text_image, stable=True)
    owner = text_image[order]  # captions grouped by image, so by chunk
    chunk = owner // r
    per_chunk = torch.bincount(chunk, minlength=n)
    w = int(per_chunk.max())  # caption rows per chunk, padded to the fullest
    row = chunk * w + torch.arange(T, device=device) - (torch.cumsum(per_chunk, 0) - per_chunk)[chunk]
    source = torch.zeros(n * w, dtype=torch.long, device=device)
    source[row] = order
    X = text_emb.index_select(0, source)
    if n * w > T:  # padding rows: NaN compares false with everything, so they are never counted
        X[torch.ones(n * w, dtype=torch.bool, device=device).index_fill_(0, row, False)] = math.nan
    X = X.view(n, w, D)
    E = image_emb.new_full((n * r, D), math.nan)
    E[:N] = image_emb
    diagonal = torch.bmm(X, E.view(n, r, D).transpose(1, 2))  # every caption against its own image chunk
    pair = torch.full((n * w,), math.nan, device=device)
    pair[row] = diagonal[chunk, row - chunk * w, owner - chunk * r]
    best = torch.full((N,), -math.inf, device=device).scatter_reduce(0, owner, pair[row], 'amax')
    # ties are exact between equal embeddings: an image's best captions tie with every caption equal to one of them
    at_best = pair[row] == best[owner]
    best_group = torch.unique(owner[at_best] * T + text_groups[order][at_best])
    tied = torch.zeros(N, dtype=torch.long, device=device).index_add_(
        0, best_group // T, torch.bincount(text_groups, minlength=T)[best_group % T])
    correct = torch.bincount(owner[at_best], minlength=N)
    own_group = torch.bincount(image_groups, minlength=N)[image_groups]  # images equal to each image, itself included
    t2i, i2t = torch.zeros(n * w, device=device), torch.zeros(n, r, device=device)
    S, H = torch.empty_like(diagonal), torch.empty_like(diagonal)
    p, b = pair.view(n, w, 1), F.pad(best, (0, n * r - N), value=math.nan).view(n, r)
    for c in range(n):
        Ec = E[c * r:(c + 1) * r].T
        for ks in (slice(0, c), slice(c + 1, n)):  # the other blocks of this image chunk, each of the same shape
            torch.bmm(X[ks], Ec.expand(ks.stop - ks.start, D, r), out=S[ks])
        S[c] = diagonal[c]
        t2i += torch.ge(S, p, out=H).view(-1, r).sum(1)  # into floats: summing them is faster than summing bools
        i2t[c] = torch.ge(S, b[c], out=H).view(-1, r).sum(0)
    t2i = t2i[row]
    back = torch.empty_like(order)
    back[order] = torch.arange(T, device=device)  # sorted caption -> the caller's caption order
    own_ties = own_group[owner][back]
    i2t = i2t.flatten()[:N].long()
    return {'image_to_text': (i2t - tied, tied - correct, correct),
            'text_to_image': (t2i[back].long() - own_ties, own_ties - 1, torch.ones_like(own_ties))}, pair[row][back]


def hit_rates(greater, ties, correct, k_values):
    """[Q, len(k_values)] float64: the chance that a query has a correct item in its top K when its tied competitors
    and tied correct items stand in a uniformly random order below the `greater` ones."""
    g, e, c = (torch.as_tensor(x).double()[:, None] for x in (greater, ties, correct))
    j = torch.arange(max(k_values), dtype=torch.float64, device=g.device)
    # P(the first j places of the tied group all go to competitors), j = 0 .. max K
    miss = torch.cat([torch.ones_like(g), torch.cumprod((e - j).clamp(min=0) / (e + c - j).clamp(min=1), 1)], 1)
    places = (torch.tensor(k_values, dtype=torch.float64, device=g.device) - g).clamp(min=0).long()
    return 1 - miss.gather(1, places)


def expected_ranks(greater, ties, correct):
    """0-based rank of the first correct item, expected over the random order of the tied ones."""
    return greater.double() + ties.double() / (correct.double() + 1)


def pair_scores(image_emb, text_emb, text_image):
    """Dot product of every caption with its own image: [T]; the per-pair cosines of Task 1 for unit vectors."""
    return torch.einsum('td,td->t', image_emb.index_select(0, text_image), text_emb)


def recall_at_k(image_emb, text_emb, text_image, k_values=(1, 5, 10), chunk_images=None):
    """Recall@K, fractions in [0, 1], for any embeddings (L2-normalize them first for cosine retrieval).

    image_emb [N, D], text_emb [T, D], text_image [T] the image row of each caption (images may have any number
    of captions, at least one). Image -> text: an image is a hit when any of its captions is in its top K.
    Text -> image: a caption is a hit when its image is in its top K. Competitors equal to a query's best correct
    item stand in a random order with it, and recall is the expectation (a constant embedding scores exactly
    chance); a different embedding at exactly the same score counts against the query (see retrieval_counts).
    Returns {'image_to_text': {k: r}, 'text_to_image': {k: r}}.
    """
    counts, _ = retrieval_counts(image_emb, text_emb, text_image, chunk_images)
    return {d: dict(zip(k_values, hit_rates(*c, k_values).mean(0).tolist())) for d, c in counts.items()}


def pool_project(tokens, visual):
    """Image vector of methods A and B: open_clip's pool_type='avg' (tokens already carry ln_post), proj, L2 norm."""
    return F.normalize(tokens.float().mean(1) @ visual.proj.float(), dim=-1)


def load_clip(name, pretrained, device):
    """open_clip model and tokenizer; pretrained '' = random init under torch.manual_seed(0), as extract.py does."""
    import open_clip
    try:
        model = data.open_clip_model(name, pretrained)[0]
        tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"eval.py: cannot build CLIP clip_model={name!r} clip_pretrained={pretrained!r}: {e}")
    if getattr(model.visual, 'proj', None) is None:
        raise SystemExit(f"eval.py: clip_model {name!r} has no visual.proj ({type(model.visual).__name__}); "
                         f"methods A and B need an open_clip VisionTransformer with a projection")
    return model.to(device).eval(), tokenizer


def text_cache_path(folder, name, pretrained, rows=''):
    """data_folder/text_features_<model>_<weights>_<hash>.npy: readable, and distinct for every spec (and row range)."""
    slug = lambda s: re.sub(r'[^A-Za-z0-9.-]+', '-', s).strip('-')[-40:] or 'random'
    digest = hashlib.sha1(f"{name}\0{pretrained}{rows}".encode()).hexdigest()[:8]
    return os.path.join(folder, f"text_features_{slug(name)}_{slug(os.path.basename(pretrained))}_{digest}.npy")


@torch.no_grad()
def text_features(model, tokenizer, captions, folder, name, pretrained, batch_size, device, rows=''):
    """L2-normalized text-tower features [T, embed_dim], cached in the data folder for this spec and caption order."""
    path = text_cache_path(folder, name, pretrained, rows)
    weights = os.stat(pretrained) if pretrained and os.path.isfile(pretrained) else None
    key = {'clip_model': name, 'clip_pretrained': pretrained, 'count': len(captions),
           'weights_size_mtime': [weights.st_size, weights.st_mtime] if weights else None,
           'captions_sha1': hashlib.sha1(json.dumps(captions).encode()).hexdigest()}
    meta_path = path[:-len('.npy')] + '.json'
    if os.path.exists(path) and os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f) == key:
                print(f"text features: cached {path}")
                return np.load(path)
    # a caption repeated across images is encoded once: its copies tie exactly (batches can round differently)
    unique, index = np.unique(np.array(captions, dtype=object), return_inverse=True)
    out = []
    for s in tqdm(range(0, len(unique), batch_size), desc='text features', unit='batch'):
        x = model.encode_text(tokenizer(unique[s:s + batch_size].tolist()).to(device))
        out.append(F.normalize(x.float(), dim=-1).cpu().numpy())
    feats = np.concatenate(out)[index]
    data.write_atomic(path, lambda f: np.save(f, feats), 'wb')
    data.write_json(meta_path, key)
    return feats


@torch.no_grad()
def mean_tokens(clip_path, token_shape, max_rows, batch_size, device, stop=None):
    """Per-position, per-channel mean of clip.npy [tokens, dim] over at most max_rows evenly spaced rows of the
    first `stop` (None = all; 0 = every row), read a chunk at a time; and the number of rows averaged."""
    n, *shape = data.open_array(clip_path, np.float16).shape
    n = n if stop is None else stop
    if tuple(shape) != tuple(token_shape):
        raise SystemExit(f"eval.py: {clip_path} holds tokens of shape {shape}, the evaluated data "
                         f"{list(token_shape)} (tokens, dim): train_data should be the same encoder's training folder")
    rows = np.linspace(0, n, max_rows, endpoint=False).astype(int) if 0 < max_rows < n else np.arange(n)
    total = 0
    for s in tqdm(range(0, len(rows), batch_size), desc='mean tokens', unit='batch'):
        chunk = np.load(clip_path, mmap_mode='r')[rows[s:s + batch_size]]
        total = total + torch.from_numpy(chunk).to(device).float().sum(0).double()
    return (total / len(rows)).float(), len(rows)


@torch.no_grad()
def embed_tokens(clip_path, gen_paths, mean_tok, visual, clip_mean, clip_std, batch_size, device, start=0, N=None):
    """A from clip.npy's rows start.. (N of them; None = the rest) and the same function of every generated array
    {key: path} (B, the baselines; row i is clip.npy's start + i), a chunk at a time; and per image how close each
    one's tokens and the mean tokens come to the real ones, standardized with clip_mean/clip_std: returns A,
    {key: [N, E]}, the mean tokens' vector, {key or 'm': {...} of [N] arrays}."""
    N = np.load(clip_path, mmap_mode='r').shape[0] - start if N is None else N
    A = np.empty((N, visual.proj.shape[1]), np.float32)
    gens = {key: np.empty_like(A) for key in gen_paths}
    mean, std = (torch.as_tensor(x, dtype=torch.float32, device=device) for x in (clip_mean, clip_std))
    fidelity = {m: {k: np.empty(N) for k in ('token_cosine', 'token_cosine_standardized', 'image_vector_cosine',
                                             'mse_standardized')} for m in [*gen_paths, 'm']}
    m_tokens = mean_tok.to(device)[None]
    m_vec = pool_project(m_tokens, visual)

    def compare(m, tokens, vec, real, z_real, a, rows):
        z = (tokens - mean) / std  # standardized as the DiT sees them: per-channel offsets no longer dominate
        f = fidelity[m]
        f['token_cosine'][rows] = F.cosine_similarity(tokens, real, dim=-1).mean(1).cpu().numpy()
        f['token_cosine_standardized'][rows] = F.cosine_similarity(z, z_real, dim=-1).mean(1).cpu().numpy()
        f['image_vector_cosine'][rows] = (a * vec).sum(1).cpu().numpy()
        f['mse_standardized'][rows] = ((z - z_real) ** 2).mean((1, 2)).cpu().numpy()

    for s in tqdm(range(0, N, batch_size), desc='image vectors', unit='batch'):
        e = min(s + batch_size, N)
        # a fresh memmap per chunk: a long-lived one keeps every page it touched resident (nanoGPT #287)
        real = torch.from_numpy(np.load(clip_path, mmap_mode='r')[start + s:start + e].astype(np.float32)).to(device)
        a = pool_project(real, visual)
        A[s:e] = a.cpu().numpy()
        z_real = (real - mean) / std
        compare('m', m_tokens, m_vec, real, z_real, a, slice(s, e))
        for key, gen_path in gen_paths.items():
            gen = torch.from_numpy(np.load(gen_path, mmap_mode='r')[s:e].astype(np.float32)).to(device)
            bad = ~torch.isfinite(gen)
            if bad.any():
                per_row = bad.flatten(1).sum(1)
                row = int(torch.nonzero(per_row)[0])
                raise SystemExit(f"eval.py: {gen_path} row {s + row} has {int(per_row[row])} non-finite values "
                                 f"(NaN/inf), e.g. {gen[bad][:3].tolist()}; the sampler diverged: regenerate it")
            b = pool_project(gen, visual)
            gens[key][s:e] = b.cpu().numpy()
            compare(key, gen, b, real, z_real, a, slice(s, e))
    return A, gens, m_vec.cpu().numpy()[0], fidelity


def fidelity_summary(per_image):
    out = {f'{k}_{stat}': float(getattr(v, stat)()) for k, v in per_image.items() for stat in ('mean', 'std')
           if k != 'mse_standardized'}
    return {**out, 'mse_standardized': float(per_image['mse_standardized'].mean())}


def bootstrap_ci(sums, counts, samples, seed, batch=100):
    """95% percentile intervals [M, 2] of sum(sums) / sum(counts) over units drawn with replacement, `samples` times.

    Per unit (an image: its image->text hit rates and 1, or its captions' cosine or text->image hit sums and their
    count), sums [U, M] and counts [U]. Every column, and every call with the same seed and U, sees the same draws,
    so a column of B - A gives a paired interval.
    """
    sums, counts = torch.as_tensor(sums, dtype=torch.float64), torch.as_tensor(counts, dtype=torch.float64)
    U, g = len(counts), torch.Generator().manual_seed(seed)
    ones, estimates = torch.ones(batch, U, dtype=torch.float64), []
    for s in range(0, samples, batch):
        b = min(batch, samples - s)
        draws = torch.randint(U, (b, U), generator=g)
        weights = torch.zeros(b, U, dtype=torch.float64).scatter_add_(1, draws, ones[:b])  # times each unit is drawn
        estimates.append((weights @ sums) / (weights @ counts)[:, None])
    return torch.quantile(torch.cat(estimates), torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0).T.tolist()


def image_sums(values, text_image, N):
    """Per-image sums [N, M] of per-caption values [T, M]: an image with all its captions is one bootstrap unit."""
    values = torch.as_tensor(values, dtype=torch.float64)
    return torch.zeros(N, values.shape[1], dtype=torch.float64).index_add_(0, torch.as_tensor(text_image), values)


def recall_intervals(hits, text_image, samples, seed):
    """{direction: [M, 2]} 95% intervals of recall columns from per-query hit rates {'image_to_text': [N, M],
    'text_to_image': [T, M]}, both resampling images, each with all its captions: alignment's draws. A caption is not
    independent of its image's other captions (they share its embedding), so resampling captions is too narrow."""
    N = len(hits['image_to_text'])
    units = {'image_to_text': (hits['image_to_text'], np.ones(N)),
             'text_to_image': (image_sums(hits['text_to_image'], text_image, N), np.bincount(text_image, minlength=N))}
    return {d: bootstrap_ci(sums, counts, samples, seed) for d, (sums, counts) in units.items()}


def cosine_stats(sims):
    return {'mean_cosine_similarity': float(sims.mean()), 'std_cosine_similarity': float(sims.std()),
            'min_cosine_similarity': float(sims.min()), 'max_cosine_similarity': float(sims.max())}


def with_ci(x, ci, difference=False, percent=False):
    """A table cell: '23.6% [20.8, 26.4]', '0.2310 [0.2281, 0.2340]'; differences signed, in points for recall."""
    scale, spec = (100, '.1f') if percent else (1, '.4f')
    spec = '+' + spec if difference else spec
    cell = f"{scale * x:{spec}}" + ('%' if percent and not difference else '')
    return cell + (f" [{scale * ci[0]:{spec}}, {scale * ci[1]:{spec}}]" if ci else '')


def pearson(x, y):
    """Pearson correlation; None where either side is constant."""
    x, y = x.astype(np.float64) - x.mean(), y.astype(np.float64) - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else None


def load_captions(meta, target):
    """Captions of the target's images in row order and the row of each caption; every check names the file and the
    values."""
    path = os.path.join(target['folder'], 'captions.json')
    if not os.path.exists(path):
        raise SystemExit(f"eval.py: {path} not found: evaluation needs the captions extract.py writes")
    captions_by_id = data.read_json(path)
    image_ids = meta['image_ids'][target['start']:target['start'] + target['count']]
    if not isinstance(captions_by_id, dict):
        raise SystemExit(f"eval.py: {path} should hold {{image_id: [caption, ...]}}, got "
                         f"{type(captions_by_id).__name__}")
    missing = [i for i in image_ids if captions_by_id.get(str(i)) in (None, [])]
    if missing:
        more = ' ...' if len(missing) > 5 else ''
        raise SystemExit(f"eval.py: {path} has no captions for {len(missing)} of {len(image_ids)} images "
                         f"(image ids {missing[:5]}{more}); every image needs at least one: expected a non-empty list "
                         f"of caption strings, got {captions_by_id.get(str(missing[0]), 'no entry')!r} for "
                         f"{missing[0]}")
    data.check_captions({str(i): captions_by_id[str(i)] for i in image_ids}, path)
    captions = [c for i in image_ids for c in captions_by_id[str(i)]]
    text_image = np.repeat(np.arange(len(image_ids)), [len(captions_by_id[str(i)]) for i in image_ids])
    return captions, text_image


def other_rows(made_for, target):
    """Why generated.json's 'data' ({folder, id, start, count}) is not the evaluated rows; None when it is."""
    theirs, ours = ({k: d.get(k) for k in ('id', 'start', 'count')} for d in (made_for, target))
    if theirs == ours:
        return None
    return (f"made for {made_for.get('folder')} (id {theirs['id']}, rows {theirs['start']} + {theirs['count']}), "
            f"the evaluated data is {target['folder']} (id {ours['id']}, rows {ours['start']} + {ours['count']})")


def load_baseline(path, meta, target):
    """(label, generated.json) of a baseline array made for the evaluated rows; None, with a printed warning, for one
    made for other rows (found for another split: not an error)."""
    if not os.path.exists(path):
        print(f"eval: warning: baseline {path} skipped: not found (ridge.py, or sample.py on a regression checkpoint, "
              f"writes it)")
        return None
    shape = data.open_array(path, np.float16, remedy='regenerate it (ridge.py or sample.py)').shape
    info_path = os.path.splitext(path)[0] + '.json'
    info = data.read_json(info_path) if os.path.exists(info_path) else {}
    label = str(info.get('label') or os.path.basename(os.path.dirname(os.path.abspath(path))))
    expected, val_data = (target['count'], meta['clip']['tokens'], meta['clip']['dim']), target['folder']
    if 'data' not in info:
        print(f"eval: warning: baseline {label!r}: {info_path} has no 'data' (the rows it was made for): "
              f"checking its shape only")
    else:
        why = other_rows(info['data'], target)
        if why:
            print(f"eval: warning: baseline {label!r} ({path}) skipped: {why} ({val_data})")
            return None
    if shape != expected:
        if 'data' in info:
            raise SystemExit(f"eval.py: {path} has shape {list(shape)}, but {info_path} says it was made for "
                             f"{val_data}, which holds {list(expected)}: regenerate it")
        print(f"eval: warning: baseline {label!r} ({path}) skipped: shape {list(shape)}, {val_data} holds "
              f"{list(expected)} (count, tokens, dim): made for other rows")
        return None
    return label, info


def fidelity_stats(sampling, info_path, train_data, meta, val_data):
    """(clip_mean, clip_std, source) that standardize token fidelity in the DiT's own units: generated.json's
    data_stats (the checkpoint's), else train_data's meta.json (the training folder's), else val_data's, noted."""
    train_meta = os.path.join(train_data, 'meta.json')
    if (sampling or {}).get('data_stats'):
        stats, path = sampling['data_stats'], info_path
        source = f"{info_path} data_stats ({stats.get('source', 'no source given')})"
    elif os.path.exists(train_meta):
        stats, path, source = data.read_json(train_meta), train_meta, f"{train_meta} (the training folder)"
    else:
        source = f"{os.path.join(val_data, 'meta.json')} (the evaluated folder: no data_stats and no {train_meta})"
        print(f"eval: note: token fidelity is standardized with {source}, not in the DiT's own units")
        return meta['clip_mean'], meta['clip_std'], source
    D = meta['clip']['dim']
    mean, std = stats.get('clip_mean'), stats.get('clip_std')
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == D
            and all(isinstance(s, (int, float)) and s > 0 and math.isfinite(s) for s in std)):
        describe = lambda v: f"{len(v)} values" if isinstance(v, list) else f"{v!r:.80}"
        raise SystemExit(f"eval.py: {path}: clip_mean and clip_std should be {D} numbers each (the token width; std "
                         f"positive and finite), got {describe(mean)} and {describe(std)}")
    return mean, std, source


def plot_title(common):
    """What a plot shows, a line each: the evaluated rows, the checkpoint that made B, and its sampler."""
    rows = common['data']
    where = (f"{common['val_data']}: held-out rows {rows['start']}-{rows['start'] + rows['count'] - 1}"
             if common['holdout'] else f"{common['val_data']}: {rows['count']} images (not the held-out slice)")
    if not common['generated']:
        return f"{where}\nno generated array: the CLIP baseline only"
    ckpt, sampler, info = common['checkpoint'], common['sampler'], common['sampling'] or {}
    if not (ckpt and ckpt['path']):  # no generated.json, or another generator's (ridge.py)
        return f"{where}\nB: {common['generated']}\n{info.get('label') or 'no checkpoint named in generated.json'}"
    path = ckpt['path']
    made = f"B: {os.path.basename(os.path.dirname(path))}/{os.path.splitext(os.path.basename(path))[0]}, iteration " \
           f"{ckpt['iter_num']}{', EMA weights' if ckpt['use_ema'] else ''}"
    if sampler['sample_method'] is None:  # a regression checkpoint: one forward pass, no sampler
        return f"{where}\n{made}\nregression: one forward pass"
    shift = f", shift {sampler['sample_shift']:g}" if sampler['sample_shift'] not in (None, 1) else ''
    return (f"{where}\n{made}\n{sampler['sample_method']} {sampler['sample_steps']} steps{shift}, cfg "
            f"{sampler['cfg_scale']:g}, seed {sampler['seed']} ({common['model_calls']} model calls)")


def plot(eval_dir, sims, recalls, intervals, k_values, labels, common):
    """alignment_hist.png, alignment_scatter.png, recall.png (with the 95% intervals, (method, direction, k) ->
    [lo, hi] or None), a colour per method (labels: its legend), titled with plot_title(common); only where
    matplotlib is importable (optional)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots: matplotlib not installed, skipped")
        return
    others = ['tab:red', 'tab:purple', 'tab:brown', 'tab:pink', 'tab:olive', 'tab:cyan']  # baselines
    colors = {'a': 'tab:blue', 'b': 'tab:orange', 'r': 'tab:green', 'm': 'tab:gray'}
    colors.update({m: others[j % len(others)] for j, m in enumerate(m for m in labels if m not in colors)})
    title = plot_title(common)

    def save(fig, name, legend=None):
        """Write the figure, the axes above the legend (below them, outside the data)."""
        below = legend.get_window_extent(fig.canvas.get_renderer()).height / fig.bbox.height if legend else 0
        fig.tight_layout(rect=(0, below, 1, 1))
        fig.savefig(os.path.join(eval_dir, name), dpi=120)
        plt.close(fig)
    if sims:
        fig, ax = plt.subplots(figsize=(8, 5.2))
        bins = np.linspace(min(s.min() for s in sims.values()), max(s.max() for s in sims.values()), 61)
        for m, s in sims.items():
            ax.hist(s, bins=bins, histtype='step', lw=1.5, color=colors[m], label=f"{labels[m]} (mean {s.mean():.3f})")
            ax.axvline(s.mean(), color=colors[m], ls=':', lw=1)  # the means are what the summary compares
        ax.set(xlabel='cosine(image, caption) per pair (dotted: each mean)', ylabel='pairs')
        ax.set_title(f"Task 1: alignment\n{title}", fontsize=8, wrap=True)
        save(fig, 'alignment_hist.png', fig.legend(*ax.get_legend_handles_labels(), loc='lower center', ncol=2,
                                                   fontsize=8, frameon=False))
    if 'a' in sims and 'b' in sims:
        fig, ax = plt.subplots(figsize=(5.5, 5.8))
        few = len(sims['a']) < 5000  # bigger, darker points where they do not cover each other
        ax.scatter(sims['a'], sims['b'], s=8 if few else 2, alpha=0.6 if few else 0.3, linewidths=0)
        lo, hi = min(sims['a'].min(), sims['b'].min()), max(sims['a'].max(), sims['b'].max())
        ax.plot([lo, hi], [lo, hi], 'k--', lw=0.8)
        ax.set(xlabel='A: real tokens', ylabel='B: generated tokens', aspect='equal')
        ax.set_title(f"per-pair cosine(image, caption), B vs A (dashed: B = A)\n{title}", fontsize=7, wrap=True)
        save(fig, 'alignment_scatter.png')
    if recalls:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
        width = 0.8 / len(recalls)
        for ax, direction in zip(axes, DIRECTIONS):
            for j, (m, r) in enumerate(recalls.items()):
                values = [100 * r[direction][k] for k in k_values]
                cis = [intervals.get((m, direction, k)) for k in k_values]
                # a percentile bound may sit a rounding error past the point itself
                err = np.maximum(np.array([[v - 100 * c[0], 100 * c[1] - v] for v, c in zip(values, cis)]).T, 0) \
                    if all(cis) else None
                ax.bar(np.arange(len(k_values)) + j * width, values, width, color=colors[m], label=labels[m],
                       yerr=err, error_kw=dict(lw=0.8, capsize=2, ecolor='k'))
            ax.set(xticks=np.arange(len(k_values)) + width * (len(recalls) - 1) / 2,
                   xticklabels=[f"R@{k}" for k in k_values], title=direction.replace('_', ' '), ylim=(0, 100))
        axes[0].set_ylabel('recall (%), 95% interval bars' if any(intervals.values()) else 'recall (%)')
        fig.suptitle(f"Task 2: recall\n{title}", fontsize=8, wrap=True)
        save(fig, 'recall.png', fig.legend(*axes[0].get_legend_handles_labels(), loc='lower center', ncol=3,
                                           fontsize=8, frameon=False))


if __name__ == '__main__':
    from configurator import configure, require_positive
    from runtime import resolve_device
    config = configure(globals())
    train_data, val_data = data.split_folders(data_dir, splits, train_data, val_data)
    task_list = [t.strip() for t in tasks.split(',') if t.strip()]
    if not task_list or set(task_list) - {'alignment', 'recall'}:
        raise SystemExit(f"eval.py: tasks should be a comma list of 'alignment' and 'recall', got {tasks!r}")
    k_values = sorted(set(k_values))
    if not k_values or any(not isinstance(k, int) or k < 1 for k in k_values):
        raise SystemExit(f"eval.py: k_values should be positive integers, got {config['k_values']!r}")
    device = resolve_device(device)
    t_start = time.time()

    require_positive(config, 'eval_batch_size')
    meta, target = data.open_target(holdout, train_data, val_data, val_fraction, ('clip', 'clip_cls'))
    eval_data, start, N = target['folder'], target['start'], target['count']
    captions, text_image = load_captions(meta, target)
    paths, T = meta['paths'], len(captions)
    last = data.last_samples(out_dir, holdout)
    gen_path = generated or (last and os.path.join(last, 'generated.npy'))
    if generated and not os.path.exists(generated):
        raise SystemExit(f"eval.py: generated={generated!r} not found")
    if not gen_path:
        print(f"eval: no samples in {out_dir}/samples for this target: reporting the CLIP baseline (A and R) only")
    else:
        expected = (N, meta['clip']['tokens'], meta['clip']['dim'])
        shape = data.open_array(gen_path, np.float16, remedy='regenerate it with sample.py').shape
        if shape != expected:
            raise SystemExit(f"eval.py: {gen_path} has shape {list(shape)}, but {eval_data} holds {list(expected)} "
                             f"real tokens (count, tokens, dim); was it generated for another data folder?")
    sampling, info_path = None, gen_path and gen_path[:-len('.npy')] + '.json'
    if gen_path and os.path.exists(info_path):
        sampling = data.read_json(info_path)
        why = 'data' in sampling and other_rows(sampling['data'], target)
        if why:
            raise SystemExit(f"eval.py: {gen_path}: {info_path} says it was {why} ({eval_data}): evaluate it on the "
                             f"data it was generated for, or regenerate it")
    # baselines: one more column each, keyed baseline_<label>; B - baseline is b_minus_<label>
    found, skipped = {}, []
    for path in baselines:
        loaded = load_baseline(path, meta, target)
        if loaded is None:
            skipped.append(path)
            continue
        label, info = loaded
        if f'baseline_{label}' in found:
            raise SystemExit(f"eval.py: baselines {found[f'baseline_{label}'][1]} and {path} are both labelled "
                             f"{label!r}: give one another 'label' in its generated.json")
        found[f'baseline_{label}'] = (label, path, info)

    model, tokenizer = load_clip(clip_model, clip_pretrained, device)
    visual = model.visual
    embed_dim = visual.proj.shape[1]
    if visual.proj.shape[0] != meta['clip']['dim'] or embed_dim != meta['clip']['embed_dim']:
        raise SystemExit(f"eval.py: {clip_model!r} projects {visual.proj.shape[0]} -> {embed_dim}, but "
                         f"{eval_data}/meta.json has token dim {meta['clip']['dim']} and embed_dim "
                         f"{meta['clip']['embed_dim']} "
                         f"(extracted with {meta['clip']['model']!r} / {meta['clip']['pretrained']!r})")
    if (meta['clip']['model'], meta['clip']['pretrained'] or '') != (clip_model, clip_pretrained):
        print(f"eval: warning: {eval_data} was extracted with {meta['clip']['model']!r} / "
              f"{meta['clip']['pretrained']!r}, evaluating with {clip_model!r} / {clip_pretrained!r}: "
              f"A and R are only comparable with the same weights")
    print(f"eval: {N} images, {T} captions ({T / N:.2f} per image), {clip_model} / {clip_pretrained or 'random init'}, "
          f"embedding space {embed_dim}, device {device}" + (f", baselines {', '.join(l for l, _, _ in found.values())}"
                                                             if found else ''))

    rows = f"rows {start}+{N}" if holdout else ''  # the held-out slice's captions get a cache of their own
    text = torch.from_numpy(text_features(model, tokenizer, captions, eval_data, clip_model, clip_pretrained,
                                          eval_batch_size, device, rows)).to(device)
    token_shape = (meta['clip']['tokens'], meta['clip']['dim'])
    train_clip = os.path.join(train_data, 'clip.npy')
    if os.path.exists(train_clip):
        n_train = len(np.load(train_clip, mmap_mode='r'))  # the rows train.py trains on: never the held-out ones
        stop = data.holdout_range(n_train, val_fraction, train_data)[0] if val_fraction > 0 else None
        mean_tok, n_rows = mean_tokens(train_clip, token_shape, mean_tokens_rows, eval_batch_size, device, stop)
        mean_source = f"{train_clip}: per-position mean of {n_rows} rows"
    else:
        mean_tok = torch.tensor(meta['clip_mean'], dtype=torch.float32).expand(token_shape)
        mean_source = f"{eval_data}/meta.json clip_mean at every position (no {train_clip})"
        print(f"eval: the mean-tokens row uses {mean_source}")
    clip_mean, clip_std, stats_source = fidelity_stats(sampling, info_path, train_data, meta, eval_data)
    gen_paths = {**({'b': gen_path} if gen_path else {}), **{key: path for key, (_, path, _) in found.items()}}
    A, gens, m_vec, per_image = embed_tokens(paths['clip'], gen_paths, mean_tok, visual, clip_mean, clip_std,
                                             eval_batch_size, device, start, N)
    B = gens.get('b')
    R = F.normalize(torch.from_numpy(np.load(paths['clip_cls'])[start:start + N]).float(), dim=-1).numpy()
    # the columns: A, B, the baselines, R, mean tokens (one vector for every image), then B's paired differences
    image_emb = {'a': A, **gens, 'r': R, 'm': np.tile(m_vec, (N, 1))}
    names = {**METHODS, **{key: f"{label}: a baseline generator's tokens, mean-pooled + proj"
                           for key, (label, _, _) in found.items()}}
    column_names = {**COLUMNS, **{key: label for key, (label, _, _) in found.items()},
                    **{f'b_minus_{label}': f'B - {label}' for label, _, _ in found.values()}}
    differences = {'d': ('b', 'a'), **{f'b_minus_{label}': ('b', key) for key, (label, _, _) in found.items()}} \
        if B is not None else {}  # column: (minuend, subtrahend), paired on the same draws
    columns = list(image_emb) + list(differences)
    text_image_t = torch.from_numpy(text_image).to(device)
    eval_dir = os.path.join(os.path.dirname(gen_path) if gen_path else out_dir, 'eval')
    os.makedirs(eval_dir, exist_ok=True)
    counts = np.bincount(text_image)
    made_by = (sampling or {}).get('settings')  # the checkpoint and the sampler that made the generated array
    common = {'val_data': eval_data, 'data': target, 'holdout': holdout, 'generated': gen_path,
              'checkpoint': made_by and {'path': made_by.get('checkpoint'), 'iter_num': made_by.get('iter_num'),
                                         'use_ema': made_by.get('use_ema')},
              'sampler': made_by and {k: made_by.get(k) for k in ('sample_method', 'sample_steps', 'sample_shift',
                                                                  'cfg_scale', 'seed')},
              'model_calls': (sampling or {}).get('model_calls'), 'sampling': sampling, 'clip_model': clip_model,
              'clip_pretrained': clip_pretrained, 'num_images': N, 'num_captions': T,
              'captions_per_image': {'min': int(counts.min()), 'max': int(counts.max()), 'mean': T / N},
              'embedding_space': embed_dim, 'uses_visual_projection': True,
              'methods': {m: names[m] for m in image_emb}, 'mean_tokens_source': mean_source,
              'baselines_skipped': skipped,
              'bootstrap': {'samples': bootstrap_samples, 'seed': bootstrap_seed, 'interval': '95% percentile',
                            'resampled': 'images, each with all its captions (alignment means and both recall '
                                         'directions; text->image recall as the ratio of the drawn images\' caption '
                                         'hit sums to their caption counts); the same draws for every method and '
                                         'task, so B - A and B - baseline are paired'} if bootstrap_samples else None}
    # 95% intervals of per-image means: images drawn with replacement; None without bootstrap
    intervals = lambda sums, n: (bootstrap_ci(sums, n, bootstrap_samples, bootstrap_seed) if bootstrap_samples
                                 else [None] * sums.shape[1])
    table, sims, recalls, hits, ranked = [], {}, {}, {}, {}
    t_recall = time.time()
    if 'recall' in task_list:
        text_groups = duplicate_groups(text)  # repeated captions: found once, for every method
        for m, emb in image_emb.items():
            ranked[m] = retrieval_counts(torch.from_numpy(emb).to(device), text, text_image_t, text_groups=text_groups)
    seconds_recall = time.time() - t_recall

    if 'alignment' in task_list:
        for m, emb in image_emb.items():  # per-pair cosines; read from the recall's score matrix where it ran
            pair = ranked[m][1] if m in ranked else pair_scores(torch.from_numpy(emb).to(device), text, text_image_t)
            sims[m] = pair.cpu().numpy().astype(np.float64)
        values = {**sims, **{d: sims[x] - sims[y] for d, (x, y) in differences.items()}}
        ci = dict(zip(columns, intervals(image_sums(np.stack([values[m] for m in columns], 1), text_image, N).numpy(),
                                         counts)))
        stats = {m: {**cosine_stats(s), 'mean_cosine_similarity_ci95': ci[m]} for m, s in sims.items()}
        summary = {'task': 'alignment', **common, **{SUMMARY_KEYS[m]: stats.get(m) for m in SUMMARY_KEYS},
                   'baselines': {label: {**stats[key], 'generated': path, 'generated_info': info,
                                         'correlation': pearson(sims['a'], sims[key]),
                                         'token_fidelity': fidelity_summary(per_image[key])}
                                 for key, (label, path, info) in found.items()},
                   'difference_mean': None, 'difference_mean_ci95': None, 'difference_std': None,
                   'correlation': None, 'reference_correlation': pearson(sims['a'], sims['r']),
                   'token_fidelity': None, 'token_fidelity_stats': stats_source,
                   'mean_tokens_fidelity': fidelity_summary(per_image['m'])}
        if B is not None:
            summary.update(difference_mean=float(values['d'].mean()), difference_mean_ci95=ci['d'],
                           difference_std=float(values['d'].std()), correlation=pearson(sims['a'], sims['b']),
                           token_fidelity=fidelity_summary(per_image['b']))
            summary.update({d: {'difference_mean': float(values[d].mean()), 'difference_mean_ci95': ci[d],
                                'difference_std': float(values[d].std())} for d in differences if d != 'd'})
        summary['seconds'] = time.time() - t_start
        data.write_json(os.path.join(eval_dir, 'alignment_summary.json'), summary, indent=2)
        table.append(('alignment mean cosine', {m: with_ci(values[m].mean(), ci[m], m in differences)
                                                for m in columns}))
        correlations = {m: pearson(sims['a'], s) for m, s in sims.items()}
        table.append(('correlation with A', {m: 'n/a' if c is None else f"{c:.4f}" for m, c in correlations.items()}))
        if save_detailed:
            extra = {f'{k}_per_image_{m}': v for m, f in per_image.items() for k, v in f.items()}
            np.savez(os.path.join(eval_dir, 'alignment_detailed.npz'), text_image=text_image,
                     image_ids=np.array([str(i) for i in meta['image_ids']]), mean_tokens=mean_tok.cpu().numpy(),
                     **{f'image_embedding_{m}': e for m, e in image_emb.items()},
                     **{f'similarity_{m}': s for m, s in sims.items()}, **extra)

    if 'recall' in task_list:
        t_recall = time.time()
        ranks = {}
        for m, (by_direction, _) in ranked.items():
            hits[m] = {d: hit_rates(*c, k_values).cpu().numpy() for d, c in by_direction.items()}
            ranks[m] = {d: expected_ranks(*c).cpu().numpy() for d, c in by_direction.items()}
            recalls[m] = {d: dict(zip(k_values, h.mean(0).tolist())) for d, h in hits[m].items()}
        hits.update({c: {d: hits[x][d] - hits[y][d] for d in DIRECTIONS} for c, (x, y) in differences.items()})
        per_query = {d: np.concatenate([hits[m][d] for m in columns], 1) for d in DIRECTIONS}  # [queries, columns x K]
        flat = (recall_intervals(per_query, text_image, bootstrap_samples, bootstrap_seed) if bootstrap_samples
                else {d: [None] * q.shape[1] for d, q in per_query.items()})
        ci = {(m, d, k): flat[d][j * len(k_values) + i] for d in DIRECTIONS for j, m in enumerate(columns)
              for i, k in enumerate(k_values)}  # (method, direction, k) -> interval
        per_method = {m: {**{d: {key: v for k in k_values for key, v in ((f"recall@{k}", recalls[m][d][k]),
                                                                         (f"recall@{k}_ci95", ci[m, d, k]))}
                             for d in DIRECTIONS},
                          'median_rank': {d: float(np.median(ranks[m][d])) + 1 for d in DIRECTIONS}}
                      for m in recalls}

        def difference(c):
            """Recall@K of x - y for the difference column c = (x, y), with its paired interval, in every direction."""
            x, y = differences[c]
            return {d: {**{f"recall@{k}_difference": recalls[x][d][k] - recalls[y][d][k] for k in k_values},
                        **{f"recall@{k}_difference_ci95": ci[c, d, k] for k in k_values},
                        **{f"recall@{k}_relative_change": (100 * (recalls[x][d][k] - recalls[y][d][k])
                                                           / recalls[y][d][k] if recalls[y][d][k] > 0 else None)
                           for k in k_values}}
                    for d in DIRECTIONS}

        summary = {'task': 'recall', **common, 'k_values': k_values, 'ties': TIES,
                   **{SUMMARY_KEYS[m]: per_method.get(m) for m in SUMMARY_KEYS},
                   'baselines': {label: {**per_method[key], 'generated': path}
                                 for key, (label, path, _) in found.items()},
                   'difference': difference('d') if B is not None else None,
                   **{c: difference(c) for c in differences if c != 'd'}}
        summary.update(published.canary(summary['reference'], meta, target, clip_model,
                                        clip_pretrained))  # R beside published figures, where known
        summary['seconds'] = seconds_recall + time.time() - t_recall
        data.write_json(os.path.join(eval_dir, 'recall_summary.json'), summary, indent=2)
        for d, short in (('image_to_text', 'image->text'), ('text_to_image', 'text->image')):
            table += [(f"{short} R@{k}", {m: with_ci(hits[m][d][:, i].mean(), ci[m, d, k], m in differences,
                                                     percent=True) for m in columns}) for i, k in enumerate(k_values)]
        if save_detailed:
            np.savez(os.path.join(eval_dir, 'recall_detailed.npz'), text_image=text_image, k_values=k_values,
                     **{f'rank_{d}_{m}': r for m, rs in ranks.items() for d, r in rs.items()},
                     **{f'hits_{d}_{m}': h for m, hs in hits.items() if m not in differences for d, h in hs.items()})

    plot(eval_dir, sims, recalls, ci if recalls else {}, k_values, column_names, common)  # ci: recall's, where it ran
    width = max(len(cell) for _, row in table for cell in [*row.values(), *column_names.values()]) + 2
    print(f"{'':26s}" + ''.join(f"{column_names[m]:>{width}s}" for m in columns))
    for name, row in table:
        print(f"{name:26s}" + ''.join(f"{row.get(m, ''):>{width}s}" for m in columns))
    if bootstrap_samples:
        print(f"[95% interval: {bootstrap_samples} bootstrap resamples of images, each with all its captions (both "
              f"recall directions and alignment); B - A" + ''.join(f", {column_names[c]}" for c in differences
                                                                   if c != 'd')
              + " paired; recall differences in points]")
    tokens_line = lambda f: f"per-token cosine {f['token_cosine_mean']:.4f} (standardized " \
                            f"{f['token_cosine_standardized_mean']:.4f}), standardized MSE {f['mse_standardized']:.4f}"
    for key in gens:
        short = 'B' if key == 'b' else column_names[key]
        print(f"token fidelity, {short}: {tokens_line(fidelity_summary(per_image[key]))}, A.{short} image cosine "
              f"{per_image[key]['image_vector_cosine'].mean():.4f}")
    print(f"token fidelity, mean tokens: {tokens_line(fidelity_summary(per_image['m']))}")
    print(f"token fidelity: standardized with {stats_source}")
    print(f"eval: wrote {eval_dir} in {time.time() - t_start:.1f} s")
