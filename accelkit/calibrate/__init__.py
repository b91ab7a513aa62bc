"""accelkit.calibrate."""
