"""The web page in headless Chromium: type a search, see thumbnails, open one, find similar images."""

import os
import shutil
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

import alignsearch
from alignsearch.cli import main
from alignsearch.server import ServerConfig, serve
from test_server import free_port

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER) and not os.environ.get("ALIGNSEARCH_REQUIRE_BROWSER"),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
)


@pytest.fixture(scope="module")
def page_url(tmp_path_factory, tiny_model):
    from conftest import make_images

    base = tmp_path_factory.mktemp("web")
    make_images(base / "corpus", 30)
    ix = base / "ix"
    assert CliRunner().invoke(main, ["index", str(base / "corpus"), "--index", str(ix), "--model", str(tiny_model)]).exit_code == 0
    servers = []
    started = threading.Event()

    def ready(server):
        servers.append(server)
        started.set()

    port = free_port()
    thread = threading.Thread(target=serve, args=(alignsearch.open(ix, device="cpu"), ServerConfig(port=port), ready), daemon=True)
    thread.start()
    assert started.wait(60)
    yield f"http://127.0.0.1:{port}/"
    servers[0].shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900", f"--user-data-dir={tmp_path_factory.mktemp('chrome')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def test_search_shows_thumbnails_opens_images_and_finds_similar(page_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(page_url)
    box = browser.find_element(By.ID, "q")
    box.send_keys("a red car on the beach", Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .card")) == 30)
    loaded = "return [...document.querySelectorAll('#grid img')].slice(0, 8).every(i => i.complete && i.naturalWidth > 0)"
    wait.until(lambda d: d.execute_script(loaded))
    assert "30 results" in browser.find_element(By.ID, "status").text
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "web-search.png"))

    first = browser.find_element(By.CSS_SELECTOR, "#grid .card")
    first.find_element(By.TAG_NAME, "img").click()
    wait.until(lambda d: d.execute_script("const v = document.getElementById('viewer'); "
                                          "const i = document.getElementById('viewer-img'); return v.open && i.complete && i.naturalWidth > 0"))
    browser.save_screenshot(str(ARTIFACTS / "web-viewer.png"))
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    wait.until(lambda d: not d.execute_script("return document.getElementById('viewer').open"))

    clicked = browser.find_elements(By.CSS_SELECTOR, "#grid .card")[5]
    clicked_id = clicked.get_attribute("data-id")
    clicked.find_element(By.CSS_SELECTOR, "button.similar").click()
    first_id = "const c = document.querySelector('#grid .card'); return c && c.dataset.id"  # atomic: the grid re-renders
    wait.until(lambda d: d.execute_script(first_id) == clicked_id)

    box = browser.find_element(By.ID, "q")  # keyboard: "/" focuses the search box
    browser.find_element(By.TAG_NAME, "body").send_keys("/")
    assert browser.switch_to.active_element == box
