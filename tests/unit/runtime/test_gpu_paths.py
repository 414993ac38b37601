"""Small edges: which GPUs NVML is asked about, serve's refusal without a GPU, and where the Hugging
Face cache is."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.rules.checks import BadOption
from launcher.runtime import gpu
from launcher.runtime.gpu import free_memory, nvidia_problem
from launcher.runtime.paths import hf_cache_dir, hf_home
from tests.conftest import REPO, assert_one_line_error

NO_GPU_HERE = nvidia_problem() is not None
HEAVY = ("torch", "transformers", "lmdeploy", "yapf", "triton")


@pytest.mark.parametrize("value, expected", [
    (None, ("0", "1", "2", "3")), ("2,0", ("2", "0")), ("1,7", ("1",)), ("", ()), ("-1", ()),
    ("1,-1,3", ("1",)), ("0,junk,1", ("0",)), ("01, 2", ("1", "2")),
    ("GPU-8a4c1f2e-0000-0000-0000-000000000000", ("GPU-8a4c1f2e-0000-0000-0000-000000000000",)),
    ("MIG-1b2c3d4e-0000-0000-0000-000000000000,0", ("MIG-1b2c3d4e-0000-0000-0000-000000000000", "0")),
])
def test_cuda_visible_devices_is_read_as_cuda_reads_it(value, expected):
    environ = {} if value is None else {"CUDA_VISIBLE_DEVICES": value}
    assert gpu.visible(environ, 4).ids == expected


def test_no_nvml_here_means_no_reading():
    if Path("/dev/nvidiactl").exists():
        pytest.skip("a GPU machine")
    assert free_memory() is None
    assert "no NVIDIA driver" in nvidia_problem()


def test_a_driver_library_that_does_not_load_is_a_problem_not_a_crash(monkeypatch):
    monkeypatch.setattr(gpu, "NVML_LIBRARY", "libnvidia-ml-that-is-not-there.so.1")
    assert "libnvidia-ml-that-is-not-there.so.1 does not load" in nvidia_problem()
    assert free_memory() is None


class StandinNvml:
    """STAND-IN for the NVIDIA driver's libnvidia-ml (no driver here): the NVML calls launcher.runtime.gpu
    makes, with NVML's C conventions (0 = success, results written through ``ctypes.byref``), over
    GPUs of given UUIDs and free bytes, and MIG instances found by their UUID only."""

    def __init__(self, gpus: list[tuple[str, int]], migs: dict[str, int]) -> None:
        self.gpus, self.migs = gpus, migs
        self.handles: dict[int, int] = {}  # handle -> free bytes

    def nvmlInit_v2(self) -> int:
        return 0

    def nvmlShutdown(self) -> int:
        return 0

    def nvmlDeviceGetCount_v2(self, count) -> int:
        count._obj.value = len(self.gpus)
        return 0

    def nvmlDeviceGetHandleByIndex_v2(self, index: int, handle) -> int:
        if not 0 <= index < len(self.gpus):
            return 2  # NVML_ERROR_INVALID_ARGUMENT
        handle._obj.value = 1000 + index
        self.handles[1000 + index] = self.gpus[index][1]
        return 0

    def nvmlDeviceGetUUID(self, handle, buffer, size: int) -> int:
        buffer.value = self.gpus[handle.value - 1000][0].encode()
        return 0

    def nvmlDeviceGetHandleByUUID(self, uuid: bytes, handle) -> int:
        names = list(self.migs)
        if uuid.decode() not in names:
            return 6  # NVML_ERROR_NOT_FOUND
        handle._obj.value = 5000 + names.index(uuid.decode())
        self.handles[handle._obj.value] = self.migs[uuid.decode()]
        return 0

    def nvmlDeviceGetMemoryInfo(self, handle, memory) -> int:
        memory._obj.free = self.handles[handle.value]
        return 0


@pytest.mark.parametrize("value, expected", [
    (None, [10, 11, 12, 13]), ("2,0", [12, 10]), ("GPU-bbbb", [11]), ("0,GPU-CCCC-3", [10, 12]),
    ("MIG-1111/1/0", [40]), ("0,GPU-zzzz,1", [10]), ("1,GPU-aaa,2", [11]), ("1,7,2", [11]), ("0,junk,1", [10]),
    ("GPU-", []), ("-1", []), ("", []),
])
def test_nvml_reads_the_gpus_cuda_will_use(monkeypatch, value, expected):
    """UUIDs (a unique prefix of one, as CUDA takes them) and MIG ids map to their own GPU's memory;
    an id no GPU has, or more than one has, ends the list there, as it ends CUDA's."""
    nvml = StandinNvml([("GPU-aaaa-1", 10), ("GPU-bbbb-2", 11), ("GPU-cccc-3", 12), ("GPU-aaab-4", 13)],
                       {"MIG-1111/1/0": 40})
    monkeypatch.setattr(gpu.ctypes, "CDLL", lambda name: nvml)
    if value is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert free_memory() == (expected or None)
    problem = nvidia_problem()
    assert (problem is None) == bool(expected)
    if not expected:
        assert "hides every GPU" in problem


