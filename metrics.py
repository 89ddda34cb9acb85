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


# --- Task 3: distribution fidelity ---------------------------------------------------------------
def sq_distances(x, y):
    """Squared Euclidean distances [n, m] between the rows of x and y, float64, clamped at 0."""
    x, y = x.double(), y.double()
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None] - 2 * x @ y.T
    return d.clamp_(min=0)


def within_distances(x):
    """sq_distances(x, x) with an exact 0 diagonal: each point is its own nearest neighbour."""
    return sq_distances(x, x).fill_diagonal_(0)


def trace_sqrt_product(xc, yc):
    """tr((Sx^1/2 Sy Sx^1/2)^1/2) of two centred sets' covariances (n - 1 normalized): the sum of
    the square roots of the eigenvalues of Sx Sy, which are those of C C^T, C = xc yc^T, over
    (n - 1)(m - 1). Symmetric eigenvalues clamped at 0 (no complex sqrtm), through the [n, n] or
    the [d, d] product, whichever is smaller."""
    (n, d), m = xc.shape, len(yc)
    if min(n, m) < d:
        c = xc @ yc.T
        lam = torch.linalg.eigvalsh(c @ c.T if n <= m else c.T @ c)
    else:
        w, v = torch.linalg.eigh(xc.T @ xc)
        r = (v * w.clamp(min=0).sqrt()) @ v.T
        lam = torch.linalg.eigvalsh(r @ (yc.T @ yc) @ r)
    return float(lam.clamp(min=0).sqrt().sum()) / math.sqrt((n - 1) * (m - 1))


def frechet_distance(x, y):
    """Fréchet distance of Gaussians fitted to the sets x [n, d] and y [m, d] (FID's formula,
    covariances over n - 1): |mu_x - mu_y|^2 + tr(Sx + Sy - 2 (Sx^1/2 Sy Sx^1/2)^1/2). Lower is
    better; 0 for equal means and covariances."""
    x, y = torch.as_tensor(x).double(), torch.as_tensor(y).double()
    xc, yc = x - x.mean(0), y - y.mean(0)
    spread = lambda c: float((c * c).sum()) / (len(c) - 1)
    return (float(((x.mean(0) - y.mean(0)) ** 2).sum()) + spread(xc) + spread(yc)
            - 2 * trace_sqrt_product(xc, yc))


def rbf_bandwidth(real, max_rows=1000, seed=0):
    """The RBF kernel's sigma, the median heuristic: the median distance between distinct rows of
    the real set [N, d] (at most max_rows of them, drawn with seed). Fixed per representation, so
    every column is measured with one kernel."""
    real = torch.as_tensor(real).double()
    if len(real) > max_rows:
        real = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))
                    [:max_rows]]
    d = sq_distances(real, real)
    return float(d[torch.triu_indices(len(d), len(d), 1).unbind()].median().sqrt())


def rbf(d, sigma):
    """CMMD's Gaussian RBF kernel exp(-|u - v|^2 / (2 sigma^2)) of squared distances."""
    return torch.exp(-d / (2 * sigma ** 2))


def mmd2_terms(d_xx, d_yy, d_xy, sigma, own_y=None):
    """Per-point terms (a [n], b [m]) of the unbiased RBF MMD^2 of the sets x and y, from their
    squared distances: MMD^2 = a.mean() + b.mean(). Near 0 (it can go below) when x and y come from
    one distribution; lower is better. own_y: own_kernel_means(d_yy, sigma), shared by callers
    that measure many sets against one y."""
    kxy = rbf(d_xy, sigma)
    own_y = own_kernel_means(d_yy, sigma) if own_y is None else own_y
    return own_kernel_means(d_xx, sigma) - kxy.mean(1), own_y - kxy.mean(0)


def own_kernel_means(d, sigma):
    """Each point's mean RBF kernel value with the other points of its set, from the set's
    within_distances [n, n]: the within-set half of mmd2_terms."""
    k = rbf(d, sigma)
    return (k.sum(1) - k.diagonal()) / (len(k) - 1)


