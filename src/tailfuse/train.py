"""Stage 2, train: iterated learning of the sparse code on the run's training latents. Resumable at any point."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import TrainConfig, stable_hash
from .errors import TailfuseError
from .sparse.learner import IteratedLearner
from .sparse.metrics import code_metrics
from .sparse.nets import SparseModel
from .dist import current
from .stage import Stage
from .store import RunStore, now, torch_save_atomic, write_text_atomic
from .threads import adaptive

log = logging.getLogger("tailfuse")


def split_data(store: RunStore, split: str) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(sample ids, latents, label matrix) of one split, read shard by shard."""
    samples = store.samples()
    labels = store.labels()["labels"]
    sub = samples[samples["split"] == split]
    ids = sub["sample_id"].to_numpy()
    z = store.latents().get(ids) if len(ids) else torch.empty(0)
    y = torch.from_numpy(sub[labels].to_numpy(dtype=np.int64))
    return ids, z, y


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=float))


def save_model(model: SparseModel, folder: Path, extra: dict) -> None:
    model.save_pretrained(folder, extra)


def load_model(run: str | Path, name: str = "train", generation: int | None = None, device: str = "cpu") -> SparseModel:
    """The trained sparse model of a run folder (``SparseModel.from_run``)."""
    return SparseModel.from_run(RunStore(run), name, generation, device)


@torch.no_grad()
def decoded_psnr(model: SparseModel, codec, z: torch.Tensor, batch: int = 64) -> dict:
    """PSNR (dB) of VAE-decoded D(E(z)) (soft and hard code) and of the mean latent, against the VAE's own decode of z."""
    out = {"soft": [], "hard": [], "mean_latent": []}
    for i in range(0, len(z), batch):
        zb = z[i : i + batch]
        ref = codec.decode(zb)
        p = model.code(zb)
        hard = torch.nn.functional.one_hot(p.argmax(1), model.k).permute(0, 3, 1, 2).float()
        for key, lat in (("soft", model.decode(p)), ("hard", model.decode(hard)), ("mean_latent", model.mu.expand_as(zb))):
            mse = ((codec.decode(lat) - ref) ** 2).mean((1, 2, 3)).clamp_min(1e-10)
            out[key].append(10 * torch.log10(1 / mse))
    return {k: float(torch.cat(v).mean()) for k, v in out.items()}


def validate(cfg: TrainConfig) -> None:
    if cfg.imitation_targets not in ("sample", "argmax"):
        raise TailfuseError(f"imitation targets '{cfg.imitation_targets}' unknown; use sample or argmax.")
    if cfg.generations < 1 or cfg.epochs < 1 or (cfg.generations > 1 and not cfg.no_imitation and cfg.imitation_epochs < 1):
        raise TailfuseError("generations and epochs must be at least 1.")
    if cfg.dim < 1 or cfg.k < 2 or cfg.tau <= 0 or (cfg.tau_start is not None and cfg.tau_start <= 0):
        raise TailfuseError("k must be >= 2, dim >= the latent channels, tau and tau_start > 0.")
    if cfg.batch_size < 2 or cfg.lr <= 0:
        raise TailfuseError("--batch-size must be >= 2 and --lr > 0.")


