"""Stand-in models built offline, for tests, CI, the demo and GPU benchmarks: the tiny SD3 / SD3.5 pipelines
(tiny.py), the tiny CLIP and TAESD of validation (tiny_validation.py), real-size SD3.5 pipelines with random
weights (shaped.py), and resolve.py, which turns a tiny model's name into its built folder. They build on
models/; models/ knows only where they are built (models/loading.py: tiny_pipeline_dir), never how.
"""
