"""The dashboard in a real headless browser (Debian's Chromium through Selenium).

A store of tiny-model runs (built here: lora with --freeze auto, a child of it, a sparse
one; a `slimtune analyze` output and an `ab --output` result in a runs folder), served
by `slimtune dashboard` read-only and read-write, and by `slimtune serve` for the
playground. `make test` installs chromium and chromium-driver."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from slimtune.cli.app import main
from slimtune.delta import DeltaStore

from .conftest import intent_rows, write_jsonl

CHROMIUM = next(
    filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
)
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def site(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dash")
    data = write_jsonl(root / "d.jsonl", intent_rows())
    store = root / "store"
    common = ["--model", str(tiny_dir), "--data", str(data), "--batch-size", "4", "--lr", "0.01"]
    common += ["--no-progress", "--store", str(store), "--eval-fraction", "0.25"]
    runs = root / "runs"
    for args in (
        ["--max-steps", "4", "--freeze", "auto", "--output-dir", str(runs / "a")],
        ["--max-steps", "8", "--parent", "v1", "--note", "more steps", "--output-dir", str(runs / "b")],
        ["--max-steps", "6", "--method", "sparse", "--parent", "v1", "--output-dir", str(runs / "c")],
    ):  # fmt: skip
        assert main(["train", *common, *args]) == 0
    assert main(["delta", "--store", str(store), "tag", "v1", "prod"]) == 0
    analyze = ["analyze", "--model", str(tiny_dir), "--data", str(data)]
    assert main([*analyze, "--output-dir", str(runs / "analyze")]) == 0
    ab = ["ab", "v1", "v2", "--model", str(tiny_dir), "--data", str(data), "--store", str(store)]
    assert main([*ab, "--output", str(runs / "ab.json")]) == 0
    return root, store, runs


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], root: Path, ready: str):
    port = _port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    log = open(root / f"server-{port}.log", "w")  # noqa: SIM115 - the server's lifetime
    proc = subprocess.Popen(
        [sys.executable, "-m", "slimtune", *args, "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(url + ready, timeout=2).status_code == 200:
                return proc, url, log
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError((root / f"server-{port}.log").read_text()[-3000:])
        time.sleep(0.3)


@pytest.fixture(scope="module")
def readonly(site):
    root, store, runs = site
    proc, url, log = _start(
        ["dashboard", "--store", str(store), "--runs", str(runs)], root, "/api/info"
    )
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM and DRIVER, (
        "the dashboard's tests need Debian's chromium and chromium-driver "
        "(`make test` installs them: apt-get install chromium chromium-driver)"
    )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--window-size=1400,1000",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _open(driver, url: str, view: str):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get("about:blank")
    driver.get(f"{url}/#{view}")
    name = view.split("/")[0]
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script("return document.body.dataset.ready") == name
    )
    return driver


def _text(driver, selector: str) -> str | None:
    """The text of the first element matching ``selector`` now (read in the page, so a
    re-drawn table is never a stale reference)."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e && e.textContent", selector
    )


def _css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def test_the_store_table_shows_every_version_with_its_tags(readonly, browser, site):
    _, store, _ = site
    d = _open(browser, readonly, "versions")
    rows = {r.get_attribute("data-version"): r for r in _css(d, "tr[data-version]")}
    assert list(rows) == [v.id for v in DeltaStore(store).list()] == ["v1", "v2", "v3"]
    assert "prod" in rows["v1"].text and "sparse" in rows["v3"].text
    assert "more steps" in rows["v2"].text
    edges = {e.get_attribute("data-edge") for e in _css(d, "#lineage-svg line")}
    assert edges == {"v1->v2", "v1->v3"}  # the lineage graph: parent -> child


def test_comparing_two_versions_shows_both_metrics_and_curves(readonly, browser, site):
    _, store, _ = site
    s = DeltaStore(store)
    d = _open(browser, readonly, "versions")
    for vid in ("v1", "v3"):
        _css(d, f'input[data-select="{vid}"]')[0].click()
    _css(d, "#compare-btn")[0].click()
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(d, 30).until(
        lambda d: d.execute_script("return document.body.dataset.ready") == "compare"
    )
    acc = _css(d, 'tr[data-metric="eval_accuracy"] td')
    want = [s.resolve(v).manifest()["metrics"]["eval_accuracy"] for v in ("v1", "v3")]
    assert [c.text for c in acc] == [f"{100 * w:.1f}%" for w in want]
    methods = [c.text for c in _css(d, "#compare-table tr:nth-child(2) td")]
    assert methods == ["lora", "sparse"]
    assert {p.get_attribute("data-series") for p in _css(d, "svg.chart path[data-series]")} == {
        "v1",
        "v3",
    }


def test_a_version_page_shows_its_run_and_its_salf_analysis(readonly, browser, site):
    _, store, _ = site
    d = _open(browser, readonly, "version/v1")
    manifest = DeltaStore(store).resolve("v1").manifest()
    cell = _css(d, '#version-metrics td[data-metric="trainable_params"]')[0]
    assert cell.text == f"{manifest['metrics']['trainable_params']:,}"
    salf = _css(d, '[data-panel="salf"]')[0]
    assert f"layer {manifest['auto_freeze']['freeze_below']}" in salf.text
    rows = _css(d, '[data-table="costs"] tr')
    assert len(rows) - 1 == len(manifest["auto_freeze"]["analysis"]["costs"])
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(d, 30).until(  # the run's plot, loaded
        lambda d: d.execute_script(
            "const i = document.querySelector('img[alt=\"loss.png\"]');"
            "return i && i.complete && i.naturalWidth > 0"
        )
    )


