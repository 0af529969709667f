"""Hibernation end to end: real mounts, ``kexec-sim hibernate`` / ``resume`` in subprocesses.

Power off poisons RAM here (KEXEC_SIM_SCRUB=poison from the machine fixture): a page resume
failed to restore reads 0xAA, never plausible zeros. Every test leaves the machine running,
since the fixtures' teardown checks its page ownership.
"""

import hashlib
import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kexec_sim.errors import CorruptImage
from kexec_sim.hibernation import crypto, reader
from kexec_sim.hibernation import resume as resume_module
from kexec_sim.machine import Machine
from kexec_sim.machine_dir import TRANSITION_FILE
from kexec_sim.owners import HANDOVER
from kexec_sim.storage_keys import ARCHITECTURAL, CHANGED, FETCH_PROTECT, KEYS_FILE, REFERENCED

from .conftest import Mounts, daemon_owners
from .util import (
    boot,
    contents,
    hibernate,
    kexec_sim,
    make_tree,
    md5,
    ok,
    powered,
    resume,
    run,
    snapshot,
)


def ram_digest(machine: Machine) -> str:
    """md5 of the RAM file and of the storage keys: what 'RAM untouched' compares."""
    digest = hashlib.md5()
    for name in ("RAM", KEYS_FILE):
        with open(machine.path / name, "rb") as f:
            while chunk := f.read(8 << 20):
                digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture
def images(tmp_path: Path) -> Path:
    directory = tmp_path / "images"
    directory.mkdir()
    return directory


def test_the_user_flow_round_trips_several_mounts(
    machine: Machine, mounts: Mounts, images: Path
) -> None:
    tree = mounts.mount("pkram=tree")
    make_tree(tree)
    huge = mounts.mount("pkram=hugetree,huge=always,size=64M")
    (huge / "h").write_bytes(os.urandom(9 << 20))
    (huge / "zeros").write_bytes(bytes(3 << 20))
    before = {m: (contents(m), snapshot(m)) for m in (tree, huge)}  # reads change atime
    image = images / "hib.img"
    report = ok(hibernate(machine, image, "--json"))
    assert report["pages"] and report["zero_pages"] and report["preserved_mounts"]
    assert stat.S_IMODE(image.stat().st_mode) == 0o600
    assert not powered(machine) and not os.path.ismount(tree) and not os.path.ismount(huge)
    resumed = ok(resume(machine, image, args=("--json",)))
    assert resumed["pages"] == report["pages"] and resumed["preserved_pages"]
    for m, name in ((tree, "tree"), (huge, "hugetree")):
        mounts.mount(f"pkram={name}", m)
        assert snapshot(m) == before[m][1]
        assert contents(m) == before[m][0]
    # A second resume from the same image is refused: the machine is powered off again first.
    for m in (tree, huge):
        mounts.unmount(m)
    assert kexec_sim(machine, "poweroff").returncode == 0
    untouched = ram_digest(machine)
    again = resume(machine, image)
    assert again.returncode == 3 and "already used" in again.stderr
    assert ram_digest(machine) == untouched
    boot(machine)


def test_hibernate_refuses_to_lose_an_unpreservable_mount(
    machine: Machine, mounts: Mounts, images: Path
) -> None:
    kept = mounts.mount("pkram=kept")
    plain = mounts.mount()
    (plain / "f").write_bytes(b"plain" * 1000)
    (kept / "f").write_bytes(b"kept" * 1000)
    refused = hibernate(machine, images / "x.img")
    assert refused.returncode == 1 and str(plain) in refused.stderr and "--force" in refused.stderr
    assert powered(machine) and not (images / "x.img").exists()
    (kept / "g").write_bytes(b"still writable")  # nothing was preserved
    (plain / "g").write_bytes(b"still writable")
    forced = hibernate(machine, images / "x.img", "--force")
    assert forced.returncode == 0 and "lost" in forced.stderr
    ok(resume(machine, images / "x.img", args=("--json",)))
    mounts.mount("pkram=kept", kept)
    assert (kept / "f").read_bytes() == b"kept" * 1000
    assert (kept / "g").read_bytes() == b"still writable"


