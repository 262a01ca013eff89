"""What people do to alerts: acknowledge, comment, assign, shelve, resolve.

Each command reads the alert, lets the lifecycle decide (roles, allowed
transitions, the caller's ``expected_version``), and stores the transition
with the version check in SQL: of two people acknowledging at once, one
succeeds and the other gets ``VersionConflict`` naming who acknowledged and
when. The control API and the websocket call these; the rules engine picks
up the new version on its next transition of that alert.
"""

from __future__ import annotations

from collections.abc import Callable

from rules.alerts import Actor, Alert, AlertEvent
from rules.errors import RulesError, VersionConflict
from rules.lifecycle import AlertLifecycle
from rules.service import AlertPublisher
from rules.store import AlertStore


class AlertNotFound(RulesError):
    """No alert has this id."""

    def __init__(self, alert_id: str) -> None:
        super().__init__(f"no alert {alert_id!r}")
        self.alert_id = alert_id


Step = Callable[[Alert], tuple[Alert, AlertEvent]]


class AlertCommands:
    """People's actions on stored alerts, version-checked."""

    def __init__(
        self, *, store: AlertStore, lifecycle: AlertLifecycle, publisher: AlertPublisher
    ) -> None:
        self.store = store
        self.lifecycle = lifecycle
        self.publisher = publisher

    async def _apply(self, alert_id: str, step: Step) -> Alert:
        alert = await self.store.get(alert_id)
        if alert is None:
            raise AlertNotFound(alert_id)
        after, event = step(alert)
        try:
            await self.store.save(alert, after, event)
        except VersionConflict:
            # Someone else changed it between our read and our write: report
            # the state as it is now.
            current = await self.store.get(alert_id)
            if current is None:
                raise AlertNotFound(alert_id) from None
            raise VersionConflict(
                alert_id, alert.version, current.version, current.acked_by, current.acked_at
            ) from None
        await self.publisher.publish(after, event)
        return after

    async def acknowledge(
        self, alert_id: str, *, by: Actor, expected_version: int, note: str = ""
    ) -> Alert:
        """Acknowledge (with an optional note)."""
        lc = self.lifecycle
        return await self._apply(alert_id, lambda a: lc.acknowledge(a, by, note, expected_version))

    async def comment(self, alert_id: str, *, by: Actor, note: str, expected_version: int) -> Alert:
        """Add a note."""
        lc = self.lifecycle
        return await self._apply(alert_id, lambda a: lc.comment(a, by, note, expected_version))

    async def assign(
        self, alert_id: str, *, by: Actor, to: str, expected_version: int, note: str = ""
    ) -> Alert:
        """Assign to a person."""
        lc = self.lifecycle
        return await self._apply(alert_id, lambda a: lc.assign(a, by, to, note, expected_version))

    async def shelve(
        self, alert_id: str, *, by: Actor, until: float, reason: str, expected_version: int
    ) -> Alert:
        """Hide until ``until`` (epoch seconds), with a reason."""
        lc = self.lifecycle
        return await self._apply(
            alert_id,
            lambda a: lc.shelve(
                a, by, until=until, reason=reason, expected_version=expected_version
            ),
        )

    async def unshelve(self, alert_id: str, *, by: Actor, expected_version: int) -> Alert:
        """Show a shelved alert again."""
        lc = self.lifecycle
        return await self._apply(alert_id, lambda a: lc.unshelve(a, by, expected_version))

    async def resolve(self, alert_id: str, *, by: Actor, note: str, expected_version: int) -> Alert:
        """Close by hand, where the rule allows it."""
        lc = self.lifecycle
        return await self._apply(alert_id, lambda a: lc.resolve(a, by, note, expected_version))

    async def put_out_of_service(
        self, alert_id: str, *, by: Actor, note: str, expected_version: int
    ) -> Alert:
        """The device is under maintenance."""
        lc = self.lifecycle
        return await self._apply(
            alert_id, lambda a: lc.put_out_of_service(a, by, note, expected_version)
        )

    async def return_to_service(
        self, alert_id: str, *, by: Actor, expected_version: int, note: str = ""
    ) -> Alert:
        """Maintenance is over."""
        lc = self.lifecycle
        return await self._apply(
            alert_id, lambda a: lc.return_to_service(a, by, note, expected_version)
        )
