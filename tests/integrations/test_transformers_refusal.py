"""A transformers that refuses the installed torch (it imports, but disables its PyTorch
models when torch is older than it supports): ``enable()`` says so instead of reporting
every model missing. Runs in the wheel tests' oldest-torch environment."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
from conftest import transformers_with_torch


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or transformers_with_torch(),
    reason="no transformers that refuses this torch",
)
def test_enable_names_a_transformers_that_refuses_this_torch():
    from bmojo_core.integrations import transformers as integration

    match = "does not support the installed torch " + re.escape(torch.__version__)
    with pytest.raises(ImportError, match=match):
        integration.enable()
