"""The S3 client's endpoint pinning, against real servers on loopback: moto's S3 on
127.0.0.2 and plain (and TLS) listeners on other loopback addresses.

``localhost`` resolves to 127.0.0.1 here; a listener there at moto's port plays the
answer a DNS rebinding would give after the check. The answer at check time comes
from a stand-in for ``socket.getaddrinfo`` passed to ``S3Access.pinned``: nothing
else can make a name resolve differently without changing the machine's resolver.
"""

from __future__ import annotations

import dataclasses
import datetime
import http.server
import os
import socket
import ssl
import threading
from pathlib import Path
from typing import Iterator, Optional

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import SSLError

from musetalk_worker.errors import ErrorCode, LipSyncError
from musetalk_worker.fetch import fetch_input, parse_input
from musetalk_worker.options import WorkerSettings
from musetalk_worker.s3 import S3Access, s3_client
from musetalk_worker.schema import OutputSpec, S3Credentials
from musetalk_worker.upload import deliver, plan_delivery, upload_video
from servers import MOTO_KEY_ID, MOTO_SECRET

MIB = 1024 * 1024
PAYLOAD = os.urandom(50_000)
PRIVATE_OK = WorkerSettings(allow_private_urls=True)


class Listener:
    """An HTTP(S) server on one loopback address that answers 200 to every request and
    records what reached it: connections, Host headers and TLS server names (SNI)."""

    def __init__(self, address: str, port: int = 0, tls: Optional[ssl.SSLContext] = None) -> None:
        self.connections = 0
        self.hosts: list[str] = []
        self.server_names: list[str] = []
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                listener.connections += 1
                super().setup()

            def answer(self) -> None:
                listener.hosts.append(self.headers["Host"])
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = do_PUT = answer  # noqa: N815 - http.server's naming

            def log_message(self, *args) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer((address, port), Handler)
        self._httpd.daemon_threads = True
        if tls is not None:
            tls.sni_callback = lambda sock, name, context: self.server_names.append(name)
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@dataclasses.dataclass
class Rebound:
    """moto's S3 on 127.0.0.2 and a decoy on 127.0.0.1 at the same port, so that
    ``http://localhost:<port>`` reaches moto only through a pinned connection."""

    port: int
    decoy: Listener

    @property
    def endpoint(self) -> str:
        return f"http://localhost:{self.port}"

    def moto(self):
        """A client straight to moto's address."""
        return boto3.client("s3", endpoint_url=f"http://127.0.0.2:{self.port}", region_name="us-east-1",
                            aws_access_key_id=MOTO_KEY_ID, aws_secret_access_key=MOTO_SECRET)


@pytest.fixture(scope="module")
def rebound() -> Iterator[Rebound]:
    server_module = pytest.importorskip("moto.server", reason="moto[server] is in requirements/test.txt")
    moto = server_module.ThreadedMotoServer(ip_address="127.0.0.2", port=0, verbose=False)
    moto.start()
    port = moto.get_host_and_port()[1]
    decoy = Listener("127.0.0.1", port)
    yield Rebound(port, decoy)
    decoy.close()
    moto.stop()


def answers(*addresses: str):
    """A stand-in for ``socket.getaddrinfo`` that resolves every name to ``addresses``."""
    def resolve(host, port, *args, **kwargs):
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in addresses]
    return resolve


def _credentials(endpoint: str) -> S3Credentials:
    return S3Credentials(endpoint_url=endpoint, access_key_id=MOTO_KEY_ID, secret_access_key=MOTO_SECRET,
                         region="us-east-1")


def _job_access(endpoint: str, settings: WorkerSettings = PRIVATE_OK) -> S3Access:
    return S3Access.for_job(_credentials(endpoint), settings)


def _refused(call) -> LipSyncError:
    with pytest.raises(LipSyncError) as info:
        call()
    assert info.value.code is ErrorCode.INVALID_INPUT, info.value.message
    return info.value


