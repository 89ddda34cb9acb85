"""Flow matching on a linear path, velocity prediction.

Convention (fixed; the seed's, Lumina-Next's and facebookresearch/flow_matching's; SD3/diffusers run
the other way, never mix them): t in [0, 1], t = 0 is noise x0 ~ N(0, I), t = 1 is data x1.
    x_t = (1 - (1 - sigma_min) * t) * x0 + t * x1
    v   = d x_t / dt = x1 - (1 - sigma_min) * x0
Sampling integrates dx/dt = v(x, t) from t = 0 (x = x0 ~ N(0, I)) to t = 1.
"""
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

T_SAMPLINGS = ('logit_normal', 'uniform')  # sample_t's kinds
REGRESSION = 'regression'  # the baseline's objective, and its Sampler's method: one forward
OBJECTIVES = ('flow', REGRESSION)  # train.py's: flow_losses, or regression_losses (regress)


def sample_t(n, kind='logit_normal', mean=0.0, std=1.0, generator=None, device=None):
    """n training times in (0, 1): logit-normal (SD3's default, more weight mid-path: sigmoid of
    N(mean, std)) or uniform."""
    if kind == 'logit_normal':
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    if kind == 'uniform':
        return torch.rand(n, generator=generator, device=device)
    raise ValueError(f"t sampling kind should be one of {', '.join(map(repr, T_SAMPLINGS))}, "
                     f"got {kind!r}")


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


def flow_losses(model, x1, cond, cond_drop_prob=0.1, t_sampling='logit_normal', t_mean=0.0,
                t_std=1.0, sigma_min=1e-4, generator=None):
    """Per-sample MSE [B] (float32) between predicted and true velocity, and the times t [B] it was
    drawn at; the condition is dropped per sample for CFG."""
    B, device = x1.shape[0], x1.device
    x0 = torch.randn(x1.shape, generator=generator, device=device, dtype=x1.dtype)
    t = sample_t(B, t_sampling, t_mean, t_std, generator=generator, device=device)
    drop = torch.rand(B, generator=generator, device=device) < cond_drop_prob
    pred = model(interpolate(x0, x1, t, sigma_min), t, cond, drop_cond=drop)
    target = velocity_target(x0, x1, sigma_min)
    return F.mse_loss(pred.float(), target.float(), reduction='none').mean((1, 2)), t


def validation_loss(model, x0, x1, cond, sigma_min=1e-4, points=8):
    """Per-sample flow loss [B] on a fixed grid of `points` times (midpoints of equal bins): no
    sampling noise."""
    loss, target = 0, velocity_target(x0, x1, sigma_min)
    for k in range(points):
        t = torch.full((x1.shape[0],), (k + 0.5) / points, device=x1.device)
        pred = model(interpolate(x0, x1, t, sigma_min), t, cond)
        loss = loss + F.mse_loss(pred.float(), target, reduction='none').mean((1, 2))
    return loss / points


def regress(model, cond, shape):
    """The regression baseline's prediction: one forward from the EVA tokens at t = 0, its token
    input one fixed draw of N(0, I) shared by every image (an all-zero input leaves every token
    alike, and the zero-initialized output layer then never learns: the loss stays at the
    mean's)."""
    fixed = torch.randn(shape[1:], generator=torch.Generator().manual_seed(0)).to(cond.device)
    return model(fixed.expand(shape), torch.zeros(shape[0], device=cond.device), cond)


def regression_losses(model, x1, cond):
    """Per-sample MSE [B] (float32) to the target x1 of that one forward, and its times t [B] (all
    0): the same network as the flow model, without the flow."""
    pred, t = regress(model, cond, x1.shape), torch.zeros(x1.shape[0], device=x1.device)
    return F.mse_loss(pred.float(), x1.float(), reduction='none').mean((1, 2)), t


