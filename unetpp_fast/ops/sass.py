"""Reading sm_90 SASS (`cuobjdump -sass`) for the static performance model: functions, loops, hot loops.

A loop is found from its back edge: a branch at address A whose target T <= A spans the body
[T, A] (structured code: the compilers lay loop bodies out contiguously). The *hot loops* of a
kernel are the innermost loops that contain tensor-core instructions (HMMA / HGMMA); for each one
this module counts the instructions of the body by class, and walks the body's control-flow graph
for the shortest and the longest path from the loop head to the back edge (inner loops taken
once): a body that branches per K block on the resample mode costs its cp.async path for a
plain piece and up to its longest path for a resampled one.

    python -m unetpp_fast.ops.sass kernel.cubin     # hot loops of every function, as a table
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

# Instruction classes counted in a loop body; an opcode's base name (before the first '.') decides.
CLASSES: dict[str, tuple[str, ...]] = {
    "tensor": ("HMMA", "HGMMA", "IMMA", "IGMMA", "DMMA", "QGMMA", "BGMMA"),
    "ldgsts": ("LDGSTS",),
    "ldsm": ("LDSM",),
    "ldg": ("LDG",),
    "lds": ("LDS",),
    "sts": ("STS",),
    "tma": ("UTMALDG", "UBLKCP"),
    "bar": ("BAR", "SYNCS", "WARPGROUP"),
    "local": ("LDL", "STL"),
    "branch": ("BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT"),
}
_CLASS_OF = {op: name for name, ops in CLASSES.items() for op in ops}

_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$")
# "        /*0190*/               @P1 BRA 0x550 ;   /* 0x... */"
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
_TARGET = re.compile(r"(?:0x([0-9a-fA-F]+)|`\(\.L_x_(\d+)\))")
_LABEL = re.compile(r"^\s*\.L_x_(\d+):")
_NVDISASM_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-fA-F]{4,})\*/\s+(.*?)\s*;")


@dataclass(frozen=True)
class Instruction:
    address: int
    predicate: str  # "" or "@P0", "@!P1", ...
    opcode: str  # full opcode with modifiers, e.g. "HMMA.16816.F32.BF16"
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def klass(self) -> str:
        return _CLASS_OF.get(self.base, "other")

    @property
    def is_branch(self) -> bool:
        return self.base in ("BRA", "JMP")

    @property
    def unconditional(self) -> bool:
        return self.predicate in ("", "@PT")

    def target(self, labels: dict[int, int] | None = None) -> int | None:
        """Branch target address (None for indirect branches or non-branches)."""
        if not self.is_branch:
            return None
        match = _TARGET.search(self.operands)
        if match is None:
            return None
        if match.group(1) is not None:
            return int(match.group(1), 16)
        return (labels or {}).get(int(match.group(2)))


@dataclass(frozen=True)
class Function:
    name: str
    instructions: tuple[Instruction, ...]
    labels: dict[int, int] = field(default_factory=dict, compare=False)  # nvdisasm label -> address

    def index_of(self, address: int) -> int:
        for index, inst in enumerate(self.instructions):
            if inst.address == address:
                return index
        raise KeyError(f"no instruction at 0x{address:x} in {self.name}")


def _split(text: str) -> tuple[str, str, str]:
    """'@!P0 BRA 0x710' -> ('@!P0', 'BRA', '0x710')."""
    text = text.strip()
    predicate = ""
    if text.startswith("@"):
        predicate, _, text = text.partition(" ")
    opcode, _, operands = text.strip().partition(" ")
    return predicate, opcode, operands.strip()


def parse_sass(text: str) -> list[Function]:
    """Functions of `cuobjdump -sass` (or `nvdisasm`) output, with their instructions in address order."""
    functions: list[Function] = []
    name: str | None = None
    body: list[Instruction] = []
    labels: dict[int, int] = {}
    pending_labels: list[int] = []

    def close() -> None:
        if name is not None and body:
            functions.append(Function(name, tuple(body), dict(labels)))

    for line in text.splitlines():
        match = _FUNCTION.match(line)
        if match:
            close()
            name, body, labels, pending_labels = match.group(1), [], {}, []
            continue
        match = _LABEL.match(line)
        if match:
            pending_labels.append(int(match.group(1)))
            continue
        match = _INSTRUCTION.match(line)
        if match and name is not None:
            address = int(match.group(1), 16)
            predicate, opcode, operands = _split(match.group(2))
            if not opcode or opcode.startswith("0x"):
                continue  # the encoding half of a cuobjdump line pair
            for label in pending_labels:
                labels[label] = address
            pending_labels = []
            body.append(Instruction(address, predicate, opcode, operands))
    close()
    return functions


@dataclass(frozen=True)
class Loop:
    head: int  # address of the first instruction of the body (the back edge's target)
    latch: int  # address of the back-edge branch
    first: int  # index of the head in Function.instructions
    last: int  # index of the latch

    def contains(self, other: Loop) -> bool:
        return self.first <= other.first and other.last <= self.last and self != other


def loops(function: Function) -> list[Loop]:
    """Every back edge as a loop [target, branch], merged per head (the outermost latch wins)."""
    by_head: dict[int, Loop] = {}
    for index, inst in enumerate(function.instructions):
        target = inst.target(function.labels)
        if target is None or target > inst.address:
            continue
        first = function.index_of(target)
        loop = Loop(target, inst.address, first, index)
        if target not in by_head or by_head[target].last < index:
            by_head[target] = loop
    return sorted(by_head.values(), key=lambda loop: loop.first)


@dataclass(frozen=True)
class LoopStats:
    """One hot loop: static counts of its body, and the shortest / longest path per iteration."""

    function: str
    head: int
    latch: int
    static_instructions: int
    counts: dict[str, int]  # per class, over the whole body
    min_path: int  # instructions on the `none` path head -> back edge (see _paths; inner loops once)
    max_path: int  # ... on the longest such path
    shortest_path: int  # the plain shortest path head -> back edge
    min_path_counts: dict[str, int]
    max_path_counts: dict[str, int]
    tensor_opcodes: dict[str, int]  # full tensor-core opcodes in the body, e.g. {"HMMA.16816.F32.BF16": 16}
    calls: tuple[int, ...] = ()  # CALL targets in the body (out-of-line subroutines)
    # The longest path head -> back edge that issues a sub-word global load (LDG.U16 / .U8 ...): an
    # inline per-element loader (0 when the body has none), and its counts.
    element_path: int = 0
    element_path_counts: dict[str, int] = field(default_factory=dict)


def _class_counts(instructions: list[Instruction] | tuple[Instruction, ...]) -> dict[str, int]:
    counts = Counter(inst.klass for inst in instructions)
    return {name: counts.get(name, 0) for name in (*CLASSES, "other")}


def _paths(function: Function, loop: Loop) -> tuple[list[int], list[int]]:
    """The `none` path and the longest path (as index lists) from the loop head to the latch.

    Edges: fall-through (unless after an unconditional branch or EXIT) and forward branch targets
    inside the body; backward edges inside the body (inner loops) are dropped, so each inner loop
    counts once. Branches out of the body, and EXIT, end a path that does not reach the latch.
    The `none` path is the shortest among those issuing the most LDGSTS: a K block of a plain
    piece takes the cp.async branch, while the plain shortest path is usually a guard that skips
    the loads (the last prefetch), which no real K block costs only.
    """
    body = function.instructions
    first, last = loop.first, loop.last
    index_of = {body[i].address: i for i in range(first, last + 1)}
    # Lexicographic keys: (-LDGSTS, length) minimised for the none path; length maximised for the other.
    best_min: dict[int, tuple[int, int]] = {first: (-int(body[first].klass == "ldgsts"), 1)}
    best_max: dict[int, int] = {first: 1}
    prev_min: dict[int, int] = {}
    prev_max: dict[int, int] = {}
    for i in range(first, last):
        if i not in best_min:
            continue  # unreachable from the head without a back edge
        inst = body[i]
        successors = []
        ends = inst.base == "EXIT" and inst.unconditional
        if not (inst.is_branch and inst.unconditional) and not ends:
            successors.append(i + 1)
        target = inst.target(function.labels)
        if target is not None and target in index_of and index_of[target] > i:
            successors.append(index_of[target])
        for j in successors:
            loads, length = best_min[i]
            key = (loads - int(body[j].klass == "ldgsts"), length + 1)
            if j not in best_min or key < best_min[j]:
                best_min[j], prev_min[j] = key, i
            if best_max[i] + 1 > best_max.get(j, 0):
                best_max[j], prev_max[j] = best_max[i] + 1, i

    def walk(prev: dict[int, int]) -> list[int]:
        path, i = [last], last
        while i != first:
            i = prev[i]
            path.append(i)
        return path[::-1]

    if last not in best_min:
        everything = list(range(first, last + 1))
        return everything, everything
    return walk(prev_min), walk(prev_max)


_SUBWORD = (".U8", ".S8", ".U16", ".S16")


def longest_path(function: Function, loop: Loop) -> list[int]:
    """Instruction indices of the loop's longest path from its head to its back edge (any loop,
    with or without tensor-core instructions)."""
    return _paths(function, loop)[1]


def class_counts(instructions: list[Instruction] | tuple[Instruction, ...]) -> dict[str, int]:
    """Instructions per class (tensor, ldgsts, ldsm, ldg, lds, sts, bar, ...)."""
    return _class_counts(instructions)


def is_element_load(inst: Instruction) -> bool:
    """A global load narrower than 32 bits: one 8- or 16-bit element (a per-element loader)."""
    return inst.base == "LDG" and any(width in inst.opcode for width in _SUBWORD)


def _longest_path_through(function: Function, loop: Loop, wanted: Callable[[Instruction], bool]) -> list[int]:
    """The longest path (index list) head -> latch that contains an instruction `wanted` accepts
    ([] when none does); edges as in `_paths` (inner loops once)."""
    body = function.instructions
    first, last = loop.first, loop.last
    index_of = {body[i].address: i for i in range(first, last + 1)}
    # Per index and flag (a wanted instruction seen on the way): the longest length and predecessor.
    best: dict[tuple[int, bool], int] = {(first, wanted(body[first])): 1}
    prev: dict[tuple[int, bool], tuple[int, bool]] = {}
    for i in range(first, last):
        inst = body[i]
        successors = []
        if not (inst.is_branch and inst.unconditional) and not (inst.base == "EXIT" and inst.unconditional):
            successors.append(i + 1)
        target = inst.target(function.labels)
        if target is not None and target in index_of and index_of[target] > i:
            successors.append(index_of[target])
        for seen in (False, True):
            if (i, seen) not in best:
                continue
            for j in successors:
                key = (j, seen or wanted(body[j]))
                if best[(i, seen)] + 1 > best.get(key, 0):
                    best[key], prev[key] = best[(i, seen)] + 1, (i, seen)
    if (last, True) not in best:
        return []
    path, node = [last], (last, True)
    while node in prev:
        node = prev[node]
        path.append(node[0])
    return path[::-1]


def is_packed_max(inst: Instruction) -> bool:
    """A packed 16-bit max (HMNMX2): what a 2x2 max-pool of 16-bit values is built from."""
    return inst.base == "HMNMX2"


def path_through(
    function: Function, stats: LoopStats, wanted: Callable[[Instruction], bool]
) -> tuple[int, dict]:
    """(instructions, counts per class) of the longest path through the hot loop `stats` that
    contains an instruction `wanted` accepts; (0, {}) when none does. An upper bound on a trip that
    takes that branch (other per-item branches of the path may take their longest side)."""
    loop = Loop(stats.head, stats.latch, function.index_of(stats.head), function.index_of(stats.latch))
    path = _longest_path_through(function, loop, wanted)
    return len(path), (_class_counts([function.instructions[i] for i in path]) if path else {})


def hot_loops(function: Function) -> list[LoopStats]:
    """The innermost loops of `function` that contain tensor-core instructions."""
    found = loops(function)
    body = function.instructions

    def has_tensor(loop: Loop) -> bool:
        return any(body[i].klass == "tensor" for i in range(loop.first, loop.last + 1))

    tensor_loops = [loop for loop in found if has_tensor(loop)]
    innermost = [loop for loop in tensor_loops if not any(loop.contains(other) for other in tensor_loops)]
    stats = []
    for loop in innermost:
        instructions = body[loop.first : loop.last + 1]
        shortest, longest = _paths(function, loop)
        lowest = _segment(function, loop.first, {loop.last}, set(), False, prefer_ldgsts=False)
        tensor = Counter(inst.opcode for inst in instructions if inst.klass == "tensor")
        element = _longest_path_through(function, loop, is_element_load)
        stats.append(
            LoopStats(
                function=function.name,
                head=loop.head,
                latch=loop.latch,
                static_instructions=len(instructions),
                counts=_class_counts(instructions),
                min_path=len(shortest),
                max_path=len(longest),
                shortest_path=lowest if lowest > 0 else len(shortest),
                min_path_counts=_class_counts([body[i] for i in shortest]),
                max_path_counts=_class_counts([body[i] for i in longest]),
                tensor_opcodes=dict(tensor),
                calls=tuple(
                    sorted(
                        {
                            int(m.group(1), 16)
                            for inst in instructions
                            if inst.base == "CALL" and (m := _TARGET.search(inst.operands)) and m.group(1)
                        }
                    )
                ),
                element_path=len(element),
                element_path_counts=_class_counts([body[i] for i in element]) if element else {},
            )
        )
    return stats


def _segment(
    function: Function,
    start: int,
    ends: set[int] | None,
    free: set[int],
    longest: bool,
    prefer_ldgsts: bool = True,
) -> int:
    """Instructions on the best forward path from index `start` to an index in `ends` (None: to an
    EXIT), not counting indices in `free`: the shortest among those with the most LDGSTS, or the
    longest (`longest`). Backward edges are dropped (every loop once). -1 when no path."""
    body = function.instructions
    index_of = {inst.address: i for i, inst in enumerate(body)}

    def weight(i: int) -> tuple[int, int]:
        if i in free:
            return (0, 0)
        return (-int(prefer_ldgsts and body[i].klass == "ldgsts"), 1)

    best: dict[int, tuple[int, int]] = {start: weight(start)}
    result: tuple[int, int] | None = None
    for i in range(start, len(body)):
        if i not in best:
            continue
        inst = body[i]
        if (ends is not None and i in ends) or (ends is None and inst.base == "EXIT" and inst.unconditional):
            if result is None or (best[i][1] > result[1] if longest else best[i] < result):
                result = best[i]
            continue
        successors = []
        if not (inst.is_branch and inst.unconditional) and not (inst.base == "EXIT" and inst.unconditional):
            successors.append(i + 1)
        target = inst.target(function.labels)
        if target is not None and index_of.get(target, -1) > i:
            successors.append(index_of[target])
        for j in successors:
            if j >= len(body):
                continue
            w = weight(j)
            key = (best[i][0] + w[0], best[i][1] + w[1])
            if j not in best or (key[1] > best[j][1] if longest else key < best[j]):
                best[j] = key
    return -1 if result is None else result[1]


def enclosing_loops(function: Function, stats: LoopStats) -> list[Loop]:
    """The loops that contain the hot loop `stats`, innermost first."""
    first, last = function.index_of(stats.head), function.index_of(stats.latch)
    outer = [
        loop
        for loop in loops(function)
        if loop.first <= first and last <= loop.last and loop.head != stats.head
    ]
    return sorted(outer, key=lambda loop: loop.first, reverse=True)


def code_around(function: Function, stats: LoopStats) -> int:
    """Instructions one trip of the innermost loop enclosing the hot loop `stats` issues outside it:
    the shortest path from that loop's head to the hot loop's head (its pipeline prologue, address
    set-up; sibling loops skipped by their zero-trip guards), plus from the hot loop's exit to that
    loop's back edge (the drain). 0 when no loop encloses it."""
    outer = enclosing_loops(function, stats)
    if not outer:
        return 0
    head, latch = function.index_of(stats.head), function.index_of(stats.latch)
    before = _segment(function, outer[0].first, {head}, set(), False, prefer_ldgsts=False)
    after = _segment(function, latch + 1, {outer[0].last}, set(), False, prefer_ldgsts=False)
    if before < 0 or after < 0:
        raise ValueError(f"no path around the hot loop at 0x{stats.head:x} in {function.name}")
    return before - 1 + after  # the hot loop's head belongs to its trips


