"""Mount option parsing (pure)."""

import pytest

from kexec_sim.sizes import parse_size
from pkramfs.errors import OptionError
from pkramfs.options import parse_options, split_option_list


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
    with pytest.raises(ValueError):
        parse_size(text)
