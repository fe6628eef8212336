"""The README's examples are run as written (blocks marked ``<!-- readme-test -->``)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- readme-test -->\n```(bash|python)\n(.*?)```", re.S)


def blocks():
    found = BLOCK.findall(README.read_text())
    assert len(found) >= 4, "README lost its tested examples"
    return found


@pytest.mark.default_model
def test_readme_examples_run_as_written(tmp_path):
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    outputs = []
    for lang, code in blocks():
        cmd = (
            ["bash", "-euo", "pipefail", "-c", code]
            if lang == "bash"
            else [sys.executable, "-c", code]
        )
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"README block failed:\n{code}\n{proc.stdout}\n{proc.stderr}"
        outputs.append(proc.stdout + proc.stderr)
    text = "\n".join(outputs)
    # what the README says these examples print
    assert "bad.jsonl:2: has 'prompt' or 'completion' but is missing field 'completion'" in text
    assert "exit code 3" in text
    assert "Paris" in text
    assert "prod: v2 -> v1" in text and "winner:" in text and "[prod (v1)]" in text
    assert (tmp_path / "exported-v2" / "adapter_config.json").exists()
    assert (tmp_path / "merged-v2" / "config.json").exists()
    ab = json.loads((tmp_path / "ab.json").read_text())  # live traffic through a split
    assert ab["source"] == "log" and ab["A"]["outcomes"] + ab["B"]["outcomes"] == 8
    assert "('v1', " in text and "('v2', " in text and "('base', " in text
    for run in ("quick", "top-half", "yaml", "api", "sparse", "s1", "s2", "experts"):
        assert (tmp_path / "runs" / run / "delta" / "manifest.json").exists(), run
    assert "active adapter params/token" in text and "max/mean" in text
    assert (tmp_path / "runs" / "experts" / "expert_usage.png").exists()
    assert (tmp_path / "runs" / "sweep" / "sweep.png").exists()
    assert "r=2" in text and "r=4" in text
