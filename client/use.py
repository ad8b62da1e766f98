"""What a teacher's distributions are for: the declaration every job and read-through request
carries (as a ``UseDeclaration``), on which the server's licence policy decides (allow, allow with obligations, or refuse
citing the licence's clause), and which the dataset's provenance records."""

from __future__ import annotations

import getpass
from dataclasses import dataclass, field


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
