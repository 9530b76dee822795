"""python -m raytune_sd3.convert simpletuner CONFIG MULTIDATABACKEND -o job.yaml [--lossy] [--force]

Turns a SimpleTuner SD3 setup (its config in any form SimpleTuner reads: config.json with or without `--` keys,
config.toml, config.env, the web UI's `_metadata` files; and the data sets it trains on) into our job YAML that
trains what SimpleTuner would have trained. A setting the config leaves out takes SimpleTuner's default (listed as
"default"). Every setting ends in one place: converted; "not converted" (validation or tracking we cannot express:
ours is used); "ignored" (meaningless here, e.g. SimpleTuner's cache folders); "dropped secret" (never copied); or
refused: a setting that changes what is trained (model type, adapter, EMA, loss, data) and has no equivalent here
stops the conversion unless --lossy is given (then it is listed as "lost"); ControlNet, TwinFlow, distillation and
data we cannot read are refused always. The lists are printed and written as comments atop the job, which is
validated like any job before it is written (atomically).

Exit status: 0 written (read the lists), 2 nothing written: an input is unreadable, not SimpleTuner's, refused, or
does not make a valid job.
"""

from __future__ import annotations

import sys
from pathlib import Path

from raytune_sd3 import atomic
from raytune_sd3.convert.report import ConvertError, render
from raytune_sd3.convert.simpletuner import convert_simpletuner
from raytune_sd3.driver.cli import command_parser


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("python -m raytune_sd3.convert", __doc__)
    sources = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    st = sources.add_parser("simpletuner", help="SimpleTuner's config + multidatabackend.json")
    st.add_argument("config", type=Path, metavar="CONFIG", help="SimpleTuner's config.json (keys with or without a "
                    "leading --), config.toml, config.env, or a config saved by its web UI")
    st.add_argument("backends", type=Path, metavar="MULTIDATABACKEND", help="SimpleTuner's data sets (JSON, or its "
                    "web UI's saved form)")
    st.add_argument("--lossy", action="store_true", help="convert even when a setting that changes what is trained "
                    "has no equivalent here (listed as lost); ControlNet, TwinFlow and unreadable data still refuse")
    st.add_argument("-o", "--output", type=Path, required=True, help="the job YAML to write, e.g. jobs/mine.yaml")
    st.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    args = parser.parse_args(argv)
    try:
        conv = convert_simpletuner(args.config, args.backends, lossy=args.lossy)
        if args.output.exists() and not args.force:
            raise ConvertError(f"{args.output}: exists; pass --force to overwrite it")
        atomic.write_text(args.output, render(conv, [args.config, args.backends]))
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {args.output}: cannot write it ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {conv.converted} settings converted ({len(conv.defaults)} of them SimpleTuner's "
          f"defaults), {len(conv.lost)} lost, {len(conv.not_converted)} not converted, {len(conv.ignored)} ignored, "
          f"{len(conv.secrets)} secrets dropped")
    for line in conv.report():
        print(f"  {line}")
    print(f"next: python -m raytune_sd3.check {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
