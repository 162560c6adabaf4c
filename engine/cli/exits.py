"""The exit codes of ``tessera``, in one place (the command line's only contract with
scripts and systemd besides its output)."""

from typing import Final

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1  # a job or check failed; the error says why
EXIT_USAGE: Final = 2  # bad arguments or configuration (a ConfigError), nothing ran
EXIT_INTEGRITY: Final = 3  # the store has damage (verify, check), or data failed its check
