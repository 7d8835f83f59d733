"""konord's dashboard in a real browser: Debian's chromium, headless, driven through chromedriver
with Selenium's WebDriver client, against a 3-node mesh of real konord processes of its own
(one of them is killed). CI installs chromium and chromium-driver (.ci/run).

Screenshots go to KONOR_SCREENSHOTS when it names a directory (docs/img holds the ones in the
README), else to a temporary directory."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from conftest import Mesh
from konorkestra import MASKED

# How long a crashed node may take to show dead on the page: the failure detector's bound at
# the tests' 100 ms gossip period (docs/operations.md, Liveness: about 8 periods plus the
# phi detector's margin) is a few seconds, and the page reads the nodes every second.
DETECTION_BOUND_S = 10.0


@pytest.fixture(scope="module")
def open_mesh() -> Iterator[Mesh]:
    """Three nodes whose HTTP API serves reads without a certificate, as a dashboard needs."""
    root = Path(tempfile.mkdtemp(prefix="konor-dash-"))
    built = Mesh(root, extra_args=["--http-open-reads", "--label", "infra=onprem", "--label", "region=eu-west"])
    try:
        yield built
    finally:
        built.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail("the dashboard test needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver")
    options = Options()
    options.binary_location = chromium
    for argument in ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1100",
                     # The node's certificate is from the throw-away cluster CA, which this
                     # browser profile does not trust, and names konor-node, not 127.0.0.1.
                     "--ignore-certificate-errors"]:
        options.add_argument(argument)
    session = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield session
    finally:
        session.quit()


def screenshot(browser: WebDriver, name: str) -> None:
    target = Path(os.environ.get("KONOR_SCREENSHOTS") or tempfile.gettempdir())
    target.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(target / name))


def test_the_dashboard_shows_live_nodes_a_crash_and_a_write_with_its_diff(open_mesh: Mesh, browser: WebDriver) -> None:
    c1, c2, c3 = open_mesh.group("shop")
    c1.set("shop", {"db.pool": 10, "region": "eu-west"}, message="first settings")
    n1 = open_mesh.nodes[0]
    browser.get(f"https://127.0.0.1:{n1.http_port()}/")
    wait = WebDriverWait(browser, 30)

    # Three live nodes, and the group.
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '#nodes td[data-state="live"]')) == 3)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#groups tr[data-group="shop"]'))
    # The node table reads the health history: n2 has been seen live since it was first seen.
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '#nodes td[data-live-share="n2"]').text.endswith("%"))
    # The alerts panel reads /api/v1/alerts: a healthy mesh has none.
    wait.until(lambda d: d.find_element(By.ID, "alerts").text.endswith("no alert"))
    screenshot(browser, "dashboard-nodes.png")
    # A marker that a reload would wipe: every later change must arrive without one.
    browser.execute_script("window.konorNoReload = true")

    # A write on n2 shows up on n1's page as a new version, with its diff.
    committed = c2.set("shop", {"db.pool": 20}, message="more connections")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#versions tr[data-version="{committed.version}"]'))
    wait.until(lambda d: "db.pool: 10 → 20" in d.find_element(By.ID, "diff").text)
    assert "more connections" in browser.find_element(By.ID, "versions").text
    screenshot(browser, "dashboard-group.png")

    # A value marked secret: the page (an anonymous reader, --http-open-reads) shows it masked,
    # in the settings and in the diff, and the secret is nowhere in the page.
    secret = "pw-Xy71-not-for-viewers"
    marked = c1.set("shop", {"db.password": secret}, secret=["db.password"], message="a secret")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#versions tr[data-version="{marked.version}"]'))
    wait.until(lambda d: f'db.password = "{MASKED}"' in d.find_element(By.ID, "diff").text)
    wait.until(lambda d: "db.password" in d.find_element(By.ID, "settings").text)
    assert MASKED in browser.find_element(By.ID, "settings").text
    assert secret not in browser.page_source
    assert c2.get("shop", "db.password") == secret, "the socket's own user reads it"

    # kill -9 of n3: the page shows it dead within the detection bound, without a reload.
    open_mesh.nodes[2].kill()
    killed = time.monotonic()
    WebDriverWait(browser, DETECTION_BOUND_S, poll_frequency=0.1).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, '#nodes tr[data-node="n3"] td[data-state="dead"]'))
    shown_after = time.monotonic() - killed
    assert browser.execute_script("return window.konorNoReload === true"), "the page reloaded"
    assert browser.find_element(By.ID, "count-dead").text == "1"
    screenshot(browser, "dashboard-dead-node.png")
    print(f"n3 shown dead {shown_after:.2f} s after kill -9")
    for client in (c1, c2, c3):
        client.close()
