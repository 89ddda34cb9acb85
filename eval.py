"""Evaluate generated CLIP tokens on a captioned data folder (COCO val2017): Task 1 alignment,
Task 2 recall and Task 3 distribution fidelity.

Image embeddings, all in CLIP's joint image-text space (embed_dim, 768 for ViT-L/14):
  A = normalize(mean_tokens(clip.npy) @ visual.proj)  the seed's "CLIP baseline", from real tokens
  B = the same function of generated.npy (sample.py)  the model under test: same function, fair
  R = normalize(clip_cls.npy)                          CLIP's CLS embedding, as published numbers
  mean tokens = the same function of train_data's mean tokens, one vector for every image: what a
  generator that ignores EVA gets (recall at chance, alignment the floor)
  baselines = the same function of other generators' arrays (ridge.py's linear map; a DiT trained
  by plain regression), each compared with B on the same bootstrap draws
Without a generated.npy only A, R, mean tokens and any baselines are reported (the CLIP baseline).
The metrics, their tie rule and intervals (images resampled with all their captions) are
metrics.py's, the figures plots.py's; token fidelity's units (the DiT's own), Task 3's draws and
the columns that come from train_data (the mean tokens; the unconditional control, real tokens of
random training images, which Tasks 1-2 score too, as the true samples where the folder has them)
are fidelity.py's. The summaries go next to the generated array (<its folder>/eval/; out_dir/eval/
without one) and name the checkpoint and sampler that made it; an array made for other rows (its
generated.json 'data') is refused. Task 3 (fidelity_summary.json, fields in fidelity.py) runs by
default: at COCO scale it adds 7% to eval.py's time on one CPU thread (bench/RESULTS.md);
--tasks=alignment,recall leaves it out.

python eval.py config/demo.py                 # the flow DiT's samples sample.py finished last
python eval.py config/demo.py --generated=out/demo/samples/<folder>/generated.npy
python eval.py config/demo.py --holdout=True  # train_data's held-out slice: settings chosen there

Why A is below R: CLIP was trained through its CLS token; its patch tokens were never trained to be
mean-pooled and projected. Published CLIP COCO figures use R, on COCO 2014's Karpathy 5K test split.

alignment_summary.json (Task 1, every image-caption pair): method_a, method_b, reference,
mean_tokens, true_samples and unconditional (null where Task 3 did not run or the folder has no
true samples), and baselines {label: ...}, each with mean_cosine_similarity (and _ci95), std_, min_,
max_cosine_similarity; difference_mean (_ci95), difference_std (B - A per pair) and b_minus_<label>
for each baseline; correlation (Pearson, per-pair A vs B), reference_correlation (A vs R);
embedding_space, uses_visual_projection; token_fidelity (B's), mean_tokens_fidelity:
token_cosine_mean/_std, token_cosine_standardized_mean/_std (standardized with
token_fidelity_stats), image_vector_cosine_mean/_std (to A), mse_standardized; the data target
(folder, id, start, count), counts, caption statistics, sample.py's generated.json under sampling.
recall_summary.json (Task 2): per method and baseline, image_to_text and text_to_image recall@K in
[0, 1] with recall@K_ci95, and median_rank; difference (B - A) and b_minus_<label> per direction:
recall@K_difference (_ci95) and recall@K_relative_change (percent). save_detailed=True adds
per-pair and per-image arrays (npz); with matplotlib, alignment_hist.png, alignment_scatter.png and
recall.png. The recall core is a plain function: `from metrics import recall_at_k`.
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
import fidelity
import flow
from metrics import (DIRECTIONS, RESAMPLED, TIES, alignment_columns, cosine_stats, duplicate_groups,
                     fidelity_summary, pair_scores, pearson, recall_columns, recall_difference,
                     retrieval_counts, token_fidelity, with_ci)
from plots import plot_eval, plot_fidelity
import published

# -----------------------------------------------------------------------------
out_dir = 'out'  # A and R only: results go to out_dir/eval/
data_dir = 'data'  # extract.py's output: data_dir/<split>
splits = ('train2017', 'val2017')
val_data = ''  # folder with clip.npy, clip_cls.npy, captions.json; '' = data_dir/splits[1]
train_data = ''  # its clip.npy gives the mean-tokens row; '' = data_dir/splits[0]
holdout = False  # True: evaluate train_data's held-out slice (where settings are chosen)
val_fraction = data.VAL_FRACTION  # the held-out slice: train_data's last rows, as train.py's
mean_tokens_rows = 10000  # evenly spaced train rows averaged for it (0 = all; never held-out ones)
generated = ''  # generated tokens; results go to <its folder>/eval/. '' = the samples folder
                # finished last in out_dir/samples for this target, if any, else A and R only
clip_model = 'ViT-L-14-quickgelu'  # open_clip name: visual.proj and the text tower
clip_pretrained = 'openai'  # tag or local weight file; '' = random init under torch.manual_seed(0)
tasks = 'alignment,recall,fidelity'  # any of the three; Task 3's cost in the docstring
k_values = (1, 5, 10)
eval_batch_size = 256  # images per token chunk, captions per text-tower batch
save_detailed = False  # also write per-sample arrays (npz)
bootstrap_samples = 1000  # resamples for the 95% intervals (0 = none)
bootstrap_seed = 0
baselines = ()  # generated.npy arrays of baseline generators (ridge.py; a regression DiT sampled by
                # sample.py), each with its generated.json: a column each, B - baseline paired;
                # one made for other rows is skipped
fidelity_k = 5  # Task 3's k-NN metrics (k-NN recall, coverage; precision, density)
fidelity_halvings = 10  # split-half rounds averaged: a method's half against the real other half
fidelity_images = 1000  # images drawn per round (0 = all), then halved: bounds Task 3's cost
fidelity_tokens = 1  # token positions per image (drawn with fidelity_seed) in the token set
fidelity_seed = 0  # the rounds, the token positions, the unconditional control's train rows
seed_generated = ()  # B's sampling run with other seeds (paths or globs): spread, conditional MMD
device = 'auto'
# -----------------------------------------------------------------------------
METHODS = {'a': 'A: real tokens, mean-pooled + proj',
           'b': 'B: generated tokens, mean-pooled + proj',
           'r': 'R: CLIP CLS embedding (clip_cls)',
           'm': "mean tokens: the training set's mean CLIP tokens for every image, "
                "mean-pooled + proj",
           't': 'true samples: the first of clip_samples.npy\'s draws, mean-pooled + proj',
           'u': 'unconditional: real tokens of random training images, mean-pooled + proj'}
COLUMNS = {'a': 'A real tokens', 'b': 'B generated', 'r': 'R CLIP CLS', 'm': 'mean tokens',
           't': 'true samples', 'u': 'unconditional', 'd': 'B - A'}
SUMMARY_KEYS = {'a': 'method_a', 'b': 'method_b', 'r': 'reference', 'm': 'mean_tokens',
                't': 'true_samples', 'u': 'unconditional'}  # t, u: where Task 3 runs


def parse_tasks(tasks, k_values):
    """The task list and the sorted distinct K of recall@K; a clear error for anything else."""
    task_list = [t.strip() for t in tasks.split(',') if t.strip()]
    if not task_list or set(task_list) - {'alignment', 'recall', 'fidelity'}:
        raise SystemExit(f"eval.py: tasks should be a comma list of 'alignment', 'recall' and "
                         f"'fidelity', got {tasks!r}")
    ks = sorted(set(k_values))
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise SystemExit(f"eval.py: k_values should be positive integers, got {k_values!r}")
    return task_list, ks


def pool_project(tokens, visual):
    """Image vector of A and B: open_clip's pool_type='avg' (tokens carry ln_post), proj, norm."""
    return F.normalize(tokens.float().mean(1) @ visual.proj.float(), dim=-1)


