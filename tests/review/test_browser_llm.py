"""The review page's LLM view in headless Chromium, on samples the proxy stored from real
mirrored LLM traffic: a chat answer diffed token by token, a completion without logprobs diffed
word by word, and a prompt that carries HTML shown as text.

The upstreams are loadtest.llm_backend's deterministic server: the reference as is, the
candidate with one token swapped at DIVERGE_AT, so where the page must mark the first divergence
is known in advance. A screenshot lands in /tmp/review_llm_sample.png.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from loadtest.llm_backend import LlmBackend, LlmBehaviour, _prompt_of, tokens_for
from proxy.app import ProxyRunner
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.review import test_browser as tb

DIVERGE_AT = 3
N_TOKENS = 12
AROUND = 8  # the page's window of token probabilities each side of the divergence
# Planted where a page that wrote texts as HTML would build elements (an image, bold text).
HOSTILE = '<img src=x onerror="document.body.dataset.pwned=1"><b>bold?</b>'
SYSTEM = "Answer in one short sentence."
USER = f"Compare these two: {HOSTILE}"
CHAT = {
    "model": "tiny",
    "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
    "max_tokens": N_TOKENS,
    "temperature": 0.3,
    "stream": True,
    "stream_options": {"include_usage": True},
    "logprobs": True,
    "top_logprobs": 3,
}
TOOL_CALLS = json.dumps(
    [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]
)
# No logprobs asked: no tokens on either side, so the page diffs words. Short, so that one word
# swapped is flagged by the text score alone (no top-k to prove a real divergence).
COMPLETION_TOKENS = 5
COMPLETION = {"model": "tiny", "prompt": "once upon a time", "max_tokens": COMPLETION_TOKENS}


@pytest.fixture
async def llm_pair() -> AsyncIterator[tuple[LlmBackend, LlmBackend]]:
    ref, cand = LlmBackend(), LlmBackend(LlmBehaviour(diverge_at=DIVERGE_AT))
    await ref.start()
    await cand.start()
    yield ref, cand
    await ref.close()
    await cand.close()


async def _stored_samples(
    proxy_factory: Callable[..., Any], redis_url: str, pair: tuple[LlmBackend, LlmBackend]
) -> tuple[ProxyRunner, dict[str, dict[str, Any]]]:
    """Both requests through the proxy; its stored samples by path."""
    ref, cand = pair
    admin = {"host": "127.0.0.1", "port": 0, "token": ADMIN_TOKEN, "users": tb.USERS}
    candidates = [{"name": "drifted", "url": cand.url}]
    proxy = await proxy_factory(
        make_settings(ref.url, redis_url, candidates=candidates, admin=admin)
    )
    url = f"http://127.0.0.1:{proxy.data_port}"
    async with aiohttp.ClientSession() as s:
        for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)):
            async with s.post(url + path, json=body) as r:
                assert r.status == 200
                await r.read()
    assert await proxy.drained(10)
    flagged = await proxy.store.list_samples(flagged=True)
    assert len(flagged) == 2
    samples = {}
    for item in flagged:
        sample = await proxy.store.get_sample(item["id"])
        assert sample is not None
        kind = "chat" if b'"messages"' in sample["payloads"]["request"] else "completion"
        samples[kind] = sample
    return proxy, samples


def _words(prompt: str, diverge_at: int | None, n: int = N_TOKENS) -> list[str]:
    return [t for t, _ in tokens_for(prompt, n, diverge_at)]


def _shown_ms(text: str) -> float:
    m = re.fullmatch(r"TTFT ([0-9.e+-]+) ms.*", text.strip())
    assert m, text
    return float(m.group(1))


async def _chat_sample_shown(page: Any, sample: dict[str, Any]) -> None:
    ref_words, cand_words = _words(_prompt_of(CHAT), None), _words(_prompt_of(CHAT), DIVERGE_AT)
    assert ref_words[DIVERGE_AT] != cand_words[DIVERGE_AT]  # the planted swap

    # The list row says what the answers open with.
    row = page.locator(f'#samples-body tr[data-id="{sample["id"]}"]')
    await tb.expect(row.locator(".llm-snip .snip.ref")).to_contain_text(
        "".join(ref_words[:DIVERGE_AT]).strip()
    )
    await tb.expect(row.locator(".llm-snip .snip.cand")).to_contain_text(
        "".join(cand_words[: DIVERGE_AT + 1]).strip()
    )
    await tb.expect(row.locator(".llm-snip .snip-diff")).to_have_count(2)

    await page.screenshot(path=str(tb.SHOTS / "review_llm_list.png"))

    await row.click()
    await tb._sample_shown(page, sample["id"])
    llm = page.locator("#llm")
    await tb.expect(llm).to_be_visible()
    await tb.expect(page.locator(".evidence-plots")).to_be_hidden()

    # The conversation: roles, and the hostile message as the very characters sent.
    await tb.expect(llm.locator('.msg[data-role="system"] .content')).to_have_text(SYSTEM)
    assert await llm.locator('.msg[data-role="user"] .content').text_content() == USER
    await tb.expect(llm.locator(".llm-params")).to_contain_text("temperature 0.3")
    assert await page.locator("#sample-view img, #sample-view b").count() == 0

    # The first divergence, token-level: the swapped token on each side, and only it changed.
    for side, words, mark in (("ref", ref_words, "del"), ("cand", cand_words, "ins")):
        first = llm.locator(f".answer.{side} .tok.first-div")
        await tb.expect(first).to_have_count(1)
        assert await first.get_attribute("data-i") == str(DIVERGE_AT)
        assert await first.text_content() == words[DIVERGE_AT]
        await tb.expect(llm.locator(f".answer.{side} .tok.{mark}")).to_have_count(1)
        await tb.expect(llm.locator(f".answer.{side} .tok.{mark}.first-div")).to_have_count(1)
    await tb.expect(llm.locator(".llm-verdict")).to_contain_text(
        f"first divergence at token {DIVERGE_AT}"
    )
    await tb.expect(llm.locator(".llm-verdict")).to_contain_text("KL mean")

    # Token probabilities around it: one row per token in the window, the divergence's row
    # holding both chosen tokens, the reference's top-k (on hover) naming the candidate's.
    rows = llm.locator(".lp-table tbody tr")
    window = min(N_TOKENS, DIVERGE_AT + AROUND + 1) - max(0, DIVERGE_AT - AROUND)
    await tb.expect(rows).to_have_count(window)
    first_row = llm.locator(".lp-table tr.first")
    await tb.expect(first_row).to_have_attribute("data-offset", "0")
    cells = first_row.locator("td.lp-tok")
    assert await cells.nth(0).text_content() == json.dumps(ref_words[DIVERGE_AT])
    assert await cells.nth(1).text_content() == json.dumps(cand_words[DIVERGE_AT])
    assert json.dumps(cand_words[DIVERGE_AT]) in (await cells.nth(0).get_attribute("title") or "")

    # TTFT per side, each its own value.
    for side, key in (("ref", "reference"), ("cand", "candidate_side")):
        text = await llm.locator(f".answer.{side} .ttft").text_content() or ""
        want = sample[key]["ttft_ms"]
        assert math.isclose(_shown_ms(text), want, rel_tol=1e-3, abs_tol=1e-3), (side, text, want)
    await tb.expect(llm.locator(".answer.cand .answer-head")).to_contain_text("finish length")
    await tb.expect(llm.locator(".answer.ref .usage")).to_contain_text(f"{N_TOKENS} completion")
    await page.screenshot(path=str(tb.SHOTS / "review_llm_sample.png"), full_page=True)

    # The raw answers are event streams (not JSON): shown as their text.
    await page.click("details.raw summary")
    await tb.expect(page.locator("#raw")).to_contain_text("data: [DONE]")


async def _completion_sample_shown(page: Any, base: str, sample: dict[str, Any]) -> None:
    """Opened by its address (not from the list): word-level, the prompt as a block."""
    ref_words = _words(_prompt_of(COMPLETION), None, COMPLETION_TOKENS)
    cand_words = _words(_prompt_of(COMPLETION), DIVERGE_AT, COMPLETION_TOKENS)
    await page.goto(f"{base}/review#/sample/{sample['id']}")
    await tb._sample_shown(page, sample["id"])
    llm = page.locator("#llm")
    await tb.expect(llm.locator(".prompt-block")).to_have_text(COMPLETION["prompt"])
    await tb.expect(llm.locator(".llm-choice")).to_have_attribute("data-mode", "word")
    await tb.expect(llm.locator(".llm-verdict")).to_contain_text(f"(word {DIVERGE_AT + 1})")
    for side, words in (("ref", ref_words), ("cand", cand_words)):
        first = llm.locator(f".answer.{side} .tok.first-div")
        await tb.expect(first).to_have_count(1)
        assert await first.text_content() == words[DIVERGE_AT].strip()
    await tb.expect(llm.locator(".llm-probs")).to_contain_text("Neither side returned logprobs")


async def _store_second_choice(proxy: ProxyRunner, chat: dict[str, Any]) -> str:
    """The chat sample again with a second choice the backend cannot produce: JSON asked for,
    the candidate's stream cut short and calling a tool."""
    meta = {k: v for k, v in chat.items() if k not in ("payloads", "label")}
    meta["id"] = chat["id"] + "-choices"
    base = meta["previews"]["text"]["reference"]
    ref = {**base, "text": '{"answer": [1, 2]}', "tokens": None, "json_expected": True}
    cand = {**ref, "text": '{"answer": [1', "incomplete": True, "tool_calls": TOOL_CALLS}
    meta["previews"] = {
        **meta["previews"],
        "choices[1].text": {"reference": ref, "candidate": cand},
    }
    await proxy.store.record(meta, chat["payloads"])
    return str(meta["id"])


