"""The cr-proxy command as a user runs it: exit codes and messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    return subprocess.run([sys.executable, "-m", "cr_proxy", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=60)


def test_config_prints_effective_settings_with_secrets_masked(tmp_path: Path) -> None:
    secret = tmp_path / "ghcr"
    secret.write_text("s3cr3t-password\n")
    conf = tmp_path / "c.yml"
    conf.write_text(
        f"registries:\n  ghcr.io: {{username: bot, password_file: {secret}}}\n"
        "endpoints:\n  registry.example: http://10.0.0.5:5000\n"
    )
    result = run("config", "--config", str(conf), env={"CR_PROXY_TAG_TTL": "60",
                                                        "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "s3cr3t" not in result.stdout + result.stderr
    assert "password: '********'" in result.stdout
    assert "tag_ttl: 60.0" in result.stdout
    assert "registry.example: http://10.0.0.5:5000" in result.stdout


def test_unknown_key_stops_with_message_naming_it(tmp_path: Path) -> None:
    conf = tmp_path / "c.yml"
    conf.write_text("listen:\n  mirror_htp: 127.0.0.1:5000\n")
    result = run("config", "--config", str(conf))
    assert result.returncode == 1
    assert "listen.mirror_htp" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_value_from_environment_names_the_variable(tmp_path: Path) -> None:
    result = run("config", env={"CR_PROXY_TIMEOUTS__CONNECT": "soon", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert "timeouts.connect" in result.stderr


def test_config_check_renders_and_runs_nginx_t(tmp_path: Path) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/bin", "CR_PROXY_CACHE_DIR": str(tmp_path / "cache"),
           "CR_PROXY_CERTS_DIR": str(tmp_path / "certs"), "CR_PROXY_RUN_DIR": str(tmp_path / "run")}
    result = run("config", "--check", env=env)
    assert result.returncode == 0, result.stderr
    assert "nginx configuration OK" in result.stderr
    assert (tmp_path / "run/nginx.conf").is_file()
    key = tmp_path / "certs/ca.key"
    assert key.stat().st_mode & 0o777 == 0o600


def test_ca_prints_pem_and_fingerprint(tmp_path: Path) -> None:
    result = run("ca", env={"CR_PROXY_CERTS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0
    assert result.stdout.startswith("-----BEGIN CERTIFICATE-----")
    assert "SHA-256 fingerprint:" in result.stderr
    assert "PRIVATE KEY" not in result.stdout


def test_no_command_lists_the_commands() -> None:
    result = run()
    assert result.returncode == 2
    assert "serve" in result.stderr and "config" in result.stderr


def test_warm_usage_errors_exit_2_and_a_bad_platform_1(tmp_path: Path) -> None:
    """`cr-proxy warm`'s checks before any fetcher starts (cli.cmd_warm)."""
    conf = tmp_path / "c.yml"
    conf.write_text(f"cache_dir: {tmp_path / 'cache'}\nrun_dir: {tmp_path / 'run'}\n")
    nothing = run("warm", "--config", str(conf))
    assert nothing.returncode == 2
    assert "no image given" in nothing.stderr
    no_jobs = run("warm", "--config", str(conf), "--jobs", "0", "alpine")
    assert no_jobs.returncode == 2
    assert "--jobs must be at least 1" in no_jobs.stderr
    platform = run("warm", "--config", str(conf), "--platform", "linux", "alpine")
    assert platform.returncode == 1
    assert "expected os/arch[/variant]" in platform.stderr
    assert not (tmp_path / "run").exists()  # no fetcher was started for any of them


def test_the_systems_errors_are_one_line_too(tmp_path: Path) -> None:
    """A cache directory that cannot be made (a file in the way), a
    configuration file that is not text: one line naming it, exit 1, no
    traceback (a review finding, session 13)."""
    (tmp_path / "afile").write_text("in the way\n")
    conf = tmp_path / "c.yml"
    conf.write_text(f"cache_dir: {tmp_path / 'afile' / 'cache'}\n")
    result = run("ls", "--config", str(conf))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "afile" in result.stderr
    assert result.stderr.count("\n") == 1
    (tmp_path / "latin1.yml").write_bytes(b"log_level: d\xe9bug\n")
    result = run("config", "--config", str(tmp_path / "latin1.yml"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