def load_clip(name, pretrained, device):
    """open_clip model and tokenizer; pretrained '' = random init under torch.manual_seed(0)."""
    import open_clip
    try:
        model = data.open_clip_model(name, pretrained)[0]
        tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"eval.py: cannot build CLIP clip_model={name!r} "
                         f"clip_pretrained={pretrained!r}: {e}")
    if getattr(model.visual, 'proj', None) is None:
        raise SystemExit(f"eval.py: clip_model {name!r} has no visual.proj "
                         f"({type(model.visual).__name__}); methods A and B need an open_clip "
                         f"VisionTransformer with a projection")
    return model.to(device).eval(), tokenizer


def check_clip(visual, meta, eval_data, clip_model, clip_pretrained):
    """The CLIP's joint-space width, after checking that it projects the data's tokens."""
    embed_dim, clip = visual.proj.shape[1], meta['clip']
    if visual.proj.shape[0] != clip['dim'] or embed_dim != clip['embed_dim']:
        raise SystemExit(f"eval.py: {clip_model!r} projects {visual.proj.shape[0]} -> {embed_dim}, "
                         f"but {eval_data}/meta.json has token dim {clip['dim']} and embed_dim "
                         f"{clip['embed_dim']} "
                         f"(extracted with {clip['model']!r} / {clip['pretrained']!r})")
    if (clip['model'], clip['pretrained'] or '') != (clip_model, clip_pretrained):
        print(f"eval: warning: {eval_data} was extracted with {clip['model']!r} / "
              f"{clip['pretrained']!r}, evaluating with {clip_model!r} / {clip_pretrained!r}: "
              f"A and R are only comparable with the same weights")
    return embed_dim


