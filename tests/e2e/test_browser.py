"""The Dagster UI in a real browser (Debian `chromium` + `chromium-driver`, driven by selenium),
against the webserver of the e2e stack after the inbox slide was materialized:

- the lineage of `patch_coords` (tissue_mask → patch_coords → features/mobilenet_v2),
- the partitions view of `patch_coords` and the inbox slide's latest materialization,
- that materialization's event with its `preview` metadata rendered as an image.

Screenshots go to `test-artifacts/browser/` in the repository (gitignored) and to the test's tmp.
Chromium is required, never skipped: install it with
`apt-get install -y chromium chromium-driver` (or point ATLASPATCH_CHROMIUM /
ATLASPATCH_CHROMEDRIVER at another build).
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
from pathlib import Path

import psutil
import pytest

CHROMIUM = os.environ.get("ATLASPATCH_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ATLASPATCH_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1600,1000",
)
WAIT = 90  # seconds for a page element (a loaded 2-core machine renders slowly)
pytestmark = pytest.mark.filterwarnings("ignore:Using variable_values:DeprecationWarning")  # gql, via the client


class Browser:
    def __init__(self, driver, base_url: str, shots: list[Path]):
        self.driver, self.base_url, self.shot_dirs = driver, base_url, shots

    def open(self, path: str) -> None:
        self.driver.get(self.base_url + path)
        self.wait_text("Catalog")  # the app shell rendered
        self.dismiss_dialogs()

    def dismiss_dialogs(self) -> None:
        """The 'join the community' dialog appears when the instance has `nux` enabled."""
        from selenium.webdriver.common.by import By

        for b in self.driver.find_elements(By.XPATH, "//button[normalize-space()='Skip']"):
            with contextlib.suppress(Exception):
                b.click()

    def wait(self, condition, what: str, timeout: float = WAIT):
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.5).until(condition)
        except TimeoutException:
            path = self.screenshot("timeout")
            pytest.fail(f"timed out waiting for {what} on {self.driver.current_url} (screenshot {path})")

    def wait_text(self, text: str, timeout: float = WAIT) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as EC

        self.wait(EC.text_to_be_present_in_element((By.TAG_NAME, "body"), text), repr(text), timeout)

    def wait_xpath(self, xpath: str, what: str, timeout: float = WAIT):
        from selenium.webdriver.common.by import By

        def visible(d):
            els = [e for e in d.find_elements(By.XPATH, xpath) if e.is_displayed()]
            return els or False

        return self.wait(visible, what, timeout)

    def body_text(self) -> str:
        from selenium.webdriver.common.by import By

        return " ".join(self.driver.find_element(By.TAG_NAME, "body").text.split())

    def screenshot(self, name: str) -> Path:
        paths = []
        for d in self.shot_dirs:
            d.mkdir(parents=True, exist_ok=True)
            p = d / f"{name}.png"
            self.driver.save_screenshot(str(p))
            paths.append(p)
        return paths[0]


@pytest.fixture(scope="module")
def browser(dagster_stack, tmp_path_factory: pytest.TempPathFactory):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    if missing:
        pytest.fail(
            f"browser test needs Chromium and its driver; missing {missing}. On Debian/Ubuntu: "
            "`apt-get install -y chromium chromium-driver` (or set ATLASPATCH_CHROMIUM / ATLASPATCH_CHROMEDRIVER)"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[dev]'")

    tmp = tmp_path_factory.mktemp("browser")
    options = Options()
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp / 'profile'}")
    options.binary_location = CHROMIUM
    service = Service(CHROMEDRIVER, log_output=str(tmp / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(120)
    shots = [dagster_stack.artifacts / "browser", tmp / "screenshots"]
    for d in shots:  # screenshots of this session only
        shutil.rmtree(d, ignore_errors=True)
    started: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(service.process.pid)
        started = [root, *root.children(recursive=True)]
    try:
        yield Browser(driver, dagster_stack.url, shots)
    finally:
        driver.quit()  # stops chromium and chromedriver
        _, alive = psutil.wait_procs(started, timeout=15)
        for p in alive:  # by PID, only what this fixture started
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=10)


def _run_ids(stack, asset: str, partition: str) -> set[str]:
    return {m["runId"] for m in stack.materializations(asset, [partition])}


def test_lineage_page(dagster_stack, inbox_slide, browser: Browser) -> None:
    stack, slide = dagster_stack, inbox_slide.slide_id
    browser.open("/assets/patch_coords?view=lineage")
    for name in ("tissue_mask", "patch_coords", "mobilenet_v2"):  # the three nodes of the graph
        browser.wait_text(name)
    for name in ("tissue_mask", "patch_coords", "mobilenet_v2"):  # drawn with their details (not zoomed out)
        browser.wait_xpath(
            f"//div[@data-tooltip='{name}']",
            f"lineage node {name} with its details (a bigger graph is drawn zoomed out: keep "
            "ATLASPATCH_ENCODERS / ATLASPATCH_SLIDE_ENCODERS small in the e2e stack)",
        )
    # each node summarizes its partitions: tissue_mask/patch_coords filled, features never computed
    for asset, filled in (("tissue_mask", "100% filled"), ("patch_coords", "100% filled")):
        link = browser.wait_xpath(f"//a[@href='/assets/{asset}?view=partitions' and contains(., '% filled')]", asset)
        assert link[0].text.strip() == filled, (asset, link[0].text)
    features = browser.wait_xpath("//a[contains(@href, 'view=partitions') and contains(., '% filled')]", "features")
    assert "0% filled" in [a.text.strip() for a in features]
    # the patch_coords node links its latest materialization's run
    runs = browser.wait_xpath(
        "//div[@data-tooltip='patch_coords']/ancestor::div[.//a[starts-with(@href, '/runs/')]][1]"
        "//a[starts-with(@href, '/runs/')]",
        "the latest-event link of patch_coords",
    )
    run_id = runs[0].get_attribute("href").split("/runs/")[1].split("?")[0]
    assert run_id in {m["runId"] for m in stack.materializations("patch_coords")}
    text = browser.body_text()
    assert "slides" in text and "features" in text  # the asset groups
    assert "Upstream" in text and "Downstream" in text
    assert inbox_slide.run["runId"] in _run_ids(stack, "patch_coords", slide)
    browser.screenshot("1-lineage-patch_coords")


def test_partitions_view(dagster_stack, inbox_slide, browser: Browser) -> None:
    stack, slide = dagster_stack, inbox_slide.slide_id
    statuses = stack.partition_statuses("patch_coords")
    browser.open("/assets/patch_coords?view=partitions")
    browser.wait_text(f"Materialized ({len(statuses['materializedPartitions'])})")
    browser.wait_text(f"Missing ({len(statuses['unmaterializedPartitions'])})")
    browser.wait_text(f"{len(statuses['partitionKeys'])} Partitions Selected")
    row = browser.wait_xpath(f"//*[normalize-space(text())='{slide}']", f"partition {slide} in the list")
    browser.screenshot("2-partitions-patch_coords")

    row[0].click()  # the partition's latest materialization with its metadata
    browser.wait_text("Latest materialization")
    coords = stack.materializations("patch_coords", [slide])[0]
    num_patches = next(e["intValue"] for e in coords["metadataEntries"] if e["label"] == "num_patches")
    cell = browser.wait_xpath(
        "//tr[td[normalize-space()='num_patches']]/td[2]", "the num_patches metadata of the selected partition"
    )
    assert cell[0].text.strip() == str(num_patches)
    text = browser.body_text()
    assert "Materialized" in text and coords["runId"][:8] in text and stack.sensor_job in text
    for label in ("mean_tissue_fraction", "slide_mpp [µm/px]", "recipe_hash", "preview"):
        assert label in text
    browser.screenshot("3-partition-detail")


def test_materialization_with_preview(dagster_stack, inbox_slide, browser: Browser) -> None:
    from PIL import Image
    from selenium.webdriver.common.by import By

    stack, slide = dagster_stack, inbox_slide.slide_id
    coords = stack.materializations("patch_coords", [slide])[0]
    md = next(e["mdStr"] for e in coords["metadataEntries"] if e["label"] == "preview")
    src = md[md.index("(") + 1 : md.rindex(")")]
    assert src.startswith("data:image/png;base64,")

    browser.open(f"/assets/patch_coords?view=events&partition={slide}")
    browser.wait_text("num_patches")
    browser.wait(
        lambda d: f"Partition {slide} materialized in run {coords['runId'][:8]}" in browser.body_text(),
        "the materialization event of the inbox run",
    )
    link = browser.wait_xpath(
        "//tr[td[normalize-space()='preview']]//a[normalize-space()='[Show Markdown]']", "the preview metadata"
    )
    browser.screenshot("4-materialization-event")
    link[0].click()
    imgs = browser.wait_xpath(
        "//*[@role='dialog']//img[starts-with(@src, 'data:image/png')]", "the preview rendered as an <img>"
    )
    img = imgs[0]
    browser.wait(
        lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img),
        "the preview image to decode",
    )
    w, h = browser.driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img)
    assert img.get_attribute("src") == src  # the stored PNG, not a broken-image placeholder
    assert img.get_attribute("alt") == "preview" and img.size["width"] > 50 and img.size["height"] > 50
    png = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")
    assert png.size == (w, h)
    lo, hi = zip(*png.getextrema(), strict=True)
    assert max(hi) - min(lo) > 100, "preview image is blank"
    dialog = img.find_element(By.XPATH, "./ancestor::*[@role='dialog'][1]")
    assert "preview" in dialog.text
    browser.screenshot("5-materialization-preview")
    for d in browser.shot_dirs:
        png.save(d / "5-preview-image.png")
