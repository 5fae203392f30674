"""`tailfuse train`: checkpoints, resume, metrics, info; a short real run on ISIC2018-LT latents."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import subset_manifest
from tailfuse.cli import main
from tailfuse.config import DataConfig, EncodeConfig, TrainConfig, VAEConfig
from tailfuse.encode import run_encode
from tailfuse.errors import TailfuseError
from tailfuse.info import run_info
from tailfuse.sparse.learner import IteratedLearner
from tailfuse.train import load_model, run_train
from test_encode import _make_input
from tiny import tiny_autoencoder_tiny

QUIET = dict(progress=False)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    vae = str(tiny_autoencoder_tiny(root / "vae"))
    manifest = _make_input(root / "in", n=40, bad=False)
    run_encode(DataConfig(data=str(manifest), image_size=64), VAEConfig(vae=vae), EncodeConfig(batch_size=8, shard_size=16), str(root / "run"), **QUIET)
    return root / "run"


def _cfg(**kw):
    base = dict(generations=2, epochs=2, imitation_epochs=2, k=8, dim=4, tau=0.3, width_e=8, blocks_e=1,
                width_d=8, blocks_d=1, width_c=8, batch_size=8)
    base.update(kw)
    return TrainConfig(**base)


def _weights(run, name="train"):
    rec = json.loads((run / "stages" / f"{name}.json").read_text())
    g = rec["generations_done"][-1]
    return load_file(str(run / name / f"gen-{g:02d}" / "model.safetensors"))


@pytest.mark.parametrize("stop_at", [1, 3, 4])  # mid interaction / after an imitation epoch / at a phase boundary
def test_resume_after_interruption_gives_the_same_final_weights(tmp_path, encoded, monkeypatch, stop_at):
    whole = tmp_path / "whole"
    shutil.copytree(encoded, whole)
    run_train(str(whole), _cfg(), **QUIET)

    killed = tmp_path / "killed"
    shutil.copytree(encoded, killed)
    calls = {"n": 0}
    orig_i, orig_m = IteratedLearner.interaction_epoch, IteratedLearner.imitation_epoch

    def counting(orig):
        def wrapped(self, last):
            if calls["n"] == stop_at:
                raise KeyboardInterrupt
            calls["n"] += 1
            return orig(self, last)
        return wrapped

    monkeypatch.setattr(IteratedLearner, "interaction_epoch", counting(orig_i))
    monkeypatch.setattr(IteratedLearner, "imitation_epoch", counting(orig_m))
    with pytest.raises(KeyboardInterrupt):
        run_train(str(killed), _cfg(), **QUIET)
    rec = json.loads((killed / "stages" / "train.json").read_text())
    assert rec["status"] == "running" and (killed / "train" / "state.pt").is_file()
    monkeypatch.setattr(IteratedLearner, "interaction_epoch", orig_i)
    monkeypatch.setattr(IteratedLearner, "imitation_epoch", orig_m)
    run_train(str(killed), _cfg(), **QUIET)
    a, b = _weights(whole), _weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = (killed / "train" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["generation"] for x in lines] == [0, 1]  # no duplicate rows after resuming


def test_checkpoints_metrics_info_and_reload(tmp_path, encoded, capsys):
    run = tmp_path / "run"
    shutil.copytree(encoded, run)
    before = torch.get_num_threads()
    try:
        rc = main(["train", "--run", str(run), "--generations", "2", "--epochs", "1", "--imitation-epochs", "1", "--k",
                   "8", "--dim", "4", "--tau", "0.3", "--batch-size", "8", "--threads", "1", "--quiet"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert rc == 0
    runtime = json.loads((run / "stages" / "train.json").read_text())["runtime"]  # what the stage ran with
    assert runtime["threads"] == 1 and runtime["cpus_allowed"] >= 1 and len(runtime["load_average_at_start"]) == 3
    for g in (0, 1):
        assert (run / "train" / f"gen-{g:02d}" / "model.safetensors").is_file()
        assert (run / "train" / f"gen-{g:02d}" / "config.json").is_file()
    assert not (run / "train" / "state.pt").exists()
    assert any((run / "train" / "tb").iterdir())  # TensorBoard events
    rows = [json.loads(x) for x in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["imitation_agreement"] is None and 0 <= rows[1]["imitation_agreement"] <= 1
    for key in ("recon_rel_l1", "recon_rel_l1_hard", "sparsity", "entropy", "val_map", "val_ap", "codes_used"):
        assert key in rows[1]
    capsys.readouterr()
    main(["info", "--run", str(run), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["stages"]["train"]["threads"] == 1 and info["stages"]["train"]["load_at_start"] >= 0
    t = info["train"]
    assert t["generation"] == 1
    for key in ("sparsity", "recon_rel_l1", "recon_rel_l1_hard", "val_map", "imitation_agreement"):
        assert isinstance(t[key], float), key
    assert "psnr_val" in t  # decoded quality of D(E(z)) through the VAE
    m0, m1 = load_model(run, generation=0), load_model(run)
    assert not torch.equal(m0.E.codebook, m1.E.codebook)
    z = torch.randn(2, 4, 8, 8)
    assert m1.decode(m1.code(z)).shape == z.shape and not m1.training
    # rerun: already done; other settings: refused; --force retrains
    args = ["train", "--run", str(run), "--generations", "2", "--epochs", "1", "--imitation-epochs", "1", "--k", "8",
            "--dim", "4", "--tau", "0.3", "--batch-size", "8"]
    assert main(args) == 0
    assert "already done" in capsys.readouterr().err  # messages go to stderr through the logger
    assert main([*args, "--quiet"]) == 0
    assert "already done" not in capsys.readouterr().err  # -q: warnings and errors only
    with pytest.raises(TailfuseError, match="other settings"):
        run_train(str(run), _cfg(epochs=3), **QUIET)
    assert main([*args, "--threads", "0"]) == 2
    assert "--threads 0: give at least 1" in capsys.readouterr().err


def _busy_process():
    """One CPU-bound process of its own (its own session, as another user's job would be)."""
    import subprocess
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    time.sleep(0.5)
    return p


def test_free_cpus_see_another_job():
    from tailfuse.threads import _FreeCpus, cpus_allowed

    import time

    def free_over(seconds):
        f = _FreeCpus()
        time.sleep(seconds)
        return f.since_last()

    idle = free_over(1.0)
    if idle is None:
        pytest.skip("no /proc/stat: the free CPUs cannot be read on this system")
    import psutil

    p = _busy_process()
    try:
        child = psutil.Process(p.pid)
        c0, t0 = sum(child.cpu_times()[:2]), time.monotonic()
        busy = free_over(1.0)
        rate = (sum(child.cpu_times()[:2]) - c0) / (time.monotonic() - t0)  # CPUs the busy process got
    finally:
        p.kill()
        p.wait()
    n = cpus_allowed()
    assert 0 <= busy <= n and 0 <= idle <= n
    assert rate > 0.05, rate  # it ran (on a loaded machine it gets a share of a CPU, alone about one)
    # the reading takes away at least most of what the busy process used, whatever else the machine runs
    assert busy <= n - 0.7 * rate, (busy, rate)
    if idle >= n - 0.3:  # a quiet machine: the busy process alone takes about one CPU away
        assert busy < idle - 0.5, (idle, busy)


def test_train_adapts_its_threads_to_another_job_unless_chosen(tmp_path, encoded, monkeypatch):
    from tailfuse import threads

    if threads.cpus_allowed() < 2:
        pytest.skip("needs 2 CPUs to have a count to adapt")
    monkeypatch.setattr(threads, "_explicit", None)  # no --threads: the stage chooses
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    p = _busy_process()
    try:
        for name in ("adaptive", "chosen"):
            run = tmp_path / name
            shutil.copytree(encoded, run)
            if name == "chosen":
                monkeypatch.setattr(threads, "_explicit", 2)  # --threads 2: kept, whatever the load
            torch.set_num_threads(2)
            run_train(str(run), _cfg(generations=1, epochs=2, imitation_epochs=1), **QUIET)
            assert torch.get_num_threads() == 2  # the count before the stage is restored after it
            runtime = json.loads((run / "stages" / "train.json").read_text())["runtime"]
            if name == "adaptive":  # beside one busy process, on fewer threads than allowed CPUs
                assert runtime["threads"] <= threads.cpus_allowed() - 1
                assert max(runtime["threads_used"]) <= threads.cpus_allowed() - 1, runtime
                assert run_info(str(run))["stages"]["train"]["threads_used"] == runtime["threads_used"]
            else:
                assert runtime["threads"] == 2 and "threads_used" not in runtime
    finally:
        p.kill()
        p.wait()


def test_one_thread_blocks_unless_a_count_is_chosen(monkeypatch):
    from threadpoolctl import threadpool_info

    from tailfuse import threads

    monkeypatch.setattr(threads, "_explicit", None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    with threads.one_thread():
        assert torch.get_num_threads() == 1
        assert all(i["num_threads"] == 1 for i in threadpool_info() if i["user_api"] in ("blas", "openmp"))
    assert torch.get_num_threads() == 2

    @threads.adaptive
    def stage():
        with threads.one_thread():
            threads._governor.next = 0.0  # a reading is due
            threads.adapt()  # an adaptive stage's reading does not undo the block
            return torch.get_num_threads()

    assert stage() == 1 and torch.get_num_threads() == 2
    monkeypatch.setattr(threads, "_explicit", 2)  # --threads 2
    with threads.one_thread():
        assert torch.get_num_threads() == 2


def test_no_imitation_ablation_is_kept_beside_the_default(tmp_path, encoded):
    run = tmp_path / "run"
    shutil.copytree(encoded, run)
    run_train(str(run), _cfg(epochs=1), **QUIET)
    run_train(str(run), _cfg(epochs=1, no_imitation=True), **QUIET)
    info = run_info(str(run))
    assert info["train"]["imitation_agreement"] is not None
    assert info["train_no_imitation"]["imitation_agreement"] is None
    rec = json.loads((run / "stages" / "train-no-imitation.json").read_text())
    assert rec["phases"] == ["interaction:0", "interaction:1"]


def test_train_needs_an_encoded_run(tmp_path):
    with pytest.raises(TailfuseError, match="does not exist"):
        run_train(str(tmp_path / "none"), _cfg(), **QUIET)


@pytest.mark.shared
@pytest.mark.slow
def test_short_real_run_on_isic_latents(tmp_path, isic_dir, taesd_path):
    """TAESD latents of real ISIC images: the loss falls, imitation sharpens the code from one generation to the
    next, C learns the labels from the code, and the code keeps carrying the image (the untrained E is already the
    k-means quantiser of the latent, so reconstruction must stay within the issue's bars while C learns)."""
    manifest = subset_manifest(isic_dir, tmp_path / "in" / "isic.csv", per_label=20, splits=("train", "val"))
    run = tmp_path / "run"
    run_encode(DataConfig(data=str(manifest)), VAEConfig(vae=str(taesd_path)), EncodeConfig(), str(run), **QUIET)
    cfg = TrainConfig(generations=3, epochs=3, imitation_epochs=2)
    rec = run_train(str(run), cfg, **QUIET)
    epochs = [json.loads(x) for x in (run / "train" / "epochs.jsonl").read_text().splitlines()]
    inter = [e for e in epochs if e["phase"] == "interaction"]
    assert inter[-1]["loss"] < inter[0]["loss"]
    gens = [json.loads(x) for x in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [g["generation"] for g in gens] == [0, 1, 2]
    assert gens[-1]["sparsity"] > gens[0]["sparsity"] and gens[-1]["sparsity"] > 0.7
    init, last = rec["init"], rec["last"]
    assert last["recon_rel_l1"] <= 0.5 and last["recon_rel_l1_hard"] <= 0.6
    assert last["val_map"] > init["map"] + 0.05
    assert last["imitation_agreement"] > 0.5
    assert last["psnr_val"]["soft"] > last["psnr_val"]["mean_latent"] + 5
