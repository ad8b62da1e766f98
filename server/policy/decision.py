"""The licence policy engine: may this teacher's outputs train that student, for that purpose?

Every job and read-through session declares a :class:`UseRequest` (purpose, intended student,
requester). :func:`decide` answers allow, allow with obligations (the duties the licence puts on
the student's authors), or refuse with the clause that forbids it. The decision is stored with
the dataset it produced, as :meth:`PolicyDecision.to_json` writes it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from logitcache.client.errors import FailedPrecondition, InvalidArgument
from logitcache.client.use import Use
from logitcache.server.policy.licences import (
    CATALOGUE,
    DutyKind,
    Licence,
    LicenceCatalogue,
    normalise,
)


class Purpose(StrEnum):
    RESEARCH = "research"
    COMMERCIAL = "commercial"

    @classmethod
    def parse(cls, value: str) -> Purpose:
        try:
            return cls(value.strip().lower())
        except ValueError:
            raise InvalidArgument(
                "purpose must be research or commercial", fields=("purpose",)
            ) from None


class Verdict(StrEnum):
    ALLOW = "allow"
    ALLOW_WITH_OBLIGATIONS = "allow-with-obligations"
    REFUSE = "refuse"


@dataclass(frozen=True)
class Student:
    """The model the distributions will train: its intended (published) name and its family,
    e.g. ``Student("Llama-3.1-tiny-distilled", "llama3.1")``."""

    name: str
    family: str


@dataclass(frozen=True)
class UseRequest:
    """What a job or a read-through session declares about the use of a teacher's outputs."""

    teacher: str
    purpose: Purpose
    student: Student
    requester: str
    monthly_active_users: int | None = None  # of the requester's products, where known

    @classmethod
    def of(cls, use: Use, teacher: str = "") -> UseRequest:
        """The request a client's declaration makes (the teacher is filled in once resolved)."""
        return cls(
            teacher,
            Purpose.parse(use.purpose),
            Student(use.student_name, use.student_family),
            use.requester,
            use.monthly_active_users,
        )

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["purpose"] = self.purpose.value
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> UseRequest:
        return cls(
            **{
                **record,
                "purpose": Purpose.parse(record["purpose"]),
                "student": Student(**record["student"]),
            }
        )

    def check(self) -> None:
        for field, value in (
            ("student_name", self.student.name),
            ("student_family", self.student.family),
            ("requester", self.requester),
        ):
            if not value or not value.strip():
                raise InvalidArgument(f"{field} must be given", fields=(field,))
        if self.monthly_active_users is not None and self.monthly_active_users < 0:
            raise InvalidArgument(
                "monthly_active_users must be >= 0", fields=("monthly_active_users",)
            )


@dataclass(frozen=True)
class Obligation:
    """A duty the decision puts on the student's authors, with the clause that imposes it."""

    kind: str
    text: str
    clause: str


@dataclass(frozen=True)
class PolicyDecision:
    """One decision, as stored with a dataset. ``clause`` is the cited clause of a refusal."""

    verdict: Verdict
    teacher: str
    licence: str | None
    licence_name: str | None
    purpose: Purpose
    student_name: str
    student_family: str
    requester: str
    monthly_active_users: int | None
    reason: str
    clause: str | None
    obligations: tuple[Obligation, ...]
    decided_at: str

    @property
    def allowed(self) -> bool:
        return self.verdict is not Verdict.REFUSE

    def enforce(self) -> PolicyDecision:
        """The decision itself when it allows; FAILED_PRECONDITION citing the clause when not."""
        if not self.allowed:
            cited = f" ({self.clause})" if self.clause else ""
            raise FailedPrecondition(
                f"policy refuses teacher {self.teacher!r}: {self.reason}{cited}"
            )
        return self

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["verdict"] = self.verdict.value
        record["purpose"] = self.purpose.value
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> PolicyDecision:
        return cls(
            **{
                **record,
                "verdict": Verdict(record["verdict"]),
                "purpose": Purpose(record["purpose"]),
                "obligations": tuple(Obligation(**o) for o in record["obligations"]),
            }
        )


