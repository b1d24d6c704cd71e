"""THREAD (RFC 5256 sections 4 and 5): ORDEREDSUBJECT and REFERENCES, with no I/O.

In: sort.Item per message (in mailbox order) carrying the index's sort fields (base
subject "s", reply-or-forward "rf", sent date "d", Message-ID "id", references "r").
Out: a list of thread trees (`Node`), rendered by `render()` as the THREAD response's
thread-lists.  Every walk is iterative: a mailbox of long reply chains must not hit
Python's recursion limit.
"""
from __future__ import annotations

from .sort import Item

ALGORITHMS = ("ORDEREDSUBJECT", "REFERENCES")


class Node:
    __slots__ = ("item", "parent", "children")

    def __init__(self, item: Item | None = None) -> None:
        self.item = item  # None: a dummy (a referenced message that is not here)
        self.parent: Node | None = None
        self.children: list[Node] = []

    def first_item(self) -> Item | None:
        """The message itself, or for a dummy its first child's (after sorting)."""
        node = self
        while node.item is None:
            if not node.children:
                return None
            node = node.children[0]
        return node.item

    def sort_key(self) -> tuple:
        it = self.first_item()
        return (0, 0) if it is None else (it.date(), it.seq)

    def subject(self) -> str:
        it = self.first_item()
        return "" if it is None else it.f.get("s", "")


def thread(algorithm: str, items: list[Item]) -> list[Node]:
    if algorithm == "ORDEREDSUBJECT":
        return ordered_subject(items)
    if algorithm == "REFERENCES":
        return references(items)
    raise ValueError(f"unknown thread algorithm {algorithm}")


# --- ORDEREDSUBJECT (RFC 5256 section 4) ---------------------------------------------------------
def ordered_subject(items: list[Item]) -> list[Node]:
    """Messages sorted by base subject, then sent date; each run of one subject is a thread
    whose first message is the parent of all the others; threads in the sent date order
    of their first messages."""
    roots: list[Node] = []
    current = None
    for it in sorted(items, key=lambda it: (it.f.get("s", ""), it.date(), it.seq)):
        if current is not None and current.item.f.get("s", "") == it.f.get("s", ""):
            child = Node(it)
            child.parent = current
            current.children.append(child)
            continue
        current = Node(it)
        roots.append(current)
    roots.sort(key=Node.sort_key)
    return roots


# --- REFERENCES (RFC 5256 section 4, the algorithm's steps numbered as there) ----------------------
def _is_ancestor(a: Node, b: Node) -> bool:
    """Is `a` the same as or an ancestor of `b`?"""
    if not a.children:  # the common case, a message seen for the first time: no walk up
        return a is b
    node: Node | None = b
    while node is not None:
        if node is a:
            return True
        node = node.parent
    return False


def _link(parent: Node, child: Node) -> None:
    child.parent = parent
    parent.children.append(child)


def _unlink(child: Node) -> None:
    if child.parent is not None:
        child.parent.children.remove(child)
        child.parent = None


def references(items: list[Item]) -> list[Node]:
    table: dict[str, Node] = {}
    nodes: list[Node] = []

    def lookup(msgid: str) -> Node:
        node = table.get(msgid)
        if node is None:  # not (yet) seen: a dummy, used by every later reference to it
            node = table[msgid] = Node()
        return node

    # (1) the id table and the parent/child links
    for it in items:
        msgid = it.f.get("id")
        node = table.get(msgid) if msgid else None
        if node is not None and node.item is None:
            node.item = it  # the dummy of an earlier reference becomes this message
        else:
            # no Message-ID, or one a message before this had: a unique id of its own
            node = Node(it)
            if msgid and msgid not in table:
                table[msgid] = node
        nodes.append(node)
        refs = [lookup(r) for r in it.f.get("r", ())]
        # (1A) each reference the parent of the next, never changing an existing link
        # and never making a loop
        for parent, child in zip(refs, refs[1:]):
            if child.parent is None and not _is_ancestor(child, parent):
                _link(parent, child)
        # (1B) the last reference is this message's parent: its own References win over a
        # link an earlier (maybe truncated) header made
        _unlink(node)
        if refs and not _is_ancestor(node, refs[-1]):
            _link(refs[-1], node)
    # (2) every node without a parent is a child of the root
    seen: set[int] = set()
    top: list[Node] = []
    for node in nodes + list(table.values()):
        if node.parent is None and id(node) not in seen:
            seen.add(id(node))
            top.append(node)
    # (3) prune dummies
    top = _prune(top)
    # (4) the top level by sent date (a dummy by its first child's, its children sorted)
    for node in top:
        if node.item is None:
            node.children.sort(key=Node.sort_key)
    top.sort(key=Node.sort_key)
    # (5) gather threads with the same base subject
    top = _merge_subjects(top)
    # (6) every set of siblings by sent date, the deepest first
    _sort_all(top)
    return top


