"""python -m raytune_sd3.spot: a VM's reclaim notice, read from a metadata server that answers as AWS's IMDSv2 and
GCP's do, becomes `ray drain-node` for this node with the time left (a recording `ray` stands in for Ray's CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from raytune_sd3.spot import aws_notice, drain_command, gcp_notice

ROOT = Path(__file__).resolve().parents[1]


class Metadata(BaseHTTPRequestHandler):
    """AWS: a token by PUT, then 404 on spot/instance-action until `notice_after` requests; GCP: FALSE, then TRUE."""

    state = {"polls": 0, "notice_after": 3, "reclaim_in": 90.0}

    def log_message(self, *args):  # quiet
        pass

    def _send(self, code: int, body: str = "") -> None:
        self.send_response(code)
        self.end_headers()
        self.wfile.write(body.encode())

    def do_PUT(self):
        ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
        self._send(200 if ok else 400, "tok" if ok else "")

    def do_GET(self):
        s = self.state
        if self.path == "/latest/meta-data/spot/instance-action":
            if self.headers.get("X-aws-ec2-metadata-token") != "tok":
                return self._send(401)
            s["polls"] += 1
            if s["polls"] < s["notice_after"]:
                return self._send(404)
            when = datetime.fromtimestamp(time.time() + s["reclaim_in"], timezone.utc)
            return self._send(200, json.dumps({"action": "terminate", "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}))
        if self.path == "/computeMetadata/v1/instance/preempted":
            if self.headers.get("Metadata-Flavor") != "Google":
                return self._send(403)
            s["polls"] += 1
            return self._send(200, "TRUE" if s["polls"] >= s["notice_after"] else "FALSE")
        self._send(404)


@pytest.fixture
def metadata():
    Metadata.state.update(polls=0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_notices(metadata):
    assert aws_notice(metadata) is None and aws_notice(metadata) is None
    assert aws_notice(metadata) == pytest.approx(90, abs=2)  # seconds until the notice's time
    Metadata.state.update(polls=0)
    assert gcp_notice(metadata) is None and gcp_notice(metadata) is None
    assert gcp_notice(metadata) == 30


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_the_notice_drains_this_node_with_the_time_left(cloud, metadata, tmp_path):
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "ray"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run([sys.executable, "-c", "import sys, raytune_sd3.spot as s; s.POLL_S = {'aws': 0.05, 'gcp': "
                        "0.05}; sys.exit(s.main(sys.argv[1:]))", cloud, "--metadata-url", metadata],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert Metadata.state["polls"] == 3  # it waited for the notice, and stopped there
    args = calls.read_text().split()
    left = int(args[args.index("--deadline-remaining-seconds") + 1])
    assert 85 <= left <= 90 if cloud == "aws" else left == 30
    assert args[:4] == ["drain-node", "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message"]
    assert "--node-id" not in args  # its own node: the command runs on the spot VM
    assert drain_command(0.2, cloud)[-1] == "1"  # never "no deadline"