def text_cache_path(folder, name, pretrained, rows=''):
    """data_folder/text_features_<model>_<weights>_<hash>.npy: readable, and distinct for every
    spec (and row range)."""
    slug = lambda s: re.sub(r'[^A-Za-z0-9.-]+', '-', s).strip('-')[-40:] or 'random'
    digest = hashlib.sha1(f"{name}\0{pretrained}{rows}".encode()).hexdigest()[:8]
    return os.path.join(folder, f"text_features_{slug(name)}_{slug(os.path.basename(pretrained))}_"
                                f"{digest}.npy")


@torch.no_grad()
def text_features(model, tokenizer, captions, folder, name, pretrained, batch_size, device,
                  rows=''):
    """L2-normalized text features [T, embed_dim], cached in the data folder per spec, captions."""
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
    # a caption repeated across images is encoded once: its copies tie exactly
    unique, index = np.unique(np.array(captions, dtype=object), return_inverse=True)
    out = []
    for s in tqdm(range(0, len(unique), batch_size), desc='text features', unit='batch'):
        x = model.encode_text(tokenizer(unique[s:s + batch_size].tolist()).to(device))
        out.append(F.normalize(x.float(), dim=-1).cpu().numpy())
    feats = np.concatenate(out)[index]
    data.write_atomic(path, lambda f: np.save(f, feats), 'wb')
    data.write_json(meta_path, key)
    return feats


def check_finite(gen, gen_path, first_row):
    """A clear error naming the first row of a generated chunk with NaN or inf values."""
    bad = ~torch.isfinite(gen)
    if bad.any():
        per_row = bad.flatten(1).sum(1)
        row = int(torch.nonzero(per_row)[0])
        raise SystemExit(f"eval.py: {gen_path} row {first_row + row} has {int(per_row[row])} "
                         f"non-finite values (NaN/inf), e.g. {gen[bad][:3].tolist()}; the sampler "
                         f"diverged: regenerate it")


@torch.no_grad()
def embed_tokens(clip_path, gen_paths, mean_tok, visual, clip_mean, clip_std, batch_size, device,
                 start=0, N=None):
    """A from clip.npy's rows start.. (N of them; None = the rest) and the same function of every
    generated array {key: path} (B, the baselines; row i is clip.npy's start + i), a chunk at a
    time; and per image how close each one's tokens and the mean tokens come to the real ones,
    standardized with clip_mean/clip_std: returns A, {key: [N, E]}, the mean tokens' vector,
    {key or 'm': {...} of [N] arrays} (metrics.token_fidelity's)."""
    N = np.load(clip_path, mmap_mode='r').shape[0] - start if N is None else N
    A = np.empty((N, visual.proj.shape[1]), np.float32)
    gens = {key: np.empty_like(A) for key in gen_paths}
    mean, std = (torch.as_tensor(x, dtype=torch.float32, device=device)
                 for x in (clip_mean, clip_std))
    fidelity = {m: {} for m in [*gen_paths, 'm']}
    m_tokens = mean_tok.to(device)[None]
    m_vec = pool_project(m_tokens, visual)

    def compare(m, tokens, vec, real, a, rows):
        for k, v in token_fidelity(tokens, real, vec, a, mean, std).items():
            fidelity[m].setdefault(k, np.empty(N))[rows] = v

    for s in tqdm(range(0, N, batch_size), desc='image vectors', unit='batch'):
        e = min(s + batch_size, N)
        # a fresh memmap per chunk: a long-lived one keeps its pages resident (nanoGPT #287)
        real = np.load(clip_path, mmap_mode='r')[start + s:start + e].astype(np.float32)
        real = torch.from_numpy(real).to(device)
        a = pool_project(real, visual)
        A[s:e] = a.cpu().numpy()
        compare('m', m_tokens, m_vec, real, a, slice(s, e))
        for key, gen_path in gen_paths.items():
            gen = np.load(gen_path, mmap_mode='r')[s:e].astype(np.float32)
            gen = torch.from_numpy(gen).to(device)
            check_finite(gen, gen_path, s)
            b = pool_project(gen, visual)
            gens[key][s:e] = b.cpu().numpy()
            compare(key, gen, b, real, a, slice(s, e))
    return A, gens, m_vec.cpu().numpy()[0], fidelity


