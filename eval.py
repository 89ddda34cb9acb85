"""Evaluate generated CLIP tokens on a captioned data folder (COCO val2017): Task 1 alignment, Task 2 recall.

Three image embeddings, all in CLIP's joint image-text space (embed_dim, 768 for ViT-L/14):
  A = normalize(mean_tokens(clip.npy) @ visual.proj)        the seed's "CLIP baseline", from the real tokens
  B = the same function of generated.npy (sample.py)         the model under test; same function, fair comparison
  R = normalize(clip_cls.npy)                                 CLIP's own CLS embedding: what published numbers use
Without a generated.npy only A and R are reported (the CLIP baseline). The summaries go next to the generated
array (<its folder>/eval/; out_dir/eval/ for A and R only) and name the checkpoint and sampler that made it.

python eval.py config/demo.py                          # what `python sample.py config/demo.py` just wrote
python eval.py config/demo.py --generated=out/demo/samples/ckpt_iter000400-euler10-cfg1-seed1337/generated.npy
"""
import hashlib
import json
import os
import re
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import flow

# -----------------------------------------------------------------------------
out_dir = 'out'                        # A and R only: results go to out_dir/eval/
data_dir = 'data'                      # extract.py's output: data_dir/<split>
splits = ('train2017', 'val2017')
val_data = ''                          # data folder with clip.npy, clip_cls.npy, captions.json; '' = data_dir/splits[1]
generated = ''                         # generated tokens; results go to <its folder>/eval/. '' = the array that
                                       # sample.py writes for the settings below (out_dir/samples/<name>/, name =
                                       # flow.samples_name) if it exists, else A and R only
ckpt_path = ''                         # sample.py's settings, with its defaults: they name its output folder
use_ema = True
sample_method = 'midpoint'
sample_steps = 10
sample_shift = 1.0
cfg_scale = 1.0
seed = 1337
clip_model = 'ViT-L-14-quickgelu'      # open_clip name: visual.proj and the text tower
clip_pretrained = 'openai'             # tag or local weight file; '' = random init under torch.manual_seed(0)
tasks = 'alignment,recall'
k_values = (1, 5, 10)
eval_batch_size = 256                  # images per token chunk, captions per text-tower batch
save_detailed = False                  # also write per-sample arrays (npz)
device = 'auto'
# -----------------------------------------------------------------------------
SCORE_CHUNK_ELEMENTS = 1 << 24         # one chunk of the score matrix: 64 MB of float32
METHODS = {'a': 'A: real tokens, mean-pooled + proj', 'b': 'B: generated tokens, mean-pooled + proj',
           'r': 'R: CLIP CLS embedding (clip_cls)'}
COLUMNS = {'a': 'A real tokens', 'b': 'B generated', 'r': 'R CLIP CLS'}


