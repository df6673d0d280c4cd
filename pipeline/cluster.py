"""Cluster jobs: a job spec submitted to a Ray cluster through Ray's Job Submission SDK, then
followed, listed and stopped.

What travels: the project (its source checkout as the working directory, or a pinned pip
requirement), the checked spec (as JSON in one environment variable), and the object store's
endpoint and region. What never travels: credentials. Ray's dashboard and job API show a job's
runtime environment to anyone who can read them, so keys come from where the cluster already has
them (instance roles, Kubernetes secrets, the nodes' environment or credentials file). The
cluster's authentication token is sent as a request header, found the way Ray finds it, and never
printed.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TextIO

from pipeline import __version__
from pipeline.config import ConfigError
from pipeline.spec import JobSpec, is_secret_name

SPEC_ENV = "LATENTCACHE_SPEC"
# The entry point a cluster runs: the spec comes from SPEC_ENV, the driver joins the cluster it is on.
ENTRYPOINT = f"python -m pipeline.cli run --spec-env {SPEC_ENV} --address auto --no-progress"
# Not secrets: where the object store is. Forwarded from this shell when set.
TRAVELLING_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
# What a checkout holds that a cluster does not need (Ray refuses a working dir over 500 MiB).
WORKING_DIR_EXCLUDES = [".git", ".venv", "*.egg-info", "__pycache__", ".pytest_cache", "latentcache-demo",
                        "bench/results", "tests"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class ClusterError(RuntimeError):
    """The cluster cannot be reached, refused this client, or does not know the job."""


@dataclass(frozen=True)
class Token:
    """A Ray authentication token and where it was found; its value never appears in a repr."""

    value: str = field(repr=False)
    source: str


def find_token(environ: Mapping[str, str] | None = None, home: Path | None = None) -> Token | None:
    """The token the way Ray looks for it: RAY_AUTH_TOKEN, then the file RAY_AUTH_TOKEN_PATH names,
    then ~/.ray/auth_token. A path that is set but unreadable is an error, not a silent fallback."""
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return Token(env["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    named = env.get("RAY_AUTH_TOKEN_PATH")
    if named:
        try:
            value = Path(named).expanduser().read_text().strip()
        except OSError as e:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={named}: cannot read the token file ({e.strerror})") from None
        if not value:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={named}: the token file is empty")
        return Token(value, f"RAY_AUTH_TOKEN_PATH ({named})")
    default = (home or Path.home()) / ".ray" / "auth_token"
    try:
        value = default.read_text().strip()
    except OSError:
        return None
    return Token(value, str(default)) if value else None


def dashboard_address(address: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The job API's http(s) address from `--address` or RAY_ADDRESS."""
    env = os.environ if environ is None else environ
    given = address or env.get("RAY_ADDRESS")
    if not given:
        raise ClusterError("no cluster address: give --address http://HEAD:8265 (the Ray dashboard) or set RAY_ADDRESS")
    if given in ("auto", "local") or given.startswith("ray://"):
        raise ClusterError(f"--address {given}: jobs are submitted to the Ray dashboard's address, e.g. "
                           "http://HEAD:8265, not to a Ray client or GCS address")
    if "://" not in given:
        given = f"http://{given}"
    if not given.startswith(("http://", "https://")):
        raise ClusterError(f"--address {given}: expected http://HEAD:8265 or https://...")
    return given.rstrip("/")


def connect(address: str | None = None, *, environ: Mapping[str, str] | None = None,
            home: Path | None = None) -> Any:
    """A JobSubmissionClient for the cluster, with the authentication token when one is found."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = dashboard_address(address, environ)
    token = find_token(environ, home)
    headers = {"Authorization": f"Bearer {token.value}"} if token else {}
    try:
        return JobSubmissionClient(url, headers=headers)
    except AuthenticationError as e:
        raise _auth_error(url, token, e) from None
    except ConnectionError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClusterError(f"cannot reach the Ray job API at {url} ({first[:200]}); expected the head's dashboard "
                           "address, e.g. http://HEAD:8265") from None


def _auth_error(url: str, token: Token | None, e: Exception) -> ClusterError:
    if token is None or "401" in str(e) or "required" in str(e).lower():
        where = "RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token"
        what = "none was found" if token is None else f"the cluster did not accept the one from {token.source}"
        return ClusterError(f"the cluster at {url} requires a Ray authentication token and {what}: put it in {where} "
                            "(`ray get-auth-token` on the head prints it)")
    return ClusterError(f"the cluster at {url} rejected the authentication token from {token.source}: it is not "
                        "this cluster's token")


def _checkout_root() -> Path | None:
    """This project's source checkout, when latentcache runs from one (not from an installed wheel)."""
    root = Path(__file__).resolve().parent.parent
    project = root / "pyproject.toml"
    if project.is_file() and 'name = "latentcache"' in project.read_text():
        return root
    return None


def project_env(working_dir: str | None = None, pip: Sequence[str] = ()) -> dict[str, Any]:
    """How the project reaches the cluster: pip requirements when given, else a working directory
    (the one given, or this checkout), else this version from the package index."""
    if pip:
        return {"pip": list(pip)}
    root = Path(working_dir) if working_dir else _checkout_root()
    if root is None:
        return {"pip": [f"latentcache=={__version__}"]}
    if not (root / "pipeline" / "cli.py").is_file():
        raise ConfigError(f"--working-dir {root}: not a latentcache checkout (no pipeline/cli.py there)")
    return {"working_dir": str(root), "excludes": list(WORKING_DIR_EXCLUDES)}