async def _second_choice_shown(page: Any, base: str, sample_id: str) -> None:
    await page.goto(f"{base}/review#/sample/{sample_id}")
    await tb._sample_shown(page, sample_id)
    choice = page.locator('#llm .llm-choice[data-choice="choices[1].text"]')
    await tb.expect(choice.locator("h3")).to_have_text("Answers · choices[1]")
    await tb.expect(page.locator("#llm .llm-choice")).to_have_count(2)
    ref, cand = choice.locator(".answer.ref"), choice.locator(".answer.cand")
    await tb.expect(ref.locator(".incomplete")).to_have_count(0)
    await tb.expect(cand.locator(".incomplete")).to_contain_text("Incomplete")
    # Formatted (indented) JSON: the answer asked for as JSON, and the tool calls.
    answer_json = ref.locator(".answer-extra pre.json")
    assert await answer_json.text_content() == '{\n  "answer": [1, 2]\n}'
    calls = cand.locator(".answer-extra", has_text="Tool calls").locator("pre.json")
    assert '\n      "name": "lookup",\n' in (await calls.text_content() or "")
    await tb.expect(cand.locator(".answer-extra", has_text="Answer as JSON")).to_contain_text(
        "Not valid JSON"
    )


async def test_llm_sample_prompt_diff_divergence_and_timing(
    proxy_factory: Callable[..., Any],
    redis_url: str,
    llm_pair: tuple[LlmBackend, LlmBackend],
) -> None:
    if tb.MISSING is not None:
        pytest.fail(f"CI needs the browser test, but {tb.MISSING}")
    proxy, samples = await _stored_samples(proxy_factory, redis_url, llm_pair)
    base = f"http://127.0.0.1:{proxy.admin_port}"
    page_errors: list[str] = []
    foreign: list[str] = []
    tensors: list[str] = []
    async with tb.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=tb.CHROMIUM, args=tb.CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1400, "height": 1000})
            page = await context.new_page()
            tb._watch(page, base, page_errors, foreign)
            page.on("request", lambda r: tensors.append(r.url) if "/tensors" in r.url else None)
            await tb._login(page, base, "reviewer-token-0123456")
            await tb.expect(page.locator("#samples-body tr")).to_have_count(2)
            await _chat_sample_shown(page, samples["chat"])
            # Opened from the list, whose row says it is an LLM sample: no tensors asked for.
            assert tensors == []
            await _completion_sample_shown(page, base, samples["completion"])
            second = await _store_second_choice(proxy, samples["chat"])
            await _second_choice_shown(page, base, second)
            await context.close()
        finally:
            await browser.close()
    assert page_errors == []
    assert foreign == []
