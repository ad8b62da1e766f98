"""Which licence each teacher declares, and where that declaration came from.

Three sources, first found wins: the server's configuration (``license`` of the teacher's
entry), an admin's declaration at run time (``SetTeacherLicence``), and the teacher's model card
(``license:`` in its front matter, read by :func:`~.licences.model_card_licence`). A config
declaration is the admin's own file, so a run-time declaration does not silently override it:
it is refused with a message that says where to change it. Admin declarations, custom entries
included, are kept in one JSON file in the server's state directory, so they survive a restart.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from logitcache.client.errors import FailedPrecondition, InvalidArgument
from logitcache.server.policy.licences import (
    CATALOGUE,
    Licence,
    LicenceCatalogue,
    licence_from_json,
    licence_to_json,
)

DECLARATIONS_FILE = "teacher_licences.json"


class LicenceSource:
    CONFIG = "config"
    ADMIN = "admin"
    MODEL_CARD = "model card"
    NONE = "none"


@dataclass(frozen=True)
class DeclaredLicence:
    """A teacher's licence as declared: the name given (``None``: none declared), where it came
    from, and its catalogue entry (``None`` when undeclared or unknown to the catalogue)."""

    name: str | None
    source: str
    licence: Licence | None

    def to_json(self) -> dict[str, Any]:
        return {
            "declared": self.name,
            "source": self.source,
            "id": self.licence.id if self.licence else None,
            "name": self.licence.name if self.licence else None,
            "url": self.licence.url if self.licence else None,
        }


class TeacherLicences:
    """The declared licence of every teacher, over a catalogue that the admins' custom entries
    extend. ``path`` is the file admin declarations persist in (None: held in memory only)."""

    def __init__(self, catalogue: LicenceCatalogue = CATALOGUE, path: Path | None = None) -> None:
        self._base = catalogue
        self._path = path
        self._lock = threading.Lock()
        self._admin: dict[str, dict[str, Any]] = _read(path) if path is not None else {}
        self.catalogue = self._extended()

    def declared(
        self, teacher: str, configured: str | None, model_card: str | None
    ) -> DeclaredLicence:
        """The licence ``teacher`` declares, given its configured licence and its model card's."""
        admin = self._admin.get(teacher)
        for name, source in (
            (configured, LicenceSource.CONFIG),
            (admin["licence"] if admin else None, LicenceSource.ADMIN),
            (model_card, LicenceSource.MODEL_CARD),
        ):
            if name:
                return DeclaredLicence(name, source, self.catalogue.get(name))
        return DeclaredLicence(None, LicenceSource.NONE, None)

    def declare(
        self,
        teacher: str,
        configured: str | None,
        licence: str = "",
        custom_json: str = "",
        user: str | None = None,
    ) -> DeclaredLicence:
        """Record an admin's declaration for ``teacher``: a catalogue id, or a custom entry
        (``custom_json``, whose id becomes the declared licence)."""
        if configured:
            raise FailedPrecondition(
                f"teacher {teacher!r} declares licence {configured!r} in the server's "
                "configuration; change `license` in its [[teachers]] entry and restart instead"
            )
        custom = licence_from_json(custom_json) if custom_json else None
        name = custom.id if custom is not None else licence.strip()
        if not name:
            raise InvalidArgument(
                "give a catalogue licence id or a custom entry", fields=("licence", "custom_json")
            )
        if custom is not None and licence and licence.strip() != custom.id:
            raise InvalidArgument(
                f"licence {licence!r} is not the custom entry's id {custom.id!r}",
                fields=("licence",),
            )
        if custom is None and self._base.extended(self._customs()).get(name) is None:
            known = ", ".join(entry.id for entry in self.catalogue)
            raise InvalidArgument(
                f"licence {name!r} is not in the catalogue ({known}); declare a custom entry "
                "with custom_json instead",
                fields=("licence",),
            )
        entry = {
            "licence": name,
            "custom": licence_to_json(custom) if custom is not None else None,
            "declared_by": user,
            "declared_at": time.time(),
        }
        with self._lock:
            declarations = {**self._admin, teacher: entry}
            if self._path is not None:
                _write(self._path, declarations)
            self._admin = declarations
            self.catalogue = self._extended()
        return self.declared(teacher, None, None)

    def _customs(self) -> list[Licence]:
        return [
            licence_from_json(json.dumps(entry["custom"]), f"custom licence of teacher {name!r}")
            for name, entry in self._admin.items()
            if entry.get("custom")
        ]

    def _extended(self) -> LicenceCatalogue:
        customs = self._customs()
        return self._base.extended(customs) if customs else self._base


def _read(path: Path) -> dict[str, dict[str, Any]]:
    try:
        declarations = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise InvalidArgument(
            f"{path}: cannot read the teachers' licence declarations ({type(error).__name__})"
        ) from None
    if not isinstance(declarations, dict):
        raise InvalidArgument(f"{path}: expected an object of teacher names")
    return declarations


def _write(path: Path, declarations: dict[str, dict[str, Any]]) -> None:
    """Replace the file atomically: a crash leaves the old declarations or the new ones."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(declarations, out, indent=2, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
