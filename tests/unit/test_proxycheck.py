"""containerd's (and CRI-O's) proxy environment: systemd units, drop-ins, /proc, and doctor.

The unit directories and /proc are built in tmp dirs, laid out as systemd and Linux
lay them out.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mirrorproxy.cli import main
from mirrorproxy.clientconf.doctor import run_doctor
from mirrorproxy.clientconf.proxycheck import (
    check_daemon,
    read_unit_env,
    running,
    running_envs,
    unit_files,
)

UNIT = "containerd.service"
SITE = "http://10.0.0.5:5000"
VENDOR_UNIT = """\
[Unit]
Description=containerd container runtime

[Service]
ExecStart=/usr/bin/containerd
Environment="GOTRACEBACK=crash"
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(/etc/systemd/system, /lib/systemd/system) with the vendor's unit in the second."""
    etc, lib = tmp_path / "etc", tmp_path / "lib"
    write(lib / UNIT, VENDOR_UNIT)
    etc.mkdir(exist_ok=True)
    return etc, lib


def environ(etc: Path, lib: Path) -> dict[str, tuple[str, Path]]:
    return read_unit_env(unit_files(UNIT, [etc, lib])).env


# --- reading units


def test_unit_and_drop_ins_in_systemds_order(tmp_path: Path) -> None:
    etc, lib = dirs(tmp_path)
    a = write(lib / f"{UNIT}.d" / "10-vendor.conf", "[Service]\nEnvironment=A=lib\n")
    b = write(etc / f"{UNIT}.d" / "20-proxy.conf", "[Service]\nEnvironment=A=etc\n")
    # The same name in /etc hides the one in /lib.
    hidden = write(lib / f"{UNIT}.d" / "20-proxy.conf", "[Service]\nEnvironment=A=hidden\n")
    files = unit_files(UNIT, [etc, lib])
    assert files == (lib / UNIT, a, b)
    assert hidden not in files
    env = environ(etc, lib)
    assert env["A"] == ("etc", b)
    assert env["GOTRACEBACK"] == ("crash", lib / UNIT)
    # A unit file in /etc replaces the vendor's.
    write(etc / UNIT, "[Service]\nExecStart=/usr/local/bin/containerd\n")
    assert unit_files(UNIT, [etc, lib])[0] == etc / UNIT


def test_environment_syntax(tmp_path: Path) -> None:
    etc, lib = dirs(tmp_path)
    write(
        etc / f"{UNIT}.d" / "http-proxy.conf",
        "# comment\n"
        "[Unit]\nEnvironment=NOT=service\n"
        "[Service]\n"
        '; another comment\nEnvironment="HTTPS_PROXY=http://p:3128" NO_PROXY=a,b \\\n'
        "  ONE=1\n"
        "Environment='SPACED=x y'\n",
    )
    env = {k: v for k, (v, _) in environ(etc, lib).items()}
    assert env == {
        "GOTRACEBACK": "crash",
        "HTTPS_PROXY": "http://p:3128",
        "NO_PROXY": "a,b",
        "ONE": "1",
        "SPACED": "x y",
    }


def test_empty_assignment_resets_and_env_files_win(tmp_path: Path) -> None:
    etc, lib = dirs(tmp_path)
    env_file = write(
        tmp_path / "proxy.env", 'export HTTPS_PROXY="http://file:1"\n# x\nNO_PROXY=f\n'
    )
    write(
        etc / f"{UNIT}.d" / "a.conf",
        f"[Service]\nEnvironment=\nEnvironment=HTTPS_PROXY=http://unit:1 KEEP=1\n"
        f"EnvironmentFile={env_file}\nEnvironmentFile=-{tmp_path / 'missing.env'}\n",
    )
    unit_env = read_unit_env(unit_files(UNIT, [etc, lib]))
    assert "GOTRACEBACK" not in unit_env.env  # reset by the empty Environment=
    assert unit_env.env["HTTPS_PROXY"] == ("http://file:1", env_file)
    assert unit_env.env["NO_PROXY"] == ("f", env_file)
    assert unit_env.env["KEEP"][0] == "1"
    assert unit_env.unreadable == ()
    write(etc / f"{UNIT}.d" / "b.conf", f"[Service]\nEnvironmentFile={tmp_path / 'gone.env'}\n")
    assert read_unit_env(unit_files(UNIT, [etc, lib])).unreadable == (tmp_path / "gone.env",)
    write(etc / f"{UNIT}.d" / "c.conf", "[Service]\nEnvironmentFile=\n")
    assert read_unit_env(unit_files(UNIT, [etc, lib])).unreadable == ()


