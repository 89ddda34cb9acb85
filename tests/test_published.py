"""published.py: the published COCO figures' lookup and R's canary, on fake recall summaries."""
import pytest

import published

KARPATHY_TEST = {'kind': 'coco_karpathy', 'split': 'karpathy_test', 'karpathy_splits': ['test']}
TARGET = {'folder': 'data/karpathy_test', 'id': 'x', 'start': 0, 'count': 5000}


def meta(source=KARPATHY_TEST, model='ViT-L-14-quickgelu', pretrained='openai'):
    return {'source': source, 'clip': {'model': model, 'pretrained': pretrained}}


def reference(offsets=None, row=('ViT-L-14', 'openai')):
    """recall_summary's R entry at the published figures of `row`, plus offsets
    {(direction, k): points}."""
    offsets = offsets or {}
    return {d: {f'recall@{k}': (v + offsets.get((d, k), 0.0)) / 100 for k, v in by_k.items()}
            for d, by_k in published.PUBLISHED[row].items()}


def test_table_holds_the_published_figures():
    vit = published.PUBLISHED[('ViT-L-14', 'openai')]
    assert vit == {'image_to_text': {1: 56.34, 5: 79.38, 10: 86.60},
                   'text_to_image': {1: 36.51, 5: 61.06, 10: 71.13}}
    eva = published.PUBLISHED[('EVA02-E-14-plus', 'laion2b_s9b_b144k')]
    assert eva == {'image_to_text': {1: 68.72, 5: 87.60, 10: 92.74},
                   'text_to_image': {1: 51.10, 5: 74.92, 10: 82.76}}
    assert published.published_row('ViT-L-14-quickgelu', 'openai') is vit  # the same architecture
    assert published.published_row('ViT-L-14', 'openai') is vit  # GELU: the canary's to catch
    assert published.published_row('ViT-L-14', 'laion2b_s32b_b82k') is None
    assert published.published_row('ViT-L-14-quickgelu', '/weights/vit-l.pt') is None
    assert 'openclip_retrieval_results.csv' in published.SOURCE
    assert 'Karpathy 5K' in published.SOURCE


def test_canary_within_threshold_records_differences(capsys):
    offsets = {('image_to_text', 1): -1.4, ('text_to_image', 10): 1.4, ('text_to_image', 5): 0.3}
    record = published.canary(reference(offsets), meta(), TARGET, 'ViT-L-14-quickgelu', 'openai')
    p = record['published']
    assert p['comparable'] is True and p['off_by_more_than_threshold'] == []
    assert p['threshold_points'] == 1.5 and p['model'] == 'ViT-L-14-quickgelu'
    assert set(p['figures']) == {'image_to_text', 'text_to_image'}
    for d, by_k in published.PUBLISHED[('ViT-L-14', 'openai')].items():
        for k, value in by_k.items():
            figure = p['figures'][d][f'recall@{k}']
            assert figure['published'] == value
            assert figure['difference'] == pytest.approx(offsets.get((d, k), 0.0), abs=1e-9)
    out = capsys.readouterr().out
    assert 'image_to_text R@1 -1.40' in out and 'text_to_image R@10 +1.40' in out
    assert 'WARNING' not in out


def test_canary_warns_beyond_threshold_on_any_figure(capsys):
    for d, k in [('image_to_text', 1), ('image_to_text', 10), ('text_to_image', 5)]:
        for offset in (1.6, -1.6):
            record = published.canary(reference({(d, k): offset}), meta(), TARGET,
                                      'ViT-L-14-quickgelu', 'openai')
            value = published.PUBLISHED[('ViT-L-14', 'openai')][d][k]
            assert record['published']['off_by_more_than_threshold'] == [
                f"{d} R@{k} {value + offset:.2f} vs {value:.2f}"]
            assert 'WARNING: R is more than 1.5 points off' in capsys.readouterr().out
    eva = meta(model='EVA02-E-14-plus', pretrained='laion2b_s9b_b144k')
    ref = reference({('text_to_image', 1): -3.0}, row=('EVA02-E-14-plus', 'laion2b_s9b_b144k'))
    record = published.canary(ref, eva, TARGET, 'EVA02-E-14-plus', 'laion2b_s9b_b144k')
    assert record['published']['off_by_more_than_threshold'] == ['text_to_image R@1 48.10 vs 51.10']
    # K values other than 1, 5, 10: only those present are compared
    off = reference({('image_to_text', 1): 2})
    partial = {d: {'recall@1': v['recall@1']} for d, v in off.items()}
    record = published.canary(partial, meta(), TARGET, 'ViT-L-14-quickgelu', 'openai')
    assert list(record['published']['figures']['text_to_image']) == ['recall@1']
    assert len(record['published']['off_by_more_than_threshold']) == 1


HOLDOUT = {**TARGET, 'start': 110000, 'count': 2266}


@pytest.mark.parametrize('source, target, models, reason', [
    ({'kind': 'coco', 'split': 'val2017'}, TARGET, (),
     'is COCO val2017; published COCO retrieval figures use another split, the Karpathy 5K test'),
    ({**KARPATHY_TEST, 'karpathy_splits': ['train', 'restval']}, HOLDOUT, (),
     "rows 110000+2266 of Karpathy split(s) ['train', 'restval'] evaluated"),
    ({**KARPATHY_TEST, 'karpathy_splits': ['val']}, TARGET, (),
     "published figures are on the Karpathy test split"),
    (KARPATHY_TEST, {**TARGET, 'count': 100}, (),
     '100 images evaluated, published figures use all 5000'),
    (KARPATHY_TEST, TARGET, ('ViT-B-32', 'openai'),
     'no published figures in published.py for the image tower ViT-B-32 / openai'),
    (KARPATHY_TEST, TARGET, ('ViT-L-14-quickgelu', ''),
     'image tower ViT-L-14-quickgelu / random init'),
])
def test_canary_not_comparable(capsys, source, target, models, reason):
    model, pretrained = models or ('ViT-L-14-quickgelu', 'openai')
    record = published.canary(reference(), meta(source, model, pretrained), target, model,
                              pretrained)
    assert record['published']['comparable'] is False and reason in record['published']['reason']
    out = capsys.readouterr().out
    assert out.startswith('eval: R is not comparable with published COCO figures: ')
    assert reason in out


def test_canary_needs_the_text_tower_of_the_row_and_stays_out_elsewhere(capsys):
    record = published.canary(reference(), meta(), TARGET, 'EVA02-E-14-plus', 'laion2b_s9b_b144k')
    assert 'with the text tower EVA02-E-14-plus' in record['published']['reason']
    for kind in ('synthetic', 'folder', 'webdataset', 'random'):  # no published figures: no key
        assert published.canary(reference(), meta({'kind': kind}), TARGET, 'x', '') == {}
    assert capsys.readouterr().out.count('not comparable') == 1
