"""Small mechanisms used by every layer: atomic file writes and failpoints."""
