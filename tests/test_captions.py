"""Caption cleaning (RAPHAEL Sec. 4, Dataset): URLs, HTML tags and e-mail addresses removed."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from raphael_ref.data.captions import clean_caption

pytestmark = pytest.mark.spec_id("data.caption_clean")

# Independent detectors (not the module's patterns): what must never survive cleaning.
TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*\s*/?>")
SCHEME_URL = re.compile(r"(?i)\b(?:https?|ftp)://")
WWW_URL = re.compile(r"(?i)\bwww\.[A-Za-z0-9]")
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
NAMED_ENTITY = re.compile(r"&(?:amp|lt|gt|quot|nbsp|#39|#x27);")

EXAMPLES = [
    ("A red fox in the snow", "A red fox in the snow"),
    ("  A  red\tfox \n in the snow  ", "A red fox in the snow"),
    ("<p>A <b>bold</b> fox</p>", "A bold fox"),
    ("Line one<br/>line two<br>end", "Line one line two end"),
    ('<img src="x.jpg" alt="fox"> A fox', "A fox"),
    ("<!-- hidden --> visible", "visible"),
    ("Tom &amp; Jerry &#39;classic&#39;", "Tom & Jerry 'classic'"),
    ("&lt;i&gt;escaped tag&lt;/i&gt; text", "escaped tag text"),
    ("caf&eacute; na&iuml;ve", "café naïve"),
    ("Buy now at https://shop.example.com/item?id=3&x=1 today", "Buy now at today"),
    ("see http://x.org/a.", "see ."),
    ("HTTPS://EXAMPLE.COM/A and www.example.org/page", "and"),
    ("mirror: ftp://files.example.net/pub", "mirror:"),
    ("photo from example.com/photos/123 nice", "photo from nice"),
    ("contact john.doe+art@mail.example.co.uk for prints", "contact for prints"),
    ("a < b and c > d", "a < b and c > d"),
    ("AT&T this&nothing R&D", "AT&T this&nothing R&D"),
    ("Node.js, e.g. a tool; etsy.com shop", "Node.js, e.g. a tool; etsy.com shop"),
    ("Café à Paris — 東京の夜景 — Москва", "Café à Paris — 東京の夜景 — Москва"),
    ("Price: $5 (50% off!) @artist", "Price: $5 (50% off!) @artist"),
    ("", ""),
]


@pytest.mark.parametrize("raw,clean", EXAMPLES)
def test_examples(raw, clean):
    assert clean_caption(raw) == clean


def _dirty_pieces():
    words = st.text(alphabet=st.characters(categories=["L", "N"]), min_size=1, max_size=8)
    tags = st.sampled_from(["<b>", "</b>", "<br/>", "<a href='http://x.com'>", "</a>", "<p class=x>", "<!-- c -->"])
    urls = st.builds(lambda d, p: f"https://{d}.com/{p}", words, words) | st.builds(lambda d: f"www.{d}.org", words)
    emails = st.builds(lambda u, d: f"{u}@{d}.com", words, words)
    ents = st.sampled_from(["&amp;", "&lt;", "&gt;", "&#39;", "&nbsp;", "&amp;lt;b&amp;gt;", "&"])
    punct = st.sampled_from([".", ",", "!", "?", "(", ")", "-", ":", ";", "<", ">", "@", "/"])
    spaces = st.sampled_from([" ", "  ", "\t", "\n"])
    return st.lists(st.one_of(words, tags, urls, emails, ents, punct, spaces), max_size=25).map("".join)


dirty = _dirty_pieces()


@given(s=st.one_of(st.text(max_size=80), dirty))
def test_idempotent(s):
    once = clean_caption(s)
    assert clean_caption(once) == once


@given(s=dirty)
def test_nothing_removable_survives(s):
    out = clean_caption(s)
    assert not TAG.search(out), out
    assert not SCHEME_URL.search(out), out
    assert not WWW_URL.search(out), out
    assert not EMAIL.search(out), out
    assert not NAMED_ENTITY.search(out), out
    assert out == out.strip() and "  " not in out and "\n" not in out and "\t" not in out


clean_words = st.text(
    alphabet=st.characters(categories=["L", "N"]) | st.sampled_from(list(".,!?'\"()-:;%$#*")), min_size=1, max_size=10
).filter(lambda w: "www." not in w.lower())


@given(words=st.lists(clean_words, max_size=12))
def test_clean_captions_are_left_unchanged(words):
    s = " ".join(words)
    assert clean_caption(s) == s


def test_rejects_non_strings():
    with pytest.raises(ValueError, match="str"):
        clean_caption(b"bytes caption")


@pytest.mark.parametrize("text", ["Painting of St.Louis/Missouri skyline", "oil.on/canvas 1890", "Mr.Smith/artist portrait"])
def test_dotted_words_with_slashes_are_not_urls(text):
    assert clean_caption(text) == text


def test_bare_domains_with_common_tlds_and_a_path_are_removed():
    assert clean_caption("shop at foo.co.uk/x today") == "shop at today"
