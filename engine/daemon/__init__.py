"""The ``tessera`` command line (and, with the service issue, the daemon).

``cli`` builds the argument parser and maps errors to exit codes — the only place that knows
exit codes: 0 success, 1 a failed operation (``EngineError``), 2 bad usage or configuration
(``ConfigError``, argparse), 3 integrity findings (``IntegrityError`` or a failed verify).
``passphrase`` resolves where a store's passphrase comes from.
"""
