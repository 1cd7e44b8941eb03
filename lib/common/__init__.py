"""Helpers every stage shares: file downloads, atomic file writes, default folders, plot saving."""
