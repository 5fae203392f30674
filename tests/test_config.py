import pytest

from tailfuse.config import DataConfig, load_yaml, resolve, stable_hash
from tailfuse.errors import TailfuseError


def test_precedence_defaults_yaml_cli(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("data:\n  image_size: 64\n  head_share: 0.5\nencode:\n  batch_size: 4\n")
    doc = load_yaml(y)
    data = resolve("data", doc, {"image_size": 256, "seed": None})
    assert data.image_size == 256  # CLI wins
    assert data.head_share == 0.5  # YAML wins over default
    assert data.resize == DataConfig().resize  # default
    assert resolve("encode", doc, {}).batch_size == 4


def test_unknown_keys_and_sections_are_errors(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("data:\n  image_sise: 64\n")
    with pytest.raises(TailfuseError, match="unknown setting 'image_sise'"):
        resolve("data", load_yaml(y), {})
    y.write_text("dataa:\n  image_size: 64\n")
    with pytest.raises(TailfuseError, match="unknown section 'dataa'"):
        load_yaml(y)


def test_stable_hash_ignores_key_order():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