def test_storage_keys_round_trip_with_no_over_indicated_changed_bits(
    machine: Machine, mounts: Mounts, images: Path
) -> None:
    mnt = mounts.mount("pkram=keys")
    (mnt / "data").write_bytes(
        os.urandom(8 << 20)
    )  # one pool batch: the mount's pages are the file's
    owner = daemon_owners(machine, mnt)[0].owner_id
    with machine.page_ownership() as po, machine.ram() as ram:
        file_pfns = po.pages_of(owner)
        keys = ram.keys.array
        keys &= np.uint8(~CHANGED & 0xFF)  # as if the pages had been written out since
        keys[file_pfns] |= np.uint8(0x30 | FETCH_PROTECT)  # an access key and fetch protection
        before = keys.copy()
    assert md5(mnt / "data")  # a read: REFERENCED, never CHANGED
    with machine.ram() as ram:
        read_keys = ram.keys.array[file_pfns]
        assert (read_keys & REFERENCED).all() and not (read_keys & CHANGED).any()
        before = ram.keys.array.copy()
    image = images / "keys.img"
    ok(hibernate(machine, image, "--json"))
    header = reader.read_header(image)
    saved = reader.read_pfn_list(image, header)
    in_image = np.isin(file_pfns, saved.pfns)
    assert in_image.all()
    at = np.searchsorted(saved.pfns, file_pfns)
    assert (saved.keys[at] == before[file_pfns] & ARCHITECTURAL).all()
    ok(resume(machine, image, args=("--json",)))
    with machine.ram() as ram:
        after = ram.keys.array.copy()
    # Every saved page's key is back exactly, though resume wrote all of their data.
    sb = header.super_block_pfn  # the boot wrote it again after the keys
    others = saved.pfns[saved.pfns != sb]
    assert (after[others] == saved.keys[np.searchsorted(saved.pfns, others)]).all()
    assert not (after[file_pfns] & CHANGED).any()
    assert ((after[file_pfns] & 0xF8) == (0x30 | FETCH_PROTECT)).all()
    mounts.mount("pkram=keys", mnt)


def test_an_incremental_chain_of_three_images(
    machine: Machine, mounts: Mounts, images: Path
) -> None:
    mnt = mounts.mount("pkram=inc")
    big = os.urandom(8 << 20)
    (mnt / "big").write_bytes(big)
    (mnt / "gone").write_bytes(os.urandom(1 << 20))
    full = images / "0.img"
    first = ok(hibernate(machine, full, "--json"))
    ok(resume(machine, full, args=("--json",)))
    mounts.mount("pkram=inc", mnt)
    for step in (1, 2):
        with open(mnt / "big", "r+b") as f:  # one page in the middle changes
            f.seek(step * (1 << 20) + 100)
            f.write(f"step {step}".encode())
        (mnt / f"new-{step}").write_bytes(os.urandom(300_000))
        if step == 1:
            (mnt / "gone").unlink()
        expected = contents(mnt)  # reads change atime: the metadata after them
        meta = snapshot(mnt)
        chain = [images / f"{k}.img" for k in range(step + 1)]
        report = ok(
            hibernate(machine, chain[-1], "--incremental", "--base", str(chain[-2]), "--json")
        )
        assert report["base_image_id"]
        assert int(report["in_base_pages"]) >= (8 << 20) // 4096 - 8  # big is mostly unchanged
        assert int(report["data_bytes"]) < int(first["data_bytes"]) // 2
        if step == 2:  # an increment alone, or out of order, is refused before RAM is touched
            untouched = ram_digest(machine)
            assert resume(machine, chain[-1]).returncode == 3
            assert resume(machine, chain[0], chain[2], chain[1]).returncode == 3
            assert ram_digest(machine) == untouched
        ok(resume(machine, *chain, args=("--json",)))
        mounts.mount("pkram=inc", mnt)
        assert contents(mnt) == expected
        assert snapshot(mnt) == meta


def test_an_incremental_image_needs_the_image_ram_came_from(
    machine: Machine, mounts: Mounts, images: Path
) -> None:
    mnt = mounts.mount("pkram=base")
    (mnt / "f").write_bytes(b"x" * 100_000)
    ok(hibernate(machine, images / "a.img", "--json"))
    ok(resume(machine, images / "a.img", args=("--json",)))
    ok(hibernate(machine, images / "b.img", "--json"))  # a full one: RAM now comes from b
    ok(resume(machine, images / "b.img", args=("--json",)))
    refused = hibernate(machine, images / "c.img", "--incremental", "--base", str(images / "a.img"))
    assert refused.returncode == 1 and "last resumed from" in refused.stderr
    assert powered(machine) and not (images / "c.img").exists()
    mounts.mount("pkram=base", mnt)
    assert (mnt / "f").read_bytes() == b"x" * 100_000


