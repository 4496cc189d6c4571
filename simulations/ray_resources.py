"""Where a simulation's departments run: a private Ray on this machine, or a Ray cluster of the user's.

Flower's Simulation Engine runs each simulated department's ClientApp in a Ray
actor; :class:`SimulationResources` says what Ray reserves for one (CPU cores,
a share of a GPU) and which Ray runs them.  Flower's federation config carries
only the reservations and ``ray.init``'s ``num_cpus``/``num_gpus``; the cluster
itself is named to ``ray.init`` through ``RAY_ADDRESS`` in the environment the
simulation process inherits (:meth:`SimulationResources.environment`).

A cluster of the user's own is theirs: its nodes decide their CPUs and GPUs
(``ray.init`` refuses ``num_cpus`` when it joins a running cluster), and its
security is its operators' (Ray runs any code sent to it unless its token
authentication is on, ``RAY_AUTH_MODE=token``; see ``docs/how-to/ray-cluster.md``).
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from typing import Mapping

from fedsilo.shared.flower_cli import FlowerError

# ``RAY_ADDRESS`` values that mean "start a fresh Ray here" rather than "join this cluster".
PRIVATE = ("", "local")
RAY_CLIENT_SCHEME = "ray://"
RAY_CLIENT_PORT = 10001  # Ray Client's default port, where ray:// names none
REACH_TIMEOUT_S = 5.0


def user_ray_cluster(environ: Mapping[str, str] | None = None, address: str | None = None) -> str | None:
    """The Ray cluster the simulation joins, else None (a private Ray on this machine).

    ``address`` (``--ray-address``) comes first; without it ``RAY_ADDRESS`` from
    the environment, as Ray itself reads it.  Empty and ``local`` mean a private
    instance, which the simulation keeps on loopback.
    """
    chosen = address if address is not None else (os.environ if environ is None else environ).get("RAY_ADDRESS", "")
    chosen = chosen.strip()
    return None if chosen.lower() in PRIVATE else chosen


@dataclass(frozen=True)
class SimulationResources:
    """What Ray reserves per simulated department, and on which Ray.

    Parameters
    ----------
    cpus_per_department : int
        CPU cores per department's actor (Flower's federation config takes whole cores).
    gpus_per_department : float
        GPUs per department's actor; a fraction shares one GPU between departments
        (0.25: four on one GPU).  0: none, the departments train on CPU.
    ray_address : str or None
        A running Ray cluster to join (``HOST:PORT`` of its GCS, ``ray://HOST[:PORT]``
        for Ray Client, or ``auto``); None for a private Ray on this machine.
    """

    cpus_per_department: int = 1
    gpus_per_department: float = 0.0
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.cpus_per_department, bool) or not isinstance(self.cpus_per_department, int) \
                or self.cpus_per_department < 1:
            raise ValueError(f"cpus_per_department must be a whole number of cores, at least 1; got {self.cpus_per_department!r}")
        gpus = self.gpus_per_department
        if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not math.isfinite(gpus) or gpus < 0:
            raise ValueError(f"gpus_per_department must be a finite number ≥ 0 (a fraction shares a GPU); got {gpus!r}")
        if gpus > 1 and gpus != int(gpus):
            raise ValueError(f"gpus_per_department above 1 must be whole GPUs (Ray's rule); got {gpus!r}")
        if self.ray_address is not None and (not self.ray_address.strip() or self.ray_address.strip().lower() in PRIVATE):
            raise ValueError("ray_address names a running cluster; use None for a private Ray on this machine")

    @property
    def on_cluster(self) -> bool:
        return self.ray_address is not None

    def federation_config(self, num_supernodes: int) -> str:
        """Flower's ``--federation-config`` for ``num_supernodes`` departments on these resources.

        A private Ray is told this machine's cores (Ray would otherwise take the
        cgroup's or the host's count); a cluster's nodes declared theirs when
        they started, and ``ray.init`` refuses ``num_cpus``/``num_gpus`` then.
        """
        if num_supernodes < 1:
            raise ValueError(f"a simulation needs at least one department; got {num_supernodes}")
        config = (f"num-supernodes={int(num_supernodes)} client-resources-num-cpus={self.cpus_per_department} "
                  f"client-resources-num-gpus={float(self.gpus_per_department):g}")
        if not self.on_cluster:
            config += f" init-args-num-cpus={os.cpu_count() or 1}"
        return config

    def environment(self) -> dict[str, str]:
        """What names the cluster to ``ray.init`` in the simulation process (nothing for a private Ray)."""
        return {"RAY_ADDRESS": self.ray_address} if self.ray_address is not None else {}

    def check_reachable(self, timeout: float = REACH_TIMEOUT_S) -> None:
        """Fail early, with the address, when nothing answers there (``auto`` is Ray's to find).

        Raises
        ------
        FlowerError
            If the address is malformed or no process accepts a connection there.
        """
        if self.ray_address is None or self.ray_address.strip().lower() == "auto":
            return
        host, port = parse_ray_address(self.ray_address)
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError as err:
            raise FlowerError(
                f"no Ray cluster answers at --ray-address {self.ray_address} ({err.strerror or err}); start its head "
                "with `ray start --head` there, or leave --ray-address out (and unset RAY_ADDRESS) for a private Ray "
                "on this machine"
            ) from None


def parse_ray_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``ray://HOST[:PORT]`` → (host, port); an IPv6 host in brackets.

    Raises
    ------
    FlowerError
        If it names no host, or no port where one is needed.
    """
    text = address.strip()
    client = text.lower().startswith(RAY_CLIENT_SCHEME)
    if client:
        text = text[len(RAY_CLIENT_SCHEME):]
    host, sep, port = text.rpartition(":")
    if text.startswith("[") and "]" in text:  # [::1]:6379
        inside, _, rest = text[1:].partition("]")
        host, sep, port = inside, ":" if rest.startswith(":") else "", rest[1:]
    elif not sep or "]" in port:
        host, port = text, ""
    if not host:
        raise FlowerError(f"--ray-address {address!r} names no host; give HOST:PORT of the cluster's head, e.g. 10.0.0.5:6379")
    if not port:
        if client:
            return host, RAY_CLIENT_PORT
        raise FlowerError(f"--ray-address {address!r} names no port; give HOST:PORT of the cluster's head, e.g. {host}:6379")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise FlowerError(f"--ray-address {address!r}: {port!r} is not a port (1-65535)")
    return host, int(port)
