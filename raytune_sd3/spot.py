"""python -m raytune_sd3.spot aws|gcp: on a spot/preemptible VM, turn the cloud's reclaim notice into Ray's drain
notice, so the training workers checkpoint before the node goes (train/loop.py) and the restart is not charged to
train.max_failures.

Ray learns of a reclaim only from a drain request (GCS DrainNode with reason PREEMPTION); on KubeRay the evicted
pod's `ray start --block` sends it on SIGTERM, but nothing in Ray reads a VM's notice. The cluster-launcher files
start this beside each spot worker's raylet. It polls the instance metadata and, once the notice is there, runs
`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` for its own node with the time left, then exits.
  AWS: IMDSv2 spot/instance-action (404 until a two-minute interruption notice, then its time).
  GCP: instance/preempted (FALSE, then TRUE about 30 s before the VM stops).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime

METADATA = {"aws": "http://169.254.169.254", "gcp": "http://metadata.google.internal"}
GCP_NOTICE_S = 30  # GCP gives preemptible and spot VMs 30 s between the notice and the stop
POLL_S = {"aws": 5.0, "gcp": 1.0}  # AWS's advice for the interruption notice; GCP's is shorter


def _get(url: str, headers: dict[str, str], method: str = "GET") -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def aws_notice(base: str) -> float | None:
    """Seconds until AWS reclaims this spot instance, or None before its interruption notice."""
    status, token = _get(f"{base}/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "300"}, "PUT")
    headers = {"X-aws-ec2-metadata-token": token} if status == 200 else {}
    status, body = _get(f"{base}/latest/meta-data/spot/instance-action", headers)
    if status != 200:
        return None
    when = datetime.fromisoformat(json.loads(body)["time"].replace("Z", "+00:00")).timestamp()
    return max(0.0, when - time.time())


def gcp_notice(base: str) -> float | None:
    """Seconds until GCP stops this preemptible/spot VM, or None before it is preempted."""
    status, body = _get(f"{base}/computeMetadata/v1/instance/preempted", {"Metadata-Flavor": "Google"})
    return float(GCP_NOTICE_S) if status == 200 and body.strip().upper() == "TRUE" else None


def drain_command(seconds_left: float, cloud: str) -> list[str]:
    """`ray drain-node` for this node (its default), as a preemption with the cloud's deadline."""
    return ["ray", "drain-node", "--reason", "DRAIN_NODE_REASON_PREEMPTION",
            "--reason-message", f"{cloud} reclaims this spot instance",
            "--deadline-remaining-seconds", str(max(1, int(seconds_left)))]


def watch(cloud: str, base: str, poll_s: float) -> float:
    """Poll until the notice; returns the seconds left. Metadata errors (a restarting agent) are retried."""
    notice = aws_notice if cloud == "aws" else gcp_notice
    while True:
        try:
            left = notice(base)
        except (OSError, ValueError, KeyError):
            left = None
        if left is not None:
            return left
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("python -m raytune_sd3.spot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cloud", choices=sorted(METADATA))
    p.add_argument("--metadata-url", help="the instance metadata server (default: the cloud's)")
    args = p.parse_args(argv)
    left = watch(args.cloud, args.metadata_url or METADATA[args.cloud], POLL_S[args.cloud])
    print(f"raytune_sd3.spot: {args.cloud} reclaims this node in {left:.0f} s: draining it", flush=True)
    return subprocess.run(drain_command(left, args.cloud)).returncode


if __name__ == "__main__":
    sys.exit(main())
