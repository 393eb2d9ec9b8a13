"""RAPHAEL Sec. 4, "Dataset": caption cleaning ("removing useless information such as URLs, HTML tags,
and email addresses").

Decisions (spec/errata.md), applied in this order and repeated until nothing
changes (each pass only shortens the text or normalises whitespace, so this terminates; the
result is a fixed point, hence clean_caption is idempotent):

1. decode HTML character references that end in ';' (``&amp;`` ``&#39;`` ``&#x27;`` ``&eacute;``);
   legacy references without ';' are left alone, so ordinary text such as "AT&T" or "this&nothing"
   is not rewritten;
2. replace HTML/XML tags (``<b>``, ``</a>``, ``<br/>``, ``<img src=...>``), comments and
   ``<!DOCTYPE ...>`` by a space; a '<' that does not open a tag name ("a < b") is kept;
3. replace URLs by a space: ``http://``, ``https://``, ``ftp://`` and ``www.`` addresses, and bare
   domains with a common top-level domain followed by a path (``example.com/x``), so dotted words
   such as "St.Louis/Missouri" stay; a bare domain without a path is kept (it is
   often part of the caption, e.g. a brand name);
4. replace e-mail addresses by a space;
5. collapse whitespace runs to one space and strip the ends.

Everything else, ordinary punctuation and non-ASCII text included (captions are multilingual),
is kept as is.
"""

from __future__ import annotations

import html
import re

__all__ = ["clean_caption"]

_ENTITY = re.compile(r"&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")
_TAG = re.compile(
    r"<!--.*?-->"  # comment
    r"|<![A-Za-z][^<>]*>"  # <!DOCTYPE ...>
    r"|</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>",  # <tag ...>, </tag>, <tag/>
    re.DOTALL,
)
# A URL ends on a character that is not trailing punctuation, so "see http://x.org." keeps its period.
_URL_TAIL = r"[^\s<>\"']*[^\s<>\"'.,;:!?)\]}]"
# Bare domains (no scheme, no www.) count as URLs only with a common top-level domain, so that
# ordinary text such as "St.Louis/Missouri" or "oil.on/canvas" is kept.
_TLDS = ("com|org|net|edu|gov|mil|int|info|biz|io|co|me|tv|us|uk|de|fr|jp|cn|ru|it|es|nl|br|au|ca|in|ch|se|no|"
         "pl|be|at|dk|fi|cz|kr|tw|hk|sg|nz|mx|ar|ly|gl|app|dev|xyz|site|online|shop|store|blog|art")
_URL = re.compile(
    rf"\b(?:https?|ftp)://{_URL_TAIL}"  # scheme://...
    rf"|\bwww\.{_URL_TAIL}"  # www....
    rf"|\b(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+(?:{_TLDS})/{_URL_TAIL}"  # bare domain (common TLD) with a path
    r"|\b(?:https?|ftp)://",  # a scheme with nothing after it
    re.IGNORECASE,
)
_EMAIL = re.compile(r"[\w.%+-]+@[\w.-]+\.\w+")
_SPACE = re.compile(r"\s+")


def _one_pass(text: str) -> str:
    text = _ENTITY.sub(lambda m: html.unescape(m.group(0)), text)
    text = _TAG.sub(" ", text)
    text = _URL.sub(" ", text)
    text = _EMAIL.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def clean_caption(text: str) -> str:
    """RAPHAEL Sec. 4, Dataset: the caption without URLs, HTML tags and e-mail addresses.

    See the module docstring for the exact rules. Idempotent: clean_caption(clean_caption(s)) ==
    clean_caption(s).
    """
    if not isinstance(text, str):
        raise ValueError(f"clean_caption expects a str caption; got {type(text).__name__}. Decode bytes first.")
    for _ in range(len(text) + 2):  # each changing pass shortens or normalises: at most len + 1 passes
        cleaned = _one_pass(text)
        if cleaned == text:
            return cleaned
        text = cleaned
    return text
