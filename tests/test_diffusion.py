"""The diffusion step: the latent prior (train, resume), samplers, refinement (prior and a tiny Stable Diffusion
pipeline built in code), pure sampling, the diffusion arms of `tailfuse evaluate`, and the same on real data."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from tailfuse.config import (DataConfig, DecodeConfig, EncodeConfig, FuseConfig, PriorConfig, RefineConfig,
                             TrainConfig, VAEConfig)
from tailfuse.decode import run_decode
from tailfuse.diffusion import samplers
from tailfuse.diffusion.prior import LatentPrior
from tailfuse.diffusion.refine import run_refine, run_sample
from tailfuse.diffusion.train_prior import load_prior, run_train_prior
from tailfuse.encode import run_encode
from tailfuse.errors import TailfuseError
from tailfuse.fusion.stage import latent_set, run_fuse
from tailfuse.store import RunStore
from tailfuse.train import run_train
from tiny import coloured_manifest, tiny_autoencoder_tiny

QUIET = dict(progress=False)
TINY_PRIOR = dict(block_out_channels=[8, 16], epochs=3, batch_size=16)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A multi-class run (tiny VAE, 48 coloured random images at 64 px), a tiny sparse model, a fused set, a prior."""
    root = tmp_path_factory.mktemp("diffusion")
    vae = str(tiny_autoencoder_tiny(root / "vae"))
    coloured_manifest(root, 48, 36)
    run = root / "run"
    run_encode(DataConfig(data=str(root / "in" / "m.csv"), image_size=64, tail_labels=["t"]), VAEConfig(vae=vae),
               EncodeConfig(batch_size=16, shard_size=32), str(run), **QUIET)
    run_train(str(run), TrainConfig(generations=1, epochs=1, k=8, dim=4, tau=0.3, width_e=8, blocks_e=1, width_d=8,
                                    blocks_d=1, width_c=8, batch_size=16), **QUIET)
    run_fuse(str(run), FuseConfig(per_class=6, batch_size=4), **QUIET)
    run_train_prior(str(run), PriorConfig(**TINY_PRIOR), **QUIET)
    return run


