"""accelkit.export."""
