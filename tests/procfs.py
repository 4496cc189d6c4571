"""What /proc says of processes and sockets: a process tree, its listening sockets, loopback or not.

For the tests that check where a simulation's servers listen (Ray's, Flower's) and where its
departments ran: read from the kernel, not from what the processes say of themselves.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

TCP_LISTEN = "0A"


# ----------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_tree(root: int) -> dict[int, str]:
    """``root`` and all its live descendants, each with its start time (to tell a reused PID)."""
    children: dict[int, list[int]] = {}
    started: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = _stat_fields(int(entry.name))
            except (OSError, IndexError):
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            started[int(entry.name)] = fields[19]
    tree, queue = {}, [root]
    while queue:
        pid = queue.pop()
        if pid in started:
            tree[pid] = started[pid]
        queue.extend(children.get(pid, []))
    return tree


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    except OSError:  # gone meanwhile
        pass
    return inodes


def proc_address(hex_address: str) -> tuple[str, int]:
    """``0100007F:1F90`` (/proc/net's little-endian words) -> ('127.0.0.1', 8080)."""
    host, port = hex_address.split(":")
    raw = b"".join(bytes.fromhex(host[i:i + 8])[::-1] for i in range(0, len(host), 8))
    return str(ipaddress.ip_address(raw)), int(port, 16)


def listening_sockets() -> dict[str, tuple[str, str, int]]:
    """Every TCP socket in LISTEN and every unconnected UDP socket: inode -> (protocol, host, port)."""
    found = {}
    for protocol in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{protocol}").read_text().splitlines()[1:]
        except OSError:  # no IPv6 here
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            listening = state == TCP_LISTEN if protocol.startswith("tcp") else remote.endswith(":0000")
            if listening:
                found[inode] = (protocol, *proc_address(local))
    return found


def is_loopback(host: str) -> bool:
    address = ipaddress.ip_address(host)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, a dual-stack socket's
    return (mapped or address).is_loopback


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
