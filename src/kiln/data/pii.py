"""PII scrubbing: emails, public IP addresses, phone numbers, credit-card numbers -> typed placeholders.

Each replacement adds a flag (`pii:email`, ...) to the document, so the report
counts replacements by type. Two engines (`data.pii.engine`):

- `regex` (default): candidates come from regexes and are then checked properly:
  IPs with `ipaddress` (only globally routable ones are personal; 127.0.0.1,
  10.x, 192.168.x, documentation ranges stay), card numbers with the Luhn
  checksum, phone numbers with Google's `phonenumbers` (VALID leniency).
- `presidio`: Microsoft Presidio's pattern recognizers on a blank spaCy
  pipeline (no NER model, nothing downloaded), in `kiln.data.pii_presidio`.

The regex engine's speed comes from never running a full pattern over text
that cannot hold a match: each pattern runs only on short windows around the
stretches of characters a match could be made of (`_windows`), and the phone
matcher skips candidates too short to be a valid number (`_PhoneMatcher`).
Both leave the output exactly as the plain whole-text scan
(tests/data/test_data_pii.py compares them with the plain definitions).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re

import phonenumbers
from phonenumbers import PhoneMetadata

from kiln.config import PIIConfig
from kiln.data.records import ALL_KINDS, Doc

EMAIL = "<EMAIL>"
IP = "<IP_ADDRESS>"
PHONE = "<PHONE_NUMBER>"
CARD = "<CREDIT_CARD>"
FLAGS = ("pii:email", "pii:ip_address", "pii:phone_number", "pii:credit_card")
"""Flags of the regex engine; the presidio engine adds `pii:<entity>` for `data.pii.presidio_entities`."""

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_CARD = re.compile(r"(?<![\w-])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{4}(?:\1\d{3})?|\d{4}([ -])\d{6}\2\d{5})(?![\w-])")
"""Contiguous 13-19 digits, or the printed groupings (4-4-4-4[-3], Amex 4-6-5) with one separator."""
_PHONE_HINT = re.compile(r"\d[\d\s().-]{5,}\d")
"""Text without 7+ digits in a phone-like run cannot hold a phone number: skip the (slow) matcher."""

# Where a match can be. Every match of a pattern above is made only of that pattern's characters
# (email: [A-Za-z0-9._%+-@], card: digits, space, dash; IPv4: digits and dots; IPv6: hex and colons),
# so it lies inside one maximal stretch of them, and its look-arounds see at most 2 characters past
# it. Running the pattern on each such stretch (+2 characters each side) finds exactly the matches a
# whole-text scan finds. Stretches are found with fast scans: `str.find` for '@', a literal ':' for
# IPv6, and digit-led runs long enough to hold a card (13 digits) or an IPv4 address (7 characters).
_CONTEXT = 2
_EMAIL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-@")
_EMAIL_RIGHT = re.compile(r"[A-Za-z0-9._%+@-]*")
_CARD_RUN = re.compile(r"\d[\d -]{11,}\d")
_IPV4_RUN = re.compile(r"\d[\d.]{5,}\d")
_IPV6_CHARS = frozenset("0123456789ABCDEFabcdef:")
_IPV6_ANCHOR = re.compile(r":[0-9A-Fa-f]{0,4}:")
_IPV6_RIGHT = re.compile(r"[0-9A-Fa-f:]*")


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


def ip_is_personal(s: str) -> bool:
    """A globally routable address; `::2`, `a::b` are too short to be anyone's (and common in code: C++ scopes)."""
    if ":" in s and sum(1 for g in s.split(":") if g) < 3:
        return False
    try:
        return ipaddress.ip_address(s).is_global
    except ValueError:
        return False


def _ip(m: re.Match) -> str:
    return IP if ip_is_personal(m.group()) else m.group()


# ---------------------------------------------------------------- windows


def _stretches(text: str, anchors, chars: frozenset, right: re.Pattern) -> list[tuple[int, int]]:
    """Maximal runs of `chars` around each anchor position (anchors in increasing order)."""
    spans: list[tuple[int, int]] = []
    for p in anchors:
        if spans and p < spans[-1][1]:
            continue   # inside the stretch already taken
        start = p
        while start > 0 and text[start - 1] in chars:
            start -= 1
        spans.append((start, right.match(text, p).end()))
    return spans


def _at_signs(text: str):
    p = text.find("@")
    while p >= 0:
        yield p
        p = text.find("@", p + 1)


def _windows(spans, n: int) -> list[tuple[int, int]]:
    """Spans widened by _CONTEXT characters each side, overlapping ones merged."""
    out: list[list[int]] = []
    for s, e in spans:
        a, b = max(0, s - _CONTEXT), min(n, e + _CONTEXT)
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _sub_in(text: str, spans, pattern: re.Pattern, repl, placeholder: str) -> tuple[str, int]:
    """`pattern.sub(repl, text)` run only on the windows around `spans`; also how many placeholders it added."""
    pieces, last, added = [], 0, 0
    for a, b in _windows(spans, len(text)):
        window = text[a:b]
        new = pattern.sub(repl, window)
        if new != window:
            added += new.count(placeholder) - window.count(placeholder)
            pieces += [text[last:a], new]
            last = b
    if not pieces:
        return text, 0
    pieces.append(text[last:])
    return "".join(pieces), added


# ---------------------------------------------------------------- phone numbers


def _shortest(md) -> int:
    return min(n for n in md.general_desc.possible_length if n > 0)


def _inserted(md) -> int:
    """Digits a national-prefix transform rule may add (`340\\1` in the US Virgin Islands: 7-digit local numbers)."""
    return sum(ch.isdigit() for ch in re.sub(r"\\\d", "", md.national_prefix_transform_rule or ""))