def test_nvml_refuses_a_gpu_named_twice(monkeypatch):
    nvml = StandinNvml([("GPU-aaaa-1", 10), ("GPU-bbbb-2", 11)], {})
    monkeypatch.setattr(gpu.ctypes, "CDLL", lambda name: nvml)
    for value in ("0,0", "1,01", "GPU-aaaa-1,GPU-AAAA-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
        with pytest.raises(BadOption, match="twice"):
            free_memory()
        with pytest.raises(BadOption, match="twice"):
            nvidia_problem()


# --- serve refuses without a GPU, before anything -------------------------------------------------


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: kind, mode and content hash (byte for byte)."""
    state = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if path.is_symlink():
            state[str(path.relative_to(root))] = ("link", os.readlink(path))
        elif path.is_dir():
            state[str(path.relative_to(root))] = ("dir", info.st_mode)
        else:
            state[str(path.relative_to(root))] = ("file", info.st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


# Runs `launch ARGV` and reports, at exit, which heavy modules were imported and whether a process
# was started (any start goes through subprocess.Popen or os.posix_spawn / os.fork).
WATCHED = r"""
import atexit, json, os, subprocess, sys
HEAVY = {heavy!r}
started = []
class Refused(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        started.append(repr(args[0] if args else kwargs.get("args")))
        raise OSError("the test refuses to start processes")
subprocess.Popen = Refused
for name in ("fork", "posix_spawn", "posix_spawnp"):
    if hasattr(os, name):
        setattr(os, name, lambda *a, _n=name, **k: started.append(_n))
atexit.register(lambda: print("WATCH=" + json.dumps({{
    "heavy": sorted(m for m in sys.modules if m.split(".")[0] in HEAVY), "started": started}}), file=sys.stderr))
from launcher.cli import main
main({argv!r})
"""


@pytest.mark.skipif(not NO_GPU_HERE, reason="this machine has a usable NVIDIA GPU")
@pytest.mark.parametrize("model, flags", [
    ("internlm2_5-7b-chat", ["--factor", "2"]),  # turbomind by default
    ("internlm2_5-7b-chat", ["--factor", "2", "--backend", "pytorch"]),
    ("mistral-7b-instruct-v0.2", ["--backend", "turbomind"]),  # would also be refused for its architecture
    ("org/tiny", ["--factor", "2", "--backend", "pytorch"]),  # a repo id: not a byte fetched
    ("LOCAL", ["--factor", "2", "--backend", "pytorch", "--api-key", "sk-1"]),
])
def test_serve_without_a_gpu_refuses_once_and_writes_nothing(model, flags, model_dir, tmp_path, isolated_env):
    home = isolated_env
    (home / ".cache").mkdir(exist_ok=True)
    (home / ".cache" / "existing.txt").write_text("the user's own file\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "LAUNCH_CACHE_DIR": str(home / ".cache" / "launch"),
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there: any hub request would fail loudly
    argv = ["serve", str(model_dir) if model == "LOCAL" else model, *flags]
    before = {"home": tree_state(home), "model": tree_state(model_dir)}
    result = subprocess.run([sys.executable, "-c", WATCHED.format(heavy=HEAVY, argv=argv)], capture_output=True,
                            text=True, timeout=60, env=env, cwd=tmp_path, check=False)
    watch = json.loads(result.stderr.split("WATCH=")[-1])
    result.stderr = result.stderr.split("WATCH=")[0]
    assert_one_line_error(result, "needs an NVIDIA GPU", "no NVIDIA driver", "launch plan", "--dry-run",
                          "launch probe --url", code=1)
    assert watch == {"heavy": [], "started": []}
    assert {"home": tree_state(home), "model": tree_state(model_dir)} == before


def test_serve_refusal_starts_no_server(monkeypatch, tmp_path, model_dir):
    """In process, with the one seam saying there is no GPU (so it runs on a GPU machine too): the
    stand-in server command is never run, no run directory or overlay is made."""
    from launcher.app.serve import NoGpu, ServeRequest, serve
    from launcher.plan.build import PlanRequest

    monkeypatch.setattr(gpu, "nvidia_problem", lambda: "no NVIDIA driver was found (test)")
    monkeypatch.setenv("LAUNCH_CACHE_DIR", str(tmp_path / "cache"))
    marker = tmp_path / "server-started"
    request = ServeRequest(plan=PlanRequest(model=str(model_dir), factor="2", backend="pytorch"))
    with pytest.raises(NoGpu, match="no NVIDIA driver was found"):
        serve(request, server_argv=(sys.executable, "-c", f"open({str(marker)!r}, 'w')"))
    assert not marker.exists() and not (tmp_path / "cache").exists()
    # --dry-run needs no GPU: it still prints the plan
    out = io.StringIO()
    assert serve(ServeRequest(plan=request.plan, dry_run=True), out=out) == 0
    assert "session_len" in out.getvalue()


def test_hf_paths_follow_huggingface_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("SCRATCH", str(tmp_path))
    monkeypatch.setenv("HF_HOME", "$SCRATCH/hf")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert hf_home() == tmp_path / "hf" and hf_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hf_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hf_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"


def test_the_turbomind_check_leaves_no_trace_in_home(tmp_path):
    """Importing lmdeploy pulls in yapf, which caches its grammar under ~/.cache/YAPF; the TurboMind
    check may refuse, so it imports with its caches in a temporary directory (a real subprocess)."""
    from tests.conftest import tree_state

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "XDG_CACHE_HOME"}
    env["HOME"] = str(home)
    code = ("import os; from launcher.engine.spec import turbomind_problem; print(turbomind_problem()); "
            "print('XDG_CACHE_HOME' in os.environ)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False"  # the environment is as it was
    assert tree_state(home) == {}


def test_write_spec_is_private_atomic_and_refuses_an_unwritable_place(tmp_path):
    import stat

    from launcher.runtime.paths import RunDirNotWritable, write_spec

    path = write_spec(tmp_path / "run", "spec.json", {"api_keys": ["k"]})
    assert json.loads(path.read_text()) == {"api_keys": ["k"]}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["spec.json"]  # no temporary file left
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    with pytest.raises(RunDirNotWritable):
        write_spec(blocker / "run", "spec.json", {})
    assert blocker.read_text() == "mine"


def test_read_spec_reads_what_write_spec_wrote_and_wants_one_path(tmp_path, capsys):
    from launcher.runtime.paths import read_spec, write_spec

    data = {"api_keys": ["k"], "server_port": 23334, "engine_config": {"session_len": 65536}}
    path = write_spec(tmp_path / "run", "spec.json", data)
    assert read_spec([str(path)], "launcher.engine.server") == data
    for argv in ([], [str(path), str(path)]):
        assert read_spec(argv, "launcher.engine.server") is None
        assert capsys.readouterr().err == "usage: python -m launcher.engine.server SPEC.json\n"
