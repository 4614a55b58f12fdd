"""Executors: where the runs of a sweep execute. Same specs in, same records out.

- ``local``: in this process, one run after the other (epoch progress bar shown).
- ``processes``: N worker processes (joblib's loky). When GPUs are visible, each worker claims
  one GPU for its lifetime and sees only it (``CUDA_VISIBLE_DEVICES``), so ``--workers`` = number
  of GPUs runs one job per GPU; on CPU the cores are shared out between workers.
- ``ray``: a local Ray instance (``num_cpus`` = workers) or an existing cluster
  (``--ray-address``); each job asks Ray for one GPU when the cluster has GPUs.

Every executor yields ``(spec, RunResult)`` as runs finish (not in submission order), so the
driver can write and track each result at once. A worker that dies (a segfault, the kernel's OOM
killer, a lost node) becomes a failed record for the run it held; the sweep goes on.

``processes`` workers die with the driver, even one killed with SIGKILL, which runs no cleanup:
on Linux the kernel sends them SIGKILL when their parent dies (``prctl(PR_SET_PDEATHSIG)``), and
everywhere a watchdog thread ends a worker whose driver is gone (:func:`_die_with_driver`).
"""

from __future__ import annotations

import math
import os
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path

from bench.errors import UserError
from bench.spec import RunSpec
from bench.util import first_line
from bench.worker import JobOptions, RunResult, failed_record, run_one

EXECUTORS = ("local", "processes", "ray")
RAY_CONNECT_TIMEOUT_S = 5.0
REPO_ROOT = Path(__file__).resolve().parent.parent


def make_executor(kind: str, workers: int | None = None, device: str = "auto",
                  ray_address: str | None = None):
    """The executor named ``kind`` (see module docstring)."""
    if kind == "local":
        return LocalExecutor()
    if kind == "processes":
        return ProcessExecutor(workers, device)
    if kind == "ray":
        return RayExecutor(workers, device, ray_address)
    raise UserError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")


