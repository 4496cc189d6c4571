"""Deployment overhead: seconds per round of a real TLS deployment on loopback vs the same work simulated.

The deployment is started the way an operator starts one, through the ``fedsilo``
CLI, each part a real process on 127.0.0.1 (free ports): ``certs init``, three
``certs add-department``, ``coordinator start --state STATE`` (flower-superlink
on a loopback port, flower-superexec for the ServerApp, nginx on the public
address forwarding only the Fleet routes), ``coordinator register --state
STATE``, three ``department start`` (finance, hr, sales: a third each of
scikit-learn's digits as CSV tables; each a flower-supernode in process
isolation plus fedsilo's long-lived executor in the ``department start``
process), then ``coordinator run --state STATE --rounds R --min-departments 3``.
Seconds per round come from the run's ``summary.json`` (the ServerApp's own
clock).  The same work is then simulated: ``fedsilo simulate --departments 3
--rounds R --partition iid`` on one CSV of the same digits (the simulation holds
out the same 20 % and gives each department a third of the rest).

Where the time goes is read from events the processes log, stamped on one clock
(everything runs on this machine):

* each department's output is read through a pipe and every line stamped on
  arrival: the SuperNode's ``Receiving: train message`` / ``Received
  successfully`` / ``Sending: train message`` / ``Sent successfully`` and the
  budget guard's ``[NAME] round K: ε=…`` line from the executor;
* each department's ledger entry carries the executor's own timestamp (the ε
  line follows it: their difference is the stamps' relay latency, reported);
* ``summary.json`` is rewritten after every round: the sampler (every 0.1 s)
  keeps the modification time of each version that adds a round; a round runs
  from the previous write to its own, and the ServerApp's ``seconds`` is
  compared with that span;
* the SuperLink's database keeps Flower's own total of the ClientApp runtime
  (from the executor's pull of a message to its push of the reply), read after
  the run;
* the sampler also records every process under each department, which shows
  whether anything is started per message;
* a fresh interpreter (``--probe``) times a department's own work alone: the
  one-off import, its table, one ε, a cold and a warm ``train_dp``, and one
  evaluation of the coordinator's kind;
* the polling intervals are Flower's and fedsilo's constants, cited by file and
  checked against the installed code by the tests.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..common import BenchResult
from .data import DEPARTMENTS, write_data
from .measure import run_deployment, run_secure_deployment, run_simulation
from .present import NAME, PLOT, build_result, format_s, from_raw, rerender
from .probe import run_probe
from .processes import progress

__all__ = ["NAME", "PLOT", "build_result", "from_raw", "rerender", "run"]

QUICK_ROUNDS = 1
FULL_ROUNDS = 5


def run(out: Path, quick: bool, smoke: bool = False) -> BenchResult:
    """The benchmark; ``smoke`` (the test suite's) is quick mode: one round is already its smallest size."""
    quick = quick or smoke
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rounds = QUICK_ROUNDS if quick else FULL_ROUNDS
    logs = out / "deployment"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    root = Path(tempfile.mkdtemp(prefix="fedsilo-bench-deploy-"))
    try:
        data = write_data(root / "data")
        progress(f"TLS deployment on loopback, 3 departments × {rounds} round(s) …")
        deploy = run_deployment(root, data, rounds, logs)
        deploy["examples"] = sum(1 for _ in open(data[DEPARTMENTS[0]])) - 1
        progress(f"  rounds {', '.join(format_s(s) for s in deploy['seconds'])} s")
        progress(f"simulation, 3 departments × {rounds} round(s) …")
        sim = run_simulation(data, rounds, root / "sim", logs / "simulate.log")
        progress(f"  rounds {', '.join(format_s(s) for s in sim['seconds'])} s")
        progress("a department's own work in a fresh interpreter …")
        probe_result = run_probe(data[DEPARTMENTS[0]], data["test"], repeats=1 if quick else 3)
        secure = None
        if not smoke:  # the smoke run's budget: the secure modes over TLS are tests/test_deployment_resume.py's
            progress(f"secure aggregation and distributed DP over TLS, 3 departments × {rounds} round(s) …")
            secure = run_secure_deployment(root / "secure", data, rounds, logs)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return build_result(deploy, sim, probe_result, out, quick, rounds, secure=secure)
