import copy
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend
from torch.utils.flop_counter import FlopCounterMode

import flow
import model as model_module
from model import SDPA_PRIORITY, DiT, DiTConfig, apply_rope, grid_positions, rope_tables
from runtime import cast_for_autocast

TINY = dict(dim=64, n_layers=2, n_heads=4, in_dim=8, cond_dim=12, grid_size=4)


def tiny_model(seed=0, **overrides):
    """A tiny DiT whose zero-initialized layers are made random, so outputs are not trivially 0."""
    torch.manual_seed(seed)
    model = DiT(DiTConfig(**{**TINY, **overrides}))
    for block in model.blocks:
        torch.nn.init.normal_(block.adaLN[-1].weight, std=0.05)
    torch.nn.init.normal_(model.final_adaLN[-1].weight, std=0.05)
    torch.nn.init.normal_(model.final_proj.weight, std=0.05)
    return model


def inputs(B=3, M=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 16, 8, generator=g), torch.rand(B, generator=g),
            torch.randn(B, M, 12, generator=g))


def test_untrained_model_outputs_exact_zeros_with_right_shape():
    model = DiT(DiTConfig(**TINY))
    x, t, cond = inputs()
    out = model(x, t, cond)
    assert out.shape == (3, 16, 8)
    assert torch.equal(out, torch.zeros_like(out))


def test_dit_large_shapes_and_ffn_width():
    cfg = DiTConfig()
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.head_dim) == (1792, 24, 28, 64)
    assert cfg.ffn_hidden == 4864  # int(2 * 4 * 1792 / 3) = 4778, rounded up to a multiple of 256
    # diffusers' other width comes from a multiplier
    assert DiTConfig(ffn_dim_multiplier=1.5).ffn_hidden == 7168
    with torch.device('meta'):
        model = DiT(cfg)
    assert 1.6e9 < model.num_params() < 1.8e9


@pytest.mark.parametrize('name, bad', [
    ('x', lambda x, t, c: (x[:, :15], t, c)),            # wrong token count
    ('x', lambda x, t, c: (x[..., :7], t, c)),           # wrong last dim
    ('cond', lambda x, t, c: (x, t, c[..., :11])),       # wrong cond dim
    ('t', lambda x, t, c: (x, t[:, None], c)),           # t shape
    ('t', lambda x, t, c: (x, t[:2], c)),                # t batch
])
def test_bad_shapes_raise_value_error_naming_expected_and_actual(name, bad):
    model = DiT(DiTConfig(**TINY))
    x, t, cond = bad(*inputs())
    with pytest.raises(ValueError, match=rf"{name} should have shape \[.*\], got \["):
        model(x, t, cond)


def test_cond_token_count_is_free_without_cross_rope():
    x, t, cond = inputs(M=5)
    assert tiny_model(cross_rope=False)(x, t, cond).shape == (3, 16, 8)
    with pytest.raises(ValueError, match=r"cond should have shape \[3, 16, 12\], got \[3, 5, 12\]"):
        tiny_model()(x, t, cond)


def test_cross_rope_lets_a_patch_find_its_own_condition_patch():
    # with RoPE in cross-attention, permuting the EVA tokens changes the output; without it nothing
    # knows positions
    x, t, cond = inputs()
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    for cross_rope, changes in ((True, True), (False, False)):
        model = tiny_model(cross_rope=cross_rope)
        for block in model.blocks:  # isolate the cross-attention path
            block.self_attn.wo.weight.data.zero_()
        same = torch.allclose(model(x, t, cond), model(x, t, cond[:, perm]), atol=1e-5)
        assert same != changes


def test_rope_score_depends_only_on_grid_offset():
    pos = grid_positions(6)
    cos, sin = rope_tables(pos, head_dim=16)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)
    rq = apply_rope(q.expand(1, 1, len(pos), 16), cos, sin)[0, 0]
    rk = apply_rope(k.expand(1, 1, len(pos), 16), cos, sin)[0, 0]
    scores = rq @ rk.T  # [L, L]
    by_offset = {}
    for i in range(len(pos)):
        for j in range(len(pos)):
            by_offset.setdefault(tuple((pos[j] - pos[i]).tolist()), []).append(scores[i, j])
    for values in by_offset.values():
        torch.testing.assert_close(torch.stack(values), values[0].expand(len(values)), atol=1e-5,
                                   rtol=1e-5)
    distinct = torch.stack([v[0] for v in by_offset.values()])
    assert distinct.std() > 0.1  # the score does depend on the offset
    # each axis moves its own channels: a row shift leaves the column channels' share unchanged
    assert not torch.allclose(by_offset[(1, 0)][0], by_offset[(0, 1)][0])


