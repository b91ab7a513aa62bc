"""accelkit.runtime."""
