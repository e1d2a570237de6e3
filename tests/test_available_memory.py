"""The memory a process may still take is the smaller of the system's ``MemAvailable`` and the
room under its control group's limit: inside a container or a batch job ``/proc/meminfo`` shows
the host's memory, and the kernel's out-of-memory killer acts at the group's limit, so the
memory checks (models, images, text) said "fits" for what the group could not hold.

Each test builds a fake ``/proc`` and ``/sys/fs/cgroup`` under ``tmp_path``."""

from __future__ import annotations

import pytest

from compressdrop.checkpoint import save_model
from compressdrop.data import dataset
from compressdrop.errors import InputError
from compressdrop.models import build_model
from compressdrop.workflows import memory

GB, MB = 2**30, 2**20


@pytest.fixture
def system(tmp_path, monkeypatch):
    """A fake system with 20 GB available; returns a function that writes its files."""
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    monkeypatch.setattr(dataset, "PROC", proc)
    monkeypatch.setattr(dataset, "CGROUP", cgroup)

    def write(path: str, text: str) -> None:
        f = tmp_path / path
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)

    write("proc/meminfo", f"MemTotal: {32 * GB // 1024} kB\nMemAvailable: {20 * GB // 1024} kB\n")
    return write


def v2_group(write, path: str, limit: str, current: int, file: int) -> None:
    write(f"cgroup/{path}/memory.max", limit + "\n")
    write(f"cgroup/{path}/memory.current", f"{current}\n")
    write(f"cgroup/{path}/memory.stat", f"anon {current - file}\nfile {file}\nshmem 0\n")


def test_no_control_group_leaves_meminfo(system):
    assert dataset.available_memory() == 20 * GB


def test_a_cgroup_v2_limit_bounds_the_memory_and_its_file_cache_counts_as_free(system):
    system("proc/self/cgroup", "0::/\n")  # a container: its own group is the root of the mount
    v2_group(system, "", str(2 * GB), current=1800 * MB, file=300 * MB)
    assert dataset.available_memory() == 2 * GB - 1500 * MB
    v2_group(system, "", "max", current=1800 * MB, file=300 * MB)  # no limit: the host's
    assert dataset.available_memory() == 20 * GB


def test_the_tightest_limit_among_the_ancestors_counts(system):
    system("proc/self/cgroup", "0::/user.slice/job.scope\n")
    v2_group(system, "user.slice/job.scope", "max", current=100 * MB, file=0)
    v2_group(system, "user.slice", str(4 * GB), current=3 * GB, file=512 * MB)
    assert dataset.available_memory() == GB + 512 * MB


def test_a_cgroup_v1_memory_limit(system):
    """v1 names its controllers; "no limit" is 2^63 rounded down to a page. Inside a container
    the path can name the host's hierarchy, which is not mounted there: the mount's root is the
    container's group."""
    system("proc/self/cgroup", "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    system("cgroup/memory/memory.limit_in_bytes", f"{3 * GB}\n")
    system("cgroup/memory/memory.usage_in_bytes", f"{GB}\n")
    system("cgroup/memory/memory.stat", f"cache {GB}\ntotal_cache {256 * MB}\nrss 0\n")
    assert dataset.available_memory() == 2 * GB + 256 * MB
    system("cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n")
    assert dataset.available_memory() == 20 * GB


def test_unreadable_or_odd_files_fall_back_to_what_can_be_read(system):
    system("proc/self/cgroup", "garbage\n0::/\n")
    system("cgroup/memory.max", "lots\n")
    assert dataset.available_memory() == 20 * GB
    system("cgroup/memory.max", f"{GB}\n")  # a limit, but no usage to subtract from it
    assert dataset.available_memory() == 20 * GB
    system("cgroup/memory.current", f"{2 * GB}\n")  # over its limit (its cache counts): no room
    system("cgroup/memory.stat", "file 0\n")
    assert dataset.available_memory() == 0
    system("proc/meminfo", "MemTotal: 1 kB\n")  # no MemAvailable line: the group alone
    system("cgroup/memory.current", f"{GB // 2}\n")
    assert dataset.available_memory() == GB // 2


def test_a_model_that_fits_the_host_but_not_the_container_is_refused(system, tmp_path, monkeypatch):
    monkeypatch.delenv(memory.OVERRIDE, raising=False)
    save_model(build_model("lenet300", (1, 8, 8)), tmp_path / "dense.pt")
    memory.check_model_memory(tmp_path / "dense.pt", "export onnx")  # 20 GB on the host
    system("proc/self/cgroup", "0::/\n")
    v2_group(system, "", str(64 * MB), current=64 * MB - 1000, file=0)
    with pytest.raises(InputError, match=r"more than the 0\.0 MB available"):
        memory.check_model_memory(tmp_path / "dense.pt", "export onnx")
