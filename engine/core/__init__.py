"""Value types shared by every layer: chunk ids (``ids``), extents (``extent``), errors
(``errors``), units (``units``). Imports nothing of ours."""
