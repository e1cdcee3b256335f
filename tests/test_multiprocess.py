"""Real multi-process JAX on one machine: olr.distributed.launch_local and what runs under it.

The launcher's own checks use tiny Python children (no JAX) and take about a
second.  The rest runs ``tests/multiprocess_program.py`` three times, once
for the whole module: as 2 processes × 2 CPU devices connected by
``jax.distributed`` over loopback with gloo collectives ("train", then a fresh
"restore" run from its checkpoints), and as 1 process × 4 devices (the
reference).  Each process writes what it computed; the tests compare files.

Marked ``multiprocess``: ``pytest -m "not multiprocess"`` leaves them out.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from optax_lowrank import distributed as dist
from optax_lowrank import launch

pytestmark = pytest.mark.multiprocess

PROGRAM = Path(__file__).with_name("multiprocess_program.py")
ROOT = PROGRAM.parents[1]
RANK, WORKERS = 3, 4  # as in the program
# Two float64 runs that differ only in the order of sums (gloo's all-reduce vs the in-process
# one, other fusions) through ≤ 7 optimizer steps and 2 DiLoCo rounds: measured ≤ 6e-15.
# A wrong shard, key or worker index moves the weights by more than 1e-4 (checked below).
ROUND_OFF = 1e-12


def _python(code: str) -> list[str]:
  return [sys.executable, "-c", textwrap.dedent(code)]


def _gone(pid: int) -> bool:
  """True once ``pid`` is no process, or only a zombie (exited, not yet reaped by its parent)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] == "Z"
  except FileNotFoundError:
    return True
  except OSError:  # no /proc: ask the kernel
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return True
    return False


def _wait_gone(pids, seconds=5.0) -> bool:
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    if all(_gone(p) for p in pids):
      return True
    time.sleep(0.05)
  return all(_gone(p) for p in pids)


# ----------------------------------------------------------------------------
# The launcher itself, with plain Python children.


def test_launcher_gives_each_process_its_rank_loopback_address_and_devices():
  code = """
      import json, os
      print(json.dumps({k: os.environ.get(k) for k in (
          "OLR_COORDINATOR_ADDRESS", "OLR_NUM_PROCESSES", "OLR_PROCESS_ID", "XLA_FLAGS",
          "JAX_PLATFORMS", "JAX_CPU_COLLECTIVES_IMPLEMENTATION", "EXTRA")}))
      import sys; print("to stderr", os.environ["OLR_PROCESS_ID"], file=sys.stderr)
  """
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/nowhere",
         "EXTRA": "kept"}
  results = dist.launch_local(_python(code), 3, devices_per_process=2, timeout=60, env=env)
  assert [r.process_id for r in results] == [0, 1, 2]
  assert all(r.returncode == 0 for r in results)
  seen = [json.loads(r.stdout) for r in results]
  assert [s["OLR_PROCESS_ID"] for s in seen] == ["0", "1", "2"]
  assert {s["OLR_NUM_PROCESSES"] for s in seen} == {"3"}
  (address,) = {s["OLR_COORDINATOR_ADDRESS"] for s in seen}
  host, port = address.rsplit(":", 1)
  assert host == "127.0.0.1" and 0 < int(port) < 65536
  for s in seen:  # the old device count is replaced, other flags are kept
    assert s["XLA_FLAGS"].split() == ["--xla_dump_to=/nowhere",
                                      "--xla_force_host_platform_device_count=2"]
    assert (s["JAX_PLATFORMS"], s["JAX_CPU_COLLECTIVES_IMPLEMENTATION"]) == ("cpu", "gloo")
    assert s["EXTRA"] == "kept"
  assert [r.stderr.strip() for r in results] == ["to stderr 0", "to stderr 1", "to stderr 2"]