def mmd2(x, y, sigma):
    """Unbiased RBF MMD^2 (CMMD, Jayasumana et al. 2024) of the sets x [n, d], y [m, d]."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    a, b = mmd2_terms(within_distances(x), within_distances(y), sq_distances(x, y), sigma)
    return float(a.mean() + b.mean())


def knn_radii(d, k):
    """Each point's distance (squared) to its k-th nearest other point of its set, from the set's
    within_distances [n, n]; ValueError when k >= n."""
    if not 0 < k < len(d):
        raise ValueError(f"k-NN metrics: k={k} needs more than k points in each set, got "
                         f"{len(d)} (k should be below the number of images)")
    return d.kthvalue(k + 1, dim=1).values  # the point itself is its 0th neighbour


def knn_terms(d_rr, d_ff, d_rf, k, real_r=None):
    """k-NN precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020;
    the prdc package's definitions) per point, from squared distances real-real [n, n],
    fake-fake [m, m] and real-fake [n, m]: precision, density per generated point; recall, coverage
    per real point. Their means are the metrics, all higher is better; precision and density
    reward a collapsed generator (it sits where the real points are dense). real_r:
    knn_radii(d_rr, k), shared by callers that measure many sets against one real set."""
    real_r = knn_radii(d_rr, k) if real_r is None else real_r
    fake_r = knn_radii(d_ff, k)
    inside = d_rf < real_r[:, None]  # generated point j inside real point i's k-NN ball
    return {'precision': inside.any(0).double(), 'density': inside.sum(0).double() / k,
            'recall': (d_rf < fake_r[None]).any(1).double(),
            'coverage': (d_rf.min(1).values < real_r).double()}


def prdc(real, fake, k):
    """precision, recall, density, coverage of fake [m, d] against real [n, d]: prdc.compute_prdc's
    numbers."""
    real, fake = torch.as_tensor(real), torch.as_tensor(fake)
    terms = knn_terms(within_distances(real), within_distances(fake), sq_distances(real, fake), k)
    return {name: float(v.mean()) for name, v in terms.items()}


SIDES = {'generated': ('precision', 'density'), 'real': ('recall', 'coverage'), 'both': ('mmd2',)}


def halving_terms(real, columns, k, sigma, halvings, images, seed):
    """Set metrics of every column against the real set, in the split-half protocol: each of
    `halvings` rounds draws `images` images (0 = all), a column's points of one half against the
    real points of the other, real against real for the floor 'f'.

    real [N, P, d] and columns {key: [N, P, d]}: P points per image (1 pooled embedding, or P
    tokens). Returns per-image sums {(column, metric): [N]} of the points' knn_terms and
    mmd2_terms, their counts {side: [N]} (SIDES: which half a metric's points lie in; the ratio
    of the sums is the mean over rounds) and each round's Fréchet distances {column: [R]}.
    """
    N, P = real.shape[:2]
    n, g = min(N, images or N) // 2, torch.Generator().manual_seed(seed)
    keys = ['f', *columns]
    sums = {(c, m): torch.zeros(N, dtype=torch.float64) for c in keys for s in SIDES
            for m in SIDES[s]}
    counts = {s: torch.zeros(N, dtype=torch.float64) for s in SIDES}
    fd = {c: [] for c in keys}
    per_image = lambda v: v.view(n, P).sum(1)
    real, columns = real.double(), {c: v.double() for c, v in columns.items()}  # once, not a round
    for _ in range(halvings):
        perm = torch.randperm(N, generator=g)
        gen, ref = perm[:n], perm[n:2 * n]
        y = real[ref].flatten(0, 1)
        # the real half's statistics, shared by every column of the round
        d_yy = within_distances(y)
        real_r, own_y = knn_radii(d_yy, k), own_kernel_means(d_yy, sigma)
        for c in keys:
            x = (real if c == 'f' else columns[c])[gen].flatten(0, 1)
            d_xx, d_xy = within_distances(x), sq_distances(x, y)
            terms = knn_terms(d_yy, d_xx, d_xy.T, k, real_r)
            a, b = mmd2_terms(d_xx, d_yy, d_xy, sigma, own_y)
            for m in SIDES['generated']:
                sums[c, m].index_add_(0, gen, per_image(terms[m]))
            for m in SIDES['real']:
                sums[c, m].index_add_(0, ref, per_image(terms[m]))
            sums[c, 'mmd2'].index_add_(0, gen, per_image(a)).index_add_(0, ref, per_image(b))
            fd[c].append(frechet_distance(x, y))
        counts['generated'][gen] += P
        counts['real'][ref] += P
    counts['both'] = (counts['generated'] + counts['real']) / 2
    return sums, counts, {c: np.array(v) for c, v in fd.items()}


def spread_terms(x, real):
    """Per image [N]: each point's squared distance to its set's mean (x [N, P, d] against real):
    their sums' ratio is the total variance generated / real."""
    sq = lambda z: ((z - z.flatten(0, 1).mean(0)) ** 2).sum(-1).sum(1)
    return sq(x.double()), sq(real.double())