def test_rope_three_axes():
    cos, sin = rope_tables(grid_positions(3, n_axes=3), head_dim=12)
    assert cos.shape == sin.shape == (27, 12)
    with pytest.raises(ValueError, match='divisible'):
        rope_tables(grid_positions(3, n_axes=3), head_dim=8)


def test_drop_cond_uses_null_condition():
    model = tiny_model()
    x, t, cond = inputs()
    other = torch.randn_like(cond)
    drop = torch.tensor([True, False, True])
    out = model(x, t, cond, drop_cond=drop)
    out_other = model(x, t, other, drop_cond=drop)
    null = model(x, t, model.null_cond.expand_as(cond))
    # dropped rows ignore their condition
    torch.testing.assert_close(out[drop], out_other[drop])
    torch.testing.assert_close(out[drop], null[drop])
    assert not torch.allclose(out[~drop], out_other[~drop])       # kept rows use it
    torch.testing.assert_close(out[~drop], model(x, t, cond)[~drop])


def test_bf16_autocast_matches_fp32():
    model = tiny_model()
    x, t, cond = inputs()
    ref = model(x, t, cond)
    with torch.autocast('cpu', dtype=torch.bfloat16), warnings.catch_warnings():
        # e.g. a norm falling back from its fused kernel on mixed dtypes
        warnings.simplefilter('error')
        low = model(x, t, cond)
    assert low.dtype == torch.bfloat16
    err = (low.float() - ref).norm() / ref.norm()
    assert err < 2e-2, err


def test_gradient_checkpointing_gives_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = tiny_model(grad_checkpointing=ckpt)
        x, t, cond = inputs()
        model(x, t, cond).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_torch_compile_matches_eager():
    model = tiny_model()
    x, t, cond = inputs()
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x, t, cond), model(x, t, cond), atol=1e-5, rtol=1e-4)


def test_regional_compile_matches_eager_and_compiles_one_block_graph():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model()
    x, t, cond = inputs()
    ref = model(x, t, cond)
    model.compile_blocks()
    torch.testing.assert_close(model(x, t, cond), ref, atol=1e-5, rtol=1e-4)
    # embed, final and one graph for both blocks: compile time independent of depth
    assert counters['stats']['unique_graphs'] == 3
    # checkpoints keep their keys
    assert list(model.state_dict()) == list(tiny_model().state_dict())


def test_flops_per_sample_counts_matmuls():
    cfg = DiTConfig(**TINY)
    model = DiT(cfg)
    # dominant per-token matmul FLOPs must be below the analytic total, and the total below
    # 2*params*tokens + attention
    L = cfg.grid_size ** 2
    flops = model.flops_per_sample()
    token_matmul_params = sum(
        p.numel() for n, p in model.named_parameters()
        if p.dim() == 2 and 'adaLN' not in n and 't_embed' not in n and 'pool' not in n)
    attention = cfg.n_layers * (4 * L * L * cfg.dim + 4 * L * L * cfg.dim)
    per_sample = sum(p.numel() for n, p in model.named_parameters()
                     if p.dim() == 2 and ('adaLN' in n or 't_embed' in n or 'pool' in n))
    assert flops == 2 * token_matmul_params * L + attention + 2 * per_sample


def test_t_scale_multiplies_t_in_the_time_embedding():
    """The embedding reads sin/cos(t_scale * t * freqs): the same weights at t_scale 1000 and time t
    / 1000 give exactly the t_scale 1 model at time t."""
    x, t, cond = inputs()
    torch.testing.assert_close(tiny_model(t_scale=1000.0)(x, t / 1000, cond),
                               tiny_model(t_scale=1.0)(x, t, cond))
    assert not torch.allclose(tiny_model(t_scale=1000.0)(x, t, cond),
                              tiny_model(t_scale=1.0)(x, t, cond))


