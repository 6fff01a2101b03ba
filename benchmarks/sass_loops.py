"""Loops and tensor-core instructions in a compiled kernel's SASS (no GPU needed).

    text = disassemble(cubin)             the bundled nvdisasm, plain SASS
    sass = analyse(text)                  instructions, basic blocks, natural loops, MMAs
    loop = sass.main_loop()               the innermost loop holding the tensor-core instructions

A loop is a natural loop of the control-flow graph: a back edge u -> h where h dominates u
(an out-of-line block that jumps back into a loop, such as sm_100's mbarrier retry, is not
one). Per loop: the instructions one warp issues per iteration (the longest path from the header
to the back edge, nested loops and branches taken once each: the busiest warp, e.g. the one that
issues sm_100's MMAs), and its tensor-core instructions with their shapes:

    sm_80   HMMA.16816.F32.BF16 ...        one warp's m16 n8 k16 product
    sm_90   HGMMA.64x256x16.F32.BF16 ...   one warpgroup's (4 warps, each issues it) m64 n256 k16
    sm_100  UTCHMMA ... idesc[URx]         one CTA's product (one thread issues it); M and N from
                                           the instruction descriptor, a UMOV immediate

``fma(num_warps)`` turns a loop's MMAs into the multiply-adds one program (CTA) does per iteration.
"""
from __future__ import annotations

import dataclasses
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import triton

NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"

_LINE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_HGMMA = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)\.F32\.(\w+)")
_HMMA = re.compile(r"^HMMA\.(16)(8)(\d+)\.F32\.(\w+)")
_UTC_MMA = re.compile(r"^UTC[A-Z]*MMA")
_IDESC = re.compile(r"idesc\[(UR\d+)\]")
_UMOV_IMM = re.compile(r"^(UR\d+),\s*(0x[0-9a-f]+|\d+)$")
ASYNC_COPIES = ("LDGSTS", "UTMALDG", "UBLKCP")  # cp.async, TMA: a software-pipelined loop's loads
# sm_100 instruction descriptor (PTX ISA, tcgen05 "Instruction descriptor", kind::f16 / kind::tf32):
# bits 7-9 the A type (0 f16, 1 bf16, 2 tf32), bits 17-22 N >> 3, bits 24-28 M >> 4
_UTC_TYPES = {0: "F16", 1: "BF16", 2: "TF32"}


