"""The chat page at / in headless Chromium (Debian's package, driven by Playwright): a streamed answer, the
conversation kept, and the server's refusal shown."""

import os

import httpx
import pytest

from servekit import Server, make_run

CHROMIUM = "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed")


@pytest.mark.timeout(120)
def test_chat_page_streams_keeps_the_conversation_and_shows_errors(tmp_path):
    run = make_run(tmp_path, max_seq_len=256)
    with Server(run, max_batch=2, api_key="sk-page-test-key") as srv, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(srv.base + "/")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "12")

        # No key yet: the server refuses and the page says why.
        page.fill("#input", "Hello there")
        page.press("#input", "Enter")
        error = page.wait_for_selector(".msg.error", timeout=20_000)
        assert "401" in error.inner_text() and "API key" in error.inner_text()

        page.fill("#api_key", "sk-page-test-key")
        page.dispatch_event("#api_key", "change")
        page.fill("#input", "Hello there")
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-done='1']", timeout=20_000)
        first = page.inner_text(".msg.assistant")
        want = httpx.post(srv.url + "/chat/completions", headers={"Authorization": "Bearer sk-page-test-key"},
                          json={"messages": [{"role": "user", "content": "Hello there"}], "temperature": 0,
                                "max_tokens": 12}, timeout=30).json()["choices"][0]["message"]["content"]
        assert first.strip() and first == want

        # A second turn is sent with the first in its history.
        page.fill("#input", "And then?")
        page.click("#send")
        page.locator(".msg.assistant[data-done='1']").nth(1).wait_for(timeout=20_000)
        second = page.locator(".msg.assistant").nth(1).inner_text()
        history = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
                   {"role": "user", "content": "And then?"}]
        want2 = httpx.post(srv.url + "/chat/completions", headers={"Authorization": "Bearer sk-page-test-key"},
                           json={"messages": history, "temperature": 0, "max_tokens": 12},
                           timeout=30).json()["choices"][0]["message"]["content"]
        assert second == want2
        assert page.locator(".msg.user").count() == 3 and page.locator(".msg.error").count() == 1
        browser.close()


@pytest.mark.timeout(120)
def test_the_page_picks_a_lora_adapter_by_model(tmp_path):
    """With adapters served (`--lora`), the page lists every model and sends the one picked: the streamed answer
    is the API's for that model, and differs from the base's."""
    import torch
    from kiln.formats.checkpoint import latest_checkpoint, load_model
    from lorakit import random_adapter
    run = make_run(tmp_path, max_seq_len=256)
    base, _ = load_model(latest_checkpoint(run / "checkpoints"), "cpu", torch.float32)
    folder = random_adapter(tmp_path / "a", base, 4, ["q_proj", "down_proj"], 3, 0.5, str(run))
    with Server(run, max_batch=2, lora_modules=[f"tuned={folder}"]) as srv, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(srv.base + "/")
        page.wait_for_selector("#pick:not([hidden])", timeout=20_000)
        assert page.eval_on_selector_all("#models option", "os => os.map(o => o.value)") == ["run", "tuned"]
        page.select_option("#models", "tuned")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "12")
        page.fill("#input", "Hello there")
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-done='1']", timeout=20_000)
        got = page.inner_text(".msg.assistant")
        ask = {"messages": [{"role": "user", "content": "Hello there"}], "temperature": 0, "max_tokens": 12}
        want = {m: httpx.post(srv.url + "/chat/completions", json={**ask, "model": m}, timeout=30).json()
                ["choices"][0]["message"]["content"] for m in ("run", "tuned")}
        assert want["tuned"] != want["run"] and got == want["tuned"]
        browser.close()