def conditional_mmd2(draws, true, sigma):
    """Per image [N], the unbiased RBF MMD^2 of a method's draws [N, S1, d] and true conditional
    draws [N, S2, d] (S2 >= 2): near 0 for a sampler of p(CLIP | EVA), lower is better. One draw
    is a deterministic method's point mass: its own kernel term is 1 exactly."""
    k = lambda u, v: rbf(torch.cdist(u.double(), v.double()) ** 2, sigma)
    own = lambda z: (torch.ones(len(z), dtype=torch.float64) if z.shape[1] == 1 else
                     (k(z, z).sum((1, 2)) - z.shape[1]) / (z.shape[1] * (z.shape[1] - 1)))
    return own(draws) + own(true) - 2 * k(draws, true).mean((1, 2))


def seed_spread(draws, real):
    """Per image [N]: the mean distance of a method's draws [N, S, d] (S >= 2, seeds apart) to
    their mean, and the first draw's distance to the real embedding [N, d]. Their ratio says how
    much of the distance to the real embedding is the sampler's own noise."""
    draws, real = draws.double(), real.double()
    spread = (draws - draws.mean(1, keepdim=True)).norm(dim=-1).mean(1)
    return spread, (draws[:, 0] - real).norm(dim=-1)


def percentile_ci(values):
    """95% percentile interval [lo, hi] of a metric's values over rounds."""
    return np.percentile(values, [2.5, 97.5]).tolist()


def fidelity_columns(real, columns, differences, k, sigma, halvings, images, seed, samples,
                     bootstrap_seed):
    """Task 3's set metrics of one representation: {column: {metric: {value, ci95}}} for the floor
    'f' and every column {key: [N, P, d]}, and {difference: ...} for {difference: (x, y)}, x - y.

    k-NN precision/recall/density/coverage and MMD^2 (halving_terms; ci95: bootstrap over images,
    radii and sigma held), the variance ratio over all images (bootstrap over images) and the
    Fréchet distance (ci95: percentiles over the halving rounds, each paired by round).
    """
    sums, counts, fd = halving_terms(real, columns, k, sigma, halvings, images, seed)
    keys = ['f', *columns]
    gen_var, real_var = zip(*(spread_terms(real if c == 'f' else columns[c], real) for c in keys))
    var = dict(zip(keys, gen_var))
    out = {c: {} for c in [*keys, *differences]}
    for side, metrics in SIDES.items():
        for m in metrics:
            col = {c: sums[c, m] for c in keys}
            col.update({d: col[x] - col[y] for d, (x, y) in differences.items()})
            ci = bootstrap_ci(torch.stack(list(col.values()), 1), counts[side], samples,
                              bootstrap_seed)
            for (c, v), interval in zip(col.items(), ci):
                out[c][m] = {'value': float(v.sum() / counts[side].sum()), 'ci95': interval}
    var.update({d: var[x] - var[y] for d, (x, y) in differences.items()})
    ci = bootstrap_ci(torch.stack(list(var.values()), 1), real_var[0], samples, bootstrap_seed)
    fd.update({d: fd[x] - fd[y] for d, (x, y) in differences.items()})
    for (c, v), interval in zip(var.items(), ci):
        out[c]['variance_ratio'] = {'value': float(v.sum() / real_var[0].sum()), 'ci95': interval}
        out[c]['frechet_distance'] = {'value': float(fd[c].mean()),
                                      'ci95': percentile_ci(fd[c]) if samples else None}
    return out


SET_METRICS = ('frechet_distance', 'mmd2', 'recall', 'coverage', 'variance_ratio', 'precision',
               'density')  # precision and density last: they reward collapse, never headlined
