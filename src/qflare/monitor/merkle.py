"""RFC 6962 Merkle hash trees: tree heads, inclusion and consistency proofs, their verifiers.

The tree is Certificate Transparency's (RFC 6962 section 2.1, unchanged in RFC 9162 section
2.1.1), with SHA-256:

* a leaf hash is ``SHA-256(0x00 || data)`` and an interior node ``SHA-256(0x01 || left ||
  right)``. The two prefixes are the second-preimage defence: a leaf can never be passed off as
  an interior node (or the reverse) to forge a proof for data that was never logged;
* the tree over ``n`` leaves splits at ``k``, the largest power of two smaller than ``n``; the
  empty tree's head is ``SHA-256("")``.

Proof generation follows RFC 6962 sections 2.1.1 (``PATH``) and 2.1.2 (``PROOF``/``SUBPROOF``);
verification follows RFC 9162 sections 2.1.3.2 and 2.1.4.2, which check a proof without ever
building the tree. The verifiers raise ``ProofError``; they never return a bool.

Everything here is pure: no I/O, no clock. ``MerkleTree`` is the incremental form the audit log
keeps in memory (every complete subtree is hashed once, when its last leaf arrives, so a tree
head or a proof costs O(log n) hashes of cached nodes); the module-level functions over a list
of leaf hashes are the textbook recursion, kept as the reference the tree is tested against.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Final

from qflare.errors import QflareError

HASH_SIZE: Final = 32
LEAF_PREFIX: Final = b"\x00"
NODE_PREFIX: Final = b"\x01"
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()

# A subtree hash of the leaves [start, end): how the shared proof recursions reach the data.
Subtree = Callable[[int, int], bytes]


class ProofError(QflareError):
    """A Merkle proof did not verify, or asked about sizes or indexes that cannot exist."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def split_point(n: int) -> int:
    """``k``: the largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    if n < 2:
        raise ValueError("a tree of fewer than two leaves does not split")
    return 1 << ((n - 1).bit_length() - 1)


# -- the reference recursion over a list of leaf hashes ------------------------------------------


def _list_subtree(leaves: Sequence[bytes]) -> Subtree:
    def subtree(start: int, end: int) -> bytes:
        n = end - start
        if n == 0:
            return EMPTY_ROOT
        if n == 1:
            return leaves[start]
        k = split_point(n)
        return node_hash(subtree(start, start + k), subtree(start + k, end))

    return subtree


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH over ``leaves`` (leaf hashes, not data), RFC 6962 section 2.1."""
    return _list_subtree(leaves)(0, len(leaves))


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """``PATH(index, D[len(leaves)])``, RFC 6962 section 2.1.1."""
    _check_inclusion_args(index, len(leaves))
    return inclusion_path(index, len(leaves), _list_subtree(leaves))


def consistency_proof(leaves: Sequence[bytes], first: int) -> list[bytes]:
    """``PROOF(first, D[len(leaves)])``, RFC 6962 section 2.1.2."""
    _check_consistency_args(first, len(leaves))
    return consistency_path(first, len(leaves), _list_subtree(leaves))


# -- proof generation, over any source of subtree hashes ------------------------------------------


def _check_inclusion_args(index: int, size: int) -> None:
    if not 0 <= index < size:
        raise ProofError(f"leaf {index} is not in a tree of size {size}")


def _check_consistency_args(first: int, second: int) -> None:
    if not 0 <= first <= second:
        raise ProofError(f"no consistency proof from size {first} to size {second}")


def inclusion_path(index: int, size: int, subtree: Subtree) -> list[bytes]:
    """The audit path of leaf ``index`` in the tree of ``size`` leaves, leaf side first."""
    _check_inclusion_args(index, size)
    path: list[bytes] = []
    start, end, m = 0, size, index
    # PATH(m, D[n]) recurses into the half holding m and appends the other half's head;
    # walking down and prepending gives the same list without recursion.
    while end - start > 1:
        k = split_point(end - start)
        if m < k:
            path.append(subtree(start + k, end))
            end = start + k
        else:
            path.append(subtree(start, start + k))
            start, m = start + k, m - k
    path.reverse()
    return path


def consistency_path(first: int, second: int, subtree: Subtree) -> list[bytes]:
    """``PROOF(first, D[second])``: empty when ``first`` is 0 or equals ``second``."""
    _check_consistency_args(first, second)
    if first in (0, second):
        return []
    proof: list[bytes] = []
    start, end, m, complete = 0, second, first, True
    # SUBPROOF(m, D[start:end], complete), unrolled the same way as the audit path.
    while m != end - start:
        k = split_point(end - start)
        if m <= k:
            proof.append(subtree(start + k, end))
            end = start + k
        else:
            proof.append(subtree(start, start + k))
            start, m, complete = start + k, m - k, False
    if not complete:
        proof.append(subtree(start, end))
    proof.reverse()
    return proof


# -- verification (RFC 9162) -------------------------------------------------------------------


def _check_hash(value: bytes, what: str) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{what} must be {HASH_SIZE} bytes")


