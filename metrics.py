"""The metrics eval.py reports, as plain functions of embeddings, tokens and per-query values.

Nothing here reads a file or a config: `from metrics import recall_at_k` works anywhere.

Task 2, retrieval (higher is better):
  recall@K     image -> text: the share of images with one of their captions in their top K;
               text -> image: the share of captions whose image is in their top K. In [0, 1].
  median_rank  1-based rank of the first correct item, the median over queries (lower is better).
  Ties: every score, the query's own and its competitors', is read from one score matrix
  (retrieval_counts), so equal embeddings score exactly equal. Competitors whose embedding equals
  the query's best correct item stand in a random order with it and recall is the expectation
  over that order: a constant embedding scores exactly chance (K/N text -> image), never above.
  A different embedding with exactly the same score counts against the query. The seed's rule
  (ties for the query, the own score from a separate product) gave 1,000 identical images 65%
  text -> image R@1.
Task 1, alignment (higher is better):
  mean_cosine_similarity  cosine of every image-caption pair, averaged over pairs (cosine_stats);
  correlation             Pearson correlation of two methods' per-pair cosines (1: same ordering).
Token fidelity, per image against the real tokens (token_fidelity, fidelity_summary):
  token_cosine(_standardized)  per-token cosine, raw or after per-channel standardization (higher
                               is better; standardized, per-channel offsets no longer dominate);
  image_vector_cosine          cosine of the image vectors (higher is better);
  mse_standardized             mean squared error of the standardized tokens (lower is better).
Intervals: bootstrap_ci gives 95% percentile intervals of ratio estimates over resampled units. The
unit is an image with all its captions, in both recall directions and for alignment: an image's
captions share its embedding, so resampling captions gives intervals that are too narrow. The same
seed draws the same units for every column, so a difference column (B - A) gets a paired interval.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

SCORE_CHUNK_ELEMENTS = 1 << 24  # scores per image chunk (64 MB of float32; three buffers at once)
DIRECTIONS = ('image_to_text', 'text_to_image')
RESAMPLED = ('images, each with all its captions (alignment means and both recall directions; '
             'text->image recall as the ratio of the drawn images\' caption hit sums to their '
             'caption counts); the same draws for every method and task, so B - A and B - '
             'baseline are paired')
TIES = ('never for the query: competitors whose embedding equals the best correct item\'s stand '
        'in a uniformly random order with it and recall is the expectation over that order (a '
        'constant embedding scores exactly chance); a different embedding with exactly the same '
        'score counts against the query')


def duplicate_groups(emb):
    """Group id of every row [R]: rows with exactly equal embeddings share one (scores tie)."""
    return torch.unique(emb, dim=0, return_inverse=True)[1]


def check_retrieval_inputs(image_emb, text_emb, text_image):
    """Shapes [N, D], [T, D], [T], every caption's image row in [0, N), every image captioned."""
    (N, D), (T, D_text) = image_emb.shape, text_emb.shape
    if D != D_text or text_image.shape != (T,):
        raise ValueError(f"recall: image_emb [N, D], text_emb [T, D] and text_image [T] expected, "
                         f"got {list(image_emb.shape)}, {list(text_emb.shape)}, "
                         f"{list(text_image.shape)}")
    if T == 0 or text_image.min() < 0 or text_image.max() >= N:
        raise ValueError(f"recall: text_image should hold image rows in [0, {N}), got "
                         f"{text_image.unique()[:10].tolist() if T else 'no captions'}")
    captions_per_image = torch.bincount(text_image, minlength=N)
    if (captions_per_image == 0).any():
        missing = torch.nonzero(captions_per_image == 0).flatten()
        raise ValueError(f"recall: {len(missing)} of {N} images have no caption "
                         f"(rows {missing[:10].tolist()})")


