"""Helpers every stage shares: atomic file writes, default folders, plot saving."""
