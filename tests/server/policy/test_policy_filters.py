"""Sensitive-data detectors: each finds its kind in positive examples, ignores look-alikes, and
stays silent on real code, prose and numbers (Python's own standard library, generated
figures). Actions reject, redact or only count; token ids are read through a tokenizer."""

from __future__ import annotations

import hashlib
import random
import sysconfig
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.client.errors import FailedPrecondition, InvalidArgument
from logitcache.server.policy.filters import (
    DETECTORS,
    FilterAction,
    PatternDetector,
    SensitiveDataFilter,
    luhn_valid,
    register,
    rejection,
    verhoeff_valid,
)

POSITIVES = {
    "email": ["john.doe@example.com", "a+tag@mail.co.uk", "ops@lab.ai"],
    "phone": ["(415) 555-2671", "415-555-2671", "415.555.2671", "+44 20 7946 0958"],
    "payment_card": ["4111 1111 1111 1111", "4111111111111111", "378282246310005", "5555-5555-5555-4444"],
    "gov_id.us_ssn": ["123-45-6789", "078-05-1120"],
    "gov_id.uk_nino": ["AB 12 34 56 C", "JG103759A"],
    "gov_id.ca_sin": ["130 692 544", "130-692-544"],
    "gov_id.in_aadhaar": ["2345 6789 0124"],
    "gov_id.es_dni": ["12345678Z", "X1234567L"],
    "iban": ["GB82 WEST 1234 5698 7654 32", "DE89370400440532013000"],
    "secret.aws_access_key": ["AKIAIOSFODNN7EXAMPLE"],
    "secret.github_token": ["ghp_" + "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3fG5", "github_pat_" + "A1" * 11 + "_" + "b2" * 29 + "c"],
    "secret.slack_token": ["xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"],
    "secret.openai_key": ["sk-proj-abcDEF1234567890abcdefGHIJ"],
    "secret.huggingface_token": ["hf_94wBhPGp6KrrTH3KDchhKpRxZwd6dmHWLL"],
    "secret.google_api_key": ["AIzaSyA1234567890abcdefghijklmnopqrstuv"],
    "secret.stripe_key": ["sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc"],
    "secret.private_key": ["-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA3Tz2\n-----END RSA PRIVATE KEY-----"],
    "secret.jwt": [
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
        "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
    ],
    "secret.high_entropy": ["Zx9Qm2Lr7Tb4Kp1Vw8Nc3Hs6Yd5Gf0Ja", "q8Hf2Lx9Zr4Tb7Kp1Vw3Nc6Ys5Gd0Jm/aE2uR8iOv"],
    "ip_address": ["192.168.1.20", "10.20.30.40", "81.2.69.142", "2a00:1450:4009:81f::200e"],
}  # fmt: skip

NEGATIVES = {
    "email": ["x@self.weight", "a@b.T", "user@localhost", "@decorator", "name@host.invalidtld"],
    "phone": ["2147483647", "31.01875", "aix-6107-1415-32", "555", "1700000000"],
    "payment_card": ["4111 1111 1111 1112", "1234 5678 9012 3456", "3.1415926535897932", "9223372036854775807"],
    "gov_id.us_ssn": ["000-12-3456", "666-12-3456", "123-00-4567", "123-45-0000", "2026-12-01"],
    "gov_id.uk_nino": ["GB 12 34 56 C", "AB 12 34 56 E", "DQ123456A"],
    "gov_id.ca_sin": ["130 692 545", "046 454 286", "130 692544"],
    "gov_id.in_aadhaar": ["2345 6789 0123", "1234 5678 9012"],
    "gov_id.es_dni": ["12345678A", "1.38435736E+12"],
    "iban": ["GB82 WEST 1234 5698 7654 33", "XX89370400440532013000"],
    "secret.aws_access_key": ["AKIA1234", "akiaiosfodnn7example"],
    "secret.github_token": ["ghp_short", "gho_"],
    "secret.slack_token": ["xoxb-not-a-token-at-all"],
    "secret.openai_key": ["sk-learn", "sk-this-is-just-a-long-hyphenated-phrase"],
    "secret.huggingface_token": ["hf_hub_download", "hf_token"],
    "secret.google_api_key": ["AIza"],
    "secret.stripe_key": ["sk_test_4eC39HqLyjWDarjtT1zdp7dc"],
    "secret.private_key": ["-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----"],
    "secret.jwt": ["eyJhbGciOiJIUzI1.eyJub3QgYSBqd3Q.c2lnbmF0dXJl"],
    "secret.high_entropy": [
        hashlib.sha256(b"x").hexdigest(),
        str(uuid.UUID(int=12345)),
        "AbstractEventLoopPolicyForTesting2",
        "test_http2_connection_handler_timeout",
        "/usr/lib/python3.11/site-packages/torch",
        "https://docs.google.com/document/d/1CX_hJ0PNy9f3R1y8TJrfkSeLkvGjjjLU84BSXgS2AZ8/edit",
        "N18x509_attributes_st4DOLLAR_13E",
        "dk/i18n/charmaps/HP-ROMAN8",
    ],
    "ip_address": ["127.0.0.1", "0.0.0.0", "255.255.255.0", "192.0.2.1", "2001:db8::1", "x[::2]", "12:30:45", "3.3.2.4", "fe80::1"],
}  # fmt: skip