# ----------------------------------------------------------------------------- the check

def test_a_job_endpoint_named_on_loopback_is_refused_without_the_setting(rebound, tmp_path):
    refused = WorkerSettings()
    access = _job_access(rebound.endpoint, refused)
    rebound.decoy.connections = 0

    error = _refused(lambda: access.pinned(refused))
    assert error.message.startswith(f"refusing to fetch 'output.credentials.endpoint_url' from {rebound.endpoint}: "
                                    "the host resolves to ")
    assert "a private, loopback, link-local or metadata address" in error.message
    assert "MUSETALK_ALLOW_PRIVATE_URLS=true" in error.message
    # The same refusal at either end of a job, each reported at its own stage.
    error = _refused(lambda: fetch_input(parse_input("audio", "s3://inputs/a.wav", refused), tmp_path, refused,
                                         access))
    assert "'output.credentials.endpoint_url'" in error.message and error.stage == "download"
    video = tmp_path / "result.mp4"
    video.write_bytes(PAYLOAD)
    plan = plan_delivery(OutputSpec(bucket="results", credentials=_credentials(rebound.endpoint)), refused, "j")
    error = _refused(lambda: deliver(video, plan, refused))
    assert "'output.credentials.endpoint_url'" in error.message and error.stage == "upload"
    assert rebound.decoy.connections == 0, "a refused endpoint must never be contacted"


def test_every_answer_is_checked_and_one_is_pinned():
    # pinned() only resolves and opens no connection, so these public addresses are never dialled.
    error = _refused(lambda: _job_access("https://s3.example.com").pinned(WorkerSettings(),
                                                                         answers("1.1.1.1", "127.0.0.1")))
    assert "resolves to 127.0.0.1" in error.message
    pinned = _job_access("https://s3.example.com").pinned(WorkerSettings(), answers("2606:4700::1111", "1.1.1.1"))
    assert pinned.pinned_address == "1.1.1.1", "IPv4 first: pods often have no IPv6 route"
    assert _job_access("https://s3.example.com").pinned(WorkerSettings(), answers("2606:4700::1111")) \
        .pinned_address == "2606:4700::1111"
    assert pinned.pinned(WorkerSettings(), answers("127.0.0.1")) is pinned, "an access is resolved once"


def test_only_job_endpoints_are_pinned():
    worker = WorkerSettings(bucket_endpoint_url="http://127.0.0.1:9000", bucket_access_key_id=MOTO_KEY_ID,
                            bucket_secret_access_key=MOTO_SECRET)
    own = S3Access.for_job(None, worker)
    # The worker's own endpoint is its operator's configuration: no check, no pinning.
    assert own.pinned(WorkerSettings(), answers("127.0.0.1")) is own
    aws = S3Access.for_job(S3Credentials(access_key_id=MOTO_KEY_ID, secret_access_key=MOTO_SECRET), worker)
    assert aws.endpoint_url is None and aws.pinned(WorkerSettings(), answers("127.0.0.1")) is aws


@pytest.mark.parametrize("endpoint", ["ftp://s3.example.com", "https:///bucket", "https://s3.example.com:99999"])
def test_a_job_endpoint_must_be_an_http_url(endpoint):
    error = _refused(lambda: _job_access(endpoint).pinned(PRIVATE_OK, answers("127.0.0.1")))
    assert error.message == "'output.credentials.endpoint_url' must be an http:// or https:// URL."
    assert error.stage == "validate"


# ----------------------------------------------------------------------------- the pinning

