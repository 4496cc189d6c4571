"""Masks and arithmetic in Z_{2^k}.

A mask is the ChaCha20 keystream of a 32-byte key (fixed all-zero nonce: every
key is derived for one use only) read as little-endian uint64 words and reduced
mod 2^k.  Since 2^k divides 2^64, numpy's wrapping uint64 arithmetic followed by
a bit mask is exact arithmetic mod 2^k.  On the wire an element takes k bits, not
64 (:func:`to_bytes`).
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

MIN_BITS, MAX_BITS = 8, 62
_CHUNK = 1 << 15  # elements packed or unpacked at a time (a multiple of 8: whole bytes)
_NONCE = bytes(16)  # cryptography's ChaCha20 nonce: 4-byte counter + 12-byte nonce


def prg(key: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` words of the keystream of ``key``, each reduced mod 2^bits."""
    encryptor = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(8 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64) & modulus_mask(bits)


def modulus_mask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1)


def add(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    return (a + b) & modulus_mask(bits)


def subtract(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    return (a - b) & modulus_mask(bits)


def check_element(values: np.ndarray, length: int, bits: int) -> np.ndarray:
    """``values`` as a vector of Z_{2^bits}: uint64, shape (length,), every entry < 2^bits."""
    values = np.asarray(values)
    if values.dtype != np.uint64:
        raise ValueError(f"a secure-aggregation input must be numpy uint64, not {values.dtype}")
    if values.shape != (length,):
        raise ValueError(f"a secure-aggregation input must have shape ({length},), not {values.shape}")
    if values.size and int(values.max()) >> bits:
        raise ValueError(f"a secure-aggregation input has entries of 2^{bits} or more")
    return values


def packed_size(length: int, bits: int) -> int:
    """Bytes of ``length`` elements of Z_{2^bits} packed by :func:`to_bytes`: ⌈length·bits / 8⌉."""
    return (length * bits + 7) // 8


def to_bytes(values: np.ndarray, bits: int) -> bytes:
    """Elements of Z_{2^bits} packed ``bits`` bits each: element i holds stream bits [i·bits, (i+1)·bits),
    least significant first, in bytes read least significant bit first; the last byte's unused bits are 0."""
    _check_bits(bits)
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"a masked vector is one-dimensional, not of shape {array.shape}")
    array = check_element(array, array.shape[0], bits)
    shifts = np.arange(bits, dtype=np.uint64)
    # In chunks of a multiple of 8 elements (whole bytes each), so the bit matrix stays small.
    return b"".join(
        np.packbits(((array[i:i + _CHUNK, None] >> shifts) & np.uint64(1)).astype(np.uint8).ravel(),
                    bitorder="little").tobytes()
        for i in range(0, array.shape[0], _CHUNK))


def from_bytes(data: bytes, length: int, bits: int) -> np.ndarray:
    """The inverse of :func:`to_bytes`; ``ValueError`` for a wrong size or non-zero padding bits."""
    _check_bits(bits)
    expected = packed_size(length, bits)
    if len(data) != expected:
        raise ValueError(f"a masked vector of length {length} in {bits}-bit words takes {expected} bytes, "
                         f"not {len(data)}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if length * bits % 8 and raw[-1] >> (length * bits % 8):
        raise ValueError("a masked vector's padding bits are not zero: not a canonical encoding")
    shifts = np.arange(bits, dtype=np.uint64)
    out = np.empty(length, dtype=np.uint64)
    step = _CHUNK * bits // 8  # bytes per chunk of elements
    for start in range(0, length, _CHUNK):
        count = min(_CHUNK, length - start)
        chunk = np.unpackbits(raw[start // _CHUNK * step:][:step], bitorder="little", count=count * bits)
        out[start:start + count] = (chunk.reshape(count, bits).astype(np.uint64) << shifts).sum(axis=1, dtype=np.uint64)
    return out


def encode_signed(values, bits: int) -> np.ndarray:
    """Signed integers in [-2^(bits-1), 2^(bits-1)) as elements of Z_{2^bits} (two's complement)."""
    _check_bits(bits)
    array = np.asarray(values)
    if array.dtype.kind not in "iu":
        raise ValueError(f"encode_signed needs integers, not {array.dtype}")
    array = array.astype(np.int64)
    low, high = -(1 << (bits - 1)), (1 << (bits - 1))
    if array.size and (int(array.min()) < low or int(array.max()) >= high):
        raise ValueError(f"values outside [{low}, {high}) do not fit {bits} bits")
    return array.astype(np.uint64) & modulus_mask(bits)


def decode_signed(values: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of :func:`encode_signed`: elements of Z_{2^bits} as int64."""
    _check_bits(bits)
    array = np.asarray(values, dtype=np.uint64)
    if array.size and int(array.max()) >> bits:
        raise ValueError(f"values of 2^{bits} or more are not elements of Z_2^{bits}")
    signed = array.astype(np.int64)
    return np.where(signed >= (1 << (bits - 1)), signed - (1 << bits), signed)


def required_bits(max_abs: int, n: int) -> int:
    """The least k (at least 8) such that a sum of ``n`` integers with |x| <= ``max_abs`` cannot wrap
    in Z_{2^k} read as signed: n * max_abs < 2^(k-1).  Above 62 bits: ``ValueError``."""
    if max_abs < 0 or n < 1:
        raise ValueError("required_bits needs max_abs >= 0 and n >= 1")
    bits = max(MIN_BITS, (int(n) * int(max_abs)).bit_length() + 1)
    if bits > MAX_BITS:
        raise ValueError(f"a sum of {n} values of magnitude {max_abs} needs {bits} bits; at most {MAX_BITS}")
    return bits


def _check_bits(bits: int) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"modulus bits must be in [{MIN_BITS}, {MAX_BITS}], not {bits}")