@functools.cache
def _min_phone_chars(region: str) -> int:
    """Fewest letters + digits a text needs to parse as a VALID number from `region` (a lower bound).

    A valid number's national significant number has one of its region's possible lengths; its digits
    come from the candidate's digits or letters (vanity numbers), plus the digits a transform rule may
    insert. Written internationally (+ or an exit code), the country code's digits come on top.
    """
    mds = [PhoneMetadata.metadata_for_region(r) for r in phonenumbers.SUPPORTED_REGIONS]
    mds += [PhoneMetadata.metadata_for_nongeo_region(cc) for cc in phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS]
    mds = [md for md in mds if md is not None]
    home = PhoneMetadata.metadata_for_region(region)
    if home is None:
        return 1
    shortest: dict[int, int] = {}
    inserted: dict[int, int] = {}
    for md in mds:
        shortest[md.country_code] = min(shortest.get(md.country_code, 99), _shortest(md))
        inserted[md.country_code] = max(inserted.get(md.country_code, 0), _inserted(md))
    national = shortest[home.country_code] - max(inserted[home.country_code], _inserted(home))
    international = min(len(str(cc)) + shortest[cc] - inserted[cc] for cc in shortest)
    return max(1, min(national, international))


_REJECTED: set[tuple] = set()
"""Candidates the library rejected, with what its verdict depends on (region, candidate, the characters
either side): the same numbers ("1913", "3.2.1") come back in document after document."""
_REJECTED_MAX = 1 << 18


class _PhoneMatcher(phonenumbers.PhoneNumberMatcher):
    """The library's matcher; candidates too short to be valid, or rejected before, are rejected at once.

    Hazard: overrides a private method; if a phonenumbers release renames it, the override is simply
    never called and the output is unchanged, only slower (the equivalence test keeps this honest).
    The verdict of `_parse_and_verify` at VALID leniency depends only on the candidate, the region and
    the characters just before and after it (`parse` + `_verify`), hence the cache key.
    """

    def __init__(self, text: str, region: str):
        super().__init__(text, region, leniency=phonenumbers.Leniency.VALID)
        self._region = region
        self._min_chars = _min_phone_chars(region)

    def _parse_and_verify(self, candidate, offset):
        if sum(map(str.isalnum, candidate)) < self._min_chars:
            return None
        end = offset + len(candidate)
        key = (self._region, candidate, self.text[offset - 1] if offset > 0 else None,
               self.text[end] if end < len(self.text) else None)
        if key in _REJECTED:
            return None
        match = super()._parse_and_verify(candidate, offset)
        if match is None:
            if len(_REJECTED) >= _REJECTED_MAX:
                _REJECTED.clear()
            _REJECTED.add(key)
        return match


def _phones(text: str, region: str) -> tuple[str, int]:
    if not _PHONE_HINT.search(text):
        return text, 0
    spans = [(m.start, m.end) for m in _PhoneMatcher(text, region)]
    for start, end in reversed(spans):
        text = text[:start] + PHONE + text[end:]
    return text, len(spans)


# ---------------------------------------------------------------- the step


def scrub_regex(cfg: PIIConfig, text: str, kind: str = "prose") -> tuple[str, tuple[str, ...]]:
    """The regex engine: emails, cards, IPv4, IPv6 in that order (each on the previous one's output), then phones."""
    flags: list[str] = []
    ipv6 = cfg.ip_addresses and ("::" in text or text.count(":") >= 7)   # a valid IPv6 has '::' or 7 colons
    if cfg.emails and "@" in text:
        text, n = _sub_in(text, _stretches(text, _at_signs(text), _EMAIL_CHARS, _EMAIL_RIGHT), _EMAIL, EMAIL, EMAIL)
        flags += ["pii:email"] * n
    if cfg.credit_cards:
        text, n = _sub_in(text, [m.span() for m in _CARD_RUN.finditer(text)], _CARD, _card, CARD)
        flags += ["pii:credit_card"] * n
    if cfg.ip_addresses and "." in text:
        text, n = _sub_in(text, [m.span() for m in _IPV4_RUN.finditer(text)], _IPV4, _ip, IP)
        flags += ["pii:ip_address"] * n
    if ipv6:
        anchors = (m.start() for m in _IPV6_ANCHOR.finditer(text))
        text, n = _sub_in(text, _stretches(text, anchors, _IPV6_CHARS, _IPV6_RIGHT), _IPV6, _ip, IP)
        flags += ["pii:ip_address"] * n
    if cfg.phone_numbers and kind == "prose":
        text, n = _phones(text, cfg.phone_region)
        flags += ["pii:phone_number"] * n
    return text, tuple(flags)


@dataclasses.dataclass
class ScrubPII:
    """Replaces PII with placeholders; never drops. Phone numbers only in prose (see PIIConfig)."""

    cfg: PIIConfig
    name: str = "pii"
    kinds: tuple[str, ...] = ALL_KINDS

    def __post_init__(self):
        if self.cfg.engine == "presidio":
            from kiln.data import pii_presidio
            pii_presidio.check(self.cfg)   # unknown entity names stop the run here, not in a worker

    def __call__(self, doc: Doc) -> Doc:
        text, flags = self.scrub(doc.text, doc.kind)
        if not flags:
            return doc
        return dataclasses.replace(doc, text=text, flags=doc.flags + flags)

    def scrub(self, text: str, kind: str = "prose") -> tuple[str, tuple[str, ...]]:
        if self.cfg.engine == "presidio":
            from kiln.data import pii_presidio
            return pii_presidio.scrub(self.cfg, text, kind)
        return scrub_regex(self.cfg, text, kind)
