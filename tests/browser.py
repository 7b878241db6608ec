"""A real headless Chromium (Debian `chromium` + `chromium-driver`, driven by selenium) for page
tests: started by the test, offline, with a fresh profile; tests skip with the reason where it
is not installed (scripts/install.sh installs it where it can)."""

from __future__ import annotations

import shutil
import tempfile

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WHY = ("no Chromium: install Debian's chromium and chromium-driver (scripts/install.sh does where it can "
       "run apt as root)")


def start_browser(width: int = 1280, height: int = 900):
    """A headless Chromium session; the caller quits it. Console messages are kept (get_log('browser'))."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (the dev extra has it)")
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(WHY)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size={width},{height}",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='saelab-chromium-')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))


def console_errors(driver) -> list[str]:
    return [m["message"] for m in driver.get_log("browser") if m["level"] in ("SEVERE", "ERROR")]