@pytest.mark.parametrize('grad_checkpointing', [False, True])
def test_attention_runs_with_cudnn_first_and_the_order_is_restored(grad_checkpointing):
    model = tiny_model(grad_checkpointing=grad_checkpointing)
    before, seen = torch._C._get_sdp_priority_order(), []
    model.blocks[0].self_attn.register_forward_pre_hook(
        lambda *_: seen.append(torch._C._get_sdp_priority_order()))
    model(*inputs()).square().mean().backward()
    assert len(seen) == 1 + grad_checkpointing  # checkpointing's recomputation in the backward, too
    for order in seen:
        assert [SDPBackend(b) for b in order[:4]] == SDPA_PRIORITY == [
            SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.MATH]
    assert torch._C._get_sdp_priority_order() == before


def random_model(seed=0, **overrides):
    """A tiny DiT, every parameter perturbed: adaLN-Zero's zeros would make cached == plain moot."""
    torch.manual_seed(seed)
    model = DiT(DiTConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


# float32 rounding on outputs ~1: the cached path sums in the same order, not the null
TIGHT = dict(atol=1e-5, rtol=1e-5)
VARIANTS = [dict(cross_rope=cr, qk_norm=qk,
                 n_kv_heads=kv) for cr in (True, False) for qk in (True, False)
            for kv in (None, 2)]
DROP = torch.tensor([True, False, False, True, False])


@pytest.mark.parametrize('overrides', VARIANTS)
def test_cached_forward_matches_forward(overrides):
    model = random_model(**overrides)
    x, t, cond = inputs(B=5)
    ref = model(x, t, cond)
    assert ref.abs().mean() > 0.1  # not a vacuous comparison
    torch.testing.assert_close(model(x, t, cond_cache=model.encode_cond(cond)), ref, **TIGHT)


@pytest.mark.parametrize('overrides', VARIANTS)
def test_cached_forward_matches_forward_with_dropped_rows(overrides):
    model = random_model(**overrides)
    x, t, cond = inputs(B=5)
    ref = model(x, t, cond, drop_cond=DROP)
    cache = model.encode_cond(cond, drop_cond=DROP)
    # k, v of the kept rows only: the dropped rows take the shortcut
    assert cache.blocks[0][0].shape[0] == 3
    out = model(x, t, cond_cache=cache)
    torch.testing.assert_close(out, ref, **TIGHT)
    torch.testing.assert_close(out[DROP], model(x, t, model.null_cond.expand_as(cond))[DROP],
                               **TIGHT)


def test_cache_is_reused_across_times_and_inputs():
    model = random_model(n_kv_heads=2)
    _, _, cond = inputs(B=5)
    cache = model.encode_cond(cond, DROP)
    for seed in (2, 3):
        x, t, _ = inputs(B=5, seed=seed)
        torch.testing.assert_close(model(x, t, cond_cache=cache), model(x, t, cond, DROP), **TIGHT)


def test_all_rows_dropped():
    model = random_model()
    x, t, cond = inputs(B=5)
    drop = torch.ones(5, dtype=torch.bool)
    torch.testing.assert_close(model(x, t, cond_cache=model.encode_cond(cond, drop)),
                               model(x, t, cond, drop), **TIGHT)


@pytest.mark.parametrize('overrides',
                         [dict(), dict(n_kv_heads=2), dict(n_kv_heads=1, qk_norm=False)])
def test_null_shortcut_is_the_full_attention_over_null_tokens(overrides):
    """Whatever the queries and RoPE on k, attention over M copies of a token returns wo(its v)."""
    model = random_model(**overrides)
    null_kv = model.project_cond(model.null_cond)
    h = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(0)) * 3
    rope = (model.rope_cos[:, None], model.rope_sin[:, None])
    for block in model.blocks:
        full = block.cross_attn(h, null_kv.expand(3, 16, -1), rope)
        torch.testing.assert_close(full, block.cross_attn.constant_out(null_kv).expand_as(full),
                                   **TIGHT)
    drop, cond = torch.ones(3, dtype=torch.bool), torch.randn(3, 16, 12)
    torch.testing.assert_close(model.encode_cond(cond, drop).pooled,  # and the pooled term
                               model.pool_embed(model.project_cond(cond, drop).mean(dim=1)),
                               **TIGHT)


