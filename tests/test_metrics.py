"""metrics.py: recall on hand-built embeddings and against brute force, the tie rule, hit rates,
bootstrap intervals (images resampled with all their captions), paired difference columns."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metrics import (alignment_columns, bootstrap_ci, hit_rates, recall_at_k, recall_columns,
                     recall_intervals, retrieval_counts)


def naive_recall(image_emb, text_emb, text_image, k_values):
    """CLIP_benchmark's way: the full score matrix, top-K indices, membership."""
    scores = image_emb @ text_emb.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[text_image, torch.arange(len(text_image))] = True
    out = {'image_to_text': {}, 'text_to_image': {}}
    for k in k_values:
        top_t = scores.topk(min(k, scores.shape[1]), dim=1).indices
        out['image_to_text'][k] = positive.gather(1, top_t).any(1).float().mean().item()
        top_i = scores.T.topk(min(k, scores.shape[0]), dim=1).indices
        out['text_to_image'][k] = (top_i == text_image[:, None]).any(1).float().mean().item()
    return out


def test_recall_hand_built_known_answers():
    # images 0, 1, 2 own 1, 5 and 7 captions; identity image vectors make text_emb[t] the scores of
    # caption t
    # image 0: own t0 = 0.5, t1 and t6 beat it -> rank 2; image 1: best own t1 = 0.95 is the top ->
    # rank 0; image 2: best own 0.6, t0..t4 beat it -> rank 5
    scores = torch.tensor([
        # t0   t1    t2   t3    t4   t5   t6   t7   t8   t9   t10  t11  t12
        [0.5, 0.9, 0.1, 0.1, 0.1, 0.1, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
        [0.2, 0.95, 0.3, 0.3, 0.3, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2],
        [0.7, 0.75, 0.8, 0.85, 0.9, 0.1, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    text_image = torch.tensor([0] + [1] * 5 + [2] * 7)
    counts, pair = retrieval_counts(torch.eye(3), scores.T, text_image, chunk_images=2)
    assert [c.tolist() for c in counts['image_to_text']] == [[2, 0, 5], [0, 0, 0], [1, 1, 1]]
    assert counts['text_to_image'][0].tolist() == [1, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0]
    assert counts['text_to_image'][1].tolist() == [0] * 13  # no ties
    # each caption's own score, exactly
    assert pair.tolist() == scores[text_image, torch.arange(13)].tolist()
    r = recall_at_k(torch.eye(3), scores.T, text_image, k_values=(1, 2, 3, 5, 6, 10))
    assert r['image_to_text'] == pytest.approx({1: 1 / 3, 2: 1 / 3, 3: 2 / 3, 5: 2 / 3, 6: 1.0,
                                                10: 1.0})
    assert r['text_to_image'] == pytest.approx({1: 8 / 13, 2: 1.0, 3: 1.0, 5: 1.0, 6: 1.0, 10: 1.0})
    # captions in any order (not grouped by image) give the same answers
    perm = torch.randperm(13, generator=torch.Generator().manual_seed(0))
    assert recall_at_k(torch.eye(3), scores.T[perm], text_image[perm], (1, 2, 3, 5, 6, 10)) == r


@pytest.mark.parametrize('chunk_images', [None, 1, 7])
def test_recall_matches_naive_full_matrix(chunk_images):
    g = torch.Generator().manual_seed(1)
    counts = torch.randint(1, 8, (60,), generator=g)  # 1 to 7 captions per image
    text_image = torch.repeat_interleave(torch.arange(60), counts)
    text_image = text_image[torch.randperm(len(text_image), generator=g)]
    images = F.normalize(torch.randn(60, 16, generator=g), dim=-1)
    noise = torch.randn(len(text_image), 16, generator=g)
    texts = F.normalize(images[text_image] + 1.2 * noise, dim=-1)
    k_values = (1, 5, 10, 50)
    tile = {'chunk_images': chunk_images} if chunk_images else {}
    got = recall_at_k(images, texts, text_image, k_values, **tile)
    naive = naive_recall(images, texts, text_image, k_values)
    for d in ('image_to_text', 'text_to_image'):
        assert got[d] == pytest.approx(naive[d])
    # the data is neither trivial nor hopeless
    assert 0 < got['image_to_text'][1] < got['image_to_text'][10] < 1
    assert 0 < got['text_to_image'][1] < got['text_to_image'][10] < 1


def brute_force_recall(images, texts, text_image, k):
    """Expected recall@k by enumerating every order of the tied candidates: those whose embedding
    equals the query's best correct item's, and its correct items at that score; a different
    embedding at the same score counts above."""
    scores = images @ texts.T

    def expected_hit(candidate_scores, correct, embeddings):
        best = max(s for s, c in zip(candidate_scores, correct) if c)
        best_embeddings = [e for s, c, e in zip(candidate_scores, correct, embeddings)
                           if c and s == best]
        tied, above = [], 0
        for s, c, e in zip(candidate_scores, correct, embeddings):
            if s == best and (c or any(torch.equal(e, b) for b in best_embeddings)):
                tied.append(c)
            elif s >= best:
                above += 1
        orders = list(itertools.permutations(tied))
        return sum(any(o[:max(k - above, 0)]) for o in orders) / len(orders)

    n, t = scores.shape
    i2t = [expected_hit(scores[i].tolist(), (text_image == i).tolist(), list(texts))
           for i in range(n)]
    t2i = [expected_hit(scores[:, j].tolist(), (torch.arange(n) == text_image[j]).tolist(),
                        list(images))
           for j in range(t)]
    return sum(i2t) / n, sum(t2i) / t


@pytest.mark.parametrize('seed', range(6))
def test_recall_with_ties_matches_brute_force(seed):
    # embeddings drawn from a few small integer vectors: repeated images and captions (exact ties),
    # and different
    # embeddings with equal integer scores (float coincidences, which count against the query)
    g = torch.Generator().manual_seed(seed)
    images = torch.tensor([[1., 0, 1], [0, 1, 1], [1, 1, 0]])
    images = images[torch.randint(0, 3, (5,), generator=g)]
    texts = torch.tensor([[1., 0, 0], [0, 1, 0], [1, 1, 1], [0, 0, 1]])
    texts = texts[torch.randint(0, 4, (8,), generator=g)]
    text_image = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    for k in (1, 2, 3, 5):
        expected = brute_force_recall(images, texts, text_image, k)
        got = recall_at_k(images, texts, text_image, (k,), chunk_images=2)
        got = (got['image_to_text'][k], got['text_to_image'][k])
        assert got == pytest.approx(expected, abs=1e-12)


def test_hit_rates_closed_form():
    # 2 correct captions level with 3 wrong ones at the top: the first of 5 random places is correct
    # with p 2/5,
    # one of the first two with 1 - (3/5)(2/4) = 7/10, one of the first three with 1 -
    # (3/5)(2/4)(1/3) = 9/10
    hits = hit_rates(torch.tensor([0, 1]), torch.tensor([3, 1]), torch.tensor([2, 2]), (1, 2, 3, 4))
    assert hits.flatten().tolist() == pytest.approx([2 / 5, 7 / 10, 9 / 10, 1, 0, 2 / 3, 1, 1])


CUDA = pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                     reason='no GPU'))


@pytest.mark.parametrize('device', ['cpu', CUDA])
@pytest.mark.parametrize('chunk_images', [None, 7])
def test_constant_image_embeddings_score_exactly_chance(chunk_images, device):
    # the seed's rule (ties count for the query, the own score from another product) gave
    # text->image R@1 = 0.65
    # for 1000 constant images: a collapsed generator must not beat chance. Exact chance needs every
    # block's GEMM
    # to give equal inputs equal outputs, which the device's BLAS decides: hence the GPU case.
    g = torch.Generator().manual_seed(3)
    per_image = torch.randint(1, 8, (200,), generator=g)
    text_image = torch.repeat_interleave(torch.arange(200), per_image).to(device)
    N, T, k_values = 200, len(text_image), (1, 5, 10, 50)
    image = F.normalize(torch.randn(1, 32, generator=g), dim=-1).expand(N, 32).to(device)
    texts = F.normalize(torch.randn(T, 32, generator=g), dim=-1).to(device)
    tile = {'chunk_images': chunk_images} if chunk_images else {}
    got = recall_at_k(image, texts, text_image, k_values, **tile)
    # text -> image: all N images tie, so the own one is in the top K with probability K / N exactly
    assert got['text_to_image'] == pytest.approx({k: k / N for k in k_values}, rel=1e-12)
    # image -> text: every image ranks the captions alike, so exactly the owners of the K best
    # captions are hits
    ranking = (texts @ image[0]).argsort(descending=True)
    assert got['image_to_text'] == pytest.approx({k: len(set(text_image[ranking[:k]].tolist())) / N
                                                  for k in k_values}, rel=1e-12)
    # some images own two of the 50 best: below K / N
    assert len(set(text_image[ranking[:50]].tolist())) < 50
    # all captions constant too: everything ties, and an image with c of the T captions hits with 1
    # - C(T-c,K)/C(T,K)
    got = recall_at_k(image, texts[:1].expand(T, 32), text_image, k_values, **tile)
    per_image = torch.bincount(text_image).tolist()  # 1 to 7 captions
    chance = {k: sum(1 - math.comb(T - c, k) / math.comb(T, k) for c in per_image) / N
              for k in k_values}
    assert got['image_to_text'] == pytest.approx(chance, rel=1e-9)
    assert got['text_to_image'] == pytest.approx({k: k / N for k in k_values}, rel=1e-12)


def test_duplicate_captions_across_images_tie():
    # images 2j and 2j+1 have one caption each, the same string (identical text embeddings), closer
    # to image 2j.
    # image -> text: each image's caption ties with its twin, a coin flip at K = 1. Text -> image:
    # both copies rank
    # image 2j first, so the copy of image 2j+1 misses at K = 1. A perfect model of this data can do
    # no better.
    images = torch.eye(20)
    shared = F.normalize(images[0::2] + 0.5 * images[1::2], dim=-1)
    texts, text_image = shared.repeat_interleave(2, 0), torch.arange(20)
    got = recall_at_k(images, texts, text_image, (1, 2))
    assert got == {'image_to_text': {1: 0.5, 2: 1.0}, 'text_to_image': {1: 0.5, 2: 1.0}}
    # (greater, ties, correct) = (0, 1, 1) for every image
    counts, _ = retrieval_counts(images, texts, text_image)
    assert counts['image_to_text'][1].tolist() == [1] * 20
    assert counts['image_to_text'][2].tolist() == [1] * 20


def test_near_equal_image_embeddings_stay_at_chance():
    # mathematically equal image vectors that differ only by float32 rounding (each normalized from
    # its own scale)
    g = torch.Generator().manual_seed(4)
    N, per_image = 300, 5
    c = torch.randn(1, 64, generator=g)
    images = F.normalize(c * torch.rand(N, 1, generator=g).add(0.5), dim=-1)
    assert len(torch.unique(images, dim=0)) > 1  # they do differ in the last bits
    texts = F.normalize(torch.randn(N * per_image, 64, generator=g), dim=-1)
    text_image = torch.arange(N).repeat_interleave(per_image)
    got = recall_at_k(images, texts, text_image, (1, 5, 10), chunk_images=64)
    # rounding orders them at random: chance, give or take sampling noise (the old rule: 0.5)
    for k in (1, 5, 10):
        for d, queries in (('image_to_text', N), ('text_to_image', N * per_image)):
            assert got[d][k] <= k / N + 4 * math.sqrt(k / N / queries), (d, k, got[d][k])


def test_recall_rejects_images_without_captions():
    with pytest.raises(ValueError, match='1 of 3 images have no caption'):
        recall_at_k(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 2]))