def load_captions(meta, target):
    """Captions of the target's images in row order and the row of each caption; every check names
    the file and the values."""
    path = os.path.join(target['folder'], 'captions.json')
    if not os.path.exists(path):
        raise SystemExit(f"eval.py: {path} not found: evaluation needs the captions extract.py "
                         f"writes")
    captions_by_id = data.read_json(path)
    image_ids = meta['image_ids'][target['start']:target['start'] + target['count']]
    if not isinstance(captions_by_id, dict):
        raise SystemExit(f"eval.py: {path} should hold {{image_id: [caption, ...]}}, got "
                         f"{type(captions_by_id).__name__}")
    missing = [i for i in image_ids if captions_by_id.get(str(i)) in (None, [])]
    if missing:
        more = ' ...' if len(missing) > 5 else ''
        raise SystemExit(f"eval.py: {path} has no captions for {len(missing)} of {len(image_ids)} "
                         f"images (image ids {missing[:5]}{more}); every image needs at least one: "
                         f"expected a non-empty list of caption strings, got "
                         f"{captions_by_id.get(str(missing[0]), 'no entry')!r} for {missing[0]}")
    data.check_captions({str(i): captions_by_id[str(i)] for i in image_ids}, path)
    captions = [c for i in image_ids for c in captions_by_id[str(i)]]
    per_image = [len(captions_by_id[str(i)]) for i in image_ids]
    text_image = np.repeat(np.arange(len(image_ids)), per_image)
    return captions, text_image


def other_rows(made_for, target):
    """Why generated.json's 'data' (folder, id, start, count) is not the evaluated rows, or None."""
    theirs, ours = ({k: d.get(k) for k in ('id', 'start', 'count')} for d in (made_for, target))
    if theirs == ours:
        return None
    return (f"made for {made_for.get('folder')} (id {theirs['id']}, rows {theirs['start']} + "
            f"{theirs['count']}), the evaluated data is {target['folder']} (id {ours['id']}, rows "
            f"{ours['start']} + {ours['count']})")


def load_generated(generated, out_dir, holdout, meta, target):
    """(path, generated.json or None, its path) of the array under test: `generated`, else the
    samples folder sample.py finished last for this target; path None: A and R only. An array of
    another shape, or made for other rows, is an error."""
    last = data.last_samples(out_dir, holdout)
    gen_path = generated or (last and os.path.join(last, 'generated.npy'))
    if generated and not os.path.exists(generated):
        raise SystemExit(f"eval.py: generated={generated!r} not found")
    if not gen_path:
        print(f"eval: no samples in {out_dir}/samples for this target: reporting the CLIP baseline "
              f"(A and R) only")
    else:
        expected = (target['count'], *data.token_shape(meta))
        shape = data.open_array(gen_path, np.float16, remedy='regenerate it with sample.py').shape
        if shape != expected:
            raise SystemExit(f"eval.py: {gen_path} has shape {list(shape)}, but {target['folder']} "
                             f"holds {list(expected)} real tokens (count, tokens, dim); was it "
                             f"generated for another data folder?")
    sampling, info_path = None, gen_path and gen_path[:-len('.npy')] + '.json'
    if gen_path and os.path.exists(info_path):
        sampling = data.read_json(info_path)
        why = 'data' in sampling and other_rows(sampling['data'], target)
        if why:
            raise SystemExit(f"eval.py: {gen_path}: {info_path} says it was {why} "
                             f"({target['folder']}): evaluate it on the data it was generated for, "
                             f"or regenerate it")
    return gen_path, sampling, info_path


