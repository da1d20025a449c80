"""The chat page at GET /, in headless Chromium (Debian's chromium and chromium-driver,
driven with selenium): type a message, see the reply stream in, take a screenshot. The
page loads nothing from outside the server."""

import os
import shutil

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from served import make_model_dir, server

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def browser() -> webdriver.Chrome:
    assert shutil.which(CHROMIUM) and shutil.which(DRIVER), (
        "the chat page test needs Debian's chromium and chromium-driver (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1000,800"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def test_the_chat_page_streams_a_reply(tmp_path):
    model_dir = make_model_dir(str(tmp_path / "model"))
    with server(model_dir, "--served_model_name=tiny") as s:
        page = s.url + "/"
        html = httpx.get(page, timeout=10).text
        assert "<script src" not in html and "http" not in html.split("<script>")[1], (
            "the page must be self-contained")
        driver = browser()
        try:
            driver.get(page)
            assert "tiny" in driver.find_element(By.ID, "model").text
            tokens = driver.find_element(By.ID, "max_tokens")  # the server holds 96 in all
            tokens.clear()
            tokens.send_keys("48")
            # Greedy: sampled at the page's default 0.7, the random model sometimes ended
            # its reply after a token, in one streamed piece.
            temperature = driver.find_element(By.ID, "temperature")
            temperature.clear()
            temperature.send_keys("0")
            box = driver.find_element(By.ID, "input")
            box.send_keys("Who art thou?")
            driver.find_element(By.ID, "send").click()
            reply = WebDriverWait(driver, 120).until(lambda d: d.find_elements(
                By.CSS_SELECTOR, ".assistant[data-done='true'], .error"))[0]
            assert "error" not in reply.get_attribute("class"), reply.text
            user = driver.find_element(By.CSS_SELECTOR, ".user").text
            shot = tmp_path / "chat.png"
            driver.save_screenshot(str(shot))
            pieces = int(reply.get_attribute("data-pieces") or 0)
            print(f"\nchat page: sent {user!r}, reply of {len(reply.text)} characters streamed "
                  f"in {pieces} pieces; screenshot {os.path.getsize(shot):,} bytes")
            assert user == "Who art thou?"
            assert reply.text.strip()
            assert pieces > 1, "the reply should arrive as several streamed deltas"
            assert os.path.getsize(shot) > 5000
            keep = os.environ.get("LLMJAX_SCREENSHOT")
            if keep:
                shutil.copy(shot, keep)
        finally:
            driver.quit()
