"""The README's Python examples run as written (the mamba_ssm drop-in block excepted:
mamba_ssm is not installable without a CUDA toolchain)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    runnable = [b for b in blocks if "mamba_ssm" not in b]
    assert len(runnable) >= 2, "README lost its examples"
    namespace: dict = {}
    for block in runnable:  # later blocks reuse names from earlier ones, as a reader would
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["out"].shape == namespace["u"].shape
    assert namespace["u"].grad is not None and namespace["h0"].grad is not None
    assert namespace["y_t"].shape == (namespace["batch"], namespace["dim"])
    # the B'MOJO / streaming / GreedyLR examples
    assert namespace["held"].shape == (2, 7, 8)
    assert namespace["sampled"].shape == (2, 8)
    assert namespace["resumed"].positions.tolist() == [33 + 17] * 2
    assert namespace["stream"].positions.tolist() == [0, 58]
    assert namespace["tokens"].shape == (1, 8)  # the transformers example
