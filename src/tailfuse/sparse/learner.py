"""The iterated learner: generations of interaction (E, D, C together) and imitation (a fresh E' from E).

Schedule: generation 0 is an interaction phase; every later generation g is an imitation phase (a freshly
initialised student E' learns the frozen teacher E's code, then replaces it) followed by an interaction phase.
So every generation ends with E, D and C trained together on the final code, and its checkpoint is a coherent
model. ``no_imitation`` keeps the interaction phases (same epochs) and drops the imitation phases.

Interaction loss, on a batch of latents z (standardised per channel as zs) with labels y:
    lambda_rec * [(1 - hard_frac) * L1(D(p), z) + hard_frac * L1(D(h), z)]       p = soft code, h = one-hot argmax
  + lambda_cls * L_cls(C(p), y)                                                  (h passes gradients straight through)
  + beta * ||g - sg(c_idx)||^2 + lambda_codebook * ||sg(g) - c_idx||^2           VQ commitment and codebook terms
  + lambda_mix * L1(D(M * code_i + (1 - M) * code_j), M * z_i + (1 - M) * z_j)  spliced codes, as fusion makes them
Codes no position chose during an epoch are restarted on random features of that epoch.

Imitation: at every spatial position one symbol is drawn from the teacher's distribution over the K channels
(channels moved last before flattening: one target per position, never along the width), and the student is
trained on them with cross-entropy over channels.

Everything random draws from one seeded generator whose state is checkpointed after every epoch, so a killed
run resumes to the same final weights.
"""

from __future__ import annotations

import math
import numpy as np
import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..threads import adapt
from .nets import Classifier, Decoder, Encoder, SparseModel, one_hot, positions


def warmup_cosine(total: int, warmup_frac: float = 0.1):
    """Learning-rate factor per step: linear warm-up over 10 % of the steps, then cosine decay to 4 % (any total)."""
    total = max(1, total)
    warm = max(1, int(round(warmup_frac * total)))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return 0.04 + 0.96 * 0.5 * (1 + math.cos(math.pi * t))

    return f


def kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding and Lloyd iterations on the rows of x, deterministic given ``gen``."""
    m = x.shape[0]
    first = int(torch.randint(m, (1,), generator=gen))
    idx = [first]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        i = int(torch.multinomial(d2 / d2.sum(), 1, generator=gen)) if d2.sum() > 0 else int(torch.randint(m, (1,), generator=gen))
        idx.append(i)
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    c = x[idx].clone()
    for _ in range(iters):
        a = torch.cdist(x, c).argmin(1)
        s = torch.zeros_like(c).index_add_(0, a, x)
        n = torch.bincount(a, minlength=k).float()
        c = torch.where(n[:, None] > 0, s / n.clamp(min=1)[:, None], c)
    return c


def dihedral(z: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The same random flip / 90-degree rotation for a whole batch."""
    k = int(torch.randint(4, (1,), generator=gen))
    f = int(torch.randint(2, (1,), generator=gen))
    z = torch.rot90(z, k, (2, 3))
    return torch.flip(z, (3,)) if f else z


