"""Request and response bodies of the REST API (pydantic lives only at this edge)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rules import Alert

__all__ = [
    "AlertEventOut",
    "AlertOut",
    "ErrorBody",
    "ErrorDetail",
    "Page",
    "as_datetime",
]

RoleName = Literal["operator", "responder", "engineer", "admin"]


def as_datetime(epoch_s: float | None) -> datetime | None:
    """Epoch seconds as an aware UTC datetime."""
    return None if epoch_s is None else datetime.fromtimestamp(epoch_s, UTC)


class ErrorDetail(BaseModel):
    """What went wrong, for people and for programs."""

    code: str = Field(description="Stable machine-readable code, e.g. `version_conflict`.")
    message: str
    current: dict[str, Any] | None = Field(
        default=None, description="On a version conflict: the alert as it is now."
    )
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="On a validation error: each invalid field."
    )


class ErrorBody(BaseModel):
    """Every error response."""

    error: ErrorDetail


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the given error statuses, all with :class:`ErrorBody`."""
    text = {
        400: "Bad request",
        401: "Not signed in, or an invalid token",
        403: "Signed in, but the role does not allow this (or a missing CSRF token)",
        404: "Not found",
        409: "Conflict: the resource changed (the body holds its current state)",
        422: "Invalid input",
        429: "Too many attempts",
        503: "The database or broker is unavailable",
    }
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}


class AlertOut(BaseModel):
    """An alert as the API shows it."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    rule_id: str
    rule_name: str = ""
    subject: str
    severity: Literal["critical", "major", "minor", "warning"]
    state: str
    version: int
    message: str
    raised_at: datetime
    updated_at: datetime
    active: bool
    acked: bool
    occurrences: int
    value: float | None
    device_id: str | None
    channel: str | None
    district: str
    domain: str | None = None
    acked_by: str | None
    acked_at: datetime | None
    cleared_at: datetime | None
    closed_at: datetime | None
    assignee: str | None
    shelved_until: datetime | None
    shelve_reason: str | None
    escalation_level: int
    chattering: bool
    incident_id: str | None
    source: Literal["live", "replay", "drill"]
    ack_role: str | None = Field(default=None, description="Who may acknowledge it.")

    @classmethod
    def of(
        cls, alert: Alert, *, rule_name: str = "", domain: str | None = None, ack_role: str | None
    ) -> AlertOut:
        """From the rules package's frozen record."""
        return cls(
            id=alert.id,
            rule_id=alert.rule_id,
            rule_name=rule_name,
            subject=alert.subject,
            severity=alert.severity,
            state=alert.state,
            version=alert.version,
            message=alert.message,
            raised_at=datetime.fromtimestamp(alert.raised_at, UTC),
            updated_at=datetime.fromtimestamp(alert.updated_at, UTC),
            active=alert.active,
            acked=alert.acked,
            occurrences=alert.occurrences,
            value=alert.value,
            device_id=alert.device_id,
            channel=alert.channel,
            district=alert.district,
            domain=domain,
            acked_by=alert.acked_by,
            acked_at=as_datetime(alert.acked_at),
            cleared_at=as_datetime(alert.cleared_at),
            closed_at=as_datetime(alert.closed_at),
            assignee=alert.assignee,
            shelved_until=as_datetime(alert.shelved_until),
            shelve_reason=alert.shelve_reason,
            escalation_level=alert.escalation_level,
            chattering=alert.chattering,
            incident_id=alert.incident_id,
            source=alert.source,
            ack_role=ack_role,
        )


class AlertEventOut(BaseModel):
    """One transition of an alert."""

    version: int
    action: str
    from_state: str
    to_state: str
    actor: str
    at: datetime
    note: str
    notify: str | None


class Page(BaseModel):
    """Cursor pagination: pass ``next_cursor`` back as ``cursor`` for the next page."""

    next_cursor: str | None = None
