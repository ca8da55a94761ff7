"""Triton twins of :mod:`trady_triton.reference` (installed as ``trady_triton.kernels``).

Same names, signatures and results as the reference (up to float rounding):

* :func:`compact_channels` - ``x[:, idx]`` into a dense buffer, reading only those channels
* :func:`affine_relu_compact` - frozen BN -> ReLU/ReLU6 -> mask + compact copy, one pass
* :func:`relu_forward_mask`, :func:`relu_backward_mask` - ReLU/ReLU6 with a 1-bit mask
* :func:`pack_mask`, :func:`unpack_mask` - the 1-bit mask format
* :func:`conv2d_weight_grad_masked`, :func:`linear_weight_grad_masked` - ``dW[:, idx]``
  from the compact input, zeros elsewhere

Tensors must be on a CUDA device, or on the CPU with ``TRITON_INTERPRET=1`` set
before this package is imported (the kernels then run in Triton's interpreter).
The weight-gradient launchers take an extra keyword ``split_k`` (None = automatic).

Knobs: ``TRADY_FP32_DOT_PRECISION`` (float32 tl.dot on the GPU: ``tf32x3`` default,
``tf32`` like cuDNN's default, ``ieee``); ``TRADY_AUTOTUNE=0`` (use the first GPU
config instead of autotuning); :func:`trady_triton.kernels.testing.poisoned` (fill
kernel-written buffers with NaN first). Index checks (range, repeats) cost one
host sync per index tensor and version: they are cached on the tensor object and
its ``_version``, so change index buffers with torch ops (``copy_``, indexing) or
replace them, never through ``.data``. :func:`prepare_index` fills that cache ahead
of the steps (the controller calls it once per selection).
"""

from .activation import affine_relu_compact, prepare_index, relu_forward_mask
from .compaction import compact_channels
from .conv_weight_grad import conv2d_weight_grad_masked
from .gemm_weight_grad import linear_weight_grad_masked
from .masks import pack_mask, relu_backward_mask, unpack_mask

# the kernel twins of reference.py (prepare_index, a Triton-path helper, is not one)
__all__ = [
    "affine_relu_compact",
    "compact_channels",
    "conv2d_weight_grad_masked",
    "linear_weight_grad_masked",
    "pack_mask",
    "relu_backward_mask",
    "relu_forward_mask",
    "unpack_mask",
]