def load_baseline(path, meta, target):
    """(label, generated.json) of a baseline array made for the evaluated rows; None, with a printed
    warning, for one made for other rows (found for another split: not an error)."""
    if not os.path.exists(path):
        print(f"eval: warning: baseline {path} skipped: not found (ridge.py, or sample.py on a "
              f"regression checkpoint, writes it)")
        return None
    shape = data.open_array(path, np.float16, remedy='regenerate it (ridge.py or sample.py)').shape
    info_path = os.path.splitext(path)[0] + '.json'
    info = data.read_json(info_path) if os.path.exists(info_path) else {}
    label = str(info.get('label') or os.path.basename(os.path.dirname(os.path.abspath(path))))
    expected, val_data = (target['count'], *data.token_shape(meta)), target['folder']
    if 'data' not in info:
        print(f"eval: warning: baseline {label!r}: {info_path} has no 'data' (the rows it was made "
              f"for): checking its shape only")
    else:
        why = other_rows(info['data'], target)
        if why:
            print(f"eval: warning: baseline {label!r} ({path}) skipped: {why} ({val_data})")
            return None
    if shape != expected:
        if 'data' in info:
            raise SystemExit(f"eval.py: {path} has shape {list(shape)}, but {info_path} says it "
                             f"was made for {val_data}, which holds {list(expected)}: regenerate "
                             f"it")
        print(f"eval: warning: baseline {label!r} ({path}) skipped: shape {list(shape)}, "
              f"{val_data} holds {list(expected)} (count, tokens, dim): made for other rows")
        return None
    return label, info


def load_baselines(paths, meta, target):
    """{baseline_<label>: (label, path, generated.json)} of the baselines made for the evaluated
    rows (one more column each; B - baseline is b_minus_<label>), and the paths skipped."""
    found, skipped = {}, []
    for path in paths:
        loaded = load_baseline(path, meta, target)
        if loaded is None:
            skipped.append(path)
            continue
        label, info = loaded
        if f'baseline_{label}' in found:
            raise SystemExit(f"eval.py: baselines {found[f'baseline_{label}'][1]} and {path} are "
                             f"both labelled {label!r}: give one another 'label' in its "
                             f"generated.json")
        found[f'baseline_{label}'] = (label, path, info)
    return found, skipped


def describe_columns(found, has_b):
    """What each method is, each column's table heading, and B's paired differences {column:
    (minuend, subtrahend)}: B - A ('d') and B - each baseline (b_minus_<label>); none without B."""
    names = {**METHODS, **{key: f"{label}: a baseline generator's tokens, mean-pooled + proj"
                           for key, (label, _, _) in found.items()}}
    headings = {**COLUMNS, **{key: label for key, (label, _, _) in found.items()},
                **{f'b_minus_{label}': f'B - {label}' for label, _, _ in found.values()}}
    differences = {'d': ('b', 'a'), **{f'b_minus_{label}': ('b', key)
                                       for key, (label, _, _) in found.items()}} if has_b else {}
    return names, headings, differences


def write_detailed(eval_dir, text_image, meta, mean_tok, image_emb, sims, per_image):
    """alignment_detailed.npz: every image vector, pair cosine and per-image token figure."""
    extra = {f'{k}_per_image_{m}': v for m, f in per_image.items() for k, v in f.items()}
    np.savez(os.path.join(eval_dir, 'alignment_detailed.npz'), text_image=text_image,
             image_ids=np.array([str(i) for i in meta['image_ids']]),
             mean_tokens=mean_tok.cpu().numpy(),
             **{f'image_embedding_{m}': e for m, e in image_emb.items()},
             **{f'similarity_{m}': s for m, s in sims.items()}, **extra)


