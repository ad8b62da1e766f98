"""The policy engine on the issue's cases: Llama 2 refuses a commercial non-Llama student
citing its clause, Apache-2.0 allows, Gemma allows with its obligations recorded."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from logitcache.client.errors import FailedPrecondition, InvalidArgument
from logitcache.server.policy.decision import (
    PolicyDecision,
    Purpose,
    Student,
    UseRequest,
    Verdict,
    decide,
)


def request(
    family: str = "qwen2",
    name: str = "tiny-distilled",
    purpose: Purpose = Purpose.COMMERCIAL,
    users: int | None = None,
) -> UseRequest:
    return UseRequest("teacher-a", purpose, Student(name, family), "alice", users)


def test_llama2_refuses_a_commercial_non_llama_student_citing_its_clause() -> None:
    decision = decide("llama2", request(family="qwen2"))
    assert decision.verdict is Verdict.REFUSE
    assert decision.clause is not None and "§1.b.v" in decision.clause
    assert "improve any other large language model" in decision.clause
    with pytest.raises(FailedPrecondition, match=r"§1\.b\.v") as raised:
        decision.enforce()
    assert "teacher-a" in str(raised.value) and "qwen2" in str(raised.value)


def test_llama2_allows_its_own_derivatives_with_its_notice() -> None:
    decision = decide("llama2", request(family="Llama-2"))
    assert decision.verdict is Verdict.ALLOW_WITH_OBLIGATIONS
    kinds = [o.kind for o in decision.obligations]
    assert {"notice", "licence-copy", "use-restrictions", "user-threshold"} <= set(kinds)


def test_llama2_above_700_million_users_needs_meta(tmp_path) -> None:
    decision = decide("llama2", request(family="llama2", users=800_000_000))
    assert decision.verdict is Verdict.REFUSE and decision.clause is not None
    assert "§2" in decision.clause and "700,000,000" in decision.reason
    below = decide("llama2", request(family="llama2", users=1_000))
    assert below.allowed and "user-threshold" not in [o.kind for o in below.obligations]


def test_apache_allows_without_conditions() -> None:
    decision = decide("Apache-2.0", request())
    assert decision.verdict is Verdict.ALLOW and decision.obligations == ()
    assert decision.enforce() is decision


def test_gemma_allows_with_its_obligations_recorded() -> None:
    decision = decide("gemma", request(family="llama3"))
    assert decision.verdict is Verdict.ALLOW_WITH_OBLIGATIONS
    by_kind = {o.kind: o for o in decision.obligations}
    assert "Gemma Terms of Use found at ai.google.dev/gemma/terms" in by_kind["notice"].text
    assert "§3.1" in by_kind["use-restrictions"].clause
    stored = json.loads(json.dumps(decision.to_json()))
    assert stored["verdict"] == "allow-with-obligations"
    assert PolicyDecision.from_json(stored) == decision


def test_llama31_requires_the_llama_name_and_says_when_the_student_lacks_it() -> None:
    renamed = decide("llama3.1", request(name="my-student"))
    naming = next(o for o in renamed.obligations if o.kind == "naming")
    assert "rename" in naming.text and "§1.b.i" in naming.clause
    named = decide("llama3.1", request(name="Llama-3.1-my-student"))
    assert "rename" not in next(o for o in named.obligations if o.kind == "naming").text
    assert any("Built with Llama" in o.text for o in named.obligations)


def test_llama3_restricts_outputs_to_llama3_students() -> None:
    assert not decide("llama3", request(family="mistral")).allowed
    assert decide("llama3", request(family="Meta-Llama-3")).allowed


def test_research_licences_refuse_commercial_use_only() -> None:
    assert decide("qwen-research", request(purpose=Purpose.RESEARCH)).allowed
    refused = decide("qwen-research", request(purpose=Purpose.COMMERCIAL))
    assert not refused.allowed and "commercial" in refused.reason


def test_qwen_user_threshold_applies_to_commercial_use_only() -> None:
    big = 200_000_000
    assert not decide("qwen", request(purpose=Purpose.COMMERCIAL, users=big)).allowed
    assert decide("qwen", request(purpose=Purpose.RESEARCH, users=big)).allowed


def test_rail_licences_pass_their_use_restrictions_down() -> None:
    decision = decide("bigscience-bloom-rail-1.0", request())
    restrictions = next(o for o in decision.obligations if o.kind == "use-restrictions")
    assert "paragraph 4.a" in restrictions.clause


def test_a_teacher_without_a_declared_or_known_licence_is_refused() -> None:
    missing = decide(None, request())
    assert missing.verdict is Verdict.REFUSE and "until an admin declares one" in missing.reason
    with pytest.raises(FailedPrecondition, match="declares no licence"):
        missing.enforce()
    unknown = decide("my-own-terms", request())
    assert not unknown.allowed and "not in the licence catalogue" in unknown.reason
    assert unknown.licence == "my-own-terms"


def test_a_request_must_name_its_student_and_requester() -> None:
    with pytest.raises(InvalidArgument, match="student_family"):
        decide("mit", request(family=" "))
    with pytest.raises(InvalidArgument, match="requester"):
        decide("mit", UseRequest("t", Purpose.RESEARCH, Student("s", "f"), ""))
    with pytest.raises(InvalidArgument, match="research or commercial"):
        Purpose.parse("fun")
    assert Purpose.parse(" Commercial ") is Purpose.COMMERCIAL


def test_a_decision_records_its_time_and_request() -> None:
    when = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    decision = decide("mit", request(users=5), now=when)
    assert decision.decided_at == "2026-12-01T12:00:00+00:00"
    assert (decision.requester, decision.student_family, decision.monthly_active_users) == (
        "alice",
        "qwen2",
        5,
    )


def test_tongyi_qianwen_outputs_improve_qwen_models_only() -> None:
    refused = decide("tongyi-qianwen", request(family="llama3"))
    assert refused.clause is not None and "§5.b" in refused.clause
    allowed = decide("tongyi-qianwen", request(family="Qwen2"))
    assert allowed.allowed
    notice = next(o for o in allowed.obligations if o.kind == "notice")
    assert "Tongyi Qianwen is licensed under the Tongyi Qianwen LICENSE AGREEMENT" in notice.text
