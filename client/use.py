"""What a teacher's distributions are for: the declaration every job and read-through request
carries, on which the server's licence policy decides (allow, allow with obligations, or refuse
citing the licence's clause), and which the dataset's provenance records."""

from __future__ import annotations

import getpass
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Use:
    """``purpose``: "research" or "commercial"; the student the distributions will train, by
    its intended name and its family (e.g. "llama3", "qwen2"); the person or team asking
    (default: this OS user); the monthly active users of the requester's products, where a
    licence has a threshold."""

    purpose: str
    student_name: str
    student_family: str
    requester: str = field(default_factory=getpass.getuser)
    monthly_active_users: int | None = None

    def message(self) -> Any:
        """The ``UseDeclaration`` message (the stubs load only when a request is made)."""
        from logitcache.v1 import logitcache_pb2 as pb

        return pb.UseDeclaration(
            purpose=self.purpose,
            student_name=self.student_name,
            student_family=self.student_family,
            requester=self.requester,
            monthly_active_users=self.monthly_active_users,
        )