def test_a_failing_process_stops_the_others_at_once_with_a_clear_error():
  with tempfile.TemporaryDirectory() as tmp:
    code = f"""
        import os, sys, time
        rank = int(os.environ["OLR_PROCESS_ID"])
        open(os.path.join({tmp!r}, f"pid{{rank}}"), "w").write(str(os.getpid()))
        if rank == 1:
          while not os.path.exists(os.path.join({tmp!r}, "pid0")):
            time.sleep(0.01)
          print("bad things happened in process 1", file=sys.stderr)
          sys.exit(3)
        time.sleep(120)  # would hang without the launcher
    """
    with pytest.raises(dist.LaunchError) as info:
      dist.launch_local(_python(code), 2, timeout=100, grace=0.5)
    pids = [int(Path(tmp, f"pid{i}").read_text()) for i in range(2)]
  message = str(info.value)
  assert "process 1 of 2 failed (exit code 3)" in message, message
  assert "bad things happened in process 1" in message
  # stopped because process 1 failed, not by the 100 s timeout
  assert "process 0: still running (killed by the launcher)" in message
  assert "timed out" not in message
  assert [r.returncode for r in info.value.results] == [None, 3]
  assert _wait_gone(pids), pids


def test_a_hang_times_out_and_kills_the_processes_and_what_they_started():
  with tempfile.TemporaryDirectory() as tmp:
    # Each process starts a grandchild that would outlive it, then hangs.
    code = f"""
        import os, subprocess, sys, time
        rank = os.environ["OLR_PROCESS_ID"]
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open(os.path.join({tmp!r}, "pids" + rank), "w").write(f"{{os.getpid()}} {{child.pid}}")
        time.sleep(120)
    """
    with pytest.raises(dist.LaunchError, match=r"timed out after 5 s with process\(es\) \[0, 1\]"):
      dist.launch_local(_python(code), 2, timeout=5, grace=0.5)
    pids = [int(p) for i in range(2) for p in Path(tmp, f"pids{i}").read_text().split()]
  assert len(pids) == 4 and _wait_gone(pids), pids  # the grandchildren too


def test_a_signal_is_reported_by_name():
  code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
  with pytest.raises(dist.LaunchError, match=r"process 0 of 1 failed \(killed by signal SIGKILL\)"):
    dist.launch_local(_python(code), 1, timeout=30)


def test_bad_arguments_fail_before_anything_starts():
  for kwargs, match in [({"num_processes": 0}, "num_processes"),
                        ({"num_processes": True}, "num_processes"),
                        ({"devices_per_process": 0}, "devices_per_process"),
                        ({"timeout": 0}, "timeout"),
                        ({"grace": -1}, "grace")]:
    with pytest.raises(ValueError, match=match):
      dist.launch_local([sys.executable, "-c", "pass"], **kwargs)
  with pytest.raises(ValueError, match="command"):
    dist.launch_local([])


def test_initialize_local_is_a_no_op_outside_a_launch(monkeypatch):
  for name in (launch.ENV_ADDRESS, launch.ENV_NUM_PROCESSES, launch.ENV_PROCESS_ID):
    monkeypatch.delenv(name, raising=False)
  assert dist.initialize_local() is False
  monkeypatch.setenv(launch.ENV_ADDRESS, "127.0.0.1:1")
  monkeypatch.setenv(launch.ENV_NUM_PROCESSES, "1")
  monkeypatch.setenv(launch.ENV_PROCESS_ID, "0")
  assert dist.initialize_local() is False  # one process: nothing to connect


# ----------------------------------------------------------------------------
# 2 processes × 2 devices against 1 process × 4 devices.


@pytest.fixture(scope="module")
def runs():
  path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
  env = {"OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": path}
  with tempfile.TemporaryDirectory(prefix="olr-multiprocess-") as tmp:
    out = {}
    for name, processes, devices, phase in [("two", 2, 2, "train"), ("two", 2, 2, "restore"),
                                            ("one", 1, 4, "train")]:
      folder = Path(tmp, name)
      folder.mkdir(exist_ok=True)
      dist.launch_local([sys.executable, str(PROGRAM), phase, str(folder)], processes,
                        devices_per_process=devices, timeout=300, env=env, cwd=ROOT)
      for i in range(processes):
        with np.load(folder / f"{phase}_p{i}.npz") as f:
          arrays = dict(f)
        facts = json.loads((folder / f"{phase}_p{i}.json").read_text())
        out[name, phase, i] = arrays, facts
    yield out


