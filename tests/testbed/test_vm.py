"""Tests of the qemu test bed itself (ublk_driver.testbed).

Two kinds:
* unit tests of the pure parts (quoting, environment, cache paths, qemu command
  line, initramfs archive, console filter, CLI parsing) -- fast, no VM;
* ``@pytest.mark.vm`` tests that boot the real test bed (Debian 6.12 under
  qemu TCG, ~5-20 s per boot).  Nothing is mocked in those: they boot the
  kernel and look at what the guest really did.  Boots are few on purpose: one
  run checks many things at once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ublk_driver.testbed as testbed
from ublk_driver.core.cli import main as ublkml
from ublk_driver.testbed import _vm, emulator, where

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[2]
# Computed at import, before the pytester fixture points HOME at a temporary
# directory: the pytester test must reuse the real cache, not provision anew.
CACHE_ROOT = _vm.cache_dir().parent

# Words that are hard to quote: spaces, quotes, $, backslashes, globs, newlines.
NASTY_WORDS = ["", " ", "a b", "it's", '"q"', "$HOME", "`id`", "\\", "*", "a\nb", "-n", "é∑"]


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def test_public_api_is_pinned() -> None:
    assert sorted(testbed.__all__) == sorted([
        "TestbedError", "TestbedImage", "TestbedTimeout", "VmResult", "cache_dir",
        "find_image", "in_vm", "info", "native_ublk_available", "provision", "run",
        "TESTBED_FAILED", "TestbedRun", "TestbedRunError", "needs_testbed", "run_in_testbed",
        "EMULATED_DRIVES", "DriveSpec", "EmulatedDrive", "EmulatorError", "emulated_drives",
        "qmp_execute", "set_smart_critical_warning", "smart_critical_warning",
    ])
    for name in testbed.__all__:
        home = next(m for m in (_vm, where, emulator) if name in m.__all__)
        assert getattr(testbed, name) is getattr(home, name)
    assert issubclass(testbed.TestbedTimeout, testbed.TestbedError)
    assert issubclass(testbed.TestbedTimeout, TimeoutError)


# --------------------------------------------------------------------------
# Quoting and the guest job script.  They run under the host's /bin/sh, which
# is the very shell the guest uses (the guest's root is the host's root).
# --------------------------------------------------------------------------


def _sh_words(words: list[str]) -> list[str]:
    command = _vm.shell_command(["printf", "%s\\0", *words])
    out = subprocess.run(["/bin/sh", "-c", command], capture_output=True, check=True).stdout
    return out.decode().split("\0")[:-1]


def test_shell_command_keeps_every_word() -> None:
    assert _sh_words(NASTY_WORDS) == NASTY_WORDS


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"),
                        max_size=12), min_size=1, max_size=5))
def test_shell_command_round_trips(words: list[str]) -> None:
    assert _sh_words(words) == words


def test_shell_command_rejects_empty_argv() -> None:
    with pytest.raises(ValueError):
        _vm.shell_command([])


def test_guest_environment() -> None:
    host = {"PATH": "/usr/bin:/bin", "HOME": "/home/u", "PYTHONPATH": "/src", "SECRET": "x"}
    env = _vm.guest_environment({"EXTRA": "1"}, host_env=host, executable="/venv/bin/python")
    path = env["PATH"].split(":")
    assert path[0] == "/venv/bin"  # the virtualenv first
    assert path.index("/usr/bin") < path.index("/usr/sbin")  # host order kept, sbin added
    assert len(path) == len(set(path))
    assert env["HOME"] == "/home/u"
    assert env["PYTHONPATH"] == "/src"
    assert env["UBLKML_IN_VM"] == "1"
    assert env["EXTRA"] == "1"
    assert "SECRET" not in env  # only the documented variables pass through
    assert _vm.guest_environment({"PATH": "/x"}, host_env=host)["PATH"] == "/x"
    with pytest.raises(ValueError, match="invalid environment variable name"):
        _vm.guest_environment({"A-B": "1"}, host_env=host)


def test_guest_job_script_runs_under_sh(tmp_path: Path) -> None:
    workdir = tmp_path / "dir with 'quotes' and $x"
    workdir.mkdir()
    env = {"PATH": os.environ["PATH"], "ODD": "a 'b' \"c\" $d `e`\nf"}
    probe = (
        "import json, os; "
        "print(json.dumps([os.getcwd(), os.environ['ODD'], os.environ['PATH']]))"
    )
    script = _vm.guest_job_script([sys.executable, "-c", probe], cwd=str(workdir), env=env)
    out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [str(workdir), env["ODD"], env["PATH"]]


# --------------------------------------------------------------------------
# Cache location and provisioning prerequisites
# --------------------------------------------------------------------------


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("UBLKML_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert _vm.cache_dir() == tmp_path / "home/.cache/ublkml/testbed"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # invalid per the XDG spec
    assert _vm.cache_dir() == tmp_path / "home/.cache/ublkml/testbed"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _vm.cache_dir() == tmp_path / "xdg/ublkml/testbed"
    monkeypatch.setenv("UBLKML_CACHE", str(tmp_path / "mine"))
    assert _vm.cache_dir() == tmp_path / "mine/testbed"


def test_find_image_ignores_incomplete_entries(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.setenv("UBLKML_CACHE", str(tmp_path))
    assert _vm.find_image() is None
    for version in ("6.12.99+deb12-amd64", "6.12.117+deb12-amd64", "6.12.200+deb12-amd64"):
        d = tmp_path / "testbed" / version
        (d / "modules").mkdir(parents=True)
        (d / "vmlinuz").write_bytes(b"")
        (d / "initrd.gz").write_bytes(b"")
        if version != "6.12.200+deb12-amd64":  # no metadata: an interrupted build
            (d / "testbed.json").write_text(json.dumps({
                "format": _vm._IMAGE_FORMAT, "kernel_version": version,
                "package": f"linux-image-{version}-unsigned"}))
    image = _vm.find_image()
    assert image is not None
    assert image.kernel_version == "6.12.117+deb12-amd64"  # numeric order: 117 > 99
    assert _vm.find_image("6.12.99+deb12-amd64") is not None


def test_newest_package_picks_plain_amd64_numerically() -> None:
    names = [
        "linux-image-6.12.99+deb12-amd64-unsigned",
        "linux-image-6.12.117+deb12-amd64-unsigned",
        "linux-image-6.12.120+deb12-cloud-amd64-unsigned",
        "linux-image-6.12.121+deb12-rt-amd64-unsigned",
        "linux-image-6.12.122+deb12-amd64",  # signed meta package, not -unsigned
    ]
    assert _vm._newest_package(names) == "linux-image-6.12.117+deb12-amd64-unsigned"
    assert _vm._newest_package([]) is None


def _empty_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The fake stands in for the missing binaries only: an empty PATH is what a
    # host without qemu/busybox/kmod looks like to shutil.which.  Nothing else
    # is faked.
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def test_run_without_qemu_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    _empty_path(monkeypatch, tmp_path)
    with pytest.raises(testbed.TestbedError) as err:
        testbed.run(["true"])
    message = str(err.value)
    assert "qemu-system-x86_64" in message
    assert "apt-get install qemu-system-x86" in message
    assert "\n" not in message


def test_provision_without_tools_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    monkeypatch.setenv("UBLKML_CACHE", str(tmp_path / "cache"))  # nothing provisioned
    _empty_path(monkeypatch, tmp_path)
    with pytest.raises(testbed.TestbedError) as err:
        testbed.provision()
    message = str(err.value)
    for needed in ("depmod", "busybox", "kmod", "busybox-static"):
        assert needed in message


def test_static_elf_detection() -> None:
    assert not _vm._is_static_elf(os.path.realpath(sys.executable))  # dynamically linked
    assert not _vm._is_static_elf(__file__)  # not ELF at all


# --------------------------------------------------------------------------
# qemu command line, initramfs, console
# --------------------------------------------------------------------------


def _image(tmp_path: Path) -> _vm.TestbedImage:
    return _vm.TestbedImage("6.12.117+deb12-amd64", "linux-image-x", tmp_path / "im,age")


def test_qemu_command(tmp_path: Path) -> None:
    cmd = _vm.qemu_command(_image(tmp_path), ctl_dir="/tmp/ctl", memory_mb=1024, cpus=3)
    joined = " ".join(cmd)
    assert cmd[0] == "qemu-system-x86_64"
    assert "-accel tcg,thread=multi" in joined
    assert "-cpu max" in joined
    assert "-smp 3" in joined and "-m 1024" in joined
    assert "path=/,security_model=passthrough,multidevs=remap,readonly=on" in joined
    assert "path=/tmp/ctl," in joined and "mount_tag=ctl" in joined
    assert "mount_tag=share" not in joined
    assert "im,,age" in joined  # qemu's option syntax: a comma is doubled
    assert cmd[cmd.index("-append") + 1].split()[:2] == ["console=ttyS0", "quiet"]
    with_share = _vm.qemu_command(_image(tmp_path), ctl_dir="/c", share_dir="/s")
    assert "local,id=share,path=/s," in " ".join(with_share)


def test_initramfs_archive_reads_back_with_cpio(tmp_path: Path) -> None:
    cpio_tool = shutil.which("cpio")
    # `make setup` installs cpio; without it this check cannot run, which is a failure.
    assert cpio_tool is not None, "cpio(1) is not installed: run `make setup`"
    archive = _vm._Cpio()
    archive.directory("bin")
    archive.file("bin/hello", b"hello\n", 0o755)
    archive.chardev("console", 5, 1)
    data = archive.finish()
    assert len(data) % 512 == 0
    listing = subprocess.run([cpio_tool, "-itv"], input=data, capture_output=True, check=True)
    lines = listing.stdout.decode().splitlines()
    assert [line.split()[-1] for line in lines] == ["bin", "bin/hello", "console"]
    assert lines[1].startswith("-rwxr-xr-x") and lines[2].startswith("crw-------")


def test_module_load_order(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(textwrap.dedent("""\
        kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz
        kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz
        kernel/net/9p/9pnet.ko.xz:
        kernel/fs/netfs/netfs.ko.xz:
        kernel/fs/overlayfs/overlay.ko.xz:
        """))
    (tmp_path / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    order = [name for name, _ in _vm._module_load_order(tmp_path, ["9p", "9pnet_virtio",
                                                                    "overlay", "virtio_pci"])]
    assert sorted(order) == ["9p", "9pnet", "9pnet_virtio", "netfs", "overlay"]
    assert order.index("9pnet") < order.index("9p") and order.index("netfs") < order.index("9p")
    assert order.index("9pnet") < order.index("9pnet_virtio")
    with pytest.raises(testbed.TestbedError, match="ublk_drv"):
        _vm._module_load_order(tmp_path, ["ublk_drv"])


def test_console_drops_power_off_noise_and_crlf() -> None:
    console = _vm._Console(None)
    for chunk in (b"hello\r", b"\nwor", b"ld\r\n[   11.62] reboot: Power down\r\n",
                  b"[    9.1] sysrq: Power Off\r\n", b"\xc3", b"\xa9\r\n"):
        console.feed(chunk)
    assert console.close() == "hello\nworld\né\n"


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert ublkml(["vm", "run"]) == 2
    assert "a command is needed" in capsys.readouterr().err
    assert ublkml(["vm", "bogus"]) == 2
    assert ublkml(["vm", "run", "--help"]) == 0
    assert "--share DIR" in capsys.readouterr().out


def test_cli_info_json(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                       tmp_path: Path) -> None:
    monkeypatch.setenv("UBLKML_CACHE", str(tmp_path))
    assert ublkml(["vm", "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["provisioned"] is False
    assert info["cache_dir"] == str(tmp_path / "testbed")
    assert info["in_vm"] == _vm.in_vm()


def test_cli_run_failure_is_125(capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _empty_path(monkeypatch, tmp_path)
    assert ublkml(["vm", "run", "--", "true"]) == 125
    err = capsys.readouterr().err
    assert err.startswith("ublkml: error: ") and err.count("\n") == 1


def test_in_vm_follows_the_marker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UBLKML_IN_VM", "1")
    assert testbed.in_vm()


# --------------------------------------------------------------------------
# The pytest plugin when the test bed cannot or must not run (no boot needed)
# --------------------------------------------------------------------------

INLINE_UBLK_TESTS = """
    import os
    import pytest

    @pytest.mark.ublk
    def test_control_device_exists():
        assert os.path.exists("/dev/ublk-control")

    @pytest.mark.ublk
    def test_fails_in_the_guest():
        print("printed in the guest")
        assert 1 == 2, "deliberate failure"

    def test_on_the_host():
        pass
