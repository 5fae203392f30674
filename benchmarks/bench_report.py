"""Review-report benchmark (issue 12): the report of a real run's synthetic set, opened in headless chromium.

    python benchmarks/bench_report.py --run runs/bench-isic --name synthetic

Writes the report (`tailfuse report`), then opens it in Debian's headless chromium (Selenium, the system
chromedriver; nothing is downloaded) and times the first gallery page: from the request of index.html until every
card of page 1 is in the page and every one of its images has loaded (naturalWidth > 0). Keeps a screenshot of the
gallery as benchmarks/results/report-gallery.png and writes benchmarks/results/report.json and .md.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from _results import Load, parse, parser, provenance, write_results  # noqa: E402
from tailfuse.report import run_report  # noqa: E402


def main() -> int:
    ap = parser(__doc__, threads=None)
    ap.add_argument("--run", required=True)
    ap.add_argument("--name", default="synthetic")
    ap.add_argument("--repeats", type=int, default=5)
    a = parse(ap)
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    load = Load()
    t = time.time()
    rep = run_report(a.run, a.name, progress=False)
    build = time.time() - t
    o = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1000"):
        o.add_argument(arg)
    o.binary_location = "/usr/bin/chromium"
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)
    times = []
    try:
        for _ in range(a.repeats):
            t = time.time()
            d.get(Path(rep["index"]).resolve().as_uri())
            while not d.execute_script("""const imgs = Array.from(document.querySelectorAll('#gallery img'));
                return document.querySelectorAll('.card').length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);"""):
                time.sleep(0.01)
            times.append(time.time() - t)
        cards, imgs = d.execute_script("return [document.querySelectorAll('.card').length, document.querySelectorAll('#gallery img').length]")
        d.execute_script("document.getElementById('overview').open = false")
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        d.save_screenshot(str(out / "report-gallery.png"))
    finally:
        d.quit()
    res = {**provenance(load, a), "images_in_set": rep["n_items"], "report_build_seconds": round(build, 1),
           "first_page_seconds": [round(x, 3) for x in times], "first_page_cards": cards, "first_page_images": imgs}
    md = ["# Review report: time to the first gallery page in headless chromium", "", f"Command: `{res['command']}`", "",
          f"A set of {rep['n_items']} synthetic images (real ISIC2018-LT run, TAESD, 128 px). The report was written in "
          f"{build:.1f} s (thumbnails, maps, masks and scores made once; reused after). Opening index.html from disk to "
          f"a first page of {cards} cards with all {imgs} images loaded: {', '.join(f'{x:.2f}' for x in times)} s "
          f"({a.repeats} loads; median {sorted(times)[len(times) // 2]:.2f} s).", "",
          "![gallery](report-gallery.png)", "",
          f"{platform.platform()}; {load.footer()}."]
    write_results(out, "report", res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
