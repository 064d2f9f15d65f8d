"""When a stream's one-token feeds take the fused native decode step
(:mod:`bmojo_core.ops.decode`), and the copy of the model's parameters it runs on.

The result equals the Python step path within the tolerances of design §1 and the state
transitions are the same (identical eidetic positions). Streaming never builds a graph, so
parameters that require grad do not matter.

**Plan.** :class:`DecodePlan` copies the model's parameters once into native memory. It is
rebuilt when a parameter changes: an in-place update (optimizer step, ``load_state_dict``,
``copy_``) bumps the parameter's ``_version``, a replacement (``model.to``, ``.data =``)
changes its ``data_ptr``; both are compared per token.

**Choice.** The fused path is on by default for float32 and float64 models on the CPU;
``BMOJO_FUSED_DECODE=0`` in the environment, or ``stream.fused_decode = False`` on a stream,
selects the Python step path; ``stream.fused_decode = True`` forces the fused one whatever
the environment.
"""

from __future__ import annotations

import operator
import os

import torch
from torch import Tensor

from ..ops.decode import FusedLM

__all__ = ["ENV", "DecodePlan", "enabled", "native", "plan_for"]

ENV = "BMOJO_FUSED_DECODE"
_VERSION = operator.attrgetter("_version")
_PTR = Tensor.data_ptr


def enabled(flag: bool | None) -> bool:
    """Whether one-token feeds take the fused path: ``flag`` (a stream's ``fused_decode``)
    if set, else ``BMOJO_FUSED_DECODE`` (default on)."""
    if flag is not None:
        return bool(flag)
    return os.environ.get(ENV, "1") != "0"


def native(model) -> bool:
    """Whether the fused step can run ``model``: float32 or float64 parameters on the CPU
    (its stream's state then lives in native buffers)."""
    params = list(model.parameters())
    return model.dtype in (torch.float32, torch.float64) and all(
        p.device.type == "cpu" for p in params
    )


class DecodePlan:
    """A model's parameters in native memory (:class:`~bmojo_core.ops.decode.FusedLM`), or
    ``fused = None`` when the fused step does not apply to the model (its dtype or device)."""

    def __init__(self, model):
        self.model = model
        self.params = list(model.parameters())
        self.key = self._key()
        self.fused: FusedLM | None = None
        if native(model):
            self.fused = FusedLM(*model.native_params(), model.dtype)

    def _key(self) -> tuple[list, list]:
        return list(map(_VERSION, self.params)), list(map(_PTR, self.params))

    def fresh(self) -> bool:
        """Whether the parameters are still the ones copied (~80 attribute reads: a few
        µs per token)."""
        v, p = self.key
        return list(map(_VERSION, self.params)) == v and list(map(_PTR, self.params)) == p


def plan_for(model, plan: DecodePlan | None) -> DecodePlan:
    """``plan`` if it still matches ``model``'s parameters, else a new one."""
    if plan is None or plan.model is not model or not plan.fresh():
        plan = DecodePlan(model)
    return plan
