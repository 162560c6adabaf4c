"""The ``tessera`` command line and the DataMover service (``tessera run``): the top layer.

Command line: ``cli`` builds the argument parser (``build_parser``) and runs a command
(``main``); each ``cli_*`` module registers its own commands (``register``): ``cli_config``
(check-config, show-config), ``cli_service`` (``run`` and the commands that talk to a
running daemon), ``cli_maint`` (prune, protect, store status; ``cli_gc``: gc),
``cli_verify`` (store verify, repair), ``cli_peer`` (peer, replicate), ``cli_standby``
(standby refresh). ``cli_args`` checks option values at the edge (exit 2 before anything
runs), ``progress`` draws progress on a terminal, ``client`` speaks to the daemon's API over
its unix socket. ``backup vm`` and ``restore --config`` go through a running daemon when
one answers (it holds the store's writer lock); otherwise they, like the other backups and
restores, run in this process through ``engine.app``.

Exit codes are the constants of ``exits``, and only the command line returns them;
``cli.main`` maps errors to them: 0 success, 1 a failed operation (``EngineError``), 2 bad
usage or configuration (``ConfigError``, argparse), 3 integrity findings
(``IntegrityError`` or a failed verify).

The service: ``service`` (``Service``: startup order, reload on SIGHUP, graceful stop),
``jobs`` (``JobManager``: each job a task under named limits, one per VM; ``JobView`` keeps
its typed outcome), ``summaries`` (the API's dict of an outcome, built once), ``context``
(``DaemonContext``: what ``maintenance`` and ``sites`` take instead of the ``Service``),
``maintenance`` (scheduled gc and verify), ``sites`` (the replication receiver, pushes,
pulls and standby refreshes), ``api`` / ``api_models`` / ``openapi`` (the REST API and
its description), ``sdnotify`` (readiness and watchdog for systemd).

Nothing else in ``engine`` imports this package, and it has no import cycle.
"""
