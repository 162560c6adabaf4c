"""``Hypervisor.check`` for oVirt: one engine section of the configuration tried for real,
for ``tessera check-config --deep``.

One login (``EngineClient.test``, not retried: a check reports, it does not wait out an
engine restart) tells three items apart by how it fails::

    test()  ──ok──────────────▶ reachable ok, CA ok, credentials ok ─▶ imageio CA, DataMover
       ├── EngineUnavailable ─▶ reachable FAILED; the rest skipped
       ├── EngineTlsError ────▶ reachable ok, CA FAILED; the rest skipped
       ├── EngineAuthError ───▶ reachable ok, CA ok, credentials FAILED; DataMover skipped
       └── ConfigError ───────▶ (password file unreadable) credentials FAILED

The CA item also loads the engine CA imageio is verified with (``engine_ca``): the
configured ``ca_file`` must be a certificate, or the engine must publish its CA.
"""

import dataclasses
from typing import Any

from engine.core.errors import ConfigError, EngineError
from engine.sources.capabilities import FAILED, OK, SKIPPED, Check
from engine.util.retry import RetryPolicy
from plugins.ovirt.client import (
    EngineAuthError,
    EngineClient,
    EngineConfig,
    EngineTlsError,
    EngineUnavailable,
    ca_hint,
)
from plugins.ovirt.engine_ca import pki_url
from plugins.ovirt.inventory import datamover_vm

# Seconds one check request may take: long enough for a busy engine's login, short enough
# that a dead one is reported while the operator still looks at the terminal.
CHECK_TIMEOUT = 20
ONCE = RetryPolicy(attempts=1)


async def check_engine(engine: Any, datamover: Any | None) -> list[Check]:
    """The ``Check`` items of the engine section ``engine`` (module docstring)."""
    name = f"engine {engine.name}"
    config = dataclasses.replace(EngineConfig.from_section(engine), request_timeout=CHECK_TIMEOUT)
    ca = str(engine.ca_file) if engine.ca_file else "the system's CAs"
    later = [f"{name}: credentials"] + ([f"{name}: DataMover VM"] if datamover else [])
    client = EngineClient(config, retry_policy=ONCE)
    try:
        try:
            version = await client.test()
        except EngineUnavailable as e:
            hint = "is the URL right (https://ENGINE/ovirt-engine/api), the engine up, and its "
            hint += "port open from this host?"
            return [
                Check(f"{name}: reachable", FAILED, str(e), hint),
                Check(f"{name}: CA", SKIPPED, "the engine was not reached"),
                *(Check(item, SKIPPED, "the engine was not reached") for item in later),
            ]
        except EngineTlsError as e:
            return [
                Check(f"{name}: reachable", OK, engine.url),
                Check(
                    f"{name}: CA",
                    FAILED,
                    f"the engine's TLS certificate is not trusted ({e.fields['reason']})",
                    ca_hint(engine.url, engine.ca_file),
                ),
                *(
                    Check(item, SKIPPED, "the engine's certificate was not trusted")
                    for item in later
                ),
            ]
        except EngineAuthError as e:
            hint = f"check username {engine.username!r} (USER@PROFILE, e.g. admin@internal) "
            hint += f"and the password in {engine.password_file}"
            return [
                Check(f"{name}: reachable", OK, engine.url),
                Check(f"{name}: CA", OK, f"the engine's certificate verified with {ca}"),
                Check(f"{name}: credentials", FAILED, str(e), hint),
                *(Check(item, SKIPPED, "not logged in") for item in later[1:]),
            ]
        except ConfigError as e:  # the password file
            return [
                Check(f"{name}: reachable", SKIPPED, "no login without the password"),
                Check(f"{name}: CA", SKIPPED, "no login without the password"),
                Check(f"{name}: credentials", FAILED, str(e), "fix password_file"),
                *(Check(item, SKIPPED, "not logged in") for item in later[1:]),
            ]
        except EngineError as e:
            return [Check(f"{name}: reachable", FAILED, str(e), "see the engine's server.log")]
        checks = [
            Check(f"{name}: reachable", OK, f"{engine.url}, oVirt {version}"),
            await _ca(client, name, ca),
            Check(f"{name}: credentials", OK, f"logged in as {engine.username}"),
        ]
        if datamover:
            checks.append(await _datamover(client, name, datamover))
        return checks
    finally:
        await client.close()


async def _ca(client: EngineClient, name: str, ca: str) -> Check:
    try:
        imageio = await client.engine_ca()
    except EngineError as e:
        hint = f"set ca_file to the engine CA from {pki_url(client.config.url)}"
        return Check(f"{name}: CA", FAILED, str(e), hint)
    detail = f"the engine's certificate verified with {ca}; imageio's CA from {imageio.source}"
    return Check(f"{name}: CA", OK, detail)


async def _datamover(client: EngineClient, name: str, section: Any) -> Check:
    try:
        vm = await datamover_vm(client, section.vm_name, section.host_uuid)
    except EngineError as e:
        hint = "set datamover.vm_name to the VM Tessera runs in (or run this on that VM as root)"
        return Check(f"{name}: DataMover VM", FAILED, str(e), hint)
    return Check(f"{name}: DataMover VM", OK, f"{vm.name} ({vm.id})")
