"""`logitcache provenance DATASET --store URL` on a dataset with the policy's fields and on one
written before them (it still describes, saying what was not recorded)."""

from __future__ import annotations

import json
from pathlib import Path

from logitcache.cli import main
from logitcache.client.space import CaptureSpace, record_key
from logitcache.server.policy.admission import Admitted
from logitcache.server.policy.decision import Purpose, Student, UseRequest, decide
from logitcache.server.policy.filters import FilterAction, SensitiveDataFilter
from logitcache.server.policy.licences import GEMMA
from logitcache.server.policy.licensing import DeclaredLicence
from logitcache.server.policy.provenance import policy_provenance
from logitcache.server.store.store import open_store

SPACE = CaptureSpace("w" * 64, "t" * 64, 100, "topk", 8, "float32", "topk-q64-delta-v1")
LEGACY = {
    "teacher": "/models/old", "teacher_fingerprint": "w" * 64, "tokenizer_fingerprint": "t" * 64,
    "license": "mit", "policy_decision": None, "requester": "carol",
    "capture": {"mode": "topk", "k": 8, "codec": "topk-q64-delta-v1"},
}  # fmt: skip


def publish(url: str, name: str, provenance: dict) -> None:
    store = open_store(url, writable=True)
    keys = [record_key(SPACE.space_id, [5, 6, 7])]
    store.create_dataset(name, SPACE, keys, positions=3, provenance=provenance)


def gemma_provenance() -> dict:
    use = UseRequest("gemma-2b", Purpose.COMMERCIAL, Student("tiny", "qwen2"), "team-a")
    declared = DeclaredLicence("gemma", "config", GEMMA)
    filters = SensitiveDataFilter(FilterAction.REDACT).report()
    filters.counts.update({"email": 2})
    admitted = Admitted("gemma-2b", declared, decide("gemma", use), "alice")
    return {**LEGACY, "teacher": "google/gemma-2b", **policy_provenance(admitted, filters)}


def test_the_model_card_section_names_the_decision_and_its_obligations(tmp_path: Path, capsys):
    url = str(tmp_path / "store")
    publish(url, "new", gemma_provenance())
    card = tmp_path / "card" / "provenance.md"
    assert main(["provenance", "new", "--store", url, "--model-card", str(card)]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == card.read_text().strip()
    assert "**allow-with-obligations**" in printed and "Gemma Terms of Use" in printed
    assert "authenticated as alice" in printed
    assert "declared in the teacher's server configuration" in printed
    assert "Gemma Terms of Use §3.1" in printed  # each obligation cites its clause
    assert "Action: redact" in printed and "email: 2" in printed
    assert f"`{'w' * 64}`" in printed
    assert main(["provenance", "new", "--store", url, "--json"]) == 0
    fields = json.loads(capsys.readouterr().out)
    assert fields["policy_decision"]["student_family"] == "qwen2" and fields["user"] == "alice"
    assert fields["teacher"]["source"] == "google/gemma-2b" and fields["filters"]["counts"]


def test_a_dataset_from_before_the_policy_still_describes(tmp_path: Path, capsys):
    url = str(tmp_path / "store")
    publish(url, "old", LEGACY)
    assert main(["provenance", "old", "--store", url]) == 0
    printed = capsys.readouterr().out
    assert "the dataset predates the licence policy" in printed
    assert "Licence: mit; where it was declared is not recorded" in printed
    assert "### Sensitive-data filtering\n\n- not recorded" in printed
