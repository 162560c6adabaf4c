"""Observability: structured logging setup (structlog); metrics and syslog come with the
service issue."""
