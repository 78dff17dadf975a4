"""The HellaSwag download is kept only with its pinned sha256 (issue #13, item 9). No network: urlopen serves a
local file."""

from __future__ import annotations

import hashlib
import json
import urllib.request

import pytest

from src.eval.config import HellaSwagConfig
from src.eval.hellaswag import HellaSwagUnavailableError, ensure_hellaswag, load_examples

# The sha256 of rowanz/hellaswag's data/hellaswag_val.jsonl (HF datasets' checksums pin the same value)
OFFICIAL_SHA256 = "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"
URL = "https://example.invalid/hellaswag_val.jsonl"
ITEM = {"ctx": "A man is sitting on a roof. he", "label": 3,
        "endings": ["is using wrap.", "is ripping tiles.", "is holding a cube.", "starts pulling up roofing."]}


@pytest.fixture
def served(monkeypatch, tmp_path):
    """Every URL answers with the bytes of a small local HellaSwag-format file; returns it and the URLs asked."""
    served = tmp_path / "served.jsonl"
    served.write_text(json.dumps(ITEM) + "\n")
    urls = []

    def urlopen(url, timeout):
        urls.append(url)
        return open(served, "rb")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return served, urls


def test_a_download_that_is_not_the_pinned_file_is_deleted(served, tmp_path):
    cache = tmp_path / "cache"
    got = hashlib.sha256(served[0].read_bytes()).hexdigest()
    cfg = HellaSwagConfig(cache_dir=str(cache), url=URL)
    assert cfg.sha256 == OFFICIAL_SHA256
    with pytest.raises(HellaSwagUnavailableError) as err:
        ensure_hellaswag(cfg)
    message = str(err.value)
    assert f"has sha256 {got}, expected {OFFICIAL_SHA256} (eval.hellaswag.sha256)" in message
    assert URL in message and "eval.hellaswag.path" in message and "\n" not in message
    assert list(cache.iterdir()) == []  # neither the file nor a partial one is left behind
    with pytest.raises(HellaSwagUnavailableError):
        ensure_hellaswag(cfg)  # and the next call checks again, it does not take a bad cached copy
    assert served[1] == [URL, URL]


def test_a_download_with_the_pinned_sha256_is_kept_once(served, tmp_path):
    sha256 = hashlib.sha256(served[0].read_bytes()).hexdigest()
    cfg = HellaSwagConfig(cache_dir=str(tmp_path / "cache"), url=URL, sha256=sha256.upper())  # either case
    path = ensure_hellaswag(cfg)
    assert path.read_bytes() == served[0].read_bytes() and list(path.parent.iterdir()) == [path]
    assert ensure_hellaswag(cfg) == path and served[1] == [URL]  # cached: not downloaded again
    assert [ex.label for ex in load_examples(path)] == [3]


def test_a_file_of_ones_own_is_neither_checked_nor_deleted(served):
    own = served[0]
    cfg = HellaSwagConfig(path=str(own), url=URL)  # its sha256 is not the pinned one
    assert ensure_hellaswag(cfg) == own and own.is_file() and served[1] == []
