"""Watching a run: step timing, MFU, progress and metrics files."""