def test_bootstrap_interval_matches_the_binomial_and_pairs_columns():
    rng = np.random.default_rng(0)
    a = (rng.random(4000) < 0.3).astype(float)
    b = a.copy()
    b[rng.choice(4000, 80, replace=False)] = 1 - b[:80]  # B differs from A on 2% of the units
    lo_hi = bootstrap_ci(np.stack([a, b, b - a], 1), np.ones(4000), samples=1000, seed=0)
    half = 1.96 * np.sqrt(a.mean() * (1 - a.mean()) / 4000)
    assert lo_hi[0] == pytest.approx([a.mean() - half, a.mean() + half], abs=0.15 * half)
    paired = lo_hi[2][1] - lo_hi[2][0]
    # paired: the shared draws cancel, unlike A's own spread
    assert paired < 0.35 * (lo_hi[0][1] - lo_hi[0][0])
    assert lo_hi[2][0] <= (b - a).mean() <= lo_hi[2][1]
    assert bootstrap_ci(a[:, None], np.ones(4000), 1000, 0) == [lo_hi[0]]  # seeded
    assert bootstrap_ci(a[:, None], np.ones(4000), 1000, 1) != [lo_hi[0]]
    # a ratio of sums: images with 1 and 3 captions; every draw of only 3-caption images averages
    # 1.0
    sums, counts = np.array([[0.0], [3.0]]), np.array([1.0, 3.0])
    lo, hi = bootstrap_ci(sums, counts, 500, 0)[0]
    assert lo == 0.0 and hi == 1.0


