"""Observability, one self-contained module each; the daemon wires them together.

- ``log``      structlog setup (``configure``): key=value for the CLI, JSON for journald,
               optionally every event forwarded to syslog too.
- ``syslog``   RFC 5424 forwarding (UDP, TCP, TLS) from a bounded queue and one thread:
               never blocks the event loop; a server down costs counted drops.
- ``notify``   e-mail per finished job (``JobSummary``, ``Notifier``, ``choose_event``).
- ``metrics``  Prometheus metrics in a private registry (``Metrics.render`` for /metrics).

``obs`` sits below ``config`` in the layers: it takes config sections by shape
(``SyslogSettings``, ``SmtpSettings``, ``NotificationRules`` protocols).
"""
