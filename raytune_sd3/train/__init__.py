"""Training: the per-worker loop (loop.py), checkpoints (checkpoint.py: writing them, their completeness record, the
resume point), eval loss and images (validation.py), and what rank 0 adds to validation when asked
(validation_extras.py: clip_score.py, previews.py).

`python -m raytune_sd3.train JOB.yaml` runs __main__.py.
"""
