"""The web UI in a real browser: Playwright driving Debian's Chromium against a live server
(a subprocess on 127.0.0.1) with two tiny random-weight models.

Needs the `playwright` pip package and /usr/bin/chromium (`apt-get install chromium`); never
`playwright install`. Skipped when either is missing, unless KOTONOHA_REQUIRE_BROWSER=1 (CI),
which turns the skip into a failure. Screenshots go to $KOTONOHA_SCREENSHOT_DIR when set
(`make screenshots` sets it to docs/screenshots/), else to a temporary folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from kotonoha.feedback import export_preferences
from serve_testing import save_tiny, subprocess_server

CHROMIUM = os.environ.get("KOTONOHA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
SHOTS = Path(os.environ.get("KOTONOHA_SCREENSHOT_DIR")
             or tempfile.mkdtemp(prefix="kotonoha-shots-"))

pytestmark = pytest.mark.slow


def _need(condition: bool, why: str) -> None:
    if condition:
        return
    if os.environ.get("KOTONOHA_REQUIRE_BROWSER") == "1":
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    _need(sync_playwright is not None, "the playwright package is not installed")
    _need(Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is not None,
          f"{CHROMIUM} not found (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("browser")
    save_tiny(tmp / "alpha", seed=0)
    save_tiny(tmp / "beta", seed=1)
    db = tmp / "ui.db"
    with subprocess_server([str(tmp / "alpha"), str(tmp / "beta")], db) as (_, url):
        yield url, db


@pytest.fixture
def page(browser: Any, server: Any) -> Any:
    context = browser.new_context(viewport={"width": 1280, "height": 800}, locale="en-US")
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # Records that an answer was shown while it streamed, not only once it was complete.
    page.add_init_script("""
      window.__streamed = 0;
      new MutationObserver(() => {
        const live = document.querySelector('.msg.streaming .content');
        if (live && live.textContent.length) window.__streamed += 1;
      }).observe(document, {subtree: true, childList: true, characterData: true});
    """)
    page.goto(server[0] + "/")
    page.wait_for_selector("body[data-ready='1']")
    yield page
    assert errors == [], errors
    context.close()


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name))


def test_chat_streams_regenerates_rates_and_edits(page: Any, server: Any,
                                                  tmp_path: Path) -> None:
    page.click("#chat-settings-toggle")
    page.fill("#chat-system", "You are a helpful assistant.")
    page.fill("#chat-max-tokens", "40")
    page.fill("#chat-seed", "7")
    page.click("#chat-settings-toggle")
    page.fill("#chat-input", "What is the capital of Aurel?")
    page.press("#chat-input", "Enter")
    answer = page.wait_for_selector(".msg.assistant[data-id]")
    assert page.evaluate("window.__streamed") > 0
    assert answer.query_selector(".content").inner_text().strip()
    assert page.inner_text(".msg.user .content") == "What is the capital of Aurel?"
    assert page.locator("#conversation-list li").count() == 1

    # Another seed: the same one would regenerate the same answer, which makes no pair.
    page.click("#chat-settings-toggle")
    page.fill("#chat-seed", "8")
    page.click("#chat-settings-toggle")
    page.click(".msg.assistant .regenerate")
    page.wait_for_selector(".msg.assistant .position:text('2 / 2')")
    page.click(".msg.assistant .thumb-up")
    page.wait_for_selector(".msg.assistant .thumb-up.on")
    page.click(".msg.assistant .comment")
    page.fill(".msg.assistant .comment-input", "clear and short")
    page.click(".msg.assistant .save-comment")
    page.wait_for_selector(".msg.assistant .note:text('clear and short')")
    page.click(".msg.assistant .prev")
    page.wait_for_selector(".msg.assistant .position:text('1 / 2')")
    page.click(".msg.assistant .thumb-down")
    page.wait_for_selector(".msg.assistant .thumb-down.on")

    # The two rated answers are now a preference pair in the store.
    pairs = tmp_path / "prefs.jsonl"
    assert export_preferences(server[1], pairs) == {"feedback": 1}

    page.click(".msg.user .edit")
    page.fill(".msg.user .edit-box", "What is the capital of Velmar?")
    page.click(".msg.user .save-edit")
    page.wait_for_selector(".msg.user .position:text('2 / 2')")
    page.wait_for_selector(".msg.assistant[data-id]")
    assert page.inner_text(".msg.user .content") == "What is the capital of Velmar?"

    page.fill("#chat-input", "And its river?")
    page.press("#chat-input", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant[data-id]').length == 2")
    shot(page, "chat.png")

    # The conversation is on the server: a reload (or a restart) lists and reopens it.
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    page.click("#conversation-list li .open")
    page.wait_for_function("document.querySelectorAll('.msg[data-id]').length == 4")


def test_playground_shows_token_probabilities(page: Any) -> None:
    page.click("#tab-playground")
    page.fill("#pg-prompt", "The river that runs through the capital")
    page.fill("#pg-max-tokens", "24")
    page.fill("#pg-seed", "3")
    page.fill("#pg-logprobs", "5")
    page.check("#pg-echo")
    page.click("#pg-run")
    page.wait_for_selector("#pg-status:text('finish reason')")
    tokens = page.locator("#pg-output .tok[data-prob]")
    assert tokens.count() >= 10
    probs = [float(p) for p in tokens.evaluate_all("els => els.map(e => e.dataset.prob)")]
    assert all(0 < p <= 1 for p in probs)
    colours = tokens.evaluate_all("els => els.map(e => e.style.background)")
    assert all(c.startswith("rgb") for c in colours)
    last = tokens.nth(tokens.count() - 3)
    last.hover()
    tooltip = page.wait_for_selector("#tooltip:not(.hidden)")
    assert "%" in tooltip.inner_text()
    assert len(tooltip.query_selector_all("tr")) >= 3  # header + alternatives
    last.click()
    details = page.wait_for_selector("#pg-details:not(.hidden)")
    assert details.query_selector("tr.chosen") is not None
    page.mouse.move(5, 5)
    last.hover()
    shot(page, "playground.png")
    # What the run drew follows the language switch: the status line and the pinned table.
    page.select_option("#lang", "ja")
    assert "終了理由" in page.inner_text("#pg-status")
    assert page.inner_text("#pg-details th >> nth=0") == "トークン"
    page.select_option("#lang", "en")
    assert "finish reason" in page.inner_text("#pg-status")


def test_playground_sends_its_stop_sequences(page: Any) -> None:
    page.click("#tab-playground")
    page.fill("#pg-prompt", "Once upon a time")
    page.fill("#pg-max-tokens", "4")
    page.fill("#pg-stops", "river\n\\n\\n")
    with page.expect_request("**/v1/completions") as request:
        page.click("#pg-run")
    assert request.value.post_data_json["stop"] == ["river", "\n\n"]
    page.wait_for_selector("#pg-status:text('finish reason')")


def test_inside_tab_lens_and_attention(page: Any) -> None:
    page.click("#tab-inside")
    page.fill("#inside-text", "The river runs past the old bank.")
    page.fill("#inside-answer", " bank")
    page.click("#inside-lens")
    page.wait_for_selector("#lens-table")
    rows = page.locator("#lens-table tr.lens-row")
    assert rows.count() == 3  # the embeddings + 2 blocks of the tiny model
    assert "%" in rows.first.inner_text()
    page.click("#inside-attention")
    page.wait_for_selector("#attention-maps table.attention")
    assert page.locator("#attention-maps table.attention").count() == 4  # heads
    assert page.input_value("#inside-layer") == "1"  # the last layer first
    first = page.locator("#attention-maps table.attention").first
    n_tokens = first.locator("th.query").count()
    assert first.locator("td.cell").count() == n_tokens * n_tokens
    page.select_option("#inside-layer", "0")
    page.wait_for_function("document.querySelector('#inside-layer').value === '0' && "
                           "document.querySelectorAll('#attention-maps table').length === 4")
    shot(page, "inside.png")
    page.fill("#inside-word", "river")
    page.click("#inside-neighbours")
    page.wait_for_selector("#neighbours-table")
    assert page.locator("#neighbours-table tr.neighbour").count() == 10
    page.select_option("#lang", "ja")
    assert page.inner_text("#tab-inside") == "内部"
    assert page.inner_text("#neighbours-table th >> nth=0") == "単語"  # drawn before the switch
    page.select_option("#lang", "en")
    assert page.inner_text("#neighbours-table th >> nth=0") == "Word"


def test_arena_vote_changes_leaderboard(page: Any) -> None:
    page.click("#tab-arena")
    page.wait_for_selector("#vote-count:text('so far')")
    before = int(page.inner_text("#vote-count").split()[0])
    page.fill("#arena-prompt", "Tell me about the bridge over the river.")
    page.click("#arena-send")
    page.wait_for_selector("#vote-a:not([disabled])")
    assert page.inner_text("#name-a") == "" and page.inner_text("#name-b") == ""
    assert page.inner_text("#text-a").strip() and page.inner_text("#text-b").strip()
    page.click("#vote-a")
    page.wait_for_selector("#name-a:not(:empty)")
    winner = page.inner_text("#name-a").strip("()")
    assert winner in ("alpha", "beta") and page.inner_text("#name-b").strip("()") != winner
    page.wait_for_function(f"parseInt(document.querySelector('#vote-count').textContent) == "
                           f"{before + 1}")
    first = page.locator("#leaderboard tbody tr").first
    assert first.get_attribute("data-model") == winner
    assert float(first.locator(".rating").inner_text()) > 1000
    shot(page, "arena.png")


def test_language_switch(page: Any) -> None:
    assert page.inner_text("#tab-chat") == "Chat"
    page.select_option("#lang", "ja")
    assert page.inner_text("#tab-chat") == "チャット"
    assert page.get_attribute("html", "lang") == "ja"
    assert page.get_attribute("#chat-input", "placeholder") == "メッセージを入力…"
    page.reload()  # the choice is remembered
    page.wait_for_selector("body[data-ready='1']")
    assert page.inner_text("#tab-arena") == "アリーナ"
    page.fill("#chat-input", "アウレルの首都はどこですか？")
    page.press("#chat-input", "Enter")
    page.wait_for_selector(".msg.assistant[data-id]")
    assert page.inner_text(".msg.user .role") == "あなた"
    assert page.inner_text(".msg.assistant .regenerate") == "再生成"
    shot(page, "chat-ja.png")
    page.select_option("#lang", "en")
    assert page.inner_text("#tab-playground") == "Playground"


def test_a_rejected_turn_gives_the_typed_text_back(page: Any) -> None:
    long = "Hello " * 400  # over the tiny models' context: the server answers 400
    page.fill("#chat-input", long)
    page.press("#chat-input", "Enter")
    page.wait_for_selector("#error-bar:not(.hidden)")
    assert page.input_value("#chat-input") == long
    assert page.locator(".msg[data-id]").count() == 0


def test_new_chat_while_an_answer_streams(page: Any) -> None:
    """The old answer used to land in the new chat, and the next message was refused."""
    page.click("#chat-settings-toggle")
    page.fill("#chat-max-tokens", "200")
    page.click("#chat-settings-toggle")
    page.fill("#chat-input", "Tell me a long story.")
    page.press("#chat-input", "Enter")
    page.wait_for_selector(".msg.streaming, .msg.assistant[data-id]")
    page.click("#new-chat")
    page.wait_for_selector("#chat-input:not([disabled])")
    page.wait_for_function("!document.querySelector('.msg.streaming')")
    page.fill("#chat-input", "Hello?")
    page.press("#chat-input", "Enter")
    page.wait_for_function(
        "document.querySelectorAll('.msg[data-id]').length == 2"
        " && document.querySelector('.msg.user .content').textContent == 'Hello?'")
    assert page.is_hidden("#error-bar")


def test_playground_strikes_through_the_stop_sequence(page: Any) -> None:
    page.click("#tab-playground")
    page.fill("#pg-prompt", "The river")
    page.fill("#pg-max-tokens", "12")
    page.fill("#pg-temperature", "0")
    page.click("#pg-run")
    page.wait_for_selector("#pg-status:text('finish reason')")
    pieces = page.locator("#pg-output .tok[data-index]").evaluate_all(
        "els => els.map(e => e.textContent)")
    # A later token whose text is new: the API cuts the text where it first appears.
    k = next(i for i in range(3, len(pieces))
             if pieces[i].strip() and pieces[i] not in "".join(pieces[:i]) + "The river")
    page.fill("#pg-stops", pieces[k])
    page.click("#pg-run")
    page.wait_for_selector("#pg-status:text('finish reason: stop')")
    stopped = page.locator("#pg-output .tok.stopped")
    assert stopped.count() == 1 and stopped.first.text_content() == pieces[k]
    assert page.locator("#pg-output .tok[data-index]").count() == k + 1


def test_playground_joins_a_character_split_across_tokens(page: Any) -> None:
    """A token can hold a whole character and the start of the next ("ま" + e3 81): it waits
    for the rest, and bytes still pending at the end are shown, not dropped."""
    texts = page.evaluate("""() => {
      pg.tokens = []; pg.offsets = []; pg.pendingBytes = []; pg.pendingInfo = [];
      const out = document.querySelector('#pg-output');
      out.replaceChildren();
      addToken('bytes:\\\\xe3\\\\x81\\\\xbe\\\\xe3\\\\x81', -0.1, [], false, 0);
      addToken('bytes:\\\\xbe', -0.1, [], false, 1);
      addToken('bytes:\\\\xe3', -0.1, [], false, 2);
      flushTokens(false);
      return [...out.children].map((e) => e.textContent);
    }""")
    assert texts == ["まま", "\ufffd"]
