import math

import pytest
import torch

import flow
from model import DiT, DiTConfig

SIGMA = 1e-4


def test_interpolate_endpoints_and_velocity_is_the_time_derivative():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    # t = 0 is noise
    torch.testing.assert_close(flow.interpolate(x0, x1, torch.zeros(4), SIGMA), x0)
    # t = 1 is data
    torch.testing.assert_close(flow.interpolate(x0, x1, torch.ones(4), SIGMA), x1 + SIGMA * x0)
    t, h = torch.rand(4, generator=g, dtype=torch.float64), 1e-6
    x0, x1 = x0.double(), x1.double()
    finite_diff = (flow.interpolate(x0, x1, t + h, SIGMA) - flow.interpolate(x0, x1, t - h,
                                                                             SIGMA)) / (2 * h)
    torch.testing.assert_close(finite_diff, flow.velocity_target(x0, x1, SIGMA))


def test_sample_t_kinds():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_t(20000, 'logit_normal', generator=g)
    assert 0 < t.min() and t.max() < 1
    assert abs(t.median().item() - 0.5) < 0.02 and t.std() < 0.25  # concentrated mid-path
    u = flow.sample_t(20000, 'uniform', generator=g)
    assert abs(u.std().item() - (1 / 12) ** 0.5) < 0.01
    with pytest.raises(ValueError, match='uniform'):
        flow.sample_t(3, 'cosine')


class Oracle(torch.nn.Module):
    """Knows the data x1: recovers x0 from x_t and returns the exact velocity; records its
    inputs."""

    def __init__(self, x1):
        super().__init__()
        self.x1, self.calls = x1, []

    def forward(self, x, t, cond, drop_cond=None):
        self.calls.append((x, t, drop_cond))
        tt = flow.expand_t(t, x)
        x0 = (x - tt * self.x1) / (1 - (1 - SIGMA) * tt)
        return flow.velocity_target(x0, self.x1, SIGMA)


def test_flow_loss_uses_the_same_noise_for_input_and_target():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(2048, 4, 3, generator=g, dtype=torch.float64)
    oracle = Oracle(x1)
    losses, t = flow.flow_losses(oracle, x1, cond=None, cond_drop_prob=0.1, sigma_min=SIGMA,
                                 generator=g)
    loss = losses.mean()
    assert loss < 1e-12  # a second noise draw for the target would give a loss near 1
    x, t, drop = oracle.calls[0]
    assert abs(drop.float().mean().item() - 0.1) < 0.03
    # no extra noise on the path: x - t*x1 is exactly a * N(0, I) noise, whose std is 1 after
    # dividing by a
    noise = (x - flow.expand_t(t, x) * x1) / (1 - (1 - SIGMA) * flow.expand_t(t, x))
    assert abs(noise.std().item() - 1.0) < 0.02


def gaussian_velocity(mu, s):
    """Exact velocity of the linear path when data ~ N(mu, s^2) per channel."""
    def v(x, t):
        t = flow.expand_t(t, x)
        a = 1 - (1 - SIGMA) * t
        var = a ** 2 + t ** 2 * s ** 2
        return mu + (t * s ** 2 - (1 - SIGMA) * a) / var * (x - t * mu)
    return v


