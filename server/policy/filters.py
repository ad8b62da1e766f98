"""Sensitive-data filters: find e-mail addresses, phone numbers, payment cards, government ids,
API keys and secrets, and IP addresses in texts (or token ids, through the tokenizer) before they
reach the teacher or the cache.

A detector is anything with a ``name`` and ``find(text) -> spans`` (:class:`Detector`); the
built-in ones are in :data:`DETECTORS` and a lab adds its own with :func:`register`. Each
detector validates what its pattern finds (Luhn, mod-97, check letters, ``ipaddress``,
libphonenumber's metadata, known key shapes), because a filter that fires on code, hashes and
numbers in prose rejects the data a lab wants to keep. Each dataset picks an action: reject the
text, redact the findings, or allow it and only count them; the counts per detector go into the
dataset's provenance (:class:`FilterReport`).

Phone numbers use the ``phonenumbers`` package (Google's libphonenumber metadata for every
region, maintained with the numbering plans). Microsoft Presidio would add spaCy models and an
NLP pipeline to the server for detectors that are, underneath, the same patterns and checks.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, TypeVar

import phonenumbers

from logitcache.client.errors import FailedPrecondition, InvalidArgument

Ids = TypeVar("Ids")  # a token sequence: a list of ids, or an array


class Detector(Protocol):
    """Finds one kind of sensitive data: the (start, end) spans of each occurrence."""

    @property
    def name(self) -> str: ...

    def find(self, text: str) -> list[tuple[int, int]]: ...


@dataclass(frozen=True)
class PatternDetector:
    """A regular expression whose matches are kept when ``valid`` accepts them (a checksum, a
    range); group ``span_group`` is the sensitive part."""

    name: str
    pattern: re.Pattern[str]
    valid: Callable[[re.Match[str]], bool] | None = None
    span_group: int = 0

    def find(self, text: str) -> list[tuple[int, int]]:
        return [
            match.span(self.span_group)
            for match in self.pattern.finditer(text)
            if self.valid is None or self.valid(match)
        ]


# --- checks ------------------------------------------------------------------------------------


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of payment cards and Canadian SINs."""
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def _verhoeff_tables() -> tuple[list[list[int]], list[list[int]]]:
    """The dihedral group D5's multiplication table and the permutation table of Verhoeff's
    check digit (Aadhaar numbers), built from their definitions."""
    d = [[0] * 10 for _ in range(10)]
    for i in range(10):
        for j in range(10):
            if i < 5 and j < 5:
                d[i][j] = (i + j) % 5
            elif i < 5:
                d[i][j] = 5 + (i + j - 5) % 5
            elif j < 5:
                d[i][j] = 5 + (i - 5 - j) % 5
            else:
                d[i][j] = (i - j) % 5
    p = [list(range(10))]
    step = [1, 5, 7, 6, 2, 8, 3, 0, 9, 4]
    for _ in range(7):
        p.append([step[x] for x in p[-1]])
    return d, p


_D5, _VERHOEFF_P = _verhoeff_tables()


def verhoeff_valid(digits: str) -> bool:
    check = 0
    for i, ch in enumerate(reversed(digits)):
        check = _D5[check][_VERHOEFF_P[i % 8][int(ch)]]
    return check == 0


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


# (prefix ranges, lengths) of the card brands whose numbers a filter should catch.
_CARD_BRANDS: tuple[tuple[tuple[tuple[int, int], ...], frozenset[int]], ...] = (
    (((4, 4),), frozenset({13, 16, 19})),  # Visa
    (((51, 55), (2221, 2720)), frozenset({16})),  # Mastercard
    (((34, 34), (37, 37)), frozenset({15})),  # American Express
    (((6011, 6011), (644, 649), (65, 65)), frozenset(range(16, 20))),  # Discover
    (((3528, 3589),), frozenset(range(16, 20))),  # JCB
    (((300, 305), (36, 36), (38, 39)), frozenset(range(14, 20))),  # Diners Club
    (((62, 62),), frozenset(range(16, 20))),  # UnionPay
)


def _card_brand_known(digits: str) -> bool:
    for ranges, lengths in _CARD_BRANDS:
        if len(digits) in lengths:
            for low, high in ranges:
                width = len(str(low))
                if low <= int(digits[:width]) <= high:
                    return True
    return False


def _card_valid(match: re.Match[str]) -> bool:
    number = match.group(0)
    separators = set(re.sub(r"\d", "", number))
    digits = _digits(number)
    return len(separators) <= 1 and _card_brand_known(digits) and luhn_valid(digits)


