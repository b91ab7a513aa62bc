"""accelkit.cli."""
