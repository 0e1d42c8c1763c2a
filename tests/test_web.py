"""The web page in a real browser: Debian's headless chromium, driven through chromedriver (selenium),
against a real `pocketrlhf serve` of a tiny model with two adapters and an API key."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import teach_adapter

KEY = "sk-web"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
    SELENIUM = True
except ImportError:
    SELENIUM = False

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER and SELENIUM),
    reason="browser test needs chromium and chromedriver (apt-get install chromium chromium-driver) and selenium "
           f"(pip install selenium); missing: {', '.join(n for n, ok in [('chromium', CHROMIUM), ('chromedriver', CHROMEDRIVER), ('selenium', SELENIUM)] if not ok)}")


@pytest.fixture(scope="module")
def served(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    stack = teach_adapter(llama, root / "stack", "stackllama", [("hi", "fine thanks"), ("bye", "see you")])
    chat = teach_adapter(llama, root / "chat", "chatml", [("hi", "hello friend<|im_end|>")])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    votes = root / "feedback" / "votes.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pocketrlhf", "serve", str(stack), "--adapters", f"chat={chat}",
                             "--port", str(port), "--device", "cpu", "--api-key", KEY, "--feedback-file", str(votes),
                             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.1)
    yield url, votes
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,900", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except Exception as e:  # noqa: BLE001 - a chromium that cannot start here (no shared memory, ...)
        pytest.skip(f"chromium is installed but did not start headless: {str(e).splitlines()[0]}")
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def wait_for(driver, script: str, timeout: float = 60):
    """Poll a JavaScript expression until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script("return " + script)
        if value:
            return value
        if time.monotonic() > deadline:
            shown = driver.execute_script("return document.getElementById('error').textContent")
            raise TimeoutError(f"{script} still false after {timeout}s; page error: {shown}")
        time.sleep(0.05)


def artifacts(tmp_path: Path) -> Path:
    # CI can collect the screenshots from POCKETRLHF_TEST_ARTIFACTS; locally they stay in pytest's tmp dir.
    out = Path(os.environ.get("POCKETRLHF_TEST_ARTIFACTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    return out


def not_blank(png: Path) -> None:
    from PIL import Image

    image = Image.open(png).convert("RGB")
    colors = image.getcolors(maxcolors=1 << 20) or []
    assert image.size[0] > 300 and image.size[1] > 300
    assert len(colors) > 20, f"{png} looks blank ({len(colors)} colours)"
    assert max(n for n, _ in colors) < 0.97 * image.size[0] * image.size[1], f"{png} is almost one colour"


def test_chat_streams_a_reply_and_compare_votes_land_in_the_file(served, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, votes = served
    d = browser
    d.get(url + "/")
    # The server has a key: the page asks for it once, keeps it in this tab's sessionStorage.
    wait_for(d, "!document.getElementById('keybar').hidden")
    d.find_element(By.ID, "key").send_keys(KEY)
    d.find_element(By.ID, "key-save").click()
    assert wait_for(d, "document.getElementById('chat-model').options.length") == 3
    assert d.execute_script("return sessionStorage.getItem('pocketrlhf-api-key')") == KEY
    assert d.execute_script("return localStorage.getItem('pocketrlhf-api-key')") is None

    # Chat: greedy settings, the stackllama adapter, one message; count the reply's updates as it streams.
    d.find_element(By.ID, "settings-toggle").click()
    temperature = d.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    d.execute_script("document.getElementById('chat-model').value = 'stack'")
    d.execute_script("""
        window.updates = 0;
        new MutationObserver(() => window.updates++).observe(document.getElementById('chat-log'),
                                                              {subtree: true, childList: true, characterData: true});""")
    d.find_element(By.ID, "chat-input").send_keys("hi")
    d.find_element(By.ID, "chat-send").click()
    wait_for(d, "document.querySelector('.msg.assistant[data-done]')")
    assert d.find_element(By.CSS_SELECTOR, ".msg.assistant .md").text == "fine thanks"
    assert d.execute_script("return window.updates") >= 3  # the reply grew piece by piece
    d.save_screenshot(str(artifacts(tmp_path) / "chat.png"))

    # Reset empties the conversation.
    d.find_element(By.ID, "chat-reset").click()
    assert d.execute_script("return document.querySelectorAll('.msg').length") == 0

    # Compare the two adapters, vote for B.
    d.find_element(By.ID, "tab-compare").click()
    d.execute_script("document.querySelectorAll('.cmp-model').forEach(b => b.checked = ['stack', 'chat'].includes(b.value))")
    d.find_element(By.ID, "cmp-prompt").send_keys("hi")
    d.find_element(By.ID, "cmp-run").click()
    wait_for(d, "!document.getElementById('cmp-votes').hidden")
    answers = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#cmp-answers .answer .md")]
    assert answers == ["fine thanks", "hello friend"]
    d.find_element(By.ID, "vote-B").click()
    wait_for(d, "document.getElementById('cmp-status').dataset.voted")
    shot = artifacts(tmp_path) / "compare.png"
    d.save_screenshot(str(shot))
    not_blank(shot)

    rows = [json.loads(x) for x in votes.read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("hi", "hello friend", "fine thanks")
    assert (row["chosen_model"], row["rejected_model"], row["vote"]) == ("chat", "stack", "better")
    assert row["annotator"].startswith("web-") and row["sampling"]["temperature"] == 0.0
    assert row["annotator"] == d.execute_script("return localStorage.getItem('pocketrlhf-annotator')")

    # The votes summary page.
    d.get(url + "/feedback")
    wait_for(d, "!document.getElementById('table').hidden")
    table = d.find_element(By.ID, "table").text
    assert "chat 100.0% 1 0" in table and "stack 0.0% 0 1" in table


def test_the_page_fits_a_phone_screen(served, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, _ = served
    d = browser
    d.set_window_size(390, 844)
    try:
        d.get(url + "/")
        wait_for(d, "document.getElementById('chat-model').options.length")  # the key is still in this tab
        d.find_element(By.ID, "chat-input").send_keys("Some **bold** and `code`\n")
        wait_for(d, "document.querySelector('.msg.assistant[data-done]')")
        assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        shot = artifacts(tmp_path) / "phone.png"
        d.save_screenshot(str(shot))
        not_blank(shot)
    finally:
        d.set_window_size(1280, 900)


def test_markdown_renders_code_and_escapes_html(served, browser):
    d = browser
    d.get(served[0] + "/")
    html = d.execute_script("return renderMarkdown(arguments[0])",
                            "# Title\n\nSome **bold**, *it* and `x<y`.\n\n- one\n- two\n\n```python\nprint('<b>')\n```\n<script>alert(1)</script>")
    assert "<strong>bold</strong>" in html and "<em>it</em>" in html and "<code>x&lt;y</code>" in html
    assert "<ul><li>one</li><li>two</li></ul>" in html
    assert '<pre><code data-lang="python">print(\'&lt;b&gt;\')</code></pre>' in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    # A reply still streaming, its code fence not closed yet, renders as code.
    assert d.execute_script("return renderMarkdown('```\\nx = 1')") == "<pre><code>x = 1</code></pre>"
