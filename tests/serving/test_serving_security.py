"""TLS, mutual TLS and bearer tokens on a real server (subprocess, loopback), with a CA and certificates made
here by the `openssl` CLI: TLS clients work (our client, tritonclient, the CLI, the probe) and plaintext ones
cannot connect; mTLS refuses a client without a certificate; a missing or wrong token → UNAUTHENTICATED on
both APIs while health checks stay open; limits still hold; bad security flags stop the server at startup.
Run: .venv/bin/python -m pytest tests/serving/test_serving_security.py -q"""

from __future__ import annotations

import shutil
import ssl
import urllib.error
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving._proto.lsoftmax.v1 import digit_service_pb2 as pb
from serving._proto.lsoftmax.v1 import digit_service_pb2_grpc as pb_grpc
from serving.client import Client

tc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

if shutil.which("openssl") is None:
    pytest.skip("needs the openssl command line tool", allow_module_level=True)

MODEL = "lsoftmax_mnist_onnx"
TOKEN = "s3cr3t-t0ken-for-tests"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(tmp: Path, name: str, subject: str, extensions: str) -> None:
    """name.key + name.pem signed by ca.pem, with the given X.509 v3 extensions."""
    (tmp / f"{name}.ext").write_text(extensions)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=tmp)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=tmp)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> SimpleNamespace:
    """A throwaway CA, a server certificate for localhost/127.0.0.1, a client certificate, and a stranger CA."""
    tmp = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other_ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN=lsoftmax test {ca}",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                 cwd=tmp)
    _issue(tmp, "server", "/CN=localhost", "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
           "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _issue(tmp, "client", "/CN=lsoftmax test client", "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
           "extendedKeyUsage=clientAuth\n")
    (tmp / "token.txt").write_text(TOKEN + "\n")
    return SimpleNamespace(**{p.stem.replace(".", "_") + "_" + p.suffix[1:]: str(p) for p in tmp.iterdir()},
                           dir=tmp)


@pytest.fixture(scope="module")
def tls_server(model_repository, helpers, pki):
    """TLS + token (from a file), ONNX only, the session's small limits."""
    server = helpers.ServerProcess(model_repository, "--backend", "onnx", "--device", "cpu",
                                   "--tls-cert", pki.server_pem, "--tls-key", pki.server_key,
                                   "--auth-token-file", pki.token_txt, *helpers.SERVER_LIMITS).start()
    yield server
    assert server.stop() == 0


def _raw(images) -> list:
    return [pb.Image(pixels=x.tobytes()) for x in images]


def _tls_channel(address: str, pki, cert: bool = False) -> grpc.Channel:
    ca = Path(pki.ca_pem).read_bytes()
    key, chain = (Path(pki.client_key).read_bytes(), Path(pki.client_pem).read_bytes()) if cert else (None, None)
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key, chain))


def test_tls_with_token_serves_both_apis(tls_server, pki, digits, model_repository, helpers):
    images = digits[0][:6]
    logits, _ = helpers.reference_outputs(model_repository, "onnx", images)
    with Client(tls_server.address, tls_ca=pki.ca_pem, token=TOKEN, timeout=10) as client:
        client.wait_until_serving()
        assert [r.label for r in client.classify(images)] == logits.argmax(1).tolist()
        assert client.info()["model_name"] == MODEL
    triton = tc.InferenceServerClient(tls_server.address, ssl=True, root_certificates=pki.ca_pem)
    tensor = tc.InferInput("image", [6, 1, 28, 28], "UINT8")
    tensor.set_data_from_numpy(images.reshape(6, 1, 28, 28))
    result = triton.infer(MODEL, [tensor], headers={"authorization": f"Bearer {TOKEN}"})
    np.testing.assert_allclose(result.as_numpy("logits"), logits, atol=1e-5)
    with pytest.raises(InferenceServerException) as info:
        triton.infer(MODEL, [tensor])
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"
    triton.close()


