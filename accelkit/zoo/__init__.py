"""accelkit.zoo."""
