"""A worker restarted after a crash keeps the proxy's restart-only settings.

A reload applies what it can in place and warns that the rest (HSMs, audit log,
listening sockets, TLS mode) needs a restart. A worker that crashes afterwards must
not come back as the only one on the new HSM, audit chain key or TLS mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xks_proxy.config import ProxyConfig, parse_config
from xks_proxy.server.runner import respawn_config

SECRET = "PleaseReplaceThisWithSomeSecretOfLength43To64"


def config(tmp_path: Path, **sections: dict[str, Any]) -> ProxyConfig:
    document: dict[str, Any] = {
        "server": {"allow_plain_http": True, "state_dir": str(tmp_path / "state"), "workers": 2},
        "hsm": {"module": "/a.so", "token_label": "t", "pin": "1"},
        "key_stores": [
            {
                "name": "s",
                "uri_prefix": "p",
                "credentials": [
                    {"access_key_id": "BETWEEN2TENAND3TENCHARACTERS", "secret_access_key": SECRET}
                ],
            }
        ],
    }
    for name, values in sections.items():
        document[name] = {**document.get(name, {}), **values}
    return parse_config(document, base_dir=tmp_path)


def test_a_reload_of_reloadable_settings_is_taken_whole(tmp_path: Path) -> None:
    started = config(tmp_path)
    current = config(tmp_path, limits={"request_timeout_ms": 90})
    assert respawn_config(started, current) == current


def test_restart_only_settings_keep_their_start_up_values(tmp_path: Path) -> None:
    started = config(tmp_path)
    current = config(
        tmp_path,
        server={"workers": 4, "port": 9999, "keep_alive_seconds": 7},
        hsm={"module": "/b.so"},
        audit={"path": str(tmp_path / "elsewhere.jsonl"), "fsync": True},
        limits={"request_timeout_ms": 90},
        health={"probation_seconds": 5, "interval_seconds": 3},
    )
    respawned = respawn_config(started, current)
    assert respawned.hsms == started.hsms
    assert respawned.audit == started.audit
    assert respawned.server.workers == 2 and respawned.server.port == started.server.port
    assert respawned.health.probation_seconds == started.health.probation_seconds
    # ... while what a reload applies in place is the reloaded value.
    assert respawned.server.keep_alive_seconds == 7
    assert respawned.runtime.request_timeout_ms == 90 != started.runtime.request_timeout_ms
    assert respawned.health.interval_seconds == 3
    assert respawned.key_stores == current.key_stores
