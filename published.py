"""Published COCO retrieval figures of CLIP models, and R's canary against them.

The figures: open_clip's docs/openclip_retrieval_results.csv, measured by CLIP_benchmark on the COCO
Karpathy 5K test split of COCO 2014 (5,000 images, about 25,000 captions), recall in percent.
eval.py's R (CLIP's own CLS embedding, clip_cls.npy, against the text tower's caption embeddings)
measures the same thing on a data folder extracted with source='coco_karpathy' and splits=(...,
'karpathy_test'). R more than THRESHOLD points off on any figure means the extraction or the text
tower differs from the reference: GELU instead of QuickGELU, tokens without ln_post, another resize
or crop, other captions. Published figures use another split than val2017: there they are not
comparable, and eval.py says so.

recall_summary.json 'published' (COCO folders only): comparable; if not, reason; if so, source,
model, pretrained, threshold_points, figures {direction: {recall@K: {published, r, difference}}} in
points (difference = R - published) and off_by_more_than_threshold, the figures the warning names.
"""
SOURCE = ("open_clip docs/openclip_retrieval_results.csv (CLIP_benchmark, COCO Karpathy 5K test "
          "split of COCO 2014)")
THRESHOLD = 1.5  # points of recall@K, on any of the six figures
KARPATHY_TEST_IMAGES = 5000
# (open_clip architecture, pretrained tag) -> {direction: {K: recall@K in percent}}
PUBLISHED = {
    ('ViT-L-14', 'openai'): {'image_to_text': {1: 56.34, 5: 79.38, 10: 86.60},
                             'text_to_image': {1: 36.51, 5: 61.06, 10: 71.13}},
    ('EVA02-E-14-plus', 'laion2b_s9b_b144k'): {'image_to_text': {1: 68.72, 5: 87.60, 10: 92.74},
                                               'text_to_image': {1: 51.10, 5: 74.92, 10: 82.76}},
}


def published_row(model, pretrained):
    """The published figures of an open_clip model and weights, or None. '-quickgelu' names the same
    architecture: which activation a model builds is what the canary tests."""
    return PUBLISHED.get((model.removesuffix('-quickgelu'), pretrained or ''))


def not_comparable(reason):
    print(f"eval: R is not comparable with published COCO figures: {reason}")
    return {'published': {'comparable': False, 'reason': reason, 'source': SOURCE}}


def canary(reference, meta, target, clip_model, clip_pretrained, threshold=THRESHOLD):
    """R's recall beside the published figures, for recall_summary.json: {} where the evaluated
    folder is not COCO; {'published': {...}} with the difference per figure (R - published, in
    points) where the model, its weights and the split are a known row, else with why not. Prints
    the comparison and warns when R is more than threshold points off on any figure. reference:
    recall_summary's R entry (recall@K in [0, 1] per direction)."""
    source = meta.get('source', {})
    if source.get('kind') == 'coco':
        return not_comparable(f"{target['folder']} is COCO {source.get('split')}; published COCO "
                              f"retrieval figures use another split, the Karpathy 5K test split of "
                              f"COCO 2014 (extract.py --source=coco_karpathy, karpathy_test)")
    if source.get('kind') != 'coco_karpathy':
        return {}
    if source.get('karpathy_splits') != ['test'] or target['start'] != 0:
        where = f"rows {target['start']}+{target['count']} of " if target['start'] else ''
        return not_comparable(f"{where}Karpathy split(s) {source.get('karpathy_splits')} "
                              f"evaluated; published figures are on the Karpathy test split "
                              f"('karpathy_test')")
    if target['count'] != KARPATHY_TEST_IMAGES:
        return not_comparable(f"{target['count']} images evaluated, published figures use all "
                              f"{KARPATHY_TEST_IMAGES} of the Karpathy test split")
    extracted = (meta['clip']['model'], meta['clip']['pretrained'] or '')
    row = published_row(*extracted)
    if row is None or published_row(clip_model, clip_pretrained) is not row:
        return not_comparable(f"no published figures in published.py for the image tower "
                              f"{extracted[0]} / {extracted[1] or 'random init'} with the text "
                              f"tower {clip_model} / {clip_pretrained or 'random init'}")
    figures, off = {}, []
    for direction, by_k in row.items():
        for k, value in by_k.items():
            ours = reference[direction].get(f'recall@{k}')
            if ours is None:  # k_values without this K
                continue
            difference = 100 * ours - value
            figures.setdefault(direction, {})[f'recall@{k}'] = {
                'published': value, 'r': 100 * ours, 'difference': difference}
            if abs(difference) > threshold:
                off.append(f"{direction} R@{k} {100 * ours:.2f} vs {value:.2f}")
    print(f"eval: R beside published figures ({SOURCE}), R - published in points: "
          + ', '.join(f"{d} R@{k.removeprefix('recall@')} {f['difference']:+.2f}"
                      for d, fs in figures.items() for k, f in fs.items()))
    if off:
        print(f"eval: WARNING: R is more than {threshold} points off the published figures "
              f"({'; '.join(off)}): the extraction or the text tower differs from the reference "
              f"(GELU instead of QuickGELU, tokens without ln_post, another resize or crop, other "
              f"captions)")
    return {'published': {'comparable': True, 'source': SOURCE, 'model': extracted[0],
                          'pretrained': extracted[1], 'threshold_points': threshold,
                          'figures': figures, 'off_by_more_than_threshold': off}}
