"""Flow matching on a linear path, velocity prediction.

Convention (fixed; the seed's, Lumina-Next's and facebookresearch/flow_matching's; SD3/diffusers run the
other way, never mix them): t in [0, 1], t = 0 is noise x0 ~ N(0, I), t = 1 is data x1.
    x_t = (1 - (1 - sigma_min) * t) * x0 + t * x1
    v   = d x_t / dt = x1 - (1 - sigma_min) * x0
Sampling integrates dx/dt = v(x, t) from t = 0 (x = x0 ~ N(0, I)) to t = 1.
"""
import numpy as np
import torch
import torch.nn.functional as F


def sample_t(n, kind='logit_normal', mean=0.0, std=1.0, generator=None, device=None):
    """n training times in (0, 1): logit-normal (SD3's default, more weight mid-path) or uniform."""
    if kind == 'logit_normal':
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    if kind == 'uniform':
        return torch.rand(n, generator=generator, device=device)
    raise ValueError(f"t sampling kind should be 'logit_normal' or 'uniform', got {kind!r}")


def expand_t(t, x):
    """t [B] -> [B, 1, ..., 1] to broadcast against x [B, ...]."""
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def interpolate(x0, x1, t, sigma_min=1e-4):
    """The point x_t on the path from noise x0 (t = 0) to data x1 (t = 1)."""
    t = expand_t(t, x1)
    return (1 - (1 - sigma_min) * t) * x0 + t * x1


def velocity_target(x0, x1, sigma_min=1e-4):
    """d x_t / dt: the regression target; must use the same x0 that made x_t."""
    return x1 - (1 - sigma_min) * x0


def flow_loss(model, x1, cond, cond_drop_prob=0.1, t_sampling='logit_normal', sigma_min=1e-4, generator=None):
    """MSE between predicted and true velocity at random t, with the condition dropped per sample for CFG."""
    B, device = x1.shape[0], x1.device
    x0 = torch.randn(x1.shape, generator=generator, device=device, dtype=x1.dtype)
    t = sample_t(B, t_sampling, generator=generator, device=device)
    drop = torch.rand(B, generator=generator, device=device) < cond_drop_prob
    pred = model(interpolate(x0, x1, t, sigma_min), t, cond, drop_cond=drop)
    return F.mse_loss(pred.float(), velocity_target(x0, x1, sigma_min).float())


def validation_loss(model, x0, x1, cond, sigma_min=1e-4, points=8):
    """Per-sample flow loss [B] on a fixed grid of `points` times (midpoints of equal bins): no sampling noise."""
    loss = 0
    for k in range(points):
        t = torch.full((x1.shape[0],), (k + 0.5) / points, device=x1.device)
        pred = model(interpolate(x0, x1, t, sigma_min), t, cond)
        loss = loss + F.mse_loss(pred.float(), velocity_target(x0, x1, sigma_min), reduction='none').mean((1, 2))
    return loss / points


def regress(model, cond, shape):
    """The regression baseline's prediction: one forward from the EVA tokens at t = 0, its token input one fixed
    draw of N(0, I) shared by every image (an all-zero input leaves every token alike, and the zero-initialized
    output layer then never learns: the loss stays at the mean's)."""
    fixed = torch.randn(shape[1:], generator=torch.Generator().manual_seed(0)).to(cond.device)
    return model(fixed.expand(shape), torch.zeros(shape[0], device=cond.device), cond)


def regression_loss(model, x1, cond):
    """Plain MSE to the target x1 of that one forward: the same network as the flow model, without the flow."""
    return F.mse_loss(regress(model, cond, x1.shape).float(), x1.float())


def seed_for(*key):
    """A well-mixed 64-bit generator seed for a tuple of integers, e.g. (seed, iteration, micro-batch)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0])


def seeded_noise(seed, rows, shape, device=None):
    """Starting noise [len(rows), *shape]: row i's from a generator seeded by (seed, i) alone, so it does not
    depend on the batch size, the batch order or the number of ranks."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed_for(seed, i)))
                        for i in rows]).to(device)


SAMPLERS = {'euler': 1, 'heun': 2, 'midpoint': 2}  # model calls a step


def model_calls(method, steps, cfg_scale=1.0, objective='flow'):
    """Model forwards per sample: calls a step x steps, twice under guidance (one batched forward of 2B); one for
    the regression baseline."""
    return 1 if objective == 'regression' else SAMPLERS[method] * steps * (1 if cfg_scale == 1.0 else 2)


def time_grid(steps, shift=1.0):
    """steps + 1 times from 0 to 1: uniform, warped by t / (shift - (shift - 1) t) (SD3's time shift in this
    convention), so shift > 1 packs the steps near t = 0 (noise) and shift < 1 near t = 1 (data)."""
    return [u / (shift - (shift - 1) * u) for u in (i / steps for i in range(steps + 1))]


@torch.no_grad()
def sample(velocity_fn, x0, steps=50, method='euler', shift=1.0):
    """Integrate dx/dt = velocity_fn(x, t) from t = 0 to 1 in `steps` steps on time_grid(steps, shift).

    euler: one call a step, error O(1/steps); heun (trapezoid corrector) and midpoint: two, error O(1/steps^2).
    midpoint never calls the model at t = 1, where heun's last corrector does.
    """
    if method not in SAMPLERS:
        raise ValueError(f"sampling method should be one of {', '.join(map(repr, SAMPLERS))}, got {method!r}")
    if not shift > 0:
        raise ValueError(f"time shift should be positive, got {shift!r}")
    x, grid = x0, time_grid(steps, shift)
    for t0, t1 in zip(grid[:-1], grid[1:]):
        dt, t = t1 - t0, torch.full((x.shape[0],), t0, device=x.device)
        v = velocity_fn(x, t)
        if method == 'heun':
            v = 0.5 * (v + velocity_fn(x + dt * v, t + dt))
        elif method == 'midpoint':
            v = velocity_fn(x + 0.5 * dt * v, t + 0.5 * dt)
        x = x + dt * v
    return x


def guided(model, cond, scale=1.0):
    """velocity_fn(x, t) for sample(): classifier-free guidance v_null + scale * (v_cond - v_null).

    scale 1.0 is the plain conditional model (one forward); otherwise both run as one batched forward. The condition
    is encoded once here (model.encode_cond, in the caller's autocast) and reused at every step; the null half's
    cross-attention is a constant a layer there, so it costs neither k, v nor attention.
    """
    if scale == 1.0:
        cache = model.encode_cond(cond)
        return lambda x, t: model(x, t, cond_cache=cache)
    B = cond.shape[0]
    cache = model.encode_cond(torch.cat([cond, cond]), drop_cond=torch.arange(2 * B, device=cond.device) >= B)

    def velocity_fn(x, t):
        v_cond, v_null = model(torch.cat([x, x]), torch.cat([t, t]), cond_cache=cache).chunk(2)
        return v_null + scale * (v_cond - v_null)
    return velocity_fn


@torch.no_grad()
def generate(model, cond, x0, objective='flow', steps=10, method='midpoint', shift=1.0, cfg_scale=1.0):
    """Tokens for the EVA tokens cond: sample() from x0 with guidance, or the regression baseline's one forward."""
    if objective == 'regression':
        return regress(model, cond, x0.shape)
    return sample(guided(model, cond, cfg_scale), x0, steps, method, shift)