@adaptive
def run_train(run: str, cfg: TrainConfig, force: bool = False, progress: bool = True) -> dict:
    """Train the sparse model ``cfg.model_name`` on the run's latents; returns the stage record. Resumes from the
    epoch an interrupted train reached (``<model>/state.pt``)."""
    # 1. check the settings and open the stage (skipped when done)
    validate(cfg)
    store = RunStore(run)
    store.require("encode")
    name = cfg.model_name
    folder = store.root / name
    labels_info = store.labels()
    labels = labels_info["labels"]
    enc = store.stage("encode")
    st = _open_stage(store, cfg, name, folder, enc, force)
    rec = st.record
    if st.done:
        log.info(f"train already done for '{name}' ({rec['generations_done'][-1] + 1} generations); skipping (`{st.redo}` redoes it).")
        return rec
    ddp = cfg.ddp and st.dist.world > 1
    main = st.dist.is_main
    if not main and not ddp:  # several processes: the main process trains, the others wait for its model
        st.finish(with_shards=False)
        return store.stage(name)
    if ddp:
        log.info(f"train: data-parallel over {st.dist.world} processes (gradients averaged every step)")
    # 2. the latents of train and val
    data = _train_val_latents(store, cfg)
    if torch.device(cfg.device).type != "cpu":
        log.info("note: training runs on the CPU in this version; --device applies to later stages")
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        store.write_config(name, asdict(cfg))
    # 3. the phases of iterated learning, deterministic and resumable from state.pt
    det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        learner = IteratedLearner(cfg, data[0], data[1], labels_info["multi_label"], dist=st.dist if ddp else None)
        pos = _start_or_resume(learner, rec, cfg, folder, name, data, labels)
        _train_phases(learner, pos, rec, cfg, st, folder, name, data, labels, progress)
    finally:
        torch.use_deterministic_algorithms(det)
    # 4. finish: decoded PSNR of the last generation, the stage's record
    final = pos["history"][-1]
    _measure_psnr(learner, final, rec, enc, cfg, folder, pos["history"], data[2], main)
    rec = st.finish(with_shards=False)
    if main:
        (folder / "state.pt").unlink(missing_ok=True)
    log.info(_format_row(final))
    return rec


def _open_stage(store: RunStore, cfg: TrainConfig, name: str, folder: Path, enc: dict, force: bool) -> Stage:
    """The stage of model ``name``, its config hash of the settings and of the encode it trains on."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("device", "name", "ddp")}
    config_hash = stable_hash({"train": settings, "encode": enc["config_hash"], "inputs": enc["inputs_hash"]})
    return Stage.open(store, name, config_hash, dist=current(cfg.device), what=f"a model '{name}' (trained with other settings or on another encode)",
                      wipe=[folder], force=force, inputs={"encode": enc["config_hash"]},
                      extra={"seconds": 0.0, "generations_done": [], "phases": [f"{p}:{g}" for p, g in cfg.phases()]})


def _train_val_latents(store: RunStore, cfg: TrainConfig) -> tuple:
    """(z_train, y_train, z_val, y_val), checked for size; train stands in for val when the run has no val split."""
    _, z_tr, y_tr = split_data(store, "train")
    _, z_va, y_va = split_data(store, "val")
    if len(z_tr) < 2:
        raise TailfuseError("the run has fewer than 2 training latents; nothing to train on.")
    if cfg.dim < z_tr.shape[1]:
        raise TailfuseError(f"--dim {cfg.dim} must be at least the latent channels ({z_tr.shape[1]}).")
    if len(z_va) == 0:
        log.info("note: no val split; metrics are reported on train")
        z_va, y_va = z_tr, y_tr
    return z_tr, y_tr, z_va, y_va


def _start_or_resume(learner: IteratedLearner, rec: dict, cfg: TrainConfig, folder: Path, name: str, data: tuple,
                     labels: list) -> dict:
    """The position to train from: the start (untrained metrics into ``rec['init']``) or state.pt's, loaded."""
    phases = cfg.phases()
    state_path = folder / "state.pt"
    pos = {"phase": 0, "epoch": 0, "history": [], "pending": {}, "epochs": []}
    if not state_path.is_file() and "init" not in rec:
        # the untrained model (k-means codebook, codebook decode): what training adds is measured against it
        ini = code_metrics(learner.model, data[2], data[3], labels)
        rec["init"] = _jsonable({k: ini[k] for k in ("sparsity", "entropy", "recon_rel_l1", "recon_rel_l1_hard", "map")})
    if state_path.is_file():
        ckpt = torch.load(state_path, weights_only=False)
        pos = ckpt["pos"]
        ph = phases[pos["phase"]] if pos["phase"] < len(phases) else None
        in_phase = ph is not None and pos["epoch"] > 0
        learner.load_state(ckpt["learner"], ph[0] if in_phase else None, pos["phase"] if in_phase else None, ph[1] if ph else 0)
        log.info(f"resuming '{name}' at phase {pos['phase'] + 1}/{len(phases)}, epoch {pos['epoch']}")
    return pos


