"""The documentation site (issue 30): it builds in strict mode with no warning and without a network, its
command-line reference is what `--help` prints for every command, its API reference covers every public name, and the
README keeps what CI and readers rely on.

One `mkdocs build --strict` into a temporary folder (a few seconds) serves every test here; nothing is written into
the repository."""

from __future__ import annotations

import html
import inspect
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HELP_COLUMNS = "100"  # the width docs/gen_pages.py formats the help at


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    # the repository's own source, whatever is installed; Material's and ProperDocs' notices about MkDocs 2.0 off
    env.update(PYTHONPATH=str(ROOT / "src"), NO_MKDOCS_2_WARNING="1", DISABLE_MKDOCS_2_WARNING="true",
               NO_COLOR="1", HF_HUB_OFFLINE="1")
    return env


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                        "-d", str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    return out, log


def _page(site_dir: Path, page: str) -> str:
    return (site_dir / page / "index.html").read_text(encoding="utf-8")


def test_the_site_builds_in_strict_mode_with_no_warning_and_nothing_fetched(site):
    out, log = site
    bad = [line for line in log.splitlines() if re.search(r"WARNING|ERROR|Traceback", line)]
    assert not bad, "\n".join(bad)
    index = (out / "index.html").read_text(encoding="utf-8")
    assert "fonts.googleapis" not in index and "fonts.gstatic" not in index  # `font: false`: no web fonts
    for page in ("getting-started", "how-it-works", "guide/run", "guide/evaluate", "should-i-use-it", "results",
                 "reference/cli", "reference/api", "examples"):
        assert (out / page / "index.html").is_file(), page
    # every result file has its page, and the plots and JSON came along into the site (not into docs/)
    for md in (ROOT / "benchmarks" / "results").glob("*.md"):
        assert (out / "benchmarks" / "results" / md.stem / "index.html").is_file(), md.name
    for f in (ROOT / "benchmarks" / "results").glob("*.png"):
        assert (out / "benchmarks" / "results" / f.name).is_file(), f.name
    assert not list((ROOT / "docs").glob("benchmarks*")) and not (ROOT / "docs" / "reference" / "cli.md").exists()


def _commands() -> list[list[str]]:
    sys.path.insert(0, str(ROOT / "src"))
    from tailfuse.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return [[]] + [[name] for name in sub.choices]


def _cli_help(commands: list[list[str]]) -> dict[str, str]:
    """`tailfuse <command> --help` for every command, run through the CLI's entry point (tailfuse.cli.main, the
    console script) in one subprocess at COLUMNS=100."""
    snippet = (
        "import contextlib, io, json, sys\n"
        "from tailfuse.cli import main\n"
        "out = {}\n"
        "for cmd in json.loads(sys.argv[1]):\n"
        "    buf = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        try:\n"
        "            main([*cmd, '--help'])\n"
        "        except SystemExit as e:\n"
        "            assert e.code in (0, None), (cmd, e.code)\n"
        "    out[' '.join(['tailfuse', *cmd])] = buf.getvalue()\n"
        "print(json.dumps(out))\n"
    )
    env = {**_env(), "COLUMNS": HELP_COLUMNS}
    r = subprocess.run([sys.executable, "-c", snippet, json.dumps(commands)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def test_the_cli_reference_is_what_help_prints_for_every_command(site):
    out, _ = site
    page = _page(out, "reference/cli")
    commands = _commands()
    helps = _cli_help(commands)
    assert len(helps) == len(commands) > 10
    for name, text in helps.items():
        anchor = name.replace(" ", "-")
        m = re.search(rf'<h2 id="{re.escape(anchor)}">.*?<pre>(.*?)</pre>', page, re.S)
        assert m, f"{name}: no section in the CLI reference"
        shown = _text(m.group(1))
        assert shown.rstrip("\n") == text.rstrip("\n"), f"{name}: the reference differs from `{name} --help`"
        assert text.startswith(f"usage: {name}")


def _public_objects() -> dict[str, str]:
    """Every public name of tailfuse.__all__ -> the anchor mkdocstrings gives the object it resolves to. A module
    stands for the names it defines itself (not those it imports)."""
    import tailfuse

    anchors = {}
    for name in tailfuse.__all__:
        obj = getattr(tailfuse, name)
        if isinstance(obj, types.ModuleType):
            own = [k for k, v in vars(obj).items() if not k.startswith("_") and getattr(v, "__module__", None) == obj.__name__
                   and (inspect.isclass(v) or inspect.isfunction(v))]
            assert own, name
            for k in own:
                anchors[f"tailfuse.{name}.{k}"] = f"{obj.__name__}.{k}"
        elif inspect.isclass(obj) or inspect.isfunction(obj):
            anchors[f"tailfuse.{name}"] = f"{obj.__module__}.{obj.__qualname__}"
        else:
            anchors[f"tailfuse.{name}"] = f"tailfuse.{name}"
    return anchors


def test_every_public_name_resolves_after_a_plain_import():
    # in a fresh process: `tailfuse.datasets` once recursed endlessly through the package's lazy __getattr__
    code = ("import tailfuse\n"
            "for n in tailfuse.__all__: getattr(tailfuse, n)\n"
            "from tailfuse import datasets\n"
            "print(tailfuse.datasets.AugmentedImageDataset.__name__)")
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "AugmentedImageDataset", r.stderr[-2000:]


def test_the_api_reference_covers_every_public_name(site):
    out, _ = site
    page = _page(out, "reference/api")
    ids = set(re.findall(r'id="([^"]+)"', page))
    anchors = _public_objects()
    assert {"tailfuse.run", "tailfuse.evaluate", "tailfuse.TailFuseSampler", "tailfuse.datasets.AugmentedImageDataset",
            "tailfuse.datasets.weighted_sampler"} <= set(anchors)
    missing = {public: anchor for public, anchor in anchors.items() if anchor not in ids}
    assert not missing, f"not in the API reference: {missing}"
    import tailfuse

    for public in anchors:  # documented, not just listed
        obj = tailfuse
        for part in public.split(".")[1:]:
            obj = getattr(obj, part)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert (obj.__doc__ or "").strip(), f"{public} has no docstring"


def test_the_readme_is_short_and_keeps_the_ci_command_the_picture_and_the_summary():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 160
    # .ci/run runs the fenced block after the marker; the README has exactly the two set-up commands
    after = readme.split("<!-- ci: test command -->", 1)[1]
    block = re.match(r"\s*```bash\n(.+?)\n```", after, re.S).group(1)
    assert block == "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest"
    assert len(re.findall(r"^python3 -m venv \.venv", readme, re.M)) == 2
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert pictures and all((ROOT / p).is_file() for p in pictures)

    def summary_table(text: str) -> list[str]:
        part = text.split("<!-- summary:start -->", 1)[1].split("<!-- summary:end -->", 1)[0]
        return [line for line in part.splitlines() if line.startswith("|")]

    table = summary_table(readme)
    assert len(table) >= 4
    assert summary_table((ROOT / "docs" / "results.md").read_text()) == table  # the docs lead with the same table
