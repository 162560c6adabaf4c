"""The ``tessera`` command line: the top layer, and the only one that prints or exits.

``main`` builds the argument parser (``build_parser``) and runs a command (``main``, the
``tessera`` entry point). The parser is declared in ``main`` (store, backup, snapshots,
restore, lab) and in one module per other group of commands (``register``): ``config``
(check-config, show-config), ``service`` (``run`` — it composes the daemon and its HTTP API —
and the commands that talk to a running daemon), ``maint`` (prune, protect, store status;
``gc``: gc), ``verify`` (store verify, repair), ``peer`` (peer, replicate), ``standby``
(standby refresh). What each command runs is in ``commands``, one module per group, imported
only when one of its commands runs: ``--help`` and a usage error load no store, pipeline or
plugin, and a command loads only what it uses (the start of a command is part of every
backup's time). ``args`` checks option values at the edge (exit 2 before anything runs),
``progress`` draws progress on a terminal, ``client`` speaks to the daemon's API over its
unix socket.

``backup vm`` and ``restore --config`` go through a running daemon when one answers (it
holds the store's writer lock); otherwise they, like the other backups and restores, run in
this process through ``engine.app`` — the same code the daemon's jobs run. A local command
loads no HTTP code: the daemon's client and the replication machinery are imported by the
commands that use them (``tests/integration/test_cli_imports.py`` checks it, and what
``--help`` loads).

Exit codes are the constants of ``exits`` and only this package returns them; ``main`` maps
errors to them: 0 success, 1 a failed operation (``EngineError``), 2 bad usage or
configuration (``ConfigError``, argparse), 3 integrity findings (``IntegrityError`` or a
failed verify), 130 interrupted, 141 standard output's reader left early (``| head``; quiet).
``tessera --help`` lists them (``helptext``, which also gives every command its examples).

Rules for what people read (DESIGN §7, "The command line in pipes and scripts"): sizes are
binary, written by ``engine.core.units.human_bytes`` / ``human_rate``; times are shown in the
local zone (TZ) with their UTC offset, written by ``times.human_time`` (prune ``--tz`` and the
scheduler's zone show theirs, with the offset); ``--json`` carries bytes and UTC ISO 8601.

Above ``engine.api`` and ``engine.daemon`` (the layers contract in ``pyproject.toml``);
nothing in ``engine`` imports it.
"""