def _train_phases(learner: IteratedLearner, pos: dict, rec: dict, cfg: TrainConfig, st: Stage, folder: Path,
                  name: str, data: tuple, labels: list, progress: bool) -> None:
    """The phases from ``pos`` on, epoch by epoch; after every epoch the position and learner go to state.pt."""
    main = st.dist.is_main
    phases = cfg.phases()
    total_epochs = sum(cfg.epochs if p == "interaction" else cfg.imitation_epochs for p, _ in phases)
    done_epochs = sum(cfg.epochs if p == "interaction" else cfg.imitation_epochs for p, _ in phases[: pos["phase"]]) + pos["epoch"]
    n_gen = 1 + max(g for _, g in phases)

    def label(i: int) -> str:  # "train (generation 2/4, interaction)"; other models by name
        ph, g = phases[min(i, len(phases) - 1)]
        return f"{'train' if name == 'train' else name} (generation {g + 1}/{n_gen}, {ph})"

    bar = tqdm(total=total_epochs, initial=done_epochs, desc=label(pos["phase"]), unit="epoch",
               disable=not progress or not main, file=sys.stderr)
    tb = _tensorboard(folder / "tb", purge_step=len(pos["history"])) if main else None
    t0 = time.time()
    try:
        while pos["phase"] < len(phases):
            phase, gen = phases[pos["phase"]]
            n_ep = cfg.epochs if phase == "interaction" else cfg.imitation_epochs
            bar.set_description(label(pos["phase"]))
            if pos["epoch"] == 0:
                learner.begin_phase(phase, pos["phase"], gen)
            for ep in range(pos["epoch"], n_ep):
                last = ep == n_ep - 1
                stats = learner.interaction_epoch(last) if phase == "interaction" else learner.imitation_epoch(last)
                bar.set_postfix({k: round(v, 4) for k, v in stats.items() if isinstance(v, float)})
                bar.update(1)
                _record_epoch(learner, pos, phase, gen, ep, last, stats, folder, data, main)
                if last:
                    _end_phase(learner, pos, rec, cfg, phase, gen, stats, folder, data, labels, tb, main)
                rec["seconds"] = round(rec["seconds"] + time.time() - t0, 2)
                t0 = time.time()
                if main:
                    torch_save_atomic({"pos": pos, "learner": learner.state()}, folder / "state.pt")
                st.update()
                if last:
                    break
    finally:
        bar.close()
        if tb is not None:
            tb.close()


def _record_epoch(learner: IteratedLearner, pos: dict, phase: str, gen: int, ep: int, last: bool, stats: dict,
                  folder: Path, data: tuple, main: bool) -> None:
    """An epoch's statistics into epochs.jsonl; after the last imitation epoch, the agreement with the teacher."""
    pos["epochs"].append(_jsonable({"phase": phase, "generation": gen, "epoch": ep, **stats}))
    if main:
        write_text_atomic(folder / "epochs.jsonl", "".join(json.dumps(r) + "\n" for r in pos["epochs"]))
    pos["epoch"] = ep + 1
    if phase == "imitation" and last:
        pos["pending"] = {
            "imitation_agreement": learner.agreement(data[2]),
            "imitation_agreement_train": learner.agreement(data[0]),
            "imitation_loss": stats["imitation_loss"],
        }


def _end_phase(learner: IteratedLearner, pos: dict, rec: dict, cfg: TrainConfig, phase: str, gen: int, stats: dict,
               folder: Path, data: tuple, labels: list, tb, main: bool) -> None:
    """Close a phase; an interaction phase ends a generation: its metrics, and its model saved as gen-NN."""
    learner.end_phase(phase)
    if phase == "interaction":
        z_tr, y_tr, z_va, y_va = data
        row = _generation_metrics(learner, gen, z_tr, y_tr, z_va, y_va, labels, pos["pending"], stats)
        if main:
            save_model(learner.model, folder / f"gen-{gen:02d}", {"train": asdict(cfg), "labels": labels, "generation": gen})
        pos["history"].append(row)
        pos["pending"] = {}
        if main:
            _write_metrics(folder, pos["history"], tb)
        rec["generations_done"] = [r["generation"] for r in pos["history"]]
        rec["last"] = _summary(row)
    pos["phase"] += 1
    pos["epoch"] = 0