# --- /proc


def fake_proc(tmp_path: Path, procs: dict[int, tuple[str, dict[str, str] | None]]) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    write(proc / "sys" / "x", "")
    for pid, (comm, env) in procs.items():
        write(proc / str(pid) / "comm", comm + "\n")
        if env is not None:
            raw = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())
            (proc / str(pid) / "environ").write_bytes(raw)
    (proc / "77").mkdir()  # a process that exited while we looked
    return proc


def test_running_processes_by_name(tmp_path: Path) -> None:
    proc = fake_proc(
        tmp_path,
        {
            12: ("containerd", {"HTTPS_PROXY": "http://p:1", "A": "b=c"}),
            9: ("containerd-shim", {}),
            100: ("containerd", None),  # environ unreadable
        },
    )
    assert list(running_envs(proc, "containerd")) == [
        (12, {"HTTPS_PROXY": "http://p:1", "A": "b=c"}),
        (100, None),
    ]
    assert running(None, "containerd") == []
    assert running(tmp_path / "nope", "containerd") == []


# --- the checks


def test_site_mirror_behind_https_proxy_names_the_drop_in(tmp_path: Path) -> None:
    etc, lib = dirs(tmp_path)
    drop_in = write(
        etc / f"{UNIT}.d" / "http-proxy.conf",
        '[Service]\nEnvironment="HTTPS_PROXY=http://proxy.corp:3128"\n',
    )
    env = read_unit_env(unit_files(UNIT, [etc, lib]))
    [finding] = check_daemon(UNIT, "containerd", env, [], "https://10.0.0.5:5000", etc)
    assert "HTTPS_PROXY=http://proxy.corp:3128" in finding.problem
    assert f"from {drop_in}" in finding.problem
    assert "NO_PROXY (unset) does not cover it" in finding.problem
    assert finding.fix == (
        f'set Environment="NO_PROXY=10.0.0.5" in {drop_in}, '
        f"then systemctl daemon-reload; systemctl restart {UNIT}"
    )
    # An http:// mirror is not affected by HTTPS_PROXY: Go picks the proxy by scheme.
    assert check_daemon(UNIT, "containerd", env, [], SITE, etc) == []
    # Nor is a node-local one, whatever the proxy.
    assert check_daemon(UNIT, "containerd", env, [], "https://127.0.0.1:5000", etc) == []


def test_fix_extends_the_no_proxy_already_there(tmp_path: Path) -> None:
    etc, lib = dirs(tmp_path)
    write(etc / f"{UNIT}.d" / "10-proxy.conf", "[Service]\nEnvironment=http_proxy=http://p:1\n")
    no_proxy = write(
        etc / f"{UNIT}.d" / "20-no-proxy.conf",
        "[Service]\nEnvironment=no_proxy=.corp,10.1.0.0/16\n",
    )
    env = read_unit_env(unit_files(UNIT, [etc, lib]))
    [finding] = check_daemon(UNIT, "containerd", env, [], SITE, etc)
    assert "http_proxy=http://p:1" in finding.problem
    assert f'set Environment="no_proxy=.corp,10.1.0.0/16,10.0.0.5" in {no_proxy},' in finding.fix
    write(etc / f"{UNIT}.d" / "30.conf", "[Service]\nEnvironment=no_proxy=10.0.0.0/8\n")
    env = read_unit_env(unit_files(UNIT, [etc, lib]))
    assert check_daemon(UNIT, "containerd", env, [], SITE, etc) == []


def test_proxy_in_vendor_unit_or_env_file(tmp_path: Path) -> None:
    etc, lib = dirs(tmp_path)
    write(lib / UNIT, VENDOR_UNIT + "Environment=HTTP_PROXY=http://p:1\n")
    env = read_unit_env(unit_files(UNIT, [etc, lib]))
    [finding] = check_daemon(UNIT, "containerd", env, [], SITE, etc)
    # Never the vendor's unit file: a drop-in in /etc/systemd/system instead.
    assert f"in {etc / (UNIT + '.d') / 'http-proxy.conf'}, then" in finding.fix
    env_file = write(tmp_path / "env", "HTTP_PROXY=http://p:1\n")
    write(etc / f"{UNIT}.d" / "env.conf", f"[Service]\nEnvironmentFile={env_file}\n")
    env = read_unit_env(unit_files(UNIT, [etc, lib]))
    [finding] = check_daemon(UNIT, "containerd", env, [], SITE, etc)
    assert f"set NO_PROXY=10.0.0.5 in {env_file}, then" in finding.fix


