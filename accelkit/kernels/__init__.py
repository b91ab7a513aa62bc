"""accelkit.kernels."""
