"""Samplers: short pure functions of (denoiser, x, scheduler) that know nothing of files or configs.

* ``guided(model, y, w)``: the classifier-free-guidance wrapper, ``eps = eps_u + w (eps_c - eps_u)``: w = 0 is the
  unconditional model, w = 1 the conditional one, w > 1 pushes toward the labels.
* ``ddim(eps, x, scheduler, timesteps)``: deterministic DDIM (eta = 0) from ``x`` at ``timesteps[0]`` down.
* ``sample(eps, noise, scheduler, n)``: generation from pure noise with n DDIM steps.
* ``refine(eps, x0, scheduler, d, n, noise)``: SDEdit: noise the clean ``x0`` to the timestep where d of n DDIM
  steps remain, then denoise those d steps. d = 0 returns x0 unchanged; the strength is d / n.
"""

from __future__ import annotations

import torch


def ddim_scheduler(train_scheduler):
    """A DDIM scheduler with the training schedule's betas (set_alpha_to_one=False: the last step keeps alpha_0)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(train_scheduler.config, set_alpha_to_one=False, clip_sample=False)


def guided(model, y: torch.Tensor, w: float):
    """eps(x, t) of ``model`` toward label vectors ``y`` (N x L) with guidance ``w``."""
    n = len(y)

    def eps(x: torch.Tensor, t) -> torch.Tensor:
        tt = torch.full((len(x),), int(t), dtype=torch.long, device=x.device)
        if w == 1.0:
            return model(x, tt, y, torch.zeros(n, dtype=torch.bool, device=x.device))
        if w == 0.0:
            return model(x, tt, y, torch.ones(n, dtype=torch.bool, device=x.device))
        both = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, y]),
                     torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)]).to(x.device))
        e_u, e_c = both.chunk(2)
        return e_u + w * (e_c - e_u)

    return eps


@torch.no_grad()
def ddim(eps, x: torch.Tensor, scheduler, timesteps) -> torch.Tensor:
    for t in timesteps:
        x = scheduler.step(eps(x, t), t, x, eta=0.0).prev_sample
    return x


def sample(eps, noise: torch.Tensor, scheduler, n: int) -> torch.Tensor:
    scheduler.set_timesteps(n)
    return ddim(eps, noise * scheduler.init_noise_sigma, scheduler, scheduler.timesteps)


def refine(eps, x0: torch.Tensor, scheduler, d: int, n: int, noise: torch.Tensor) -> torch.Tensor:
    if d <= 0:
        return x0
    if d > n:
        raise ValueError(f"refinement steps d = {d} exceed the schedule's n = {n}")
    scheduler.set_timesteps(n)
    ts = scheduler.timesteps[n - d:]
    x = scheduler.add_noise(x0, noise, ts[:1].repeat(len(x0)))
    return ddim(eps, x, scheduler, ts)
