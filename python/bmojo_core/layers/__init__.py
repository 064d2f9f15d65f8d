"""The nn modules: B'MOJO layers as torch ``nn.Module``\\ s built on bmojo_core's ops.

* :class:`SelectiveSSM` (:mod:`.ssm`): the Mamba-1 mixer with Mamba's initialisation;
* :class:`SlidingWindowAttention` (:mod:`.attention`): attention of each query to the
  previous ``window`` tokens (itself included) and to a per-chunk block of memory tokens;
* :class:`BMojoLayer` (:mod:`.bmojo`): fading memory (SSM), innovation-selected eidetic
  tokens and a sliding window, read out by attention;
* :class:`BMojoLM`, :class:`BMojoConfig` (:mod:`.lm`): the language model, streamed with
  ``model.stream(batch_size)``;
* :mod:`.reference`: the layers recomputed from their parameters with the op references.
"""

from .attention import SlidingWindowAttention
from .bmojo import BMojoLayer
from .lm import BMojoConfig, BMojoLM
from .ssm import SelectiveSSM

__all__ = ["BMojoConfig", "BMojoLM", "BMojoLayer", "SelectiveSSM", "SlidingWindowAttention"]
