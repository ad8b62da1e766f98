"""What the core asks the policy before any teacher work: may this use of a teacher's outputs go
ahead, which sensitive-data filter applies, and may a job read that server file.

One :class:`Admission` per server (or per offline precompute) holds the teachers' declared
licences, the directories ``server_path`` inputs may come from, and the default filter action.
Jobs, read-through and precompute call it; none of them knows a licence clause, a detector or a
root.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from logitcache.client.errors import InvalidArgument
from logitcache.server.config import ServerConfig
from logitcache.server.policy.decision import PolicyDecision, Purpose, Student, UseRequest, decide
from logitcache.server.policy.filters import FilterAction, SensitiveDataFilter
from logitcache.server.policy.licences import load_catalogue
from logitcache.server.policy.licensing import DECLARATIONS_FILE, DeclaredLicence, TeacherLicences
from logitcache.server.policy.paths import confine_input
from logitcache.server.store.backend import LocalBackend
from logitcache.server.store.store import Store

DEFAULT_SENSITIVE_DATA = FilterAction.REJECT


@dataclass(frozen=True)
class Admitted:
    """A use the policy let through: the teacher, its declared licence, the decision (None:
    the offline precompute declared no use) and the authenticated user."""

    teacher: str
    declared: DeclaredLicence
    decision: PolicyDecision | None
    user: str | None


def policy_state_dir(config: ServerConfig, store: Store) -> Path | None:
    """Where a server keeps its policy state: ``state_dir``, else ``policy/`` in a local store;
    None for another store without one (admin licence declarations are then in memory)."""
    if config.state_dir:
        return Path(config.state_dir)
    return store.backend.root / "policy" if isinstance(store.backend, LocalBackend) else None


def parse_action(value: str, default: FilterAction = DEFAULT_SENSITIVE_DATA) -> FilterAction:
    """A dataset's filter action from its name; empty: ``default``."""
    if not value:
        return default
    try:
        return FilterAction(value.strip().lower())
    except ValueError:
        raise InvalidArgument(
            f"sensitive_data must be one of {', '.join(a.value for a in FilterAction)}, not "
            f"{value!r}",
            fields=("sensitive_data",),
        ) from None


@dataclass
class Admission:
    """The policy in front of the core. ``input_roots``: where ``server_path`` inputs may come
    from (none: such inputs are off); ``sensitive_data``: the filter action of a dataset or
    read-through session that names none."""

    licences: TeacherLicences = field(default_factory=TeacherLicences)
    input_roots: tuple[Path, ...] = ()
    sensitive_data: FilterAction = DEFAULT_SENSITIVE_DATA

    @classmethod
    def configured(cls, config: ServerConfig, state_dir: Path | str | None) -> Admission:
        """The admission of a server: admin licence declarations persist in ``state_dir``
        (None: in memory only), the catalogue takes the config's custom licences."""
        path = Path(state_dir) / DECLARATIONS_FILE if state_dir else None
        return cls(
            TeacherLicences(load_catalogue(config.custom_licences or None), path),
            tuple(Path(root) for root in config.input_roots),
            parse_action(config.sensitive_data),
        )

    def licence_of(
        self, teacher: str, configured: str | None, model_card: str | None
    ) -> DeclaredLicence:
        return self.licences.declared(teacher, configured, model_card)

    def admit(
        self,
        teacher: str,
        declared: DeclaredLicence,
        use: UseRequest | None,
        user: str | None,
        *,
        use_required: bool = True,
    ) -> Admitted:
        """The policy's answer to ``use`` of ``teacher``'s outputs, made before any teacher
        work: FAILED_PRECONDITION citing the clause when the licence refuses it, or when the
        teacher declares no licence the catalogue knows; INVALID_ARGUMENT when no use is
        declared. Without ``use_required`` (the offline precompute) a missing use records no
        decision, but the licence must still be declared."""
        if use is None:
            if use_required:
                raise InvalidArgument(
                    "declare the use of the teacher's outputs: purpose (research or "
                    "commercial), the student's name and family, and the requester",
                    fields=("use",),
                )
            if declared.licence is None:  # the same refusal a decision gives
                probe = UseRequest(teacher, Purpose.RESEARCH, Student("-", "-"), "-")
                decide(declared.name, probe, self.licences.catalogue).enforce()
            return Admitted(teacher, declared, None, user)
        decision = decide(declared.name, replace(use, teacher=teacher), self.licences.catalogue)
        return Admitted(teacher, declared, decision.enforce(), user)

    def filter(self, action: str = "") -> SensitiveDataFilter:
        """The filter of a dataset that chose ``action`` (empty: the server's default)."""
        return SensitiveDataFilter(parse_action(action, self.sensitive_data))

    def confine(self, server_path: str) -> Path:
        """``server_path`` resolved inside an allowed root; PERMISSION_DENIED otherwise."""
        return confine_input(server_path, self.input_roots)