def decide(
    declared_licence: str | None,
    request: UseRequest,
    catalogue: LicenceCatalogue = CATALOGUE,
    now: datetime | None = None,
) -> PolicyDecision:
    """The policy's answer for a teacher that declares ``declared_licence`` (its configured
    licence or its model card's; None when it has none)."""
    request.check()
    licence = catalogue.get(declared_licence)

    def answer(
        verdict: Verdict,
        reason: str,
        clause: str | None = None,
        obligations: tuple[Obligation, ...] = (),
    ) -> PolicyDecision:
        return PolicyDecision(
            verdict=verdict,
            teacher=request.teacher,
            licence=licence.id if licence else declared_licence,
            licence_name=licence.name if licence else None,
            purpose=request.purpose,
            student_name=request.student.name,
            student_family=request.student.family,
            requester=request.requester,
            monthly_active_users=request.monthly_active_users,
            reason=reason,
            clause=clause,
            obligations=obligations,
            decided_at=(now or datetime.now(UTC)).isoformat(timespec="seconds"),
        )

    if not declared_licence:
        return answer(
            Verdict.REFUSE,
            "the teacher declares no licence, so its outputs are not used until an admin "
            "declares one: `license` in the teacher's server configuration, the "
            "SetTeacherLicence call, or `license:` in its model card's front matter",
        )
    if licence is None:
        return answer(
            Verdict.REFUSE,
            f"licence {declared_licence!r} is not in the licence catalogue; an admin adds it as "
            "a custom entry or declares a catalogued licence for the teacher",
        )
    refusal = _refusal(licence, request)
    if refusal is not None:
        return answer(Verdict.REFUSE, *refusal)
    obligations = _obligations(licence, request)
    if not obligations:
        return answer(Verdict.ALLOW, f"{licence.name} puts no condition on this use")
    return answer(
        Verdict.ALLOW_WITH_OBLIGATIONS,
        f"{licence.name} allows this use on the conditions listed",
        obligations=obligations,
    )


def _refusal(licence: Licence, request: UseRequest) -> tuple[str, str] | None:
    """The reason and the cited clause that forbid the request, or None."""
    outputs = licence.outputs
    family = normalise(request.student.family)
    if not outputs.may_train and family not in {normalise(f) for f in outputs.only_families}:
        exempt = ", ".join(outputs.only_families) or "none"
        return (
            f"{licence.name} forbids using its outputs to improve a model of family "
            f"{request.student.family!r} (families it exempts: {exempt})",
            outputs.clause.cite(licence.name),
        )
    commercial = licence.commercial
    if request.purpose is Purpose.COMMERCIAL and not commercial.allowed:
        return (
            f"{licence.name} does not grant commercial use",
            commercial.clause.cite(licence.name),
        )
    limit, users = commercial.max_monthly_active_users, request.monthly_active_users
    applies = request.purpose is Purpose.COMMERCIAL or not commercial.users_limit_commercial_only
    if limit is not None and applies and users is not None and users > limit:
        clause = commercial.users_clause or commercial.clause
        return (
            f"{users:,} monthly active users is above the {limit:,} that {licence.name} "
            "allows without a separate licence from its licensor",
            clause.cite(licence.name),
        )
    return None


def _obligations(licence: Licence, request: UseRequest) -> tuple[Obligation, ...]:
    obligations = []
    for duty in licence.duties:
        text = duty.text
        if duty.kind is DutyKind.NAMING and duty.name_prefix is not None:
            if not normalise(request.student.name).startswith(normalise(duty.name_prefix)):
                text += (
                    f"; the intended name {request.student.name!r} does not, so rename the "
                    "student before publishing it"
                )
        obligations.append(Obligation(duty.kind.value, text, duty.clause.cite(licence.name)))
    commercial = licence.commercial
    applies = request.purpose is Purpose.COMMERCIAL or not commercial.users_limit_commercial_only
    if commercial.max_monthly_active_users is not None and applies:
        if request.monthly_active_users is None:
            clause = commercial.users_clause or commercial.clause
            obligations.append(
                Obligation(
                    "user-threshold",
                    f"stay at or below {commercial.max_monthly_active_users:,} monthly active "
                    "users, or get a separate licence from the licensor",
                    clause.cite(licence.name),
                )
            )
    return tuple(obligations)
