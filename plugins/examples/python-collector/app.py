"""An autocollect collector plugin written in Python (componentize-py).

It writes one zip of diagnostics about its own run into the output
directory, with Python's own `zipfile` over plain WASI files:

- `report.txt`: the job context, the options and the start request's
  parameters (secrets masked), for a person;
- `context.json`: the same, for a program;
- `runtime.txt`: the Python that ran it.

When the request gives an `encryption-password`, `zipfile` cannot
encrypt, so the zip is written by the host instead, through the
`archive` import (WinZip AES-256), with the same entries.

Options (all optional):

| key | meaning |
| --- | --- |
| `note` | a line of text (1 to 200 bytes) copied into the report |
| `fail-with` | a non-zero status code: fail as a wrapped tool would |

Build: see README.md (`componentize-py ... componentize app`).
"""

import json
import os
import sys
import time
import zipfile

import wit_world
from componentize_py_types import Err
from wit_world.exports import collect
from wit_world.imports import archive, budget, inputs, log, progress, task, types

KNOWN_OPTIONS = ("note", "fail-with")
# Start parameters that are secrets: never logged, masked in the report.
SECRET_PARAMETERS = ("log-redaction-salt", "encryption-password")


def invalid(key, message):
    return Err(types.PluginError_InvalidOption(types.OptionError(key=key, message=message)))


def internal(message):
    return Err(types.PluginError_Internal(message))


def parse_options(options):
    """Check every option; reject unknown keys so typos surface at start."""
    settings = {"note": None, "fail-with": None}
    for key, value in options:
        if key == "note":
            if not value or len(value.encode()) > 200 or "\n" in value:
                raise invalid(key, "must be 1 to 200 bytes on one line")
            settings["note"] = value
        elif key == "fail-with":
            try:
                code = int(value.strip())
            except ValueError:
                code = 0
            if code == 0 or not -(2**31) <= code < 2**31:
                raise invalid(key, f"must be a non-zero 32-bit integer, got {value!r}")
            settings["fail-with"] = code
        else:
            raise invalid(key, f"unknown option (known: {', '.join(KNOWN_OPTIONS)})")
    return settings


def zip_name(node, now, redacted):
    """`collectinfo-YYYY-MM-DDTHHMMSS-NODE.zip` in UTC, as cbcollect_info names it."""
    stamp = time.strftime("%Y-%m-%dT%H%M%S", time.gmtime(now))
    suffix = "-redacted" if redacted else ""
    return f"collectinfo-{stamp}-{node.replace(':', '-')}{suffix}.zip"


class Collect(wit_world.exports.Collect):
    def validate_options(self, options):
        parse_options(options)

    def collect(self, request):
        settings = parse_options(request.options)
        ctx = request.context
        log.log(log.Level.INFO, f"python collector: task {ctx.task_id} on node {ctx.node}")

        if settings["fail-with"] is not None:
            code = settings["fail-with"]
            raise Err(
                types.PluginError_Failed(
                    types.Failure(
                        status_code=code,
                        output=f"python collector: failing with status {code} as configured\n",
                    )
                )
            )

        # The start request's parameters: reading them tells the host this
        # collector saw what the request asked for (redaction, encryption).
        parameters = task.parameters()
        params = dict(parameters)
        redacted = params.get("log-redaction-level") == "partial"
        password = params.get("encryption-password")
        limits = budget.limits()
        now = time.time()

        context = {
            "language": "python",
            "runtime": sys.version.split()[0],
            "task_id": ctx.task_id,
            "node": ctx.node,
            "output_dir": request.output_dir,
            "options": [[k, v] for k, v in request.options],
            "parameters": [
                [k, "***" if k in SECRET_PARAMETERS else v] for k, v in parameters
            ],
            "grants": [[g.name, g.guest_path] for g in inputs.grants()],
            "limits": {
                "deadline_ms": limits.deadline_ms,
                "max_bytes": limits.max_bytes,
                "max_files": limits.max_files,
            },
            "note": settings["note"],
            "collected_unix": int(now),
        }
        report = [
            "autocollect python collector",
            f"task: {ctx.task_id}",
            f"node: {ctx.node}",
            f"output dir: {request.output_dir}",
            f"note: {settings['note'] or '-'}",
            "options:",
            *[f"  {k} = {v}" for k, v in context["options"]],
            "parameters:",
            *[f"  {k} = {v}" for k, v in context["parameters"]],
            f"deadline in: {limits.deadline_ms} ms",
            "",
        ]
        entries = [
            ("report.txt", "\n".join(report).encode()),
            ("context.json", (json.dumps(context, indent=2) + "\n").encode()),
            ("runtime.txt", f"{sys.version}\n{sys.platform}\n".encode()),
        ]

        name = zip_name(ctx.node, now, redacted)
        if password is not None:
            artifact = host_zip(name, entries, password, int(now))
        else:
            artifact = plain_zip(request.output_dir, name, entries, now)

        summary = f"wrote {artifact.name} ({artifact.size} bytes, {len(entries)} entries)"
        log.log(log.Level.INFO, f"python collector: {summary}")
        return collect.CollectOutcome(artifacts=[artifact], summary=summary)


def plain_zip(output_dir, name, entries, now):
    """Write the zip with `zipfile` under a temporary name, then rename it:
    the host may stop the run at any instruction."""
    path = os.path.join(output_dir, name)
    partial = os.path.join(output_dir, f".{name}.partial")
    stamp = time.gmtime(now)[:6]
    try:
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for done, (entry, data) in enumerate(entries, start=1):
                info = zipfile.ZipInfo(entry, date_time=stamp)
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, data)
                log.log(log.Level.DEBUG, f"python collector: added {entry} ({len(data)} bytes)")
                progress.report(done, len(entries), f"added {entry}")
        os.rename(partial, path)
        size = os.stat(path).st_size
    except OSError as e:
        raise internal(f"writing {name}: {e}")
    return types.Artifact(name=name, size=size)


def host_zip(name, entries, password, mtime):
    """Have the host write the zip, AES-256 encrypted with `password`."""
    options = archive.ArchiveOptions(
        compression=archive.Compression_Deflate(6),
        password=password,
        max_entry_bytes=None,
    )
    try:
        zf = archive.Archive.create(name, options)
        for done, (entry, data) in enumerate(entries, start=1):
            zf.add_bytes(entry, data, mtime)
            progress.report(done, len(entries), f"added {entry}")
        return zf.finish()
    except Err as e:
        reason = getattr(e.value, "value", e.value)
        raise internal(f"writing {name} with the host's archive: {reason}")
