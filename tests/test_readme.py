"""The README's commands are real: every `python -m ...`, `python scripts/...` and `torchrun ... -m ...`
line parses with the command's own argument parser (unknown flags, bad choices and missing arguments
fail), every server flag the README's table names exists, and its Python examples run against a live server.

What the commands *do* is tested where each command lives (tests/training, tests/export, tests/serving).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support import option_strings, parse_only_many

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _commands() -> list[list[str]]:
    commands = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if not line or line.startswith("#"):
                continue
            words = shlex.split(line, comments=True)
            if words[0] == "torchrun":
                words = ["python", *words[words.index("-m"):]]
            if words[:2] == ["python", "-m"] and words[2] not in ("pytest",):
                commands.append(words[2:])
            elif words[0] == "python" and words[1].endswith(".py"):
                commands.append(words[1:])
    return commands


COMMANDS = _commands()


def test_readme_shows_both_commands_first():
    first_block = _blocks("bash")[0]
    assert "make demo" in first_block and "make test" in first_block


@pytest.fixture(scope="module")
def parsed() -> dict[str, tuple[int, str]]:
    """Every README command through its own argument parser, all in one fresh process."""
    return {" ".join(words): result for words, result in zip(COMMANDS, parse_only_many(COMMANDS))}


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(c[:2]) for c in COMMANDS])
def test_readme_command_parses(words, parsed):
    code, stderr = parsed[" ".join(words)]
    assert code == 0, f"`{' '.join(words)}` does not parse:\n{stderr[-2000:]}"


def test_a_bad_command_fails_to_parse():
    """The batch check can fail: an unknown flag exits 2 with argparse's message."""
    [(code, stderr)] = parse_only_many([["training", "--no-such-flag"]])
    assert code == 2 and "unrecognized arguments: --no-such-flag" in stderr


def test_readme_covers_every_step():
    modules = {c[0] for c in COMMANDS}
    assert {"training", "training.data", "training.visualize", "export", "serving", "serving.client"} <= modules


def test_client_flags_named_in_readme_exist():
    known = option_strings("serving.client.cli:get_args_parser")
    section = README.split("## Server configuration", 1)[1].split("##", 1)[0]
    prose = "\n".join(line for line in section.splitlines() if not line.startswith("|"))
    named = set(re.findall(r"`(--[a-z][a-z0-9-]*)", prose)) - {"--grace-seconds"}
    assert named and named <= known, f"README names client flags that do not exist: {sorted(named - known)}"


def test_server_flags_in_table_exist():
    known = option_strings("serving.server:get_args_parser")
    section = README.split("## Server configuration", 1)[1].split("##", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    named = set(re.findall(r"`(--[a-z][a-z0-9-]*)", table))
    assert named and named <= known, f"README names flags the server lacks: {sorted(named - known)}"


@pytest.fixture(scope="module")
def live_server(tmp_path_factory, tiny_checkpoint):
    from export.repository import export_repository
    from support import synthetic_digits

    x, y = synthetic_digits(32, 3)
    repo = tmp_path_factory.mktemp("readme") / "model_repository"
    export_repository(tiny_checkpoint, repo, images=torch.from_numpy(x).unsqueeze(1),
                      labels=torch.from_numpy(y.astype(np.int64)), log=lambda *_: None)
    from bench.server_process import ServerProcess

    with ServerProcess(repo, "--log-level", "info").start() as server:
        yield server.port, server.wait_for("listening")["http_port"]


def test_readme_python_examples_run(live_server, tmp_path):
    from PIL import Image
    from support import synthetic_digits

    Image.fromarray(synthetic_digits(1)[0][0]).save(tmp_path / "digit.png")
    for block in _blocks("python"):
        grpc_port, http_port = live_server
        code = block.replace("127.0.0.1:50051", f"127.0.0.1:{grpc_port}").replace("127.0.0.1:8000",
                                                                                 f"127.0.0.1:{http_port}")
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, f"README example failed:\n{block}\n{result.stderr[-2000:]}"


def test_readme_curl_examples_answer_2xx(live_server, tmp_path):
    """Every curl line of the README, against a live server (curl -f: any 4xx/5xx fails it)."""
    import shutil

    from PIL import Image
    from support import synthetic_digits

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    digits = synthetic_digits(2)[0]
    for name, image in (("digit.png", digits[0]), ("a.png", digits[0]), ("b.jpg", digits[1])):
        Image.fromarray(image).save(tmp_path / name)
    _, http_port = live_server
    lines = [line.split("  #")[0].strip() for block in _blocks("bash") for line in block.splitlines()
             if line.strip().startswith("curl ")]
    assert len(lines) >= 12
    for line in lines:
        command = line.replace("127.0.0.1:8000", f"127.0.0.1:{http_port}") + " -f -o /dev/null"
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{line}\n{result.stderr[-1000:]}"