def test_text_to_image_interval_resamples_images_with_their_captions():
    # 300 images with 5 to 15 captions each; an image is easy or hard, and its captions hit (or
    # miss) together: they
    # share its embedding. Resampling captions as if independent is about 3x too narrow here.
    rng = np.random.default_rng(0)
    N = 300
    counts = rng.integers(5, 16, N)
    text_image = np.repeat(np.arange(N), counts)
    easy = rng.random(N) < 0.5
    hit = rng.random(len(text_image)) < np.where(easy, 0.95, 0.05)[text_image]
    t2i = hit.astype(float)[:, None]
    got = recall_intervals({'image_to_text': easy[:, None].astype(float), 'text_to_image': t2i},
                           text_image, 1000, 0)
    lo, hi = got['text_to_image'][0]
    # independently: the same seeded draws of N images, each with all its captions, and a plain loop
    # over them
    sums, g, estimates = np.bincount(text_image, t2i[:, 0], N), torch.Generator().manual_seed(0), []
    for _ in range(10):  # bootstrap_ci draws 100 resamples at a time
        for drawn in torch.randint(N, (100, N), generator=g).numpy():
            estimates.append(sums[drawn].sum() / counts[drawn].sum())
    assert [lo, hi] == pytest.approx(np.quantile(estimates, [0.025, 0.975]).tolist(), abs=1e-12)
    # the width agrees with the delta method for a ratio of per-image sums (within 10%), not with
    # captions' width
    residual = sums - t2i.mean() * counts
    delta = 2 * 1.96 * np.sqrt((residual ** 2).sum()) / N / counts.mean()
    assert hi - lo == pytest.approx(delta, rel=0.1)
    caption_lo, caption_hi = bootstrap_ci(t2i, np.ones(len(t2i)), 1000, 0)[0]
    assert caption_hi - caption_lo < 0.5 * (hi - lo)  # measured: 0.035 against 0.106
    assert lo < t2i.mean() < hi
    # image -> text sees the same draws: its per-image hits as alignment's per-image sums with count
    # 1
    assert got['image_to_text'] == bootstrap_ci(easy[:, None].astype(float), np.ones(N), 1000, 0)


