"""An in-process secure-aggregation federation for the tests: identities, rosters, and a driver
that relays every message through its byte form, as a network would."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

from fedsilo.secagg import CoordinatorSession, DepartmentPolicy, DepartmentSession
from fedsilo.secagg.messages import MESSAGE_TYPES
from fedsilo.shared.signing import Signer

_BY_NAME = {cls.__name__: cls for cls in MESSAGE_TYPES}
_SIGNERS: dict[str, Signer] = {}


def signer(name: str) -> Signer:
    """One P-384 identity per name for the whole test session (key generation is the slow part)."""
    if name not in _SIGNERS:
        _SIGNERS[name] = Signer(ec.generate_private_key(ec.SECP384R1()))
    return _SIGNERS[name]


def wire(message):
    """The message after a trip through bytes."""
    return type(message).from_bytes(message.to_bytes())


@dataclass
class Federation:
    coordinator: CoordinatorSession
    departments: dict[str, DepartmentSession]
    names: list[str]
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(7))

    @property
    def params(self):
        return self.coordinator.params

    def inputs(self, max_value: int | None = None) -> dict[str, np.ndarray]:
        p = self.params
        high = (1 << p.modulus_bits) if max_value is None else max_value
        return {n: self.rng.integers(0, high, p.vector_length, dtype=np.uint64) for n in self.names}

    def setup(self, absent=()) -> None:
        """Advertise and deal; ``absent`` departments never answer."""
        request = self.coordinator.advertise_request()
        for name in self.names:
            if name not in absent:
                self.coordinator.receive_advertisement(wire(self.departments[name].advertise(wire(request))))
        share_request = self.coordinator.share_request()
        for name in self.coordinator.advertisements:
            self.coordinator.receive_shares(wire(self.departments[name].share(wire(share_request))))

    def mask(self, r: int, inputs, drop_before_mask=()) -> None:
        for name in self.coordinator.shares:
            request = self.coordinator.mask_request(name, r)
            if name not in drop_before_mask:
                self.coordinator.receive_masked(wire(self.departments[name].mask(wire(request), inputs[name])))

    def unmask(self, r: int, drop_before_unmask=()) -> np.ndarray:
        consistency = self.coordinator.consistency_request(r)
        responders = self.coordinator._rounds[r].responders
        if consistency is not None:
            for name in responders:
                if name not in drop_before_unmask:
                    self.coordinator.receive_consistency(wire(self.departments[name].sign_responders(wire(consistency))))
        request = self.coordinator.unmask_request(r)
        for name in responders:
            if name not in drop_before_unmask:
                self.coordinator.receive_unmasking(wire(self.departments[name].unmask(wire(request))))
        return self.coordinator.unmask(r)

    def round(self, r: int, inputs, drop_before_mask=(), drop_before_unmask=()) -> np.ndarray:
        self.mask(r, inputs, drop_before_mask)
        return self.unmask(r, drop_before_unmask)


def federation(n: int = 5, t: int = 3, bits: int = 32, length: int = 64, window: int = 2,
               run_key: str = "run-1", policy: DepartmentPolicy = DepartmentPolicy(), **coordinator) -> Federation:
    names = [f"dept{i}" for i in range(n)]
    roster = {name: signer(name).public_key for name in names}
    departments = {name: DepartmentSession(name, signer(name), roster, policy) for name in names}
    coord = CoordinatorSession(run_key, t, names, bits, length, window=window, **coordinator)
    return Federation(coord, departments, names)


def expected_sum(inputs, names, bits: int) -> np.ndarray:
    total = np.zeros_like(next(iter(inputs.values())))
    for name in names:
        total = total + inputs[name]
    return total & np.uint64((1 << bits) - 1)
