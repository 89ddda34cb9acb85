"""Benchmark eval.py's two tasks at COCO val scale: 5,000 images x 25,000 captions x 768 dims,
random unit vectors.

Prints one JSON line: seconds for both tasks on one image embedding (Task 2 Recall@1/5/10 both
directions, and Task 1's per-pair cosines and their stats, read from the same score matrix, as
eval.py does when both tasks run; eval.py runs this for A, B, R and the mean tokens), next to two
references timed in the same run: a naive full-matrix implementation (CLIP_benchmark style: whole
[N, T] score matrix, top-K, membership) and the floor, one float32 matmul of the text and image
embeddings. Each is the best of `repeats` interleaved runs. `bootstrap_s`: the 95% intervals of one
method's recalls and alignment mean (eval.py draws them once for all methods together).

`eval_py` (whole=True): eval.py itself, run end to end at COCO scale on random data folders written
to work_dir (5,000 val images of 256 x 1,024 tokens with 5 captions each, B and two baselines,
10,000 train rows for the mean tokens and the unconditional control; ViT-L-14 random init, its
text features cached as after a first run), `eval_runs` times with --tasks=alignment,recall and
with Task 3 added, interleaved, in OMP_NUM_THREADS=torch threads. Each figure is the lowest of its
runs: whole wall seconds, and Task 3's own (fidelity_summary.json's seconds); `task3_ratio` is Task
3's seconds over eval's whole time without it.

python bench/bench_eval.py
python bench/bench_eval.py --device=cuda
"""
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import numpy as np
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_model import synchronize  # noqa: E402
# noqa: E402
import data  # noqa: E402
from eval import text_cache_path  # noqa: E402
from metrics import (bootstrap_ci, cosine_stats, duplicate_groups, fidelity_report, hit_rates,
                     retrieval_counts)

# -----------------------------------------------------------------------------
n_images, captions_per_image = 5000, 5  # COCO 2017 val's scale: 5,000 images, ~25,000 captions
dim = 768
k_values = (1, 5, 10)
repeats = 3
bootstrap_samples = 1000
device = 'cpu'
threads = 0  # torch CPU threads; 0 = torch's default (one per core)
seed = 0
columns = 6  # eval.py's columns at COCO: A, B, R, mean tokens, ridge, regression DiT
fidelity = True  # also time Task 3 (eval.py's defaults) on 768-d vectors and 1,024-d tokens
fidelity_settings = {'k': 5, 'halvings': 10, 'images': 1000, 'tokens': 1, 'seed': 0}
whole = True  # also run eval.py itself at COCO scale, with and without Task 3
work_dir = ''  # where its data folders go (about 16 GB); '' = a temporary folder, removed after
eval_runs = 2  # runs of each eval.py configuration; the lowest counts (a shared box is noisy)
tokens, token_dim, train_rows = 256, 1024, 10000  # ViT-L/14's patch tokens; eval's mean_tokens_rows
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())
# -----------------------------------------------------------------------------


def both_tasks(images, texts, text_image):
    """What eval.py does per method: per-pair cosine statistics, then ranks and Recall@K both
    directions."""
    counts, pair = retrieval_counts(images, texts, text_image, text_groups=text_groups)
    recalls = {d: dict(zip(k_values, hit_rates(*c, k_values).mean(0).tolist()))
               for d, c in counts.items()}
    return cosine_stats(pair.double().cpu().numpy()), recalls


def intervals(images, texts, text_image):
    """What eval.py adds per method: bootstrap intervals of its recalls (both directions) and
    alignment mean."""
    counts, pair = retrieval_counts(images, texts, text_image, text_groups=text_groups)
    sims = pair.double().cpu()
    hits = {d: hit_rates(*c, k_values).cpu() for d, c in counts.items()}
    t0 = time.perf_counter()
    cosine_sums = torch.zeros(n_images, 1, dtype=torch.float64).index_add_(0, text_image.cpu(),
                                                                          sims[:, None])
    per_image = torch.cat([hits['image_to_text'], cosine_sums], 1)
    bootstrap_ci(per_image, torch.full((n_images,), float(captions_per_image)), bootstrap_samples,
                 seed)
    bootstrap_ci(hits['text_to_image'], torch.ones(len(sims)), bootstrap_samples, seed)
    return time.perf_counter() - t0


def naive(images, texts, text_image):
    """The full score matrix at once, top-K and membership (CLIP_benchmark's zeroshot_retrieval)."""
    scores = images @ texts.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[text_image, torch.arange(len(text_image), device=scores.device)] = True
    top_texts = scores.topk(max(k_values), dim=1).indices
    top_images = scores.T.topk(max(k_values), dim=1).indices
    return {'image_to_text': {k: positive.gather(1, top_texts[:, :k]).any(1).double().mean().item()
                              for k in k_values},
            'text_to_image': {k: (top_images[:, :k] == text_image[:, None]).any(1).double().mean()
                              .item() for k in k_values}}


