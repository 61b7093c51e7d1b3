"""A real S3-compatible HTTP server for tests: moto in server mode on 127.0.0.1, started as a
subprocess on a free port and stopped by its PID.

Use the `moto_s3` fixture (import it into a test module): it yields a `MotoS3` with the endpoint
URL and sets the standard AWS environment (AWS_ENDPOINT_URL, keys, region) for the test, so code
under test finds the endpoint exactly as it would find a MinIO or AWS one.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import pytest

ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key-not-real"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port() -> int:
    """A port nothing listens on (bound and released; nothing else should grab it within a test)."""
    return free_port()


@dataclass
class MotoS3:
    endpoint_url: str
    proc: subprocess.Popen

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)


def start_moto(port: int | None = None, timeout_s: float = 30.0) -> MotoS3:
    port = port or free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).read()
            return MotoS3(url, proc)
        except Exception:
            time.sleep(0.2)
    stop_moto(proc)
    raise RuntimeError(f"moto server did not answer on {url} within {timeout_s} s")


def stop_moto(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def aws_env(endpoint_url: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.fixture(scope="module")
def moto_s3():
    server = start_moto()
    mp = pytest.MonkeyPatch()
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(k, raising=False)
    for k, v in aws_env(server.endpoint_url).items():
        mp.setenv(k, v)
    try:
        yield server
    finally:
        mp.undo()
        stop_moto(server.proc)