def summary_header(target, holdout, gen_path, sampling, clip_model, clip_pretrained, text_image,
                   embed_dim, methods, mean_source, skipped, bootstrap_samples, bootstrap_seed):
    """What both summaries start with: the rows, the array and its maker, CLIP, the counts, the
    methods, the bootstrap."""
    counts, N, T = np.bincount(text_image), target['count'], len(text_image)
    made_by = (sampling or {}).get('settings')  # the checkpoint and the sampler that made the array
    return {'val_data': target['folder'], 'data': target, 'holdout': holdout, 'generated': gen_path,
            'checkpoint': made_by and {'path': made_by.get('checkpoint'),
                                       'iter_num': made_by.get('iter_num'),
                                       'use_ema': made_by.get('use_ema')},
            'sampler': made_by and {k: v for k, v in flow.Sampler.from_settings(made_by)
                                    .settings().items() if k != 'use_ema'},
            'model_calls': (sampling or {}).get('model_calls'), 'sampling': sampling,
            'clip_model': clip_model, 'clip_pretrained': clip_pretrained, 'num_images': N,
            'num_captions': T, 'captions_per_image': {'min': int(counts.min()),
                                                      'max': int(counts.max()), 'mean': T / N},
            'embedding_space': embed_dim, 'uses_visual_projection': True, 'methods': methods,
            'mean_tokens_source': mean_source, 'baselines_skipped': skipped,
            'bootstrap': {'samples': bootstrap_samples, 'seed': bootstrap_seed,
                          'interval': '95% percentile', 'resampled': RESAMPLED}
            if bootstrap_samples else None}


def alignment_task(image_emb, ranked, text, text_image, differences, found, per_image, common,
                   stats_source, bootstrap):
    """Task 1: every column's per-pair cosines (read from the recall's score matrix where it ran),
    their statistics and intervals; returns (sims, summary, the printed table's rows)."""
    text_image_t = torch.from_numpy(text_image).to(text.device)
    sims = {}
    for m, emb in image_emb.items():
        pair = (ranked[m][1] if m in ranked
                else pair_scores(torch.from_numpy(emb).to(text.device), text, text_image_t))
        sims[m] = pair.cpu().numpy().astype(np.float64)
    values, ci = alignment_columns(sims, differences, text_image, *bootstrap)
    stats = {m: {**cosine_stats(s), 'mean_cosine_similarity_ci95': ci[m]} for m, s in sims.items()}
    summary = {'task': 'alignment', **common,
               **{SUMMARY_KEYS[m]: stats.get(m) for m in SUMMARY_KEYS},
               'baselines': {label: {**stats[key], 'generated': path, 'generated_info': info,
                                     'correlation': pearson(sims['a'], sims[key]),
                                     'token_fidelity': fidelity_summary(per_image[key])}
                             for key, (label, path, info) in found.items()},
               'difference_mean': None, 'difference_mean_ci95': None, 'difference_std': None,
               'correlation': None, 'reference_correlation': pearson(sims['a'], sims['r']),
               'token_fidelity': None, 'token_fidelity_stats': stats_source,
               'mean_tokens_fidelity': fidelity_summary(per_image['m'])}
    if differences:
        summary.update(difference_mean=float(values['d'].mean()), difference_mean_ci95=ci['d'],
                       difference_std=float(values['d'].std()),
                       correlation=pearson(sims['a'], sims['b']),
                       token_fidelity=fidelity_summary(per_image['b']))
        summary.update({d: {'difference_mean': float(values[d].mean()),
                            'difference_mean_ci95': ci[d], 'difference_std': float(values[d].std())}
                        for d in differences if d != 'd'})
    correlations = {m: pearson(sims['a'], s) for m, s in sims.items()}
    rows = [('alignment mean cosine', {m: with_ci(v.mean(), ci[m], m in differences)
                                       for m, v in values.items()}),
            ('correlation with A', {m: 'n/a' if c is None else f"{c:.4f}"
                                    for m, c in correlations.items()})]
    return sims, summary, rows


def recall_task(ranked, text_image, k_values, differences, found, common, bootstrap):
    """Task 2 from retrieval_counts' counts: recall@K with intervals, median ranks; returns
    metrics.recall_columns' (hits, ranks, recalls, ci), the summary and the printed table's rows."""
    counts = {m: by_direction for m, (by_direction, _) in ranked.items()}
    hits, ranks, recalls, ci = recall_columns(counts, differences, k_values, text_image, *bootstrap)
    per_method = {m: {**{d: {key: v for k in k_values
                             for key, v in ((f"recall@{k}", recalls[m][d][k]),
                                            (f"recall@{k}_ci95", ci[m, d, k]))}
                         for d in DIRECTIONS},
                      'median_rank': {d: float(np.median(ranks[m][d])) + 1 for d in DIRECTIONS}}
                  for m in recalls}
    summary = {'task': 'recall', **common, 'k_values': k_values, 'ties': TIES,
               **{SUMMARY_KEYS[m]: per_method.get(m) for m in SUMMARY_KEYS},
               'baselines': {label: {**per_method[key], 'generated': path}
                             for key, (label, path, _) in found.items()},
               'difference': (recall_difference(recalls, ci, *differences['d'], 'd', k_values)
                              if 'd' in differences else None),
               **{c: recall_difference(recalls, ci, *differences[c], c, k_values)
                  for c in differences if c != 'd'}}
    rows = [(f"{short} R@{k}", {m: with_ci(h[d][:, i].mean(), ci[m, d, k], m in differences,
                                           percent=True) for m, h in hits.items()})
            for d, short in (('image_to_text', 'image->text'), ('text_to_image', 'text->image'))
            for i, k in enumerate(k_values)]
    return hits, ranks, recalls, ci, summary, rows