def _prune(top: list[Node]) -> list[Node]:
    """Step 3: a dummy without children goes; one with children goes too, its children
    taking its place, except that they are not promoted to the top level when there is
    more than one of them.  Children first (post-order), iteratively."""
    order: list[Node] = []  # every real or dummy node below the top, parents before children
    stack = list(top)
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(node.children)
    for node in reversed(order):  # children before their parents
        if not any(c.item is None for c in node.children):
            continue
        kept: list[Node] = []
        for c in node.children:
            if c.item is None:  # a dummy below the top: its (pruned) children move up here
                for g in c.children:
                    g.parent = node
                kept.extend(c.children)
                c.children = []
            else:
                kept.append(c)
        node.children = kept
    out: list[Node] = []
    for node in top:
        if node.item is None:
            if not node.children:
                continue
            if len(node.children) == 1:
                child = node.children[0]
                child.parent = None
                out.append(child)
                continue
        out.append(node)
    return out


def _merge_subjects(top: list[Node]) -> list[Node]:
    """Step 5: threads whose subjects match are put together."""
    subjects: dict[str, Node] = {}
    for node in top:  # (5B) one thread per subject: dummies first, then non-replies
        subject = node.subject()
        if not subject:
            continue
        held = subjects.get(subject)
        if held is None:
            subjects[subject] = node
        elif held.item is not None and (node.item is None or (_reply(held) and not _reply(node))):
            subjects[subject] = node
    out: list[Node] = []
    where: dict[int, int] = {}  # id(thread) -> its index in out
    for node in top:  # (5C)
        subject = node.subject()
        held = subjects.get(subject) if subject else None
        if held is None or held is node:
            where[id(node)] = len(out)
            out.append(node)
        elif held.item is None and node.item is None:
            for c in node.children:
                c.parent = held
            held.children.extend(node.children)
            node.children = []
        elif held.item is None or (node.item is not None and _reply(node) and not _reply(held)):
            _link(held, node)
        else:
            # both messages, neither a reply to the other: a new dummy holds both, where
            # the subject's thread stood (that one came first: see the table's choice)
            dummy = Node()
            _link(dummy, held)
            _link(dummy, node)
            subjects[subject] = dummy
            i = where.pop(id(held))
            out[i] = dummy
            where[id(dummy)] = i
    return out


def _reply(node: Node) -> bool:
    return node.item is not None and bool(node.item.f.get("rf"))


def _sort_all(top: list[Node]) -> None:
    order: list[Node] = []
    stack = list(top)
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(node.children)
    for node in reversed(order):  # the deepest siblings first: a dummy's key is its first child
        if len(node.children) > 1:
            node.children.sort(key=Node.sort_key)
    top.sort(key=Node.sort_key)


# --- the response -------------------------------------------------------------------------------
def render(top: list[Node]) -> bytes:
    """The thread-lists of a THREAD response: "(1 2 (3)(4 5))(6)" (RFC 5256 section 5).
    A message with one child is followed by it in the same list; several children are
    nested lists; a dummy is a list of its children's lists."""
    out = bytearray()
    # a stack of work: a Node to open as "(" thread ")", or bytes to write
    stack: list = list(reversed([x for n in top for x in (b"(", n, b")")]))
    while stack:
        x = stack.pop()
        if isinstance(x, bytes):
            out += x
            continue
        node: Node = x
        # the members: this message and its single-child chain
        first = True
        while node.item is None and len(node.children) == 1:
            node = node.children[0]
        while node.item is not None:
            if not first:
                out += b" "
            out += b"%d" % node.item.n
            first = False
            if len(node.children) == 1:
                node = node.children[0]
                while node.item is None and len(node.children) == 1:
                    node = node.children[0]
                continue
            break
        kids = node.children
        if not kids:
            continue
        if not first:
            out += b" "
        stack.extend(reversed([y for c in kids for y in (b"(", c, b")")]))
    return bytes(out)

