"""accelkit.kernels: custom kernels, each a pair ``<name>/reference.py`` + ``<name>/triton.py`` plus ``op.py``.

Kept import-light: this package imports nothing; import a kernel's subpackage (e.g.
``accelkit.kernels.block_sparse_attention``) to register its ``torch.ops.accelkit.*`` op.
"""
