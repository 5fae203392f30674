import numpy as np
import pytest
import torch
from PIL import Image

from tailfuse.images import BadImage, load_image


def _save(tmp_path, name, img):
    p = tmp_path / name
    img.save(p)
    return str(p)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA", "CMYK", "I;16"])
def test_any_mode_becomes_rgb_of_the_requested_size(tmp_path, mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (40, 60), dtype=np.uint16))
        name = "x.png"
    else:
        img = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).convert(mode)
        name = "x.tiff" if mode == "CMYK" else "x.png"
    x = load_image(_save(tmp_path, name, img), 32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1


def test_sixteen_bit_keeps_precision(tmp_path):
    a = np.full((16, 16), 1000, dtype=np.uint16)
    x = load_image(_save(tmp_path, "g16.png", Image.fromarray(a)), 16)
    assert x[0, 0, 0].item() == pytest.approx(1000 / 65535, abs=1e-5)  # not rounded to 8 bits (0 or 1/255)


def test_transparent_pixels_composited_onto_black(tmp_path):
    a = np.zeros((8, 8, 4), dtype=np.uint8)
    a[..., 0] = 255  # red, fully transparent
    x = load_image(_save(tmp_path, "t.png", Image.fromarray(a, "RGBA")), 8)
    assert x.abs().max().item() == 0


def test_resize_policies(tmp_path):
    # 20 x 40 image: left half black, right half white
    a = np.zeros((20, 40, 3), dtype=np.uint8)
    a[:, 20:] = 255
    p = _save(tmp_path, "w.png", Image.fromarray(a))
    crop = load_image(p, 20, "center-crop")  # crops the middle 20 columns: half black half white
    assert crop[:, :, :8].max() < 0.05 and crop[:, :, 12:].min() > 0.95
    pad = load_image(p, 20, "pad")  # 10 x 20 content, padded with black bands top and bottom
    assert pad[:, :4].max() == 0 and pad[:, -4:].max() == 0 and pad[:, 8:12, 15:].min() > 0.9
    st = load_image(p, 20, "stretch")
    assert st[:, :, :8].max() < 0.05 and st[:, :, 12:].min() > 0.95
    with pytest.raises(ValueError, match="unknown resize policy"):
        load_image(p, 20, "zoom")


def test_bad_files_raise_bad_image_with_reason(tmp_path):
    with pytest.raises(BadImage, match="file not found"):
        load_image(str(tmp_path / "missing.png"), 8)
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(BadImage, match="zero-byte"):
        load_image(str(tmp_path / "zero.png"), 8)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(BadImage, match="not a readable image"):
        load_image(str(tmp_path / "text.png"), 8)
    p = _save(tmp_path, "full.png", Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    data = open(p, "rb").read()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImage, match="truncated"):
        load_image(str(tmp_path / "trunc.png"), 8)
