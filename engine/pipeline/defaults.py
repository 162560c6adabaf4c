"""The pipeline's defaults that its callers offer as their own (``tessera backup --readers``,
a backup request's readers).

Apart from ``disk`` so that offering them loads no pipeline: the command line builds its
parser before it runs anything, and ``--help`` must not load a backup's machinery (issue 15).
"""

from typing import Final

DEFAULT_READERS: Final = 4  # connections per disk: hides per-request latency of NBD/HTTP
