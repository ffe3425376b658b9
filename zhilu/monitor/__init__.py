"""Watching a run: what each rank holds in memory, the progress display, the device's matmul rate."""
