"""The driver: what runs where the command was typed (or where `ray job submit` starts it).

A Ray program runs in two rooms. The driver parses and checks the job, joins or starts Ray, fits the job to the
cluster, fills the cache with Ray Data, builds the TorchTrainer or the Tune study, shows progress and collects the
results. The workers (raytune_sd3/train/: the per-GPU loop and what it uses) import nothing from here.

    cli.py        what every command shares: arguments, reading the job, connecting, how a failure is shown
    console.py    Ray's output to output_dir/ray.log, a progress bar per stage
    preflight.py  paths, files and credentials the job needs, checked before Ray starts
    runtime.py    join RAY_ADDRESS or start a local Ray
    placement.py  the job against the cluster: `auto` settings, workers that can never be placed, waiting
    resume.py     a rerun continues its run, and only with the settings it had
    training.py   the TorchTrainer of a job, the whole training command
    curves.py     output_dir/curves.png: the loss curve and, beside it, the validation CLIP score
    backend.py    Ray Train's torch process group (NCCL where the workers can use it, else gloo)
    faults.py     a retry that fails as the last one did is a bug: stop instead of retrying
"""