def test_no_bootstrap_samples_no_intervals():
    sums = np.arange(12, dtype=float).reshape(4, 3)
    assert bootstrap_ci(sums, np.ones(4), 0, 0) == [None, None, None]
    hits = {'image_to_text': np.zeros((3, 2)), 'text_to_image': np.zeros((5, 2))}
    assert recall_intervals(hits, np.array([0, 0, 1, 2, 2]), 0, 0) == {
        'image_to_text': [None, None], 'text_to_image': [None, None]}


def test_alignment_columns_pair_the_differences():
    rng = np.random.default_rng(0)
    text_image = np.repeat(np.arange(40), rng.integers(1, 6, 40))
    sims = {'a': rng.random(len(text_image)), 'b': rng.random(len(text_image))}
    sims['twin'] = sims['b'].copy()
    differences = {'d': ('b', 'a'), 'b_minus_twin': ('b', 'twin')}
    values, ci = alignment_columns(sims, differences, text_image, 200, 0)
    assert list(values) == ['a', 'b', 'twin', 'd', 'b_minus_twin']
    np.testing.assert_array_equal(values['d'], sims['b'] - sims['a'])
    assert ci['b_minus_twin'] == [0, 0] and ci['b'] == ci['twin']  # the same draws for every column
    # a column's interval is its per-image ratio of sums, on the same seeded draws
    per_image = np.bincount(text_image, sims['a'])[:, None]
    assert ci['a'] == bootstrap_ci(per_image, np.bincount(text_image), 200, 0)[0]
    assert ci['a'][0] < sims['a'].mean() < ci['a'][1]
    assert alignment_columns(sims, differences, text_image, 0, 0)[1]['d'] is None


def test_recall_columns_difference_hits_and_intervals():
    g = torch.Generator().manual_seed(5)
    text_image = torch.arange(30).repeat_interleave(2)
    images = F.normalize(torch.randn(30, 8, generator=g), dim=-1)
    texts = F.normalize(images[text_image] + torch.randn(60, 8, generator=g), dim=-1)
    counts = {m: retrieval_counts(e, texts, text_image)[0] for m, e in
              (('a', images), ('b', images.flip(0)))}
    hits, ranks, recalls, ci = recall_columns(counts, {'d': ('b', 'a')}, (1, 5), text_image.numpy(),
                                              100, 0)
    assert recalls['a'] == recall_at_k(images, texts, text_image, (1, 5))
    for d, q in (('image_to_text', 30), ('text_to_image', 60)):
        assert hits['a'][d].shape == (q, 2) and ranks['b'][d].shape == (q,)
        np.testing.assert_array_equal(hits['d'][d], hits['b'][d] - hits['a'][d])
        for m in ('a', 'b', 'd'):
            for i, k in enumerate((1, 5)):
                lo, hi = ci[m, d, k]
                assert lo - 1e-12 <= hits[m][d][:, i].mean() <= hi + 1e-12
