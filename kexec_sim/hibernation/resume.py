"""Resume from hibernation: a chain of images back into RAM, then boot as after a kexec.

``resume`` is the way back, on the powered-off machine the image was taken on: it checks the
front of every image of the chain (kexec_sim.hibernation.reader.open_image: header, pfn list,
length) and the chain itself before it writes anything; then reads each image once, storing
each chunk's pages into RAM as soon as the chunk passed its checks (Image.read_into), and
puts back what it overwrote if any chunk is refused (kexec_sim.hibernation.undo), so a bad
image leaves RAM and its keys exactly as they were; then writes the storage keys (so CHANGED
bits are what they were at hibernation, not "everything"), invalidates the images and boots
the next generation with ``pkram=`` naming the image's super block, so mounting restores the
trees.

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
from kexec_sim.geometry import PAGE_SIZE
from kexec_sim.handover import rewrite_super_block, super_block_facts
from kexec_sim.hibernation import reader, writer
from kexec_sim.hibernation.crypto import ImageKey, image_key
from kexec_sim.hibernation.format import ImageHeader, PfnList
from kexec_sim.hibernation.last_image import write_last_image
from kexec_sim.hibernation.progress import Progress
from kexec_sim.hibernation.report import Report, reason
from kexec_sim.hibernation.undo import RamUndo
from kexec_sim.kernel_image import default_kernel_range, write_synthetic_image
from kexec_sim.machine import Machine
from kexec_sim.owners import FREE, boot_owner_map
from kexec_sim.pages import PfnArray
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
    """A chain of images whose fronts are checked, a full image then its increments, as resume
    restores it: the last image's page set and, for each of its pages, the image holding its
    data."""

    images: tuple[reader.Image, ...]
    source: npt.NDArray[np.int64]
    """Per page of the final set: the index of the image holding its data, -1 for zero."""

    @classmethod
    def of(cls, images: Sequence[reader.Image]) -> "Chain":
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
        self,
        ram: Ram,
        undo: RamUndo,
        *,
        threads: int | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Write the chain's pages into *ram* (data first, zero pages punched), then the keys,
        *undo* saving everything they overwrite first.

        Every image is read once, whole, by *threads* workers, each chunk checked and its pages
        for the final set stored as soon as it passed (Image.read_into), also in an image none
        of whose pages are left. On any error (CorruptImage for a bad chunk, an OSError) RAM is
        partly written: ``undo.put_back()`` puts it back as it was. Pages outside the set keep
        whatever power off left there (poison, or zeros).
        """
        final = self.final
        wanted = np.zeros(ram.nr_pages, dtype=np.bool_)
        total = int(np.count_nonzero(self.source >= 0))
        before = 0
        for k, image in enumerate(self.images):
            mine = final.pfns[self.source == k]
            wanted[:] = False
            wanted[mine] = True

            def done(pages: int, before: int = before) -> None:
                if progress is not None:
                    progress("restore", before + pages, total)

            image.read_into(ram, wanted, undo=undo, threads=threads, done=done)
            before += mine.size
        zero = final.pfns[self.source == -1]
        zero = zero[undo.backed(zero)]  # a hole reads as zeros already
        undo.save(zero)
        ram.punch_holes(zero)
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


def _open_chain(
    machine: Machine, paths: Sequence[Path], key: ImageKey | None, progress: Progress | None
) -> Chain:
    """Check the front of every image (reader.open_image) and the chain, writing nothing:
    CorruptImage/MachineError if bad. The chunks are checked as the restore reads them."""
    record = machine.boot_record()
    if record.powered:
        raise MachineError(
            f"machine {machine.path} is running (generation {record.generation}): resume "
            "restores a hibernated machine, which is powered off"
        )
    images = []
    for k, path in enumerate(paths):
        try:
            checked = reader.open_image(
                path,
                machine_id=machine.machine_id,
                nr_ram_pages=machine.nr_pages,
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

    On any problem raises CorruptImage (ImageKeyError for a missing or wrong key,
    ForeignImage for another machine's image) or MachineError with RAM, its keys and the
    images as they were: the images' fronts and the chain are checked before anything is
    written, and what the restore stored before a chunk was refused is put back.
    """
    if not images:
        raise InvalidRequest("resume needs at least one image")
    phases = Phases()
    key = image_key(key_file, passphrase)
    paths = [Path(p).absolute() for p in images]
    with phases("verify"):
        chain = _open_chain(machine, paths, key, progress)
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
            undo = RamUndo(ram)
            try:
                with phases("restore"):
                    chain.restore(ram, undo, threads=threads, progress=progress)
                transition.record(
                    "restored",
                    chain=[image.header.image_id.hex() for image in chain.images],
                    cmdline=cmdline,
                    kernel_image=None if record.kernel_image is None else list(record.kernel_image),
                    super_block_pfn=header.super_block_pfn,
                    super_block=super_block_facts(ram, header.super_block_pfn),
                )
            except BaseException:
                if not transition.committed:
                    undo.put_back()  # a refused image leaves RAM and its keys as they were
                raise
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