def retrieval_ranks(image_emb, text_emb, text_image, chunk_size=None):
    """0-based ranks: per image, of its best-scoring caption among all captions (image -> text); per caption,
    of its image among all images (text -> image).

    A rank counts the candidates that score strictly higher, so ties go to the query. One pass over row chunks of
    the [N, T] score matrix serves both directions; only one chunk (and a same-sized comparison buffer) exists.
    """
    image_emb, text_emb = torch.as_tensor(image_emb).float(), torch.as_tensor(text_emb).float()
    text_image = torch.as_tensor(text_image).to(text_emb.device).long()
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
    pos = pair_scores(image_emb, text_emb, text_image)  # each caption's score with its own image
    # own[i]: the caption columns of image i, padded to the widest image by repeating its last caption, so one
    # gather per chunk reads every image's own scores (and slot[t] finds caption t's column in that gather)
    order = torch.argsort(text_image, stable=True)
    first = torch.cumsum(captions_per_image, 0) - captions_per_image
    slot = torch.empty_like(text_image)
    slot[order] = torch.arange(T, device=slot.device) - first[text_image[order]]
    width = torch.arange(int(captions_per_image.max()), device=slot.device)
    own = order[first[:, None] + torch.minimum(width, captions_per_image[:, None] - 1)]
    own_scores = torch.empty(N, len(width), device=text_emb.device)
    rows = chunk_size or max(1, SCORE_CHUNK_ELEMENTS // T)
    scores = torch.empty(min(rows, N), T, device=text_emb.device)
    hits = torch.empty_like(scores)  # float 0/1: summing floats is several times faster than summing bools on CPU
    i2t, t2i = torch.empty(N, device=text_emb.device), torch.zeros(T, device=text_emb.device)
    for s in range(0, N, rows):
        e = min(s + rows, N)
        S, H = scores[:e - s], hits[:e - s]
        torch.mm(image_emb[s:e], text_emb.T, out=S)
        torch.gather(S, 1, own[s:e], out=own_scores[s:e])
        # image -> text: the best own caption, read from this very matrix, so no rounding gap can rank it below itself
        torch.gt(S, own_scores[s:e].amax(1, keepdim=True), out=H)
        i2t[s:e] = H.sum(1)
        # text -> image: images beating the caption's own score
        torch.gt(S, pos, out=H)
        t2i += H.sum(0)
    t2i -= (own_scores[text_image, slot] > pos).float()  # the caption's own image is no competitor
    return i2t.long(), t2i.long()


def pair_scores(image_emb, text_emb, text_image):
    """Dot product of every caption with its own image: [T]; the per-pair cosines of Task 1 for unit vectors."""
    return torch.einsum('td,td->t', image_emb.index_select(0, text_image), text_emb)


def recall_from_ranks(i2t_rank, t2i_rank, k_values=(1, 5, 10)):
    return {'image_to_text': {k: float((i2t_rank < k).double().mean()) for k in k_values},
            'text_to_image': {k: float((t2i_rank < k).double().mean()) for k in k_values}}


def recall_at_k(image_emb, text_emb, text_image, k_values=(1, 5, 10), chunk_size=None):
    """Recall@K, fractions in [0, 1], for any embeddings (L2-normalize them first for cosine retrieval).

    image_emb [N, D], text_emb [T, D], text_image [T] the image row of each caption (images may have any number
    of captions, at least one). Image -> text: an image is a hit when any of its captions is in its top K.
    Text -> image: a caption is a hit when its image is in its top K.
    Returns {'image_to_text': {k: r}, 'text_to_image': {k: r}}.
    """
    return recall_from_ranks(*retrieval_ranks(image_emb, text_emb, text_image, chunk_size), k_values)


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


def text_cache_path(folder, name, pretrained):
    """data_folder/text_features_<model>_<weights>_<hash>.npy: readable, and distinct for every spec."""
    slug = lambda s: re.sub(r'[^A-Za-z0-9.-]+', '-', s).strip('-')[-40:] or 'random'
    digest = hashlib.sha1(f"{name}\0{pretrained}".encode()).hexdigest()[:8]
    return os.path.join(folder, f"text_features_{slug(name)}_{slug(os.path.basename(pretrained))}_{digest}.npy")


@torch.no_grad()
def text_features(model, tokenizer, captions, folder, name, pretrained, batch_size, device):
    """L2-normalized text-tower features [T, embed_dim], cached in the data folder for this spec and caption order."""
    path = text_cache_path(folder, name, pretrained)
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
    out = []
    for s in tqdm(range(0, len(captions), batch_size), desc='text features', unit='batch'):
        x = model.encode_text(tokenizer(captions[s:s + batch_size]).to(device))
        out.append(F.normalize(x.float(), dim=-1).cpu().numpy())
    feats = np.concatenate(out)
    data.write_atomic(path, lambda f: np.save(f, feats), 'wb')
    data.write_json(meta_path, key)
    return feats


@torch.no_grad()
def embed_tokens(clip_path, gen_path, visual, clip_std, batch_size, device):
    """A (and B, token fidelity summary, per-image arrays) from clip.npy (and generated.npy), a chunk at a time."""
    N = np.load(clip_path, mmap_mode='r').shape[0]
    A = np.empty((N, visual.proj.shape[1]), np.float32)
    B = np.empty_like(A) if gen_path else None
    per_image = {'token_cosine': np.empty(N), 'image_vector_cosine': np.empty(N)}
    sq_err = 0.0
    std = torch.as_tensor(clip_std, dtype=torch.float32, device=device)
    for s in tqdm(range(0, N, batch_size), desc='image vectors', unit='batch'):
        e = min(s + batch_size, N)
        # a fresh memmap per chunk: a long-lived one keeps every page it touched resident (nanoGPT #287)
        real = torch.from_numpy(np.load(clip_path, mmap_mode='r')[s:e].astype(np.float32)).to(device)
        a = pool_project(real, visual)
        A[s:e] = a.cpu().numpy()
        if gen_path is None:
            continue
        gen = torch.from_numpy(np.load(gen_path, mmap_mode='r')[s:e].astype(np.float32)).to(device)
        bad = ~torch.isfinite(gen)
        if bad.any():
            per_row = bad.flatten(1).sum(1)
            row = int(torch.nonzero(per_row)[0])
            raise SystemExit(f"eval.py: {gen_path} row {s + row} has {int(per_row[row])} non-finite values "
                             f"(NaN/inf), e.g. {gen[bad][:3].tolist()}; the sampler diverged: regenerate it")
        b = pool_project(gen, visual)
        B[s:e] = b.cpu().numpy()
        per_image['token_cosine'][s:e] = F.cosine_similarity(gen, real, dim=-1).mean(1).cpu().numpy()
        per_image['image_vector_cosine'][s:e] = (a * b).sum(1).cpu().numpy()
        sq_err += float((((gen - real) / std) ** 2).sum(dtype=torch.float64))
    if gen_path is None:
        return A, None, None, None
    T, D = np.load(clip_path, mmap_mode='r').shape[1:]
    fidelity = {f'{k}_{stat}': float(getattr(v, stat)()) for k, v in per_image.items() for stat in ('mean', 'std')}
    fidelity['mse_standardized'] = sq_err / (N * T * D)
    return A, B, fidelity, per_image


def cosine_stats(sims):
    return {'mean_cosine_similarity': float(sims.mean()), 'std_cosine_similarity': float(sims.std()),
            'min_cosine_similarity': float(sims.min()), 'max_cosine_similarity': float(sims.max())}


def pearson(x, y):
    """Pearson correlation; None where either side is constant."""
    x, y = x.astype(np.float64) - x.mean(), y.astype(np.float64) - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else None


def load_data(folder):
    """meta (with paths), captions in row order, caption -> row index; every check names the file and the values."""
    meta = data.open_folder(folder, arrays=('clip', 'clip_cls'))
    captions_path = os.path.join(folder, 'captions.json')
    if not os.path.exists(captions_path):
        raise SystemExit(f"eval.py: {captions_path} not found: evaluation needs the captions extract.py writes")
    captions_by_id = data.read_json(captions_path)
    missing = [i for i in meta['image_ids'] if not captions_by_id.get(str(i))]
    if missing:
        more = ' ...' if len(missing) > 5 else ''
        raise SystemExit(f"eval.py: {captions_path} has no captions for {len(missing)} of {meta['count']} images "
                         f"(image ids {missing[:5]}{more}); every image needs at least one")
    captions = [c for i in meta['image_ids'] for c in captions_by_id[str(i)]]
    text_image = np.repeat(np.arange(meta['count']), [len(captions_by_id[str(i)]) for i in meta['image_ids']])
    return meta, captions, text_image


def plot(eval_dir, sims, recalls, k_values):
    """alignment_hist.png, alignment_scatter.png, recall.png; only where matplotlib is importable (optional)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots: matplotlib not installed, skipped")
        return
    colors = {'a': 'tab:blue', 'b': 'tab:orange', 'r': 'tab:green'}
    if sims:
        fig, ax = plt.subplots(figsize=(6, 4))
        bins = np.linspace(min(s.min() for s in sims.values()), max(s.max() for s in sims.values()), 61)
        for m, s in sims.items():
            ax.hist(s, bins=bins, histtype='step', lw=1.5, color=colors[m], label=f"{METHODS[m]} (mean {s.mean():.3f})")
        ax.set(xlabel='cosine(image, caption) per pair', ylabel='pairs', title='Task 1: alignment')
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(eval_dir, 'alignment_hist.png'), dpi=120)
        plt.close(fig)
    if 'a' in sims and 'b' in sims:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.scatter(sims['a'], sims['b'], s=2, alpha=0.3, linewidths=0)
        lo, hi = min(sims['a'].min(), sims['b'].min()), max(sims['a'].max(), sims['b'].max())
        ax.plot([lo, hi], [lo, hi], 'k--', lw=0.8)
        ax.set(xlabel='A: real tokens', ylabel='B: generated tokens', title='per-pair cosine, B vs A')
        fig.tight_layout()
        fig.savefig(os.path.join(eval_dir, 'alignment_scatter.png'), dpi=120)
        plt.close(fig)
    if recalls:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
        width = 0.8 / len(recalls)
        for ax, direction in zip(axes, ('image_to_text', 'text_to_image')):
            for j, (m, r) in enumerate(recalls.items()):
                ax.bar(np.arange(len(k_values)) + j * width, [100 * r[direction][k] for k in k_values], width,
                       color=colors[m], label=METHODS[m])
            ax.set(xticks=np.arange(len(k_values)) + width * (len(recalls) - 1) / 2,
                   xticklabels=[f"R@{k}" for k in k_values], title=direction.replace('_', ' '), ylim=(0, 100))
        axes[0].set_ylabel('recall (%)')
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(eval_dir, 'recall.png'), dpi=120)
        plt.close(fig)


if __name__ == '__main__':
    from configurator import configure
    config = configure(globals())
    val_data = val_data or os.path.join(data_dir, splits[1])
    task_list = [t.strip() for t in tasks.split(',') if t.strip()]
    if not task_list or set(task_list) - {'alignment', 'recall'}:
        raise SystemExit(f"eval.py: tasks should be a comma list of 'alignment' and 'recall', got {tasks!r}")
    k_values = sorted(set(k_values))
    if not k_values or any(not isinstance(k, int) or k < 1 for k in k_values):
        raise SystemExit(f"eval.py: k_values should be positive integers, got {config['k_values']!r}")
    device = ('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device
    t_start = time.time()

    meta, captions, text_image = load_data(val_data)
    paths = meta['paths']
    N, T = meta['count'], len(captions)
    name = flow.samples_name(ckpt_path or os.path.join(out_dir, 'ckpt.pt'), sample_method, sample_steps, cfg_scale,
                             seed, sample_shift, use_ema)
    gen_path = generated or os.path.join(out_dir, 'samples', name, 'generated.npy')
    if not os.path.exists(gen_path):
        if generated:
            raise SystemExit(f"eval.py: generated={generated!r} not found")
        print(f"eval: no {gen_path}: reporting the CLIP baseline (A and R) only")
        gen_path = None
    else:
        expected = (N, meta['clip']['tokens'], meta['clip']['dim'])
        shape = data.open_array(gen_path, np.float16, remedy='regenerate it with sample.py').shape
        if shape != expected:
            raise SystemExit(f"eval.py: {gen_path} has shape {list(shape)}, but {val_data} holds {list(expected)} "
                             f"real tokens (count, tokens, dim); was it generated for another data folder?")
    sampling = None
    if gen_path and os.path.exists(gen_path[:-len('.npy')] + '.json'):
        sampling = data.read_json(gen_path[:-len('.npy')] + '.json')
        sampled_for = sampling.get('settings', {}).get('val_data')
        if sampled_for and os.path.realpath(sampled_for) != os.path.realpath(val_data):
            print(f"eval: warning: {gen_path} was generated for {sampled_for}, evaluating against {val_data}")

    model, tokenizer = load_clip(clip_model, clip_pretrained, device)
    visual = model.visual
    embed_dim = visual.proj.shape[1]
    if visual.proj.shape[0] != meta['clip']['dim'] or embed_dim != meta['clip']['embed_dim']:
        raise SystemExit(f"eval.py: {clip_model!r} projects {visual.proj.shape[0]} -> {embed_dim}, but "
                         f"{val_data}/meta.json has token dim {meta['clip']['dim']} and embed_dim "
                         f"{meta['clip']['embed_dim']} "
                         f"(extracted with {meta['clip']['model']!r} / {meta['clip']['pretrained']!r})")
    if (meta['clip']['model'], meta['clip']['pretrained'] or '') != (clip_model, clip_pretrained):
        print(f"eval: warning: {val_data} was extracted with {meta['clip']['model']!r} / "
              f"{meta['clip']['pretrained']!r}, evaluating with {clip_model!r} / {clip_pretrained!r}: "
              f"A and R are only comparable with the same weights")
    print(f"eval: {N} images, {T} captions ({T / N:.2f} per image), {clip_model} / {clip_pretrained or 'random init'}, "
          f"embedding space {embed_dim}, device {device}")

    text = torch.from_numpy(text_features(model, tokenizer, captions, val_data, clip_model, clip_pretrained,
                                          eval_batch_size, device)).to(device)
    A, B, fidelity, per_image = embed_tokens(paths['clip'], gen_path, visual, meta['clip_std'],
                                             eval_batch_size, device)
    R = F.normalize(torch.from_numpy(np.load(paths['clip_cls'])).float(), dim=-1).numpy()
    image_emb = {'a': A, 'b': B, 'r': R} if B is not None else {'a': A, 'r': R}
    text_image_t = torch.from_numpy(text_image).to(device)
    eval_dir = os.path.join(os.path.dirname(gen_path) if gen_path else out_dir, 'eval')
    os.makedirs(eval_dir, exist_ok=True)
    counts = np.bincount(text_image)
    made_by = (sampling or {}).get('settings')  # the checkpoint and the sampler that made the generated array
    common = {'val_data': val_data, 'generated': gen_path,
              'checkpoint': made_by and {'path': made_by.get('checkpoint'), 'iter_num': made_by.get('iter_num'),
                                         'use_ema': made_by.get('use_ema')},
              'sampler': made_by and {k: made_by.get(k) for k in ('sample_method', 'sample_steps', 'sample_shift',
                                                                  'cfg_scale', 'seed')},
              'model_calls': (sampling or {}).get('model_calls'), 'sampling': sampling, 'clip_model': clip_model,
              'clip_pretrained': clip_pretrained, 'num_images': N, 'num_captions': T,
              'captions_per_image': {'min': int(counts.min()), 'max': int(counts.max()), 'mean': T / N},
              'embedding_space': embed_dim, 'uses_visual_projection': True,
              'methods': {m: METHODS[m] for m in image_emb}}
    table, sims, recalls, ranks = [], {}, {}, {}

    if 'alignment' in task_list:
        for m, emb in image_emb.items():
            sims[m] = pair_scores(torch.from_numpy(emb).to(device), text, text_image_t).cpu().numpy().astype(np.float64)
        summary = {'task': 'alignment', **common,
                   'method_a': cosine_stats(sims['a']), 'method_b': cosine_stats(sims['b']) if B is not None else None,
                   'reference': cosine_stats(sims['r']),
                   'difference_mean': None, 'difference_std': None, 'correlation': None,
                   'reference_correlation': pearson(sims['a'], sims['r']), 'token_fidelity': None}
        if B is not None:
            diff = sims['b'] - sims['a']
            summary.update(difference_mean=float(diff.mean()), difference_std=float(diff.std()),
                           correlation=pearson(sims['a'], sims['b']),
                           token_fidelity=fidelity)
        summary['seconds'] = time.time() - t_start
        data.write_json(os.path.join(eval_dir, 'alignment_summary.json'), summary, indent=2)
        table.append(('alignment mean cosine', {m: f"{s.mean():.4f}" for m, s in sims.items()}))
        correlations = {m: pearson(sims['a'], s) for m, s in sims.items()}
        table.append(('correlation with A', {m: 'n/a' if c is None else f"{c:.4f}" for m, c in correlations.items()}))
        if save_detailed:
            extra = {f'similarity_{m}': s for m, s in sims.items()}
            if B is not None:
                extra.update({f'{k}_per_image': v for k, v in per_image.items()})
            np.savez(os.path.join(eval_dir, 'alignment_detailed.npz'), text_image=text_image,
                     image_ids=np.array([str(i) for i in meta['image_ids']]),
                     **{f'image_embedding_{m}': e for m, e in image_emb.items()}, **extra)

    if 'recall' in task_list:
        t_recall = time.time()
        for m, emb in image_emb.items():
            ranks[m] = retrieval_ranks(torch.from_numpy(emb).to(device), text, text_image_t)
            recalls[m] = recall_from_ranks(*ranks[m], k_values)
        fmt = lambda r: {d: {f"recall@{k}": r[d][k] for k in k_values} for d in r}
        per_method = {m: {**fmt(recalls[m]),
                          'median_rank': {'image_to_text': float(np.median(ranks[m][0].cpu().numpy())) + 1,
                                          'text_to_image': float(np.median(ranks[m][1].cpu().numpy())) + 1}}
                      for m in recalls}
        summary = {'task': 'recall', **common, 'k_values': k_values, 'ties': 'equal scores count for the query',
                   'method_a': per_method['a'], 'method_b': per_method.get('b'), 'reference': per_method['r'],
                   'difference': None}
        if B is not None:
            summary['difference'] = {d: {
                **{f"recall@{k}_difference": recalls['b'][d][k] - recalls['a'][d][k] for k in k_values},
                **{f"recall@{k}_relative_change": (100 * (recalls['b'][d][k] - recalls['a'][d][k]) / recalls['a'][d][k]
                                                   if recalls['a'][d][k] > 0 else None) for k in k_values}}
                for d in ('image_to_text', 'text_to_image')}
        summary['seconds'] = time.time() - t_recall
        data.write_json(os.path.join(eval_dir, 'recall_summary.json'), summary, indent=2)
        for d, short in (('image_to_text', 'image->text'), ('text_to_image', 'text->image')):
            table += [(f"{short} R@{k}", {m: f"{100 * r[d][k]:.2f}%" for m, r in recalls.items()}) for k in k_values]
        if save_detailed:
            np.savez(os.path.join(eval_dir, 'recall_detailed.npz'), text_image=text_image,
                     **{f'rank_{d}_{m}': r[j].cpu().numpy() for m, r in ranks.items()
                        for j, d in enumerate(('image_to_text', 'text_to_image'))})

    plot(eval_dir, sims, recalls, k_values)
    cols = list(image_emb)
    print(f"{'':26s}" + ''.join(f"{COLUMNS[m]:>16s}" for m in cols))
    for name, row in table:
        print(f"{name:26s}" + ''.join(f"{row[m]:>16s}" for m in cols))
    if fidelity:
        print(f"token fidelity: per-token cosine {fidelity['token_cosine_mean']:.4f}, A.B image cosine "
              f"{fidelity['image_vector_cosine_mean']:.4f}, standardized MSE {fidelity['mse_standardized']:.4f}")
    print(f"eval: wrote {eval_dir} in {time.time() - t_start:.1f} s")