def seed_for(*key):
    """A well-mixed 64-bit generator seed for a tuple of ints, e.g. (seed, iter, micro-batch)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0])


def seeded_noise(seed, rows, shape, device=None):
    """Starting noise [len(rows), *shape]: row i's from a generator seeded by (seed, i) alone, so it
    does not depend on the batch size, the batch order or the number of ranks."""
    generators = (torch.Generator().manual_seed(seed_for(seed, i)) for i in rows)
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


SOLVERS = {'euler': 1, 'heun': 2, 'midpoint': 2}  # model calls a step


def time_grid(steps, shift=1.0):
    """steps + 1 times from 0 to 1: uniform, warped by t / (shift - (shift - 1) t) (SD3's time shift
    in this convention), so shift > 1 packs the steps near t = 0 (noise) and shift < 1 near t = 1
    (data)."""
    return [u / (shift - (shift - 1) * u) for u in (i / steps for i in range(steps + 1))]


@torch.no_grad()
def sample(velocity_fn, x0, steps=50, method='euler', shift=1.0):
    """Integrate dx/dt = velocity_fn(x, t) from t = 0 to 1 in `steps` steps on time_grid(steps,
    shift).

    euler: one call a step, error O(1/steps); heun (trapezoid corrector) and midpoint: two, error
    O(1/steps^2). midpoint never calls the model at t = 1, where heun's last corrector does.
    """
    if method not in SOLVERS:
        raise ValueError(f"sampling method should be one of {', '.join(map(repr, SOLVERS))}, "
                         f"got {method!r}")
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


def guided(model, cond, scale=1.0, encode_once=True):
    """velocity_fn(x, t) for sample(): classifier-free guidance v_null + scale * (v_cond - v_null).

    scale 1.0 is the plain conditional model (one forward); otherwise both run as one batched
    forward. encode_once: the condition is encoded once here (model.encode_cond, in the caller's
    autocast) and reused at every step, the null half's cross-attention a constant a layer, costing
    neither k, v nor attention; False: plain forwards (FSDP's hooks see forward only).
    """
    drop = None
    if scale != 1.0:  # the conditional and the null half as one batch
        drop = torch.arange(2 * cond.shape[0], device=cond.device) >= cond.shape[0]
        cond = torch.cat([cond, cond])
    if encode_once:
        cache = model.encode_cond(cond, drop_cond=drop)
        forward = lambda x, t: model(x, t, cond_cache=cache)
    else:
        forward = lambda x, t: model(x, t, cond, drop_cond=drop)
    if scale == 1.0:
        return forward

    def velocity_fn(x, t):
        v_cond, v_null = forward(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        return v_null + scale * (v_cond - v_null)
    return velocity_fn


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampler:
    """How a checkpoint generates: its settings, checked, and what they give: the samples folder's
    name, the model calls, the JSON, a label, and the generating call.

    Each field is sample.py's setting sample_<field> (but use_ema, cfg_scale and seed:
    SETTING_NAMES).
    A regression checkpoint's record (for_objective) has method REGRESSION: one forward, no solver.
    A new solver: a branch in sample(). A setting of its own: a field here, its default the
    behaviour before it (the JSON and the name show it only when off the default, so earlier samples
    stay valid), and its line in sample.py's config.
    """
    method: str
    steps: int
    use_ema: bool = True
    shift: float = 1.0
    cfg_scale: float = 1.0
    seed: int | None = None  # None: the caller draws the noise (train.py's check)

    SETTING_NAMES = {'use_ema': 'use_ema', 'cfg_scale': 'cfg_scale', 'seed': 'seed'}
    BASE = ('use_ema', 'method', 'steps', 'shift', 'cfg_scale', 'seed')  # always in the JSON

    def __post_init__(self):
        # for_objective's
        regression = (self.method, self.steps, self.seed) == (REGRESSION, 1, None)
        is_int = isinstance(self.steps, int) and not isinstance(self.steps, bool)
        for name, ok, expected in [
                ('method', self.method in SOLVERS or regression,
                 f"one of {', '.join(map(repr, SOLVERS))}"),
                ('steps', is_int and self.steps >= 1, "a positive integer"),
                ('shift', isinstance(self.shift, (int, float)) and self.shift > 0, "positive"),
                ('cfg_scale', isinstance(self.cfg_scale, (int, float)), "a number")]:
            if not ok:
                raise SystemExit(f"config error: {setting(name)} should be {expected} (got "
                                 f"{getattr(self, name)!r})")

    @classmethod
    def from_settings(cls, settings):
        """The sampler of config settings or of generated.json's `settings` (other keys ignored);
        one without sample_method (or with None there) is a regression checkpoint's."""
        if settings.get(setting('method')) is None:
            return cls(method=REGRESSION, steps=1, use_ema=settings.get('use_ema', True))
        return cls(**{f.name: settings[setting(f.name)] for f in dataclasses.fields(cls)
                      if setting(f.name) in settings})

    def for_objective(self, objective):
        """This sampler for a checkpoint trained with `objective`: regression's one forward ignores
        the solver's settings."""
        if objective == REGRESSION:
            return Sampler(method=REGRESSION, steps=1, use_ema=self.use_ema)
        return self

    def arguments(self):
        """Every field as sample.py's --setting=value arguments."""
        return [f'--{setting(f.name)}={getattr(self, f.name)}' for f in dataclasses.fields(self)]

    def extras(self):
        """{field: value} of those off their default that the name shows: shift and any later
        field."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if (f.name == 'shift' or f.name not in self.BASE) and getattr(self, f.name)
                != f.default}

    def settings(self):
        """The JSON: generated.json's `settings` (depends_on's too), keyed by setting name."""
        if self.method == REGRESSION:
            return {'use_ema': self.use_ema}
        return {setting(k): getattr(self, k) for k in self.BASE} | {
            setting(k): v for k, v in self.extras().items() if k not in self.BASE}

    def name(self):
        """Its part of the samples folder's name (data.samples_name):
        <method><steps>[-shift<s>][-<field> <value>...]-cfg<scale>[-raw]-seed<seed>, or
        regression[-raw]."""
        raw = '' if self.use_ema else '-raw'
        if self.method == REGRESSION:
            return f"regression{raw}"
        extra = ''.join(f"-{k}{v:g}" for k, v in self.extras().items())
        return f"{self.method}{self.steps}{extra}-cfg{self.cfg_scale:g}{raw}-seed{self.seed}"

    def label(self):
        """One line for people: titles and logs."""
        if self.method == REGRESSION:
            return "regression: one forward pass"
        extra = ''.join(f", {k} {v:g}" for k, v in self.extras().items())
        return (f"{self.method} {self.steps} steps{extra}, cfg {self.cfg_scale:g}, seed "
                f"{self.seed} ({self.model_calls()} model calls)")

    def model_calls(self):
        """Model forwards per sample: calls a step x steps, twice under guidance (one batched
        forward of 2B); one for the regression baseline."""
        if self.method == REGRESSION:
            return 1
        return SOLVERS[self.method] * self.steps * (1 if self.cfg_scale == 1.0 else 2)

    @torch.no_grad()
    def generate(self, model, cond, x0, encode_once=True):
        """Tokens for the EVA tokens cond: sample() from x0 with guidance, or the regression
        baseline's one forward."""
        if self.method == REGRESSION:
            return regress(model, cond, x0.shape)
        return sample(guided(model, cond, self.cfg_scale, encode_once), x0, self.steps, self.method,
                      self.shift)


def setting(field):
    """The config setting (and generated.json key) of a Sampler field."""
    return Sampler.SETTING_NAMES.get(field, f'sample_{field}')