def _strip(spec):
  """A partition spec as written by the program, without trailing ``None``s."""
  spec = list(spec)
  while spec and spec[-1] == "None":
    spec.pop()
  return spec


def _close(a, b, prefix):
  keys = [k for k in a if k.startswith(prefix)]
  assert keys and set(keys) == {k for k in b if k.startswith(prefix)}, prefix
  for k in keys:
    if a[k].dtype.kind == "f":
      np.testing.assert_allclose(a[k], b[k], rtol=0, atol=ROUND_OFF, err_msg=k)
    else:  # counters and PRNG keys
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_the_processes_are_real_and_see_the_same_global_arrays(runs):
  (a0, f0), (a1, f1) = runs["two", "train", 0], runs["two", "train", 1]
  assert (f0["process_count"], f1["process_count"]) == (2, 2)
  # where each process's devices sit in jax.devices(), the order meshes are built from
  assert (f0["local_positions"], f1["local_positions"]) == ([0, 1], [2, 3])
  # the optimizer states really are split between the processes
  assert not f0["inner_state_addressable"] and not f0["fsdp/svd/mu_addressable"]
  assert runs["one", "train", 0][1]["inner_state_addressable"]
  assert a0.keys() == a1.keys()
  for k in a0:  # gathered global arrays: the same bits in both processes
    np.testing.assert_array_equal(a0[k], a1[k], err_msg=k)


@pytest.mark.parametrize("scheme", ["identical", "independent", "disjoint"])
def test_diloco_across_processes_equals_one_process_with_four_devices(runs, scheme):
  two, one = runs["two", "train", 0][0], runs["one", "train", 0][0]
  _close(two, one, f"diloco/{scheme}/")
  # not vacuous: the schemes train differently (other bases), far above round-off
  other = "identical" if scheme != "identical" else "disjoint"
  gap = max(float(np.abs(two[f"diloco/{scheme}/params['{w}']"]
                         - two[f"diloco/{other}/params['{w}']"]).max()) for w in ("w1", "w2"))
  assert gap > 1e-4, gap


def test_one_worker_per_process_with_sharded_weights_equals_one_process(runs):
  two, one = runs["two", "train", 0], runs["one", "train", 0]
  _close(two[0], one[0], "hosts/")
  assert _strip(two[1]["w1_spec"]) == ["fsdp"]  # still sharded inside each worker


@pytest.mark.parametrize("projection", ["semi_orthogonal", "svd"])
def test_fsdp_low_rank_across_processes_equals_one_process(runs, projection):
  # svd gathers the sharded gradient at a refresh: across the processes here
  two, one = runs["two", "train", 0], runs["one", "train", 0]
  _close(two[0], one[0], f"fsdp/{projection}/")
  # Adam's moments of the coefficients: sharded like their leaf's unprojected axis
  specs = {k: _strip(v) for k, v in two[1][f"fsdp/{projection}/mu_specs"].items()}
  assert specs == {"b": [], "w1": ["fsdp"], "w2": ["None", "fsdp"]}, specs
  moved = np.abs(two[0][f"fsdp/{projection}/final[0]['w1']"]
                 - two[0][f"fsdp/{projection}/saved[0]['w1']"]).max()
  assert moved > 1e-4, moved


def test_orbax_restores_the_sharded_states_in_fresh_processes_bit_identically(runs):
  train, restore = runs["two", "train", 0][0], runs["two", "restore", 0][0]
  restored = [k for k in restore if "/restored" in k]
  assert len(restored) > 20, restored
  for k in restored:
    np.testing.assert_array_equal(restore[k], train[k.replace("/restored", "/saved")], err_msg=k)
  finals = [k for k in restore if "/final" in k]
  assert finals and {k for k in train if "/final" in k} == set(finals)
  for k in finals:  # the steps after the restore, refresh included: the same bits
    np.testing.assert_array_equal(restore[k], train[k], err_msg=k)
  assert _strip(runs["two", "restore", 1][1]["restored_w1_spec"]) == ["fsdp"]


