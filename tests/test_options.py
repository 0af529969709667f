"""Mount option parsing (pure)."""

import pytest

from kexec_sim.errors import InvalidRequest
from kexec_sim.sizes import parse_size
from pkramfs.errors import OptionError
from pkramfs.options import MAX_NR_INODES, MAX_SIZE_BYTES, parse_options, split_option_list


def test_tmpfs_options_parse() -> None:
    opts = parse_options(
        split_option_list(
            "size=1G,nr_inodes=10k,mode=0755,uid=1000,gid=100,huge=always,pkram=my.fs"
        )
    )
    assert opts.size_bytes == 1 << 30
    assert opts.nr_inodes == 10 * 1024
    assert opts.mode == 0o755
    assert (opts.uid, opts.gid) == (1000, 100)
    assert opts.huge == "always"
    assert opts.pkram == "my.fs"


def test_secret_is_a_flag() -> None:
    assert parse_options(["secret"]).secret is True
    assert parse_options([]).secret is None  # not given: what a restored node says


def test_defaults_follow_tmpfs() -> None:
    opts = parse_options([])
    assert opts.resolved_size_pages(1000) == 500
    assert opts.resolved_nr_inodes(1000) == 500
    assert opts.mode == 0o1777


def test_size_percent_needs_ram() -> None:
    assert parse_options(["size=25%"], ram_bytes=1 << 30).size_bytes == 1 << 28
    with pytest.raises(OptionError, match="size"):
        parse_options(["size=25%"])


def test_the_largest_sizes_a_mount_can_report_are_accepted() -> None:
    """size= up to 2^64 bytes less a page (its page count in bytes still fits 64 bits, for
    statfs and df), nr_inodes= up to 2^54 - 1 as kernel tmpfs; a percentage is held to the
    same bound."""
    opts = parse_options(["size=18446744073709547520", "nr_inodes=18014398509481983"])
    assert opts.size_bytes == MAX_SIZE_BYTES == 2**64 - 4096
    assert opts.resolved_size_pages(1) * 4096 == MAX_SIZE_BYTES
    assert opts.nr_inodes == MAX_NR_INODES == 2**54 - 1
    assert parse_options(["size=16777215T"]).size_bytes == 2**64 - 2**40
    assert parse_options(["uid=4294967294", "gid=0", "mode=7777"]).uid == 2**32 - 2
    ram_bytes = 1 << 30
    assert parse_options(["size=1000%"], ram_bytes=ram_bytes).size_bytes == 10 * ram_bytes
    with pytest.raises(OptionError, match="size"):
        parse_options(["size=1800000000000%"], ram_bytes=ram_bytes)  # 1.8e10 GiB: past 2^64


def test_mount8_flags_are_accepted() -> None:
    opts = parse_options(split_option_list("rw,nosuid,nodev,relatime,defaults,noauto,x-foo=1"))
    assert "nosuid" in opts.kernel_flags
    assert not opts.read_only
    assert parse_options(["ro"]).read_only


@pytest.mark.parametrize(
    ("item", "named"),
    [
        ("bogus", "bogus"),
        ("size=lots", "size"),
        ("size", "size"),
        ("mode=999", "mode"),
        ("uid=-1", "uid"),
        ("uid=4294967295", "uid"),  # (uid_t)-1 means "no change" to the kernel
        ("gid=99999999999999999999999", "gid"),
        ("mode=10000", "mode"),
        ("size=99999999999999999999999", "size"),
        ("size=16E", "size"),  # 2^64 bytes
        ("size=18446744073709547521", "size"),  # one byte more than the largest: a page more
        ("nr_inodes=99999999999999999999999", "nr_inodes"),
        ("nr_inodes=18446744073709551616", "nr_inodes"),  # 2^64
        ("nr_inodes=18014398509481984", "nr_inodes"),  # 2^54: more than kernel tmpfs takes
        ("huge=sometimes", "huge"),
        ("pkram=", "pkram"),
        ("pkram=a/b", "pkram"),
        ("ro=1", "ro"),
        ("secret=1", "secret"),
    ],
)
def test_bad_options_name_the_option(item: str, named: str) -> None:
    with pytest.raises(OptionError, match=named):
        parse_options([item])


@pytest.mark.parametrize(
    ("text", "value"),
    [("4096", 4096), ("4k", 4096), ("512M", 512 << 20), ("2G", 2 << 30), ("1GiB", 1 << 30)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "1.5G", "-1", "12X"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_size(text)
