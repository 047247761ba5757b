"""Screenshot the MLflow UI as a user sees it after `ancra-tune ui STUDY`: the study's runs list
in the view ancra-tune saves for it (trials sorted by the worst case, robust metrics, parameters,
outcomes and flags as columns), taken with headless Chromium.

    python scripts/ui_screenshot.py --experiment quickstart --out ui.png

Tracks into the same store as ``ancra-tune`` (``--tracking-uri``, else ``MLFLOW_TRACKING_URI``,
else ``mlflow.db`` here). For a local store it starts the UI (``mlflow server`` on 127.0.0.1, as
``ancra-tune ui`` does) and stops it afterwards. Needs Chromium and its driver (Debian:
``apt-get install chromium chromium-driver``) and ``pip install selenium``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def find_browser() -> tuple[str, str] | None:
    """(chromium, chromedriver) paths, or None when either is missing."""
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                   None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Scroll every horizontally scrollable element of the page to ``step`` x its visible width (0: back
# to the left); true while one of them has further to go.
_SCROLL_RIGHT = """
const step = arguments[0];
let more = false;
for (const el of document.querySelectorAll('*')) {
  const style = getComputedStyle(el);
  if (el.scrollWidth > el.clientWidth + 1 && ['auto', 'scroll'].includes(style.overflowX)) {
    el.scrollLeft = step * el.clientWidth * 0.8;
    if (el.scrollLeft + el.clientWidth < el.scrollWidth - 1) { more = true; }
  }
}
return more;
"""


def screenshot(url: str, out: Path, *, width: int = 1900, height: int = 1000) -> dict[str, Any]:
    """Open ``url`` (what `ancra-tune ui` prints: the study's runs list in its shared view), save a
    PNG. Returns what the page showed: the column headers and the run names in the table."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    found = find_browser()
    if found is None:
        raise RuntimeError("Chromium and chromedriver are needed (Debian: apt-get install chromium chromium-driver)")
    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(arg)
    options.binary_location = found[0]
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    wait = WebDriverWait(driver, 60)
    try:
        driver.get(url)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "[role='gridcell'] a")))
        time.sleep(2)
        for close in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):  # assistant panel
            if close.is_displayed():
                close.click()
        time.sleep(1)
        def shown_headers() -> list[str]:
            return [h.text.strip() for h in driver.find_elements(By.CSS_SELECTOR, "[role='columnheader']")
                    if h.text.strip()]

        # The table draws only the columns in view: scroll it right, as a person would, to read them all.
        headers = list(dict.fromkeys(shown_headers()))
        for step in range(1, 20):
            moved = driver.execute_script(_SCROLL_RIGHT, step)
            time.sleep(0.5)
            headers = list(dict.fromkeys([*headers, *shown_headers()]))
            if not moved:
                break
        driver.execute_script(_SCROLL_RIGHT, 0)
        time.sleep(0.5)
        rows = [a.text.strip() for a in driver.find_elements(By.CSS_SELECTOR, "[role='gridcell'] a")
                if a.text.strip()]
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
        return {"url": url, "headers": headers, "links": rows, "screenshot": str(out)}
    finally:
        driver.quit()


def main(argv: list[str] | None = None) -> int:
    from trainables.tracking import client, is_local, resolve_tracking_uri, serve_ui, study_url, wait_for_server

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="quickstart", help="the study's name (its MLflow experiment)")
    p.add_argument("--tracking-uri")
    p.add_argument("--out", default="mlflow_ui.png")
    p.add_argument("--port", type=int, default=0, help="UI port for a local store (default: a free one)")
    args = p.parse_args(argv)
    uri = resolve_tracking_uri(args.tracking_uri)
    exp = client(uri).get_experiment_by_name(args.experiment)
    if exp is None:
        print(f"error: no experiment {args.experiment!r} in {uri}; run `ancra-tune sweep "
              f"search_spaces/{args.experiment}.yaml` first", file=sys.stderr)
        return 2
    if is_local(uri):  # the UI of the local store, for the time of the screenshot
        with serve_ui(uri, port=args.port or _free_port()) as (url, _):
            seen = screenshot(study_url(uri, url, args.experiment), Path(args.out))
    else:
        wait_for_server(uri)
        seen = screenshot(study_url(uri, uri, args.experiment), Path(args.out))
    print(json.dumps(seen, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
