"""Job specs: a job's config YAML (the same keys as `--config`) with a top-level `job:` naming its
kind. `latentcache run SPEC` runs one where the command is; `latentcache submit SPEC` checks it on
the laptop and runs it on a Ray cluster.

A spec never holds secrets: it travels in the job's runtime environment, which Ray's dashboard
and job API show. A key that looks like a credential is refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from pipeline.config import ConfigError, RunConfig, apply_overrides, from_dict, to_dict

JOB_KEY = "job"

# Key names (any depth) that hold credentials: s3fs's key/secret/token, gcsfs's token, ...
_SECRET_NAMES = {"key", "secret", "token", "password", "passwd"}
_SECRET_WORDS = ("secret", "token", "password", "passwd", "credential", "access_key", "private_key", "api_key",
                 "session_key")


def is_secret_name(name: str) -> bool:
    """Whether a config key or environment variable name holds a credential."""
    low = name.lower()
    return low in _SECRET_NAMES or any(word in low for word in _SECRET_WORDS) or low == "aws_access_key_id"


def secret_keys(data: Any, prefix: str = "") -> list[str]:
    """The dotted paths of every key in `data` (nested mappings) whose name holds a credential."""
    found: list[str] = []
    if isinstance(data, Mapping):
        for k, v in data.items():
            path = f"{prefix}{k}"
            if isinstance(k, str) and is_secret_name(k):
                found.append(path)
            found.extend(secret_keys(v, path + "."))
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            found.extend(secret_keys(v, f"{prefix}{i}."))
    return found


@dataclass(frozen=True)
class JobSpec:
    """A checked job spec: its kind's name and config, and where it came from (for messages)."""

    kind: str
    config: RunConfig
    source: str = "spec"

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data, every field filled in: what a cluster runs, exactly."""
        return {JOB_KEY: self.kind, **to_dict(self.config)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def spec_from_dict(data: Mapping[str, Any], sets: Mapping[str, str] | None = None, *,
                   source: str = "spec") -> JobSpec:
    """Check a spec mapping (plus `--set` overrides) and build its kind's config; raises ConfigError
    naming the key."""
    from pipeline.jobs import kinds

    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    known = {k.name: k for k in kinds()}
    name = data.get(JOB_KEY)
    if name is None:
        raise ConfigError(f"{source}: no `{JOB_KEY}:` key; a job spec starts with `{JOB_KEY}: "
                          f"{' | '.join(known)}`, then that job's config keys")
    if name not in known:
        raise ConfigError(f"{source}: {JOB_KEY}={name!r} is not a job kind; expected one of {sorted(known)}")
    body = apply_overrides({k: v for k, v in data.items() if k != JOB_KEY}, dict(sets or {}))
    secrets = secret_keys(body)
    if secrets:
        raise ConfigError(f"{source}: {secrets} hold credentials, and a spec travels where Ray's dashboard shows "
                          "it; give the cluster its keys through instance roles, Kubernetes secrets, the nodes' "
                          "environment or a credentials file on the nodes")
    try:
        config = from_dict(known[name].config_type, body)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return JobSpec(name, config, source)


def load_spec(path: str | Path, sets: Mapping[str, str] | None = None) -> JobSpec:
    """Read and check a job spec file."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such job spec file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; expected a job spec YAML file") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    return spec_from_dict(data, sets, source=str(path))


def check_spec(data: Mapping[str, Any]) -> None:
    """Raise ConfigError when `data` is not a valid job spec."""
    spec_from_dict(data)


__all__ = ["JOB_KEY", "JobSpec", "check_spec", "is_secret_name", "load_spec", "secret_keys", "spec_from_dict"]