"""

host_without_ublk = pytest.mark.skipif(
    _vm.native_ublk_available(), reason="this host has ublk: the tests would run natively"
)


def _plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UBLKML_CACHE", str(CACHE_ROOT))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [
        str(REPO), os.environ.get("PYTHONPATH")])))


@host_without_ublk
def test_plugin_with_no_ublk_vm_fails_ublk_tests(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _plugin_env(monkeypatch)
    pytester.makepyfile(test_inline=INLINE_UBLK_TESTS)
    result = pytester.runpytest_subprocess("-p", "ublk_driver.testbed.pytest_plugin",
                                           "-p", "no:cacheprovider", "--no-ublk-vm")
    result.assert_outcomes(passed=1, failed=2)  # the host test passes; no skips
    result.stdout.fnmatch_lines(["*--no-ublk-vm was given: drop it*"])


@host_without_ublk
def test_plugin_without_qemu_fails_ublk_tests_saying_what_to_install(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _plugin_env(monkeypatch)
    _empty_path(monkeypatch, tmp_path)  # pytester starts pytest by absolute path
    pytester.makepyfile(test_inline=INLINE_UBLK_TESTS)
    result = pytester.runpytest_subprocess("-p", "ublk_driver.testbed.pytest_plugin",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["*apt-get install qemu-system-x86*"])


# --------------------------------------------------------------------------
# Real boots
# --------------------------------------------------------------------------


@pytest.mark.vm
@pytest.mark.skipif(_vm.in_vm(), reason="already inside the test bed (no nested qemu)")
def test_vm_runs_a_command_in_a_real_6_12_guest(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    outside = tmp_path / "outside.txt"  # visible in the guest, but not a share
    odd = "a b 'c' \"d\" $e"
    script = f"""
        set -e
        uname -r > {share}/uname
        test -c /dev/ublk-control && echo present > {share}/ublk-control
        stat -f -c %T /sys/fs/bpf > {share}/bpffs
        printf %s "$UBLKML_TEST_VAR" > {share}/env
        echo "$PATH" > {share}/path
        pwd > {share}/pwd
        echo "$UBLKML_IN_VM" > {share}/in_vm
        echo guest-only > {outside}
        echo hello from the guest
        exit 7
    """
    result = testbed.run(["sh", "-c", script], cwd=str(REPO), env={"UBLKML_TEST_VAR": odd},
                         share=str(share), stream=False, timeout=600)
    assert result.returncode == 7
    assert (share / "uname").read_text().startswith("6.12.")
    assert (share / "ublk-control").read_text() == "present\n"
    assert (share / "bpffs").read_text() == "bpf_fs\n"
    assert (share / "env").read_text() == odd
    assert (share / "path").read_text().split(":")[0] == os.path.dirname(sys.executable)
    assert (share / "pwd").read_text() == f"{REPO}\n"
    assert (share / "in_vm").read_text() == "1\n"
    assert not outside.exists()  # guest writes outside the share stay in the guest
    assert result.output == "hello from the guest\n"  # quiet console, no power-off noise
    assert result.share_dir == str(share)
    assert "Linux version 6.12" in result.kernel_log  # the guest's dmesg came back
    assert 0 < result.boot_seconds < result.total_seconds
    print(f"boot {result.boot_seconds:.1f} s, total {result.total_seconds:.1f} s")


@pytest.mark.vm
@pytest.mark.skipif(_vm.in_vm(), reason="already inside the test bed (no nested qemu)")
def test_vm_cli_propagates_the_exit_code(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-m", "ublk_driver.testbed", "run", "--timeout", "600", "--",
         "sh", "-c", "echo streamed; exit 7"],
        capture_output=True, text=True, env=env, timeout=700,
    )
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "streamed\n"
    assert "exit status 7" in proc.stderr


def _our_qemu_children() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if fields.get("Name", "").startswith("qemu-system") and \
                fields.get("PPid", "").strip() == str(os.getpid()):
            pids.append(int(entry))
    return pids


@pytest.mark.vm
@pytest.mark.skipif(_vm.in_vm(), reason="already inside the test bed (no nested qemu)")
def test_vm_timeout_kills_qemu() -> None:
    with pytest.raises(testbed.TestbedTimeout) as err:
        testbed.run(["sleep", "1000"], timeout=15, stream=False)
    assert "did not finish within 15 s; qemu was killed" in str(err.value)
    assert err.value.timeout == 15
    assert _our_qemu_children() == []


@pytest.mark.vm
@pytest.mark.skipif(_vm.in_vm(), reason="already inside the test bed (no nested qemu)")
def test_pytest_plugin_runs_ublk_tests_in_the_test_bed(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _plugin_env(monkeypatch)
    pytester.makepyfile(test_inline=INLINE_UBLK_TESTS)
    result = pytester.runpytest_subprocess(
        "-p", "ublk_driver.testbed.pytest_plugin", "-p", "no:cacheprovider", "-rA", timeout=900
    )
    # The two ublk tests: 1 passed, 1 failed (in the guest); plus the host test.
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines_random([
        "PASSED test_inline.py::test_control_device_exists",
        "FAILED test_inline.py::test_fails_in_the_guest*",
        "PASSED test_inline.py::test_on_the_host",
    ])
    result.stdout.fnmatch_lines(["*AssertionError: deliberate failure*"])
    if not _vm.native_ublk_available():
        result.stdout.fnmatch_lines([
            "ublk test bed: no ublk driver on this host; booting Linux 6.12.*",
            "ublk test bed: guest pytest exit status 1 after *",
            "*printed in the guest*",
        ])
