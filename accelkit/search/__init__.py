"""accelkit.search."""
