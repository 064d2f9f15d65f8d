"""Streaming inference: the streaming state's declaration (:mod:`.state`), the
:class:`Stream` over independent slots (:mod:`.stream`), the fused native decode step's
plan (:mod:`.decode`) and the save format (:mod:`.format`)."""

from .state import Piece
from .stream import Stream, StreamingLM

__all__ = ["Piece", "Stream", "StreamingLM"]
