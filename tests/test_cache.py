"""DiT.encode_cond's cache and the null-condition shortcut: the same velocities as the plain forward."""
import pytest
import torch

import flow
from model import DiT, DiTConfig

TINY = dict(dim=64, n_layers=2, n_heads=4, in_dim=8, cond_dim=12, grid_size=4)
TIGHT = dict(atol=1e-5, rtol=1e-5)  # float32 rounding (outputs ~1); the null shortcut sums in another order


def random_model(seed=0, **overrides):
    """A tiny DiT with every parameter perturbed: adaLN-Zero's zeros would make cached == uncached vacuous."""
    torch.manual_seed(seed)
    model = DiT(DiTConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def inputs(B=5, M=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 16, 8, generator=g), torch.rand(B, generator=g), torch.randn(B, M, 12, generator=g)


VARIANTS = [dict(cross_rope=cr, qk_norm=qk, n_kv_heads=kv) for cr in (True, False) for qk in (True, False)
            for kv in (None, 2)]


@pytest.mark.parametrize('overrides', VARIANTS)
def test_cached_forward_matches_forward(overrides):
    model = random_model(**overrides)
    x, t, cond = inputs()
    ref = model(x, t, cond)
    assert ref.abs().mean() > 0.1  # not a vacuous comparison
    torch.testing.assert_close(model(x, t, cond_cache=model.encode_cond(cond)), ref, **TIGHT)


@pytest.mark.parametrize('overrides', VARIANTS)
def test_cached_forward_matches_forward_with_dropped_rows(overrides):
    model = random_model(**overrides)
    x, t, cond = inputs()
    drop = torch.tensor([True, False, False, True, False])
    ref = model(x, t, cond, drop_cond=drop)
    cache = model.encode_cond(cond, drop_cond=drop)
    assert cache.blocks[0][0].shape[0] == 3  # k, v of the kept rows only
    torch.testing.assert_close(model(x, t, cond_cache=cache), ref, **TIGHT)
    # and the dropped rows are the null model's
    torch.testing.assert_close(model(x, t, cond_cache=cache)[drop], model(x, t, model.null_cond.expand_as(cond))[drop],
                               **TIGHT)


def test_cache_is_reused_across_times_and_inputs():
    model = random_model(n_kv_heads=2)
    x, t, cond = inputs()
    drop = torch.tensor([False, True, False, True, True])
    cache = model.encode_cond(cond, drop)
    for seed in (2, 3):
        x2, t2, _ = inputs(seed=seed)
        torch.testing.assert_close(model(x2, t2, cond_cache=cache), model(x2, t2, cond, drop), **TIGHT)


@pytest.mark.parametrize('overrides', [dict(), dict(n_kv_heads=2), dict(n_kv_heads=1, qk_norm=False)])
def test_null_shortcut_is_the_full_attention_over_null_tokens(overrides):
    """Whatever the queries and the RoPE on k, attention over M copies of one token returns wo of its v."""
    model = random_model(**overrides)
    null_kv = model.project_cond(model.null_cond)
    kv = null_kv.expand(3, 16, -1)
    h = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(0)) * 3
    rope = (model.rope_cos[:, None], model.rope_sin[:, None])
    for block in model.blocks:
        attn = block.cross_attn
        full = attn(h, kv, rope)
        torch.testing.assert_close(full, attn.constant_out(null_kv).expand_as(full), **TIGHT)
    # the pooled term too
    drop = torch.ones(3, dtype=torch.bool)
    cond = torch.randn(3, 16, 12)
    torch.testing.assert_close(model.encode_cond(cond, drop).pooled,
                               model.pool_embed(model.project_cond(cond, drop).mean(dim=1)), **TIGHT)


def test_all_rows_dropped():
    model = random_model()
    x, t, cond = inputs()
    drop = torch.ones(5, dtype=torch.bool)
    torch.testing.assert_close(model(x, t, cond_cache=model.encode_cond(cond, drop)), model(x, t, cond, drop), **TIGHT)