def test_running_daemon(tmp_path: Path) -> None:
    etc, lib = dirs(tmp_path)
    env = read_unit_env(unit_files(UNIT, [etc, lib]))
    procs: list[tuple[int, dict[str, str] | None]] = [
        (41, {"HTTP_PROXY": "http://p:1"}),
        (42, {"HTTP_PROXY": "http://p:1", "NO_PROXY": "10.0.0.5"}),
        (43, None),
    ]
    stale, unreadable = check_daemon(UNIT, "containerd", env, procs, SITE, etc)
    assert "the running containerd (pid 41) has HTTP_PROXY=http://p:1" in stale.problem
    assert stale.fix.startswith(f"systemctl restart {UNIT} (its unit files already")
    assert unreadable.problem == "cannot read /proc/43/environ of containerd"
    # Started some other way: no unit to restart.
    [finding] = check_daemon(UNIT, "containerd", read_unit_env(()), procs[:1], SITE, etc)
    assert finding.fix.startswith("add the mirror's host to NO_PROXY where containerd")


# --- through doctor


@pytest.fixture
def node(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A node whose containerd runs behind a corporate proxy: (config.toml, etc, proc)."""
    etc, _ = dirs(tmp_path)
    write(etc / f"{UNIT}.d" / "http-proxy.conf", "[Service]\nEnvironment=HTTP_PROXY=http://p:1\n")
    proc = fake_proc(tmp_path, {300: ("containerd", {"HTTP_PROXY": "http://p:1"})})
    certs = tmp_path / "certs.d"
    write(
        certs / "docker.io" / "hosts.toml",
        f'[host."{SITE}"]\ncapabilities = ["pull", "resolve"]\n',
    )
    config = write(
        tmp_path / "config.toml",
        f'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\nconfig_path = "{certs}"\n',
    )
    return config, etc, proc


def test_doctor_finds_the_proxy_in_unit_and_process(node: tuple[Path, Path, Path]) -> None:
    config, etc, proc = node
    findings, _ = run_doctor(
        containerd_config=config,
        hosts_dir=None,
        mirror_url=None,  # read from hosts.toml
        containerd_version=(1, 6),
        systemd_dirs=[etc, etc.parent / "lib"],
        proc_dir=proc,
        probe=False,  # tests dial nothing but loopback
    )
    problems = [f.problem for f in findings]
    assert problems[0].startswith("containerd.service: HTTP_PROXY=http://p:1 (from ")
    assert problems[1].startswith("the running containerd (pid 300) has HTTP_PROXY")
    assert len(findings) == 2


def test_cli_doctor_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    etc, lib = dirs(tmp_path)
    write(etc / f"{UNIT}.d" / "env.conf", f"[Service]\nEnvironmentFile={tmp_path / 'gone'}\n")
    proc = fake_proc(tmp_path, {300: ("containerd", None)})
    certs = tmp_path / "certs.d"
    closed = "http://127.0.0.1:9"
    write(
        certs / "docker.io" / "hosts.toml",
        f'[host."{closed}"]\ncapabilities = ["pull", "resolve"]\n',
    )
    config = write(
        tmp_path / "config.toml",
        f'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\nconfig_path = "{certs}"\n',
    )
    args = ["doctor", "--containerd-config", str(config), "--proc-dir", str(proc)]
    args += ["--systemd-dir", str(etc), "--systemd-dir", str(lib)]
    args += ["--registries-conf", str(tmp_path / "no-registries.conf")]
    assert main(args) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        f"PROBLEM {UNIT}: EnvironmentFile {tmp_path / 'gone'} cannot be read -> fix: "
        "run doctor as root"
    )
    assert lines[1].startswith("PROBLEM cannot read /proc/300/environ of containerd")
    assert lines[2].startswith(f"PROBLEM the mirror {closed} does not answer")
    assert len(lines) == 3