HEADLINE_SET = ('frechet_distance', 'coverage', 'recall')
# which way each Task 3 figure is better (the variance ratio's best is 1: none)
BETTER = {'frechet_distance': 'lower', 'mmd2': 'lower', 'conditional_mmd2': 'lower',
          'recall': 'higher', 'coverage': 'higher', 'precision': 'higher', 'density': 'higher'}


def conditional_block(draws, true, differences, sigma, samples, seed):
    """Conditional MMD^2 per column {column: {value, ci95}} against the true conditional draws
    (the true-samples column 't': its first half of draws against the second half), averaged
    over images with a bootstrap interval; B needs two draws or more (seed arrays)."""
    per = {}
    for c, (vec, _) in draws.items():
        if c == 't':
            h = true.shape[1] // 2
            if h >= 2:
                per[c] = conditional_mmd2(true[:, :h], true[:, h:], sigma)
        elif c != 'b' or vec.shape[1] > 1:
            per[c] = conditional_mmd2(vec, true, sigma)
    per.update({d: per[x] - per[y] for d, (x, y) in differences.items() if x in per and y in per})
    ci = bootstrap_ci(torch.stack(list(per.values()), 1), torch.ones(len(true)), samples, seed)
    return {c: {'value': float(v.mean()), 'ci95': i} for (c, v), i in zip(per.items(), ci)}


def fidelity_report(real, draws, differences, settings, samples, seed):
    """Task 3 from the real (image vectors [N, 1, E], tokens [N, 1, P, D]) and every column's draws
    {column: (vectors [N, S, E], tokens [N, S, P, D])}: set metrics on both (the first draw of
    each image), conditional MMD^2 against the true draws 't' and B's spread across seeds.
    Returns {'pooled', 'tokens': fidelity_columns' blocks, 'conditional_mmd2', 'seed_spread',
    'sigma'}."""
    out, args = {'sigma': {}}, (settings['k'],)
    for i, name in enumerate(('pooled', 'tokens')):
        flat = lambda x: x[:, 0].reshape(len(x), -1, x.shape[-1])  # [N, points, d]
        r = flat(real[i])
        out['sigma'][name] = rbf_bandwidth(r.flatten(0, 1), seed=settings['seed'])
        out[name] = fidelity_columns(r, {c: flat(d[i]) for c, d in draws.items()}, differences,
                                     *args, out['sigma'][name], settings['halvings'],
                                     settings['images'], settings['seed'], samples, seed)
    out['conditional_mmd2'] = (conditional_block(draws, draws['t'][0], differences,
                                                 out['sigma']['pooled'], samples, seed)
                               if 't' in draws else None)
    out['seed_spread'] = None
    if draws['b'][0].shape[1] > 1 if 'b' in draws else False:
        spread, dist = seed_spread(draws['b'][0], real[0][:, 0])
        ci = bootstrap_ci(spread[:, None], dist, samples, seed)[0]
        out['seed_spread'] = {'draws': draws['b'][0].shape[1],
                              'mean_spread': float(spread.mean()),
                              'mean_distance_to_real': float(dist.mean()),
                              'spread_over_distance': {'value': float(spread.sum() / dist.sum()),
                                                       'ci95': ci}}
    return out


def fidelity_rows(report, columns):
    """The printed table's rows of Task 3: set metrics on both representations, conditional
    MMD^2 (x 1e3) where it ran."""
    cell = lambda b, m, scale=1: (with_ci(scale * b[m]['value'], b[m]['ci95'] and
                                          [scale * x for x in b[m]['ci95']]) if m in b else '')
    rows = [(f"{name} {m}", {c: cell(report[name][c], m) for c in columns if c in report[name]})
            for name in ('pooled', 'tokens') for m in SET_METRICS]
    if report['conditional_mmd2']:
        rows.append(('conditional MMD2 x1e3', {c: cell(report['conditional_mmd2'], c, 1e3)
                                               for c in report['conditional_mmd2']}))
    return rows


FIDELITY_INTERVALS = ('95%: bootstrap over images (the same draws as Tasks 1-2, so B - baseline '
                      'is paired) for k-NN metrics and MMD^2 (radii and sigma held), the variance '
                      'ratio and conditional MMD^2; percentiles over the halving rounds for the '
                      'Fréchet distance (each round paired)')
