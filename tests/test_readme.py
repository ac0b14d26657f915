"""The README's Python example runs as written (on the tiny debug model in place of the converted one)."""

import os
import re
from pathlib import Path

from a3lm.model.debug import tiny_a3_model

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_python_example_runs(tmp_path):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    tiny_a3_model("llama", vocab_size=64).save_pretrained(tmp_path / "runs" / "smollm2-a3")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        scope: dict = {}
        exec(compile(code, str(README), "exec"), scope)
    finally:
        os.chdir(cwd)
    assert scope["out"].sequences.shape == (1, 5 + 16)
    assert (scope["filled"].sequences[:, :6] == scope["out"].sequences[:, :6]).all()
    assert scope["logp"].total.shape == (1,)