def test_http_is_served_over_tls_with_the_same_certificate_and_token(tls_server, pki, digits):
    """One security story for both transports: HTTPS with the server's certificate, the token required for
    inference, health open; plaintext HTTP cannot talk to it."""
    import http.client
    import json
    import ssl

    port = tls_server.wait_for("listening")["http_port"]
    context = ssl.create_default_context(cafile=pki.ca_pem)

    def call(method, path, body=None, headers=None):
        connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    assert call("GET", "/v2/health/ready")[0] == 200
    body = json.dumps({"inputs": [{"name": "image", "shape": [2, 1, 28, 28], "datatype": "UINT8",
                                   "data": digits[0][:2].reshape(-1).tolist()}]}).encode()
    assert call("POST", f"/v2/models/{MODEL}/infer", body)[0] == 401
    status, answer = call("POST", f"/v2/models/{MODEL}/infer", body, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and json.loads(answer)["outputs"][0]["shape"] == [2, 10]
    plain = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        plain.request("GET", "/v2/health/ready")
        assert plain.getresponse().status != 200
    plain.close()


def test_plaintext_and_untrusted_clients_cannot_connect(tls_server, pki):
    with grpc.insecure_channel(tls_server.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            # Refused at the handshake, at once: a deadline that expired first (DEADLINE_EXCEEDED, under load) would
            # hide that, so it is generous.
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with Client(tls_server.address, tls_ca=pki.other_ca_pem, token=TOKEN, timeout=30, retries=0) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.info()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer wrong"),), (("authorization", TOKEN),),
                                      (("authorization", f"Basic {TOKEN}"),), (("x-token", TOKEN),)])
def test_missing_or_wrong_token_is_unauthenticated_but_health_stays_open(tls_server, pki, digits, metadata):
    with _tls_channel(tls_server.address, pki) as channel:
        stub = pb_grpc.DigitServiceStub(channel)
        for call, request in ((stub.Classify, pb.ClassifyRequest(images=_raw(digits[0][:1]))),
                              (stub.GetModelInfo, pb.GetModelInfoRequest())):
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=30, metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization: Bearer" in info.value.details()
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # Any capitalisation of the scheme is fine (RFC 6750 says it is case-insensitive).
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30,
                                 metadata=(("authorization", f"bearer {TOKEN}"),)).model_name == MODEL


def test_limits_hold_under_tls_and_token(tls_server, pki, digits):
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    with _tls_channel(tls_server.address, pki) as channel:
        stub = pb_grpc.DigitServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(pb.ClassifyRequest(images=_raw(np.repeat(digits[0], 3, axis=0))), timeout=10,
                          metadata=metadata)  # 96 > 64 images
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(pb.ClassifyRequest(images=[pb.Image(encoded=bytes(3 * 1024 * 1024))]), timeout=10,
                          metadata=metadata)  # > 2 MiB message
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_metrics_are_served_over_https_with_the_same_certificate_and_token(tls_server, pki, helpers, digits):
    with Client(tls_server.address, tls_ca=pki.ca_pem, token=TOKEN, timeout=10) as client:
        client.classify(digits[0][:1])
    context = ssl.create_default_context(cafile=pki.ca_pem)
    for token in (None, "wrong"):
        with pytest.raises(urllib.error.HTTPError) as info:
            helpers.scrape(tls_server, scheme="https", context=context, token=token)
        assert info.value.code == 401
    samples = helpers.scrape(tls_server, scheme="https", context=context, token=TOKEN)
    assert helpers.metric(samples, "nv_inference_request_success", model=MODEL) >= 1
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP on the TLS port
        helpers.scrape(tls_server, scheme="http", token=TOKEN)


