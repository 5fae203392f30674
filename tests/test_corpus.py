"""The bad-input corpus: images, manifests, options and run folders a careful user will meet, built in code from
real ISIC2018-LT images, each with its expected outcome (the message, or the reason it is skipped) and never a
traceback. Runs in CI."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tailfuse.cli import main
from tailfuse.store import LOCK_NAME, RunLock, RunStore

pytestmark = pytest.mark.shared
SRC = Path(__file__).resolve().parents[1] / "src"


def _cli(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(args)
    text = err.getvalue()
    assert "Traceback" not in text, text
    return rc, text


@pytest.fixture(scope="module")
def corpus(isic_dir, tmp_path_factory):
    """A folder of real images (2 labels, 8 each) plus one of every kind of bad or unusual image file."""
    root = tmp_path_factory.mktemp("corpus")
    img = root / "in" / "images"
    img.mkdir(parents=True)
    m = pd.read_csv(isic_dir / "manifest.csv")
    rows = []
    for lab in ("NV", "MEL"):
        for i, p in enumerate(m[m[lab] == 1]["path"][:8]):
            dst = img / f"{lab}-{i}.png"
            shutil.copy(isic_dir / p, dst)
            rows.append({"path": f"images/{dst.name}", "split": "train" if i < 6 else "val", "NV": int(lab == "NV"),
                         "MEL": int(lab == "MEL")})
    real = Image.open(isic_dir / m["path"][0]).convert("RGB")
    odd = {}  # file name -> expected skip reason (None: read fine)
    data = (isic_dir / m["path"][1]).read_bytes()
    (img / "truncated.png").write_bytes(data[: len(data) // 2])
    odd["truncated.png"] = "truncated"
    (img / "zero.png").write_bytes(b"")
    odd["zero.png"] = "zero-byte file"
    (img / "text.png").write_text("this is not an image")
    odd["text.png"] = "not a readable image"
    Image.new("RGB", (1, 1)).save(img / "one.png")
    odd["one.png"] = "image too small"
    real.resize((3000, 2400)).save(img / "huge.png")
    odd["huge.png"] = None
    Image.fromarray((np.asarray(real.convert("L"), dtype=np.uint16) * 257)).save(img / "sixteen.png")
    odd["sixteen.png"] = None
    real.convert("RGBA").save(img / "rgba.png")
    odd["rgba.png"] = None
    real.convert("CMYK").save(img / "cmyk.jpg")
    odd["cmyk.jpg"] = None
    os.symlink(img / "loop-b.png", img / "loop-a.png")
    os.symlink(img / "loop-a.png", img / "loop-b.png")
    odd["loop-a.png"] = "symbolic link loop"
    (img / "folder.png").mkdir()
    odd["folder.png"] = "is a folder"
    odd["x" * 300 + ".png"] = "path too long"
    real.save(img / "ünïcode name with spaces.png")
    odd["ünïcode name with spaces.png"] = None
    for i, name in enumerate(odd):
        rows.append({"path": f"images/{name}", "split": "train", "NV": int(i % 2 == 0), "MEL": int(i % 2 == 1)})
    pd.DataFrame(rows).to_csv(root / "in" / "manifest.csv", index=False)
    return {"root": root, "manifest": root / "in" / "manifest.csv", "odd": odd, "good": len(rows) - len(odd)}


@pytest.fixture(scope="module")
def encoded(corpus, taesd_path):
    run = corpus["root"] / "run"
    rc, err = _cli(["encode", "--data", str(corpus["manifest"]), "--vae", str(taesd_path), "--run", str(run), "--quiet"])
    assert rc == 0, err
    return run


def test_every_bad_image_is_skipped_with_its_reason_and_the_rest_encoded(corpus, encoded):
    skipped = pd.read_csv(encoded / "skipped.csv")
    reasons = dict(zip(skipped["path"].str.replace("images/", "", regex=False), skipped["reason"]))
    for name, want in corpus["odd"].items():
        if want is None:
            assert name not in reasons, (name, reasons.get(name))
        else:
            assert want in reasons[name], (name, reasons[name])
    kept = RunStore(encoded).samples()
    assert len(kept) == corpus["good"] + sum(v is None for v in corpus["odd"].values())
    info = json.loads((encoded / "labels.json").read_text())
    assert info["counts"]["NV"]["train"] + info["counts"]["MEL"]["train"] == int((kept["split"] == "train").sum())
    # the input folder is never written to
    assert not any(p.name.startswith(".") for p in (corpus["root"] / "in" / "images").iterdir() if p.is_file())


def test_every_bad_manifest_gets_one_clear_line(corpus, taesd_path, tmp_path):
    good = [str(p) for p in sorted((corpus["root"] / "in" / "images").glob("*-*.png"))][:16]
    nv = [g for g in good if "NV-" in g]
    mel = [g for g in good if "MEL-" in g]

    def rows(values, labels=("a", "b"), sep=","):
        head = sep.join(["path", *labels])
        return head + "\n" + "\n".join(sep.join([p, *map(str, v)]) for p, v in values) + "\n"

    ok = [(p, (1, 0)) for p in nv] + [(p, (0, 1)) for p in mel]
    cases = {
        "empty": ("", "is empty"),
        "header only": ("path,a,b\n", "has a header but no rows"),
        "no labels": ("path\n" + "\n".join(good) + "\n", "has no label columns"),
        "not 0/1": (rows(ok[:-1] + [(ok[-1][0], (2, 1))]), "holds values other than 0/1 ('2')"),
        "empty label": (rows(ok[:-1]) + ok[-1][0] + ",,1\n", "holds values other than 0/1 ('')"),
        "single label": ("path,a\n" + "\n".join(f"{p},1" for p in good) + "\n", "single label"),
        "bad split": ("path,split,a,b\n" + "\n".join(f"{p},{'training' if i == 0 else 'train'},{a},{b}"
                                                      for i, (p, (a, b)) in enumerate(ok)) + "\n", "allowed values are train, val, test"),
        "duplicate paths": (rows(ok + [(ok[0][0], (0, 1))]), "share an image path"),
    }
    for name, (text, want) in cases.items():
        csv = tmp_path / "m" / f"{name.replace(' ', '_').replace('/', '')}.csv"
        csv.parent.mkdir(exist_ok=True)
        csv.write_text(text)
        rc, err = _cli(["encode", "--data", str(csv), "--vae", str(taesd_path), "--run", str(tmp_path / "r" / csv.stem),
                        "--quiet"])
        assert rc == 2 and want in err and err.count("\n") == 1, (name, err)
        assert not (tmp_path / "r" / csv.stem).exists(), name  # a refused input leaves no run folder
    # a byte-order mark with CRLF line ends, and semicolons as separators, are read like any CSV
    for name, text in (("bom", "\ufeff" + rows(ok).replace("\n", "\r\n")), ("semicolons", rows(ok, sep=";"))):
        csv = tmp_path / "m" / f"{name}.csv"
        csv.write_bytes(text.encode("utf-8"))
        rc, err = _cli(["encode", "--data", str(csv), "--vae", str(taesd_path), "--run", str(tmp_path / "r" / name), "--quiet"])
        assert rc == 0, (name, err)
        assert json.loads((tmp_path / "r" / name / "labels.json").read_text())["labels"] == ["a", "b"]


def test_bad_options_fail_before_any_work(corpus, taesd_path, tmp_path):
    base = ["run", "--data", str(corpus["manifest"]), "--vae", str(taesd_path), "--quiet"]
    for extra, want in ((["--per-class", "-1"], "--per-class -1"), (["--image-size", "100"], "multiple of 8"),
                        (["--image-size", "0"], "multiple of 8"), (["--refine", "60/50"], "0 <= d <= N")):
        run = tmp_path / "r" / "x"
        rc, err = _cli([*base, *extra, "--run", str(run)])
        assert rc == 2 and want in err, (extra, err)
        assert not run.exists(), extra  # validated before the run folder was made


def test_a_different_dataset_is_refused(encoded, isic_dir, taesd_path, tmp_path):
    from conftest import subset_manifest

    other = subset_manifest(isic_dir, tmp_path / "other" / "m.csv", per_label=1)
    run = tmp_path / "run"
    shutil.copytree(encoded, run)
    rc, err = _cli(["encode", "--data", str(other), "--vae", str(taesd_path), "--run", str(run), "--quiet"])
    assert rc == 2 and "other input data" in err and "--force" in err


def test_concurrent_writers_and_a_stale_lock(encoded, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(encoded, run)
    with RunLock(run, "tailfuse train (a test holding the lock)"):
        rc, err = _cli(["train", "--run", str(run), "--epochs", "1", "--generations", "1", "--quiet"])
        assert rc == 2 and f"in use by process {os.getpid()} on {socket.gethostname()}" in err
        assert _cli(["info", "--run", str(run)])[0] == 0  # reading is never locked
    # a lock left by a killed process does not block: its pid is not alive
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "command": "x", "since": "t"}))
    rc, err = _cli(["train", "--run", str(run), "--epochs", "1", "--generations", "1", "--k", "8", "--quiet"])
    assert rc == 0, err
    assert not (run / LOCK_NAME).exists()


def _as_other_user(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess | None:
    """Run a command as another (unprivileged) user (`nobody`, when we are root and the interpreter is reachable by
    other users); None when that is not possible here."""
    if os.geteuid() != 0:
        return None
    home = Path(tempfile.mkdtemp())
    os.chmod(home, 0o777)
    env = {**os.environ, "PYTHONPATH": str(SRC), "HOME": str(home), "MPLCONFIGDIR": str(home)}
    try:
        return subprocess.run([sys.executable, "-m", "tailfuse", *cmd], env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=300, preexec_fn=lambda: (os.setgid(65534), os.setuid(65534)))
    except PermissionError:  # the interpreter lives where other users cannot go (e.g. under /root)
        return None


def test_another_users_or_a_read_only_run_folder(encoded, monkeypatch):
    shared = Path(tempfile.mkdtemp())
    os.chmod(shared, 0o755)
    run = shared / "run"
    shutil.copytree(encoded, run)
    # every file follows the umask (latent shards included, which safetensors creates 0600), so another user can read
    umask = os.umask(0o022)
    os.umask(umask)
    for p in [*(encoded / "latents").glob("*"), encoded / "samples.csv", encoded / "stages" / "encode.json"]:
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, (p, oct(p.stat().st_mode))
    r = _as_other_user(["info", "--run", str(run), "--json"], shared)
    if r is not None:  # a real second user: reads work, writes fail with one line
        assert r.returncode == 0 and json.loads(r.stdout)["samples"] > 0, r.stderr
        r = _as_other_user(["train", "--run", str(run), "--epochs", "1", "--quiet"], shared)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "permission denied" in lines[0] and str(run) in lines[0], r.stderr
        return
    # no second user here: the operating system's refusal is simulated where the stage creates its folder
    real_mkdir = Path.mkdir

    def refuse(self, *a, **k):
        if str(self).startswith(str(run)):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", refuse)
    rc, err = _cli(["train", "--run", str(run), "--epochs", "1", "--quiet"])
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and "permission denied" in lines[0] and str(run) in lines[0], err


def test_skipped_images_do_not_count(corpus, taesd_path, tmp_path):
    """Counts, the head/tail split and the empty-label check rest on the images kept, not on the manifest's rows."""
    m = pd.read_csv(corpus["manifest"])
    good = m[m["path"].str.contains("-")].copy()
    good["RARE"] = 0
    bad = pd.DataFrame({"path": ["images/zero.png", "images/text.png"], "split": "train", "NV": 0, "MEL": 0, "RARE": 1})
    csv = corpus["root"] / "in" / "rare.csv"
    pd.concat([good, bad]).to_csv(csv, index=False)
    rc, err = _cli(["encode", "--data", str(csv), "--vae", str(taesd_path), "--run", str(tmp_path / "a"), "--quiet"])
    assert rc == 2 and "RARE have no readable image left" in err and "--drop-empty-labels" in err
    rc, err = _cli(["encode", "--data", str(csv), "--vae", str(taesd_path), "--run", str(tmp_path / "b"),
                    "--drop-empty-labels", "--quiet"])
    assert rc == 0, err
    info = json.loads((tmp_path / "b" / "labels.json").read_text())
    assert info["labels"] == ["NV", "MEL"] and "RARE" not in info["counts"]
    # some unreadable images of a label: its counts are those of the images kept
    part = pd.concat([good, bad.assign(RARE=0, MEL=1)])
    part.to_csv(csv, index=False)
    rc, err = _cli(["encode", "--data", str(csv), "--vae", str(taesd_path), "--run", str(tmp_path / "c"), "--quiet",
                    "--drop-empty-labels"])
    assert rc == 0, err
    info = json.loads((tmp_path / "c" / "labels.json").read_text())
    kept = RunStore(tmp_path / "c").samples()
    assert info["counts"]["MEL"]["train"] == int(kept.loc[kept["split"] == "train", "MEL"].sum()) == 6


def test_hints_name_a_command_that_exists_and_info_says_interrupted(encoded, tmp_path, taesd_path, corpus):
    run = tmp_path / "run"
    shutil.copytree(encoded, run)
    train = ["train", "--run", str(run), "--generations", "1", "--epochs", "1", "--k", "8", "--quiet"]
    assert _cli(train)[0] == 0
    rc, err = _cli(["train", "--run", str(run), "--generations", "1", "--epochs", "2", "--k", "8", "--quiet"])
    assert rc == 2 and f"`tailfuse train --run {run} --force`" in err  # `tailfuse run` has no --force: name the stage's
    # a stage killed mid-way (its record says running, no live process holds the run folder)
    rec = RunStore(run).stage("train")
    RunStore(run).write_stage("train", {**rec, "status": "running"})
    rc = main(["info", "--run", str(run), "--json"])
    assert rc == 0
    with RunLock(run, "tailfuse train"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            main(["info", "--run", str(run), "--json"])
        assert json.loads(out.getvalue())["stages"]["train"]["status"] == "running"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["info", "--run", str(run), "--json"])
    assert json.loads(out.getvalue())["stages"]["train"]["status"] == "interrupted (resume by rerunning)"
