"""PII scrubbing: emails, public IP addresses, phone numbers, credit-card numbers -> typed placeholders.

Each replacement adds a flag (`pii:email`, ...) to the document, so the report
counts replacements by type. Candidates come from cheap regexes and are then
checked properly: IPs with `ipaddress` (only globally routable ones are
personal; 127.0.0.1, 10.x, 192.168.x, documentation ranges stay), card numbers
with the Luhn checksum, phone numbers with Google's `phonenumbers` (VALID
leniency). Presidio is not used: it needs a spaCy model download for its NER.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re

import phonenumbers

from kiln.config import PIIConfig
from kiln.data.records import ALL_KINDS, Doc

EMAIL = "<EMAIL>"
IP = "<IP_ADDRESS>"
PHONE = "<PHONE_NUMBER>"
CARD = "<CREDIT_CARD>"

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_CARD = re.compile(r"(?<![\w-])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{4}(?:\1\d{3})?|\d{4}([ -])\d{6}\2\d{5})(?![\w-])")
"""Contiguous 13-19 digits, or the printed groupings (4-4-4-4[-3], Amex 4-6-5) with one separator."""
_PHONE_HINT = re.compile(r"\d[\d\s().-]{5,}\d")
"""Text without 7+ digits in a phone-like run cannot hold a phone number: skip the (slow) matcher."""


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match) -> str:
    digits = re.sub(r"[ -]", "", m.group())
    return CARD if 13 <= len(digits) <= 19 and luhn_ok(digits) else m.group()


def _ip(m: re.Match) -> str:
    if ":" in m.group() and sum(1 for g in m.group().split(":") if g) < 3:
        return m.group()   # `::2`, `a::b`: too short to be anyone's address, common in code (C++ scopes)
    try:
        addr = ipaddress.ip_address(m.group())
    except ValueError:
        return m.group()
    return IP if addr.is_global else m.group()


def _phones(text: str, region: str) -> tuple[str, int]:
    if not _PHONE_HINT.search(text):
        return text, 0
    spans = [(m.start, m.end) for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID)]
    for start, end in reversed(spans):
        text = text[:start] + PHONE + text[end:]
    return text, len(spans)


@dataclasses.dataclass
class ScrubPII:
    """Replaces PII with placeholders; never drops. Phone numbers only in prose (see PIIConfig)."""

    cfg: PIIConfig
    name: str = "pii"
    kinds: tuple[str, ...] = ALL_KINDS

    def __call__(self, doc: Doc) -> Doc:
        text, flags = self.scrub(doc.text, doc.kind)
        if not flags:
            return doc
        return dataclasses.replace(doc, text=text, flags=doc.flags + flags)

    def scrub(self, text: str, kind: str = "prose") -> tuple[str, tuple[str, ...]]:
        c, flags = self.cfg, []
        subs = []
        if c.emails and "@" in text:
            subs.append((_EMAIL, EMAIL, EMAIL, "pii:email"))
        if c.credit_cards:
            subs.append((_CARD, _card, CARD, "pii:credit_card"))
        if c.ip_addresses:
            if "." in text:
                subs.append((_IPV4, _ip, IP, "pii:ip_address"))
            if "::" in text or text.count(":") >= 7:
                subs.append((_IPV6, _ip, IP, "pii:ip_address"))
        for pattern, repl, placeholder, flag in subs:
            before = text.count(placeholder)
            text = pattern.sub(repl, text)
            flags += [flag] * (text.count(placeholder) - before)
        if c.phone_numbers and kind == "prose":
            text, n = _phones(text, c.phone_region)
            flags += ["pii:phone_number"] * n
        return text, tuple(flags)
