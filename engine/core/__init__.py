"""Value types shared by every layer: chunk ids, errors, units. Imports nothing of ours."""
