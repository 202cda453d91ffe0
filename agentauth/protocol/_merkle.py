"""RFC 6962 / RFC 9162 Merkle trees: roots, inclusion and consistency proofs, and a frontier.

Hashing is domain separated so a leaf can never pass for an interior node (RFC 6962 §2.1)::

    leaf_hash(d)    = SHA-256(0x00 || d)
    node_hash(l, r) = SHA-256(0x01 || l || r)
    EMPTY_ROOT      = SHA-256("")

Every function here takes *leaf hashes*, never raw entries: the caller hashes its canonical
entry bytes once with ``leaf_hash`` and keeps the 32-byte result.

Verifiers return ``None`` or raise. Malformed arguments (a hash that is not 32 bytes, a
negative size, an index outside the tree, an old size above the new one, a consistency
check from the empty tree) raise ``InvalidRequest``; a well-formed proof that does not tie
the hashes together (wrong number of proof hashes, a root that does not match) raises
``IntegrityError``. Nothing ever returns ``False``.

``MerkleFrontier`` grows a tree one leaf at a time keeping only the roots of its perfect
subtrees (one per set bit of the size), so a service can checkpoint a long log in O(log n)
memory and persist ``(size, state())`` to resume later.

A service that keeps subtree hashes instead of serving proofs from every leaf asks
``inclusion_proof_ranges`` / ``consistency_proof_ranges`` which subtrees a proof is made of,
looks their hashes up wherever it keeps them, and lists them in that order: the same bytes
as ``inclusion_proof`` / ``consistency_proof``, without any I/O here.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from ._errors import IntegrityError, InvalidRequest

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MerkleFrontier",
    "consistency_proof",
    "consistency_proof_ranges",
    "inclusion_proof",
    "inclusion_proof_ranges",
    "leaf_hash",
    "merkle_root",
    "node_hash",
    "verify_consistency",
    "verify_inclusion",
]

#: Every hash in a tree (leaf hashes, node hashes, roots, proof entries) is a SHA-256 digest.
HASH_SIZE = 32
_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"


def leaf_hash(data: bytes) -> bytes:
    """The RFC 6962 hash of one leaf entry: ``SHA-256(0x00 || data)``."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The RFC 6962 hash of an interior node: ``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


#: The root of the tree with no leaves (RFC 6962 §2.1: the hash of the empty string).
EMPTY_ROOT: bytes = hashlib.sha256(b"").digest()


# --- argument checks ---------------------------------------------------------------------


