"""Run a JAX program as several processes on this machine (multi-process JAX, simulated).

Multi-host JAX runs one process per host, connected by
``jax.distributed.initialize``; arrays then span devices that one process
cannot address, and collectives cross process boundaries.  All of that can be
exercised on one machine: :func:`launch_local` starts ``N`` copies of a
command, each with its own simulated CPU devices, and the command connects
them by calling :func:`initialize_local` before it touches a device:

```python
# train.py
import optax_lowrank as olr
olr.distributed.initialize_local()   # no-op when not started by launch_local
import jax
print(jax.process_index(), jax.process_count(), jax.device_count())
```

```python
# the launcher (a script, a test):
results = olr.distributed.launch_local(
    [sys.executable, "train.py"], num_processes=2, devices_per_process=2, timeout=120)
print(results[0].stdout)     # "0 2 4"
```

What the launcher guarantees:

* Every process gets the environment of the caller plus
  ``OLR_COORDINATOR_ADDRESS`` (``127.0.0.1:<a free port>``), ``OLR_NUM_PROCESSES``,
  ``OLR_PROCESS_ID``, ``JAX_PLATFORMS=cpu``, ``JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo``
  and ``XLA_FLAGS`` with ``--xla_force_host_platform_device_count`` set to
  ``devices_per_process`` (any earlier value of that flag is replaced).
* It is bounded: after ``timeout`` seconds, or as soon as one process exits
  with a non-zero code, every process still running is terminated
  (``SIGTERM``, then ``SIGKILL`` after ``grace`` seconds), and so is anything
  it started (each process leads its own process group; the whole group is
  signalled).  Then :class:`LaunchError` is raised, naming the process that
  failed first, its exit code or signal, and the end of its standard error.
  The same clean-up runs if the caller is interrupted (``KeyboardInterrupt``).
  (If the caller itself is killed outright, with ``SIGKILL``, nothing can stop
  its processes: they run on until they finish, or fail once the coordinator,
  process 0, is gone.)
* Outputs are collected in anonymous temporary files (no pipe can fill up and
  block a process; nothing is left on disk) and returned per process as
  :class:`ProcessResult`; ``capture=False`` lets the processes write to the
  caller's terminal instead.
* The coordinator is bound to ``127.0.0.1``.  Gloo's TCP transport (the CPU
  collectives) listens on the address this machine's hostname resolves to:
  JAX has no public option to choose it.  Where ``/etc/hosts`` maps the
  hostname to a loopback address (as on most workstations and containers)
  all traffic stays on loopback; :func:`initialize_local` fails with a clear
  error if the hostname does not resolve, or resolves off loopback.

It is a tool for tests, examples and debugging on one machine.  On a real
cluster start one process per host with the cluster's launcher (SLURM
``srun``, ``mpirun``, a TPU pod's ``gcloud ... --worker=all``) and call
``jax.distributed.initialize()`` instead of :func:`initialize_local`; see
``docs/how-to/distributed.md``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

__all__ = [
    "LaunchError",
    "ProcessResult",
    "initialize_local",
    "launch_local",
]

ENV_ADDRESS = "OLR_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "OLR_NUM_PROCESSES"
ENV_PROCESS_ID = "OLR_PROCESS_ID"
LOOPBACK = "127.0.0.1"
_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")
_TAIL = 3000  # characters of a failed process's stderr quoted in the error


class ProcessResult(NamedTuple):
  """What one launched process left behind.

  Attributes:
    process_id: its ``jax.process_index()`` (``0 … num_processes − 1``).
    returncode: its exit code; ``-N`` if signal ``N`` ended it; ``None`` if it
      was still running when the launch was stopped (then the launcher killed it).
    stdout: what it wrote to standard output (``None`` with ``capture=False``).
    stderr: what it wrote to standard error (``None`` with ``capture=False``).
  """

  process_id: int
  returncode: int | None
  stdout: str | None
  stderr: str | None


class LaunchError(RuntimeError):
  """A launched process failed or the launch timed out; every process is gone.

  Attributes:
    results: one :class:`ProcessResult` per process, as far as they got.
  """

  def __init__(self, message: str, results: list[ProcessResult]):
    super().__init__(message)
    self.results = results


def free_port(host: str = LOOPBACK) -> int:
  """A TCP port that nothing listens on at ``host`` right now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def _child_env(
    base: Mapping[str, str], address: str, num_processes: int, process_id: int, devices: int
) -> dict[str, str]:
  env = dict(base)
  flags = _DEVICE_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
  env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
  env[ENV_ADDRESS] = address
  env[ENV_NUM_PROCESSES] = str(num_processes)
  env[ENV_PROCESS_ID] = str(process_id)
  return env


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
  """Send ``sig`` to the process group ``proc`` leads, unless ``proc`` has been reaped.

  The group id is ``proc.pid``; once ``proc`` has been waited for, that id
  could belong to an unrelated process, so a reaped process is left alone.
  """
  if proc.returncode is not None:
    return
  try:
    os.killpg(proc.pid, sig)
  except (ProcessLookupError, PermissionError):
    pass


