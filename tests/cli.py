"""The ``tessera`` command line run as a user runs it, in a subprocess, for tests.

A test module binds one ``Cli`` (its passphrase, timeout) and takes its runners::

    CLI = Cli(passphrase="test-pass")
    tessera, ok = CLI.run, CLI.ok

    proc = tessera("store", "verify", store)      # CompletedProcess[str], any exit status
    out = ok("snapshots", "--store", store)       # stdout; fails the test unless exit 0
    code, out, err = await CLI.arun("backup", …)  # the same from a coroutine

Every run is ``python -m engine.cli.main ARGS`` from the repository root with the test's
environment plus the ``Cli``'s ``env``, ``TESSERA_PASSPHRASE`` (when the ``Cli`` has one) and
the run's ``env``; arguments may be paths. ``no_traceback=True`` also fails the test on a
Python traceback in stderr (a CLI error is a sentence, never a traceback).
"""

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Cli:
    passphrase: str | None = None
    timeout: float = 300
    no_traceback: bool = False
    env: dict[str, str] = field(default_factory=dict)  # for every run (e.g. force_tcg)

    def environment(self, env: dict[str, str] | None = None) -> dict[str, str]:
        base = {**os.environ, **self.env}
        if self.passphrase is not None:
            base["TESSERA_PASSPHRASE"] = self.passphrase
        return {**base, **(env or {})}

    def run(
        self,
        *args: object,
        env: dict[str, str] | None = None,
        stdout: int = subprocess.PIPE,
        timeout: float | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run it; the finished process whatever its exit status."""
        proc = subprocess.run(
            [sys.executable, "-m", "engine.cli.main", *map(str, args)],
            cwd=ROOT,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            env=self.environment(env),
            timeout=timeout or self.timeout,
            check=False,
        )
        if self.no_traceback:
            assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def ok(self, *args: object, env: dict[str, str] | None = None) -> str:
        """Run it; its stdout, after asserting it exited 0."""
        proc = self.run(*args, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    async def arun(self, *args: object, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        """Run it without blocking the event loop: (exit status, stdout, stderr)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "engine.cli.main",
            *map(str, args),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.environment(env),
        )
        try:
            async with asyncio.timeout(self.timeout):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        if self.no_traceback:
            assert "Traceback" not in err.decode(), err.decode()
        return proc.returncode, out.decode(), err.decode()

    async def aok(self, *args: object, env: dict[str, str] | None = None) -> str:
        """``arun``, asserting exit 0; its stdout."""
        code, out, err = await self.arun(*args, env=env)
        assert code == 0, out + err
        return out
