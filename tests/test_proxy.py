"""The coordinator's nginx configuration and start-up checks (no SuperLink needed)."""

from __future__ import annotations

import re

import pytest

from fedsilo.certs.authority import init
from fedsilo.server import proxy
from fedsilo.server.coordinator import Coordinator
from fedsilo.server.proxy import FLEET_ROUTES, FleetProxy, ProxyError


def _proxy(tmp_path, certs):
    return FleetProxy(tmp_path / "proxy", "0.0.0.0", 9443, 40000, certs.coordinator_cert, certs.coordinator_key, certs.ca_cert)


def test_only_the_fleet_routes_a_registered_supernode_uses_are_forwarded(tmp_path):
    text = _proxy(tmp_path, init(tmp_path / "certs")).render()
    forwarded = re.findall(r"location = (\S+) \{ limit_except POST \{ deny all; \} proxy_pass https://superlink; \}", text)
    assert forwarded == [f"/v1/fleet/{r}" for r in FLEET_ROUTES]
    assert text.count("proxy_pass") == len(FLEET_ROUTES)  # nothing else reaches the SuperLink
    assert "register-node" not in {r for r in FLEET_ROUTES}  # disabled by Flower under SuperNode auth
    assert re.search(r"location / \{ return 404; \}", text)
    assert "server 127.0.0.1:40000" in text and "listen 0.0.0.0:9443 ssl" in text
    assert "proxy_ssl_verify on" in text  # nginx checks the SuperLink's certificate too
    locations = re.findall(r"location (?:= )?(\S+) \{", text)
    assert locations == [*forwarded, "/"]  # Control, Runtime, /docs, /openapi.json: only the 404 catch-all


def test_the_configuration_is_valid_nginx(tmp_path):
    built = _proxy(tmp_path, init(tmp_path / "certs"))
    built.write()
    built.check()  # nginx -t: raises ProxyError with nginx's words otherwise


def test_a_broken_configuration_is_reported_with_nginx_words(tmp_path):
    built = _proxy(tmp_path, init(tmp_path / "certs"))
    built.write()
    built.config_path.write_text(built.config_path.read_text().replace("worker_processes 1;", "worker_processes;"))
    with pytest.raises(ProxyError, match="nginx rejected"):
        built.check()


def test_missing_nginx_names_the_package_and_starts_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(proxy.shutil, "which", lambda name: None)
    monkeypatch.setattr(proxy, "SBIN_DIRS", (str(tmp_path / "empty"),))
    init(tmp_path / "certs")
    coordinator = Coordinator(tmp_path / "certs", "127.0.0.1:9443", tmp_path / "state")
    with pytest.raises(ProxyError, match=r"apt-get install nginx"):
        coordinator.launch()
    assert not (tmp_path / "state" / "superlink.db").exists()  # no SuperLink was started
    assert not (tmp_path / "state" / "coordinator.json").exists()


def test_the_loopback_port_is_never_the_public_one(tmp_path, monkeypatch):
    """The SuperLink's port is picked while the public one is still unbound: it must not be handed out twice."""
    from fedsilo.shared import flower_cli

    init(tmp_path / "certs")
    with pytest.raises(ValueError, match=r"--control-port 9443 is the public port"):
        Coordinator(tmp_path / "certs", "127.0.0.1:9443", tmp_path / "state", control_port=9443).launch()
    assert not (tmp_path / "state" / "superlink.db").exists()

    handed_out = iter([9443, 9443, 9555])  # what a kernel may return for successive bind(0) probes

    class Probe:
        def __init__(self, *args):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            self.port = next(handed_out)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(flower_cli.socket, "socket", Probe)
    assert flower_cli.free_port("127.0.0.1", avoid={9443}) == 9555