def test_encrypted_images_refuse_a_wrong_key_and_a_flipped_byte(
    machine: Machine, mounts: Mounts, images: Path, tmp_path: Path
) -> None:
    mnt = mounts.mount("pkram=secret")
    (mnt / "f").write_bytes(os.urandom(3 << 20))
    expected = md5(mnt / "f")
    key, wrong = tmp_path / "key", tmp_path / "wrong"
    key.write_bytes(os.urandom(32))
    wrong.write_bytes(os.urandom(32))
    image = images / "enc.img"
    report = ok(hibernate(machine, image, "--key-file", str(key), "--json"))
    assert report["encrypted"]
    untouched = ram_digest(machine)
    for args in ((), ("--key-file", str(wrong))):
        refused = resume(machine, image, args=args)
        assert refused.returncode == 3, refused.stderr
        assert "Traceback" not in refused.stderr and len(refused.stderr.splitlines()) == 1
    data = bytearray(image.read_bytes())
    header = reader.read_header(image, key=crypto.ImageKey.from_key_file(key))
    for offset in (20, header.pfn_list_offset + 3, header.first_chunk_offset + 30, len(data) - 1):
        flipped = images / f"flipped-{offset}.img"
        tampered = bytearray(data)
        tampered[offset] ^= 0x01
        flipped.write_bytes(tampered)
        refused = resume(machine, flipped, args=("--key-file", str(key)))
        assert refused.returncode == 3, (offset, refused.stderr)
    assert ram_digest(machine) == untouched
    assert image.read_bytes() == data  # refused resumes leave the image as it was
    ok(resume(machine, image, args=("--key-file", str(key), "--json")))
    mounts.mount("pkram=secret", mnt)
    assert md5(mnt / "f") == expected


def test_a_passphrase_encrypts_too(machine: Machine, mounts: Mounts, images: Path) -> None:
    mnt = mounts.mount("pkram=pass")
    (mnt / "f").write_bytes(b"words " * 50_000)
    env = {**os.environ, "KEXEC_SIM_PASSPHRASE": "correct horse battery staple"}
    cmd = ["kexec-sim", "--machine", str(machine.path)]
    image = images / "p.img"
    assert run(*cmd, "hibernate", "--image", str(image), "--passphrase", env=env).returncode == 0
    wrong = {**env, "KEXEC_SIM_PASSPHRASE": "incorrect"}
    assert run(*cmd, "resume", "--image", str(image), "--passphrase", env=wrong).returncode == 3
    assert run(*cmd, "resume", "--image", str(image), "--passphrase", env=env).returncode == 0
    mounts.mount("pkram=pass", mnt)
    assert (mnt / "f").read_bytes() == b"words " * 50_000


def test_a_resume_after_an_intervening_boot_is_refused(
    machine: Machine, mounts: Mounts, images: Path
) -> None:
    mnt = mounts.mount("pkram=stale")
    (mnt / "f").write_bytes(b"old" * 1000)
    image = images / "stale.img"
    ok(hibernate(machine, image, "--json"))
    assert kexec_sim(machine, "boot").returncode == 0  # the machine ran on without the image
    assert kexec_sim(machine, "poweroff").returncode == 0
    untouched = ram_digest(machine)
    refused = resume(machine, image)
    assert refused.returncode == 3 and "booted since" in refused.stderr
    assert ram_digest(machine) == untouched
    assert reader.read_header(image).generation  # still a valid (but stale) image
    boot(machine)


def test_max_image_size_fails_cleanly_and_leaves_the_mounts_writable(
    machine: Machine, mounts: Mounts, images: Path
) -> None:
    mnt = mounts.mount("pkram=limit")
    data = os.urandom(8 << 20)
    (mnt / "f").write_bytes(data)
    image = images / "limit.img"
    refused = hibernate(machine, image, "--max-image-size", "4M")
    assert refused.returncode == 1 and "exceed" in refused.stderr, refused.stderr
    assert powered(machine) and os.path.ismount(mnt)
    assert not image.exists() and list(images.iterdir()) == []
    (mnt / "more").write_bytes(b"writable again")
    assert (mnt / "f").read_bytes() == data
    with machine.page_ownership() as po:
        assert po.count_by_owner().get(HANDOVER) == 1  # the table is gone, the super block stays
    ok(hibernate(machine, image, "--max-image-size", "64M", "--json"))
    ok(resume(machine, image, args=("--json",)))
    mounts.mount("pkram=limit", mnt)
    assert (mnt / "f").read_bytes() == data and (mnt / "more").read_bytes() == b"writable again"


