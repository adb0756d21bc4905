"""Personal data in text: e-mail addresses, card-like digit runs, phone numbers, IPv4 addresses. One set of patterns
for the data report (what the training data holds) and the request log's redaction (monitoring/requestlog.py)."""
from __future__ import annotations

import re

PATTERNS = {
    "email": re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+"),
    "card": re.compile(r"\b(?:\d[ -]?){13,19}\b"),
    "phone": re.compile(r"(?<![\w-])\+?\d[\d ()./-]{7,}\d\b"),
    "ip": re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b"),
}


def redact(text: str) -> str:
    """Every match replaced by its kind in brackets ([EMAIL], [CARD], [PHONE], [IP]), in that order."""
    for kind, pattern in PATTERNS.items():
        text = pattern.sub(f"[{kind.upper()}]", text)
    return text


def kinds(text: str) -> list[str]:
    """The kinds of personal data found in `text` (each once), in PATTERNS order; a card number is not also a phone."""
    found = []
    for kind, pattern in PATTERNS.items():
        if pattern.search(text):
            found.append(kind)
            text = pattern.sub(" ", text)
    return found