def test_sampler_reproduces_gaussian_data_and_converges_at_its_order():
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    s = torch.tensor([0.5, 1.5, 0.1], dtype=torch.float64)
    x0 = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    exact = mu + (SIGMA ** 2 + s ** 2).sqrt() * x0  # the ODE's flow map for Gaussian data
    x = flow.sample(gaussian_velocity(mu, s), x0, steps=50, method='heun')
    assert (x - exact).abs().max() < 5e-3
    torch.testing.assert_close(x.mean(0), exact.mean(0), atol=1e-3, rtol=0)
    torch.testing.assert_close(x.std(0), exact.std(0), atol=1e-3, rtol=0)
    # and that is the data distribution
    torch.testing.assert_close(x.mean(0), mu, atol=0.03, rtol=0)
    torch.testing.assert_close(x.std(0), s, atol=0.02, rtol=0.02)

    def error(method, steps):
        return (flow.sample(gaussian_velocity(mu, s), x0[:256], steps=steps, method=method)
                - exact[:256]).abs().max()
    for method, order in (('euler', 1), ('heun', 2), ('midpoint', 2)):
        ratios = [error(method, n) / error(method, 2 * n) for n in (20, 40)]
        for r in ratios:  # at least its order (midpoint happens to do better on this field)
            assert math.log2(r) > order - 0.3, (method, ratios)
    # a shifted time grid keeps the order (a smooth change of variable), and still ends at the data
    ratios = [(flow.sample(gaussian_velocity(mu, s), x0[:256], n, 'heun', shift=3.0)
               - exact[:256]).abs().max()
              / (flow.sample(gaussian_velocity(mu, s), x0[:256], 2 * n, 'heun', shift=3.0)
                 - exact[:256]).abs().max()
              for n in (20, 40)]
    assert all(math.log2(r) > 2 - 0.3 for r in ratios), ratios


def test_time_grid_and_model_calls():
    assert flow.time_grid(4) == [0, 0.25, 0.5, 0.75, 1]
    grid = flow.time_grid(4, shift=3.0)
    assert grid[0] == 0 and grid[-1] == 1 and all(a < b for a, b in zip(grid, grid[1:]))
    # denser near the noise
    assert grid[1] == pytest.approx(0.25 / (3 - 2 * 0.25)) and grid[1] < 0.25
    assert flow.time_grid(4, shift=0.5)[1] > 0.25  # denser near the data
    assert [flow.Sampler(method=m, steps=5).model_calls()
            for m in ('euler', 'heun', 'midpoint')] == [5, 10, 10]
    # conditional and null branch
    assert flow.Sampler(method='heun', steps=5, cfg_scale=2.0).model_calls() == 20


