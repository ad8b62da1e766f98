"""Where a dataset's distributions came from, recorded with it and read back for people.

Every dataset's provenance names the teacher (name, source, revision, weights, tokenizer and
chat-template fingerprints), its licence and the policy decision with its obligations, the
capture settings, who asked (the declared requester and the authenticated user), when, and what
the sensitive-data filter found. :func:`policy_provenance` builds the policy's part when a
dataset is created; :func:`read_provenance` reads any dataset's, older ones (written before
these fields) included, and :func:`model_card_section` writes the markdown a student's authors
paste into its model card.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from logitcache.server.policy.admission import Admitted
from logitcache.server.policy.filters import FilterReport

NOT_RECORDED = "not recorded"


def policy_provenance(admitted: Admitted, filters: FilterReport | None) -> dict[str, Any]:
    """The provenance fields the policy adds to a dataset's (merged over the core's own)."""
    declared, decision = admitted.declared, admitted.decision
    fields: dict[str, Any] = {
        "teacher_name": admitted.teacher,
        "license": declared.licence.id if declared.licence else declared.name,
        "licence": declared.to_json(),
        "policy_decision": decision.to_json() if decision is not None else None,
        "user": admitted.user,
        "filters": filters.to_json() if filters is not None else None,
    }
    if decision is not None:
        fields["requester"] = decision.requester
    return fields


@dataclass(frozen=True)
class DatasetProvenance:
    """A dataset's provenance as people read it; fields a dataset predates are None."""

    dataset: str
    state: str
    teacher: dict[str, Any]
    licence: dict[str, Any]
    decision: dict[str, Any] | None
    requester: str | None
    user: str | None
    capture: dict[str, Any]
    source: dict[str, Any]
    filters: dict[str, Any] | None
    created_at: float | None
    completed_at: float | None
    sequences: int
    positions: int

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "state": self.state,
            "teacher": self.teacher,
            "licence": self.licence,
            "policy_decision": self.decision,
            "requester": self.requester,
            "user": self.user,
            "capture": self.capture,
            "source": self.source,
            "filters": self.filters,
            "created_at": _when(self.created_at),
            "completed_at": _when(self.completed_at),
            "sequences": self.sequences,
            "positions": self.positions,
        }


def read_provenance(summary: dict[str, Any]) -> DatasetProvenance:
    """The provenance of one dataset of a store summary (``name``, ``state``, ``provenance``,
    ``space``, sizes and times), whatever version wrote it."""
    p = summary.get("provenance") or {}
    space = summary.get("space") or {}
    licence = p.get("licence") or {"declared": p.get("license"), "source": NOT_RECORDED}
    return DatasetProvenance(
        dataset=summary["name"],
        state=summary.get("state", ""),
        teacher={
            "name": p.get("teacher_name"),
            "source": p.get("teacher"),
            "architecture": p.get("teacher_architecture"),
            "revision": p.get("revision"),
            "weights_fingerprint": p.get("teacher_fingerprint") or space.get("teacher_fingerprint"),
            "tokenizer_fingerprint": p.get("tokenizer_fingerprint")
            or space.get("tokenizer_fingerprint"),
            "chat_template_fingerprint": p.get("chat_template_fingerprint"),
        },
        licence=licence,
        decision=p.get("policy_decision"),
        requester=p.get("requester"),
        user=p.get("user"),
        capture={
            **(p.get("capture") or {}),
            "engine_dtype": space.get("engine_dtype"),
            "vocab_size": space.get("vocab_size"),
            "space_id": space.get("space_id"),
        },
        source=p.get("source") or {},
        filters=p.get("filters"),
        created_at=summary.get("created_at"),
        completed_at=summary.get("completed_at"),
        sequences=int(summary.get("sequences", 0)),
        positions=int(summary.get("positions", 0)),
    )


def _when(seconds: float | None) -> str | None:
    if not seconds:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


_DECLARED_IN = {
    "config": "declared in the teacher's server configuration",
    "admin": "declared by an admin",
    "model card": "declared in the teacher's model card",
    "none": "no licence declared",
}


def _or(value: Any) -> str:
    return NOT_RECORDED if value in (None, "") else str(value)


def model_card_section(provenance: DatasetProvenance) -> str:
    """A markdown section for the student's model card: the teacher, its licence, the policy
    decision and the duties it puts on the student's authors, the data filters, and the
    capture, with the fingerprints that identify them."""
    t, d = provenance.teacher, provenance.decision or {}
    licence = provenance.licence
    licence_name = licence.get("name") or licence.get("declared")
    lines = [
        "## Distillation provenance",
        "",
        f"This model was trained on teacher distributions from the logitcache dataset "
        f"`{provenance.dataset}` ({provenance.sequences:,} sequences, "
        f"{provenance.positions:,} positions; {provenance.state}).",
        "",
        "### Teacher",
        "",
        f"- Teacher: {_or(t['name'] or t['source'])} (source `{_or(t['source'])}`, revision "
        f"{_or(t['revision'])})",
        f"- Weights fingerprint: `{_or(t['weights_fingerprint'])}`",
        f"- Tokenizer fingerprint: `{_or(t['tokenizer_fingerprint'])}`",
    ]
    if t["chat_template_fingerprint"]:
        lines.append(f"- Chat template fingerprint: `{t['chat_template_fingerprint']}`")
    url = licence.get("url")
    source = _DECLARED_IN.get(licence.get("source") or "", "where it was declared is not recorded")
    lines += [
        f"- Licence: {_or(licence_name)}" + (f" ({url})" if url else "") + f"; {source}",
        "",
        "### Licence policy decision",
        "",
    ]  # fmt: skip
    if d:
        lines += [
            f"- Decision: **{d['verdict']}**: {d['reason']}",
            f"- Use: {d['purpose']}; student `{d['student_name']}` (family "
            f"`{d['student_family']}`); requested by {d['requester']}"
            + (f" (authenticated as {provenance.user})" if provenance.user else ""),
            f"- Decided at: {d['decided_at']}",
        ]
        if d.get("obligations"):
            lines += ["", "Obligations on the authors of this model:", ""]
            lines += [f"- {o['text']} ({o['clause']})" for o in d["obligations"]]
    else:
        lines.append(f"- Decision: {NOT_RECORDED} (the dataset predates the licence policy)")
    f = provenance.filters
    lines += ["", "### Sensitive-data filtering", ""]
    if f:
        counts = ", ".join(f"{name}: {n}" for name, n in f["counts"].items()) or "none"
        lines += [
            f"- Action: {f['action']}; {f['texts']:,} inputs screened, "
            f"{f['texts_with_findings']:,} with findings, {f['texts_rejected']:,} rejected",
            f"- Findings per detector: {counts}",
        ]
    else:
        lines.append(f"- {NOT_RECORDED}")
    c = provenance.capture
    lines += [
        "",
        "### Capture",
        "",
        f"- Mode {_or(c.get('mode'))}, k = {_or(c.get('k'))}, codec {_or(c.get('codec'))}, "
        f"engine dtype {_or(c.get('engine_dtype'))}",
        f"- Capture space: `{_or(c.get('space_id'))}`",
        f"- Created {_or(_when(provenance.created_at))}"
        + (f", completed {_when(provenance.completed_at)}" if provenance.completed_at else ""),
        "",
    ]
    return "\n".join(lines)