def test_cached_forward_under_bf16_autocast():
    model = random_model(n_kv_heads=2)
    x, t, cond = inputs(B=5)
    ref = model(x, t, cond, DROP)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = model(x, t, cond_cache=model.encode_cond(cond, DROP))
    assert low.dtype == torch.bfloat16
    err = (low.float() - ref).norm() / ref.norm()
    assert err < 2e-2, err


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_weights_cast_once_sample_bit_identically_under_autocast(dtype):
    """sample.py's cast_for_autocast: the linears in the compute dtype, everything else as it was,
    and the sampler's output under autocast bit for bit the uncast model's, guided or not."""
    model = random_model(n_kv_heads=2).eval()
    cast = cast_for_autocast(copy.deepcopy(model), dtype)
    linears = {id(m.weight) for m in cast.modules() if isinstance(m, torch.nn.Linear)}
    assert linears and all((p.dtype == dtype) == (id(p) in linears or name.endswith('.bias'))
                           for name, p in cast.named_parameters())
    x, _, cond = inputs(B=5)
    for cfg_scale in (1.0, 2.0):
        with torch.autocast('cpu', dtype=dtype):
            sampler = flow.Sampler(method='midpoint', steps=3, cfg_scale=cfg_scale)
            ref, out = sampler.generate(model, cond, x), sampler.generate(cast, cond, x)
        assert torch.equal(out, ref), cfg_scale


def test_regional_compile_with_cache_matches_eager():
    torch._dynamo.reset()
    model = random_model()
    x, t, cond = inputs(B=5)
    cache = model.encode_cond(cond, DROP)
    ref, ref_plain = model(x, t, cond_cache=cache), model(x, t, cond, DROP)
    model.compile_blocks()
    # inductor fuses and reorders float32 sums: 3e-5 seen on these fully random weights
    torch.testing.assert_close(model(x, t, cond_cache=cache), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model(x, t, cond, DROP), ref_plain, atol=1e-4,
                               rtol=1e-4)  # and the plain path


def test_forward_takes_cond_or_cache():
    model = random_model()
    x, t, cond = inputs(B=5)
    cache = model.encode_cond(cond)
    for kwargs in (dict(cond=cond, cond_cache=cache), dict(),
                   dict(cond_cache=cache, drop_cond=DROP)):
        with pytest.raises(ValueError, match='either cond'):
            model(x, t, **kwargs)
    with pytest.raises(ValueError, match=r"x should have shape \[5, 16, 8\], got \[4, 16, 8\]"):
        model(x[:4], t[:4], cond_cache=cache)
    with pytest.raises(ValueError, match=r"DiT.encode_cond: cond should have shape"):
        model.encode_cond(cond[:, :15])


@pytest.mark.parametrize('overrides, M', [(dict(), 16), (dict(n_kv_heads=2, cross_rope=False), 5)])
def test_flops_skipped_per_sample_by_hand_and_by_count(overrides, M, monkeypatch):
    model = random_model(**overrides)
    cfg, L, D = model.cfg, 16, 64
    kv_width = cfg.kv_heads * cfg.head_dim
    # cond_proj, pool_embed, 2 blocks' k, v
    encoded = 2 * M * 12 * D + 2 * D * D + 2 * (2 * M * D * 2 * kv_width)
    # 2 blocks' q, scores and values, out
    cross = 2 * (2 * L * D * D + 4 * L * M * D + 2 * L * D * D)
    assert model.flops_skipped_per_sample(M) == encoded
    assert model.flops_skipped_per_sample(M, dropped=True) == encoded + cross
    # and what torch counts: the math kernel's attention matmuls count, the CPU flash kernel's not
    monkeypatch.setattr(model_module, 'SDPA_PRIORITY', [SDPBackend.MATH])
    x, t, cond = inputs(B=5, M=M)
    cache = model.encode_cond(cond, DROP)
    counts = []
    for kwargs in (dict(cond=cond, drop_cond=DROP), dict(cond_cache=cache)):
        with FlopCounterMode(display=False) as counter:
            model(x, t, **kwargs)
        counts.append(counter.get_total_flops())
    assert counts[0] == 5 * model.flops_per_sample(M)
    assert counts[0] - counts[1] == 3 * encoded + 2 * (encoded + cross)