def visible_gpus() -> list[str]:
    """GPU ids this process may hand to workers (honours an existing CUDA_VISIBLE_DEVICES)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no usable CUDA means CPU workers
        return []


def _wants_gpu(device: str) -> bool:
    return (device or "auto").lower() in ("auto", "cuda") or device.lower().startswith("cuda")


class LocalExecutor:
    """Runs specs one by one in this process."""

    name = "local"

    def run(self, specs: Sequence[RunSpec], options: JobOptions) -> Iterator[tuple[RunSpec, RunResult]]:
        options = _replace(options, progress=options.progress or sys.stderr.isatty())
        for spec in specs:
            yield spec, run_one(spec, options)


def _replace(options: JobOptions, **changes) -> JobOptions:
    import dataclasses

    return dataclasses.replace(options, **changes)


# --------------------------------------------------------------------------------------------
# processes (joblib / loky)


def _claim_gpu(gpus: list[str], slots_dir: str, per_gpu: int) -> None:
    """Worker initializer: claim a free GPU slot and make it the only visible GPU.

    Slots are folders holding the owner's pid; a slot whose owner died is taken over, so a
    replacement worker inherits the dead one's GPU.
    """
    slots = [Path(slots_dir) / f"gpu{g}-{k}" for k in range(per_gpu) for g in gpus]
    for takeover in (False, True):
        for slot in slots:
            if takeover and not _slot_owner_alive(slot):
                try:  # rename is atomic: of two workers reclaiming a dead slot, one wins
                    os.rename(slot, slot.with_name(f"{slot.name}.dead-{os.getpid()}"))
                except OSError:
                    continue
            # Claim = rename a folder already holding our pid onto the slot name: atomic, and
            # it fails when the slot exists (a slot folder is never empty).
            mine = Path(tempfile.mkdtemp(dir=slots_dir, prefix=".claim-"))
            (mine / "pid").write_text(str(os.getpid()))
            try:
                os.rename(mine, slot)
            except OSError:
                (mine / "pid").unlink()
                mine.rmdir()
                continue
            os.environ["CUDA_VISIBLE_DEVICES"] = slot.name[3:].rsplit("-", 1)[0]
            return
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus[os.getpid() % len(gpus)]


def _slot_owner_alive(slot: Path) -> bool:
    try:
        pid = int((slot / "pid").read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


WATCH_INTERVAL_S = 1.0  # how often a worker's watchdog looks for its driver


def _die_with_driver(driver_pid: int) -> None:
    """End this worker process when the driver (``driver_pid``, its parent) is gone.

    Linux: ``PR_SET_PDEATHSIG`` makes the kernel send SIGKILL when the parent dies (the worker
    was started by the driver's main thread, which lives as long as the pool). Everywhere, also
    a daemon thread: on POSIX a worker whose parent died is re-parented, so ``getppid()``
    changes; on Windows it waits on a handle of the driver process.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            pr_set_pdeathsig = 1  # <linux/prctl.h>
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no libc symbol: the watchdog still works
            pass
    if os.name == "nt":
        watch = _windows_watch(driver_pid)
    else:
        if os.getppid() != driver_pid:  # the driver died before the signal was armed
            os._exit(1)

        def watch():
            while True:
                threading.Event().wait(WATCH_INTERVAL_S)
                if os.getppid() != driver_pid:
                    os._exit(1)
    threading.Thread(target=watch, name="fuad-driver-watchdog", daemon=True).start()


def _windows_watch(driver_pid: int):
    import ctypes

    synchronize, infinite = 0x00100000, 0xFFFFFFFF
    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(synchronize, False, driver_pid)
    if not handle:  # already gone
        os._exit(1)

    def watch():
        kernel32.WaitForSingleObject(handle, infinite)  # returns when the driver exits
        os._exit(1)
    return watch


def _init_worker(gpus: list[str], slots_dir: str | None, per_gpu: int, threads: int | None,
                 driver_pid: int | None = None) -> None:
    if driver_pid is not None:
        _die_with_driver(driver_pid)
    if gpus and slots_dir:
        _claim_gpu(gpus, slots_dir, per_gpu)
    if threads:
        import torch

        torch.set_num_threads(threads)


def _pool_job(spec: RunSpec, options: JobOptions) -> RunResult:
    return run_one(spec, options)


class ProcessExecutor:
    """N loky worker processes; at most N runs in flight, so a crash implicates only those."""

    name = "processes"

    def __init__(self, workers: int | None = None, device: str = "auto"):
        self.device = device
        # Pin one GPU per worker for auto/cuda; an explicit cuda:N means every worker uses it.
        pin = (device or "auto").lower() in ("auto", "cuda")
        self.gpus = visible_gpus() if pin else []
        self.workers = int(workers or max(1, len(self.gpus)))
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {workers}")

    def _threads(self) -> int | None:
        if self.gpus:
            return None
        return max(1, (os.cpu_count() or 1) // self.workers)

    def _pool(self, workers: int, slots_dir: str | None):
        from joblib.externals.loky import ProcessPoolExecutor

        per_gpu = math.ceil(self.workers / len(self.gpus)) if self.gpus else 1
        return ProcessPoolExecutor(
            max_workers=workers, initializer=_init_worker,
            initargs=(self.gpus, slots_dir, per_gpu, self._threads(), os.getpid()),
        )

    def run(self, specs: Sequence[RunSpec], options: JobOptions) -> Iterator[tuple[RunSpec, RunResult]]:
        if not specs:
            return
        # More workers than runs would only start idle processes (each imports torch).
        self.workers = min(self.workers, len(specs))
        options = _replace(options, progress=False, threads=options.threads or self._threads())
        with tempfile.TemporaryDirectory(prefix="fuad-gpu-slots-") as slots_dir:
            queue = list(specs)
            while queue:
                crashed: list[RunSpec] = []
                yield from self._drain(queue, options, self.workers, slots_dir, crashed)
                # A dead worker breaks the pool and every run in flight with it. With one
                # worker the culprit is known; otherwise rerun those runs one at a time in a
                # fresh single-worker pool, so the culprit fails alone. ``queue`` keeps the
                # runs that never started, for a fresh pool.
                for spec in crashed:
                    dead = [spec]
                    if self.workers > 1:
                        dead = []
                        yield from self._drain([spec], options, 1, slots_dir, dead)
                    for run in dead:
                        yield run, RunResult(failed_record(
                            run, sweep=options.sweep, error_type="WorkerDied",
                            message="the worker process running this spec died (segfault, "
                                    "out of host memory or killed); see the worker's stderr"))

    def _drain(self, queue: list[RunSpec], options: JobOptions, workers: int, slots_dir: str,
               crashed: list[RunSpec]) -> Iterator[tuple[RunSpec, RunResult]]:
        """Run ``queue`` (consumed from the front) until done or the pool breaks."""
        from joblib.externals.loky.process_executor import BrokenProcessPool

        pool = self._pool(workers, slots_dir)
        in_flight: dict = {}
        clean = False
        try:
            while queue or in_flight:
                while queue and len(in_flight) < workers:
                    spec = queue.pop(0)
                    in_flight[pool.submit(_pool_job, spec, options)] = spec
                finished, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                broken = False
                for future in finished:
                    spec = in_flight.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        crashed.append(spec)
                        broken = True
                        continue
                    except Exception as err:  # noqa: BLE001 - e.g. a result that cannot pickle
                        result = RunResult(failed_record(spec, err, sweep=options.sweep))
                    yield spec, result
                if broken:
                    crashed.extend(in_flight.values())
                    in_flight.clear()
                    return
            clean = True
        finally:
            pool.shutdown(wait=clean, kill_workers=not clean)


# --------------------------------------------------------------------------------------------
# ray


def _ray_job(spec: RunSpec, options: JobOptions) -> RunResult:
    return run_one(spec, options)


class RayExecutor:
    """Jobs as Ray tasks on a local instance or an existing cluster."""

    name = "ray"

    def __init__(self, workers: int | None = None, device: str = "auto",
                 address: str | None = None):
        self.workers = workers
        self.device = device
        self.address = address

    def check(self) -> None:
        """Before a sweep writes anything: Ray is installed, and a cluster address given as
        ``host:port`` (or ``ray://host:port``) accepts a connection within a few seconds (Ray
        itself would keep retrying for minutes)."""
        self._import()
        if not self.address or self.address in ("auto", "local"):
            return
        target = self.address.split("://", 1)[-1]
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"--ray-address {self.address!r}: expected host:port, "
                            f"ray://host:port or auto")
        try:
            with socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S):
                pass
        except OSError as err:
            raise UserError(f"Ray cluster at {self.address} does not answer ({err}); start it "
                            f"or check --ray-address") from None

    @staticmethod
    def _import():
        try:
            import ray
        except ImportError:
            raise UserError("the ray executor needs Ray: pip install 'ray>=2.9' "
                            "(or the project's [ray] extra)") from None
        return ray

    def _init(self):
        """Connect (or start a local Ray); returns whether this executor started it."""
        ray = self._import()
        if ray.is_initialized():
            return ray, False
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if self.address:
            # A cluster: ship this code (not data or results) to the workers.
            import bench
            import datasets
            import methods

            runtime_env = {"py_modules": [Path(m.__file__).parent for m in (bench, datasets, methods)]}
            ray.init(address=self.address, runtime_env=runtime_env, log_to_driver=True)
        else:
            # A local instance: workers see the same code and data as this process.
            paths = [p for p in sys.path if p and Path(p).is_dir()]
            runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *paths])}}
            ray.init(num_cpus=self.workers or os.cpu_count(), include_dashboard=False,
                     runtime_env=runtime_env, log_to_driver=True, configure_logging=False)
        return ray, True

    def run(self, specs: Sequence[RunSpec], options: JobOptions) -> Iterator[tuple[RunSpec, RunResult]]:
        if not specs:
            return
        ray, started = self._init()
        try:
            gpus = ray.cluster_resources().get("GPU", 0) if _wants_gpu(self.device) else 0
            if gpus:
                resources = {"num_gpus": 1, "num_cpus": 1}
                threads = options.threads
            else:
                resources = {"num_gpus": 0, "num_cpus": 1}
                cpus = ray.cluster_resources().get("CPU", 1)
                threads = options.threads or max(1, int((os.cpu_count() or 1) // max(1, cpus)))
            options = _replace(options, progress=False, threads=threads)
            task = ray.remote(_ray_job).options(max_retries=0, **resources)
            pending = {task.remote(spec, options): spec for spec in specs}
            try:
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1)
                    for ref in done:
                        spec = pending.pop(ref)
                        try:
                            result = ray.get(ref)
                        except Exception as err:  # noqa: BLE001 - a dead worker or node
                            result = RunResult(failed_record(
                                spec, err, sweep=options.sweep, error_type=type(err).__name__,
                                message=f"Ray task failed: {first_line(err)}"))
                        yield spec, result
            finally:
                for ref in pending:  # Ctrl-C or an abandoned generator: stop what still runs
                    ray.cancel(ref, force=True)
        finally:
            if started:
                ray.shutdown()
