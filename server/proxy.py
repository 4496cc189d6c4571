"""The coordinator's public face: nginx, serving the departments' Fleet API and nothing else.

Flower 1.41 serves Fleet, Control, Runtime and ``/docs`` on one listener.  The
SuperLink therefore listens on loopback only, and nginx — an established proxy,
from Debian's ``nginx`` package — terminates TLS on the public address with the
coordinator's certificate and forwards exactly the Fleet routes an
*authenticated* SuperNode calls (``flwr/supernode/fleet_http_connection.py``).
``register-node`` and ``unregister-node`` are left out: Flower disables them
when SuperNode authentication is on, and departments are registered by the
coordinator's operators.  Everything else answers 404 from nginx itself.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# POST routes a registered SuperNode uses; SuperNode authentication travels in
# the flwr-public-key / flwr-signature / flwr-timestamp headers, passed as they are.
FLEET_ROUTES = (
    "activate-node",
    "deactivate-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "push-object",
    "pull-object",
    "confirm-message-received",
)
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin")
PROXY_PACKAGE = "nginx"  # Debian/Ubuntu package that provides the binary
# Model updates travel as objects; one object can hold a whole layer.
MAX_BODY = "512m"


class ProxyError(RuntimeError):
    """The reverse proxy is missing, misconfigured or did not start."""


def nginx_binary() -> str:
    """The nginx executable, or a :class:`ProxyError` naming the package to install."""
    # Debian puts nginx in /usr/sbin, which is not on a normal user's PATH.
    found = shutil.which("nginx") or next(
        (str(Path(d) / "nginx") for d in SBIN_DIRS if (Path(d) / "nginx").exists()), None
    )
    if not found:
        raise ProxyError(
            "the coordinator's public address is served by nginx, which is not installed; "
            f"install it with `sudo apt-get install {PROXY_PACKAGE}` (or your distribution's "
            f"'{PROXY_PACKAGE}' package) and start the coordinator again"
        )
    return found


@dataclass(frozen=True)
class FleetProxy:
    """nginx in front of a loopback SuperLink.

    Parameters
    ----------
    folder : Path
        Where the configuration, pid file, logs and temporary files live
        (``STATE/proxy``).
    public_host, public_port : str, int
        The address departments connect to.
    upstream_port : int
        The SuperLink's loopback port.
    certificate, key, ca : Path
        The coordinator's TLS certificate and key, and the federation CA that
        nginx uses to verify the SuperLink behind it.
    """

    folder: Path
    public_host: str
    public_port: int
    upstream_port: int
    certificate: Path
    key: Path
    ca: Path

    @property
    def config_path(self) -> Path:
        return self.folder / "nginx.conf"

    @property
    def error_log(self) -> Path:
        return self.folder / "error.log"

    def render(self) -> str:
        """The nginx configuration: one TLS server, an allowlist of Fleet routes."""
        f = self.folder.resolve()
        user = _worker_user()
        listen = f"[{self.public_host}]" if ":" in self.public_host else self.public_host
        routes = "\n".join(
            f"        location = /v1/fleet/{route} {{ limit_except POST {{ deny all; }} proxy_pass https://superlink; }}"
            for route in FLEET_ROUTES
        )
        return f"""# Written by `fedsilo coordinator start`; rewritten at every start.
# Public: the departments' Fleet API only.  Control, Runtime, /docs and
# /openapi.json stay on the SuperLink's loopback listener.
{user}worker_processes 1;
pid {f}/nginx.pid;
error_log {f}/error.log warn;
daemon off;

events {{ worker_connections 512; }}

http {{
    access_log {f}/access.log;
    server_tokens off;
    client_body_temp_path {f}/tmp/body;
    proxy_temp_path {f}/tmp/proxy;
    fastcgi_temp_path {f}/tmp/fastcgi;
    uwsgi_temp_path {f}/tmp/uwsgi;
    scgi_temp_path {f}/tmp/scgi;
    client_max_body_size {MAX_BODY};
    # Stream bodies both ways: no temporary files (workers run as nobody and
    # cannot enter the 0700 state folder), and no copy of any update on disk.
    proxy_request_buffering off;
    proxy_buffering off;
    client_body_buffer_size 1m;
    proxy_read_timeout 300s;
    proxy_send_timeout 300s;

    upstream superlink {{
        server 127.0.0.1:{self.upstream_port};
        keepalive 16;
    }}

    server {{
        listen {listen}:{self.public_port} ssl;
        ssl_certificate {self.certificate.resolve()};
        ssl_certificate_key {self.key.resolve()};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_prefer_server_ciphers on;

        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host 127.0.0.1;
        proxy_ssl_verify on;
        proxy_ssl_trusted_certificate {self.ca.resolve()};
        proxy_ssl_name localhost;  # a SAN of every coordinator certificate (certs init)
        proxy_ssl_protocols TLSv1.2 TLSv1.3;

{routes}
        # Control, Runtime, /docs, /openapi.json and anything unknown.
        location / {{ return 404; }}
    }}
}}
"""

    def write(self) -> Path:
        """Write the configuration (and its folders) into the state folder."""
        tmp = self.folder / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.render(), encoding="utf-8")
        if os.geteuid() == 0:  # workers run as nobody and write their temporary files here
            uid, gid = _nobody()
            for path in (tmp, *[tmp / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")]):
                path.mkdir(exist_ok=True)
                os.chown(path, uid, gid)
        return self.config_path

    def command(self) -> list[str]:
        return [nginx_binary(), "-p", str(self.folder.resolve()), "-c", str(self.config_path.resolve()),
                "-e", str(self.error_log.resolve())]

    def check(self) -> None:
        """``nginx -t`` on the written configuration; a :class:`ProxyError` with nginx's words."""
        result = subprocess.run([*self.command(), "-t"], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            words = " | ".join(line for line in result.stderr.splitlines() if "emerg" in line or "crit" in line)
            raise ProxyError(f"nginx rejected {self.config_path}: {words or result.stderr.strip()}")

    def launch(self, process_group: int, stdout=None) -> subprocess.Popen:
        """Start nginx in the foreground, in the coordinator's process group."""
        return subprocess.Popen(
            self.command(), stdout=stdout, stderr=subprocess.STDOUT, process_group=process_group
        )


def _nobody() -> tuple[int, int]:
    user = pwd.getpwnam("nobody")
    return user.pw_uid, user.pw_gid


def _worker_user() -> str:
    """Only root can switch users: then workers drop to nobody (never root)."""
    if os.geteuid() != 0:
        return ""
    uid, gid = _nobody()
    return f"user {pwd.getpwuid(uid).pw_name} {grp.getgrgid(gid).gr_name};\n"
