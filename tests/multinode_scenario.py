"""Run by tests/test_multinode.py in its own process: a two-node Ray cluster on this machine
(ray.cluster_utils.Cluster), workers spread over both nodes, one node removed mid-run; the run must finish.

Prints one JSON line: the nodes the workers ran on before the loss, the final step, the result's error.
"""

import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group_table

from raytune_sd3.config import load_job
from raytune_sd3.data.prepare import prepare_data
from raytune_sd3.models.loading import resolve_pretrained
from raytune_sd3.train.__main__ import build_trainer


def main(tmp: Path) -> None:
    cfg = load_job("jobs/tiny.yaml", [
        f"output_dir={tmp / 'out'}", f"data.datasets.0.instance_data_dir={tmp / 'demo'}",
        "data.datasets.0.demo_images=16", "data.eval_samples=4", "train.max_steps=16", "train.lr_warmup_steps=1",
        "train.checkpoint_every=4", "train.eval_every=8", "train.max_failures=2", "train.placement_strategy=SPREAD",
        "validation.prompts=[]", "data.encode_actors=1",
    ])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    doomed = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    try:
        pretrained = resolve_pretrained(cfg.model.pretrained)
        manifest, _ = prepare_data(cfg, pretrained)
        trainer = build_trainer(cfg, manifest, pretrained)
        result = {}
        fit = threading.Thread(target=lambda: result.update(r=trainer.fit()), daemon=True)
        fit.start()
        metrics = Path(cfg.output_dir) / "metrics.jsonl"
        nodes_before, removed_at = set(), None
        deadline = time.time() + 400
        while time.time() < deadline and fit.is_alive():
            steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()] if metrics.exists() else []
            if steps and max(steps) >= 7:
                # The train workers' placement group, read from the GCS (the state API needs the dashboard, which
                # a busy machine may not have up yet).
                nodes_before = {node for pg in placement_group_table().values() if pg["state"] == "CREATED"
                                for node in pg["bundles_to_node_id"].values()}
                cluster.remove_node(doomed)
                removed_at = max(steps)
                break
            time.sleep(0.05)
        fit.join(timeout=500)
        r = result.get("r")
        final = [json.loads(x) for x in metrics.read_text().splitlines()]
        print(json.dumps({"nodes_before": len(nodes_before), "removed_at": removed_at,
                          "final_step": max(x["step"] for x in final),
                          "steps": sorted(x["step"] for x in final),
                          "error": None if r is None else (str(r.error) if r.error else None),
                          "finished": r is not None}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