def test_analyses_and_ab_results_from_the_runs_folder(readonly, browser, site):
    _, _, runs = site
    d = _open(browser, readonly, "analyses")
    assert _css(d, '[data-analysis="analyze/analysis.json"] [data-panel="salf"]')
    d = _open(browser, readonly, "ab")
    row = _css(d, 'tr[data-ab="offline"]')[0]
    result = json.loads((runs / "ab.json").read_text())
    assert "ab.json" in row.text and result["A"]["ref"] in row.text
    assert f"{100 * result['bootstrap']['mean_diff']:+.2f} points" in row.text


def test_nothing_on_a_read_only_dashboard_changes_the_store(readonly, browser, site):
    _, store, _ = site
    before = (DeltaStore(store).tags(), [v.id for v in DeltaStore(store).list()])
    d = _open(browser, readonly, "versions")
    assert _css(d, "#readonly-note") and not _css(d, "#tag-move") and not _css(d, "[data-rollback]")
    d = _open(browser, readonly, "version/v2")
    assert not _css(d, "#rm-btn")
    for path, body in (
        ("/api/tags", {"name": "prod", "version": "v2"}),
        ("/api/tags/prod/rollback", None),
        ("/api/versions/v3/rm", None),
    ):
        r = httpx.post(readonly + path, json=body, headers={"x-slimtune-write": "1"})
        assert r.status_code == 403 and "--allow-writes" in r.json()["error"]["message"]
    assert (DeltaStore(store).tags(), [v.id for v in DeltaStore(store).list()]) == before


def test_a_tag_moved_from_the_page_is_what_delta_list_shows(site, browser, capsys):
    root, store, _ = site
    proc, url, log = _start(
        ["dashboard", "--store", str(store), "--allow-writes"], root, "/api/info"
    )
    try:
        d = _open(browser, url, "versions")
        _css(d, "#tag-name")[0].send_keys("prod")
        from selenium.webdriver.support.ui import Select, WebDriverWait

        Select(_css(d, "#tag-version")[0]).select_by_value("v2")
        _css(d, "#tag-move")[0].click()
        d.switch_to.alert.accept()  # the confirmation
        WebDriverWait(d, 30).until(lambda d: _text(d, '[data-tag-version="prod"]') == "v2")
        capsys.readouterr()
        assert main(["delta", "--store", str(store), "list"]) == 0
        listed = [ln for ln in capsys.readouterr().out.splitlines() if "prod" in ln]
        assert len(listed) == 1 and "v2" in listed[0]
        _css(d, '[data-rollback="prod"]')[0].click()
        d.switch_to.alert.accept()
        WebDriverWait(d, 30).until(lambda d: _text(d, '[data-tag-version="prod"]') == "v1")
        assert DeltaStore(store).tags()["prod"] == "v1"
        # another site's page cannot send the header (no forged changes), nor reach the
        # app under another host name (no DNS rebinding)
        r = httpx.post(f"{url}/api/versions/v3/rm")
        assert r.status_code == 403 and "x-slimtune-write" in r.json()["error"]["message"]
        r = httpx.get(f"{url}/api/versions", headers={"host": "attacker.example"})
        assert r.status_code == 400
        assert [v.id for v in DeltaStore(store).list()] == ["v1", "v2", "v3"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_the_playground_answers_from_the_two_deltas_asked_for(site, browser, tiny_dir):
    root, store, _ = site
    args = ["serve", "--model", str(tiny_dir), "--store", str(store), "--device", "cpu"]
    proc, url, log = _start(args, root, "/healthz")
    try:
        from selenium.webdriver.support.ui import Select, WebDriverWait

        d = _open(browser, url, "playground")
        Select(_css(d, "#pg-a")[0]).select_by_value("v1")
        Select(_css(d, "#pg-b")[0]).select_by_value("v3")
        prompt = _css(d, "#pg-prompt")[0]
        prompt.clear()
        prompt.send_keys("parcel late")
        max_tokens = _css(d, "#pg-max")[0]
        max_tokens.clear()
        max_tokens.send_keys("6")
        _css(d, "#pg-send")[0].click()
        WebDriverWait(d, 60).until(
            lambda d: _text(d, "#pg-served-a") != "-" and _text(d, "#pg-served-b") != "-"
        )
        assert _css(d, "#pg-served-a")[0].text == "v1"
        assert _css(d, "#pg-served-b")[0].text == "v3"
        for side, model in (("a", "v1"), ("b", "v3")):  # the same answers as the API's
            body = {"model": model, "max_tokens": 6}
            body["messages"] = [{"role": "user", "content": "parcel late"}]
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
            assert (
                _css(d, f"#pg-out-{side}")[0].text == r["choices"][0]["message"]["content"].strip()
            )
        d = _open(browser, url, "serving")
        served = d.execute_script(  # read in the page: the view re-draws every 2 s
            "return [...document.querySelectorAll('tr[data-delta]')].map(r => r.dataset.delta)"
        )
        assert {"v1", "v3"} <= set(served)  # the live metrics saw both
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_a_run_folder_reused_by_a_later_run_is_not_shown_as_the_earlier_ones(site, readonly):
    _, store, _ = site
    v2 = DeltaStore(store).resolve("v2")
    run = Path(v2.manifest()["training"]["output_dir"])
    page = httpx.get(f"{readonly}/api/versions/v2").json()
    assert page["run"]["folder"] == str(run) and "loss.png" in page["run"]["files"]
    manifest = run / "delta" / "manifest.json"
    saved = manifest.read_bytes()
    manifest.write_bytes(saved.replace(b'"lora"', b'"lora" '))  # another run's delta now
    try:
        page = httpx.get(f"{readonly}/api/versions/v2").json()
        assert page["run"] == {"folder": None, "files": [], "report": None}
        assert httpx.get(f"{readonly}/api/versions/v2/run/loss.png").status_code == 404
    finally:
        manifest.write_bytes(saved)