def print_table(table, columns, headings):
    """A table on the terminal: a column per method and difference."""
    width = max(len(cell) for _, row in table for cell in [*row.values(), *headings.values()]) + 2
    print(f"{'':26s}" + ''.join(f"{headings[m]:>{width}s}" for m in columns))
    for name, row in table:
        print(f"{name:26s}" + ''.join(f"{row.get(m, ''):>{width}s}" for m in columns))


def print_report(table, columns, headings, differences, bootstrap_samples, per_image, stats_source):
    """The table on the terminal, a column per method and difference, then token fidelity."""
    print_table(table, columns, headings)
    if bootstrap_samples:
        paired = ''.join(f", {headings[c]}" for c in differences if c != 'd')
        print(f"[95% interval: {bootstrap_samples} bootstrap resamples of images, each with all "
              f"its captions (both recall directions and alignment); B - A{paired} paired; recall "
              f"differences in points]")
    fidelity.print_tokens(per_image, headings, stats_source)


if __name__ == '__main__':
    from configurator import configure, require_positive
    from runtime import resolve_device
    config = configure(globals())
    train_data, val_data = data.split_folders(data_dir, splits, train_data, val_data)
    task_list, k_values = parse_tasks(tasks, k_values)
    device = resolve_device(device)
    t_start = time.time()
    require_positive(config, 'eval_batch_size')
    bootstrap = (bootstrap_samples, bootstrap_seed)

    # load: the evaluated rows and their captions, the generated array, the baselines, CLIP
    meta, target = data.open_target(holdout, train_data, val_data, val_fraction,
                                    ('clip', 'clip_cls'))
    eval_data, start, N = target['folder'], target['start'], target['count']
    if 'fidelity' in task_list:
        fidelity.check_k(fidelity_k, fidelity_images, N)
    captions, text_image = load_captions(meta, target)
    T = len(captions)
    gen_path, sampling, info_path = load_generated(generated, out_dir, holdout, meta, target)
    found, skipped = load_baselines(baselines, meta, target)
    model, tokenizer = load_clip(clip_model, clip_pretrained, device)
    embed_dim = check_clip(model.visual, meta, eval_data, clip_model, clip_pretrained)
    print(f"eval: {N} images, {T} captions ({T / N:.2f} per image), "
          f"{clip_model} / {clip_pretrained or 'random init'}, embedding space {embed_dim}, "
          f"device {device}"
          + (f", baselines {', '.join(l for l, _, _ in found.values())}" if found else ''))

    # embed: the captions, the mean tokens, then A, B and the baselines a chunk at a time, and R
    rows = f"rows {start}+{N}" if holdout else ''  # the held-out slice's captions: their own cache
    text = text_features(model, tokenizer, captions, eval_data, clip_model, clip_pretrained,
                         eval_batch_size, device, rows)
    text = torch.from_numpy(text).to(device)
    mean_tok, mean_source = fidelity.mean_tokens(train_data, val_fraction, meta, eval_data,
                                                 mean_tokens_rows,
                                        eval_batch_size, device)
    clip_mean, clip_std, stats_source = fidelity.fidelity_stats(sampling, info_path, train_data,
                                                                meta, eval_data)
    gen_paths = {**({'b': gen_path} if gen_path else {}),
                 **{key: path for key, (_, path, _) in found.items()}}
    A, gens, m_vec, per_image = embed_tokens(meta['paths']['clip'], gen_paths, mean_tok,
                                             model.visual, clip_mean, clip_std, eval_batch_size,
                                             device, start, N)
    R = np.load(meta['paths']['clip_cls'])[start:start + N]
    R = F.normalize(torch.from_numpy(R).float(), dim=-1).numpy()
    # the columns: A, B, the baselines, R, mean tokens (one vector for every image), differences
    image_emb = {'a': A, **gens, 'r': R, 'm': np.tile(m_vec, (N, 1))}
    if 'fidelity' in task_list:  # Task 3's draws: Tasks 1-2 score its true samples and control too
        t_fidelity = time.time()
        settings = {'k': fidelity_k, 'halvings': fidelity_halvings, 'images': fidelity_images,
                    'tokens': fidelity_tokens, 'seed': fidelity_seed,
                    'seed_paths': fidelity.seed_draws(gen_path, sampling, seed_generated)}
        real, draws = fidelity.inputs(image_emb, gen_paths, meta, data.token_shape(meta),
                                      target, mean_tok, train_data, val_fraction, settings,
                                      lambda x: pool_project(x, model.visual),
                                      (clip_mean, clip_std), eval_batch_size, device)
        image_emb.update(fidelity.first_draws(draws))
        seconds_fidelity = time.time() - t_fidelity
    names, headings, differences = describe_columns(found, 'b' in gens)
    columns = list(image_emb) + list(differences)
    eval_dir = os.path.join(os.path.dirname(gen_path) if gen_path else out_dir, 'eval')
    os.makedirs(eval_dir, exist_ok=True)
    common = summary_header(target, holdout, gen_path, sampling, clip_model, clip_pretrained,
                            text_image, embed_dim, {m: names[m] for m in image_emb}, mean_source,
                            skipped, *bootstrap)

    # task 2's counts first, for every column: task 1 reads its cosines from the same score matrix
    t_recall = time.time()
    ranked = {}
    if 'recall' in task_list:
        text_groups = duplicate_groups(text)  # repeated captions: found once, for every method
        text_image_t = torch.from_numpy(text_image).to(device)
        for m, emb in image_emb.items():
            ranked[m] = retrieval_counts(torch.from_numpy(emb).to(device), text, text_image_t,
                                         text_groups=text_groups)
    seconds_recall = time.time() - t_recall
    table, sims, recalls, ci = [], {}, {}, {}

    # task 1: alignment
    if 'alignment' in task_list:
        sims, summary, rows = alignment_task(image_emb, ranked, text, text_image, differences,
                                             found, per_image, common, stats_source, bootstrap)
        summary['seconds'] = time.time() - t_start
        data.write_json(os.path.join(eval_dir, 'alignment_summary.json'), summary, indent=2)
        table += rows
        if save_detailed:
            write_detailed(eval_dir, text_image, meta, mean_tok, image_emb, sims, per_image)

    # task 2: recall
    if 'recall' in task_list:
        t_recall = time.time()
        hits, ranks, recalls, ci, summary, rows = recall_task(ranked, text_image, k_values,
                                                              differences, found, common, bootstrap)
        summary.update(published.canary(summary['reference'], meta, target, clip_model,
                                        clip_pretrained))  # R beside published figures, where known
        summary['seconds'] = seconds_recall + time.time() - t_recall
        data.write_json(os.path.join(eval_dir, 'recall_summary.json'), summary, indent=2)
        table += rows
        if save_detailed:
            np.savez(os.path.join(eval_dir, 'recall_detailed.npz'), text_image=text_image,
                     k_values=k_values,
                     **{f'rank_{d}_{m}': r for m, rs in ranks.items() for d, r in rs.items()},
                     **{f'hits_{d}_{m}': h for m, hs in hits.items() if m not in differences
                        for d, h in hs.items()})

    # task 3: distribution fidelity
    if 'fidelity' in task_list:
        t_fidelity = time.time()
        report, summary, rows3, columns3 = fidelity.task(real, draws, differences, settings,
                                                         common, bootstrap)
        summary['seconds'] = seconds_fidelity + time.time() - t_fidelity
        data.write_json(os.path.join(eval_dir, 'fidelity_summary.json'), summary, indent=2)
        plot_fidelity(eval_dir, report, real, draws, {**headings, **fidelity.COLUMNS}, common)

    # write: the figures and the table
    plot_eval(eval_dir, sims, recalls, ci, k_values, headings, common)  # ci: recall's, where it ran
    print_report(table, columns, headings, differences, bootstrap_samples, per_image, stats_source)
    if 'fidelity' in task_list:
        print_table(rows3, columns3, {**headings, **fidelity.COLUMNS})
    print(f"eval: wrote {eval_dir} in {time.time() - t_start:.1f} s")
