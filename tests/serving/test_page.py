"""The page in a real browser (Debian's headless Chromium through Selenium): it fills a text in the fill
order and shows the same text as the API. Skipped, with the reason, where Chromium is not installed.

A3LM_SCREENSHOT=path keeps the screenshot there (docs/serving-page.png comes from this test)."""

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1200,900",
]


@pytest.fixture
def browser():
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip(
            "Chromium is not installed (apt-get install chromium chromium-driver): the page is untested here"
        )
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
    )
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_page_fills_in_order_and_matches_the_api(browser, server, client, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    text = "the cat [BLANK:5] on the mat, [BLANK:3] dog ran."
    browser.get(server[0] + "/")
    box = browser.find_element(By.ID, "text")
    box.clear()
    box.send_keys(text)
    browser.find_element(By.ID, "delay").clear()
    browser.find_element(By.ID, "delay").send_keys("30")
    browser.find_element(By.ID, "run").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "status").text in ("done", "failed"))
    assert browser.find_element(By.ID, "error").text == ""
    # the page's defaults: group-wise, random order, group size 2, greedy, seed 0
    api = client.completions.create(
        model="tiny",
        prompt=text,
        temperature=0,
        seed=0,
        extra_body={"blanks": True, "order": "random", "group_size": 2},
    )
    assert browser.find_element(By.ID, "result").text == api.choices[0].text.strip()
    a3 = api.choices[0].model_extra["a3"]
    assert f"{a3['logprob']:.4f} nats over 8 tokens" in browser.find_element(By.ID, "summary").text
    filled = browser.find_elements(By.CSS_SELECTOR, "#canvas .tok:not(.known)")
    assert len(filled) == 8 and all(
        "step" in s.get_attribute("title") for s in filled
    )  # every blank drawn, with its step
    shot = Path(os.environ.get("A3LM_SCREENSHOT") or tmp_path / "page.png")
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 0
