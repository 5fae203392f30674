"""Pages generated at build time by mkdocs-gen-files (mkdocs.yml runs this script), so they cannot drift:

* reference/cli.md        every command's `--help`, from tailfuse.cli.build_parser() at a fixed width (COLUMNS=100)
* benchmarks/results/     one page per benchmarks/results/*.md, with the PNGs that belong to it; the PNG and JSON
                          files themselves are copied into the site, not into docs/
* results.md              (docs/results.md, appended to) the list of every result file and the command that made it
* benchmarks/index.md     benchmarks/README.md, when the repository has one
* examples/               the scripts in examples/, rendered from the files themselves

Nothing is written into the repository: mkdocs-gen-files keeps these files in the build.
"""

from __future__ import annotations

import os
import posixpath
import re
import sys
from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HELP_COLUMNS = "100"  # tests/test_docs.py runs `tailfuse <command> --help` at the same width


# --- the CLI reference ----------------------------------------------------------------------------------------------

def cli_help_texts() -> dict[str, str]:
    """{'tailfuse': top-level help, 'tailfuse encode': ..., ...} in the order `tailfuse --help` lists the commands,
    formatted at HELP_COLUMNS columns (argparse reads COLUMNS when it formats)."""
    sys.path.insert(0, str(ROOT / "src"))
    from tailfuse.cli import build_parser

    saved = {k: os.environ.get(k) for k in ("COLUMNS", "NO_COLOR")}
    os.environ["COLUMNS"], os.environ["NO_COLOR"] = HELP_COLUMNS, "1"
    try:
        parser = build_parser()
        out = {"tailfuse": parser.format_help()}
        sub = next(a for a in parser._actions if a.dest == "command")
        for name, p in sub.choices.items():
            out[f"tailfuse {name}"] = p.format_help()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out


def write_cli_reference() -> None:
    texts = cli_help_texts()
    lines = ["---", "hide:", "  - toc", "---", "", "# Command-line reference", "",
             "Every command's `--help`, generated from the parser when this site was built (at 100 columns), so it is",
             "what `COLUMNS=100 tailfuse <command> --help` prints. Settings can also come from a YAML file",
             "(`--config run.yaml`); see [Running tailfuse](../guide/run.md#settings-in-a-yaml-file).", ""]
    lines += [f"- [`{name}`](#{_anchor(name)})" for name in texts]
    lines.append("")
    for name, text in texts.items():
        lines += [f"## `{name}` {{ #{_anchor(name)} }}", "", "```text", text.rstrip("\n"), "```", ""]
    with mkdocs_gen_files.open("reference/cli.md", "w") as f:
        f.write("\n".join(lines))


def _anchor(name: str) -> str:
    return name.replace(" ", "-")


# --- benchmark results ----------------------------------------------------------------------------------------------

def result_pages() -> dict[str, list[str]]:
    """{md stem: [png names]}: each PNG belongs to the result file whose stem is its longest prefix (stem + '-')."""
    stems = sorted(p.stem for p in RESULTS.glob("*.md"))
    pages: dict[str, list[str]] = {s: [] for s in stems}
    for png in sorted(RESULTS.glob("*.png")):
        owners = [s for s in stems if png.stem.startswith(s + "-")]
        if owners:
            pages[max(owners, key=len)].append(png.name)
    return pages


def command_of(md: str) -> str | None:
    """The command a result file says made it: the code after its 'Command:' line, else its first benchmark call."""
    lines = md.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^Commands?\b", line):
            span = re.search(r"`([^`]+)`", line)
            if span:
                return span.group(1)
            for j in range(i + 1, min(i + 8, len(lines))):
                if lines[j].startswith("```"):
                    block = []
                    for k in range(j + 1, len(lines)):
                        if lines[k].startswith("```"):
                            break
                        block.append(lines[k])
                    return " ".join(x.strip() for x in block).strip() or None
                span = re.search(r"`((?:python|tailfuse) [^`]+)`", lines[j])
                if span:
                    return span.group(1)
    span = re.search(r"`((?:python benchmarks/|tailfuse )[^`]+)`", md)
    return span.group(1) if span else None


def title_of(md: str, fallback: str) -> str:
    m = re.search(r"^# (.+)$", md, re.M)
    return m.group(1).strip() if m else fallback