def root_from_inclusion_proof(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The tree head that ``proof`` implies for ``leaf`` at ``index``, RFC 9162 2.1.3.2."""
    _check_inclusion_args(index, size)
    _check_hash(leaf, "leaf hash")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        _check_hash(p, "proof element")
        if sn == 0:  # a longer path than the tree is high: trailing elements are garbage
            raise ProofError("inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            # On the right edge of an unbalanced tree: climb past the levels with no sibling.
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("inclusion proof is too short")
    return r


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root_hash: bytes
) -> None:
    """Raise ``ProofError`` unless ``proof`` shows ``leaf`` at ``index`` under ``root_hash``."""
    _check_hash(root_hash, "root hash")
    if root_from_inclusion_proof(index, size, leaf, proof) != root_hash:
        raise ProofError("inclusion proof does not lead to the root hash")


def verify_consistency(
    first: int, second: int, proof: Sequence[bytes], first_root: bytes, second_root: bytes
) -> None:
    """Raise ``ProofError`` unless the tree of size ``second`` extends the one of ``first``.

    RFC 9162 2.1.4.2 covers ``0 < first < second``; the two trivial cases are checked as RFC
    9162 2.1.4.1 defines their proofs: size 0 is a prefix of every tree (empty proof), and a
    tree is consistent with itself only if the heads are equal (empty proof).
    """
    _check_consistency_args(first, second)
    _check_hash(first_root, "first root hash")
    _check_hash(second_root, "second root hash")
    for p in proof:
        _check_hash(p, "proof element")
    if first in (0, second):
        if proof:
            raise ProofError("a consistency proof for these sizes is empty")
        if first == second and first_root != second_root:
            raise ProofError("the same tree size has two different heads")
        return
    if not proof:
        raise ProofError("consistency proof is empty")
    path = list(proof)
    if first & (first - 1) == 0:
        # A power of two: the old tree is a complete subtree of the new one, so its head is
        # the proof's implicit first node.
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("consistency proof is too short")
    if fr != first_root:
        raise ProofError("consistency proof does not lead to the first root hash")
    if sr != second_root:
        raise ProofError("consistency proof does not lead to the second root hash")


# -- the incremental tree ----------------------------------------------------------------------


class MerkleTree:
    """An append-only tree of leaf hashes with every complete subtree cached.

    ``_levels[h]`` holds, as one flat buffer, the heads of the complete subtrees of ``2**h``
    leaves aligned at multiples of ``2**h``. Every subtree the RFC 6962 recursion visits below
    a tree head is aligned that way, so any head or proof is O(log n) lookups and at most
    O(log n) fresh hashes for the ragged right edge. Memory: about 64 bytes per leaf.
    """

    __slots__ = ("_levels",)

    def __init__(self, leaves: Sequence[bytes] = ()) -> None:
        self._levels: list[bytearray] = [bytearray()]
        for leaf in leaves:
            self.append(leaf)

    def __len__(self) -> int:
        return len(self._levels[0]) // HASH_SIZE

    @property
    def size(self) -> int:
        return len(self)

    def append(self, leaf: bytes) -> int:
        """Add a leaf hash; return its index."""
        _check_hash(leaf, "leaf hash")
        index = len(self)
        self._levels[0] += leaf
        h, count = 0, index + 1
        # Each time the count at a level becomes even, a subtree one level up is complete.
        while count % 2 == 0:
            level = self._levels[h]
            pair = level[-2 * HASH_SIZE :]
            if len(self._levels) == h + 1:
                self._levels.append(bytearray())
            self._levels[h + 1] += node_hash(bytes(pair[:HASH_SIZE]), bytes(pair[HASH_SIZE:]))
            h, count = h + 1, count // 2
        return index

    def leaf(self, index: int) -> bytes:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return bytes(self._levels[0][index * HASH_SIZE : (index + 1) * HASH_SIZE])

    def _subtree(self, start: int, end: int) -> bytes:
        n = end - start
        if n == 0:
            return EMPTY_ROOT
        if n & (n - 1) == 0 and start % n == 0:
            h = n.bit_length() - 1
            at = (start >> h) * HASH_SIZE
            return bytes(self._levels[h][at : at + HASH_SIZE])
        k = split_point(n)
        return node_hash(self._subtree(start, start + k), self._subtree(start + k, end))

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= len(self):
            raise ProofError(f"the tree has {len(self)} leaves, not {size}")

    def root(self, size: int | None = None) -> bytes:
        """The head of the tree over the first ``size`` leaves (all of them by default)."""
        size = len(self) if size is None else size
        self._check_size(size)
        return self._subtree(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        size = len(self) if size is None else size
        self._check_size(size)
        return inclusion_path(index, size, self._subtree)

    def consistency_proof(self, first: int, second: int | None = None) -> list[bytes]:
        second = len(self) if second is None else second
        self._check_size(second)
        return consistency_path(first, second, self._subtree)


__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MerkleTree",
    "ProofError",
    "consistency_path",
    "consistency_proof",
    "inclusion_path",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root",
    "root_from_inclusion_proof",
    "split_point",
    "verify_consistency",
    "verify_inclusion",
]
