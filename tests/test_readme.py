"""The README's examples are run as written (blocks marked ``<!-- readme-test -->``)."""

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
# <!-- readme-test --> marks an example that runs on its own; <!-- readme-test NAME --> one
# that runs after the earlier examples marked NAME, in the README's order (they share files)
BLOCK = re.compile(r"<!-- readme-test(?: (\w+))? -->\n```(bash|python)\n(.*?)```", re.S)


def blocks() -> list[tuple[str, str, str]]:
    found = BLOCK.findall(README.read_text())
    assert len(found) >= 4, "README lost its tested examples"
    return found


def sequences(found: list[tuple[str, str, str]]) -> list[list[tuple[str, str]]]:
    """The examples grouped into what must run in order: one group per name, in the
    README's order, and each unnamed example alone."""
    groups: dict[str | int, list[tuple[str, str]]] = {}
    for i, (name, lang, code) in enumerate(found):
        groups.setdefault(name or i, []).append((lang, code))
    return list(groups.values())


def test_named_examples_keep_their_order_and_the_rest_stand_alone():
    found = [("", "bash", "a"), ("store", "bash", "b"), ("", "python", "c"), ("store", "bash", "d")]
    assert sequences(found) == [[("bash", "a")], [("bash", "b"), ("bash", "d")], [("python", "c")]]


# two at a time, a thread of torch each: 392 s against 495 s one at a time on 2 cores
WORKERS = min(4, max(2, (os.cpu_count() or 1) // 2))


def environment(workers: int = WORKERS) -> dict[str, str]:
    """The examples' environment: this interpreter's commands first, torch's threads shared."""
    return {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers)),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }


def command(lang: str, code: str) -> list[str]:
    """How an example block runs: bash strictly, python with this interpreter."""
    if lang == "bash":
        return ["bash", "-euo", "pipefail", "-c", code]
    return [sys.executable, "-c", code]


@pytest.mark.default_model
def test_readme_examples_run_as_written(tmp_path):
    env = environment()

    def run(group: list[tuple[str, str]]) -> list[str]:
        outputs = []
        for lang, code in group:
            cmd = command(lang, code)
            proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise AssertionError(f"README block failed:\n{code}\n{proc.stdout}\n{proc.stderr}")
            outputs.append(proc.stdout + proc.stderr)
        return outputs

    groups = sorted(sequences(blocks()), key=len, reverse=True)  # the longest first
    with ThreadPoolExecutor(WORKERS) as pool:
        outputs = [out for group in pool.map(run, groups) for out in group]
    text = "\n".join(outputs)
    # what the README says these examples print
    assert (
        "bad.jsonl:2: has 'prompt' or 'completion' but is missing field 'completion' "
        "(its fields: 'prompt')" in text
    )
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
