"""Training: the per-worker loop (loop.py), checkpoints (state.py), eval loss and images (validation.py).

`python -m raytune_sd3.train JOB.yaml` runs __main__.py.
"""
