"""What became of each SimpleTuner setting: the outcomes a rule raises (not converted, refused, never, ignored),
the Conversion that collects them, the refusal that stops a conversion, and the report as YAML comments atop the
job file. ConvertError is every input that cannot be converted; its message names the file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytune_sd3.config import JobConfig, dump_job


class ConvertError(ValueError):
    """An input that cannot be converted; the message names the file."""


class NotConverted(Exception):
    """A setting we cannot express; the message says why."""


class Refused(NotConverted):
    """A setting that changes what is trained and cannot be expressed: the conversion stops unless --lossy."""


class Never(Exception):
    """Something we do not train (ControlNet, TwinFlow, data we cannot read): the conversion always stops."""


class Ignored(Exception):
    """A setting that means nothing here; the message says why."""


@dataclass
class Conversion:
    """The converted job (a dict that validates as JobConfig) and what became of every other setting."""

    job: dict[str, Any] = field(default_factory=dict)
    converted: int = 0
    not_converted: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    defaults: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # refused settings converted anyway (--lossy)
    refused: list[str] = field(default_factory=list)  # "FILE: setting (why)"
    never: list[str] = field(default_factory=list)

    def report(self) -> list[str]:
        return ([f"lost: {x}" for x in self.lost] + [f"not converted: {x}" for x in self.not_converted]
                + [f"default: {x}" for x in self.defaults] + [f"ignored: {x}" for x in self.ignored]
                + [f"dropped secret: {x}" for x in self.secrets] + [f"note: {x}" for x in self.notes])


def stop_if_refused(conv: Conversion, lossy: bool) -> None:
    """Never-converted things stop the conversion; refused settings too unless --lossy (then they are lost)."""
    if conv.never or (conv.refused and not lossy):
        lines = conv.never + ([] if lossy else conv.refused)
        hint = ("\nThese change what is trained. To convert without them (listed as lost in the job), pass --lossy."
                if conv.refused and not lossy else "")
        raise ConvertError("refused, nothing written:\n" + "\n".join(f"  {x}" for x in lines) + hint)
    conv.lost = list(conv.refused)


def render(conv: Conversion, sources: list[Path]) -> str:
    """The job file: the report as YAML comments, then the validated job (every default filled in)."""
    head = [f"Converted from SimpleTuner ({' + '.join(map(str, sources))}) by python -m raytune_sd3.convert.",
            f"{conv.converted} settings converted. A setting not converted keeps raytune_sd3's default (in the job "
            "below).", "Read the lines below, then run: python -m raytune_sd3.check THIS_FILE", ""]
    comments = "".join(f"# {line}".rstrip() + "\n" for line in head + conv.report())
    return comments + "\n" + dump_job(JobConfig.model_validate(conv.job))
