"""accelkit.report."""