def _exited(proc: subprocess.Popen) -> bool:
  """Whether ``proc`` has exited, *without* reaping it (its group id stays reserved)."""
  if proc.returncode is not None:
    return True
  if not hasattr(os, "waitid"):  # no WNOWAIT here: reap (its group is then not signalled)
    return proc.poll() is not None
  try:
    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
  except ChildProcessError:  # already reaped elsewhere
    return proc.poll() is not None
  return info is not None and info.si_pid == proc.pid


def _stop(procs: Sequence[subprocess.Popen], grace: float) -> None:
  """Terminate every process and its group: SIGTERM, SIGKILL after ``grace`` s, reap."""
  for p in procs:
    _signal_group(p, signal.SIGTERM)
  deadline = time.monotonic() + grace
  while time.monotonic() < deadline and not all(_exited(p) for p in procs):
    time.sleep(0.02)
  for p in procs:
    _signal_group(p, signal.SIGKILL)  # also what a process started and left behind
  for p in procs:
    p.wait()


def _read(f) -> str | None:
  if f is None:
    return None
  f.seek(0)
  return f.read().decode("utf-8", errors="replace")


def _describe(code: int | None) -> str:
  if code is None:
    return "still running (killed by the launcher)"
  if code < 0:
    try:
      return f"killed by signal {signal.Signals(-code).name}"
    except ValueError:
      return f"killed by signal {-code}"
  return f"exit code {code}"


def launch_local(
    command: Sequence[str],
    num_processes: int = 2,
    *,
    devices_per_process: int = 1,
    timeout: float = 600.0,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    capture: bool = True,
    grace: float = 2.0,
) -> list[ProcessResult]:
  """Run ``command`` as ``num_processes`` connected JAX processes on this machine.

  Each process runs ``command`` (an argument list, e.g. ``[sys.executable,
  "train.py", "--flag"]``; no shell) with the variables listed in the module
  docstring added to its environment, so that :func:`initialize_local` called
  first thing in the program connects it to the others: ``jax.process_count()
  == num_processes`` and ``jax.device_count() == num_processes ·
  devices_per_process``, process ``i`` holding entries ``[i·d, (i+1)·d)`` of
  ``jax.devices()`` (``d = devices_per_process``).

  Args:
    command: the program and its arguments, run unchanged by every process.
    num_processes: how many processes (``≥ 1``).
    devices_per_process: simulated CPU devices per process (``≥ 1``).
    timeout: seconds until every process is killed and :class:`LaunchError`
      raised.  JAX start-up (imports, connecting) takes a few seconds per
      process on a loaded machine; leave room for it.
    env: variables added to (or overriding) this process's environment.
    cwd: the processes' working directory (default: this process's).
    capture: collect each process's output into the results (default); with
      ``False`` they write to this process's standard output and error.
    grace: seconds between ``SIGTERM`` and ``SIGKILL`` when stopping processes.

  Returns:
    One :class:`ProcessResult` per process, in process order, all with exit
    code 0.

  Raises:
    ValueError: bad arguments (before anything starts).
    LaunchError: a process exited with a non-zero code or a signal (the
      others are stopped at once), or ``timeout`` passed.  Every process and
      the process groups they lead are gone when it is raised.
  """
  command = _checked_launch(command, num_processes, devices_per_process, timeout, grace)

  address = f"{LOOPBACK}:{free_port()}"
  base = {**os.environ, **(env or {})}
  outputs: list[tuple] = []
  procs: list[subprocess.Popen] = []
  codes: list[int | None] = [None] * num_processes
  failure: str | None = None
  try:
    for i in range(num_processes):
      out, err = (tempfile.TemporaryFile(), tempfile.TemporaryFile()) if capture else (None, None)
      outputs.append((out, err))
      procs.append(subprocess.Popen(
          command, env=_child_env(base, address, num_processes, i, devices_per_process),
          cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
          start_new_session=True,  # its own process group: stopped as a whole
      ))
    deadline = time.monotonic() + timeout
    while failure is None:
      done = [_exited(p) for p in procs]
      for i, p in enumerate(procs):
        if done[i] and codes[i] is None:
          _signal_group(p, signal.SIGKILL)  # leftovers of a finished process
          codes[i] = p.wait()
          if codes[i] != 0:
            failure = f"process {i} of {num_processes} failed ({_describe(codes[i])})"
            break
      if failure is None and all(c is not None for c in codes):
        break
      if failure is None and time.monotonic() > deadline:
        running = [i for i, c in enumerate(codes) if c is None]
        failure = f"timed out after {timeout:g} s with process(es) {running} still running"
      if failure is None:
        time.sleep(0.05)
  finally:
    _stop(procs, grace)  # a no-op for processes already reaped
    results = [
        ProcessResult(i, codes[i], _read(out), _read(err))
        for i, (out, err) in enumerate(outputs)
    ]
    for out, err in outputs:
      for f in (out, err):
        if f is not None:
          f.close()
  if failure is not None:
    raise _launch_error(command, failure, results, capture)
  return results


