"""accelkit.kernels: custom ops, one folder each, and the op registry (:mod:`accelkit.kernels.registry`).

An op folder ``<name>/`` holds ``reference.py`` (PyTorch truth), ``triton.py`` (lazy triton import),
``op.py`` (``torch.library`` custom op + fake) and ``registration.py`` (its :class:`~.registry.OpSpec`:
cost formula, precision facts, ONNX lowering, TensorRT plugin). See docs/adding-an-op.md.

Kept import-light: this package imports nothing; import a kernel's subpackage (e.g.
``accelkit.kernels.block_sparse_attention``) to register its ``torch.ops.accelkit.*`` op and spec, or
:func:`accelkit.kernels.registry.load_builtin_ops` for all of them.
"""
