"""The exit codes of ``tessera``, in one place (the command line's only contract with
scripts and systemd besides its output). ``EPILOG`` lists them for ``tessera --help``; the
README's "Exit codes" section says the same."""

from typing import Final

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1  # a job or check failed; the error says why
EXIT_USAGE: Final = 2  # bad arguments or configuration (a ConfigError), nothing ran
EXIT_INTEGRITY: Final = 3  # the store has damage (verify, check), or data failed its check
EXIT_INTERRUPTED: Final = 130  # Ctrl-C (SIGINT), as a shell reports 128 + 2
# The reader of standard output left before it was all written (``| head``): as a shell
# reports a program killed by SIGPIPE (128 + 13), which is how restic ends there.
EXIT_PIPE: Final = 141

CODES: Final = (
    (EXIT_OK, "success"),
    (EXIT_FAILED, "the operation failed (the error says why)"),
    (EXIT_USAGE, "bad arguments or configuration; nothing ran"),
    (EXIT_INTEGRITY, "integrity findings: damage in the store, or data that failed its check"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
    (EXIT_PIPE, "the reader of the output left early (| head); quietly, as on SIGPIPE"),
)
