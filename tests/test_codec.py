import json

import pytest
import torch

from tailfuse.codec import VAECodec
from tailfuse.errors import TailfuseError
from tiny import tiny_autoencoder_kl, tiny_autoencoder_tiny


@pytest.fixture(scope="module")
def kl_dir(tmp_path_factory):
    return tiny_autoencoder_kl(tmp_path_factory.mktemp("kl"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_autoencoder_tiny(tmp_path_factory.mktemp("tiny"))


def test_autoencoder_kl_posterior_mean_and_config_scaling(kl_dir):
    codec = VAECodec.load(str(kl_dir))
    assert codec.kind == "AutoencoderKL"
    assert codec.scaling_factor == 0.5 and codec.shift_factor == 0.1  # read from config, not hard-coded
    x = torch.rand(3, 3, 32, 32)
    z = codec.encode(x)
    assert z.shape == (3, 4, 4, 4) and codec.latent_shape(32) == (4, 4, 4)
    # deterministic: the posterior mean, not a sample
    assert torch.equal(z, codec.encode(x))
    mean = codec.vae.encode(x * 2 - 1).latent_dist.mean
    torch.testing.assert_close(z, (mean - 0.1) * 0.5)
    # decode undoes the scaling before the VAE decoder
    img = codec.decode(z)
    ref = ((codec.vae.decode(mean).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(img, ref)
    assert img.min() >= 0 and img.max() <= 1


def test_stable_diffusion_folder_uses_vae_subfolder(tmp_path):
    folder = tiny_autoencoder_kl(tmp_path / "sd", scaling_factor=0.18215, shift_factor=None, sd_layout=True)
    codec = VAECodec.load(str(folder))
    assert codec.scaling_factor == pytest.approx(0.18215) and codec.shift_factor == 0.0
    assert codec.encode(torch.rand(1, 3, 32, 32)).shape == (1, 4, 4, 4)


def test_autoencoder_tiny_class_read_from_config(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderTiny"
    codec = VAECodec.load(str(tiny_dir))
    assert codec.kind == "AutoencoderTiny" and codec.downsample == 8
    x = torch.rand(2, 3, 64, 64)
    z = codec.encode(x)
    assert z.shape == (2, 4, 8, 8)
    torch.testing.assert_close(z, codec.vae.encode(x * 2 - 1).latents)
    assert codec.decode(z).shape == (2, 3, 64, 64)


def test_identity_hashes_weights(kl_dir, tiny_dir):
    a, b = VAECodec.load(str(kl_dir)), VAECodec.load(str(tiny_dir))
    assert len(a.weights_sha256) == 64 and a.weights_sha256 != b.weights_sha256
    assert a.fingerprint() == VAECodec.load(str(kl_dir) + "/").fingerprint()


def test_load_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("TAILFUSE_VAE", raising=False)
    with pytest.raises(TailfuseError, match="no VAE given"):
        VAECodec.load(None)
    with pytest.raises(TailfuseError, match="does not exist"):
        VAECodec.load(str(tmp_path / "nope" / "deeper"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TailfuseError, match="holds no config.json"):
        VAECodec.load(str(tmp_path / "empty"))
    with pytest.raises(TailfuseError, match="dtype"):
        VAECodec.load(str(tmp_path / "empty"), dtype="float64")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_asked_for_without_cuda(tiny_dir):
    with pytest.raises(TailfuseError, match="CUDA is not available"):
        VAECodec.load(str(tiny_dir), device="cuda")


def test_unreachable_hub_id_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TailfuseError, match="could not be fetched"):
        VAECodec.load("no-such-org/no-such-vae")


@pytest.mark.shared
def test_taesd_round_trip_psnr_on_isic(taesd_path, isic_dir):
    """The real TAESD on real ISIC images: encode-decode PSNR floor 27 dB (measured ~30.8 dB on 64 images)."""
    from tailfuse.images import load_image

    codec = VAECodec.load(str(taesd_path))
    x = torch.stack([load_image(str(isic_dir / "images" / f"{i:05d}.png"), 128) for i in range(0, 320, 10)])
    y = codec.decode(codec.encode(x))
    mse = ((y - x) ** 2).mean(dim=(1, 2, 3))
    psnr = (10 * torch.log10(1 / mse)).mean().item()
    assert psnr > 27.0, psnr


def test_large_batches_are_sliced_to_one_image_per_pass(taesd_path, isic_dir, monkeypatch):
    """Above PIXELS_PER_PASS pixels a batch goes through the real TAESD one image at a time (diffusers' slicing),
    with the same result as the batch at once; at the default 128 px a batch of 32 is one pass."""
    from tailfuse import codec as codec_mod
    from tailfuse.images import load_image

    codec = VAECodec.load(str(taesd_path))
    x = torch.stack([load_image(str(isic_dir / "images" / f"{i:05d}.png"), 128) for i in range(4)])
    z = codec.encode(x)
    assert codec.vae.use_slicing is False
    whole = codec.decode(z)
    assert codec.vae.use_slicing is False
    calls = []
    inner = codec.vae.decoder.forward
    monkeypatch.setattr(codec.vae.decoder, "forward", lambda t: calls.append(len(t)) or inner(t))
    monkeypatch.setattr(codec_mod, "PIXELS_PER_PASS", 2 * 128 * 128)  # as if the images were 4x the default
    sliced = codec.decode(z)
    assert codec.vae.use_slicing is True and calls == [1, 1, 1, 1]
    assert torch.allclose(whole, sliced, atol=1e-5)
    assert torch.allclose(codec.encode(x), z, atol=1e-5)


def test_cpu_codec_runs_channels_last_with_the_nchw_result(taesd_path, isic_dir):
    """On CPU the real TAESD runs in channels-last layout (faster with oneDNN); its latents and images equal a plain
    NCHW pass of the same weights up to float rounding, and come back contiguous NCHW (safetensors needs that)."""
    from tailfuse.images import load_image

    codec = VAECodec.load(str(taesd_path))
    assert codec.memory_format is torch.channels_last
    assert codec.vae.decoder.layers[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.stack([load_image(str(isic_dir / "images" / f"{i:05d}.png"), 128) for i in range(4)])
    z = codec.encode(x)
    y = codec.decode(z)
    assert z.is_contiguous() and y.is_contiguous()
    plain = VAECodec.load(str(taesd_path))
    plain.memory_format = torch.contiguous_format
    plain.vae.to(memory_format=torch.contiguous_format)
    assert plain.vae.decoder.layers[0].weight.is_contiguous()
    torch.testing.assert_close(z, plain.encode(x), atol=1e-4, rtol=0)
    torch.testing.assert_close(y, plain.decode(z), atol=1e-4, rtol=0)
    assert (y - x).abs().mean() < 0.05  # and it is still a round trip of the image


@pytest.mark.shared
def test_bfloat16_taesd_decodes_within_rounding_of_float32(taesd_path, isic_dir):
    """`--dtype bfloat16` (several times faster on CPUs with AMX, benchmarks/results/codec-dtype.md): the real TAESD
    in bfloat16 gives float32 latents and images on CPU, its decode of float32's latents is within 40 dB PSNR of
    float32's (measured 55 dB), its round trip is still one (floor 27 dB, as float32's), and the dtype is part of
    the codec's identity, so a run decoded in bfloat16 is not taken for a float32 one."""
    from tailfuse.images import load_image

    f32, b16 = VAECodec.load(str(taesd_path)), VAECodec.load(str(taesd_path), dtype="bfloat16")
    assert next(b16.vae.parameters()).dtype is torch.bfloat16
    x = torch.stack([load_image(str(isic_dir / "images" / f"{i:05d}.png"), 128) for i in range(0, 80, 10)])
    z = f32.encode(x)
    y32, y16 = f32.decode(z), b16.decode(z)
    assert y16.dtype is torch.float32 and b16.encode(x).dtype is torch.float32
    psnr = lambda a, b: (10 * torch.log10(1 / ((a - b) ** 2).mean())).item()  # noqa: E731
    assert 40 < psnr(y16, y32) < 100, psnr(y16, y32)  # close, and not the float32 path itself
    assert psnr(b16.decode(b16.encode(x)), x) > 27.0
    assert f32.fingerprint() != b16.fingerprint() and b16.identity()["dtype"] == "bfloat16"
