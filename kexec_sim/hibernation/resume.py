"""Resume from hibernation: a chain of images back into RAM, then boot as after a kexec.

``resume`` is the way back, on the powered-off machine the image was taken on: it validates
every image of the chain whole (kexec_sim.hibernation.reader.check_image) and the chain
itself before it writes a page (then reads them again, from the page cache:
CheckedImage.read_into), then writes the page data, then the storage keys (so CHANGED bits are
what they were at hibernation, not "everything"), invalidates the images and boots the next
generation with ``pkram=`` naming the image's super block, so mounting restores the trees.

No page an image restores can be in use while resume writes it: the machine is powered off
(no boot state, no owners, no process of it running); resume itself runs outside the
machine's RAM, and the only RAM the resumed boot claims before it reserves the handed-over
pages is its kernel image, the hibernated boot's own kernel range, which holds no saved page
(checked, an image naming one is refused). So the restore_pblist copy through safe pages is
not needed here.
"""

import os
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from kexec_sim.allocator import PfnRange
from kexec_sim.boot import EarlyBoot
from kexec_sim.cmdline import PKRAM_PARAM, without_param
from kexec_sim.errors import CorruptImage, InvalidRequest, MachineError
from kexec_sim.handover import rewrite_super_block, super_block_facts
from kexec_sim.hibernation import reader, writer
from kexec_sim.hibernation.crypto import ImageKey, image_key
from kexec_sim.hibernation.format import ImageHeader, PfnList
from kexec_sim.hibernation.last_image import write_last_image
from kexec_sim.hibernation.progress import Progress
from kexec_sim.hibernation.report import Report, reason
from kexec_sim.kernel_image import default_kernel_range, write_synthetic_image
from kexec_sim.machine import Machine
from kexec_sim.owners import FREE, boot_owner_map
from kexec_sim.pages import PAGE_SIZE, PfnArray
from kexec_sim.ram import Ram
from kexec_sim.report import Phases
from kexec_sim.transition import Transition, fact_range, fact_str, fault_point, give_up


@dataclass(frozen=True)
class ResumeReport(Report):
    """What a resume did."""

    images: tuple[str, ...]
    generation: int
    super_block_pfn: int
    pages: int
    zero_pages: int
    data_bytes: int
    stored_bytes: int
    preserved_pages: int
    warnings: tuple[str, ...]
    durations_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Chain:
    """A chain of images checked whole, a full image then its increments, as resume restores
    it: the last image's page set and, for each of its pages, the image holding its data."""

    images: tuple[reader.CheckedImage, ...]
    source: npt.NDArray[np.int64]
    """Per page of the final set: the index of the image holding its data, -1 for zero."""

    @classmethod
    def of(cls, images: Sequence[reader.CheckedImage]) -> "Chain":
        """The chain of *images*, in order; CorruptImage unless each is incremental to the one
        before it, the first is full, and every page of the last one's set has its data."""
        headers = [image.header for image in images]
        paths = [image.path for image in images]
        for k in range(1, len(headers)):
            if not headers[k].incremental or headers[k].base_image_id != headers[k - 1].image_id:
                raise CorruptImage(
                    f"{paths[k]} is not incremental to {paths[k - 1]} (give the chain in order, "
                    "full image first)"
                )
        if headers[0].incremental:
            raise CorruptImage(f"{paths[0]} is incremental: give its base image(s) first")
        final = images[-1].pfn_list
        source = np.full(final.pfns.size, -2, dtype=np.int64)  # -2: not resolved yet
        for k in range(len(images) - 1, -1, -1):
            todo = np.flatnonzero(source == -2)
            if todo.size == 0:
                break
            pl = images[k].pfn_list
            at = np.searchsorted(pl.pfns, final.pfns[todo])
            found = at < pl.pfns.size
            found[found] = pl.pfns[at[found]] == final.pfns[todo[found]]
            if not found.all():
                missing = int(final.pfns[todo[~found][0]])
                raise CorruptImage(
                    f"pfn {missing} is in the base of {paths[k + 1]} but not in {paths[k]}"
                )
            zero, in_base = pl.zero[at], pl.in_base[at]
            source[todo[zero]] = -1
            source[todo[~zero & ~in_base]] = k
        if (source == -2).any():
            raise CorruptImage(f"{paths[0]}: a full image lists pages as in a base")
        return cls(tuple(images), source)

    @property
    def last(self) -> ImageHeader:
        """The last image's header."""
        return self.images[-1].header

    @property
    def final(self) -> PfnList:
        """The page set RAM gets: the last image's."""
        return self.images[-1].pfn_list

    def restore(
        self, ram: Ram, *, threads: int | None = None, progress: Progress | None = None
    ) -> None:
        """Write the chain's pages into *ram* (data first: marked changed as stores are), then
        the keys.

        Each image is read again (from the page cache, just read by the check) and every chunk
        checked again as it is written (CheckedImage.read_into, by *threads* workers): a
        CorruptImage then leaves RAM partly written. Pages outside the set keep whatever power
        off left there (poison, or zeros).
        """
        final = self.final
        ram.punch_holes(final.pfns[self.source == -1])
        wanted = np.zeros(ram.nr_pages, dtype=np.bool_)
        total = int(np.count_nonzero(self.source >= 0))
        done = 0
        for k, checked in enumerate(self.images):
            mine = final.pfns[self.source == k]
            if mine.size == 0:
                continue
            wanted[:] = False
            wanted[mine] = True
            done += checked.read_into(ram.pages, wanted, threads=threads)
            ram.keys.mark_changed(mine)
            if progress is not None:
                progress("restore", done, total)
        fault_point("resume:data")
        ram.keys.clear()
        ram.keys.restore(final.pfns, final.keys)