@pytest.mark.parametrize('scale', [1.0, 2.0])
def test_guided_matches_the_plain_formula(scale):
    model = random_model(n_kv_heads=2)
    x, t, cond = inputs()
    v_cond = model(x, t, cond)
    v_null = model(x, t, cond, drop_cond=torch.ones(5, dtype=torch.bool))
    torch.testing.assert_close(flow.guided(model, cond, scale)(x, t), v_null + scale * (v_cond - v_null), **TIGHT)


@pytest.mark.parametrize('method, scale', [('midpoint', 2.0), ('euler', 1.0), ('heun', 1.5)])
def test_sample_through_guided_is_unchanged(method, scale):
    model = random_model()
    x0, _, cond = inputs()

    def uncached(x, t):
        v_cond = model(x, t, cond)
        v_null = model(x, t, cond, drop_cond=torch.ones(5, dtype=torch.bool))
        return v_null + scale * (v_cond - v_null)
    ref = flow.sample(uncached, x0, steps=4, method=method)
    torch.testing.assert_close(flow.sample(flow.guided(model, cond, scale), x0, steps=4, method=method), ref,
                               atol=1e-5, rtol=1e-5)


def test_cached_forward_under_bf16_autocast():
    model = random_model(n_kv_heads=2)
    x, t, cond = inputs()
    drop = torch.tensor([True, False, False, True, False])
    ref = model(x, t, cond, drop)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = model(x, t, cond_cache=model.encode_cond(cond, drop))
    assert low.dtype == torch.bfloat16
    err = (low.float() - ref).norm() / ref.norm()
    assert err < 2e-2, err


def test_regional_compile_with_cache_matches_eager():
    torch._dynamo.reset()
    model = random_model()
    x, t, cond = inputs()
    drop = torch.tensor([True, False, False, True, False])
    cache = model.encode_cond(cond, drop)
    ref, ref_plain = model(x, t, cond_cache=cache), model(x, t, cond, drop)
    model.compile_blocks()
    # inductor fuses and reorders float32 sums: 3e-5 seen on these fully random weights
    torch.testing.assert_close(model(x, t, cond_cache=cache), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model(x, t, cond, drop), ref_plain, atol=1e-4, rtol=1e-4)  # the plain path still


def test_forward_takes_cond_or_cache():
    model = random_model()
    x, t, cond = inputs()
    cache = model.encode_cond(cond)
    for kwargs in (dict(cond=cond, cond_cache=cache), dict(), dict(cond_cache=cache, drop_cond=torch.zeros(5).bool())):
        with pytest.raises(ValueError, match='either cond'):
            model(x, t, **kwargs)
    with pytest.raises(ValueError, match=r"x should have shape \[5, 16, 8\], got \[4, 16, 8\]"):
        model(x[:4], t[:4], cond_cache=cache)
    with pytest.raises(ValueError, match=r"DiT.encode_cond: cond should have shape"):
        model.encode_cond(cond[:, :15])


def test_flops_skipped_by_the_cache_hand_count():
    model = DiT(DiTConfig(**TINY))  # L = M = 16, D = 64, head_dim 16, 4 kv heads: k, v width 128 in all
    cond_proj, pool, cross_kv = 2 * 16 * 12 * 64, 2 * 64 * 64, 2 * 16 * 64 * 128
    assert model.flops_skipped_per_sample() == cond_proj + pool + 2 * cross_kv
    q_and_out, scores_values = 2 * (2 * 16 * 64 * 64), 2 * (2 * 16 * 16 * 64)
    assert model.flops_skipped_per_sample(dropped=True) == cond_proj + pool + 2 * (cross_kv + q_and_out + scores_values)
    gqa = DiT(DiTConfig(**TINY, n_kv_heads=1))  # k, v width 32
    assert gqa.flops_skipped_per_sample(cond_tokens=5) == 2 * 5 * 12 * 64 + pool + 2 * (2 * 5 * 64 * 32)
    assert model.flops_skipped_per_sample(dropped=True) < model.flops_per_sample()
