"""The feature dashboard: static files, the local server's confinement, and the pages in a real
headless Chromium (index, search, a latent page's highlighted tokens, hostile corpus text)."""

from __future__ import annotations

import http.client
import json
import time

import pytest
from browser import console_errors, start_browser

from saelab.dashboard.build import Column, SiteData, write_site
from saelab.dashboard.serve import resolve_inside, start_server

XSS = ['<script>window.__xss = 1</script>', '"><img src=x onerror="window.__xss=2">']


def window(tokens, acts, source="wikipedia", center=0):
    return {"t": tokens, "a": acts, "c": center, "s": source}


def synthetic_site(n: int = 3000) -> SiteData:
    cols = [Column("id", "latent", index=True), Column("density", "density", index=True),
            Column("max_activation", "max act", index=True), Column("explanation", "explanation", "text", index=True),
            Column("detection", "detection", index=True), Column("ablation_dce", "ablation ΔCE")]
    rows = [{"id": i, "density": 1 / (i + 2), "max_activation": float(i % 17), "explanation": f"label {i}",
             "detection": 0.5 + (i % 10) / 20, "ablation_dce": None} for i in range(n)]
    rows[7]["explanation"] = "the word banana " + XSS[0]
    rows[8]["explanation"] = XSS[1]
    latents = {}
    for i in (7, 8, 9):
        latents[i] = {
            "stats": {"density": 0.1, "mean_activation": 1.0, "max_activation": 4.0, "fire_contexts": 12},
            "hist": {"edges": [0, 1, 2, 3, 4], "counts": [5, 3, 2, 1], "what": "per-context maxima"},
            "lens": {"promoted": [["ban", 1.2], [XSS[0], 1.0]], "suppressed": [["x", -1.0]]},
            "neighbours": [[9, 0.41]], "domains": {"wikipedia": 10, "python": 2}, "domains_what": "contexts",
            "top": [window(["A", " banana", " split", XSS[0], XSS[1]], [0.0, 4.0, 1.0, 0.5, 0.0], center=1)],
            "bands": [{"band": 0, "lo": 2.0, "hi": 4.0, "n": 5, "windows": [window(["one", " banana"], [0.0, 2.5])]}],
            "bands_what": "equal-count bands",
            "explanation": {"label": rows[i]["explanation"], "all": {"default": rows[i]["explanation"]},
                            "scores": {"detection": 0.8}} if i != 9 else None,
            "join": {"detection": 0.8},
        }
    meta = {"title": "saelab dashboard: test", "subtitle": "synthetic " + XSS[0], "join_note": "every result",
            "missing": [{"what": "ablation effects", "command": "saelab ablate RUN"}],
            "interpret_command": "saelab interpret RUN"}
    return SiteData(meta, cols, rows, latents)


def test_the_site_is_static_files_and_a_rebuild_replaces_it(tmp_path):
    out = tmp_path / "dash"
    index = write_site(synthetic_site(50), out)
    assert index == out / "index.html" and (out / "static" / "app.js").is_file()
    assert sorted(p.name for p in (out / "data" / "latents").iterdir()) == ["7.js", "8.js", "9.js"]
    text = (out / "data" / "index.js").read_text()
    assert text.startswith("window.SAELAB_INDEX = ") and "\\u0394" in text  # ASCII-only script text
    data = json.loads(text[len("window.SAELAB_INDEX = "):-2])
    assert len(data["rows"]) == 50 and data["rows"][8]["explanation"] == XSS[1]
    assert (out / "data" / "join.csv").read_text().splitlines()[0] == "id,density,max_activation,explanation,detection,ablation_dce"
    html = index.read_text()
    assert "<script src=\"data/index.js\"></script>" in html and "http" not in html.replace("http-equiv", "")
    write_site(synthetic_site(10), out)  # rebuilt in place: the old latent files are gone with the old site
    assert len(json.loads((out / "data" / "index.js").read_text()[22:-2])["rows"]) == 10
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_the_server_serves_only_the_dashboard(tmp_path):
    out = tmp_path / "dash"
    write_site(synthetic_site(10), out)
    (tmp_path / "secret.txt").write_text("secret")
    (out / "data" / "link").symlink_to(tmp_path / "secret.txt")
    assert resolve_inside(out.resolve(), "/%2e%2e/secret.txt") is None
    server, thread = start_server(out)
    host, port = server.server_address[:2]
    try:
        assert host == "127.0.0.1"

        def get(path, method="GET"):
            c = http.client.HTTPConnection(host, port, timeout=10)
            c.putrequest(method, path, skip_accept_encoding=True)  # sent as written, not normalised
            c.endheaders()
            r = c.getresponse()
            return r.status, r.read()

        status, body = get("/")
        assert status == 200 and b"data/index.js" in body
        assert get("/data/index.js")[0] == 200
        for bad in ("/../secret.txt", "/%2e%2e/secret.txt", "/data/..%2f..%2fsecret.txt", "/data/link",
                    "/%2e%2e%2f%2e%2e%2fetc/passwd", "//etc/passwd"):
            status, body = get(bad)
            assert status in (403, 404) and b"secret" not in body and b"root:" not in body, bad
        assert get("/nope.js")[0] == 404
        assert get("/", "POST")[0] == 405
    finally:
        server.shutdown()
        server.server_close()


def _wait(driver, cond, timeout=10.0):
    t = time.time()
    while time.time() - t < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError("timed out waiting in the browser")