def _check_targets(machine: Machine, kernel: PfnRange, pfns: PfnArray, where: str) -> None:
    """CorruptImage unless every pfn is usable RAM outside the resumed kernel's range."""
    usable = boot_owner_map(machine.memory_map, machine.nr_pages)[pfns] == FREE
    if not usable.all():
        bad = int(pfns[~usable][0])
        raise CorruptImage(f"{where}: pfn {bad} is not saveable RAM (firmware, kernel or nosave)")
    inside = (pfns >= kernel[0]) & (pfns < kernel[1])
    if inside.any():
        raise CorruptImage(
            f"{where}: pfn {int(pfns[inside][0])} lies in the resumed kernel's range "
            f"{kernel[0]}..{kernel[1] - 1}"
        )


def _verify_chain(
    machine: Machine,
    paths: Sequence[Path],
    key: ImageKey | None,
    threads: int | None,
    progress: Progress | None,
) -> Chain:
    """Validate every image and the chain, writing nothing. CorruptImage/MachineError if bad."""
    record = machine.boot_record()
    if record.powered:
        raise MachineError(
            f"machine {machine.path} is running (generation {record.generation}): resume "
            "restores a hibernated machine, which is powered off"
        )
    images = []
    for k, path in enumerate(paths):
        try:
            checked = reader.check_image(
                path,
                machine_id=machine.machine_id,
                nr_ram_pages=machine.nr_pages,
                threads=threads,
                key=key,
                allow_used=k < len(paths) - 1,
            )
        except OSError as exc:
            raise MachineError(f"{path}: {reason(exc)}") from None
        images.append(checked)
        if progress is not None:
            progress("verify", k + 1, len(paths))
    last_header = images[-1].header
    if last_header.generation != record.generation:
        raise CorruptImage(
            f"{paths[-1]}: taken in boot generation {last_header.generation}, but the machine "
            f"has booted since (generation {record.generation}): its RAM state moved on, the "
            "image is stale"
        )
    if not os.access(paths[-1], os.W_OK):
        raise MachineError(f"{paths[-1]}: not writable (resume must invalidate it)")
    chain = Chain.of(images)
    pfns = chain.final.pfns
    kernel = record.kernel_image or default_kernel_range(machine)
    _check_targets(machine, kernel, pfns, str(paths[-1]))
    sb_pfn = last_header.super_block_pfn
    at = int(np.searchsorted(pfns, sb_pfn))
    if at == pfns.size or pfns[at] != sb_pfn:
        raise CorruptImage(f"{paths[-1]}: its super block pfn {sb_pfn} is not among its pages")
    return chain


def undo_resume(machine: Machine) -> None:
    """Drop what a resume that did not reach its images' invalidation left: the storage keys it
    wrote (the machine stays off, its images valid; RAM of an off machine holds nothing)."""
    with machine.ram() as ram:
        ram.keys.clear()


