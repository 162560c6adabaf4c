"""Observability, one self-contained module each; the daemon wires them together.

- ``log``      structlog setup (``configure``): key=value for the CLI, JSON for journald,
               optionally every event forwarded to syslog too.
- ``syslog``   RFC 5424 forwarding (UDP, TCP, TLS) from a bounded queue and one thread:
               never blocks the event loop; a server down costs counted drops.
- ``values``   log values as JSON-compatible data (times ISO 8601; no Python reprs).
- ``summary``  what a person is told of a finished job (``JobSummary``, events, ``Notice``).
- ``digest``   one policy run in one message (``RunSummary``: every VM, outcome, sizes).
- ``notify``   e-mail over SMTP: a run's digest, a maintenance job, a test message.
- ``webhook``  one JSON POST per notice, shaped for json, Slack, Teams or Gotify.
- ``metrics``  Prometheus metrics in a private registry (``Metrics.render`` for /metrics).

``obs`` sits below ``config`` in the layers: it takes config sections by shape
(``SyslogSettings``, ``SmtpSettings``, ``WebhookSettings``, ``NotificationRules`` protocols).
"""
