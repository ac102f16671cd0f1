"""PII scrubbing: the fast regex engine against its plain definition, and the optional Presidio engine."""

import dataclasses
import ipaddress
import pickle
import re
import socket

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.config import ConfigError, DataConfig, PIIConfig
from kiln.data.pii import CARD, EMAIL, IP, PHONE, ScrubPII
from kiln.data.records import Doc

# ---------------------------------------------------------------- the plain definition (kiln before the fast paths)

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_CARD = re.compile(r"(?<![\w-])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{4}(?:\1\d{3})?|\d{4}([ -])\d{6}\2\d{5})(?![\w-])")
_PHONE_HINT = re.compile(r"\d[\d\s().-]{5,}\d")


def _luhn(digits):
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m):
    digits = re.sub(r"[ -]", "", m.group())
    return CARD if 13 <= len(digits) <= 19 and _luhn(digits) else m.group()


def _ip(m):
    if ":" in m.group() and sum(1 for g in m.group().split(":") if g) < 3:
        return m.group()
    try:
        addr = ipaddress.ip_address(m.group())
    except ValueError:
        return m.group()
    return IP if addr.is_global else m.group()


def plain_scrub(c: PIIConfig, text: str, kind: str = "prose"):
    """Every pattern over the whole text, the phone matcher on every candidate: the reference."""
    flags, subs = [], []
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
    if c.phone_numbers and kind == "prose" and _PHONE_HINT.search(text):
        spans = [(m.start, m.end) for m in
                 phonenumbers.PhoneNumberMatcher(text, c.phone_region, leniency=phonenumbers.Leniency.VALID)]
        for start, end in reversed(spans):
            text = text[:start] + PHONE + text[end:]
        flags += ["pii:phone_number"] * len(spans)
    return text, tuple(flags)


def doc(text, kind="prose"):
    return Doc(text, "src", {"path": "x"}, kind=kind)


# ---------------------------------------------------------------- varied text

FRAGMENTS = [
    "jane.roe@example.org", "a@b.co", "x@y", "first.last+tag@mail.example.co.uk", "@", "@@", "user@-bad-.com",
    "éa@example.com", "_a@example.com", "a@example.com_", "<EMAIL>", "<IP_ADDRESS>", "<CREDIT_CARD>", "EMAIL",
    "8.8.8.8", "192.168.1.1", "127.0.0.1", "1.2.3.4.5", "999.1.1.1", "10.0.0.1.", ".8.8.8.8", "v1.2.3.4",
    "2001:4860:4860::8888", "::1", "a::b", "fe80::1", "::ffff:8.8.4.4", "1:2:3:4:5:6:7:8", "2001:db8::", "std::",
    "dead:beef::cafe", "::", ":::", "1:2",
    "4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111", "378282246310005", "3782 822463 10005",
    "4111 1111 1111 1112", "4111 1111-1111 1111", "5555555555554444", "6011111111111117 1", "12345678901234567890",
    "+1 212-555-0147", "(650) 253-0000", "650.253.0000", "+44 20 7946 0958", "+49 30 901820", "1-800-555-0199",
    "+683 4002", "+290 22001", "212 555 0147 ext. 12", "0049 30 901820", "011 44 20 7946 0958", "+1 340 774 1234",
    "1913", "3.14159", "2024-01-02", "10:30", "1/2/2020", "555-0147", "page 123-456", "١٢٣٤٥٦٧٨٩٠", "٤١١١١١١١١١١١١١١١",
    "0", "00", "x", "-", " ", "  ", "\n", ".", ":", "(", ")", "/",
]
SEPARATORS = ["", " ", "  ", "\n", ".", ",", ":", "-", "_", "a", "x", "/", "(", ")", "1", "12"]

text_strategy = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.sampled_from(SEPARATORS),
                                   st.text(alphabet="0123456789 .-:@abcdefxABCDEF()+", max_size=12)),
                         max_size=30).map("".join)


@settings(max_examples=600, deadline=None)
@given(text_strategy, st.sampled_from(["prose", "code"]), st.sampled_from(["US", "GB", "DE"]))
def test_regex_engine_equals_the_plain_definition(text, kind, region):
    cfg = PIIConfig(phone_region=region)
    assert ScrubPII(cfg).scrub(text, kind) == plain_scrub(cfg, text, kind)


def test_regex_engine_equals_the_plain_definition_on_every_regions_shortest_numbers():
    # the phone fast path rejects candidates with fewer digits than any valid number can have: the
    # example numbers of every region and type, in every format, must still be found as before
    numbers = []
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for t in (phonenumbers.PhoneNumberType.FIXED_LINE, phonenumbers.PhoneNumberType.MOBILE,
                  phonenumbers.PhoneNumberType.TOLL_FREE, phonenumbers.PhoneNumberType.VOIP):
            n = phonenumbers.example_number_for_type(region, t)
            if n is not None:
                numbers.append((region, n))
    assert len(numbers) > 500
    found = 0
    for home in ("US", "GB", "DE", "AT", "NU", "VI", "AR", "SM", "JE"):
        cfg = PIIConfig(phone_region=home)
        step = ScrubPII(cfg)
        for region, n in numbers:
            for fmt in (phonenumbers.PhoneNumberFormat.INTERNATIONAL, phonenumbers.PhoneNumberFormat.NATIONAL,
                        phonenumbers.PhoneNumberFormat.E164):
                text = f"Call {phonenumbers.format_number(n, fmt)} today."
                got = step.scrub(text)
                assert got == plain_scrub(cfg, text), (home, region, text)
                found += PHONE in got[0]
    assert found > 5000   # the comparison is not vacuous