def only(name: str) -> SensitiveDataFilter:
    return SensitiveDataFilter(FilterAction.ALLOW, [name])


def test_every_built_in_detector_has_examples() -> None:
    assert set(POSITIVES) == set(NEGATIVES) == set(DETECTORS)


@pytest.mark.parametrize("name", sorted(POSITIVES))
def test_each_detector_finds_its_kind_in_a_sentence(name: str) -> None:
    for example in POSITIVES[name]:
        text = f"Please note: {example} (sent on Monday)."
        spans = only(name).findings(text)
        assert [text[s:e] for s, e, _ in spans] == [example], (name, example)


@pytest.mark.parametrize("name", sorted(NEGATIVES))
def test_each_detector_ignores_look_alikes(name: str) -> None:
    for example in NEGATIVES[name]:
        text = f"Please note: {example} (sent on Monday)."
        assert only(name).findings(text) == [], (name, example)


STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Modules without real addresses or credentials in them (others, such as textwrap.py, name
# their authors' e-mail addresses: those the filter should find).
CODE_AND_PROSE = [
    "heapq.py", "functools.py", "difflib.py", "statistics.py", "fractions.py", "json/decoder.py",
    "dataclasses.py", "enum.py", "typing.py", "pathlib.py", "collections/__init__.py",
    "random.py", "_pydecimal.py", "datetime.py", "calendar.py", "csv.py", "shlex.py", "ast.py",
    "traceback.py", "zipfile.py", "email/_header_value_parser.py", "http/client.py",
    "http/cookiejar.py", "urllib/parse.py", "base64.py", "hmac.py", "ssl.py", "LICENSE.txt",
]  # fmt: skip


def test_no_findings_in_code_and_prose_from_the_standard_library() -> None:
    every = SensitiveDataFilter(FilterAction.ALLOW)
    for name in CODE_AND_PROSE:
        text = (STDLIB / name).read_text(encoding="utf-8")
        found = [(n, text[s:e]) for s, e, n in every.findings(text)]
        assert found == [], name


def test_real_addresses_in_the_standard_library_are_found() -> None:
    text = (STDLIB / "textwrap.py").read_text(encoding="utf-8")
    assert [text[s:e] for s, e, _ in only("email").findings(text)] == ["gward@python.net"]


def numbers_sample() -> str:
    """Numbers as data, code and reports write them: floats, counts, timestamps, dates, times,
    versions, hashes, ids, money, coordinates, a table. (A bare 16-digit integer that passes
    Luhn with a card prefix is taken for a card: there is no telling them apart.)"""
    rng = random.Random(0)
    start = datetime(2020, 1, 1, tzinfo=UTC)
    parts = []
    for i in range(400):
        when = start + timedelta(seconds=rng.randrange(10**8))
        parts += [
            repr(rng.uniform(-1e6, 1e6)),
            f"{rng.gauss(0, 1):.6e}",
            str(rng.randrange(10**12)),
            f"{rng.randrange(10**9):,}",
            str(int(when.timestamp())),
            when.isoformat(),
            when.strftime("%d/%m/%Y %H:%M:%S"),
            f"{rng.randrange(4)}.{rng.randrange(30)}.{rng.randrange(20)}",
            hashlib.sha256(str(i).encode()).hexdigest(),
            hashlib.sha1(str(i).encode()).hexdigest()[:12],
            str(uuid.UUID(int=rng.getrandbits(128))),
            f"${rng.uniform(0, 1e5):,.2f}",
            f"{rng.uniform(-90, 90):.4f}, {rng.uniform(-180, 180):.4f}",
            f"| {rng.randrange(1000):>5} | {rng.random():.3f} | {rng.randrange(10**6):>8} |",
            f"localhost:{rng.randrange(1024, 65536)}",
        ]
    return "\n".join(parts)


def test_no_findings_in_numbers() -> None:
    text = numbers_sample()
    found = [(n, text[s:e]) for s, e, n in SensitiveDataFilter(FilterAction.ALLOW).findings(text)]
    assert found == []


def test_redact_replaces_each_finding_and_counts_it() -> None:
    text = "Mail ops@lab.ai or call (415) 555-2671; key AKIAIOSFODNN7EXAMPLE."
    result = SensitiveDataFilter(FilterAction.REDACT).apply(text)
    assert result.text == (
        "Mail [REDACTED:email] or call [REDACTED:phone]; key [REDACTED:secret.aws_access_key]."
    )
    assert result.counts == {"email": 1, "phone": 1, "secret.aws_access_key": 1}
    assert not result.rejected


def test_reject_keeps_the_text_and_the_error_never_quotes_it() -> None:
    filter_ = SensitiveDataFilter(FilterAction.REJECT)
    result = filter_.apply("card 4111 1111 1111 1111")
    assert result.rejected and result.text == "card 4111 1111 1111 1111"
    error = rejection(3, result)
    assert "sequence 3" in str(error) and "payment_card: 1" in str(error)
    assert "input.jsonl:7" in str(rejection("input.jsonl:7", result))
    assert "4111" not in str(error)
    clean = filter_.apply("nothing to see here")
    assert not clean.rejected and clean.counts == {}


def test_allow_counts_and_the_report_adds_up_for_provenance() -> None:
    filter_ = SensitiveDataFilter(FilterAction.ALLOW, ["email", "ip_address"])
    report = filter_.report()
    for text in ["a@b.com c@d.org", "host 10.1.2.3", "plain"]:
        result = filter_.apply(text)
        assert result.text == text
        report.add(result)
    assert report.to_json() == {
        "action": "allow",
        "detectors": ["email", "ip_address"],
        "counts": {"email": 2, "ip_address": 1},
        "texts": 3,
        "texts_with_findings": 2,
        "texts_rejected": 0,
    }


def test_a_secret_assigned_in_an_env_line_or_a_query_string_is_found() -> None:
    secret = "Zx9Qm2Lr7Tb4Kp1Vw8Nc3Hs6Yd5Gf0Ja"
    for text in [f"API_KEY={secret}", f"https://api.example.org/v1?token={secret}"]:
        found = only("secret.high_entropy").findings(text)
        assert [text[s:e] for s, e, _ in found] == [secret], text


def test_overlapping_findings_keep_the_longer_one() -> None:
    text = "ghp_" + "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3fG5"
    found = SensitiveDataFilter(FilterAction.ALLOW).findings(text)
    assert [n for _, _, n in found] == ["secret.github_token"]


def test_token_ids_are_read_and_redacted_through_the_tokenizer() -> None:
    def tokenize(text: str) -> list[int]:
        return [ord(c) for c in text]

    def detokenize(ids) -> str:
        return "".join(chr(i) for i in ids)

    ids = tokenize("write to ops@lab.ai")
    redacting = SensitiveDataFilter(FilterAction.REDACT, ["email"])
    new_ids, result = redacting.apply_token_ids(ids, detokenize, tokenize)
    assert detokenize(new_ids) == "write to [REDACTED:email]" and result.counts == {"email": 1}
    with pytest.raises(FailedPrecondition, match="tokenizer"):
        redacting.apply_token_ids(ids, detokenize)
    same, counted = SensitiveDataFilter(FilterAction.ALLOW).apply_token_ids(ids, detokenize)
    assert same == ids and counted.counts == {"email": 1}


def test_a_lab_registers_its_own_detector() -> None:
    import re

    detector = PatternDetector("lab.employee_id", re.compile(r"\bEMP-\d{6}\b"))
    register(detector)
    try:
        with pytest.raises(InvalidArgument, match="exists"):
            register(detector)
        result = SensitiveDataFilter(FilterAction.REDACT, ["lab.employee_id"]).apply("EMP-123456")
        assert result.text == "[REDACTED:lab.employee_id]"
    finally:
        del DETECTORS["lab.employee_id"]
    with pytest.raises(InvalidArgument, match="unknown detectors lab.employee_id"):
        SensitiveDataFilter(FilterAction.REDACT, ["lab.employee_id"])


def test_checksums_match_their_published_examples() -> None:
    assert luhn_valid("79927398713") and not luhn_valid("79927398710")
    assert verhoeff_valid("2363") and not verhoeff_valid("2364")


_FINDABLE = [(name, example) for name, examples in POSITIVES.items() for example in examples]
_FILLER = st.sampled_from(
    ["", " ", "Hello, ", " and then ", "\n", "see: ", " (ok) ", "The quick brown fox. "]
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_FILLER, st.sampled_from(_FINDABLE)), min_size=1, max_size=5), _FILLER)
def test_redacted_text_has_nothing_left_to_find(parts, tail) -> None:
    text = "".join(filler + " " + example + " " for filler, (_, example) in parts) + tail
    every = SensitiveDataFilter(FilterAction.REDACT)
    result = every.apply(text)
    assert sum(result.counts.values()) >= 1
    for _, (_, example) in parts:
        assert example not in result.text
    assert every.findings(result.text) == []
