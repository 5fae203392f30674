"""The review report in a real browser (Debian's chromium + chromedriver, headless, driven by Selenium; nothing is
downloaded): a small real ISIC run's report opens, every image loads, paging, accept / reject by button and key,
"reject below", the exported CSV holds exactly the decisions, `tailfuse review` writes the accepted manifest, the
regenerated report shows them as imported, and `tailfuse evaluate` runs the tailfuse-reviewed arm."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import subset_manifest
from tailfuse.cli import main
from tailfuse.errors import TailfuseError
from tailfuse.review import run_review

pytestmark = pytest.mark.shared
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def browser(download_dir: Path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        msg = f"headless browser tests need Debian's chromium and chromium-driver ({CHROMIUM}, {DRIVER})"
        if os.environ.get("TAILFUSE_REQUIRE_BROWSER") == "1":
            pytest.fail(msg + "; TAILFUSE_REQUIRE_BROWSER=1 forbids skipping")
        pytest.skip(msg)
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not try to download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    o = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1000"):
        o.add_argument(a)
    o.binary_location = CHROMIUM
    o.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                        "download.prompt_for_download": False})
    d = webdriver.Chrome(service=Service(DRIVER), options=o)
    d.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
    return d


@pytest.fixture(scope="module")
def reviewed_run(tmp_path_factory, isic_dir, taesd_path):
    root = tmp_path_factory.mktemp("report")
    manifest = subset_manifest(isic_dir, root / "in" / "m.csv", per_label=4)
    run = root / "run"
    assert main(["run", "--data", str(manifest), "--vae", str(taesd_path), "--run", str(run), "--generations", "2",
                 "--tail-labels", "BCC,AKIEC,DF,VASC",
                 "--epochs", "1", "--imitation-epochs", "1", "--per-class", "30", "--quiet"]) == 0
    assert main(["report", "--run", str(run), "--per-page", "50", "--quiet"]) == 0
    return run


def _click(d, css: str) -> None:
    el = d.find_element("css selector", css)
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)  # not under the sticky header
    el.click()


def _images_loaded(d) -> tuple[int, list[str]]:
    d.execute_script("document.querySelectorAll('img').forEach(i => i.scrollIntoView());")
    time.sleep(0.2)
    return d.execute_script("""
        const imgs = Array.from(document.querySelectorAll('#gallery img'));
        return [imgs.length, imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)];""")


def test_review_round_trip_in_a_real_browser(reviewed_run, tmp_path):
    run = reviewed_run
    data = json.loads((run / "synthetic" / "report" / "data.js").read_text().split("=", 1)[1].rstrip().rstrip(";"))
    assert len(data["items"]) == 120 and data["per_page"] == 50
    d = browser(tmp_path)
    try:
        t = time.time()
        d.get((run / "synthetic" / "report" / "index.html").as_uri())
        cards = d.find_elements("css selector", ".card")
        assert len(cards) == 50 and time.time() - t < 10
        n, broken = _images_loaded(d)
        assert n == 50 * 6 and broken == []  # synthetic, 2 sources, 2 maps, mask: every image loads
        first_page = [c.get_attribute("data-id") for c in cards]
        _click(d, "#pager-bottom button[data-page='1']")
        second = [c.get_attribute("data-id") for c in d.find_elements("css selector", ".card")]
        assert len(second) == 50 and not set(second) & set(first_page)
        assert _images_loaded(d)[1] == []
        counter = lambda: d.find_element("id", "counter").text  # noqa: E731
        d.find_element("id", "reviewer").send_keys("dr test")
        _click(d, f".card[data-id='{second[0]}'] button[data-act='accept']")
        _click(d, f".card[data-id='{second[1]}'] button[data-act='reject']")
        assert counter() == "reviewed 2 of 120 (accepted 1, rejected 1)"
        body = d.find_element("tag name", "body")
        d.execute_script("document.activeElement.blur()")
        body.send_keys("a")  # the focused card (the second, clicked last) is accepted instead; focus moves on
        body.send_keys("a")  # the third is accepted
        assert counter() == "reviewed 3 of 120 (accepted 3, rejected 0)"
        body.send_keys("u")  # undo the last decision
        assert counter() == "reviewed 2 of 120 (accepted 2, rejected 0)"
        body.send_keys("r")  # the focused (third) card is rejected
        assert counter() == "reviewed 3 of 120 (accepted 2, rejected 1)"
        # reject every image of the first tail label whose tail probability is below the median
        label = data["tail"][0]
        probs = sorted(it["tail_prob"] for it in data["items"] if it["tail_label"] == label)
        cut = probs[len(probs) // 2]
        _click(d, f"#label option[value='{label}']")
        box = d.find_element("id", "below-value")
        box.clear()
        box.send_keys(str(cut))
        _click(d, "#reject-below")
        decisions = d.execute_script("return window.tailfuseReview.decisions")
        below = {it["id"] for it in data["items"] if it["tail_label"] == label and it["tail_prob"] < cut}
        assert below and all(decisions[str(i)]["decision"] == "reject" for i in below)
        assert counter().startswith(f"reviewed {len(decisions)} of 120")
        _click(d, "#export")
        csv = tmp_path / "decisions-synthetic.csv"
        for _ in range(50):
            if csv.is_file() and csv.stat().st_size:
                break
            time.sleep(0.1)
        exported = pd.read_csv(csv, dtype={"reviewer": str})
        assert dict(zip(exported["synth_id"].astype(str), exported["decision"])) == {k: v["decision"] for k, v in decisions.items()}
        assert set(exported["set_id"]) == {data["set_id"]} and (exported["reviewer"] == "dr test").all()
        shot = Path(os.environ.get("TAILFUSE_SCREENSHOT_DIR", tmp_path)) / "report-gallery.png"
        d.save_screenshot(str(shot))
    finally:
        d.quit()
    # the decisions into the run: the accepted manifest
    assert main(["review", "--run", str(run), "--decisions", str(csv), "--quiet"]) == 0
    acc = pd.read_csv(run / "synthetic" / "manifest.accepted.csv")
    prov = pd.read_json(run / "synthetic" / "provenance.jsonl", lines=True).set_index("path")
    accepted = {int(k) for k, v in decisions.items() if v["decision"] == "accept"}
    assert set(prov.loc[acc["path"], "synth_id"]) == accepted
    assert len(list((run / "synthetic" / "images").glob("*.png"))) == 120  # no image deleted
    # a regenerated report shows them as imported
    assert main(["report", "--run", str(run), "--per-page", "50", "--quiet"]) == 0
    data2 = json.loads((run / "synthetic" / "report" / "data.js").read_text().split("=", 1)[1].rstrip().rstrip(";"))
    imported = {it["id"]: it["imported"]["decision"] for it in data2["items"] if "imported" in it}
    assert imported == {int(k): v["decision"] for k, v in decisions.items()}
    # evaluate: the reviewed subset as its own arm
    assert main(["evaluate", "--run", str(run), "--arms", "real,tailfuse,tailfuse-reviewed", "--seeds", "0",
                 "--per-class", "4", "--no-quality", "--bootstrap", "20", "--quiet"]) == 0
    res = json.loads((run / "eval" / "results.json").read_text())
    assert set(res["arms"]) == {"real", "tailfuse", "tailfuse-reviewed"}
    assert res["arms"]["tailfuse-reviewed"]["n_added"] <= res["arms"]["tailfuse"]["n_added"]


def test_bad_decision_files_change_nothing(reviewed_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reviewed_run, run)
    data = json.loads((run / "synthetic" / "report" / "data.js").read_text().split("=", 1)[1].rstrip().rstrip(";"))
    sid = data["set_id"]
    before = {p: p.read_bytes() for p in (run / "synthetic").rglob("*") if p.is_file() and "report" not in p.parts}
    cases = {
        "unknown": (f"set_id,synth_id,decision\n{sid},0,accept\n{sid},99999,reject\n", "not images of the set"),
        "duplicate": (f"set_id,synth_id,decision\n{sid},3,accept\n{sid},3,reject\n", "more than once"),
        "other run": ("set_id,synth_id,decision\nabcdef0123456789,3,accept\n", "made for another set"),
        "bad value": (f"set_id,synth_id,decision\n{sid},3,maybe\n", "must be accept or reject"),
        "no set id": ("synth_id,decision\n3,accept\n", "lacks column"),
    }
    for name, (text, want) in cases.items():
        p = tmp_path / f"{name}.csv"
        p.write_text(text)
        with pytest.raises(TailfuseError, match=want):
            run_review(str(run), str(p))
    after = {p: p.read_bytes() for p in (run / "synthetic").rglob("*") if p.is_file() and "report" not in p.parts}
    assert after == before
