"""RFC 6962 Merkle trees: published vectors, the reference recursion, and property tests.

Known-answer vectors: the eight-leaf tree of the Certificate Transparency reference tests, as
published in transparency-dev/merkle (``proof/verify_test.go``, Apache-2.0; the same values
are in google/certificate-transparency's ``merkle_tree_test``): its leaf data, the tree heads
of every size 1..8, and the inclusion and consistency proofs listed there. Only the values
were transcribed; the tests around them are QFLARE's own.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qflare.monitor import merkle
from qflare.monitor.merkle import EMPTY_ROOT, MerkleTree, ProofError


def h(text: str) -> bytes:
    return bytes.fromhex(text)


LEAF_DATA = [
    h(""),
    h("00"),
    h("10"),
    h("2021"),
    h("3031"),
    h("40414243"),
    h("5051525354555657"),
    h("606162636465666768696a6b6c6d6e6f"),
]
# ROOTS[n - 1] is the head of the tree over the first n leaves.
ROOTS = [
    h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
    h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"),
    h("aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77"),
    h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
    h("4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4"),
    h("76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef"),
    h("ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c"),
    h("5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"),
]
# (0-based leaf index, tree size, audit path). The source numbers leaves from 1.
INCLUSION = [
    (0, 1, []),
    (
        0,
        8,
        [
            h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
        ],
    ),
    (
        5,
        8,
        [
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
            h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
    ),
    (2, 3, [h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125")]),
    (
        1,
        5,
        [
            h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        ],
    ),
]
# (first size, second size, consistency proof)
CONSISTENCY = [
    (1, 1, []),
    (
        1,
        8,
        [
            h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
        ],
    ),
    (
        6,
        8,
        [
            h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
    ),
    (
        2,
        5,
        [
            h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        ],
    ),
    (
        6,
        7,
        [
            h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
            h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
    ),
]
LEAVES = [merkle.leaf_hash(d) for d in LEAF_DATA]
SOME_HASH = h("abacaba000000000000000000000000000000000000000000060061e00123456")


# -- hashing ---------------------------------------------------------------------------------


def test_domain_separated_hashes() -> None:
    assert merkle.leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert merkle.node_hash(b"l", b"r") == hashlib.sha256(b"\x01lr").digest()
    # A leaf is never its own data's node hash: the prefixes keep the two domains apart.
    assert merkle.leaf_hash(b"ab") != merkle.node_hash(b"a", b"b")
    assert merkle.root([]) == EMPTY_ROOT == hashlib.sha256(b"").digest()
    assert MerkleTree().root() == EMPTY_ROOT


@pytest.mark.parametrize(("n", "k"), [(2, 1), (3, 2), (4, 2), (5, 4), (8, 4), (9, 8), (1025, 1024)])
def test_split_point_is_the_largest_power_of_two_below(n: int, k: int) -> None:
    assert merkle.split_point(n) == k


def test_split_point_needs_two_leaves() -> None:
    with pytest.raises(ValueError, match="two leaves"):
        merkle.split_point(1)


# -- the published vectors -------------------------------------------------------------------


@pytest.mark.parametrize("size", range(1, 9))
def test_roots_match_the_published_tree_heads(size: int) -> None:
    assert merkle.root(LEAVES[:size]) == ROOTS[size - 1]
    assert MerkleTree(LEAVES).root(size) == ROOTS[size - 1]
    assert MerkleTree(LEAVES[:size]).root() == ROOTS[size - 1]


@pytest.mark.parametrize(("index", "size", "proof"), INCLUSION)
def test_inclusion_vectors(index: int, size: int, proof: list[bytes]) -> None:
    tree = MerkleTree(LEAVES)
    assert merkle.inclusion_proof(LEAVES[:size], index) == proof
    assert tree.inclusion_proof(index, size) == proof
    root = ROOTS[size - 1]
    merkle.verify_inclusion(index, size, LEAVES[index], proof, root)
    assert merkle.root_from_inclusion_proof(index, size, LEAVES[index], proof) == root


@pytest.mark.parametrize(("first", "second", "proof"), CONSISTENCY)
def test_consistency_vectors(first: int, second: int, proof: list[bytes]) -> None:
    tree = MerkleTree(LEAVES)
    assert merkle.consistency_proof(LEAVES[:second], first) == proof
    assert tree.consistency_proof(first, second) == proof
    merkle.verify_consistency(first, second, proof, ROOTS[first - 1], ROOTS[second - 1])


def _inclusion_probes(
    index: int, size: int, leaf: bytes, proof: list[bytes], root: bytes
) -> list[tuple[str, int, int, bytes, list[bytes], bytes]]:
    """Every way the reference tests corrupt an inclusion claim, each of which must fail."""
    probes = [
        ("index - 1", index - 1, size, leaf, proof, root),
        ("index + 1", index + 1, size, leaf, proof, root),
        ("index ^ 2", index ^ 2, size, leaf, proof, root),
        ("size * 2", index, size * 2, leaf, proof, root),
        ("size // 2", index, size // 2, leaf, proof, root),
        ("wrong leaf", index, size, merkle.leaf_hash(b"WrongLeaf"), proof, root),
        ("empty root", index, size, leaf, proof, EMPTY_ROOT),
        ("random root", index, size, leaf, proof, SOME_HASH),
        ("trailing garbage", index, size, leaf, [*proof, b""], root),
        ("trailing root", index, size, leaf, [*proof, root], root),
        ("preceding garbage", index, size, leaf, [b"", *proof], root),
        ("preceding root", index, size, leaf, [root, *proof], root),
    ]
    for i in range(len(proof)):
        bad = list(proof)
        bad[i] = bytes([bad[i][0] ^ 8]) + bad[i][1:]
        probes.append((f"proof[{i}] bit 3", index, size, leaf, bad, root))
    if proof:
        probes.append(("removed component", index, size, leaf, proof[:-1], root))
    if len(proof) > 1:
        inserted = [proof[0], SOME_HASH, *proof[1:]]
        probes.append(("inserted component", index, size, leaf, inserted, root))
    return probes


@pytest.mark.parametrize(("index", "size", "proof"), [v for v in INCLUSION if v[2]])
def test_corrupted_inclusion_vectors_fail(index: int, size: int, proof: list[bytes]) -> None:
    probes = _inclusion_probes(index, size, LEAVES[index], proof, ROOTS[size - 1])
    for desc, i, n, leaf, bad, root in probes:
        with pytest.raises(ProofError):
            merkle.verify_inclusion(i, n, leaf, bad, root)
            pytest.fail(f"verified a corrupted claim: {desc}")


def _consistency_probes(
    first: int, second: int, proof: list[bytes], root1: bytes, root2: bytes
) -> list[tuple[str, int, int, list[bytes], bytes, bytes]]:
    probes = [
        ("first - 1", first - 1, second, proof, root1, root2),
        ("first + 1", first + 1, second, proof, root1, root2),
        ("first ^ 2", first ^ 2, second, proof, root1, root2),
        ("second * 2", first, second * 2, proof, root1, root2),
        ("second // 2", first, second // 2, proof, root1, root2),
        ("wrong root1", first, second, proof, SOME_HASH, root2),
        ("wrong root2", first, second, proof, root1, SOME_HASH),
        ("swapped roots", first, second, proof, root2, root1),
        ("empty proof", first, second, [], root1, root2),
        ("trailing garbage", first, second, [*proof, b""], root1, root2),
        ("trailing root1", first, second, [*proof, root1], root1, root2),
        ("trailing root2", first, second, [*proof, root2], root1, root2),
        ("preceding garbage", first, second, [b"", *proof], root1, root2),
        ("preceding root1", first, second, [root1, *proof], root1, root2),
        ("preceding root2", first, second, [root2, *proof], root1, root2),
        ("preceding proof[0]", first, second, [proof[0], *proof], root1, root2),
        ("truncated proof", first, second, proof[:-1], root1, root2),
    ]
    for i in range(len(proof)):
        bad = list(proof)
        bad[i] = bytes([bad[i][0] ^ 16]) + bad[i][1:]
        probes.append((f"proof[{i}] bit 4", first, second, bad, root1, root2))
    return probes


@pytest.mark.parametrize(("first", "second", "proof"), [v for v in CONSISTENCY if v[2]])
def test_corrupted_consistency_vectors_fail(first: int, second: int, proof: list[bytes]) -> None:
    probes = _consistency_probes(first, second, proof, ROOTS[first - 1], ROOTS[second - 1])
    for desc, m, n, bad, r1, r2 in probes:
        with pytest.raises(ProofError):
            merkle.verify_consistency(m, n, bad, r1, r2)
            pytest.fail(f"verified a corrupted claim: {desc}")


# -- edge cases the reference tests list -------------------------------------------------------


def test_single_leaf_tree() -> None:
    leaf = merkle.leaf_hash(b"data")
    merkle.verify_inclusion(0, 1, leaf, [], leaf)  # the head of a one-leaf tree is the leaf
    for root, candidate in ((leaf, b""), (b"", leaf), (b"", b"")):
        with pytest.raises(ProofError):
            merkle.verify_inclusion(0, 1, candidate, [], root)


@pytest.mark.parametrize(("index", "size"), [(0, 0), (1, 0), (1, 1), (2, 1), (-1, 4)])
def test_inclusion_of_an_index_outside_the_tree_fails(index: int, size: int) -> None:
    with pytest.raises(ProofError):
        merkle.verify_inclusion(index, size, SOME_HASH, [], EMPTY_ROOT)
    if size:
        with pytest.raises(ProofError):
            MerkleTree([SOME_HASH] * size).inclusion_proof(index)


@pytest.mark.parametrize(
    ("first", "second", "root1", "root2", "proof", "ok"),
    [
        (0, 0, EMPTY_ROOT, EMPTY_ROOT, [], True),
        (0, 1, EMPTY_ROOT, SOME_HASH, [], True),  # the empty tree is a prefix of every tree
        (1, 1, SOME_HASH, SOME_HASH, [], True),
        (1, 1, EMPTY_ROOT, SOME_HASH, [], False),  # one size, two heads
        (1, 0, SOME_HASH, EMPTY_ROOT, [], False),  # time travel
        (2, 1, SOME_HASH, SOME_HASH, [], False),
        (1, 2, SOME_HASH, EMPTY_ROOT, [], False),  # a real step needs a proof
        (0, 0, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT], False),  # trivial sizes, non-empty proof
        (0, 1, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT], False),
        (1, 1, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT], False),
    ],
)
def test_trivial_consistency_cases(
    first: int, second: int, root1: bytes, root2: bytes, proof: list[bytes], ok: bool
) -> None:
    if ok:
        merkle.verify_consistency(first, second, proof, root1, root2)
    else:
        with pytest.raises(ProofError):
            merkle.verify_consistency(first, second, proof, root1, root2)


def test_tree_refuses_sizes_it_does_not_have() -> None:
    tree = MerkleTree(LEAVES[:3])
    with pytest.raises(ProofError):
        tree.root(4)
    with pytest.raises(ProofError):
        tree.consistency_proof(1, 4)
    with pytest.raises(ProofError):
        tree.consistency_proof(3, 2)
    with pytest.raises(ProofError):
        tree.append(b"short")
    assert tree.leaf(2) == LEAVES[2]
    with pytest.raises(IndexError):
        tree.leaf(3)


# -- properties over random trees --------------------------------------------------------------


def _leaves(n: int) -> list[bytes]:
    return [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(n)]


BIG = _leaves(300)
BIG_TREE = MerkleTree(BIG)


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 300), data=st.data())
def test_every_inclusion_proof_verifies_and_every_alteration_fails(
    size: int, data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, size - 1))
    proof = BIG_TREE.inclusion_proof(index, size)
    root = BIG_TREE.root(size)
    assert root == merkle.root(BIG[:size])
    assert proof == merkle.inclusion_proof(BIG[:size], index)
    merkle.verify_inclusion(index, size, BIG[index], proof, root)
    for desc, i, n, leaf, bad, r in _inclusion_probes(index, size, BIG[index], proof, root):
        with pytest.raises(ProofError):
            merkle.verify_inclusion(i, n, leaf, bad, r)
            pytest.fail(f"verified a corrupted inclusion claim: {desc} ({index}, {size})")
    # Any other leaf of the tree at this index fails too.
    other = data.draw(st.integers(0, size - 1).filter(lambda j: j != index)) if size > 1 else None
    if other is not None:
        with pytest.raises(ProofError):
            merkle.verify_inclusion(index, size, BIG[other], proof, root)


@settings(max_examples=300, deadline=None)
@given(second=st.integers(1, 300), data=st.data())
def test_every_consistency_proof_verifies_and_every_alteration_fails(
    second: int, data: st.DataObject
) -> None:
    first = data.draw(st.integers(0, second))
    proof = BIG_TREE.consistency_proof(first, second)
    assert proof == merkle.consistency_proof(BIG[:second], first)
    root1, root2 = BIG_TREE.root(first), BIG_TREE.root(second)
    merkle.verify_consistency(first, second, proof, root1, root2)
    if not proof:  # first is 0 or equals second: nothing to corrupt but the heads
        assert first in (0, second)
        if first == second:
            with pytest.raises(ProofError):
                merkle.verify_consistency(first, second, proof, root1, SOME_HASH)
        return
    for desc, m, n, bad, r1, r2 in _consistency_probes(first, second, proof, root1, root2):
        with pytest.raises(ProofError):
            merkle.verify_consistency(m, n, bad, r1, r2)
            pytest.fail(f"verified a corrupted consistency claim: {desc} ({first}, {second})")
    # A tree that differs in one leaf below ``first`` is not an extension of the old head.
    changed = data.draw(st.integers(0, first - 1))
    forked = list(BIG[:second])
    forked[changed] = SOME_HASH
    fork = MerkleTree(forked)
    with pytest.raises(ProofError):
        merkle.verify_consistency(
            first, second, fork.consistency_proof(first, second), root1, fork.root(second)
        )


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=8), max_size=70))
def test_incremental_tree_matches_the_reference(data: list[bytes]) -> None:
    leaves = [merkle.leaf_hash(d) for d in data]
    tree = MerkleTree()
    for i, leaf in enumerate(leaves):
        assert tree.append(leaf) == i
        assert tree.root() == merkle.root(leaves[: i + 1])
    assert len(tree) == tree.size == len(leaves)