def _sin_valid(match: re.Match[str]) -> bool:
    digits = _digits(match.group(0))
    return digits[0] not in "08" and luhn_valid(digits)


def _aadhaar_valid(match: re.Match[str]) -> bool:
    return verhoeff_valid(_digits(match.group(0)))


_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def _dni_valid(match: re.Match[str]) -> bool:
    number, letter = match.group(1), match.group(2)
    number = str("XYZ".index(number[0])) + number[1:] if number[0] in "XYZ" else number
    return _DNI_LETTERS[int(number) % 23] == letter


def _iban_valid(match: re.Match[str]) -> bool:
    iban = match.group(0).replace(" ", "")
    if iban[:2] not in _COUNTRIES:
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


# ISO 3166 regions, from libphonenumber's metadata; plus the ccTLDs that are not region codes.
_COUNTRIES = frozenset(r for r in phonenumbers.SUPPORTED_REGIONS if r.isalpha())
_TLDS = frozenset(c.lower() for c in _COUNTRIES) | {
    "uk", "eu", "com", "org", "net", "edu", "gov", "mil", "int", "info", "biz", "name", "pro",
    "mobi", "dev", "app", "tech", "online", "site", "xyz", "email", "cloud", "company", "team",
    "works", "systems", "digital", "global", "solutions", "network", "media", "studio", "local",
}  # fmt: skip


def _email_valid(match: re.Match[str]) -> bool:
    return match.group("tld").lower() in _TLDS


