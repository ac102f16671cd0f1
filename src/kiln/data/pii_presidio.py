"""The `presidio` PII engine: Microsoft Presidio's pattern recognizers, offline, on a blank spaCy pipeline.

Presidio normally loads a spaCy NER model (`en_core_web_lg`, downloaded on first
use); kiln gives it `spacy.blank("en")` instead: a tokenizer only, nothing to
download. Its pattern recognizers (email, IP, phone, credit card, IBAN, crypto
wallets, US SSN / passport / bank numbers, ...) need no NER; the NER-only types
(PERSON, LOCATION, NRP) are therefore not offered. Two more offline fixes:
Presidio's email check asks `tldextract`, which fetches the public-suffix list
from the internet on first use, so emails are checked against the list that
ships inside tldextract; and phone numbers use kiln's region, not Presidio's
eight defaults.

Kiln's rules still apply on top: the four switches of `data.pii` pick the
types, phone numbers only in prose, IP addresses only when globally routable.
Kiln's types keep kiln's placeholders and flags (EMAIL_ADDRESS -> `<EMAIL>`,
`pii:email`); any other type T becomes `<T>` and `pii:t`. Overlapping hits are
resolved by presidio-anonymizer (its default: merge similar or contained).
Needs `pip install 'llmkiln[presidio]'`; checked when the config loads.
"""

from __future__ import annotations

import functools

from kiln.config import ConfigError, PIIConfig
from kiln.data.pii import CARD, EMAIL, IP, PHONE, ip_is_personal

KILN_TYPES = {
    "EMAIL_ADDRESS": (EMAIL, "pii:email"),
    "IP_ADDRESS": (IP, "pii:ip_address"),
    "PHONE_NUMBER": (PHONE, "pii:phone_number"),
    "CREDIT_CARD": (CARD, "pii:credit_card"),
}
"""Presidio entity type -> kiln placeholder and flag."""
LANGUAGE = "en"


def placeholder(entity: str) -> tuple[str, str]:
    return KILN_TYPES.get(entity, (f"<{entity}>", f"pii:{entity.lower()}"))


@functools.cache
def _engines(region: str):
    import spacy
    import tldextract
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import SpacyNlpEngine
    from presidio_analyzer.predefined_recognizers import EmailRecognizer, PhoneRecognizer
    from presidio_anonymizer import AnonymizerEngine

    offline_suffixes = tldextract.TLDExtract(cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str):
            return offline_suffixes(pattern_text).fqdn != ""

    nlp = spacy.blank(LANGUAGE)
    nlp.max_length = 10**9   # tokenizer only: no model whose memory grows with the text
    nlp_engine = SpacyNlpEngine(models=[{"lang_code": LANGUAGE, "model_name": "blank"}])
    nlp_engine.nlp = {LANGUAGE: nlp}   # set directly: its load() would download a model
    registry = RecognizerRegistry(supported_languages=[LANGUAGE])
    registry.load_predefined_recognizers(languages=[LANGUAGE], nlp_engine=nlp_engine)
    for name in ("SpacyRecognizer", "EmailRecognizer", "PhoneRecognizer"):
        registry.remove_recognizer(name)
    registry.add_recognizer(OfflineEmailRecognizer())
    registry.add_recognizer(PhoneRecognizer(supported_regions=(region,), leniency=1))   # 1 = VALID, as the regex engine
    analyzer = AnalyzerEngine(registry=registry, nlp_engine=nlp_engine, supported_languages=[LANGUAGE])
    return analyzer, AnonymizerEngine()


@functools.cache
def supported_entities() -> tuple[str, ...]:
    """Entity types Presidio's pattern recognizers can find (no NER)."""
    analyzer, _ = _engines("US")
    return tuple(sorted(analyzer.get_supported_entities(LANGUAGE)))


def check(cfg: PIIConfig) -> None:
    """ConfigError naming `data.pii.presidio_entities` when a type has no pattern recognizer."""
    known = supported_entities()
    for i, e in enumerate(cfg.presidio_entities):
        if e not in known:
            raise ConfigError(f"data.pii.presidio_entities[{i}]={e!r} is not a type Presidio finds without a "
                              f"NER model; choose from {', '.join(known)}")


def entities(cfg: PIIConfig, kind: str) -> list[str]:
    on = [("EMAIL_ADDRESS", cfg.emails), ("IP_ADDRESS", cfg.ip_addresses),
          ("PHONE_NUMBER", cfg.phone_numbers and kind == "prose"), ("CREDIT_CARD", cfg.credit_cards)]
    return [e for e, wanted in on if wanted] + [e for e in cfg.presidio_entities if e not in KILN_TYPES]


def scrub(cfg: PIIConfig, text: str, kind: str = "prose") -> tuple[str, tuple[str, ...]]:
    from presidio_anonymizer.entities import OperatorConfig

    wanted = entities(cfg, kind)
    if not wanted or not text.strip():
        return text, ()
    analyzer, anonymizer = _engines(cfg.phone_region)
    found = analyzer.analyze(text, language=LANGUAGE, entities=wanted, score_threshold=cfg.presidio_min_score)
    found = [r for r in found if r.entity_type != "IP_ADDRESS" or ip_is_personal(text[r.start:r.end])]
    if not found:
        return text, ()
    operators = {e: OperatorConfig("replace", {"new_value": placeholder(e)[0]}) for e in {r.entity_type for r in found}}
    # merge_entities_with_spaces=False: two emails side by side are two replacements, as in the regex engine
    out = anonymizer.anonymize(text, found, operators=operators, merge_entities_with_spaces=False)
    flags = tuple(placeholder(item.entity_type)[1] for item in sorted(out.items, key=lambda it: it.start))
    return out.text, flags