def disassemble(cubin: bytes) -> str:
    """Plain SASS of every function in ``cubin`` (nvdisasm -c: code sections only)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(NVDISASM), "-c", f.name], capture_output=True, text=True, check=True).stdout


@dataclasses.dataclass
class Instr:
    addr: int
    pred: str   # "@P0", "@!UP1", "" (always)
    op: str     # opcode with modifiers, e.g. "HGMMA.64x256x16.F32.BF16"
    args: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


@dataclasses.dataclass(frozen=True)
class Mma:
    """One tensor-core instruction: m x n x k multiply-adds on ``dtype`` inputs, per ``scope``
    (warp: HMMA; warpgroup: HGMMA; cta: tcgen05)."""
    m: int
    n: int
    k: int
    dtype: str
    scope: str

    @property
    def fma(self) -> int:
        return self.m * self.n * self.k

    def name(self) -> str:
        return f"{self.m}x{self.n}x{self.k}.{self.dtype}"


@dataclasses.dataclass
class Loop:
    header: int                 # block index
    blocks: frozenset           # block indices of the natural loop
    parent: Optional[int] = None  # index in Sass.loops of the innermost loop around it
    children: Tuple[int, ...] = ()
    path: int = 0               # instructions per iteration, busiest warp (longest header -> latch path)
    static: int = 0             # instructions in the loop's blocks, each counted once
    mmas: Tuple[Mma, ...] = ()  # tensor-core instructions of the blocks (nested loops included)
    unknown_mmas: int = 0       # tensor-core instructions whose shape could not be read
    async_copies: int = 0
    barriers: int = 0           # BAR.SYNC: CTA-wide barriers per iteration
    first_addr: int = 0
    last_addr: int = 0

    def fma(self, num_warps: int) -> int:
        """Multiply-adds of one program (CTA) per iteration."""
        per = {"warp": num_warps, "warpgroup": max(num_warps // 4, 1), "cta": 1}
        return sum(m.fma * per[m.scope] for m in self.mmas)

    def mma_names(self) -> str:
        counts: Dict[str, int] = {}
        for m in self.mmas:
            counts[m.name()] = counts.get(m.name(), 0) + 1
        unknown = f", ? x{self.unknown_mmas}" if self.unknown_mmas else ""
        return ", ".join(f"{n} x{c}" for n, c in counts.items()) + unknown


@dataclasses.dataclass
class Sass:
    instrs: List[Instr]
    blocks: List[Tuple[int, int]]   # [first, last] instruction indices
    succ: List[List[int]]
    loops: List[Loop]
    outside: int                    # instructions in no loop (prologue, epilogue, error paths; padding excluded)

    def mma_loops(self) -> List[int]:
        """Innermost loops that hold tensor-core instructions (indices into ``loops``)."""
        holding = [i for i, lp in enumerate(self.loops) if lp.mmas or lp.unknown_mmas]
        return [i for i in holding if not any(c in holding for c in self._descendants(i))]

    def _descendants(self, i: int) -> List[int]:
        out, todo = [], list(self.loops[i].children)
        while todo:
            c = todo.pop()
            out.append(c)
            todo.extend(self.loops[c].children)
        return out

    def main_loop(self) -> Optional[int]:
        """The main loop: of the innermost loops with tensor-core instructions, the software-
        pipelined one (async copies), then the one with most MMA work per iteration."""
        cands = self.mma_loops()
        if not cands:
            return None
        return max(cands, key=lambda i: (self.loops[i].async_copies > 0,
                                         sum(m.fma for m in self.loops[i].mmas), self.loops[i].static))


def _mma_of(ins: Instr, umov: Dict[str, int]) -> Tuple[Optional[Mma], bool]:
    """(the Mma, True) for a tensor-core instruction, (None, True) if its shape is unknown,
    (None, False) for any other instruction."""
    m = _HGMMA.match(ins.op)
    if m:
        return Mma(int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4), "warpgroup"), True
    m = _HMMA.match(ins.op)
    if m:
        return Mma(16, 8, int(m.group(3)), m.group(4), "warp"), True
    if _UTC_MMA.match(ins.op):
        d = _IDESC.search(ins.args)
        desc = umov.get(d.group(1)) if d else None
        if desc is None:
            return None, True
        dtype = _UTC_TYPES.get((desc >> 7) & 7, "?")
        k = 8 if dtype == "TF32" else 16  # 32 bytes of K per instruction
        return Mma(((desc >> 24) & 0x1F) << 4, ((desc >> 17) & 0x3F) << 3, k, dtype, "cta"), True
    return None, False


def parse(text: str, function: Optional[str] = None) -> Tuple[List[Instr], Dict[str, int]]:
    """(instructions, label -> instruction index) of one function (the first if not named)."""
    instrs: List[Instr] = []
    labels: Dict[str, int] = {}
    pending: List[str] = []
    current, started = None, False
    for line in text.splitlines():
        sec = re.match(r"^\s*\.section\s+\.text\.([\w$]+)", line)
        if sec:
            if started and current is not None:
                break  # the next function
            current = sec.group(1)
            started = function is None or current == function
            continue
        if not started:
            continue
        lab = _LABEL.match(line)
        if lab:
            pending.append(lab.group(1))
            continue
        m = _LINE.match(line)
        if m:
            for name in pending:
                labels[name] = len(instrs)
            pending = []
            instrs.append(Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4)))
    for name in pending:
        labels[name] = len(instrs)
    return instrs, labels


def _is_branch(ins: Instr) -> bool:
    return ins.base in ("BRA", "JMP", "BRX", "JMX")


def _ends_flow(ins: Instr) -> bool:
    """Control never falls through: an unpredicated exit or return, or a branch with neither a
    predicate guard nor a predicate operand (``BRA.U !UP3, `(...)``' is conditional)."""
    if ins.pred not in ("", "@PT"):
        return False
    if ins.base in ("EXIT", "RET", "BRX", "JMX", "KILL"):
        return True
    return ins.base in ("BRA", "JMP") and ins.args.startswith("`")


def _blocks(instrs: List[Instr], labels: Dict[str, int]):
    leaders = {0} | {i for i in labels.values() if i < len(instrs)}
    for i, ins in enumerate(instrs):
        if (_is_branch(ins) or ins.base in ("EXIT", "RET")) and i + 1 < len(instrs):
            leaders.add(i + 1)
    starts = sorted(leaders)
    blocks = [(s, (starts[j + 1] if j + 1 < len(starts) else len(instrs)) - 1) for j, s in enumerate(starts)]
    index = {s: j for j, (s, _) in enumerate(blocks)}
    succ: List[List[int]] = []
    for j, (_s, e) in enumerate(blocks):
        last = instrs[e]
        out = []
        if _is_branch(last):
            t = _TARGET.search(last.args)
            if t and t.group(1) in labels and labels[t.group(1)] in index:
                out.append(index[labels[t.group(1)]])
        if not _ends_flow(last) and j + 1 < len(blocks):
            out.append(j + 1)
        succ.append(out)
    return blocks, succ


def _dominators(succ: List[List[int]]) -> List[set]:
    n = len(succ)
    pred = [[] for _ in range(n)]
    for u, vs in enumerate(succ):
        for v in vs:
            pred[v].append(u)
    reach, todo = {0}, [0]
    while todo:
        for v in succ[todo.pop()]:
            if v not in reach:
                reach.add(v)
                todo.append(v)
    dom = [set(reach) if b in reach else {b} for b in range(n)]
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for b in sorted(reach - {0}):
            ps = [dom[p] for p in pred[b] if p in reach]
            new = {b} | (set.intersection(*ps) if ps else set())
            if new != dom[b]:
                dom[b], changed = new, True
    return dom, pred


def analyse(text: str, function: Optional[str] = None) -> Sass:
    instrs, labels = parse(text, function)
    blocks, succ = _blocks(instrs, labels)
    dom, pred = _dominators(succ)
    # natural loops: back edges u -> h with h dominating u; loops sharing a header are merged
    bodies: Dict[int, set] = {}
    latches: Dict[int, List[int]] = {}
    for u, vs in enumerate(succ):
        for h in vs:
            if h in dom[u]:
                body, todo = {h, u}, ([u] if u != h else [])
                while todo:
                    for p in pred[todo.pop()]:
                        if p not in body:
                            body.add(p)
                            todo.append(p)
                bodies.setdefault(h, set()).update(body)
                latches.setdefault(h, []).append(u)
    back_edges = {(u, h) for h, us in latches.items() for u in us}
    umov: Dict[str, int] = {}
    mma_at: Dict[int, Tuple[Optional[Mma], bool]] = {}
    for i, ins in enumerate(instrs):  # UMOV immediates seen so far (sm_100 descriptors), in code order
        m = _UMOV_IMM.match(ins.args) if ins.base == "UMOV" else None
        if m:
            umov[m.group(1)] = int(m.group(2), 0)
        found = _mma_of(ins, umov)
        if found[1]:
            mma_at[i] = found
    loops = [Loop(h, frozenset(b)) for h, b in sorted(bodies.items())]
    for i, lp in enumerate(loops):  # nesting: the smallest loop strictly containing this one
        around = [j for j, o in enumerate(loops) if j != i and lp.blocks < o.blocks]
        lp.parent = min(around, key=lambda j: len(loops[j].blocks)) if around else None
    for i, lp in enumerate(loops):
        lp.children = tuple(j for j, o in enumerate(loops) if o.parent == i)
        idx = [k for b in lp.blocks for k in range(blocks[b][0], blocks[b][1] + 1)]
        lp.static = len(idx)
        found = [mma_at[k] for k in sorted(idx) if k in mma_at]
        lp.mmas = tuple(m for m, _ in found if m is not None)
        lp.unknown_mmas = sum(1 for m, _ in found if m is None)
        lp.async_copies = sum(1 for k in idx if instrs[k].base in ASYNC_COPIES)
        lp.barriers = sum(1 for k in idx if instrs[k].op.startswith("BAR.SYNC"))
        lp.first_addr = min(instrs[k].addr for k in idx)
        lp.last_addr = max(instrs[k].addr for k in idx)
        lp.path = _longest_path(lp, blocks, succ, back_edges)
    in_loop = {k for lp in loops for b in lp.blocks for k in range(blocks[b][0], blocks[b][1] + 1)}
    outside = sum(1 for k, ins in enumerate(instrs) if k not in in_loop and ins.base != "NOP")
    return Sass(instrs, blocks, succ, loops, outside)


def _longest_path(lp: Loop, blocks, succ, back_edges) -> int:
    """Instructions on the longest path header -> a latch inside the loop, back edges removed
    (a nested loop or a retry loop counts once)."""
    size = {b: blocks[b][1] - blocks[b][0] + 1 for b in lp.blocks}
    order, seen = [], set()

    def visit(b):  # topological order of the loop's DAG (iterative DFS)
        stack = [(b, iter(succ[b]))]
        seen.add(b)
        while stack:
            node, it = stack[-1]
            for v in it:
                if v in lp.blocks and (node, v) not in back_edges and v not in seen:
                    seen.add(v)
                    stack.append((v, iter(succ[v])))
                    break
            else:
                stack.pop()
                order.append(node)

    visit(lp.header)
    best = {}
    for b in reversed(order):  # from the header forward
        here = best.get(b, 0) + size[b] if b != lp.header else size[b]
        best[b] = here
        for v in succ[b]:
            if v in lp.blocks and (b, v) not in back_edges:
                best[v] = max(best.get(v, 0), here)
    latch_ends = [b for b in lp.blocks if (b, lp.header) in back_edges]
    return max((best.get(b, 0) for b in latch_ends), default=0)
