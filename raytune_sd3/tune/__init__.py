"""Ray Tune stability search: which learning rates, clipping norms and shifts train without diverging.

config.py (the `tune:` section), study.py (search space -> Tune, the trial function, run/resume), run.py (the
study from the job: cluster fit, cache once, trials, report), report.py (trials.csv/.md, eval-loss curves,
stability map, best.yaml). `python -m raytune_sd3.tune JOB.yaml` runs
__main__.py. Importing this package imports no Ray: `load_job` validates `tune:` through config/schema.py.
"""