def test_regex_engine_equals_the_plain_definition_on_stdlib_code_and_docs():
    import sysconfig
    from pathlib import Path
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))[::25]
    cfg = PIIConfig()
    changed = 0
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        for kind in ("code", "prose"):
            got = ScrubPII(cfg).scrub(text, kind)
            assert got == plain_scrub(cfg, text, kind), p
            changed += bool(got[1])
    assert changed > 5


def test_placeholders_counts_and_switches():
    text = ("Mail a@example.com,b@example.com or call +1 212-555-0147. Hosts 8.8.8.8 and 10.0.0.1, "
            "v6 2001:4860:4860::8888; card 4111-1111-1111-1111.")
    out = ScrubPII(PIIConfig())(doc(text))
    assert out.text == ("Mail <EMAIL>,<EMAIL> or call <PHONE_NUMBER>. Hosts <IP_ADDRESS> and 10.0.0.1, "
                        "v6 <IP_ADDRESS>; card <CREDIT_CARD>.")
    assert sorted(out.flags) == ["pii:credit_card", "pii:email", "pii:email", "pii:ip_address", "pii:ip_address",
                                 "pii:phone_number"]
    off = ScrubPII(PIIConfig(emails=False, ip_addresses=False, phone_numbers=False, credit_cards=False))
    assert off.scrub(text) == (text, ())
    assert ScrubPII(PIIConfig()).scrub(text, "code")[1].count("pii:phone_number") == 0


def test_presidio_engine_missing_fails_at_load_naming_key_and_command(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("presidio") else real(name, *a))
    d = DataConfig()
    d.pii.engine = "presidio"
    with pytest.raises(ConfigError, match=r"data\.pii\.engine.*pip install 'llmkiln\[presidio\]'"):
        d.validate()
    d.pii.enabled = False
    d.validate()   # switched off: nothing needed


def test_unknown_engine_is_refused():
    d = DataConfig()
    d.pii.engine = "spacy"
    with pytest.raises(ConfigError, match="data.pii.engine"):
        d.validate()


# ---------------------------------------------------------------- Presidio (optional extra)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve or connect fails the test: the engine must run offline."""
    def refuse(*a, **k):
        raise AssertionError(f"network access attempted: {a[:1]}")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def presidio_step():
    pytest.importorskip("presidio_analyzer")
    pytest.importorskip("presidio_anonymizer")
    pytest.importorskip("spacy")
    return ScrubPII(PIIConfig(engine="presidio"))


def test_presidio_engine_offline_with_kiln_placeholders(presidio_step, no_network):
    text = ("Write to jane.roe@example.org or call (650) 253-0000. Server 8.8.8.8, router 192.168.1.1. "
            "Card 4111 1111 1111 1111; IBAN GB82 WEST 1234 5698 7654 32.")
    out = presidio_step(doc(text))
    assert EMAIL in out.text and PHONE in out.text and CARD in out.text and "<IBAN_CODE>" in out.text
    assert out.text.count(IP) == 1 and "192.168.1.1" in out.text   # private addresses stay, as in the regex engine
    assert sorted(out.flags) == ["pii:credit_card", "pii:email", "pii:iban_code", "pii:ip_address", "pii:phone_number"]
    assert "jane.roe" not in out.text and "4111" not in out.text


def test_presidio_engine_follows_kiln_rules(presidio_step):
    text = "Call (650) 253-0000 or mail a@example.com."
    code = presidio_step.scrub(text, "code")
    assert PHONE not in code[0] and code[1] == ("pii:email",)   # phone numbers only in prose
    quiet = ScrubPII(PIIConfig(engine="presidio", emails=False))
    assert "a@example.com" in quiet.scrub(text)[0]
    assert presidio_step.scrub("Nothing personal here at all.") == ("Nothing personal here at all.", ())


def test_presidio_engine_agrees_with_regex_engine_on_clear_cases(presidio_step):
    for text in ("Mail a@example.com now.", "Host 8.8.4.4 is up.", "Card 4111111111111111 paid.",
                 "Call +44 20 7946 0958 please.", "Local 127.0.0.1 only."):
        assert presidio_step.scrub(text) == ScrubPII(PIIConfig()).scrub(text), text


def test_presidio_step_pickles_and_checks_entity_names(presidio_step):
    presidio_step.scrub("warm a@example.com")
    again = pickle.loads(pickle.dumps(presidio_step))   # steps travel to worker processes
    assert again.scrub("mail a@example.com")[1] == ("pii:email",)
    with pytest.raises(ConfigError, match=r"data\.pii\.presidio_entities\[1\]='PERSON'.*IBAN_CODE"):
        ScrubPII(dataclasses.replace(PIIConfig(engine="presidio"), presidio_entities=["IBAN_CODE", "PERSON"]))