def floor(images, texts, text_image):
    return texts @ images.T


def write_tokens(path, n, rng, chunk=250):
    """A float16 [n, tokens, token_dim] array, a chunk at a time: one random block plus a random
    offset per row, so every row differs without drawing 1.3 G numbers per array."""
    block = rng.standard_normal((chunk, tokens, token_dim), dtype=np.float32)
    out = np.lib.format.open_memmap(path, mode='w+', dtype=np.float16, shape=(n, tokens, token_dim))
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        offset = rng.standard_normal((e - s, 1, token_dim), dtype=np.float32)
        out[s:e] = block[:e - s] + offset
    out.flush()


def data_folder(path, n, rng, captions=None):
    """A data folder eval.py reads: clip.npy, clip_cls.npy, meta.json (and captions.json)."""
    os.makedirs(path, exist_ok=True)
    write_tokens(os.path.join(path, 'clip.npy'), n, rng)
    np.save(os.path.join(path, 'clip_cls.npy'), rng.standard_normal((n, dim), dtype=np.float32))
    sample = np.load(os.path.join(path, 'clip.npy'), mmap_mode='r')[:250].astype(np.float64)
    ids = list(range(n))
    data.write_json(os.path.join(path, 'meta.json'), {
        'format': data.FORMAT, 'version': data.VERSION, 'count': n, 'image_ids': ids,
        'clip': {'model': 'ViT-L-14-quickgelu', 'pretrained': '', 'tokens': tokens,
                 'dim': token_dim, 'embed_dim': dim},
        'clip_mean': sample.mean((0, 1)).tolist(), 'clip_std': sample.std((0, 1)).tolist(),
        'dtype': 'float16', 'skipped': [], 'complete': True})
    if captions:
        data.write_json(os.path.join(path, 'captions.json'),
                        {str(i): [f'caption {c} of image {i}' for c in range(captions)]
                         for i in ids})


def coco_scale(root):
    """val (with B and two baselines beside it) and train folders, and val's cached text
    features; returns eval.py's arguments and the folder it writes to."""
    rng = np.random.default_rng(seed)
    val, train = os.path.join(root, 'val'), os.path.join(root, 'train')
    arrays = [os.path.join(root, name, 'generated.npy') for name in ('b', 'ridge', 'regression')]
    if not os.path.exists(os.path.join(root, 'done')):
        data_folder(val, n_images, rng, captions_per_image)
        data_folder(train, train_rows, rng)
        for path in arrays:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_tokens(path, n_images, rng)
        captions = [c for i, cs in data.read_json(os.path.join(val, 'captions.json')).items()
                    for c in cs]
        feats = F.normalize(torch.from_numpy(rng.standard_normal((len(captions), dim),
                                                                dtype=np.float32)), dim=-1).numpy()
        cache = text_cache_path(val, 'ViT-L-14-quickgelu', '')
        np.save(cache, feats)  # eval.py's cache key: the spec and the captions
        data.write_json(cache[:-len('.npy')] + '.json', {
            'clip_model': 'ViT-L-14-quickgelu', 'clip_pretrained': '', 'count': len(captions),
            'weights_size_mtime': None,
            'captions_sha1': hashlib.sha1(json.dumps(captions).encode()).hexdigest()})
        open(os.path.join(root, 'done'), 'w').close()
    return [f'--val_data={val}', f'--train_data={train}', f'--generated={arrays[0]}',
            f'--baselines={tuple(arrays[1:])!r}', '--clip_model=ViT-L-14-quickgelu',
            '--clip_pretrained=', f'--bootstrap_samples={bootstrap_samples}'], \
        os.path.join(root, 'b', 'eval')


def eval_py(args, eval_dir, tasks):
    """eval.py's whole wall seconds with --tasks=tasks, and Task 3's own seconds (or None)."""
    env = {**os.environ, 'OMP_NUM_THREADS': str(torch.get_num_threads())}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(root, 'eval.py'), *args, f'--tasks={tasks}'],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    summary = os.path.join(eval_dir, 'fidelity_summary.json')
    task3 = data.read_json(summary)['seconds'] if 'fidelity' in tasks else None
    if os.path.exists(summary):
        os.remove(summary)
    return wall, task3