def _checked_launch(command, num_processes, devices_per_process, timeout, grace) -> list[str]:
  """:func:`launch_local`'s arguments checked (before anything starts); the command as strings."""
  command = [os.fspath(c) for c in command]
  if not command:
    raise ValueError("`command` is empty: give the program and its arguments as a list")
  for name, value in (("num_processes", num_processes),
                      ("devices_per_process", devices_per_process)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
  if not timeout > 0:
    raise ValueError(f"`timeout` must be > 0 seconds, got {timeout!r}")
  if not grace >= 0:
    raise ValueError(f"`grace` must be >= 0 seconds, got {grace!r}")
  return command


def _launch_error(command: list[str], failure: str, results: list[ProcessResult],
                  capture: bool) -> LaunchError:
  """The error of a failed launch: every process's exit, then the failing one's stderr."""
  lines = [f"launch_local({command[:3]}{' …' if len(command) > 3 else ''}): {failure}."]
  for r in results:
    lines.append(f"  process {r.process_id}: {_describe(r.returncode)}")
  first = next((r for r in results if r.returncode not in (0, None)), None)
  if first is not None and first.stderr:
    lines.append(f"end of process {first.process_id}'s stderr:\n{first.stderr[-_TAIL:]}")
  elif capture:
    for r in results:
      if r.stderr:
        lines.append(f"end of process {r.process_id}'s stderr:\n{r.stderr[-_TAIL:]}")
  return LaunchError("\n".join(lines), results)


def _gloo_host() -> str:
  """The address gloo's TCP transport will listen on: this machine's hostname, resolved.

  JAX builds its gloo collectives with no host or interface argument, so gloo
  resolves the machine's hostname and binds that address; jax offers no public
  option to choose it.  Resolving it here first turns a hostname that does not
  resolve into a clear error before any process waits for the others, and
  a hostname that resolves to anything but a loopback address into a refusal:
  the launcher is for one machine and never sends traffic off loopback.
  """
  name = socket.gethostname()
  try:
    address = socket.gethostbyname(name)
  except OSError as e:
    raise RuntimeError(
        f"initialize_local: this machine's hostname {name!r} does not resolve ({e}); JAX's "
        "gloo collectives bind the address it resolves to.  Map it to 127.0.0.1 in /etc/hosts "
        "or run on a machine whose hostname resolves"
    ) from e
  if not ipaddress.ip_address(address).is_loopback:
    raise RuntimeError(
        f"initialize_local: this machine's hostname {name!r} resolves to {address}, not a "
        "loopback address; JAX's gloo collectives would listen there, off loopback.  Map the "
        "hostname to 127.0.0.1 in /etc/hosts to run several local processes"
    )
  return address


def initialize_local(*, timeout: int = 120) -> bool:
  """Connect this process to the others :func:`launch_local` started.

  Call it first thing in the launched program, before anything creates an
  array or asks for devices.  Reads the variables :func:`launch_local` set,
  selects gloo for CPU collectives, and calls ``jax.distributed.initialize``
  with the loopback coordinator address.  Without those variables (the
  program was started some other way), or when it is the only process, it
  does nothing: the same script also runs as one ordinary process, whose
  collectives between its simulated devices stay in memory.

  Args:
    timeout: seconds to wait for every process to connect.

  Returns:
    ``True`` if it connected this process, ``False`` if there was nothing to do.
  """
  address = os.environ.get(ENV_ADDRESS)
  if not address:
    return False
  num_processes = int(os.environ[ENV_NUM_PROCESSES])
  process_id = int(os.environ[ENV_PROCESS_ID])
  if num_processes == 1:
    return False
  import jax

  _gloo_host()
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=address, num_processes=num_processes, process_id=process_id,
      coordinator_bind_address=address, initialization_timeout=timeout,
  )
  return True
