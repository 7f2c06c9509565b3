"""doctor on a podman/CRI-O node: which registries.conf files count, and what they must say.

The files are laid out in tmp dirs the way containers/image reads them: the main
file, then ``*.conf`` drop-ins in name order, a later ``[[registry]]`` replacing an
earlier one with the same prefix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mirrorproxy.clientconf.doctor import run_doctor
from mirrorproxy.clientconf.registriescheck import (
    MAIN_FILE,
    Sources,
    check_registries_conf,
    load_registries_conf,
    mirror_hosts,
)
from mirrorproxy.clientconf.registriesconf import DROP_IN_NAME, render_registries_conf
from mirrorproxy.config import parse_config

MIRROR = "http://127.0.0.1:5000"
NAMESPACES = ["docker.io", "quay.io"]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def generated(mirror: str = MIRROR, names: list[str] = NAMESPACES) -> str:
    config = parse_config(
        {"namespaces": {n: {"upstreams": [f"https://{n}"]} for n in names}},
        source="t",
        base_dir=Path("/"),
    )
    return render_registries_conf(config, mirror)


def node(tmp_path: Path, main: str = "", **drop_ins: str) -> Sources:
    """registries.conf plus registries.conf.d/<name> files; returns what doctor reads."""
    conf = write(tmp_path / "registries.conf", main)
    for name, text in drop_ins.items():
        write(tmp_path / "registries.conf.d" / name, text)
    return Sources.choose(flag=conf, env_path=None, home=None)


def problems(sources: Sources, namespaces: list[str] | None = NAMESPACES) -> list[str]:
    conf, findings = load_registries_conf(sources)
    assert conf is not None
    findings += check_registries_conf(conf, mirror_url=MIRROR, namespaces=namespaces)
    return [f.line() for f in findings]


# --- which files


def test_sources_follow_containers_image(tmp_path: Path) -> None:
    home = tmp_path / "home"
    system_dirs = (Path("/etc/containers/registries.conf.d"),)
    user_dir = home / ".config/containers/registries.conf.d"
    assert Sources.choose(flag=None, env_path=None, home=None) == Sources(MAIN_FILE, system_dirs)
    assert Sources.choose(flag=None, env_path=None, home=home) == Sources(
        MAIN_FILE, (*system_dirs, user_dir)
    )
    # CONTAINERS_REGISTRIES_CONF replaces the main file only, and must exist.
    env = Sources.choose(flag=None, env_path="/x/r.conf", home=home)
    assert (env.main, env.dirs, env.required) == (
        Path("/x/r.conf"),
        (*system_dirs, user_dir),
        True,
    )
    # A user's own registries.conf replaces the system's files and directory.
    write(home / ".config/containers/registries.conf", "")
    user = Sources.choose(flag=None, env_path=None, home=home)
    assert (user.main, user.dirs) == (home / ".config/containers/registries.conf", (user_dir,))
    # --registries-conf reads that file and its .d directory, like a mounted node root.
    flag = Sources.choose(flag=tmp_path / "r.conf", env_path="/x/r.conf", home=home)
    assert (flag.main, flag.dirs, flag.required) == (
        tmp_path / "r.conf",
        (tmp_path / "r.conf.d",),
        False,
    )


def test_no_files_means_no_podman(tmp_path: Path) -> None:
    sources = Sources.choose(flag=tmp_path / "none.conf", env_path=None, home=None)
    assert load_registries_conf(sources) == (None, [])
    required = Sources.choose(flag=None, env_path=str(tmp_path / "none.conf"), home=None)
    conf, [finding] = load_registries_conf(
        Sources(required.main, (tmp_path / "empty.d",), required=True, via=required.via)
    )
    assert conf is None
    assert "(CONTAINERS_REGISTRIES_CONF) does not exist: every pull fails" in finding.problem


def test_drop_ins_in_name_order_and_later_prefix_wins(tmp_path: Path) -> None:
    sources = node(
        tmp_path,
        main='unqualified-search-registries = ["docker.io"]\n[[registry]]\nlocation = "quay.io"\n',
        **{
            "90-late.conf": '[[registry]]\nprefix = "docker.io"\nlocation = "late.example"\n',
            "10-early.conf": '[[registry]]\nprefix = "docker.io"\nlocation = "early.example"\n',
            "notes.txt": "not read",
        },
    )
    conf, findings = load_registries_conf(sources)
    assert findings == []
    assert conf is not None
    assert [p.name for p in conf.files] == ["registries.conf", "10-early.conf", "90-late.conf"]
    assert conf.registries["docker.io"].table["location"] == "late.example"
    assert conf.registries["quay.io"].prefix == "quay.io"  # prefix defaults to location


@pytest.mark.parametrize(
    ("main", "drop_in", "expected"),
    [
        ("[[registry]\n", "", "registries.conf: not TOML; podman, skopeo and CRI-O fail"),
        ("", '[registries.search]\nregistries = ["x"]\n', "a drop-in in the v1 format"),
        (
            '[registries.search]\nregistries = ["x"]\n[[registry]]\nlocation = "y"\n',
            "",
            "v1 and v2 formats mixed",
        ),
    ],
)
def test_files_that_fail_every_pull(
    tmp_path: Path, main: str, drop_in: str, expected: str
) -> None:
    sources = node(tmp_path, main, **({"a.conf": drop_in} if drop_in else {}))
    _, [finding] = load_registries_conf(sources)
    assert expected in finding.problem


def test_a_v1_main_file_alone_is_fine(tmp_path: Path) -> None:
    sources = node(tmp_path, '[registries.search]\nregistries = ["docker.io"]\n')
    conf, findings = load_registries_conf(sources)
    assert findings == []
    assert conf is not None
    assert conf.registries == {}


# --- what they say


def test_the_generated_drop_in_passes(tmp_path: Path) -> None:
    sources = node(tmp_path, "", **{DROP_IN_NAME: generated()})
    assert problems(sources) == []
    assert problems(sources, namespaces=None) == []
    conf, _ = load_registries_conf(sources)
    assert conf is not None
    assert mirror_hosts(conf) == {"127.0.0.1:5000": True}


def test_a_namespace_without_registry(tmp_path: Path) -> None:
    sources = node(tmp_path, "", **{DROP_IN_NAME: generated(names=["docker.io"])})
    [line] = problems(sources)
    assert "no [[registry]] for quay.io in " in line
    assert line.endswith(
        "run: mirrorproxy hosts --config FILE --format registries-conf "
        f"--out /etc/containers/registries.conf.d/{DROP_IN_NAME}"
    )


def test_nothing_points_at_the_mirror(tmp_path: Path) -> None:
    sources = node(tmp_path, '[[registry]]\nlocation = "docker.io"\n')
    [line] = problems(sources, namespaces=None)
    assert "has the mirror 127.0.0.1:5000 as a mirror" in line


@pytest.mark.parametrize(
    ("mirror", "expected"),
    [
        ('location = "10.9.9.9:5000/docker.io"', "has no mirror at 127.0.0.1:5000"),
        ('location = "127.0.0.1:5000"\ninsecure = true', "lacks the path /docker.io"),
        ('location = "127.0.0.1:5000/quay.io"\ninsecure = true', "lacks the path /docker.io"),
        ('location = "127.0.0.1:5000/docker.io"', "plain http but not insecure = true"),
        (
            'location = "127.0.0.1:5000/docker.io"\ninsecure = true\n'
            'pull-from-mirror = "digest-only"',
            "for pulls by digest only",
        ),
    ],
)
def test_mirror_entries(tmp_path: Path, mirror: str, expected: str) -> None:
    text = '[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n'
    text += f"[[registry.mirror]]\n{mirror}\n"
    [line] = problems(node(tmp_path, text), namespaces=["docker.io"])
    assert expected in line
    assert 'registries.conf: [[registry]] prefix "docker.io"' in line


def test_digest_only_on_the_registry(tmp_path: Path) -> None:
    text = generated().replace(
        'location = "docker.io"\n', 'location = "docker.io"\nmirror-by-digest-only = true\n'
    )
    [line] = problems(node(tmp_path, text))
    assert "tags skip it" in line


def test_a_later_drop_in_that_overrides_ours_is_the_one_to_edit(tmp_path: Path) -> None:
    late = '[[registry]]\nprefix = "quay.io"\nlocation = "quay.io"\n'
    sources = node(tmp_path, "", **{DROP_IN_NAME: generated(), "99-site.conf": late})
    [line] = problems(sources)
    assert 'prefix "quay.io" has no mirror at 127.0.0.1:5000' in line
    assert line.endswith(f"-> fix: edit {tmp_path / 'registries.conf.d' / '99-site.conf'}")


def test_wildcard_prefix_and_blocked(tmp_path: Path) -> None:
    text = (
        '[[registry]]\nprefix = "*.io"\nlocation = "mirror.example"\n'
        '[[registry.mirror]]\nlocation = "127.0.0.1:5000/docker.io"\ninsecure = true\n'
        '[[registry]]\nlocation = "quay.io"\nblocked = true\n'
    )
    # *.io governs docker.io (and its mirror path is right); quay.io is blocked on purpose.
    assert problems(node(tmp_path, text)) == []


# --- through doctor


def run(sources: Sources, tmp_path: Path, **kwargs: Any) -> tuple[list[str], str]:
    findings, summary = run_doctor(
        containerd_config=tmp_path / "no-containerd.toml",
        hosts_dir=None,
        containerd_version=None,
        registries=sources,
        systemd_dirs=[tmp_path / "units"],
        proc_dir=tmp_path / "proc",
        probe=False,
        **kwargs,
    )
    return [f.line() for f in findings], summary


def test_a_crio_node_without_containerd(tmp_path: Path) -> None:
    sources = node(tmp_path, "", **{DROP_IN_NAME: generated()})
    lines, summary = run(sources, tmp_path, mirror_url=None, namespaces=None)
    assert lines == []
    # No containerd findings; the mirror is read from the drop-in.
    assert summary == (
        f"ok: no containerd ({tmp_path / 'no-containerd.toml'} absent); "
        "2 registries.conf files send pulls to the mirror; mirror http://127.0.0.1:5000"
    )
    lines, _ = run(sources, tmp_path, mirror_url=MIRROR, namespaces=["docker.io", "ghcr.io"])
    assert len(lines) == 1
    assert "no [[registry]] for ghcr.io" in lines[0]


def test_podman_that_is_merely_installed_is_a_note(tmp_path: Path) -> None:
    # containerd is the node's runtime; podman's packaged files name no mirror.
    write(tmp_path / "units" / "containerd.service", "[Service]\nExecStart=containerd\n")
    sources = Sources.choose(
        flag=write(
            tmp_path / "registries.conf", 'unqualified-search-registries = ["docker.io"]\n'
        ),
        env_path=None,
        home=None,
    )
    sources = Sources(sources.main, sources.dirs)  # as found, not named on the command line
    lines, summary = run(sources, tmp_path, mirror_url=MIRROR, namespaces=NAMESPACES)
    assert not any("registries.conf" in line for line in lines)
    assert "1 registries.conf files, none naming the mirror (podman pulls directly)" in summary


def test_a_crio_node_next_to_containerd_is_checked(tmp_path: Path) -> None:
    write(tmp_path / "units" / "containerd.service", "[Service]\nExecStart=containerd\n")
    write(tmp_path / "units" / "crio.service", "[Service]\nExecStart=crio\n")
    sources = node(tmp_path, '[[registry]]\nlocation = "quay.io"\n')
    sources = Sources(sources.main, sources.dirs)
    lines, _ = run(sources, tmp_path, mirror_url=MIRROR, namespaces=["quay.io"])
    assert any('prefix "quay.io" has no mirror at 127.0.0.1:5000' in line for line in lines)
