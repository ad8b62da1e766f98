"""Screening whole inputs: token sequences read through the teacher's tokenizer, in blocks, the
first refused one named by its place and detector (never its text), counts for provenance; and
no findings at all on what jobs and tests send the demo teacher (its language, random ids)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from logitcache.client.errors import InvalidArgument
from logitcache.demo.language import generate_documents
from logitcache.server.policy.filters import (
    FilterAction,
    SensitiveDataFilter,
    screen_sequences,
    screening_tokenize,
)


@pytest.fixture(scope="module")
def tokenizer(demo_teacher: Path):
    return AutoTokenizer.from_pretrained(str(demo_teacher))


def screen(tokenizer, action: FilterAction, texts: list[str], block: int = 2):
    ids = [tokenizer(t)["input_ids"] for t in texts]
    filter_ = SensitiveDataFilter(action)
    report = filter_.report()
    screen_sequences(
        filter_, len(ids), ids.__getitem__,
        lambda chunk: tokenizer.batch_decode(chunk, skip_special_tokens=True), report,
        where=lambda i: f"data.jsonl:{i + 1}", block=block,
    )  # fmt: skip
    return report


TEXTS = ["the cat sees a dog .", "a dog .", "card 4111 1111 1111 1111 and ops@lab.ai", "end ."]


def test_reject_names_the_first_row_with_findings_across_blocks(tokenizer) -> None:
    with pytest.raises(InvalidArgument) as refused:
        screen(tokenizer, FilterAction.REJECT, TEXTS)
    message = str(refused.value)
    assert message.startswith("data.jsonl:3 contains sensitive data (email: 1, payment_card: 1)")
    assert "4111" not in message and "ops@" not in message
    assert refused.value.fields == ("sensitive_data",)


def test_allow_counts_every_finding_and_every_sequence(tokenizer) -> None:
    report = screen(tokenizer, FilterAction.ALLOW, TEXTS).to_json()
    assert report["counts"] == {"email": 1, "payment_card": 1}
    assert (report["texts"], report["texts_with_findings"], report["texts_rejected"]) == (4, 1, 0)


def test_token_ids_cannot_be_redacted_so_redact_refuses_them(tokenizer) -> None:
    with pytest.raises(InvalidArgument, match="data.jsonl:3"):
        screen(tokenizer, FilterAction.REDACT, TEXTS)


def test_texts_are_redacted_before_they_are_tokenised(tokenizer) -> None:
    filter_ = SensitiveDataFilter(FilterAction.REDACT)
    report = filter_.report()
    seen: list[str] = []

    def tokenize(texts: list[str]) -> list[list[int]]:
        seen.extend(texts)
        return tokenizer(texts)["input_ids"]

    screening_tokenize(filter_, tokenize, report)(TEXTS[1:3])
    assert seen == ["a dog .", "card [REDACTED:payment_card] and [REDACTED:email]"]
    assert dict(report.counts) == {"email": 1, "payment_card": 1}
    assert report.texts_with_findings == 1


def test_no_findings_in_the_demo_language_or_random_token_ids(tokenizer) -> None:
    rng = np.random.default_rng(0)
    random_ids = [rng.integers(4, 1785, size=int(rng.integers(3, 60))).tolist() for _ in range(500)]
    texts = generate_documents(200, seed=3) + tokenizer.batch_decode(random_ids)
    report = screen(tokenizer, FilterAction.ALLOW, texts, block=128).to_json()
    assert report["counts"] == {} and report["texts"] == len(texts)