def region_masks(n: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth random region masks (like thresholded saliency maps), n x 1 x h x w in {0, 1}, 20-80 % coverage."""
    b = min(4, h, w)
    noise = torch.randn(n, 1, b, b, generator=gen)
    m = F.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False)
    q = torch.rand(n, generator=gen) * 0.6 + 0.2
    thr = torch.stack([torch.quantile(m[i].flatten(), q[i]) for i in range(n)])
    return (m > thr[:, None, None, None]).float()


def imitation_targets(teacher_probs: torch.Tensor, how: str, gen: torch.Generator) -> torch.Tensor:
    """One target symbol per spatial position: N x K x h x w -> (N*h*w,) indices."""
    p = positions(teacher_probs)  # (N*h*w, K): channels last, one row per position
    if how == "argmax":
        return p.argmax(1)
    return torch.multinomial(p, 1, generator=gen).squeeze(1)


def positive_weights(y: torch.Tensor, cap: float = 100.0) -> torch.Tensor:
    """BCE positive weights neg/pos per label; finite (1) for a label with no positive, capped."""
    y = y.float()
    pos, neg = y.sum(0), (1 - y).sum(0)
    return torch.where(pos > 0, neg / pos.clamp(min=1), torch.ones_like(pos)).clamp(max=cap)


def class_weights(y: torch.Tensor, cap: float = 50.0) -> torch.Tensor:
    """Cross-entropy class weights n / (L * count) (1 for a class without samples), capped: on long-tailed data an
    unweighted C learns little about the tail, and its saliency maps then point away from tail findings."""
    counts = y.float().sum(0)
    w = torch.where(counts > 0, len(y) / (y.shape[1] * counts.clamp(min=1)), torch.ones_like(counts))
    return w.clamp(max=cap)


class IteratedLearner:
    """Holds the model, data and generator; runs phases epoch by epoch (the caller checkpoints between epochs).

    Data-parallel training (``dist`` with several processes, ``tailfuse train --ddp``): every process holds the
    same model and draws the same random numbers (one seeded generator, the same batches and augmentations), computes
    the loss on its own slice of each batch (rows rank, rank + N, ...), and the gradients are averaged over the
    processes (all-reduce, weighted by slice size) before every optimiser step, so the processes stay identical; so
    do the dead-code restarts (usage and candidate features gathered from all). The result equals single-process
    training up to the order of floating-point sums."""

    def __init__(self, cfg: TrainConfig, z_train: torch.Tensor, y_train: torch.Tensor, multi_label: bool, dist=None):
        self.cfg = cfg
        self.dist = dist
        self.z, self.y = z_train, y_train
        self.multi_label = multi_label
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        torch.manual_seed(cfg.seed)
        self.model = SparseModel(
            z_train.shape[1], y_train.shape[1], multi_label, cfg.k, cfg.dim, self.tau_at(0),
            cfg.width_e, cfg.blocks_e, cfg.width_d, cfg.blocks_d, cfg.width_c,
        )
        self.model.set_stats(z_train)
        self.model.E = self.new_encoder()
        self.init_decoder_skip(self.model.D)
        self.pos_weight = positive_weights(y_train) if multi_label else None
        self.class_weight = class_weights(y_train) if (not multi_label and cfg.balanced_classifier) else None
        self.student: Encoder | None = None
        self.opt = None
        self.sched = None
        self.last_dead = 0

    # --- construction
    def new_encoder(self, teacher: Encoder | None = None) -> Encoder:
        cfg, m = self.cfg, self.model
        enc = Encoder(m.hparams["in_channels"], cfg.k, cfg.dim, cfg.width_e, cfg.blocks_e)
        with torch.no_grad():
            zs = m.standardise(self.z)
            g = positions(enc.features(zs))
            if teacher is None:
                enc.codebook.copy_(kmeans(g, cfg.k, 20, self.gen))
            else:  # centroids of the student's initial features over the teacher's symbols
                a = positions(teacher(zs, m.tau)[0]).argmax(1)
                s = torch.zeros(cfg.k, cfg.dim).index_add_(0, a, g)
                n = torch.bincount(a, minlength=cfg.k).float()
                rnd = g[torch.randint(g.shape[0], (cfg.k,), generator=self.gen)]
                enc.codebook.copy_(torch.where(n[:, None] > 0, s / n.clamp(min=1)[:, None], rnd))
        return enc

    def init_decoder_skip(self, dec: Decoder) -> None:
        """Start the hard decode as 'symbol -> its codebook vector' (the k-means decode)."""
        with torch.no_grad():
            c = self.model.hparams["in_channels"]
            dec.skip.weight.copy_(self.model.E.codebook[:, :c].T[:, :, None, None])

    def tau_at(self, generation: int) -> float:
        """Temperature of a generation: tau_start annealed geometrically to tau over the generations."""
        cfg = self.cfg
        if cfg.tau_start is None or cfg.generations <= 1:
            return cfg.tau
        return float(cfg.tau_start * (cfg.tau / cfg.tau_start) ** (generation / (cfg.generations - 1)))

    def begin_phase(self, phase: str, index: int, generation: int = 0) -> None:
        cfg, m = self.cfg, self.model
        m.tau = self.tau_at(generation)
        m.hparams["tau"] = m.tau
        torch.manual_seed(cfg.seed + 7919 * (index + 1))  # module initialisers use the global generator
        steps = max(1, math.ceil(len(self.z) / cfg.batch_size))
        if phase == "imitation":
            self.student = self.new_encoder(teacher=m.E.eval())
            params, lr, epochs = list(self.student.parameters()), cfg.lr_imitation, cfg.imitation_epochs
        else:
            if cfg.reset_decoder_classifier and index > 0:
                m.D = Decoder(cfg.k, m.hparams["in_channels"], cfg.width_d, cfg.blocks_d)
                self.init_decoder_skip(m.D)
                m.C = Classifier(cfg.k, m.hparams["n_labels"], cfg.width_c)
            params, lr, epochs = list(m.parameters()), cfg.lr, cfg.epochs
        self.opt = torch.optim.Adam(params, lr=lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine(epochs * steps))

    def end_phase(self, phase: str) -> None:
        if phase == "imitation":
            self.model.E = self.student
            self.student = None
        self.opt = self.sched = None

    # --- losses
    def cls_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, y.float(), pos_weight=self.pos_weight)
        return F.cross_entropy(logits, y.argmax(1), weight=self.class_weight)

    def _batches(self):
        n = len(self.z)
        perm = torch.randperm(n, generator=self.gen)
        for i in range(0, n, self.cfg.batch_size):
            adapt()  # follow the CPUs other jobs leave free (tailfuse.threads)
            bi = perm[i : i + self.cfg.batch_size]
            z = self.z[bi]
            if self.cfg.augment:
                z = dihedral(z, self.gen)
            yield z, self.y[bi]

    # --- data-parallel helpers (no-ops in one process)
    @property
    def _ddp(self) -> bool:
        return self.dist is not None and self.dist.world > 1

    def _mine(self, t: torch.Tensor) -> torch.Tensor:
        """This process's slice of a batch (rows rank, rank + N, ...)."""
        return t[self.dist.rank :: self.dist.world] if self._ddp else t

    def _sync_grads(self, params, n_mine: int, n_batch: int) -> None:
        """Gradients of the whole batch: each process's mean-loss gradient weighted by its share, summed."""
        if not self._ddp:
            return
        import torch.distributed as td

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.mul_(n_mine / n_batch)
            td.all_reduce(p.grad)

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        if self._ddp:
            import torch.distributed as td

            td.all_reduce(t)
        return t

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        if not self._ddp:
            return t
        import torch.distributed as td

        out = [torch.zeros_like(t) for _ in range(self.dist.world)]
        td.all_gather(out, t)
        return torch.cat(out)

    def interaction_epoch(self, last: bool) -> dict:
        cfg, m = self.cfg, self.model
        m.train()
        usage = torch.zeros(cfg.k)
        feats, logs = [], []
        params = [p for grp in self.opt.param_groups for p in grp["params"]]
        for z_all, y_all in self._batches():
            # the random draws of the whole batch, on every process alike; then this process's slice
            n_all = len(z_all)
            n_mix = max(2, int(round(cfg.mix_frac * n_all))) if cfg.lambda_mix > 0 and n_all > 1 else 0
            mk_all = region_masks(n_mix, z_all.shape[2], z_all.shape[3], self.gen) if n_mix else None
            pick = torch.randint(z_all.shape[2] * z_all.shape[3] * n_all, (64,), generator=self.gen)
            z, y = self._mine(z_all), self._mine(y_all)
            zs = m.standardise(z)
            logits, g = m.E(zs, m.tau)
            p = logits.softmax(1)
            idx = logits.argmax(1)
            hard = one_hot(idx, cfg.k)
            hard_st = hard + p - p.detach()
            rec_s = (m.decode(p) - z).abs().mean()
            rec_h = (m.decode(hard_st) - z).abs().mean()
            rec = (1 - cfg.hard_frac) * rec_s + cfg.hard_frac * rec_h
            cq = m.E.codebook[idx].permute(0, 3, 1, 2)
            commit = ((g - cq.detach()) ** 2).sum(1).mean()
            cbl = ((g.detach() - cq) ** 2).sum(1).mean()
            cls = self.cls_loss(m.C(p), y)
            loss = cfg.lambda_rec * rec + cfg.lambda_cls * cls + cfg.beta * commit + cfg.lambda_codebook * cbl
            if n_mix and len(z) > 1:
                n = min(n_mix, len(z)) if self._ddp else n_mix
                j = torch.roll(torch.arange(n), 1)
                mk = mk_all[:n]
                half = n // 2  # half the spliced codes are soft, half hard
                code = torch.cat([p[:half].detach(), hard[half:n]])
                mixed = mk * code + (1 - mk) * code[j]
                target = mk * z[:n] + (1 - mk) * z[:n][j]
                loss = loss + cfg.lambda_mix * (m.decode(mixed) - target).abs().mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self._sync_grads(params, len(z), n_all)
            self.opt.step()
            self.sched.step()
            with torch.no_grad():
                usage += torch.bincount(idx.flatten(), minlength=cfg.k).float()
                feats.append(positions(g.detach())[pick % idx.numel()])
            logs.append([loss.item(), rec_s.item(), rec_h.item(), cls.item()])
        usage = self._sum(usage)
        dead = (usage == 0).nonzero().flatten()
        self.last_dead = len(dead)
        if cfg.restart_dead and len(dead) and not last:
            pool = self._gather(torch.cat(feats))
            with torch.no_grad():
                m.E.codebook[dead] = pool[torch.randint(pool.shape[0], (len(dead),), generator=self.gen)]
        a = self._sum(torch.tensor(np.mean(logs, 0))) / (self.dist.world if self._ddp else 1)
        return {"loss": float(a[0]), "rec_soft": float(a[1]), "rec_hard": float(a[2]), "cls": float(a[3]), "dead_codes": self.last_dead}

    def imitation_epoch(self, last: bool) -> dict:
        cfg, m = self.cfg, self.model
        teacher = m.E.eval()
        self.student.train()
        losses = []
        params = list(self.student.parameters())
        for z_all, _ in self._batches():
            zs_all = m.standardise(z_all)
            with torch.no_grad():  # targets of the whole batch (the same draws on every process), then the slice
                target = imitation_targets(teacher(zs_all, m.tau)[0].softmax(1), cfg.imitation_targets, self.gen)
                target = target.view(len(z_all), -1)
            zs, target = self._mine(zs_all), self._mine(target).reshape(-1)
            sl, _ = self.student(zs, m.tau)
            loss = F.cross_entropy(positions(sl), target)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self._sync_grads(params, len(zs), len(zs_all))
            self.opt.step()
            self.sched.step()
            losses.append(loss.item())
        mean = self._sum(torch.tensor(float(np.mean(losses)))) / (self.dist.world if self._ddp else 1)
        return {"imitation_loss": float(mean)}

    @torch.no_grad()
    def agreement(self, z: torch.Tensor) -> float:
        """Share of positions where the student's argmax symbol equals the teacher's."""
        m = self.model
        zs = m.standardise(z)
        return float((m.E.eval()(zs, m.tau)[0].argmax(1) == self.student.eval()(zs, m.tau)[0].argmax(1)).float().mean())

    # --- state for resume
    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "student": None if self.student is None else self.student.state_dict(),
            "opt": None if self.opt is None else self.opt.state_dict(),
            "sched": None if self.sched is None else self.sched.state_dict(),
            "gen": self.gen.get_state(),
            "tau": self.model.tau,
        }

    def load_state(self, st: dict, phase: str | None, index: int | None, generation: int = 0) -> None:
        self.model.tau = st.get("tau", self.model.tau)
        self.model.hparams["tau"] = self.model.tau
        if phase is not None:
            self.begin_phase(phase, index, generation)  # rebuilds student/optimiser objects; their states are overwritten below
        self.model.load_state_dict(st["model"])
        self.gen.set_state(st["gen"])
        if phase is not None:
            if st["student"] is not None:
                self.student.load_state_dict(st["student"])
            self.opt.load_state_dict(st["opt"])
            self.sched.load_state_dict(st["sched"])
            self.gen.set_state(st["gen"])
