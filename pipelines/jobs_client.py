"""A cluster's Ray Jobs API: ``vistr jobs list|status|logs|stop``, and the client ``vistr submit`` uses.

Address: ``--address`` (the head's dashboard, ``http://HEAD:8265``), else what Ray itself reads
(``$RAY_API_SERVER_ADDRESS``, or the dashboard registered for the cluster in ``$RAY_ADDRESS``),
else ``http://127.0.0.1:8265`` (``ray dashboard`` / ``kubectl port-forward`` put it there). Ray's
``JobSubmissionClient`` lets ``$RAY_ADDRESS`` override an explicit address; here ``--address`` wins,
so the cluster a command talks to is the one it names.

Authentication is Ray's own: with ``RAY_AUTH_MODE=token`` in the environment the client sends the
token from ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def add_address_argument(parser: argparse.ArgumentParser, **kwargs: Any) -> None:
    parser.add_argument(
        "--address",
        help="the cluster's Jobs API (its dashboard), e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, "
        f"else the dashboard of the cluster in $RAY_ADDRESS, else {DEFAULT_ADDRESS}); with token "
        "authentication export RAY_AUTH_MODE=token (token from $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)",
        **kwargs,
    )


@contextmanager
def _environ_without(names: Sequence[str]) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def job_client(address: str | None) -> Any:
    """A ``JobSubmissionClient`` for ``address`` (see the module docstring for the defaults)."""
    from ray.job_submission import JobSubmissionClient

    if address is None and not any(os.environ.get(name) for name in ADDRESS_ENV):
        address = DEFAULT_ADDRESS
    if address is None:
        return JobSubmissionClient()  # Ray resolves the environment (a GCS address is looked up)
    with _environ_without(ADDRESS_ENV):
        return JobSubmissionClient(address)


def client_errors() -> tuple[type[BaseException], ...]:
    """What the Jobs API raises for an unreachable head, a refused token or an unknown job."""
    from ray.exceptions import RayError

    return ConnectionError, RuntimeError, RayError


def follow_logs(client: Any, job_id: str) -> None:
    """Print the job's log to stdout as it grows, until the job ends."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())


def wait_for_end(client: Any, job_id: str, poll_s: float = 1.0) -> Any:
    """The job's ``JobDetails`` once it has SUCCEEDED, FAILED or been STOPPED."""
    while True:
        info = client.get_job_info(job_id)
        if str(info.status) in TERMINAL:
            return info
        time.sleep(poll_s)


def report_end(info: Any, logs_shown: bool) -> int:
    """Print how the job ended (stderr) and return the exit status: 0 only if it SUCCEEDED.

    Ray's message for a failed entrypoint repeats the log's tail: after a streamed log, the
    entrypoint's exit code says it. Other failures (runtime env setup, a stop) print Ray's message.
    """
    status, message = str(info.status), (info.message or "").strip()
    if status == "SUCCEEDED":
        print(f"job {info.submission_id} SUCCEEDED", file=sys.stderr)
        return 0
    if logs_shown and info.driver_exit_code is not None:
        message = f"the entrypoint exited with code {info.driver_exit_code} (its log is above)"
    print(f"job {info.submission_id} {status}: {message}", file=sys.stderr)
    return 1


def follow_to_end(client: Any, job_id: str) -> int:
    """Stream the log, then report the end; Ctrl-C stops following, not the job."""
    try:
        follow_logs(client, job_id)
        return report_end(wait_for_end(client, job_id), logs_shown=True)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (`vistr jobs stop {job_id}` stops it)",
              file=sys.stderr)  # fmt: skip
        return 130


def _format_time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def list_jobs(client: Any) -> list[str]:
    """One line per submitted job, oldest first: id, status, start time, stage, entrypoint."""
    jobs = [j for j in client.list_jobs() if j.submission_id]  # drivers started by hand have none
    jobs.sort(key=lambda j: j.start_time or 0)
    return [
        f"{j.submission_id:<28} {str(j.status):<9} {_format_time(j.start_time)}  "
        f"{(j.metadata or {}).get('vistr_stage', '-'):<10} {j.entrypoint}"
        for j in jobs
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    add_address_argument(common)
    actions.add_parser("list", parents=[common], help="submitted jobs: id, status, start, stage, entrypoint")
    for name, help_text in (
        ("status", "status of a job, and why it failed or stopped"),
        ("logs", "a job's log (--follow: until it ends)"),
        ("stop", "stop a running job"),
    ):
        sub = actions.add_parser(name, parents=[common], help=help_text, description=help_text)
        sub.add_argument("job_id", metavar="ID", help="submission id, as `vistr submit` printed it")
        if name == "logs":
            sub.add_argument("--follow", action="store_true", help="stream the log until the job ends")


def run(args: argparse.Namespace) -> int:
    try:
        client = job_client(args.address)
        if args.action == "list":
            print("\n".join(list_jobs(client)) or "no submitted jobs")
        elif args.action == "status":
            info = client.get_job_info(args.job_id)
            message = f"\n{info.message.strip()}" if info.message and str(info.status) != "SUCCEEDED" else ""
            print(f"{args.job_id} {info.status}{message}")
        elif args.action == "logs":
            if args.follow:
                return follow_to_end(client, args.job_id)
            sys.stdout.write(client.get_job_logs(args.job_id))
        elif client.stop_job(args.job_id):
            print(f"stop requested for {args.job_id}")
        else:
            print(f"{args.job_id} had already ended ({client.get_job_status(args.job_id)})")
    except client_errors() as exc:
        print(f"vistr jobs {args.action}: error: {exc}", file=sys.stderr)
        return 1
    return 0