def finish_resume(machine: Machine, transition: Transition) -> None:
    """Finish a resume that had restored RAM and keys: invalidate, boot, remember the chain."""
    record = machine.boot_record()
    if record.powered:  # it had booted: only the chain was perhaps not remembered
        if record.generation == transition.generation + 1:
            _remember_chain(machine, transition.facts, record.generation)
        return
    _boot_resumed(machine, transition, Phases())


def _boot_resumed(machine: Machine, transition: Transition, phases: Phases) -> EarlyBoot:
    """The committed tail of a resume (its facts recorded): invalidate the images, write the
    kernel at the hibernated boot's range, boot with ``pkram=``; the early boot reads the
    super block as the images restored it (rewritten from the facts: a repeated tail)."""
    facts = transition.facts
    record = machine.boot_record()
    generation = record.generation + 1
    kernel_image = (
        None if facts.get("kernel_image") is None else fact_range(facts, machine.nr_pages)
    )
    kernel = kernel_image or default_kernel_range(machine)
    cmdline = fact_str(facts, "cmdline")
    with phases("invalidate"):
        images = facts.get("images")
        for path in images if isinstance(images, list) else []:
            with suppress(CorruptImage, OSError, TypeError):  # a base used by an earlier resume
                writer.invalidate(path)
    fault_point("resume:invalidated")
    with machine.ram() as ram, phases("boot"):
        rewrite_super_block(ram, facts)
        size_bytes = (kernel[1] - kernel[0]) * PAGE_SIZE
        write_synthetic_image(ram, kernel[0], cmdline, generation, size_bytes)
    with phases("boot"):
        booted = machine.start_boot(cmdline, kernel_image=kernel_image)
    _remember_chain(machine, facts, generation)
    return booted


def _remember_chain(machine: Machine, facts: Mapping[str, object], generation: int) -> None:
    chain = facts.get("chain")
    if isinstance(chain, list) and all(isinstance(c, str) for c in chain):
        write_last_image(machine.path, chain, generation)


def resume(
    machine: Machine,
    images: Sequence[Path],
    *,
    key_file: Path | None = None,
    passphrase: str | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
) -> ResumeReport:
    """Resume the powered-off *machine* from *images* (a full image, then its increments).

    Validates everything first: on any problem raises CorruptImage (ImageKeyError for a
    missing or wrong key, ForeignImage for another machine's image) or MachineError with RAM
    and the images untouched.
    """
    if not images:
        raise InvalidRequest("resume needs at least one image")
    phases = Phases()
    key = image_key(key_file, passphrase)
    paths = [Path(p).absolute() for p in images]
    with phases("verify"):
        chain = _verify_chain(machine, paths, key, threads, progress)
    record = machine.boot_record()
    header = chain.last
    transition = Transition.begin(machine.path, "resume", record.generation)
    try:
        if machine.boot_record() != record:
            raise MachineError(f"machine {machine.path} changed meanwhile: nothing done")
        transition.record("restore", images=[str(p) for p in paths])
        generation = record.generation + 1
        cmdline = " ".join(
            filter(
                None,
                [
                    without_param(record.cmdline, PKRAM_PARAM),
                    f"{PKRAM_PARAM}={header.super_block_pfn}",
                ],
            )
        )
        with machine.ram() as ram:
            with phases("restore"):
                chain.restore(ram, threads=threads, progress=progress)
            transition.record(
                "restored",
                chain=[image.header.image_id.hex() for image in chain.images],
                cmdline=cmdline,
                kernel_image=None if record.kernel_image is None else list(record.kernel_image),
                super_block_pfn=header.super_block_pfn,
                super_block=super_block_facts(ram, header.super_block_pfn),
            )
        booted = _boot_resumed(machine, transition, phases)
    except BaseException:
        give_up(transition, lambda: undo_resume(machine))
        raise
    transition.end()
    final = chain.final
    data_pages = int(np.count_nonzero(chain.source >= 0))
    return ResumeReport(
        images=tuple(str(p) for p in paths),
        generation=generation,
        super_block_pfn=booted.super_block_pfn,
        pages=int(final.pfns.size),
        zero_pages=int(np.count_nonzero(chain.source == -1)),
        data_bytes=data_pages * PAGE_SIZE,
        stored_bytes=sum(image.header.stored_bytes for image in chain.images),
        preserved_pages=booted.preserved_pages,
        warnings=booted.warnings,
        durations_s=phases.durations_s,
    )
