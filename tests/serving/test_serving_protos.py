"""The committed stubs in serving/_proto match what `python scripts/protos_gen.py` generates now, and import
as a package. Run: .venv/bin/python -m pytest tests/serving/test_serving_protos.py -q"""

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "protos_gen.py"
_spec = importlib.util.spec_from_file_location("protos_gen", SCRIPT)
protos_gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(protos_gen)


def test_committed_stubs_are_fresh():
    stale = protos_gen.differences()
    assert stale == [], f"regenerate with `python scripts/protos_gen.py`; stale: {stale}"


def test_check_flag_agrees(tmp_path):
    assert subprocess.run([sys.executable, str(SCRIPT), "--check"], cwd=protos_gen.REPO_ROOT,
                          capture_output=True).returncode == 0
    # A stub tree missing a file is reported stale.
    protos_gen.generate(tmp_path / "_proto")
    (tmp_path / "_proto/lsoftmax/v1/digit_service_pb2.pyi").unlink()
    assert protos_gen.differences(tmp_path / "_proto") == ["lsoftmax/v1/digit_service_pb2.pyi"]
    stale = subprocess.run([sys.executable, str(SCRIPT), "--check", "--out", str(tmp_path / "_proto")],
                           capture_output=True, text=True)
    assert stale.returncode == 1 and "digit_service_pb2.pyi" in stale.stderr


def test_the_generator_writes_into_the_serving_package():
    assert protos_gen.STUB_ROOT == protos_gen.REPO_ROOT / "serving" / "_proto"


def test_grpc_stubs_import_as_a_package():
    grpc_module = importlib.import_module("serving._proto.lsoftmax.v1.digit_service_pb2_grpc")
    source = open(grpc_module.__file__).read()
    assert "from serving._proto.lsoftmax.v1 import digit_service_pb2" in source
    assert "\nfrom lsoftmax" not in source
    assert hasattr(grpc_module, "DigitServiceStub") and hasattr(grpc_module, "add_DigitServiceServicer_to_server")


def test_rewrite_touches_only_generated_packages():
    text = "from lsoftmax.v1 import a_pb2 as x\nimport lsoftmax.v1.b_pb2\nfrom google.protobuf import descriptor\n" \
           "import lsoftmaxish\n"
    out = protos_gen._rewrite_imports(text, {"lsoftmax"})
    assert out == ("from serving._proto.lsoftmax.v1 import a_pb2 as x\nimport serving._proto.lsoftmax.v1.b_pb2\n"
                   "from google.protobuf import descriptor\nimport lsoftmaxish\n")