@dataclass(frozen=True)
class Submission:
    """What `submit` sends: the same job a local `latentcache run` would run."""

    submission_id: str
    entrypoint: str
    runtime_env: Mapping[str, Any]
    metadata: Mapping[str, str]
    entrypoint_num_cpus: float = 0.0  # the driver is light; it must not take an actor's CPU


def build_submission(spec: JobSpec, *, working_dir: str | None = None, pip: Sequence[str] = (),
                     env: Mapping[str, str] | None = None, environ: Mapping[str, str] | None = None,
                     now: datetime.datetime | None = None) -> Submission:
    """The submission for `spec`. `env` adds environment values for the job (never credentials:
    a name that looks like one is refused); the object store's endpoint and region come from this
    shell when set."""
    shell = os.environ if environ is None else environ
    extra = dict(env or {})
    refused = sorted(k for k in extra if is_secret_name(k))
    if refused:
        raise ConfigError(f"--env {', '.join(refused)}: credentials never travel in a job's runtime environment "
                          "(Ray's dashboard and job API show it); give the cluster its keys through instance "
                          "roles, Kubernetes secrets, the nodes' environment or a credentials file on the nodes")
    env_vars = {k: shell[k] for k in TRAVELLING_ENV if shell.get(k)}
    env_vars.update(extra)
    env_vars.update({"PYTHONUNBUFFERED": "1", SPEC_ENV: spec.to_json()})
    stamp = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y%m%d-%H%M%S")
    return Submission(
        submission_id=f"latentcache-{spec.kind}-{stamp}-{secrets.token_hex(3)}",
        entrypoint=ENTRYPOINT,
        runtime_env={**project_env(working_dir, pip), "env_vars": env_vars},
        metadata={"latentcache": __version__, "job": spec.kind, "output": spec.config.output,
                  "spec": Path(spec.source).name})


def submit(client: Any, submission: Submission) -> str:
    """Submit; returns the job's submission id."""
    return client.submit_job(entrypoint=submission.entrypoint, submission_id=submission.submission_id,
                             runtime_env=dict(submission.runtime_env), metadata=dict(submission.metadata),
                             entrypoint_num_cpus=submission.entrypoint_num_cpus)


def _call(client: Any, what: str, fn: Callable[[], Any]) -> Any:
    """A job API call whose failures read as one line naming the job."""
    try:
        return fn()
    except RuntimeError as e:
        text = " ".join(str(e).split())
        if "does not exist" in text or "404" in text:
            raise ClusterError(f"{what}: no such job on the cluster at {client.get_address()}") from None
        raise ClusterError(f"{what}: {text[:500]}") from None


def job_info(client: Any, job_id: str) -> Any:
    return _call(client, f"job {job_id}", lambda: client.get_job_info(job_id))


def wait_until_done(client: Any, job_id: str, poll_s: float = 1.0, timeout_s: float | None = None) -> Any:
    """The job's details once it reached SUCCEEDED, FAILED or STOPPED."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = job_info(client, job_id)
        if status_name(info) in TERMINAL:
            return info
        if deadline is not None and time.monotonic() > deadline:
            raise ClusterError(f"job {job_id} is still {status_name(info)} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def status_name(info: Any) -> str:
    status = info.status
    return str(getattr(status, "value", status))


def follow_logs(client: Any, job_id: str, out: TextIO) -> None:
    """Stream the job's logs to `out` until the job ends."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    _call(client, f"logs of job {job_id}", lambda: asyncio.run(tail()))


def list_rows(client: Any) -> list[dict[str, str]]:
    """One row per job the cluster knows, newest first: id, status, kind, output, start, message."""
    jobs = _call(client, "list jobs", client.list_jobs)
    rows = []
    for info in sorted(jobs, key=lambda j: j.start_time or 0, reverse=True):
        meta = info.metadata or {}
        start = (datetime.datetime.fromtimestamp(info.start_time / 1000, datetime.timezone.utc)
                 .strftime("%Y-%m-%d %H:%M:%S") if info.start_time else "")
        rows.append({"id": info.submission_id or info.job_id or "", "status": status_name(info),
                     "job": meta.get("job", ""), "output": meta.get("output", ""), "started": start,
                     "message": " ".join((info.message or "").split())[:120]})
    return rows


def format_rows(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "no jobs on this cluster"
    cols = ["id", "status", "job", "output", "started", "message"]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in cols).rstrip() for r in rows]
    return "\n".join(lines)


def failure_reason(client: Any, job_id: str, info: Any) -> str:
    """Why a job failed, for the person who submitted it: the driver's own error line when its logs
    hold one (`latentcache: error: ...`), else Ray's message."""
    try:
        logs = client.get_job_logs(job_id)
    except RuntimeError:
        logs = ""
    ours = [line.strip() for line in logs.splitlines() if line.strip().startswith("latentcache:")]
    if ours:
        return ours[-1].removeprefix("latentcache:").strip().removeprefix("error:").strip()
    return " ".join((info.message or "no message from Ray").split())[:1000]


__all__ = ["ClusterError", "ENTRYPOINT", "SPEC_ENV", "Submission", "Token", "build_submission", "connect",
           "dashboard_address", "failure_reason", "find_token", "follow_logs", "format_rows", "job_info",
           "list_rows", "project_env", "status_name", "submit", "wait_until_done"]
