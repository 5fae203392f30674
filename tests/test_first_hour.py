"""What a second newcomer's first hour tripped over (issue 25): a run folder beside the data, hints with paths that
need quoting, the usage block on a bad option, parent folders left by an early failure, fusion flags missing from
`run --help`."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pandas as pd
import pytest

from tailfuse.cli import build_parser, main
from tailfuse.errors import TailfuseError
from tailfuse.stage import redo_command
from tailfuse.store import RunStore
from tiny import coloured_manifest, tiny_autoencoder_tiny


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> str:
    return str(tiny_autoencoder_tiny(tmp_path_factory.mktemp("vae")))


def _encode(manifest: Path, run: Path, vae: str) -> int:
    return main(["encode", "--data", str(manifest), "--vae", vae, "--run", str(run), "--image-size", "64", "--quiet"])


def test_a_run_folder_beside_the_data_is_fine_and_one_in_the_input_is_refused(tmp_path, tiny_vae, capsys):
    manifest = coloured_manifest(tmp_path, n=20, n_train=15)  # <tmp>/in/m.csv, images in <tmp>/in/img/
    project = manifest.parent
    # the README's own usage: a project folder holding the manifest, the images and runs/
    assert _encode(manifest, project / "runs" / "x", tiny_vae) == 0
    assert RunStore(project / "runs" / "x").stage("encode")["status"] == "done"
    # with absolute image paths in a manifest that lies in the project folder too
    m = pd.read_csv(manifest)
    m["path"] = [str((project / p).resolve()) for p in m["path"]]
    m.to_csv(project / "abs.csv", index=False)
    assert _encode(project / "abs.csv", project / "runs" / "abs", tiny_vae) == 0
    capsys.readouterr()
    # refused, before anything is written: inside the folder of the images, the folder of the manifest itself
    for run, why in ((project / "img" / "run", "holds input images"), (project, "folder of the manifest")):
        before = sorted(p for p in project.rglob("*") if "runs" not in p.parts)
        assert _encode(manifest, run, tiny_vae) == 2
        assert why in capsys.readouterr().err
        assert sorted(p for p in project.rglob("*") if "runs" not in p.parts) == before
    # a class-folder input: a run folder anywhere inside it is refused (it would read as a class)
    folder = tmp_path / "classes"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
    with pytest.raises(TailfuseError, match="holds input images"):
        from tailfuse.config import DataConfig
        from tailfuse.data import input_locations

        RunStore(folder / "runs" / "x").check_outside(input_locations(DataConfig(data=str(folder))))


def test_commands_in_hints_quote_paths_with_spaces(tmp_path, capsys):
    run = tmp_path / "my runs" / "run 1"
    for name in ("encode", "train", "train-no-imitation", "fuse-synthetic", "decode-my set", "prior"):
        words = shlex.split(redo_command(RunStore(run), name))
        assert words[words.index("--run") + 1] == str(run)
        if "--name" in words:
            assert words[words.index("--name") + 1] in ("my set", "synthetic", "prior", "train-no-imitation")
    (tmp_path / "my runs").mkdir()
    for command in ("train", "decode"):
        assert main([command, "--run", str(run)]) == 2
        hint = re.search(r"`(tailfuse [^`]+)`", capsys.readouterr().err).group(1)
        words = shlex.split(hint)  # the hint pastes as one command whose --run is the folder, spaces and all
        assert words[words.index("--run") + 1] == str(run)


def test_a_bad_option_prints_one_line_not_the_usage_block(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--per-class", "abc"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "tailfuse run: error: argument --per-class: invalid int value: 'abc'"
    assert len(err) == 2 and "--help" in err[1] and not any(line.startswith("usage:") for line in err)


def test_an_early_failure_removes_the_parent_folders_it_made(tmp_path, capsys):
    (tmp_path / "kept").mkdir()
    run = tmp_path / "kept" / "new" / "deeper" / "run"
    assert main(["run", "--data", str(tmp_path / "missing.csv"), "--run", str(run), "--vae", "x", "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "kept" / "new").exists() and (tmp_path / "kept").is_dir()  # what existed before stays


def test_run_has_every_fusion_flag_of_fuse():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices

    def flags(cmd: str) -> set[str]:
        return {o for a in sub[cmd]._actions for o in a.option_strings}

    for flag in ("--fill-prob", "--neighbours", "--feather", "--detail", "--q-spread", "--saliency-smooth"):
        assert flag in flags("run")  # the README names them as flags of both commands
    # every fuse option is a run option too, except those run fixes itself (which model, which set, the seed)
    assert flags("fuse") - flags("run") <= {"--model", "--generation", "--name", "--force"}
