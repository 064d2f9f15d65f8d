"""``ops._native.array``: NumPy views of tensors for the kernels without ``Tensor.numpy``'s
side effect (it marks the storage never resizable: FSDP2 frees and refills the storage its
unsharded parameters view, and a caller may ``resize_`` its own tensor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bmojo_core import (
    causal_conv1d_fn,
    companion_scan,
    mamba_chunk_scan_combined,
    selective_scan_fn,
)
from bmojo_core.ops._native import array, inout, view


def _resizable(t: torch.Tensor) -> bool:
    st = t.untyped_storage()
    try:
        st.resize_(st.nbytes())
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int64,
                                   torch.int32, torch.bool, torch.uint8])  # fmt: skip
def test_array_is_the_tensors_memory(dtype):
    t = (torch.arange(24) % 3).to(dtype).view(2, 3, 4)[:, 1:]  # an offset view
    a = array(t)
    assert a.shape == (2, 2, 4) and a.dtype == t.numpy().dtype
    np.testing.assert_array_equal(a, t.numpy())
    a[1, 0, 2] = 1
    assert t[1, 0, 2] == 1  # writes land in the tensor
    assert _resizable(torch.zeros(3)) and not _resizable(t)  # (t.numpy() above marked it)


def test_array_keeps_no_mark_and_the_tensor_alive():
    t = torch.arange(6.0).view(2, 3)
    a = array(t.t())  # non-contiguous: strides follow the tensor
    np.testing.assert_array_equal(a, np.arange(6.0).reshape(2, 3).T)
    assert _resizable(t)
    b = array(torch.arange(4.0))  # the only reference to the tensor is the array's
    np.testing.assert_array_equal(b, [0, 1, 2, 3])
    v = view(t.t())  # a contiguous copy
    assert v.flags.c_contiguous and _resizable(t)
    assert inout(t).flags.writeable and _resizable(t)


def test_array_falls_back_to_numpy_for_what_it_does_not_cover():
    assert array(torch.zeros(0, 3)).shape == (0, 3)
    with pytest.raises(TypeError):
        array(torch.zeros(2, dtype=torch.bfloat16))  # as Tensor.numpy
    with pytest.raises(RuntimeError):
        array(torch.zeros(2, requires_grad=True))  # as Tensor.numpy


def test_ops_leave_their_arguments_resizable():
    g = torch.Generator().manual_seed(0)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).requires_grad_()

    args = {
        "scan": (r(1, 4, 9), r(1, 4, 9), -torch.rand(4, 3, dtype=torch.float64), r(1, 3, 9),
                 r(1, 3, 9), r(4), r(1, 4, 9)),
        "ssd": (r(1, 9, 2, 3), r(1, 9, 2), -torch.rand(2, dtype=torch.float64), r(1, 9, 1, 4),
                r(1, 9, 1, 4), 4),
        "conv": (r(1, 4, 9), r(4, 3), r(4)),
        "companion": (r(1, 2, 9), r(2, 3, scale=0.1)),
    }  # fmt: skip
    fns = {"scan": selective_scan_fn, "ssd": mamba_chunk_scan_combined,
           "conv": causal_conv1d_fn, "companion": companion_scan}  # fmt: skip
    for name, a in args.items():
        out = fns[name](*a)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
        for i, t in enumerate(a):
            if isinstance(t, torch.Tensor):
                assert _resizable(t), (name, i)
                if t.grad is not None:
                    assert _resizable(t.grad), (name, i, "grad")
