"""What the engine's event log says about an object: the reason behind a failed backup or a
cancelled transfer, which the object itself does not carry (API-NOTES § 4.8, § 9.2)."""

from typing import Any

import ovirtsdk4 as sdk
import structlog

from engine.core.errors import EngineError
from plugins.ovirt.client import EngineClient

log = structlog.get_logger("tessera.ovirt")


async def last_event(client: EngineClient, text: str) -> str | None:
    """The description of the newest engine event that mentions ``text`` (a backup or transfer
    id: the engine's free-text event search, as SDK-EX ``backup_vm.py`` does), or None. Best
    effort: an engine error while looking is logged and gives None, so it never hides the
    failure being explained."""

    def newest(conn: sdk.Connection) -> Any:
        events = conn.system_service().events_service().list(search=text, max=1)
        return str(events[0].description) if events and events[0].description else None

    try:
        found: str | None = await client.call(newest, "list events", obj=f"events about {text}")
    except EngineError as e:
        log.warning("cannot read engine events", about=text, error=str(e))
        return None
    return found
