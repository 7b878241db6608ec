"""Screenshots of the pages for docs/ (run by hand): the dashboard's index, one latent's page and
the join table, and the results report, taken in the same headless Chromium the tests use.

    .venv/bin/python scripts/screenshots.py RUN/dashboard runs/report.html docs/pages [LATENT]
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from browser import console_errors, start_browser  # noqa: E402


def shoot(driver, url: str, out: Path, wait_css: str, height: int = 1400) -> None:
    from selenium.webdriver.common.by import By

    driver.set_window_size(1280, height)
    driver.get(url)
    t = time.time()
    while not driver.find_elements(By.CSS_SELECTOR, wait_css):
        if time.time() - t > 20:
            raise SystemExit(f"{url}: {wait_css} never appeared")
        time.sleep(0.1)
    time.sleep(0.3)
    driver.save_screenshot(str(out))
    errors = console_errors(driver)
    print(f"{out}  ({len(errors)} console errors{': ' + '; '.join(errors) if errors else ''})")


def main() -> None:
    dash, report, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve(), Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    d = start_browser()
    try:
        base = dash.as_uri() + "/index.html"
        shoot(d, base, out / "dashboard-index.png", "#latents tr")
        latent = sys.argv[4] if len(sys.argv) > 4 else None
        if latent is None:
            from selenium.webdriver.common.by import By

            latent = d.find_elements(By.CSS_SELECTOR, "#latents td a")[0].text
        shoot(d, f"{base}#latent/{latent}", out / "dashboard-latent.png", "#top-examples .tok", 2000)
        shoot(d, f"{base}#join", out / "dashboard-join.png", "#latents tr")
        shoot(d, report.as_uri(), out / "report.png", "#experiments", 1600)
    finally:
        d.quit()


if __name__ == "__main__":
    main()
