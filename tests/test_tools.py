"""Every program the suite runs is installed by `scripts/install --test`.

Tests that need a third-party program skip when it is missing, so a missing package would
only show as a skip; this test fails instead, naming the program and its Debian package."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

INSTALL = Path(__file__).resolve().parents[1] / "scripts" / "install"

# program -> the Debian package that provides it
PROGRAMS = {
    "kamailio": "kamailio", "kamcmd": "kamailio", "sipp": "sip-tester", "baresip": "baresip-core",
    "openvpn": "openvpn", "wireguard-go": "wireguard-go", "wg": "wireguard-tools",
    "ip": "iproute2", "ss": "iproute2", "iptables": "iptables", "ping": "iputils-ping",
    "socat": "socat", "setpriv": "util-linux", "unshare": "util-linux", "stdbuf": "coreutils",
    "turnserver": "coturn", "conntrack": "conntrack", "dnsmasq": "dnsmasq-base",
    "systemd-analyze": "systemd", "chromium": "chromium", "openssl": "openssl",
    "freeradius": "freeradius",
    "miniupnpd": "miniupnpd-nftables", "nft": "nftables",
}


def apt_packages() -> set[str]:
    match = re.search(r"^APT_PACKAGES=\(([^)]*)\)", INSTALL.read_text(), re.MULTILINE)
    assert match, "no APT_PACKAGES=(...) in scripts/install"
    return set(match.group(1).split())


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_program_is_installed_by_scripts_install(program: str) -> None:
    package = PROGRAMS[program]
    assert package in apt_packages(), f"{package} (for {program}) is not in scripts/install's APT_PACKAGES"
    assert shutil.which(program) or Path("/usr/sbin", program).exists(), \
        f"{program} is not installed: run 'bash scripts/install --test' (Debian package {package})"


@pytest.mark.parametrize("package, names", [
    # the mesh roster on Kamailio (tests/test_roster_kamailio.py)
    ("kamailio-presence-modules", ("presence", "presence_reginfo", "pua", "pua_reginfo")),
    # Kamailio's digest check by RADIUS (tests/test_radius.py)
    ("kamailio-radius-modules", ("auth_radius",)),
])
def test_kamailios_extra_modules_are_installed(package: str, names: tuple[str, ...]) -> None:
    assert package in apt_packages()
    modules = sorted(Path("/usr/lib").glob("*/kamailio/modules")) + [Path("/usr/lib/kamailio/modules")]
    for name in names:
        assert any((d / f"{name}.so").exists() for d in modules), \
            f"Kamailio's {name} module is missing: run 'bash scripts/install --test' ({package})"