# Addresses that say nothing about anyone's network: documentation ranges (RFC 5737, 3849)
# and "this network" (netmasks such as 0.0.0.255 read as addresses).
_EXAMPLE_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in ("0.0.0.0/8", "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)


def _ip_valid(match: re.Match[str]) -> bool:
    """An address that says something about a network: not loopback, unspecified, reserved
    (netmasks such as 255.255.255.0), multicast, link-local or a documentation example; for
    IPv6 at least three groups written out (so slices like ``x[::2]`` are not addresses)."""
    text = match.group(0)
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    if (
        address.is_loopback
        or address.is_unspecified
        or address.is_reserved
        or address.is_multicast
        or address.is_link_local
        or any(address in network for network in _EXAMPLE_NETWORKS)
    ):
        return False
    if address.version == 4 and all(len(octet) == 1 for octet in text.split(".")[:3]):
        # 8.2.4.44 and 7.1.4.34 are section and version numbers; real addresses of this shape
        # are public resolvers (1.1.1.1, 8.8.8.8), which identify no one.
        return False
    if address.version == 6:
        return sum(1 for group in text.split(":") if group) >= 3 or "." in text
    return True


def _jwt_valid(match: re.Match[str]) -> bool:
    header = match.group(1)
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except ValueError:
        return False
    return isinstance(decoded, dict) and "alg" in decoded


def _has_digit(match: re.Match[str]) -> bool:
    return any(c.isdigit() for c in match.group(0))


# --- phone numbers and high-entropy strings ---------------------------------------------------


_DIGIT = re.compile(r"\d")
_PHONE_BREAK = re.compile(r"\n|\s{2,}")


def _phone_shaped(raw: str) -> bool:
    """Written the way people write phone numbers: groups of digits with two or more
    separators, or a leading + and a space or dash. Bare digit runs (ids, counts, timestamps)
    and decimals (one dot) are not."""
    body = raw.removeprefix("+")
    separators = re.findall(r"[^\d]+", body.strip())
    if raw.startswith("+"):
        return any(c in sep for sep in separators for c in " -()")
    return len(separators) >= 2


def _inside_token(text: str, start: int, end: int) -> bool:
    """Whether a span continues a longer token (``aix-6107-1415-32``, ``1.5e10``, ``v3-2-1``)."""
    before = text[start - 1] if start > 0 else " "
    after = text[end : end + 2]
    return before.isalnum() or before in "-_./" or (after[:1] in "-_./" and after[1:2].isalnum())


@dataclass(frozen=True)
class PhoneDetector:
    """Phone numbers that libphonenumber finds valid for ``region`` (national format), or for
    any region when written with a leading +. A bare run of digits is not taken for a phone
    number: in code and tables it is an id, a count or a timestamp."""

    region: str = "US"
    name: str = "phone"

    def find(self, text: str) -> list[tuple[int, int]]:
        """The matcher reads numbers separated only by spaces as one candidate, and when that
        is no number it may find none of them; no phone number spans a line break or a run of
        spaces, so each stretch between them is searched on its own."""
        spans, at = [], 0
        for gap in _PHONE_BREAK.finditer(text):
            spans += self._find(text, at, gap.start())
            at = gap.end()
        return spans + self._find(text, at, len(text))

    def _find(self, text: str, start: int, end: int) -> list[tuple[int, int]]:
        """Numbers in ``text[start:end]``; the text between the matcher's matches is searched
        again, for the numbers it skipped while reading a longer candidate."""
        if len(_DIGIT.findall(text, start, end)) < 7:  # too few digits for any phone number
            return []
        matcher = phonenumbers.PhoneNumberMatcher(
            text[start:end], self.region, leniency=phonenumbers.Leniency.VALID
        )
        spans: list[tuple[int, int]] = []
        at = start
        for match in matcher:
            found = (start + match.start, start + match.end)
            spans += self._find(text, at, found[0])
            if _phone_shaped(match.raw_string) and not _inside_token(text, *found):
                spans.append(found)
            at = found[1]
        if at > start:
            spans += self._find(text, at, end)
        return spans


def shannon_entropy(text: str) -> float:
    """Bits per character of ``text``'s own character distribution."""
    counts = Counter(text)
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


# A run of base64 or URL-safe characters; an "=" before it is allowed (KEY=value lines).
_ENTROPY_CANDIDATE = re.compile(r"(?<![\w+/-])[A-Za-z0-9+/_-]{24,}={0,2}(?![\w+/=-])")
_HEX = re.compile(r"[0-9a-fA-F_-]+")
_WORDS = re.compile(r"[A-Z]?[a-z]{3,}|[A-Z]{4,}")


def _in_url_path(text: str, start: int) -> bool:
    """Whether ``start`` lies in the path of a URL (a document or repository id there is an
    address, not a secret); a query string's values still count."""
    word = max(text.rfind(" ", 0, start), text.rfind("\n", 0, start)) + 1
    before = text[word:start]
    return "://" in before and not any(c in before for c in "?#&=")


@dataclass(frozen=True)
class HighEntropyDetector:
    """Long random-looking tokens: base64 or URL-safe runs that mix upper case, lower case and
    digits, whose entropy is near what random characters reach at that length (at least
    ``relative_bits`` of log2(length), capped at ``max_bits_per_char``), and that are not
    hexadecimal (hashes, ids), made of words (identifiers), paths or URL paths. A secret of a
    kind no prefix names is caught here: about 80% of random 32-character keys and 90% of
    40-character ones; the rest look too regular to tell from code."""

    name: str = "secret.high_entropy"
    min_length: int = 24
    relative_bits: float = 0.87
    max_bits_per_char: float = 4.2
    max_word_fraction: float = 0.4

    def find(self, text: str) -> list[tuple[int, int]]:
        spans = []
        for match in _ENTROPY_CANDIDATE.finditer(text):
            token = match.group(0).rstrip("=")
            if len(token) < self.min_length or _HEX.fullmatch(token):
                continue
            if token.startswith(("/", "./")) or _in_url_path(text, match.start()):
                continue
            upper = sum(c.isupper() for c in token)
            lower = sum(c.islower() for c in token)
            digit = sum(c.isdigit() for c in token)
            if min(upper, lower, digit) < 2:
                continue
            words = sum(len(w) for w in _WORDS.findall(token))
            if words > self.max_word_fraction * len(token):
                continue
            bound = min(self.max_bits_per_char, self.relative_bits * math.log2(len(token)))
            if shannon_entropy(token) >= bound:
                spans.append(match.span())
        return spans


# --- the built-in detectors --------------------------------------------------------------------

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"

BUILT_IN: tuple[Detector, ...] = (
    PatternDetector(
        "email",
        re.compile(
            rf"(?<![\w.+-])[A-Za-z0-9._%+-]+@(?:{_LABEL}\.)+(?P<tld>[A-Za-z]{{2,24}})(?![\w-])"
        ),
        _email_valid,
    ),
    PhoneDetector(),
    PatternDetector(
        "payment_card",
        re.compile(r"(?<![\w.,-])\d(?:[ -]?\d){12,18}(?![\w-]|[.,]\d)"),
        _card_valid,
    ),
    PatternDetector(
        "gov_id.us_ssn",
        re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])"),
    ),
    PatternDetector(
        "gov_id.uk_nino",
        re.compile(
            r"\b(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
            r"(?: ?\d{2}){3} ?[A-D]\b"
        ),
    ),
    PatternDetector(
        "gov_id.ca_sin", re.compile(r"(?<![\w-])\d{3}([ -])\d{3}\1\d{3}(?![\w-])"), _sin_valid
    ),
    PatternDetector(
        "gov_id.in_aadhaar",
        re.compile(r"(?<![\w-])[2-9]\d{3}([ -])\d{4}\1\d{4}(?![\w-])"),
        _aadhaar_valid,
    ),
    PatternDetector(
        "gov_id.es_dni",
        re.compile(r"(?<![\w.+-])([XYZ]\d{7}|\d{8})-?([A-Z])(?![\w+-])"),
        _dni_valid,
    ),
    PatternDetector(
        "iban",
        re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"),
        _iban_valid,
    ),
    PatternDetector(
        "secret.aws_access_key", re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b")
    ),
    PatternDetector(
        "secret.github_token",
        re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59})\b"),
    ),
    PatternDetector(
        "secret.slack_token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"), _has_digit
    ),
    PatternDetector(
        "secret.openai_key",
        re.compile(r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"),
        _has_digit,
    ),
    PatternDetector("secret.huggingface_token", re.compile(r"\bhf_[A-Za-z0-9]{34,40}\b")),
    PatternDetector("secret.google_api_key", re.compile(r"\bAIza[0-9A-Za-z_-]{35}(?![\w-])")),
    PatternDetector("secret.stripe_key", re.compile(r"\b[rs]k_live_[0-9A-Za-z]{24,}\b")),
    PatternDetector(
        "secret.private_key",
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"
            r"(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|[A-Za-z0-9+/=\s]*)"
        ),
    ),
    PatternDetector(
        "secret.jwt",
        re.compile(r"\b(eyJ[A-Za-z0-9_-]{8,})\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
        _jwt_valid,
    ),
    HighEntropyDetector(),
    PatternDetector(
        "ip_address",
        re.compile(
            r"(?<![\w.:])(?:(?:\d{1,3}\.){3}\d{1,3}"
            r"|(?=[0-9A-Fa-f:]*:[0-9A-Fa-f:]*:)[0-9A-Fa-f:]{2,39}(?:(?<=:)(?:\d{1,3}\.){3}\d{1,3})?)"
            r"(?![\w.:])"
        ),
        _ip_valid,
    ),
)

