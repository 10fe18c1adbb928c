"""A person's view: Chromium (Debian's, driven by Playwright) logs in to the real Label Studio, opens a
task, turns on Auto-Annotation, picks the smart keypoint tool, clicks the disc, and the mask our
backend answered appears as a brush region (and a polygon) in the region list; submitted, it is
stored as an annotation whose mask covers the disc. A screenshot goes to test-artifacts/."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (or set CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def test_smart_keypoint_click_in_the_browser_gives_a_mask_region(stack, browser):
    task = stack.uploaded[0]
    scene = stack.scenes[task]
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(60_000)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "browser-smart-keypoint.png"
    try:
        page.goto(f"{stack.ls.url}/user/login/")
        page.fill("input[name=email]", stack.ls.username)
        page.fill("input[name=password]", stack.ls.password)
        page.click("button[type=submit]")
        page.wait_for_url(lambda url: "/user/login" not in url)
        page.goto(f"{stack.ls.url}/projects/{stack.project}/data?task={task}")

        # Smart tools show only with Auto-Annotation on (the toggle under the image; Label Studio
        # shows it because the connected backend is interactive). Auto-Accept turns the answer into
        # regions at once instead of suggestions to accept one by one.
        page.get_by_text("Auto-Annotation", exact=True).click()
        page.get_by_text("Auto-Accept Suggestions", exact=True).click()
        # The smart tools live in a group at the bottom of the toolbar, opened on hover.
        page.locator(".lsf-tool:has(.lsf-toolbar__smart)").last.hover()
        page.locator('.lsf-toolbar__smart [aria-label="key-point-tool"]').click()
        page.locator(".lsf-label", has_text="Disc").first.click()  # the keypoint control's label

        canvas = page.locator(".konvajs-content").first.bounding_box()
        h, w = scene.mask.shape
        x = canvas["x"] + (scene.center[0] + 0.5) * canvas["width"] / w
        y = canvas["y"] + (scene.center[1] + 0.5) * canvas["height"] / h
        with page.expect_response(lambda r: "/interactive-annotating" in r.url) as answered:
            page.mouse.click(x, y)
        response = answered.value
        assert response.status == 200, response.text()
        assert "brushlabels" in response.text(), response.text()[:2000]

        regions = page.locator(".lsf-outliner-item")
        regions.nth(1).wait_for()  # brush + polygon
        page.screenshot(path=str(shot))
        texts = regions.all_inner_texts()
        assert len(texts) == 2 and all("Disc" in t for t in texts), texts

        page.get_by_role("button", name="Submit").first.click()
        page.wait_for_timeout(500)
        annotations = []
        for _ in range(40):
            annotations = stack.call("read the submitted annotation", "GET", f"/api/tasks/{task}/annotations/").json()
            if annotations:
                break
            page.wait_for_timeout(250)
    except Exception:
        page.screenshot(path=str(shot))
        raise
    finally:
        page.close()
    assert len(annotations) == 1, annotations
    by_type = {r["type"]: r for r in annotations[0]["result"]}
    assert {"brushlabels", "polygonlabels"} <= set(by_type), annotations[0]["result"]
    mask = decode_rle(by_type["brushlabels"]["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 127
    iou = float((mask & scene.mask).sum() / max((mask | scene.mask).sum(), 1))
    assert iou > 0.8, f"IoU {iou:.3f} of the submitted brush mask"
    assert "POST /predict" in stack.backend.log()
