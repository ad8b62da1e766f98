"""Fetching a teacher from the Hugging Face hub, with one-line errors a user can act on.

The hub client raises a dozen exception types, most of which say only what went wrong at the
HTTP level. A user needs to know which of three things to fix: the name (missing or private),
the access (a gated model needs an accepted licence and ``HF_TOKEN``), or the network (an
unreachable hub, or ``HF_HUB_OFFLINE`` with a model that is not cached).
"""

from __future__ import annotations

from pathlib import Path

from logitcache.client.errors import (
    InvalidArgument,
    LogitCacheError,
    NotFound,
    PermissionDenied,
    Unavailable,
)

_TOKEN = "set HF_TOKEN to a token of an account that can read it"


def download_teacher(model_id: str, revision: str | None, cache_dir: str | None) -> Path:
    """The local snapshot of ``model_id`` at ``revision`` (fetched unless cached)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, revision=revision, cache_dir=cache_dir))
    except (OSError, ValueError) as e:  # what the hub client raises (its HTTP errors are OSError)
        raise hub_error(model_id, revision, e) from None


def hub_error(model_id: str, revision: str | None, error: OSError | ValueError) -> LogitCacheError:
    """The typed error, with a one-line reason, for a hub client's failure to fetch a model."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = f"teacher {model_id!r}" + (f" at revision {revision!r}" if revision else "")
    if isinstance(error, GatedRepoError):  # a subclass of RepositoryNotFoundError: test first
        return PermissionDenied(
            f"{name} is gated on the Hugging Face hub: accept its terms on the model's page, "
            f"then {_TOKEN}"
        )
    if isinstance(error, RepositoryNotFoundError):
        return NotFound(
            f"{name}: no such model on the Hugging Face hub, or it is private ({_TOKEN}); "
            "a local teacher is a directory with config.json"
        )
    if isinstance(error, RevisionNotFoundError):
        return NotFound(f"{name}: the model has no such branch, tag or commit on the hub")
    offline = constants.HF_HUB_OFFLINE
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)) and offline:
        return Unavailable(
            f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: fetch it "
            "once with HF_HUB_OFFLINE unset, or give the model's directory"
        )
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    if isinstance(error, ValueError):  # the hub client's check of the id's syntax
        return InvalidArgument(f"{name} is not a valid hub model id ({reason})")
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, HfHubHTTPError) and status in (401, 403):
        return PermissionDenied(f"{name}: the hub refused access (HTTP {status}); {_TOKEN}")
    return Unavailable(
        f"{name}: the Hugging Face hub could not be reached and the model is not cached "
        f"({reason}); check the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use cached "
        "models only"
    )