DETECTORS: dict[str, Detector] = {d.name: d for d in BUILT_IN}


def register(detector: Detector, *, replace: bool = False) -> None:
    """Make ``detector`` available to filters by its name (a lab's own kinds of data)."""
    if detector.name in DETECTORS and not replace:
        raise InvalidArgument(f"a detector named {detector.name!r} exists; pass replace=True")
    DETECTORS[detector.name] = detector


# --- applying a filter -------------------------------------------------------------------------


class FilterAction(StrEnum):
    REJECT = "reject"  # a text with findings is not computed or cached
    REDACT = "redact"  # findings are replaced with [REDACTED:<detector>]
    ALLOW = "allow"  # findings are only counted


@dataclass(frozen=True)
class FilterResult:
    """One text after the filter: the text to use (redacted under REDACT), what was found in
    it, and whether it is rejected."""

    text: str
    counts: dict[str, int]
    rejected: bool


@dataclass
class FilterReport:
    """What a dataset's filter did, for its provenance: findings per detector, and how many
    texts had findings and were rejected."""

    action: FilterAction
    detectors: tuple[str, ...]
    counts: Counter[str] = field(default_factory=Counter)
    texts: int = 0
    texts_with_findings: int = 0
    texts_rejected: int = 0

    def add(self, result: FilterResult) -> None:
        self.texts += 1
        self.counts.update(result.counts)
        self.texts_with_findings += bool(result.counts)
        self.texts_rejected += result.rejected

    def to_json(self) -> dict[str, object]:
        return {
            "action": self.action.value,
            "detectors": list(self.detectors),
            "counts": dict(sorted(self.counts.items())),
            "texts": self.texts,
            "texts_with_findings": self.texts_with_findings,
            "texts_rejected": self.texts_rejected,
        }