def _measure_psnr(learner: IteratedLearner, final: dict, rec: dict, enc: dict, cfg: TrainConfig, folder: Path,
                  history: list, z_va: torch.Tensor, main: bool) -> None:
    """Decoded PSNR of the last generation on val into ``final`` and the record, when the run's VAE loads."""
    vae_name = enc["vae"].get("name")
    try:
        from .codec import VAECodec

        if not vae_name:  # latents given directly (the Python API): no VAE to decode with
            raise TailfuseError("the run's latents were not made by a VAE")
        codec = VAECodec.load(vae_name, device=cfg.device if cfg.device else "cpu")
        final["psnr_val"] = decoded_psnr(learner.model.eval(), codec, z_va)
        rec["last"]["psnr_val"] = final["psnr_val"]
        if main:
            _write_metrics(folder, history, None)
    except TailfuseError as e:
        log.info(f"note: VAE '{vae_name}' not loadable now ({e}); decoded PSNR not measured")


def _tensorboard(path: Path, purge_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: JSONL only
        return None
    return SummaryWriter(str(path), purge_step=purge_step)


def _generation_metrics(learner, gen, z_tr, y_tr, z_va, y_va, labels, pending, stats) -> dict:
    m = learner.model
    va = code_metrics(m, z_va, y_va, labels)
    tr = code_metrics(m, z_tr, y_tr, labels)
    row = {
        "generation": gen,
        "sparsity": va["sparsity"],
        "entropy": va["entropy"],
        "recon_rel_l1": va["recon_rel_l1"],
        "recon_rel_l1_hard": va["recon_rel_l1_hard"],
        "recon_rel_l1_mixed": va["recon_rel_l1_mixed"],
        "val_map": va["map"],
        "val_ap": va["ap"],
        "codes_used": va["codes_used"],
        "code_perplexity": va["code_perplexity"],
        "imitation_agreement": pending.get("imitation_agreement"),
        "imitation_agreement_train": pending.get("imitation_agreement_train"),
        "imitation_loss": pending.get("imitation_loss"),
        "train_loss": stats["loss"],
        "dead_codes_last_epoch": stats["dead_codes"],
        "train": {k: v for k, v in tr.items() if k != "ap"},
        "finished_at": now(),
    }
    return _jsonable(row)


def _summary(row: dict) -> dict:
    keys = ("generation", "sparsity", "entropy", "recon_rel_l1", "recon_rel_l1_hard", "recon_rel_l1_mixed", "val_map",
            "imitation_agreement", "codes_used", "val_ap")
    return {k: row.get(k) for k in keys}


def _write_metrics(folder: Path, history: list[dict], tb) -> None:
    write_text_atomic(folder / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    if tb is not None:
        r = history[-1]
        g = r["generation"]
        for k in ("sparsity", "entropy", "recon_rel_l1", "recon_rel_l1_hard", "recon_rel_l1_mixed", "val_map",
                  "imitation_agreement", "codes_used", "train_loss"):
            if r.get(k) is not None:
                tb.add_scalar(k, r[k], g)
        for lab, ap in (r.get("val_ap") or {}).items():
            if ap is not None:
                tb.add_scalar(f"val_ap/{lab}", ap, g)
        tb.flush()


def _format_row(r: dict) -> str:
    parts = [f"generation {r['generation']}: sparsity {r['sparsity']:.3f}",
             f"recon {r['recon_rel_l1']:.3f} (hard {r['recon_rel_l1_hard']:.3f}) of the mean-latent predictor",
             f"val mAP {r['val_map']:.3f}" if r.get("val_map") is not None else "val mAP n/a"]
    if r.get("imitation_agreement") is not None:
        parts.append(f"imitation agreement {r['imitation_agreement']:.3f}")
    if r.get("psnr_val"):
        parts.append(f"decoded PSNR soft {r['psnr_val']['soft']:.1f} dB / hard {r['psnr_val']['hard']:.1f} dB "
                     f"(mean latent {r['psnr_val']['mean_latent']:.1f} dB)")
    return ", ".join(parts)