def test_prior_trains_saves_and_resumes_to_the_same_weights(tmp_path, run_dir):
    store = RunStore(run_dir)
    rec = store.stage("prior")
    assert rec["status"] == "done" and rec["epochs"] == 3 and rec["n_train"] == 36
    rows = [json.loads(x) for x in (run_dir / "prior" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2] and all(np.isfinite(r["val_loss"]) for r in rows)
    assert (run_dir / "prior" / "loss.png").stat().st_size > 0 and not (run_dir / "prior" / "state.pt").exists()
    model, sha = load_prior(store)
    assert isinstance(model, LatentPrior) and len(sha) == 64
    assert model.config["labels"] == ["a", "b", "t"] and len(model.config["mean"]) == 4
    # killed after epoch 1, resumed: the same final weights as the uninterrupted run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("prior", "eval"))
    (run / "stages" / "prior.json").unlink()
    import tailfuse.diffusion.train_prior as tp

    orig = tp.write_text_atomic
    calls = {"n": 0}

    def dying(path, text):
        orig(path, text)
        if str(path).endswith("metrics.jsonl"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt

    tp.write_text_atomic = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            run_train_prior(str(run), PriorConfig(**TINY_PRIOR), **QUIET)
    finally:
        tp.write_text_atomic = orig
    assert RunStore(run).stage("prior")["status"] == "running" and (run / "prior" / "state.pt").is_file()
    run_train_prior(str(run), PriorConfig(**TINY_PRIOR), **QUIET)
    a, _ = load_prior(store)
    b, _ = load_prior(RunStore(run))
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k
    with pytest.raises(TailfuseError, match="other settings"):
        run_train_prior(str(run), PriorConfig(**{**TINY_PRIOR, "epochs": 4}), **QUIET)


def test_refinement_is_identity_at_zero_steps_and_grows_with_d(tmp_path, run_dir):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    store = RunStore(run)
    _, src, _ = latent_set(store, "synthetic")
    ids, z0 = src.load_all()
    change = []
    for d in (0, 2, 5, 10):
        rec = run_refine(str(run), RefineConfig(refine=f"{d}/10", name=f"r{d}", batch_size=5), **QUIET)
        assert rec["status"] == "done" and rec["settings"]["d"] == d
        rid, z = latent_set(store, f"r{d}")[1].load_all()
        assert np.array_equal(rid, ids) and torch.isfinite(z).all()
        change.append(float((z - z0).abs().mean()))
    assert change[0] == 0.0  # d = 0: the fused latents, unchanged
    assert change[1] < change[2] < change[3]  # the change grows with the strength d / N
    # provenance of the refined set: the fused sample's plus how it was refined
    table = pd.read_csv(run / "r5" / "samples.csv")
    assert {"refine_d", "refine_n", "guidance", "refiner", "refiner_sha256", "refine_seed", "tail_sample_id"} <= set(table.columns)
    assert (table["refine_d"] == 5).all() and (table["refiner"] == "prior:prior").all()
    # decoding works on a refined set like on any other, pixel detail included (the fusion mask travels with it)
    dec = run_decode(str(run), DecodeConfig(name="r5", pixel_detail=True), **QUIET)
    man = pd.read_csv(run / "r5" / "manifest.csv")
    assert dec["n_images"] == len(man) == 6 and all((run / "r5" / p).is_file() for p in man["path"])
    # deterministic and independent of batching: each sample's noise is its own, so batches of 2 give the latents of
    # batches of 5 up to float rounding (kernels chosen by batch shape round differently on different CPUs); a batch
    # sharing one noise draw would differ by the size of the noise (about 1)
    run_refine(str(run), RefineConfig(refine="5/10", name="r5b", batch_size=2), **QUIET)
    torch.testing.assert_close(latent_set(store, "r5b")[1].load_all()[1], latent_set(store, "r5")[1].load_all()[1],
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(TailfuseError, match="d/N"):
        run_refine(str(run), RefineConfig(refine="12", name="bad"), **QUIET)
    with pytest.raises(TailfuseError, match="0 <= d <= N"):
        run_refine(str(run), RefineConfig(refine="12/10", name="bad"), **QUIET)
    with pytest.raises(TailfuseError, match="no latent set 'nope'"):
        run_refine(str(run), RefineConfig(source="nope"), **QUIET)


def test_guidance_wrapper_combines_conditional_and_unconditional():
    class Toy(torch.nn.Module):
        def forward(self, x, t, y, uncond):
            return torch.where(uncond[:, None, None, None], torch.zeros_like(x), torch.ones_like(x) * y[:, :1, None, None])

    y = torch.tensor([[2.0], [3.0]])
    x = torch.zeros(2, 1, 2, 2)
    for w, want in ((0.0, 0.0), (1.0, 1.0), (2.5, 2.5)):
        out = samplers.guided(Toy(), y, w)(x, 10)
        torch.testing.assert_close(out, want * y[:, :, None, None].expand_as(x))


def test_pure_sampling_makes_a_decodable_latent_set(tmp_path, run_dir):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    rec = run_sample(str(run), {"t": 5}, steps=4, guidance=2.0, **QUIET)
    assert rec["n_synthetic"] == 5
    table = pd.read_csv(run / "prior-sample" / "samples.csv")
    assert (table["tail_label"] == "t").all() and (table["t"] == 1).all() and (table["steps"] == 4).all()
    dec = run_decode(str(run), DecodeConfig(name="prior-sample"), **QUIET)
    assert dec["n_images"] == 5
    with pytest.raises(TailfuseError, match="--pixel-detail needs a fused set"):
        run_decode(str(run), DecodeConfig(name="prior-sample", pixel_detail=True), force=True, **QUIET)


def _tiny_sd(folder, vae_folder):
    """A tiny Stable Diffusion folder built in code: UNet2DConditionModel, CLIPTextModel, a CLIPTokenizer whose
    vocabulary this function writes, a DDIM scheduler config, and the given VAE."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                         attention_head_dim=2, norm_num_groups=4).save_pretrained(folder / "unet")
    chars = sorted(ByteLevel.alphabet())  # a byte-level BPE vocabulary of single characters, no merges
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16).save_pretrained(folder / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                 num_hidden_layers=1, max_position_embeddings=16, projection_dim=16,
                                 bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                 pad_token_id=vocab["<|endoftext|>"])).save_pretrained(folder / "text_encoder")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(folder / "scheduler")
    shutil.copytree(vae_folder, folder / "vae")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def test_stable_diffusion_refinement_with_a_tiny_pipeline(tmp_path, run_dir):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    store = RunStore(run)
    sd = _tiny_sd(tmp_path / "sd", run_dir.parent / "vae")  # the run's own VAE: the same latent space
    rec = run_refine(str(run), RefineConfig(sd=str(sd), refine="3/10", prompt_template="a scan with {labels}",
                                            name="sd3"), **QUIET)
    assert rec["refiner"].startswith("sd:") and rec["latent_space_cosine"] > 0.99
    _, z0 = latent_set(store, "synthetic")[1].load_all()
    _, z = latent_set(store, "sd3")[1].load_all()
    assert z.shape == z0.shape and torch.isfinite(z).all() and not torch.equal(z, z0)
    run_refine(str(run), RefineConfig(sd=str(sd), refine="0/10", name="sd0"), **QUIET)
    assert torch.equal(latent_set(store, "sd0")[1].load_all()[1], z0)
    from tailfuse.diffusion.sd import SDRefiner

    r = SDRefiner(store, str(sd), "a scan with {labels}")
    assert r.prompt(np.array([0, 1, 1])) == "a scan with b, t"
    # a model whose VAE is another latent space is refused
    other = tmp_path / "other-vae"
    tiny_autoencoder_tiny(other)
    from diffusers import AutoencoderTiny

    torch.manual_seed(7)
    m = AutoencoderTiny.from_pretrained(other)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    m.save_pretrained(other)
    shutil.rmtree(sd / "vae")
    shutil.copytree(other, sd / "vae")
    with pytest.raises(TailfuseError, match="does not share the run's latent space"):
        run_refine(str(run), RefineConfig(sd=str(sd), refine="3/10", name="sdx"), **QUIET)
    with pytest.raises(TailfuseError, match="not a local folder"):
        run_refine(str(run), RefineConfig(sd="some/hub-id", name="sdy"), **QUIET)


def test_diffusion_arms_in_evaluate(tmp_path, run_dir):
    from tailfuse.evaluation.config import EvaluateConfig
    from tailfuse.evaluation.harness import run_evaluate

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    # a test split for the evaluation: the last 8 val images become test images (2 of them tail images)
    samples = pd.read_csv(run / "samples.csv")
    samples.loc[samples.index[-8:], "split"] = "test"
    samples.to_csv(run / "samples.csv", index=False)
    cfg = EvaluateConfig(arms=["real", "vae-roundtrip", "tailfuse-refined[refine=3/10]", "prior-sample[steps=4]",
                               "feature-diffusion[epochs=3,steps=4]"], seeds=[0], per_class=4, bootstrap=20)
    res = run_evaluate(str(run), cfg, **QUIET)
    for arm in cfg.arms[1:]:
        assert res["arms"][arm]["n_added"] == 4 and res["arms"][arm]["map_tail"] is not None, arm
    refined = pd.read_csv(run / "eval" / "tailfuse-refined--refine-3_10-refined" / "samples.csv")
    assert (refined["refine_d"] == 3).all()
    q = res["quality"]["sets"]
    assert {"tailfuse-refined[refine=3/10]", "prior-sample[steps=4]"} <= set(q)  # no images for feature-diffusion
    for name, s in q.items():
        assert 0 <= s["memorisation"]["share"] <= 1 and s["memorisation"]["n"] >= (2 if name.startswith("floor") else 4)


def test_a_prior_trained_on_low_timesteps_refuses_schedules_beyond_them(tmp_path, run_dir):
    """`train-prior --t-max 300`: refinement that starts below timestep 300 runs; one that starts above it, and
    sampling from noise, are refused before any work with what to change."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("prior"))
    (run / "stages" / "prior.json").unlink()
    run_train_prior(str(run), PriorConfig(**{**TINY_PRIOR, "epochs": 1, "t_max": 300}), **QUIET)
    assert json.loads((run / "prior" / "model" / "config.json").read_text())["t_range"] == [0, 300]
    rec = run_refine(str(run), RefineConfig(refine="15/50", name="low"), **QUIET)  # starts at timestep 280
    assert rec["status"] == "done"
    with pytest.raises(TailfuseError, match="below 300 .*start at timestep 380"):
        run_refine(str(run), RefineConfig(refine="20/50", name="high"), **QUIET)
    assert not (run / "high").exists()
    with pytest.raises(TailfuseError, match="--t-max"):
        run_sample(str(run), {"t": 2}, steps=10, **QUIET)