def _gram(factors):
  f = np.asarray(factors)  # (K, n, r)
  return np.einsum("inr,jns->ijrs", f, f)


@pytest.mark.parametrize("which", ["diloco/disjoint", "hosts/final.inner_states"])
def test_disjoint_bases_are_mutually_orthogonal_across_processes(runs, which):
  arrays = runs["two", "train", 0][0]
  keys = [k for k in arrays if k.startswith(which) and "bases" in k]
  assert len(keys) == 2, keys  # w1 and w2
  for k in keys:
    gram = _gram(arrays[k])
    k_workers = gram.shape[0]
    assert k_workers == (WORKERS if which.startswith("diloco") else 2)
    for i in range(k_workers):
      for j in range(k_workers):
        want = np.eye(RANK) if i == j else np.zeros((RANK, RANK))
        # float64 QR: in fact ~1e-16; pairs (i, j) on different processes included
        np.testing.assert_allclose(gram[i, j], want, atol=ROUND_OFF, err_msg=f"{k} {i},{j}")


def test_no_collective_of_a_round_carries_a_basis(runs):
  collectives = runs["two", "train", 0][1]["host_round_collectives"]
  shapes = [s for _, group in collectives for s in group]
  # the one weight-sized sync: the pseudo-gradient all-reduce (w1 is (16, 12) sharded in 2 rows)
  assert any({"f64[8,12]", "f64[12,16]"} <= set(g) for op, g in collectives
             if op == "all-reduce"), collectives
  # a basis (and any piece of it) has an axis of length RANK = 3; no weight, batch or
  # activation here does, so no collective may have one
  dims = [[int(d) for d in s.split("[")[1].rstrip("]").split(",") if d] for s in shapes]
  assert not any(RANK in d for d in dims), collectives


# ----------------------------------------------------------------------------
# examples/diloco.py --processes 2


EXAMPLE = ["--workers", "2", "--runs", "disjoint", "--rounds", "2", "--local-steps", "1",
           "--dim", "16", "--layers", "1", "--seq-len", "16", "--batch-size", "2",
           "--eval-batches", "1", "--max-bytes", "200000", "--plot", ""]


def test_example_as_two_processes_matches_one_process(capfd):
  from examples import diloco as example

  with tempfile.TemporaryDirectory() as tmp:
    two, one = Path(tmp, "two.json"), Path(tmp, "one.json")
    # this process only checks the arguments and launches: it never starts JAX's backend
    assert example.main([*EXAMPLE, "--processes", "2", "--timeout", "300",
                         "--json", str(two)]) == 0
    printed = capfd.readouterr().out
    dist.launch_local([sys.executable, "-m", "examples.diloco", *EXAMPLE, "--json", str(one)],
                      1, devices_per_process=2, timeout=300, cwd=ROOT)
    two, one = json.loads(two.read_text()), json.loads(one.read_text())
  assert two["meta"]["processes"] == 2 and "2 processes" in two["meta"]["setting"]
  assert printed.count("round   1/2") == 1, printed  # process 1 prints nothing
  (a,), (b,) = two["results"], one["results"]
  # float32; one all-reduce of the two workers' pseudo-gradients, in another order at most
  np.testing.assert_allclose(a["histories"][0]["val_loss"], b["histories"][0]["val_loss"],
                             rtol=1e-5)
  assert a["histories"][0]["val_loss"][-1] < a["histories"][0]["val_loss"][0]  # it trained


def test_example_rejects_processes_that_do_not_divide_the_workers(capsys):
  from examples import diloco as example

  assert example.main(["--processes", "3", "--workers", "4"]) == 2
  assert "--workers 4 is not divisible by --processes 3" in capsys.readouterr().err
