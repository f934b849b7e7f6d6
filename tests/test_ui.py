"""The page (`influence-index ui`) in headless Chromium, over a real server of the demo index
and of a tiny index whose documents hold HTML."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.cli import main
from server.client import InfluenceClient
from server.ui import PageServer, UiOptions
from tests.browser import ask, chromium_page, missing, open_page, wait_for_answer
from tests.conftest import REPO, write_jsonl
from tests.test_scan import sketch_only_index
from tests.test_server_e2e import LOAD_TIMEOUT_S, serve

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(missing() is not None, reason=missing() or ""),
]

# The README's screenshot, written again only when asked (a test run leaves the tree as it was):
# UPDATE_README_SCREENSHOT=1 .venv/bin/python -m pytest tests/test_ui.py
SCREENSHOT = REPO / "docs" / "ui.png"
IMG = '<img src=x onerror="window.__xss = 1">'
BOLD = "<b>bold</b> & <script>window.__xss = 2</script>"


@contextlib.contextmanager
def served_page(root: Path) -> Iterator[tuple[InfluenceClient, str]]:
    """A gRPC server of `root` and the page over it: (its client, the page's URL)."""
    with serve(root) as (server, client):
        assert server.wait_until_serving(LOAD_TIMEOUT_S), client.info().last_reload_error
        page_server = PageServer(client, UiOptions(port=0))
        page_server.start()
        try:
            yield client, f"http://127.0.0.1:{page_server.port}/"
        finally:
            page_server.stop()


@pytest.fixture(scope="module")
def demo(demo_index_root: Path) -> Iterator[tuple[InfluenceClient, str]]:
    with served_page(demo_index_root) as served:
        yield served


@pytest.fixture
def page():
    with chromium_page() as page:
        yield page


def test_demo_query_shows_hits_heatmaps_and_the_served_version(
    demo, demo_queries, page, tmp_path: Path, record_property
) -> None:
    client, url = demo
    info = client.info()
    query = demo_queries[0]
    open_page(page, url)
    assert page.text_content("dd[data-field=version]") == info.version
    assert page.text_content("dd[data-field=factory]") == info.faiss_factory
    assert page.text_content("dd[data-field='last reload error']") == "none"

    ask(page, query["prompt"], query["completion"], top_k=10, rerank_depth=20)
    first_ms = wait_for_answer(page, "first")
    wait_for_answer(page, "final")
    assert page.get_attribute("body", "data-answers").split() == ["sketch", "final"]
    page.wait_for_selector("#hits .heatmap .token[title]")
    page.wait_for_load_state("networkidle")

    texts = page.locator("#hits .text").all_text_contents()
    assert texts and len(set(texts)) == len(texts), "identical texts are one hit"
    copies = page.locator("#hits .copies").all_text_contents()
    grouped = sum(int(c.split()[0].lstrip("×")) - 1 for c in copies)
    assert len(texts) + grouped == 10
    assert page.locator("#hits .badge.exact").count() >= 1
    assert page.locator("#hits .layers .layer-bar[title]").count() > 0
    float(page.locator("#hits .heatmap .token").first.get_attribute("title"))  # the score
    page.screenshot(path=tmp_path / "demo-query.png", full_page=True)
    if os.environ.get("UPDATE_README_SCREENSHOT"):
        shutil.copyfile(tmp_path / "demo-query.png", SCREENSHOT)

    # The same query straight through the client, for the record (benchmarks/ui_latency.py).
    start = time.perf_counter()
    next(iter(client.query_stream(query["prompt"], query["completion"], rerank_depth=20)))
    record_property("page_first_answer_ms", first_ms)
    record_property("client_first_answer_ms", (time.perf_counter() - start) * 1e3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"completion": ""}, "INVALID_ARGUMENT: completion is empty"),
        ({"top_k": 0}, "INVALID_ARGUMENT: top_k must be between 1 and"),
        ({"top_k": -1}, "INVALID_ARGUMENT: k must not be negative"),
    ],
)
def test_bad_input_shows_the_service_message(demo, page, tmp_path: Path, fields, message) -> None:
    _, url = demo
    open_page(page, url)
    values = {"completion": " a", "top_k": 3} | fields
    completion = values.pop("completion")
    ask(page, "The", completion, **values)
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error").startswith(message)
    assert page.locator("#hits li").count() == 0
    page.screenshot(path=tmp_path / "bad-input.png")


