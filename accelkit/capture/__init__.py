"""accelkit.capture."""