def whole_eval():
    """eval.py at COCO scale without and with Task 3, eval_runs each, interleaved: the lowest."""
    root = work_dir or tempfile.mkdtemp(prefix='bench_eval_')
    try:
        args = coco_scale(root)  # (arguments, eval_dir)
        runs = {'without': [], 'with': []}
        for _ in range(eval_runs):
            runs['without'].append(eval_py(*args, 'alignment,recall'))
            runs['with'].append(eval_py(*args, 'alignment,recall,fidelity'))
    finally:
        if not work_dir:
            shutil.rmtree(root)
    without, with_ = min(w for w, _ in runs['without']), min(w for w, _ in runs['with'])
    task3 = min(t for _, t in runs['with'])
    return {'eval_without_task3_s': round(without, 1), 'eval_with_task3_s': round(with_, 1),
            'task3_s': round(task3, 1), 'task3_ratio': round(task3 / without, 3),
            'wall_added_ratio': round((with_ - without) / without, 3),
            'runs_s': {k: [[round(x, 1) for x in r if x is not None] for r in v]
                       for k, v in runs.items()}}


if threads:
    torch.set_num_threads(threads)
g = torch.Generator().manual_seed(seed)
images = F.normalize(torch.randn(n_images, dim, generator=g), dim=-1).to(device)
texts = F.normalize(torch.randn(n_images * captions_per_image, dim, generator=g), dim=-1).to(device)
text_image = torch.arange(n_images).repeat_interleave(captions_per_image).to(device)
text_groups = duplicate_groups(texts)  # eval.py finds the repeated captions once, for every method
times = {'eval': [], 'naive': [], 'floor': []}
# process CPU seconds: steadier than wall time on a shared box
cpu = {'eval': [], 'naive': [], 'floor': []}
results = {}
for _ in range(repeats):
    for name, fn in (('floor', floor), ('eval', both_tasks), ('naive', naive)):
        synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(images, texts, text_image)
        synchronize(device)
        times[name].append(time.perf_counter() - t0)
        cpu[name].append(time.process_time() - c0)
        if name != 'floor':  # the floor's 500 MB matrix is dropped at once
            results[name] = out
        del out
best = {k: min(v) for k, v in times.items()}
bootstrap_s = intervals(images, texts, text_image)
fidelity_s = None
if fidelity:  # Task 3 on random draws: B, two baselines, mean tokens, unconditional
    def draw(d, p=None):
        return torch.randn(n_images, 1, *([p] if p else []), d, generator=g)
    real = (F.normalize(draw(dim), dim=-1), draw(1024, fidelity_settings['tokens']))
    draws = {c: (F.normalize(draw(dim), dim=-1), draw(1024, fidelity_settings['tokens']))
             for c in ('b', 'ridge', 'regression', 'u')}
    draws['m'] = tuple(x[:1].expand_as(x).clone() for x in draws['b'])
    pairs = {f'b_minus_{c}': ('b', c) for c in ('ridge', 'regression')}
    t0 = time.perf_counter()
    fidelity_report(real, draws, pairs, fidelity_settings, bootstrap_samples, seed)
    fidelity_s = time.perf_counter() - t0
whole_s = whole_eval() if whole else None
tasks_12_s = columns * best['eval'] + bootstrap_s * columns / 2
agree = all(results['eval'][1][d][k] == results['naive'][d][k] for d in results['naive']
            for k in k_values)
print(json.dumps({
    'bench': 'eval', 'images': n_images, 'captions': n_images * captions_per_image, 'dim': dim,
    'k_values': list(k_values), 'device': device, 'torch_threads': torch.get_num_threads(),
    'machine': (torch.cuda.get_device_name() if device.startswith('cuda')
                else f"{platform.machine()}, {os.cpu_count()} cpus"),
    'eval_s': round(best['eval'], 3), 'naive_s': round(best['naive'], 3),
    'floor_matmul_s': round(best['floor'], 3),
    'ratio_to_floor': round(best['eval'] / best['floor'], 3),
    'ratio_to_naive': round(best['eval'] / best['naive'], 3),
    'cpu_s': {k: round(min(v), 3) for k, v in cpu.items()}, 'recall_agrees_with_naive': agree,
    'cpu_ratio_to_floor': round(min(cpu['eval']) / min(cpu['floor']), 3),
    'bootstrap_samples': bootstrap_samples, 'bootstrap_s': round(bootstrap_s, 3),
    'columns': columns, 'tasks_1_2_s': round(tasks_12_s, 3),
    'fidelity_s': fidelity_s and round(fidelity_s, 3),
    'fidelity_percent_of_tasks_1_2': fidelity_s and round(100 * fidelity_s / tasks_12_s, 1),
    'eval_py': whole_s,
    'all_runs_s': {k: [round(t, 3) for t in v] for k, v in times.items()},
}))
