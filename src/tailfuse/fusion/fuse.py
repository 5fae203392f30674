"""The fusion rule on codes, and the plan of which tail/head pairs make which synthetic samples."""

from __future__ import annotations

import torch


def draw_thresholds(n: int, spread: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """q1, q2 per sample: normal around 0.5 with standard deviation ``spread``, clipped into (0, 1)."""
    q = 0.5 + spread * torch.randn(2, n, generator=gen)
    q = q.clamp(0.01, 0.99)
    return q[0], q[1]


def fusion_masks(s_t: torch.Tensor, s_h: torch.Tensor, q1: torch.Tensor, q2: torch.Tensor, fill_p: float,
                 gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The rule: T = S_t > q1 (tail-specific), G = S_h < q2 (head-generic). Take the tail code where T and not G,
    the head code where G and not T, and elsewhere the tail code with probability ``fill_p`` (drawn per position).

    Maps are N x h x w; q1, q2 are (N,). Returns boolean masks T, G and ``take_tail`` (N x h x w)."""
    t = s_t > q1[:, None, None]
    g = s_h < q2[:, None, None]
    from_tail = t & ~g
    from_head = g & ~t
    coin = torch.rand(s_t.shape, generator=gen) < fill_p
    take_tail = from_tail | (~from_tail & ~from_head & coin)
    return {"T": t, "G": g, "take_tail": take_tail}


def splice(code_t: torch.Tensor, code_h: torch.Tensor, take_tail: torch.Tensor) -> torch.Tensor:
    """Codes N x K x h x w: the tail code where ``take_tail``, the head code elsewhere."""
    return torch.where(take_tail[:, None], code_t, code_h)


def feather_weights(take_tail: torch.Tensor, sigma: float) -> torch.Tensor:
    """Weight of the tail sample per position (N x 1 x h x w): the mask itself, or, with ``sigma`` > 0, the mask
    blurred by a Gaussian of ``sigma`` positions, so positions near a border between the two sources mix them."""
    if sigma <= 0:
        return take_tail.float()[:, None]
    from .saliency import gaussian_smooth

    return gaussian_smooth(take_tail.float(), sigma).clamp(0, 1)[:, None]


@torch.no_grad()
def fuse_latents(model, z_t: torch.Tensor, z_h: torch.Tensor, take_tail: torch.Tensor, code: str = "hard",
                 detail: str = "none", feather: float = 0.0) -> torch.Tensor:
    """Fuse two batches of latents through the sparse code: splice their codes (one-hot symbols for ``hard``,
    probabilities for ``soft``) by ``take_tail`` and decode with D. ``detail='residual'`` adds back, at every
    position, what the code does not carry of the sample that position comes from (z - D(code(z))).

    ``feather`` > 0 softens the borders: near a border the code is the convex mix ``w c_t + (1 - w) c_h`` of the two
    codes (still a point of the simplex) and the residuals mix the same way, with ``w`` the mask blurred by a
    Gaussian of ``feather`` positions; away from borders nothing changes."""
    if code == "hard":
        c_t, c_h = model.hard_code(z_t), model.hard_code(z_h)
    else:
        c_t, c_h = model.code(z_t), model.code(z_h)
    w = feather_weights(take_tail, feather)  # 0/1 without feathering: the mix is then exactly the splice
    fused = model.decode(w * c_t + (1 - w) * c_h)
    if detail == "residual":
        fused = fused + w * (z_t - model.decode(c_t)) + (1 - w) * (z_h - model.decode(c_h))
    return fused


def plan(tail_rows: dict[str, list[int]], counts: dict[str, int], k: int, candidates: int = 1) -> list[tuple]:
    """Which (tail label, tail row, neighbour rank, repeat, slot, candidate) makes each synthetic sample.

    For a tail label with n tail rows and k neighbours each, slot i uses tail row i mod n, neighbour rank
    (i div n) mod k, and repeat i div (n k) (a repeat draws new thresholds and fill), so the first n slots use
    every tail image once with its nearest head, the next n the second nearest, and so on. Slots are numbered over
    all labels. With ``candidates`` = M > 1 each slot gets M candidates (the same tail row; candidate c takes
    neighbour rank (rank + c) mod k and draws its own thresholds), of which decode keeps the best."""
    out = []
    slot = 0
    for lab, n_new in counts.items():
        rows = tail_rows.get(lab, [])
        if not rows or n_new <= 0:
            continue
        n = len(rows)
        for i in range(n_new):
            rank, rep = (i // n) % k, i // (n * k)
            for c in range(candidates):
                out.append((lab, rows[i % n], (rank + c) % k, rep, slot, c))
            slot += 1
    return out


def sample_generator(seed: int, synth_id: int) -> torch.Generator:
    """Every synthetic sample draws from its own generator: results do not depend on batching or resumption."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(synth_id)) % (2**63))
