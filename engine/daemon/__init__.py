"""The DataMover service (``tessera run``): jobs, schedules, maintenance and other sites.

``service`` (``Service``: startup order, reload on SIGHUP, graceful stop; the bodies of
backup and restore jobs call ``engine.app``), ``jobs`` (``JobManager``: each job a task under
named limits, one per VM; ``JobView`` keeps its typed outcome), ``context``
(``DaemonContext``: what ``maintenance`` and ``sites`` take instead of the ``Service``),
``maintenance`` (scheduled gc and verify), ``sites`` (the replication receiver, pushes,
pulls and standby refreshes), ``notifications`` (``Senders``: a policy run's digest and
maintenance findings by mail and webhooks; ``PolicyRun``), ``sdnotify`` (readiness and
watchdog for systemd).

Below ``engine.cli`` and ``engine.api`` (they start and call the service; the listeners
reach ``Service.run`` as an argument), above ``engine.app``. No import cycle.
"""
