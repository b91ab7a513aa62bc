"""accelkit.passes."""