def _check_hash(value: object, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise InvalidRequest(f"{what} must be a {HASH_SIZE}-byte hash")
    return value


def _check_hashes(values: object, what: str) -> list[bytes]:
    if isinstance(values, bytes | str) or not isinstance(values, Sequence):
        raise InvalidRequest(f"{what} must be a sequence of hashes")
    return [_check_hash(v, what) for v in values]


def _check_size(value: object, what: str) -> int:
    # bool is an int subclass; True is not a tree size.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidRequest(f"{what} must be a non-negative integer")
    return value


# --- building trees ----------------------------------------------------------------------


def _levels(leaves: list[bytes]) -> list[list[bytes]]:
    """Every level of the tree, leaves first, root last (needs at least one leaf).

    A node left without a sibling is carried up unchanged; this bottom-up pairing gives the
    same tree as RFC 6962's split at the largest power of two below the size, so node ``i``
    of level ``k`` is the root of leaves ``[i * 2**k, min((i + 1) * 2**k, size))``.
    """
    levels = [leaves]
    level = leaves
    while len(level) > 1:
        up = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            up.append(level[-1])
        levels.append(up)
        level = up
    return levels


def _subtree_root(levels: list[list[bytes]], start: int, end: int) -> bytes:
    """MTH(leaves[start:end]) for a range RFC 6962 decomposition produces.

    Such a range is either a perfect, aligned subtree or runs to the end of the tree, and in
    both cases ``start`` is a multiple of the smallest power of two at least ``end - start``.
    """
    height = (end - start - 1).bit_length()
    return levels[height][start >> height]


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962 Merkle Tree Hash of a list of *leaf hashes*; ``EMPTY_ROOT`` for no leaves."""
    level = _check_hashes(leaves, "leaf hash")
    if not level:
        return EMPTY_ROOT
    while len(level) > 1:
        up = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            up.append(level[-1])
        level = up
    return level[0]


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The RFC 6962 audit path for leaf ``index`` in the tree of ``leaves`` (leaf hashes)."""
    hashes = _check_hashes(leaves, "leaf hash")
    index = _check_size(index, "index")
    if index >= len(hashes):
        raise InvalidRequest("index is outside the tree")
    proof: list[bytes] = []
    for level in _levels(hashes)[:-1]:
        sibling = index ^ 1
        # A node with no sibling on its level is carried up and adds nothing to the path.
        if sibling < len(level):
            proof.append(level[sibling])
        index >>= 1
    return proof


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """The RFC 6962 consistency proof that the first ``old_size`` leaves are a prefix.

    ``0 < old_size <= len(leaves)``; equal sizes give the empty proof.
    """
    hashes = _check_hashes(leaves, "leaf hash")
    old_size = _check_size(old_size, "old size")
    if old_size == 0 or old_size > len(hashes):
        raise InvalidRequest("old size must be between 1 and the tree size")
    levels = _levels(hashes)
    # RFC 6962 §2.1.2 SUBPROOF, unrolled: walk down from the whole tree towards the subtree
    # that ends at old_size, collecting the sibling of every step; the recursion emits them
    # innermost first, hence the reversal.
    path: list[bytes] = []
    start, end, whole_old_tree = 0, len(hashes), True
    while old_size != end:
        split = 1 << ((end - start - 1).bit_length() - 1)  # largest power of two < width
        if old_size <= start + split:
            path.append(_subtree_root(levels, start + split, end))
            end = start + split
        else:
            path.append(_subtree_root(levels, start, start + split))
            start += split
            whole_old_tree = False
    if not whole_old_tree:
        # The verifier knows the old root but not this node inside the old tree.
        path.append(_subtree_root(levels, start, end))
    path.reverse()
    return path


# --- proofs as subtree ranges -----------------------------------------------------------
#
# Every hash in an RFC 6962 proof is MTH(D[start:end]) of one range of leaves, and the proofs'
# recursions (§2.1.1 PATH, §2.1.2 SUBPROOF) depend on the sizes alone. So a proof can be
# planned first and its hashes fetched from storage after, all at once, rather than through
# a callback that would put I/O (or an await) inside this module.


def _split(width: int) -> int:
    """The largest power of two below ``width`` (> 1): where RFC 6962 splits a tree."""
    return 1 << ((width - 1).bit_length() - 1)


def inclusion_proof_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """The leaf ranges whose subtree hashes, in order, are the RFC 6962 audit path of leaf
    ``index`` in a tree of ``size`` leaves: ``inclusion_proof(leaves, index)`` is
    ``[merkle_root(leaves[a:b]) for a, b in inclusion_proof_ranges(index, len(leaves))]``.

    Each range is either a perfect subtree (its width a power of two and ``start`` a
    multiple of it) or runs to ``size`` from where one of the subtrees of the tree's
    ``MerkleFrontier`` starts (see ``MerkleFrontier.root_from``).
    """
    index = _check_size(index, "index")
    size = _check_size(size, "tree size")
    if index >= size:
        raise InvalidRequest("index is outside the tree")
    # RFC 6962 §2.1.1 PATH, unrolled from the root down; the recursion emits the siblings
    # innermost first, hence the reversal.
    ranges: list[tuple[int, int]] = []
    start, end = 0, size
    while end - start > 1:
        middle = start + _split(end - start)
        if index < middle:
            ranges.append((middle, end))
            end = middle
        else:
            ranges.append((start, middle))
            start = middle
    ranges.reverse()
    return ranges


def consistency_proof_ranges(old_size: int, size: int) -> list[tuple[int, int]]:
    """The leaf ranges whose subtree hashes, in order, are the RFC 6962 consistency proof
    from ``old_size`` to ``size`` (as ``consistency_proof(leaves[:size], old_size)``), of
    the same two shapes as ``inclusion_proof_ranges``. ``0 < old_size <= size``."""
    old_size = _check_size(old_size, "old size")
    size = _check_size(size, "tree size")
    if old_size == 0 or old_size > size:
        raise InvalidRequest("old size must be between 1 and the tree size")
    # The same walk as consistency_proof's.
    ranges: list[tuple[int, int]] = []
    start, end, whole_old_tree = 0, size, True
    while old_size != end:
        middle = start + _split(end - start)
        if old_size <= middle:
            ranges.append((middle, end))
            end = middle
        else:
            ranges.append((start, middle))
            start = middle
            whole_old_tree = False
    if not whole_old_tree:
        ranges.append((start, end))
    ranges.reverse()
    return ranges


# --- verifying proofs --------------------------------------------------------------------


def _inclusion_proof_length(index: int, size: int) -> int:
    # Levels where the paths to index and size-1 still differ each cost one hash; above that,
    # one left sibling per set bit of what remains of the index.
    inner = (index ^ (size - 1)).bit_length()
    return inner + (index >> inner).bit_count()


def _root_mismatch(what: str) -> IntegrityError:
    return IntegrityError(f"{what} does not verify", reason="root_mismatch")


def verify_inclusion(
    *, leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf_hash`` is leaf ``index`` of the tree of ``tree_size`` with ``root``.

    RFC 9162 §2.1.3.2. Returns ``None`` or raises (see the module docstring). The proof
    binds the leaf, its index and the root, but several sizes share one path shape, so
    ``tree_size`` and ``root`` must come together from one signed checkpoint.
    """
    seed = _check_hash(leaf_hash, "leaf hash")
    expected_root = _check_hash(root, "root")
    path = _check_hashes(proof, "proof hash")
    index = _check_size(index, "index")
    tree_size = _check_size(tree_size, "tree size")
    if index >= tree_size:
        raise InvalidRequest("index is outside the tree")
    if len(path) != _inclusion_proof_length(index, tree_size):
        raise IntegrityError("inclusion proof has the wrong length", reason="proof_length")

    fn, sn, r = index, tree_size - 1, seed
    for p in path:
        if sn == 0:  # unreachable after the length check; kept as the RFC states it
            raise IntegrityError("inclusion proof is too long", reason="proof_length")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0 or not hmac.compare_digest(r, expected_root):
        raise _root_mismatch("inclusion proof")


def _consistency_proof_length(old_size: int, new_size: int) -> int:
    # The proof is the inclusion path of leaf old_size-1 in the new tree, starting at the
    # height of the rightmost perfect subtree of the old tree, plus that subtree's root unless
    # it is the whole old tree (a power of two size), whose root the verifier already has.
    last = old_size - 1
    skip = (old_size & -old_size).bit_length() - 1  # trailing zero bits of old_size
    full = _inclusion_proof_length(last, new_size) - skip
    return full if old_size == 1 << skip else full + 1


def verify_consistency(
    *, old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of ``old_size`` with ``old_root`` is a prefix of the new tree.

    RFC 9162 §2.1.4.2, which needs ``0 < old_size``: every tree extends the empty tree, so
    a proof from size 0 would prove nothing and is refused. Equal sizes need equal roots and
    an empty proof. Returns ``None`` or raises (see the module docstring). As with
    inclusion, each size must come from the same signed checkpoint as its root.
    """
    first_hash = _check_hash(old_root, "old root")
    second_hash = _check_hash(new_root, "new root")
    path = _check_hashes(proof, "proof hash")
    old_size = _check_size(old_size, "old size")
    new_size = _check_size(new_size, "new size")
    if old_size == 0:
        raise InvalidRequest("a consistency proof from the empty tree proves nothing")
    if old_size > new_size:
        raise InvalidRequest("old size is larger than new size")
    if old_size == new_size:
        if path:
            raise IntegrityError("proof must be empty for equal sizes", reason="proof_length")
        if not hmac.compare_digest(first_hash, second_hash):
            raise _root_mismatch("consistency proof")
        return
    if len(path) != _consistency_proof_length(old_size, new_size):
        raise IntegrityError("consistency proof has the wrong length", reason="proof_length")

    if old_size & (old_size - 1) == 0:  # a power of two: the old root is the starting node
        path = [first_hash, *path]
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:  # unreachable after the length check; kept as the RFC states it
            raise IntegrityError("consistency proof is too long", reason="proof_length")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    # Both comparisons always run, so the error does not say which root failed.
    old_ok = hmac.compare_digest(fr, first_hash)
    new_ok = hmac.compare_digest(sr, second_hash)
    if sn != 0 or not (old_ok and new_ok):
        raise _root_mismatch("consistency proof")


# --- incremental building ----------------------------------------------------------------


class MerkleFrontier:
    """A growing RFC 6962 tree that keeps only its frontier: O(log n) hashes for n leaves.

    The frontier is the list of roots of the perfect subtrees the leaves split into, largest
    (leftmost) first, one per set bit of the size. Persist ``size`` and ``state()``; restore
    with ``from_state``. A restored frontier is only as trustworthy as its stored state:
    compare ``root()`` with a signed checkpoint after restoring.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self) -> None:
        self._size = 0
        self._hashes: list[bytes] = []

    @classmethod
    def from_state(cls, size: int, hashes: Sequence[bytes]) -> MerkleFrontier:
        """Restore a frontier saved as ``(frontier.size, frontier.state())``."""
        size = _check_size(size, "frontier size")
        stored = _check_hashes(hashes, "frontier hash")
        if len(stored) != size.bit_count():
            raise InvalidRequest("frontier state does not match its size")
        frontier = cls()
        frontier._size = size
        frontier._hashes = stored
        return frontier

    def append(self, leaf_hash: bytes) -> list[bytes]:
        """Add one leaf, given as its leaf hash.

        Returns the roots of the perfect subtrees this leaf completes, smallest first: item
        ``h`` is the root of the ``2**h`` leaves ending with this one, ``[size - 2**h, size)``
        at the new size (item 0 is the leaf itself), for a store of subtree hashes to keep.
        """
        node = _check_hash(leaf_hash, "leaf hash")
        completed = [node]
        # Each trailing one bit of the old size is a perfect subtree of the height node has
        # just reached: merge them, like carrying in binary addition.
        size = self._size
        while size & 1:
            node = node_hash(self._hashes.pop(), node)
            completed.append(node)
            size >>= 1
        self._hashes.append(node)
        self._size += 1
        return completed

    @property
    def size(self) -> int:
        """The number of leaves appended so far."""
        return self._size

    def root(self) -> bytes:
        """The RFC 6962 root of every leaf appended so far."""
        if not self._hashes:
            return EMPTY_ROOT
        node = self._hashes[-1]
        for left in reversed(self._hashes[:-1]):
            node = node_hash(left, node)
        return node

    def root_from(self, start: int) -> bytes:
        """MTH of leaves ``[start, size)``, for a ``start`` where one of the frontier's
        subtrees begins: the right edge of the tree, which no stored perfect subtree covers
        but every proof of this size may need (see ``inclusion_proof_ranges``)."""
        start = _check_size(start, "start")
        # The subtrees are as wide as the set bits of the size, largest first.
        size = self._size
        widths = [1 << bit for bit in range(size.bit_length() - 1, -1, -1) if size >> bit & 1]
        begins = 0
        for i, width in enumerate(widths):
            if begins == start:
                node = self._hashes[-1]
                for left in reversed(self._hashes[i:-1]):
                    node = node_hash(left, node)
                return node
            begins += width
        raise InvalidRequest("start is not where a subtree of the frontier begins")

    def state(self) -> list[bytes]:
        """The frontier hashes, largest subtree first: persist these with ``size``."""
        return list(self._hashes)

    def __repr__(self) -> str:
        return f"MerkleFrontier(size={self._size})"