def check_pages(driver, base: str, latent: int, query: str, xss: bool = True) -> None:
    """The index lists latents, search finds one by its explanation, its page shows highlighted
    tokens with their values, and hostile text renders as text with no console errors."""
    from selenium.webdriver.common.by import By

    driver.get(base + "index.html")
    _wait(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "#latents tr"))
    rows = driver.find_elements(By.CSS_SELECTOR, "#latents tr")
    assert len(rows) > 2
    box = driver.find_element(By.ID, "search")
    box.send_keys(query)
    _wait(driver, lambda: str(latent) in [a.text for a in driver.find_elements(By.CSS_SELECTOR, "#latents td a")])
    driver.find_element(By.LINK_TEXT, str(latent)).click()
    _wait(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "#top-examples .tok"))
    lit = [s for s in driver.find_elements(By.CSS_SELECTOR, "#top-examples .tok") if s.get_attribute("style")]
    assert lit and all(float(s.get_attribute("data-act")) > 0 for s in lit)
    assert driver.find_elements(By.CSS_SELECTOR, "svg[aria-label='activation histogram'] rect")
    if xss:
        page = driver.find_element(By.ID, "latent-page").text
        assert XSS[0] in page and XSS[1] in page  # shown as text
        assert driver.execute_script("return window.__xss === undefined")
        assert not driver.find_elements(By.CSS_SELECTOR, "#app img")
    assert console_errors(driver) == []


def test_the_pages_in_a_real_browser_from_disk_and_from_the_server(tmp_path):
    out = tmp_path / "dash"
    write_site(synthetic_site(20_000), out)  # a wide SAE: the index stays usable
    driver = start_browser()
    server = None
    try:
        check_pages(driver, out.resolve().as_uri() + "/", 7, "banana")
        driver.get(out.resolve().as_uri() + "/index.html#latent/8")
        from selenium.webdriver.common.by import By

        _wait(driver, lambda: driver.find_elements(By.ID, "latent-page"))
        assert XSS[1] in driver.find_element(By.CSS_SELECTOR, "#latent-page .big").text
        driver.get(out.resolve().as_uri() + "/index.html#latent/9")  # no explanation: says which command
        _wait(driver, lambda: "saelab interpret RUN" in driver.find_element(By.ID, "app").text)
        driver.get(out.resolve().as_uri() + "/index.html#latent/123")  # no page data: says so
        _wait(driver, lambda: "no page data" in driver.find_element(By.ID, "app").text)
        console_errors(driver)  # the missing file's load error, expected: cleared before the next checks
        server, _ = start_server(out)
        check_pages(driver, f"http://127.0.0.1:{server.server_address[1]}/", 7, "banana")
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/#join")
        _wait(driver, lambda: "ablation" in driver.find_element(By.ID, "latents").text)
    finally:
        driver.quit()
        if server:
            server.shutdown()
            server.server_close()


@pytest.mark.parametrize("bad", ["", "x"])
def test_the_server_refuses_a_folder_without_a_dashboard(tmp_path, bad):
    with pytest.raises(FileNotFoundError, match="saelab dashboard"):
        start_server(tmp_path / bad)


def test_a_runs_dashboard_end_to_end_on_the_tiny_model(own_sae_run, tiny_loaded, text_jsonl, tmp_path):
    """Examples for every latent of a real (tiny) SAE, the logit lens and neighbours, what the run
    lacks; the top window's highlighted value is the activation the examples pass kept."""
    from saelab.experiments.dashboard import DashboardConfig, build_dashboard, examples_state_path
    from saelab.interp.examples import ExampleState

    cfg = DashboardConfig(run=str(own_sae_run.path), out=str(tmp_path / "dash"),
                          examples={"text": str(text_jsonl), "split": "train", "tokens": 3000, "ctx_len": 64,
                                    "batch_size": 8, "n_top": 5, "reservoir": 20, "pool": 16})
    index, wall = build_dashboard(cfg, loaded=tiny_loaded, progress=False)
    assert index.is_file() and wall["total"] > 0
    mtime = index.stat().st_mtime_ns
    assert build_dashboard(cfg, loaded=tiny_loaded, progress=False) == (index, wall)  # same inputs: reused
    assert index.stat().st_mtime_ns == mtime
    data = json.loads((tmp_path / "dash" / "data" / "index.js").read_text()[22:-2])
    state = ExampleState.load(examples_state_path(own_sae_run.path))
    alive = (state.fire_contexts > 0).nonzero().squeeze(1).tolist()
    assert [r["id"] for r in data["rows"]] == alive and len(alive) > 10
    assert {m["command"].split()[1] for m in data["meta"]["missing"]} >= {"interpret", "ablate", "steer"}
    j = alive[0]
    page = json.loads((tmp_path / "dash" / "data" / "latents" / f"{j}.js").read_text()[len(f"SAELAB_LATENT({j}, "):-3])
    top = page["top"][0]
    assert abs(top["a"][top["c"]] - float(state.top_val[j, 0])) < 1e-3  # the highlighted max is the kept one
    assert len(page["lens"]["promoted"]) == cfg.lens_k and len(page["neighbours"]) == cfg.neighbours
    assert sum(page["hist"]["counts"]) == len(state.sample(j)) and page["bands"]
    driver = start_browser()
    try:
        check_pages(driver, index.parent.resolve().as_uri() + "/", j, str(j), xss=False)
    finally:
        driver.quit()