class SensitiveDataFilter:
    """A dataset's filter: the detectors it runs (all registered ones by default) and its
    action."""

    def __init__(self, action: FilterAction, detectors: Iterable[str] | None = None) -> None:
        names = tuple(DETECTORS) if detectors is None else tuple(detectors)
        if unknown := [n for n in names if n not in DETECTORS]:
            raise InvalidArgument(
                f"unknown detectors {', '.join(unknown)}; known: {', '.join(DETECTORS)}",
                fields=("filters",),
            )
        self.action = action
        self.detectors = tuple(DETECTORS[n] for n in names)

    def report(self) -> FilterReport:
        """An empty report for this filter, to :meth:`FilterReport.add` results to."""
        return FilterReport(self.action, tuple(d.name for d in self.detectors))

    def findings(self, text: str) -> list[tuple[int, int, str]]:
        """Non-overlapping (start, end, detector) findings in order; where two overlap the
        longer one (then the earlier detector) is kept."""
        found = [(s, e, d.name) for d in self.detectors for s, e in d.find(text) if e > s]
        found.sort(key=lambda f: (f[0], -(f[1] - f[0])))
        kept: list[tuple[int, int, str]] = []
        for finding in found:
            if kept and finding[0] < kept[-1][1]:
                continue
            kept.append(finding)
        return kept

    def apply(self, text: str) -> FilterResult:
        findings = self.findings(text)
        counts = dict(Counter(name for _, _, name in findings))
        if self.action is FilterAction.REDACT and findings:
            parts, at = [], 0
            for start, end, name in findings:
                parts += [text[at:start], f"[REDACTED:{name}]"]
                at = end
            text = "".join(parts) + text[at:]
        return FilterResult(text, counts, self.action is FilterAction.REJECT and bool(findings))

    def apply_token_ids(
        self,
        ids: Sequence[int],
        detokenize: Callable[[Sequence[int]], str],
        tokenize: Callable[[str], list[int]] | None = None,
    ) -> tuple[list[int], FilterResult]:
        """The filter on a sequence of token ids, read through the teacher's tokenizer. A
        redacted sequence is tokenized again, so REDACT needs ``tokenize``."""
        ids = list(ids)
        result = self.apply(detokenize(ids))
        if self.action is FilterAction.REDACT and result.counts:
            if tokenize is None:
                raise FailedPrecondition("redacting token ids needs the teacher's tokenizer")
            return tokenize(result.text), result
        return ids, result


def rejection(where: int | str, result: FilterResult) -> InvalidArgument:
    """The error for a rejected text: it names where the text is (a sequence index or an input
    row) and what was found, never the text itself."""
    found = ", ".join(f"{name}: {n}" for name, n in sorted(result.counts.items()))
    place = f"sequence {where}" if isinstance(where, int) else where
    return InvalidArgument(
        f"{place} contains sensitive data ({found}); the sensitive-data filter rejects such "
        "inputs (a dataset may choose redact or allow instead)",
        fields=("sensitive_data",),
    )


def screening_tokenize(
    filter_: SensitiveDataFilter,
    tokenize: Callable[[list[str]], list[list[int]]],
    report: FilterReport,
) -> Callable[[list[str]], list[list[int]]]:
    """``tokenize`` for a REDACT filter: each text's findings are redacted before it is
    tokenised, and counted into ``report`` (texts reach the tokenizer, hence the teacher and
    the cache, only redacted)."""
    redact = screening_redact(filter_, report)
    return lambda texts: tokenize([redact(text) for text in texts])


def screening_redact(filter_: SensitiveDataFilter, report: FilterReport) -> Callable[[str], str]:
    """One text redacted by a REDACT filter, its findings counted into ``report``: what a chat
    message's content goes through before the template renders it."""

    def redact(text: str) -> str:
        result = filter_.apply(text)
        report.counts.update(result.counts)
        report.texts_with_findings += bool(result.counts)
        return result.text

    return redact


def screen_sequences(
    filter_: SensitiveDataFilter,
    count: int,
    ids_at: Callable[[int], Ids],
    detokenize: Callable[[list[Ids]], list[str]],
    report: FilterReport,
    where: Callable[[int], int | str] = lambda i: i,
    block: int = 1024,
) -> None:
    """Screen ``count`` token sequences (``ids_at(i)``) as the teacher's tokenizer reads them,
    ``block`` at a time; findings are counted into ``report``, and the first sequence with
    findings is refused (:func:`rejection`, naming ``where(i)``) unless the filter allows them.
    Token ids cannot be redacted faithfully, so under REDACT a sequence that still has findings
    is refused too."""
    for start in range(0, count, block):
        indices = range(start, min(start + block, count))
        texts = detokenize([ids_at(i) for i in indices])
        for i, text in zip(indices, texts, strict=True):
            result = filter_.apply(text)
            refused = filter_.action is not FilterAction.ALLOW and bool(result.counts)
            report.add(FilterResult(text, result.counts, refused))
            if refused:
                raise rejection(where(i), result)