def caption_blocks(text_image, N, chunk_images):
    """How retrieval_counts lays the captions out: n image chunks of r images each and w caption
    rows per chunk; order sorts the captions by image, owner [T] and chunk [T] are each sorted
    caption's image and chunk, row [T] its row in the padded [n * w] layout."""
    T, device = len(text_image), text_image.device
    n = -(-N // (chunk_images or max(1, SCORE_CHUNK_ELEMENTS // T)))
    # equal chunks of a multiple of 16 images: a BLAS can take a GEMM's last few columns through
    # another kernel (seen with MKL at 5-7 and 9-11 columns), and equal images would differ
    r = -(-N // n)
    r = -(-r // 16) * 16
    n = -(-N // r)
    order = torch.argsort(text_image, stable=True)
    owner = text_image[order]  # captions grouped by image, so by chunk
    chunk = owner // r
    per_chunk = torch.bincount(chunk, minlength=n)
    w = int(per_chunk.max())  # caption rows per chunk, padded to the fullest
    first = torch.cumsum(per_chunk, 0) - per_chunk  # each chunk's first sorted caption
    row = chunk * w + torch.arange(T, device=device) - first[chunk]
    return n, r, w, order, owner, chunk, row


def retrieval_counts(image_emb, text_emb, text_image, chunk_images=None, text_groups=None):
    """What decides every query's rank, counted on one score matrix S = text_emb @ image_emb.T.

    Returns ({'image_to_text': (greater, ties, correct) per image [N], 'text_to_image': (greater,
    ties, correct) per caption [T]}, pair): `ties` competitors tie with the query's best correct
    item and `correct` of its correct items do (a caption's image: 1), because their embeddings
    equal its embedding; `greater` competitors score above it, or exactly level with a different
    embedding (a float coincidence: it counts against the query); pair [T] is each caption's score
    with its own image.
    S is computed once, in blocks that are GEMMs of one shape (rounding can depend on a GEMM's
    shape; one shape makes equal embeddings score exactly equal), and every score, a query's own
    and its competitors', is read from it: one comparison per score and direction. Block (k, c)
    scores the captions of image chunk k against image chunk c, so the diagonal blocks hold every
    own pair: they go first, as text -> image needs each caption's own score before it can compare.
    text_groups: duplicate_groups(text_emb), to share it between calls.
    """
    text_emb = torch.as_tensor(text_emb).float()
    device = text_emb.device
    image_emb = torch.as_tensor(image_emb).float().to(device)
    text_image = torch.as_tensor(text_image).to(device).long()
    check_retrieval_inputs(image_emb, text_emb, text_image)
    (N, D), T = image_emb.shape, len(text_emb)
    text_groups = (duplicate_groups(text_emb) if text_groups is None
                   else torch.as_tensor(text_groups).to(device))
    image_groups = duplicate_groups(image_emb)
    n, r, w, order, owner, chunk, row = caption_blocks(text_image, N, chunk_images)
    source = torch.zeros(n * w, dtype=torch.long, device=device)
    source[row] = order
    X = text_emb.index_select(0, source)
    if n * w > T:  # padding rows: NaN compares false with everything, so they are never counted
        X[torch.ones(n * w, dtype=torch.bool, device=device).index_fill_(0, row, False)] = math.nan
    X = X.view(n, w, D)
    E = image_emb.new_full((n * r, D), math.nan)
    E[:N] = image_emb
    diagonal = torch.bmm(X, E.view(n, r, D).transpose(1, 2))  # every caption against its own chunk
    pair = torch.full((n * w,), math.nan, device=device)
    pair[row] = diagonal[chunk, row - chunk * w, owner - chunk * r]
    best = torch.full((N,), -math.inf, device=device).scatter_reduce(0, owner, pair[row], 'amax')
    # ties are exact between equal embeddings: an image's best captions tie with every caption
    # equal to one of them
    at_best = pair[row] == best[owner]
    best_group = torch.unique(owner[at_best] * T + text_groups[order][at_best])
    tied = torch.zeros(N, dtype=torch.long, device=device).index_add_(
        0, best_group // T, torch.bincount(text_groups, minlength=T)[best_group % T])
    correct = torch.bincount(owner[at_best], minlength=N)
    # images equal to each image, itself included
    own_group = torch.bincount(image_groups, minlength=N)[image_groups]
    t2i, i2t = torch.zeros(n * w, device=device), torch.zeros(n, r, device=device)
    S, H = torch.empty_like(diagonal), torch.empty_like(diagonal)
    p, b = pair.view(n, w, 1), F.pad(best, (0, n * r - N), value=math.nan).view(n, r)
    for c in range(n):
        Ec = E[c * r:(c + 1) * r].T
        for ks in (slice(0, c), slice(c + 1, n)):  # this image chunk's other blocks, of one shape
            torch.bmm(X[ks], Ec.expand(ks.stop - ks.start, D, r), out=S[ks])
        S[c] = diagonal[c]
        t2i += torch.ge(S, p, out=H).view(-1, r).sum(1)  # into floats: faster than summing bools
        i2t[c] = torch.ge(S, b[c], out=H).view(-1, r).sum(0)
    t2i = t2i[row]
    back = torch.empty_like(order)
    back[order] = torch.arange(T, device=device)  # sorted caption -> the caller's caption order
    own_ties = own_group[owner][back]
    i2t = i2t.flatten()[:N].long()
    return {'image_to_text': (i2t - tied, tied - correct, correct),
            'text_to_image': (t2i[back].long() - own_ties, own_ties - 1,
                              torch.ones_like(own_ties))}, pair[row][back]


def hit_rates(greater, ties, correct, k_values):
    """[Q, len(k_values)] float64: the chance that a query has a correct item in its top K when its
    tied competitors and tied correct items stand in a uniformly random order below the `greater`
    ones."""
    g, e, c = (torch.as_tensor(x).double()[:, None] for x in (greater, ties, correct))
    j = torch.arange(max(k_values), dtype=torch.float64, device=g.device)
    # P(the first j places of the tied group all go to competitors), j = 0 .. max K
    miss = torch.cat([torch.ones_like(g),
                      torch.cumprod((e - j).clamp(min=0) / (e + c - j).clamp(min=1), 1)], 1)
    places = (torch.tensor(k_values, dtype=torch.float64, device=g.device) - g).clamp(min=0).long()
    return 1 - miss.gather(1, places)


def expected_ranks(greater, ties, correct):
    """0-based rank of the first correct item, expected over the random order of the tied ones."""
    return greater.double() + ties.double() / (correct.double() + 1)


def pair_scores(image_emb, text_emb, text_image):
    """Dot product of every caption with its own image: [T]; Task 1's per-pair cosines for unit
    vectors."""
    return torch.einsum('td,td->t', image_emb.index_select(0, text_image), text_emb)


def recall_at_k(image_emb, text_emb, text_image, k_values=(1, 5, 10), chunk_images=None):
    """Recall@K, fractions in [0, 1], for any embeddings (L2-normalize them first for cosine
    retrieval).

    image_emb [N, D], text_emb [T, D], text_image [T] the image row of each caption (images may
    have any number of captions, at least one). Image -> text: an image is a hit when any of its
    captions is in its top K. Text -> image: a caption is a hit when its image is in its top K.
    Competitors equal to a query's best correct item stand in a random order with it, and recall
    is the expectation (a constant embedding scores exactly chance); a different embedding at
    exactly the same score counts against the query (see retrieval_counts).
    Returns {'image_to_text': {k: r}, 'text_to_image': {k: r}}.
    """
    counts, _ = retrieval_counts(image_emb, text_emb, text_image, chunk_images)
    return {d: dict(zip(k_values, hit_rates(*c, k_values).mean(0).tolist()))
            for d, c in counts.items()}


def bootstrap_ci(sums, counts, samples, seed, batch=100):
    """95% percentile intervals [M, 2] of sum(sums) / sum(counts) over units drawn with
    replacement, `samples` times.

    Per unit (an image: its image->text hit rates and 1, or its captions' cosine or text->image
    hit sums and their count), sums [U, M] and counts [U]. Every column, and every call with the
    same seed and U, sees the same draws, so a column of B - A gives a paired interval.
    No samples, no intervals: None for every column.
    """
    sums = torch.as_tensor(sums, dtype=torch.float64)
    if not samples:
        return [None] * sums.shape[1]
    counts = torch.as_tensor(counts, dtype=torch.float64)
    U, g = len(counts), torch.Generator().manual_seed(seed)
    ones, estimates = torch.ones(batch, U, dtype=torch.float64), []
    for s in range(0, samples, batch):
        b = min(batch, samples - s)
        draws = torch.randint(U, (b, U), generator=g)
        # times each unit is drawn
        weights = torch.zeros(b, U, dtype=torch.float64).scatter_add_(1, draws, ones[:b])
        estimates.append((weights @ sums) / (weights @ counts)[:, None])
    bounds = torch.tensor([0.025, 0.975], dtype=torch.float64)
    return torch.quantile(torch.cat(estimates), bounds, dim=0).T.tolist()


def image_sums(values, text_image, N):
    """Per-image sums [N, M] of per-caption values [T, M]: an image with all its captions is one
    bootstrap unit."""
    values = torch.as_tensor(values, dtype=torch.float64)
    out = torch.zeros(N, values.shape[1], dtype=torch.float64)
    return out.index_add_(0, torch.as_tensor(text_image), values)


def recall_intervals(hits, text_image, samples, seed):
    """{direction: [M, 2]} 95% intervals of recall columns from per-query hit rates
    {'image_to_text': [N, M], 'text_to_image': [T, M]}, both resampling images, each with all its
    captions: alignment's draws. A caption is not independent of its image's other captions (they
    share its embedding), so resampling captions is too narrow."""
    N = len(hits['image_to_text'])
    units = {'image_to_text': (hits['image_to_text'], np.ones(N)),
             'text_to_image': (image_sums(hits['text_to_image'], text_image, N),
                               np.bincount(text_image, minlength=N))}
    return {d: bootstrap_ci(sums, counts, samples, seed) for d, (sums, counts) in units.items()}


def alignment_columns(sims, differences, text_image, samples, seed):
    """Per-pair cosines of every column {column: [T]} and of the differences {column: (x, y)},
    x - y on the same pairs; and each column's mean's 95% interval (None without samples),
    resampling images with all their captions on the same draws, so differences are paired."""
    values = {**sims, **{d: sims[x] - sims[y] for d, (x, y) in differences.items()}}
    counts = np.bincount(text_image)
    sums = image_sums(np.stack(list(values.values()), 1), text_image, len(counts)).numpy()
    return values, dict(zip(values, bootstrap_ci(sums, counts, samples, seed)))


def recall_columns(counts, differences, k_values, text_image, samples, seed):
    """Recall of every column from retrieval_counts' counts {column: {direction: (greater, ties,
    correct)}}: per-query hit rates {column: {direction: [Q, K]}} (and of the differences
    {column: (x, y)}, x - y per query), expected 0-based ranks, recall@K {column: {direction: {k:
    r}}} and 95% intervals {(column, direction, k): [lo, hi] or None}, paired as in
    recall_intervals."""
    hits, ranks, recalls = {}, {}, {}
    for m, by_direction in counts.items():
        hits[m] = {d: hit_rates(*c, k_values).cpu().numpy() for d, c in by_direction.items()}
        ranks[m] = {d: expected_ranks(*c).cpu().numpy() for d, c in by_direction.items()}
        recalls[m] = {d: dict(zip(k_values, h.mean(0).tolist())) for d, h in hits[m].items()}
    hits.update({c: {d: hits[x][d] - hits[y][d] for d in DIRECTIONS}
                 for c, (x, y) in differences.items()})
    # [queries, columns x K]
    per_query = {d: np.concatenate([h[d] for h in hits.values()], 1) for d in DIRECTIONS}
    flat = recall_intervals(per_query, text_image, samples, seed)
    ci = {(m, d, k): flat[d][j * len(k_values) + i] for d in DIRECTIONS
          for j, m in enumerate(hits) for i, k in enumerate(k_values)}
    return hits, ranks, recalls, ci


def recall_difference(recalls, ci, x, y, c, k_values):
    """Recall@K of x - y ({column: {direction: {k: recall}}}; c the difference column), its paired
    interval (ci[c, direction, k]) and relative change (percent of y's), in every direction."""
    out = {}
    for d in DIRECTIONS:
        diff = {k: recalls[x][d][k] - recalls[y][d][k] for k in k_values}
        out[d] = {**{f"recall@{k}_difference": diff[k] for k in k_values},
                  **{f"recall@{k}_difference_ci95": ci[c, d, k] for k in k_values},
                  **{f"recall@{k}_relative_change": (100 * diff[k] / recalls[y][d][k]
                                                     if recalls[y][d][k] > 0 else None)
                     for k in k_values}}
    return out


def with_ci(x, ci, difference=False, percent=False):
    """A metric with its interval as a table cell: '23.6% [20.8, 26.4]', '0.2310 [0.2281, 0.2340]';
    differences signed, in points for recall."""
    scale, spec = (100, '.1f') if percent else (1, '.4f')
    spec = '+' + spec if difference else spec
    cell = f"{scale * x:{spec}}" + ('%' if percent and not difference else '')
    return cell + (f" [{scale * ci[0]:{spec}}, {scale * ci[1]:{spec}}]" if ci else '')


def cosine_stats(sims):
    """Task 1's statistics of per-pair cosines."""
    return {'mean_cosine_similarity': float(sims.mean()),
            'std_cosine_similarity': float(sims.std()),
            'min_cosine_similarity': float(sims.min()), 'max_cosine_similarity': float(sims.max())}


def pearson(x, y):
    """Pearson correlation; None where either side is constant."""
    x, y = x.astype(np.float64) - x.mean(), y.astype(np.float64) - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else None


def token_fidelity(tokens, real, vec, a, mean, std):
    """How close tokens [B or 1, L, C] (image vectors vec) come to the real ones (image vectors a),
    per image [B] (numpy): standardized with mean/std as the DiT sees them, per-channel offsets no
    longer dominate."""
    z, z_real = (tokens - mean) / std, (real - mean) / std
    return {'token_cosine': F.cosine_similarity(tokens, real, dim=-1).mean(1).cpu().numpy(),
            'token_cosine_standardized':
                F.cosine_similarity(z, z_real, dim=-1).mean(1).cpu().numpy(),
            'image_vector_cosine': (a * vec).sum(1).cpu().numpy(),
            'mse_standardized': ((z - z_real) ** 2).mean((1, 2)).cpu().numpy()}


def fidelity_summary(per_image):
    """Mean and std over images of token_fidelity's values; the mean alone for the MSE."""
    out = {f'{k}_{stat}': float(getattr(v, stat)()) for k, v in per_image.items()
           for stat in ('mean', 'std') if k != 'mse_standardized'}
    return {**out, 'mse_standardized': float(per_image['mse_standardized'].mean())}