def outside_path(function: Function, stats: list[LoopStats]) -> int:
    """Instructions one CTA issues outside its hot loops, along one path: entry -> first hot loop,
    between consecutive hot loops, last hot loop -> EXIT; the shortest path with the most LDGSTS
    (the cp.async prologue), or the longest path when the function has no LDGSTS. Other loops count
    once (an epilogue store loop is undercounted by its trip count)."""
    if not stats:
        return sum(1 for inst in function.instructions if inst.base != "NOP")
    longest = not any(inst.klass == "ldgsts" for inst in function.instructions)
    spans = sorted((function.index_of(s.head), function.index_of(s.latch)) for s in stats)
    free = {i for first, last in spans for i in range(first, last + 1)}
    total, start = 0, 0
    for first, last in spans:
        part = _segment(function, start, {first}, free, longest)
        if part < 0:
            raise ValueError(f"no path to the hot loop at index {first} in {function.name}")
        total += part
        start = last
    tail = _segment(function, start, None, free, longest)
    return total + max(tail, 0)


def subroutine_size(function: Function, address: int) -> int:
    """Static instructions of the out-of-line subroutine at `address`: up to the next CALL target
    (or the end of the function), NOPs and the trailing self-branch excluded; every path of it."""
    starts = sorted(
        {
            int(m.group(1), 16)
            for inst in function.instructions
            if inst.base == "CALL" and (m := _TARGET.search(inst.operands)) and m.group(1)
        }
    )
    end = next((a for a in starts if a > address), None)
    count = 0
    for inst in function.instructions[function.index_of(address) :]:
        if end is not None and inst.address >= end:
            break
        if inst.base == "NOP" or (inst.is_branch and inst.target(function.labels) == inst.address):
            continue
        count += 1
    return count


