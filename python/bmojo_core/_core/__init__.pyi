"""Type stubs of the Rust extension ``bmojo_core._core``: one submodule per Python op
module. Arrays are C-contiguous NumPy views of torch CPU tensors, all float32 or all
float64 (seq_idx and slots int64); outputs are written in place. Errors are raised as the
classes of ``bmojo_core.errors``. The public, validated API is in the Python package.

This folder holds stubs only (no ``__init__.py``): at run time the compiled
``_core.abi3.so`` next to it is what ``import bmojo_core._core`` loads."""

from . import bilinear as bilinear
from . import companion as companion
from . import conv as conv
from . import cuda as cuda
from . import decode as decode
from . import eidetic as eidetic
from . import runtime as runtime
from . import scan as scan
from . import ssd as ssd
from . import step as step
