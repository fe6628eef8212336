"""Screenshots of the dashboard for the README (docs/img/dashboard-*.png).

    python scripts/dashboard_screenshots.py [--work DIR]

Trains three short runs of the default model on the bundled task (lora with --freeze
auto, a child with more steps, a sparse one), tags one, runs `slimtune analyze` and an
offline `slimtune ab`, starts `slimtune serve` with a split and a request log, sends
traffic with outcomes, and photographs each view in headless Chromium (Debian's chromium
and chromium-driver). Takes a few minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
VIEWS = ["versions", "version/v1", "compare/v1/v2", "ab", "serving", "playground"]


def slimtune(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "slimtune", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", default="/tmp/slimtune-screens")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    store, runs = work / "store", work / "runs"
    if not store.exists():
        common = ["--data", "builtin:support_intents_train", "--batch-size", "8", "--lr", "1e-3"]
        common += ["--no-progress", "--store", str(store), "--eval-fraction", "0.1"]
        slimtune(
            "train",
            *common,
            "--max-steps",
            "30",
            "--freeze",
            "auto",
            "--output-dir",
            str(runs / "lora-auto"),
            "--note",
            "SALF: freeze auto",
        )
        slimtune(
            "train",
            *common,
            "--max-steps",
            "60",
            "--freeze",
            "auto",
            "--parent",
            "v1",
            "--output-dir",
            str(runs / "lora-longer"),
            "--note",
            "twice the steps",
        )
        slimtune(
            "train",
            *common,
            "--max-steps",
            "30",
            "--method",
            "sparse",
            "--parent",
            "v1",
            "--output-dir",
            str(runs / "sparse"),
        )
        slimtune("delta", "--store", str(store), "tag", "v1", "prod")
        slimtune("delta", "--store", str(store), "tag", "v2", "prod")
        slimtune(
            "analyze",
            "--data",
            "builtin:support_intents_train",
            "--output-dir",
            str(runs / "analyze"),
        )
        slimtune(
            "ab",
            "v1",
            "v2",
            "--data",
            "builtin:support_intents_test",
            "--limit",
            "96",
            "--store",
            str(store),
            "--output",
            str(runs / "ab-v1-v2.json"),
        )
    port = 18621
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "slimtune",
            "serve",
            "--store",
            str(store),
            "--port",
            str(port),
            "--runs",
            str(runs),
            "--split",
            "exp:v1=50,v2=50",
            "--log",
            str(work / "requests.jsonl"),
            "--max-tokens",
            "12",
        ]
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        with httpx.Client(timeout=120) as c:  # live traffic through the split, rated
            for i in range(24):
                r = c.post(
                    f"{url}/v1/chat/completions",
                    json={
                        "model": "exp",
                        "user": f"user{i}",
                        "max_tokens": 6,
                        "messages": [{"role": "user", "content": "Where is my parcel?"}],
                    },
                ).json()
                good = r["slimtune"]["delta"] == "v2" or i % 3 == 0
                c.post(f"{url}/v1/outcomes", json={"id": r["id"], "value": int(good)})
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.support.ui import Select, WebDriverWait

        options = Options()
        options.binary_location = "/usr/bin/chromium"
        for flag in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,900",
            "--hide-scrollbars",
        ):
            options.add_argument(flag)
        d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        out.mkdir(parents=True, exist_ok=True)
        for view in VIEWS:
            d.get("about:blank")
            d.get(f"{url}/#{view}")
            name = view.split("/")[0]
            WebDriverWait(d, 60).until(
                lambda d, name=name: d.execute_script("return document.body.dataset.ready") == name
            )
            if name == "playground":
                Select(d.find_element("id", "pg-a")).select_by_value("v1")
                Select(d.find_element("id", "pg-b")).select_by_value("v2")
                d.find_element("id", "pg-send").click()
                WebDriverWait(d, 60).until(
                    lambda d: d.find_element("id", "pg-served-b").text != "-"
                )
            time.sleep(0.5)
            d.save_screenshot(str(out / f"dashboard-{name}.png"))
            print("wrote", out / f"dashboard-{name}.png")
        d.quit()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