_HMMA_SHAPE = re.compile(r"^HMMA\.(\d+)(\d)(\d+)\b")  # HMMA.16816 -> m16 n8 k16
_HGMMA_SHAPE = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)\b")


def tensor_flops(opcode: str) -> tuple[int, str]:
    """(FLOPs, issuing unit) of one tensor-core instruction: HMMA per warp, HGMMA per warpgroup.

    HMMA.16816 is m16 n8 k16 (2 x 16 x 8 x 16 FLOPs per warp); HGMMA.64xNx16 is a warpgroup
    instruction (2 x 64 x N x 16 FLOPs, each of the four warps issuing it once).
    """
    match = _HGMMA_SHAPE.match(opcode)
    if match:
        m, n, k = (int(g) for g in match.groups())
        return 2 * m * n * k, "warpgroup"
    if opcode.startswith("HMMA.16816"):
        return 2 * 16 * 8 * 16, "warp"
    if opcode.startswith("HMMA.1688"):
        return 2 * 16 * 8 * 8, "warp"
    match = _HMMA_SHAPE.match(opcode)
    if match:
        m, n, k = (int(g) for g in match.groups())
        return 2 * m * n * k, "warp"
    return 0, "warp"


def loop_tensor_flops_per_warp(stats: LoopStats) -> float:
    """Tensor FLOPs one warp's iteration of the loop performs (HGMMA: a quarter of the warpgroup's)."""
    total = 0.0
    for opcode, count in stats.tensor_opcodes.items():
        flops, unit = tensor_flops(opcode)
        total += count * (flops / 4 if unit == "warpgroup" else flops)
    return total


def disassemble(path: str, tool: str, arch: str = "sm_90") -> str:
    """`cuobjdump -sass -arch <arch> <path>` (a cubin or a library with embedded cubins)."""
    args = [tool, "-sass", path] if path.endswith(".cubin") else [tool, "-sass", "-arch", arch, path]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"cuobjdump failed on {path}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def main(argv: list[str] | None = None) -> None:
    from unetpp_fast.ops.kernel_resources import find_cuobjdump

    argv = sys.argv[1:] if argv is None else argv
    tool = find_cuobjdump()
    if tool is None or not argv:
        raise SystemExit("usage: python -m unetpp_fast.ops.sass <cubin or .so> (needs cuobjdump)")
    for function in parse_sass(disassemble(argv[0], tool)):
        for stats in hot_loops(function):
            print(
                f"{function.name[:80]}  0x{stats.head:x}-0x{stats.latch:x}"
                f"  static {stats.static_instructions}"
                f"  path {stats.min_path}..{stats.max_path}  {stats.tensor_opcodes}  {stats.counts}"
            )


if __name__ == "__main__":
    main()
