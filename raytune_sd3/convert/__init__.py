"""The SimpleTuner converter, `python -m raytune_sd3.convert simpletuner CONFIG MULTIDATABACKEND -o job.yaml`
(__main__.py: the command, its flags and exit codes). Its modules, top to bottom:

simpletuner.py    the whole conversion: read, rename, drop secrets, apply the tables, validate the job
config_keys.py    config.json's keys (model, precision, flow, steps, EMA, validation, hub, tracking) and
                  SimpleTuner's defaults; optimizer.py (optimizers, schedules), adapter.py (LoRA, DoRA, LyCORIS),
                  scheduled_sampling.py (rollouts) own their slices of the table
datasets.py       a multidatabackend.json entry -> one of our data sets; backends.py (aws, huggingface, webshart)
files.py          SimpleTuner's files in every form it reads (JSON, TOML, env, the web UI's)
rules.py          the rule machinery: Scope, Rule, the rule builders, value parsers, apply_rules
report.py         the outcomes of a setting, the Conversion that lists them, the report atop the job file
"""

from raytune_sd3.convert.report import Conversion, ConvertError, render
from raytune_sd3.convert.simpletuner import convert_simpletuner

__all__ = ["Conversion", "ConvertError", "convert_simpletuner", "render"]