def test_a_truncated_image_is_refused(machine: Machine, mounts: Mounts, images: Path) -> None:
    mnt = mounts.mount("pkram=trunc")
    (mnt / "f").write_bytes(os.urandom(1 << 20))
    image = images / "t.img"
    ok(hibernate(machine, image, "--compression", "none", "--json"))
    whole = image.read_bytes()
    untouched = ram_digest(machine)
    for size in (100, 4096, len(whole) // 2, len(whole) - 1):
        short = images / f"short-{size}.img"
        short.write_bytes(whole[:size])
        refused = resume(machine, short)
        assert refused.returncode == 3, (size, refused.stderr)
    assert ram_digest(machine) == untouched
    ok(resume(machine, image, args=("--json",)))
    mounts.mount("pkram=trunc", mnt)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    backing = tmp_path / "loop-backing"
    with open(backing, "wb") as f:
        f.truncate(64 << 20)
    attached = run("losetup", "--find", "--show", str(backing))
    if attached.returncode != 0:
        pytest.skip(f"no loop device: {attached.stderr.strip()}")
    device = Path(attached.stdout.strip())
    try:
        yield device
    finally:
        run("losetup", "-d", str(device))


def test_a_hibernate_killed_midway_loses_nothing_and_leaves_no_valid_image(
    machine: Machine, mounts: Mounts, loop_device: Path
) -> None:
    mnt = mounts.mount("pkram=killed")
    data = os.urandom(16 << 20)
    (mnt / "f").write_bytes(data)
    # An older valid image on the device must not survive a half-written new one.
    ok(hibernate(machine, loop_device, "--json"))
    ok(resume(machine, loop_device, args=("--json",)))
    mounts.mount("pkram=killed", mnt)
    env = {**os.environ, "KEXEC_SIM_FAULT": "hibernate:kill-midway"}
    cmd = ["kexec-sim", "--machine", str(machine.path), "hibernate", "--image", str(loop_device)]
    killed = run(*cmd, "--threads", "1", env=env)
    assert killed.returncode == -signal.SIGKILL
    with pytest.raises(CorruptImage):
        reader.read_header(loop_device, allow_used=True)
    assert powered(machine) and os.path.ismount(mnt)
    assert (mnt / "f").read_bytes() == data
    assert run("mount", "-o", "remount,rw", str(mnt)).returncode == 0  # writable again
    (mnt / "g").write_bytes(b"after")
    ok(hibernate(machine, loop_device, "--json"))  # the stale table is dropped first
    ok(resume(machine, loop_device, args=("--json",)))
    mounts.mount("pkram=killed", mnt)
    assert (mnt / "f").read_bytes() == data and (mnt / "g").read_bytes() == b"after"


def test_a_chunk_refused_midway_leaves_ram_exactly_as_it_was(
    machine: Machine, mounts: Mounts, images: Path
) -> None:
    """Resume reads each image once, storing each chunk's pages as soon as the chunk passed its
    checks, so a bad chunk is found with RAM already written: a byte of the last chunk changed
    while the resume runs, once it has stored pages (and read 16 MiB at most, 2 workers),
    fails that chunk's check; what was stored is put back, so RAM and its keys are byte for
    byte as power off left them, the resume is undone (machine off, image unused), and a resume
    of the intact image then brings the tree back."""
    mnt = mounts.mount("pkram=twice")
    data = os.urandom(32 << 20)
    (mnt / "f").write_bytes(data)
    image = images / "t.img"
    ok(hibernate(machine, image, "--compression", "none", "--json"))
    original = image.read_bytes()
    last = reader.read_header(image).end_offset - 1  # the last chunk's last stored byte
    untouched = ram_digest(machine)
    tampered: list[tuple[int, int]] = []

    def tamper(phase: str, done: int, total: int) -> None:
        if phase == "restore" and done and not tampered:  # pages stored, the last chunk unread
            with open(image, "r+b") as f:
                f.seek(last)
                f.write(bytes([original[last] ^ 0x01]))
            tampered.append((done, total))

    with pytest.raises(CorruptImage, match=r"chunk \d+: checksum mismatch"):
        resume_module.resume(
            Machine.open(machine.path, create=False), [image], threads=2, progress=tamper
        )
    assert tampered and 0 < tampered[0][0] < tampered[0][1]
    assert not powered(machine)
    assert not (machine.path / TRANSITION_FILE).exists()  # undone, not left to recovery
    assert ram_digest(machine) == untouched
    image.write_bytes(original)
    assert ok(resume(machine, image, args=("--json",)))["data_bytes"] >= len(data)
    mounts.mount("pkram=twice", mnt)
    assert (mnt / "f").read_bytes() == data