def test_the_regression_baseline_learns_from_its_one_forward():
    """One fixed noise draw as its token input, t = 0: an all-zero input left every token alike, and
    the zero-initialized output layer then learned only the mean (the loss stayed at 1.0)."""
    from model import DiT, DiTConfig
    torch.manual_seed(0)
    model = DiT(DiTConfig(dim=32, n_layers=2, n_heads=2, in_dim=8, cond_dim=12, grid_size=2,
                          ffn_multiple_of=32))
    cond = torch.randn(16, 4, 12)
    # standardized-looking targets, a function of the condition
    x1 = torch.tanh(cond @ torch.randn(12, 8)) * 2
    x1 = (x1 - x1.mean((0, 1))) / x1.std((0, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = flow.regression_losses(model, x1, cond)[0].mean().item()
    for _ in range(150):
        loss = flow.regression_losses(model, x1, cond)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first == pytest.approx(1.0, abs=0.05) and loss.item() < 0.3 * first
    # generate() is that forward, deterministic: no sampler, no seed
    x0 = torch.randn(16, 4, 8)
    regression = flow.Sampler(method='midpoint', steps=10,
                              cfg_scale=2.0).for_objective('regression')
    assert torch.equal(regression.generate(model, cond, x0), regression.generate(model, cond, -x0))
    assert regression.model_calls() == 1


def test_sample_rejects_unknown_method_and_bad_shift():
    with pytest.raises(ValueError, match='heun'):
        flow.sample(lambda x, t: x, torch.zeros(1, 2), method='rk4')
    with pytest.raises(ValueError, match='time shift should be positive, got 0'):
        flow.sample(lambda x, t: x, torch.zeros(1, 2), shift=0)


def tiny_random_dit(**overrides):
    """Every parameter perturbed: adaLN-Zero's zeros would hide a wrong conditional or null
    branch."""
    torch.manual_seed(0)
    model = DiT(DiTConfig(**{**dict(dim=32, n_layers=1, n_heads=2, in_dim=4, cond_dim=6,
                                    grid_size=2, cross_rope=False), **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


# the second: grouped-query attention, RoPE on k, 2 blocks; cond tokens on the grid then
MODELS = [(dict(), 5), (dict(n_layers=2, n_kv_heads=1, cross_rope=True), 4)]


def guided_inputs(M):
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 4, 4, generator=g), torch.rand(3, generator=g), torch.randn(3, M, 6,
                                                                                      generator=g)


@pytest.mark.parametrize('overrides, M', MODELS)
def test_guided_scale_one_is_the_conditional_model_in_one_forward(overrides, M):
    model = tiny_random_dit(**overrides)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    x, t, cond = guided_inputs(M)
    torch.testing.assert_close(flow.guided(model, cond, 1.0)(x, t), model(x, t, cond))
    assert len(calls) == 2


@pytest.mark.parametrize('overrides, M', MODELS)
@pytest.mark.parametrize('scale', [2.0, 3.0])
def test_guided_combines_conditional_and_null_in_one_batched_forward(overrides, M, scale):
    """The old formula from plain forwards: guided's cache and null shortcut change rounding
    only."""
    model = tiny_random_dit(**overrides)
    x, t, cond = guided_inputs(M)
    v_cond = model(x, t, cond)
    v_null = model(x, t, cond, drop_cond=torch.ones(3, dtype=torch.bool))
    assert (v_cond - v_null).abs().mean() > 0.05  # the condition matters
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    torch.testing.assert_close(flow.guided(model, cond, scale)(x, t),
                               v_null + scale * (v_cond - v_null), atol=1e-5, rtol=1e-5)
    assert len(calls) == 1


@pytest.mark.parametrize('overrides, M', MODELS)
@pytest.mark.parametrize('method, scale', [('midpoint', 2.0), ('euler', 1.0), ('heun', 1.5)])
def test_sample_through_guided_is_unchanged(overrides, M, method, scale):
    model = tiny_random_dit(**overrides)
    x0, _, cond = guided_inputs(M)

    def uncached(x, t):
        v_cond = model(x, t, cond)
        v_null = model(x, t, cond, drop_cond=torch.ones(3, dtype=torch.bool))
        return v_null + scale * (v_cond - v_null)
    torch.testing.assert_close(flow.sample(flow.guided(model, cond, scale), x0, steps=4,
                                           method=method),
                               flow.sample(uncached, x0, steps=4, method=method), atol=1e-5,
                               rtol=1e-5)


def test_tiny_dit_learns_a_conditional_task():
    """Targets are a fixed function of the condition tokens: loss falls 5x, samples match the
    targets."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n, tokens, in_dim, cond_dim = 128, 16, 8, 12
    cond = torch.randn(n, tokens, cond_dim, generator=g)
    mixing = torch.randn(cond_dim, in_dim, generator=g) / cond_dim ** 0.5
    x1 = torch.tanh(cond @ mixing) * 1.5
    model = DiT(DiTConfig(dim=64, n_layers=2, n_heads=4, in_dim=in_dim, cond_dim=cond_dim,
                          grid_size=4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    # 800 steps: at 400 the sample cosine ranged 0.8-0.99 over seeds, so any change of rounding
    # flipped the check
    for step in range(800):
        idx = torch.randint(0, n, (32,), generator=g)
        loss = flow.flow_losses(model, x1[idx], cond[idx], cond_drop_prob=0.0,
                                generator=g)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < first / 5, (first, last)
    model.eval()
    x = flow.sample(flow.guided(model, cond[:32]), torch.randn(32, tokens, in_dim, generator=g),
                    steps=20)
    cosine = torch.nn.functional.cosine_similarity(x, x1[:32], dim=-1).mean()
    assert cosine > 0.9, cosine


def test_seeded_noise_depends_on_seed_and_row_only():
    together = flow.seeded_noise(3, [5, 2, 9], (4, 2))
    apart = torch.cat([flow.seeded_noise(3, [i], (4, 2)) for i in (5, 2, 9)])
    assert torch.equal(together, apart)
    assert not torch.equal(flow.seeded_noise(4, [5], (4, 2)), together[:1])
    assert flow.seed_for(3, 5) != flow.seed_for(5, 3)
