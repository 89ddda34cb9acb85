"""Benchmark eval.py's two tasks at COCO val scale: 5,000 images x 25,000 captions x 768 dims, random unit vectors.

Prints one JSON line: seconds for both tasks on one image embedding (Task 1 per-pair cosines and their stats,
Task 2 Recall@1/5/10 both directions; eval.py runs this for A, B and R), next to two references timed in the
same run: a naive full-matrix implementation (CLIP_benchmark style: whole [N, T] score matrix, top-K, membership)
and the floor, one float32 matmul of the text and image embeddings. Each is the best of `repeats` interleaved runs.

python bench/bench_eval.py
python bench/bench_eval.py --device=cuda
"""
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eval import cosine_stats, pair_scores, recall_from_ranks, retrieval_ranks  # noqa: E402

# -----------------------------------------------------------------------------
n_images = 5000
captions_per_image = 5
dim = 768
k_values = (1, 5, 10)
repeats = 3
device = 'cpu'
threads = 0  # torch CPU threads; 0 = torch's default (one per core)
seed = 0
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())
# -----------------------------------------------------------------------------


def sync():
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def both_tasks(images, texts, text_image):
    """What eval.py does per method: per-pair cosine statistics, then ranks and Recall@K both directions."""
    sims = pair_scores(images, texts, text_image).double().cpu().numpy()
    return cosine_stats(sims), recall_from_ranks(*retrieval_ranks(images, texts, text_image), k_values)


def naive(images, texts, text_image):
    """The full score matrix at once, top-K and membership (CLIP_benchmark's zeroshot_retrieval)."""
    scores = images @ texts.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[text_image, torch.arange(len(text_image), device=scores.device)] = True
    top_texts = scores.topk(max(k_values), dim=1).indices
    top_images = scores.T.topk(max(k_values), dim=1).indices
    return {'image_to_text': {k: positive.gather(1, top_texts[:, :k]).any(1).double().mean().item() for k in k_values},
            'text_to_image': {k: (top_images[:, :k] == text_image[:, None]).any(1).double().mean().item()
                              for k in k_values}}


def floor(images, texts, text_image):
    return texts @ images.T


if threads:
    torch.set_num_threads(threads)
g = torch.Generator().manual_seed(seed)
images = F.normalize(torch.randn(n_images, dim, generator=g), dim=-1).to(device)
texts = F.normalize(torch.randn(n_images * captions_per_image, dim, generator=g), dim=-1).to(device)
text_image = torch.arange(n_images).repeat_interleave(captions_per_image).to(device)
times = {'eval': [], 'naive': [], 'floor': []}
cpu = {'eval': [], 'naive': [], 'floor': []}  # process CPU seconds: steadier than wall time on a shared box
results = {}
for _ in range(repeats):
    for name, fn in (('floor', floor), ('eval', both_tasks), ('naive', naive)):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(images, texts, text_image)
        sync()
        times[name].append(time.perf_counter() - t0)
        cpu[name].append(time.process_time() - c0)
        if name != 'floor':  # the floor's 500 MB matrix is dropped at once
            results[name] = out
        del out
best = {k: min(v) for k, v in times.items()}
agree = all(results['eval'][1][d][k] == results['naive'][d][k] for d in results['naive'] for k in k_values)
print(json.dumps({
    'bench': 'eval', 'images': n_images, 'captions': n_images * captions_per_image, 'dim': dim,
    'k_values': list(k_values), 'device': device, 'torch_threads': torch.get_num_threads(),
    'machine': (torch.cuda.get_device_name() if device.startswith('cuda')
                else f"{platform.machine()}, {os.cpu_count()} cpus"),
    'eval_s': round(best['eval'], 3), 'naive_s': round(best['naive'], 3), 'floor_matmul_s': round(best['floor'], 3),
    'ratio_to_floor': round(best['eval'] / best['floor'], 3), 'ratio_to_naive': round(best['eval'] / best['naive'], 3),
    'cpu_s': {k: round(min(v), 3) for k, v in cpu.items()}, 'recall_agrees_with_naive': agree,
    'all_runs_s': {k: [round(t, 3) for t in v] for k, v in times.items()},
}))
