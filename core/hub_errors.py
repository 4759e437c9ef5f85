"""Hugging Face Hub failures as errors a client can act on: one stable code per cause.

from_pretrained and datasets.load_dataset wrap the Hub's own exceptions (OSError,
DatasetNotFoundError), so the cause is looked for along the exception's whole chain.
"""

from __future__ import annotations

from collections.abc import Iterator

from core.errors import HubUnavailable


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def hub_error(
    exc: BaseException,
    *,
    what: str,
    name: str,
    revision: str | None,
    field: str,
    revision_field: str,
    instead: str,
) -> HubUnavailable:
    """The error for a failed Hub load of ``what`` (model / dataset) ``name``: gated, not found,
    bad revision, no or bad credentials, offline, or (anything else) unreachable."""
    from huggingface_hub import errors as hub

    causes = list(_chain(exc))

    def found(*types: type[BaseException]) -> bool:
        return any(isinstance(c, types) for c in causes)

    at = f"{name!r}" + (f" (revision {revision!r})" if revision else "")
    if found(hub.GatedRepoError) or "is a gated dataset" in str(exc):
        return HubUnavailable(
            f"the Hub {what} {name!r} is gated: accept its terms on huggingface.co with the "
            f"account whose HF_TOKEN the worker uses, or {instead}",
            field=field,
            code="hub_repo_gated",
        )
    if found(hub.RevisionNotFoundError) or (revision and "Revision" in str(exc)):
        return HubUnavailable(
            f"revision {revision!r} does not exist for the Hub {what} {name!r}: give one of its "
            "branches, tags or commit hashes, or null for the default branch",
            field=revision_field,
            code="hub_revision_not_found",
        )
    if any(_status(c) == 401 for c in causes):
        return HubUnavailable(
            f"the Hub refused the worker's credentials for {what} {at} (HTTP 401): set a valid "
            "HF_TOKEN on the worker",
            field=field,
            code="hub_auth_failed",
        )
    if found(hub.RepositoryNotFoundError) or type(exc).__name__ == "DatasetNotFoundError":
        return HubUnavailable(
            f"the Hub {what} {name!r} does not exist, or is private and the worker's HF_TOKEN "
            f"cannot see it: check the id, or {instead}",
            field=field,
            code="hub_repo_not_found",
        )
    offline = any("OfflineModeIsEnabled" in str(c) for c in causes)  # datasets' own wording
    if offline or found(hub.OfflineModeIsEnabled, hub.LocalEntryNotFoundError):
        return HubUnavailable(
            f"the Hub {what} {at} is not in the worker's Hugging Face cache and the worker is "
            "offline (HF_HUB_OFFLINE=1, or no connection): put it in the cache on a connected "
            f"machine, or {instead}",
            field=field,
            code="hub_offline",
        )
    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    return HubUnavailable(
        f"could not load the {what} {at} from the Hugging Face Hub: {type(exc).__name__}: "
        f"{first}. {instead[0].upper()}{instead[1:]}",
        field=field,
    )
