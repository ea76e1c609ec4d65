"""Shared fixtures. Tests run on the CPU; nothing is downloaded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# Triton kernels run in Triton's interpreter when there is no GPU; the variable must be set
# before ``model.triton_kernels`` is imported.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).parents[1]


class CLI:
    """``python -m <module>`` run from the repository root in a real process, as a user runs it.
    ``start`` several, then ``finish`` each, to overlap their start-up (imports take seconds)."""

    @staticmethod
    def start(module: str, *args: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        return subprocess.Popen(
            [sys.executable, "-m", module, *args], cwd=ROOT, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )

    @staticmethod
    def finish(process: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
        stdout, stderr = process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    @staticmethod
    def assert_usage_error(done: subprocess.CompletedProcess, message: str) -> None:
        """Exit status 2, argparse's usage, then one error line naming the problem; no traceback."""
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and "usage: " in done.stderr, done.stderr
        errors = [line for line in done.stderr.splitlines() if ": error: " in line]
        assert len(errors) == 1 and errors[0] == done.stderr.splitlines()[-1], done.stderr
        assert message in errors[0], done.stderr


@pytest.fixture(scope="session")
def cli() -> type[CLI]:
    return CLI


@pytest.fixture(scope="session")
def local_ray() -> str:
    """One real local Ray for the whole test session, started when a test first asks (a
    process may call ``ray.init`` only once while connected, so the Serve app tests and the
    Ray Train tests share it). Every socket is on 127.0.0.1; metrics are reported every
    second; four logical CPUs leave room for Ray Train's two workers beside the apps'
    replicas; workers import the project and the tests' helper modules from the same paths.
    Returns the Prometheus endpoint."""
    import ray

    paths = os.pathsep.join([str(ROOT), str(ROOT / "tests" / "training"), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=256 * 2**20, namespace="tests", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": paths, "OMP_NUM_THREADS": "1"}},
             _system_config={"metrics_report_interval_ms": 1000})
    yield f"http://127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}/metrics"
    ray.shutdown()