def post(url: str, path: str, body: object) -> tuple[int, dict]:
    """POST `body` as JSON to the page server: (the HTTP status, the answer's JSON)."""
    request = urllib.request.Request(
        url + path.lstrip("/"),
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.readline())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


@pytest.mark.parametrize(
    ("path", "fields", "named"),
    [
        ("/api/query", {"top_k": 2**32}, "k must be at most"),
        ("/api/query", {"rerank_depth": 2**32}, "re-rank depth must be at most"),
        ("/api/query", {"lexical_candidates": 2**32}, "lexical candidates must be at most"),
        ("/api/query", {"score_kind": ["x"]}, "score kind must be one of"),
        ("/api/attribute", {"example_ids": 5}, "example_ids must be a list"),
        ("/api/attribute", {"example_ids": "6778285571938431734"}, "example_ids must be a list"),
        ("/api/attribute", {"example_ids": [str(2**63)]}, "example ids must be 64-bit"),
        ("/api/attribute", {"example_ids": [-(2**63) - 1]}, "example ids must be 64-bit"),
        ("/api/query", {"prompt": "\ud800"}, "prompt is not valid Unicode text"),
        ("/api/attribute", {"completion": "a\udfff", "example_ids": [1]}, "completion is not"),
    ],
)
def test_malformed_api_fields_are_400s_naming_the_field(demo, path, fields, named) -> None:
    _, url = demo
    status, answer = post(url, path, {"completion": " eggs", "top_k": 2} | fields)
    assert status == 400, answer
    assert answer["error"]["code"] == "INVALID_ARGUMENT"
    assert answer["error"]["message"].startswith(named)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port of 127.0.0.1 that another socket listens on."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        yield taken.getsockname()[1]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--port={taken}"], "cannot serve the page on 127.0.0.1:{taken}: Address already in use"),
        (["--host=no-such-host.invalid"], "cannot serve the page on no-such-host.invalid:8080: "),
        (["--host=192.0.2.1", "--port=0"], "cannot serve the page on 192.0.2.1:0: "),
    ],
)
def test_ui_that_cannot_serve_says_why_in_one_line(taken_port, capsys, options, message) -> None:
    options = [o.format(taken=taken_port) for o in options]
    assert main(["ui", "--target=127.0.0.1:1", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.format(taken=taken_port)), err
    assert err.count("\n") == 1, err


@pytest.fixture(scope="module")
def html_index(tmp_path_factory, tiny_model_dir: Path, small_corpus: list[dict]) -> Path:
    """A tiny index of 12 documents, two of which are HTML."""
    directory = tmp_path_factory.mktemp("html-index")
    html = [{"id": "html-img", "text": IMG}, {"id": "html-b", "text": BOLD}]
    documents = [*small_corpus[:10], *html]
    corpus = write_jsonl(directory / "corpus.jsonl", documents)
    return sketch_only_index(directory / "root", tiny_model_dir, corpus)


def test_documents_holding_html_are_shown_as_text(html_index: Path, page, tmp_path: Path) -> None:
    with served_page(html_index) as (_, url):
        open_page(page, url)
        ask(page, "The market", " was busy", top_k=12)
        wait_for_answer(page)
        page.wait_for_selector("#hits .heatmap .token")
        page.wait_for_load_state("networkidle")
        texts = page.locator("#hits .text").all_text_contents()
        heatmaps = page.locator("#hits .heatmap").all_text_contents()
        page.screenshot(path=tmp_path / "html-documents.png", full_page=True)
        assert IMG in texts and BOLD in texts
        assert any("<b>bold</b>" in h for h in heatmaps)
        assert page.locator("#hits img, #hits b, #hits script").count() == 0
        assert page.evaluate("window.__xss") is None