def relink(md: str, page: str, known: set[str]) -> str:
    """Relative links that lead nowhere in the site (a script, a file outside docs) become plain code text, so an
    included file cannot break the strict build; links to pages and files of the site stay links."""
    here = posixpath.dirname(page)

    def fix(m: re.Match) -> str:
        bang, text, target = m.group(1), m.group(2), m.group(3)
        path = target.split("#", 1)[0]
        if not path or re.match(r"^[a-z]+:", target) or target.startswith("/"):
            return m.group(0)
        if posixpath.normpath(posixpath.join(here, path)) in known:
            return m.group(0)
        if bang or text.strip("`") == target:
            return f"`{target}`"
        return f"{text} (`{target}`)"

    return re.sub(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)", fix, md)


def write_results() -> None:
    pages = result_pages()
    known = {f"benchmarks/results/{s}.md" for s in pages}
    for f in sorted(RESULTS.iterdir()):
        if f.suffix in (".png", ".json"):
            known.add(f"benchmarks/results/{f.name}")
            with mkdocs_gen_files.open(f"benchmarks/results/{f.name}", "wb") as out:
                out.write(f.read_bytes())
    readme = ROOT / "benchmarks" / "README.md"
    if readme.is_file():
        known.add("benchmarks/index.md")
    known |= {str(p.relative_to(ROOT / "docs")).replace(os.sep, "/") for p in (ROOT / "docs").rglob("*.md")}
    rows = []
    for stem, pngs in pages.items():
        md = (RESULTS / f"{stem}.md").read_text()
        page = f"benchmarks/results/{stem}.md"
        body = relink(md, page, known)
        shown = set(re.findall(r"\]\(([^)]+\.png)\)", body))
        extra = [p for p in pngs if p not in shown]
        source = f"*`benchmarks/results/{stem}.md`, rendered with its plots; [all results](../../results.md)*"
        if re.search(r"^# ", body, re.M):
            body = re.sub(r"^(# .+)$", lambda m: f"{m.group(1)}\n\n{source}", body, count=1, flags=re.M)
        else:
            body = f"# {stem}\n\n{source}\n\n" + body
        foot = ["", "---", "", f"The figures as JSON: [{stem}.json]({stem}.json).", ""] \
            if (RESULTS / f"{stem}.json").is_file() else [""]
        plots = ["", "## Plots", ""] + [f"`{p}`\n\n![{p}]({p})\n" for p in extra] if extra else []
        with mkdocs_gen_files.open(page, "w") as out:
            out.write(body.rstrip("\n") + "\n" + "\n".join(plots) + "\n".join(foot))
        cmd = command_of(md)
        rows.append(f"| [{stem}](benchmarks/results/{stem}.md) | {_cell(title_of(md, stem))} | "
                    + (f"`{_cell(cmd)}`" if cmd else "on the page") + " |")
    index = ["", "## Every result file and the command that made it", "",
             "Each file in `benchmarks/results/` says the command that made it; the pages below render them with their",
             "plots." + (" [benchmarks/README.md](benchmarks/index.md) maps them to the scripts." if readme.is_file() else ""),
             "", "| result | what it measures | command |", "|---|---|---|", *rows, ""]
    with mkdocs_gen_files.open("results.md", "a") as out:
        out.write("\n".join(index))
    if readme.is_file():
        with mkdocs_gen_files.open("benchmarks/index.md", "w") as out:
            out.write(relink(readme.read_text(), "benchmarks/index.md", known))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


# --- examples -------------------------------------------------------------------------------------------------------

def write_examples() -> None:
    import ast

    items = []
    for script in sorted((ROOT / "examples").glob("*.py")):
        src = script.read_text()
        doc = ast.get_docstring(ast.parse(src)) or ""
        title = doc.splitlines()[0].rstrip(".") if doc else script.stem
        page = f"examples/{script.stem}.md"
        rest = doc.split("\n", 1)[1].strip("\n") if "\n" in doc else ""
        body = [f"# {script.name}", "", f"{title}.", "", rest, "",
                f"`examples/{script.name}`, as it is in the repository:", "", "```python", src.rstrip("\n"), "```", ""]
        with mkdocs_gen_files.open(page, "w") as out:
            out.write("\n".join(body))
        items.append(f"- [{script.name}]({script.stem}.md): {title}.")
    with mkdocs_gen_files.open("examples/index.md", "w") as out:
        out.write("# Examples\n\nThe scripts in `examples/`, rendered from the files themselves when the site was built. "
                  "The tests run both (`tests/test_api.py`; the first on ISIC2018-LT images).\n\n" + "\n".join(items) + "\n")


write_cli_reference()
write_results()
write_examples()
