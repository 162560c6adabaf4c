"""What GC does unless a run says otherwise (``GcOptions``), for the callers that offer it
(``tessera gc --repack-threshold``, ``--grace``).

Apart from ``gc`` so that offering them loads neither GC nor the store: the command line
builds its parser before it runs anything (issue 15).
"""

from datetime import timedelta
from typing import Final

DEFAULT_GRACE: Final = timedelta(days=7)
DEFAULT_REPACK_THRESHOLD: Final = 0.5