def test_cli_and_probe_speak_tls(tls_server, pki, helpers):
    cli = [sys.executable, "-m", "serving.client", "info", "--server", tls_server.address, "--tls-ca", pki.ca_pem]
    ok = subprocess.run([*cli, "--token-file", pki.token_txt], cwd=helpers.PROJECT_ROOT, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0 and MODEL in ok.stdout, ok.stderr
    env_token = subprocess.run(cli, cwd=helpers.PROJECT_ROOT, capture_output=True, text=True, timeout=60,
                               env={**__import__("os").environ, "LSOFTMAX_AUTH_TOKEN": TOKEN})
    assert env_token.returncode == 0, env_token.stderr
    denied = subprocess.run([*cli, "--token", "nope"], cwd=helpers.PROJECT_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
    probe = [sys.executable, "-m", "serving.probe", "--address", tls_server.address, "--timeout", "20"]
    secure = subprocess.run([*probe, "--tls-ca", pki.ca_pem], cwd=helpers.PROJECT_ROOT, capture_output=True,
                            text=True, timeout=30)
    assert secure.returncode == 0 and "SERVING" in secure.stdout
    plain = subprocess.run(probe, cwd=helpers.PROJECT_ROOT, capture_output=True, text=True, timeout=30)
    assert plain.returncode == 1 and "UNAVAILABLE" in plain.stdout


def test_mutual_tls_requires_a_client_certificate(model_repository, helpers, pki, digits):
    server = helpers.ServerProcess(model_repository, "--backend", "onnx", "--device", "cpu",
                                   "--tls-cert", pki.server_pem, "--tls-key", pki.server_key,
                                   "--tls-client-ca", pki.ca_pem).start()
    try:
        with Client(server.address, tls_ca=pki.ca_pem, timeout=30, retries=0) as client:  # refused at once
            with pytest.raises(grpc.RpcError) as info:
                client.info()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with Client(server.address, tls_ca=pki.ca_pem, tls_cert=pki.client_pem, tls_key=pki.client_key,
                    timeout=10) as client:
            assert len(client.classify(digits[0][:3])) == 3
        probe = subprocess.run([sys.executable, "-m", "serving.probe", "--address", server.address, "--tls-ca",
                                pki.ca_pem, "--tls-cert", pki.client_pem, "--tls-key", pki.client_key],
                               cwd=helpers.PROJECT_ROOT, capture_output=True, text=True, timeout=30)
        assert probe.returncode == 0, probe.stdout
        assert server.wait_for("listening")["mutual_tls"] is True
        context = ssl.create_default_context(cafile=pki.ca_pem)
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):  # metrics need a certificate too
            helpers.scrape(server, scheme="https", context=context)
        context.load_cert_chain(pki.client_pem, pki.client_key)
        assert helpers.metric(helpers.scrape(server, scheme="https", context=context), "nv_inference_request_success",
                              model=MODEL) >= 1
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("flags, message", [
    (("--tls-cert", "{server_pem}"), "--tls-cert and --tls-key go together"),
    (("--tls-client-ca", "{ca_pem}"), "--tls-client-ca needs --tls-cert and --tls-key"),
    (("--tls-cert", "{ca_key}", "--tls-key", "{server_key}"), "not a certificate chain and its private key"),
    (("--tls-cert", "{client_pem}", "--tls-key", "{server_key}"), "not a certificate chain and its private key"),
    (("--tls-cert", "{server_pem}", "--tls-key", "{server_key}", "--tls-client-ca", "{token_txt}"),
     "not PEM"),
    (("--tls-cert", "{dir}/missing.pem", "--tls-key", "{server_key}"), "cannot read the TLS certificate"),
    (("--auth-token-file", "{dir}/empty.txt"), "token file is empty"),
    (("--auth-token", "a b"), "no whitespace"),
    (("--auth-token", "x", "--auth-token-file", "{token_txt}"), "not both"),
])
def test_bad_security_flags_stop_the_server_at_startup(model_repository, helpers, pki, flags, message):
    (pki.dir / "empty.txt").write_text("\n")
    args = [f.format(**vars(pki)) for f in flags]
    result = subprocess.run([sys.executable, "-m", "serving", "--model-repository", str(model_repository),
                             "--backend", "onnx", "--device", "cpu", "--port", "0", "--metrics-port", "-1",
                             "--http-port", "0", "--log-format", "text", *args],
                            cwd=helpers.PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    usage = message in ("--tls-cert and --tls-key go together", "--tls-client-ca needs --tls-cert and --tls-key",
                        "not both")  # flags that cannot work together: 2, as argparse; unusable files: 1
    assert result.returncode == (2 if usage else 1), result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