def test_a_job_endpoint_by_name_is_used_at_the_address_checked(rebound, tmp_path):
    moto = rebound.moto()
    moto.create_bucket(Bucket="inputs")
    moto.create_bucket(Bucket="results")
    moto.put_object(Bucket="inputs", Key="a.wav", Body=PAYLOAD)
    # A client that resolves the name itself lands on the decoy: this is the answer a rebinding gives.
    rebound.decoy.connections = 0
    boto3.client("s3", endpoint_url=rebound.endpoint, region_name="us-east-1", aws_access_key_id=MOTO_KEY_ID,
                 aws_secret_access_key=MOTO_SECRET).head_bucket(Bucket="inputs")
    assert rebound.decoy.connections > 0
    rebound.decoy.connections = 0

    access = _job_access(rebound.endpoint).pinned(PRIVATE_OK, answers("127.0.0.2"))
    assert access.pinned_address == "127.0.0.2"
    fetched = fetch_input(parse_input("audio", "s3://inputs/a.wav", PRIVATE_OK), tmp_path, PRIVATE_OK, access)
    assert fetched.read_bytes() == PAYLOAD
    video = tmp_path / "result.mp4"
    video.write_bytes(os.urandom(6 * MIB))
    plan = plan_delivery(OutputSpec(bucket="results", key="clips/j.mp4", credentials=_credentials(rebound.endpoint)),
                         PRIVATE_OK, "j")
    # Two 5 MiB-minimum parts uploaded by s3transfer's threads, through the same pinned pools.
    out = upload_video(video, dataclasses.replace(plan, access=access), PRIVATE_OK,
                       TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB))
    assert out["video_url"].startswith(f"{rebound.endpoint}/results/clips/j.mp4?"), "presigned for the name"
    stored = moto.get_object(Bucket="results", Key="clips/j.mp4")
    assert stored["ETag"].strip('"').endswith("-2") and stored["Body"].read() == video.read_bytes()
    assert rebound.decoy.connections == 0, "every connection must go to the address checked"


def test_the_signed_host_is_sent_to_the_pinned_address():
    listener = Listener("127.0.0.3")
    try:
        access = _job_access(f"http://localhost:{listener.port}").pinned(PRIVATE_OK, answers("127.0.0.3"))
        s3_client(access, PRIVATE_OK).head_bucket(Bucket="results")
        # The Host header is the one SigV4 signed (the endpoint's name), not the address dialled.
        assert listener.hosts == [f"localhost:{listener.port}"] and listener.connections == 1
    finally:
        listener.close()


def _tls_files(folder: Path) -> tuple[Path, dict[str, ssl.SSLContext]]:
    """A CA file, and server contexts with certificates it signed for ``localhost`` and ``other.example``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "musetalk test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    ca_file = folder / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    contexts = {}
    for name in ("localhost", "other.example"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        chain = folder / f"{name}.pem"
        chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        contexts[name] = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        contexts[name].load_cert_chain(chain)
    return ca_file, contexts


def test_tls_checks_the_endpoint_name_on_the_pinned_connection(tmp_path, monkeypatch):
    pytest.importorskip("cryptography", reason="installed with moto")
    ca_file, contexts = _tls_files(tmp_path)
    # The trust store an operator sets for botocore applies to the pinned connections too.
    monkeypatch.setenv("AWS_CA_BUNDLE", str(ca_file))
    right = Listener("127.0.0.3", tls=contexts["localhost"])
    wrong = Listener("127.0.0.4", tls=contexts["other.example"])
    try:
        access = _job_access(f"https://localhost:{right.port}").pinned(PRIVATE_OK, answers("127.0.0.3"))
        s3_client(access, PRIVATE_OK).head_bucket(Bucket="results")
        # The certificate names localhost, not 127.0.0.3: it passes only because the name is checked.
        assert right.server_names == ["localhost"] and right.hosts == [f"localhost:{right.port}"]

        access = _job_access(f"https://localhost:{wrong.port}").pinned(PRIVATE_OK, answers("127.0.0.4"))
        with pytest.raises(SSLError, match="localhost"):
            s3_client(access, PRIVATE_OK).head_bucket(Bucket="results")
        assert wrong.server_names and set(wrong.server_names) == {"localhost"} and wrong.hosts == []
    finally:
        right.close()
        wrong.close()
