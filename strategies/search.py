"""Generic Monte Carlo Tree Search over any state space: no prompts, no models.

Two searches share the tree: ``MCTS``, plain UCT with mean-value backups, and
``MCTSr``, the selection and backup rules of Monte Carlo Tree Self-refine.

A ``SearchProblem`` says how to expand a state into children and how to value
states (rewards in [0, 1]). Each simulation selects a leaf by UCT, expands it,
values all its new children in one batch (the problem issues that work
concurrently), and backs the best child value up the path. Final choices follow
the values: ``best_path`` descends by mean value, ``best_node`` is the highest
mean value anywhere in the tree.

``parallel`` > 1 (tree parallelisation): an iteration selects up to ``parallel``
distinct leaves and expands them concurrently, for the same number of expansions
in fewer sequential rounds. Each selected leaf puts a virtual loss on its path
(``virtual_loss`` extra visits with reward 0, kept apart from the real
statistics) so UCT steers the next selection elsewhere; it is lifted when that
leaf's expansion ends. ``parallel=1`` is the plain sequential search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Protocol, Sequence, TypeVar

from .base import gather_or_cancel  # no prompts, no models: just cancel-on-failure gather

S = TypeVar("S")


class SearchProblem(Protocol[S]):
    async def expand(self, state: S) -> Sequence[S]:
        """Children of ``state`` (may be empty: a dead end)."""
        ...

    async def evaluate(self, states: Sequence[S]) -> Sequence[float | None]:
        """Values in [0, 1] for a batch of states; None for a state that could not be
        valued (its evaluation failed), which is left out of the tree."""
        ...

    def is_terminal(self, state: S) -> bool: ...


@dataclass(eq=False)
class Node(Generic[S]):
    state: S
    parent: "Node[S] | None" = None
    depth: int = 0
    children: list["Node[S]"] = field(default_factory=list)
    visits: int = 0
    value_sum: float = 0.0
    value: float | None = None
    """The state's own evaluated value."""
    expanded: bool = False
    terminal: bool = False
    exhausted: bool = False
    """Every node below is terminal or a dead end: selection skips it."""
    index: int = 0
    pending: int = 0
    """Selected leaves in flight at or below this node (each a virtual loss in UCT only)."""

    @property
    def q(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0

    def walk(self) -> Iterator["Node[S]"]:
        yield self
        for child in self.children:
            yield from child.walk()


def _visits(node: Node[Any], virtual_loss: float) -> float:
    """Real visits plus the virtual ones of selections still in flight below ``node``."""
    return node.visits + node.pending * virtual_loss if node.pending else node.visits


def uct(child: Node[Any], parent_visits: float, exploration: float, virtual_loss: float = 1.0) -> float:
    """UCT score; a pending selection counts as ``virtual_loss`` visits with reward 0."""
    visits = _visits(child, virtual_loss)
    if visits == 0:
        return math.inf
    return child.value_sum / visits + exploration * math.sqrt(math.log(parent_visits) / visits)


class MCTS(Generic[S]):
    def __init__(self, problem: SearchProblem[S], *, exploration: float = 1.0, max_depth: int = 8,
                 on_expand: Callable[[Node[S]], None] | None = None, parallel: int = 1,
                 virtual_loss: float = 1.0) -> None:
        if parallel < 1:
            raise ValueError(f"parallel must be at least 1, got {parallel}")
        if virtual_loss < 0:
            raise ValueError(f"virtual_loss must not be negative, got {virtual_loss}")
        self.problem = problem
        self.exploration = exploration
        self.max_depth = max_depth
        self.on_expand = on_expand
        self.parallel = parallel
        self.virtual_loss = virtual_loss
        self._count = 0

    def new_root(self, state: S, value: float | None = None) -> Node[S]:
        root = Node(state, terminal=self.problem.is_terminal(state))
        if value is not None:
            root.value, root.visits, root.value_sum = value, 1, value
        return root

    async def search(self, root: Node[S], simulations: int,
                     after_simulation: Callable[[Node[S]], None] | None = None) -> Node[S]:
        """Run ``simulations`` expansions (fewer if the tree is exhausted), up to
        ``parallel`` at a time; ``after_simulation(root)`` follows each expansion."""
        done = 0
        while done < simulations:
            leaves = self.select_many(root, min(self.parallel, simulations - done))
            if not leaves:  # the whole tree is explored
                break
            if len(leaves) == 1:
                await self._simulate(root, leaves[0], after_simulation)
            else:
                await gather_or_cancel(*(self._simulate(root, leaf, after_simulation) for leaf in leaves))
            done += len(leaves)
        return root

    def select_many(self, root: Node[S], count: int) -> list[Node[S]]:
        """Up to ``count`` distinct leaves, each holding a virtual loss on its path
        (lifted by ``_simulate``). Stops early when selection, despite the virtual
        losses, comes back to a leaf already chosen, or finds nothing left."""
        leaves: list[Node[S]] = []
        try:
            while len(leaves) < count:
                leaf = self.select(root)
                if leaf is None or any(leaf is chosen for chosen in leaves):
                    break
                self._mark(leaf, +1)
                leaves.append(leaf)
        except BaseException:
            for leaf in leaves:
                self._mark(leaf, -1)
            raise
        return leaves

    async def _simulate(self, root: Node[S], leaf: Node[S],
                        after_simulation: Callable[[Node[S]], None] | None) -> None:
        try:
            await self.expand(leaf)
        finally:
            self._mark(leaf, -1)
        if after_simulation is not None:
            after_simulation(root)

    @staticmethod
    def _mark(leaf: Node[S], delta: int) -> None:
        """Add (+1) or lift (-1) one virtual loss on the path from ``leaf`` to the root."""
        current: Node[S] | None = leaf
        while current is not None:
            current.pending += delta
            current = current.parent

    def select(self, root: Node[S]) -> Node[S] | None:
        """Descend by UCT (virtual losses included) to a node that can still be expanded."""
        node = root
        while node.expanded:
            open_children = [c for c in node.children if self._expandable(c)]
            if not open_children:
                node.exhausted = True
                if node is root:
                    return None
                node = root
                continue
            parent_visits = max(_visits(node, self.virtual_loss), 1)
            node = max(open_children, key=lambda c: uct(c, parent_visits, self.exploration, self.virtual_loss))
        return node

    @staticmethod
    def _expandable(node: Node[S]) -> bool:
        return not node.terminal and not node.exhausted and (not node.expanded or bool(node.children))

    async def expand(self, leaf: Node[S]) -> None:
        leaf.expanded = True
        if leaf.terminal or leaf.depth >= self.max_depth:
            leaf.terminal = True
            self.backpropagate(leaf, leaf.value if leaf.value is not None else 0.0)
            return
        states = list(await self.problem.expand(leaf.state))
        valued = list(zip(states, await self.problem.evaluate(states))) if states else []
        valued = [(state, value) for state, value in valued if value is not None]
        if not valued:  # a dead end (no children, or none could be valued)
            leaf.terminal = True
            self.backpropagate(leaf, leaf.value if leaf.value is not None else 0.0)
            return
        for state, value in valued:
            self._count += 1
            child = Node(state, parent=leaf, depth=leaf.depth + 1, value=value, visits=1, value_sum=value,
                         terminal=self.problem.is_terminal(state) or leaf.depth + 1 >= self.max_depth,
                         index=self._count)
            leaf.children.append(child)
        if self.on_expand is not None:
            self.on_expand(leaf)
        self.backpropagate(leaf, max(value for _, value in valued))

    @staticmethod
    def backpropagate(node: Node[S], reward: float) -> None:
        current: Node[S] | None = node
        while current is not None:
            current.visits += 1
            current.value_sum += reward
            current = current.parent

    @staticmethod
    def best_path(root: Node[S]) -> list[Node[S]]:
        """Greedy descent by mean value (ties: more visits, then earlier child)."""
        path = [root]
        while path[-1].children:
            path.append(max(path[-1].children, key=lambda c: (c.q, c.visits, -c.index)))
        return path

    @staticmethod
    def best_node(root: Node[S], accept: Callable[[Node[S]], bool] = lambda n: True) -> Node[S]:
        """Highest mean value in the tree among accepted nodes (ties: earlier)."""
        nodes = [n for n in root.walk() if accept(n)] or [root]
        return max(nodes, key=lambda n: (n.q, -n.index))


# == MCTSr ========================================================================


class RewardProblem(Protocol[S]):
    async def expand(self, state: S) -> Sequence[S]:
        """Children of ``state`` (may be empty: a dead end)."""
        ...

    async def rewards(self, states: Sequence[S]) -> Sequence[Sequence[float] | None]:
        """Sampled rewards in [0, 1] for each state of a batch (an empty list when none
        could be read; None when they could not be sampled: such a child is left out,
        a re-visit adds nothing)."""
        ...

    def is_terminal(self, state: S) -> bool: ...


@dataclass(eq=False)
class RewardNode(Generic[S]):
    """An MCTSr node: a state and its sampled rewards R_a (after full-score suppression)."""

    state: S
    parent: "RewardNode[S] | None" = None
    depth: int = 0
    children: list["RewardNode[S]"] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    value: float = 0.0
    """Q'(a): Q(a) backed up with the children's values."""
    terminal: bool = False
    index: int = 0

    @property
    def visits(self) -> int:
        """N(a): the number of rewards sampled for the node."""
        return len(self.rewards)

    @property
    def q(self) -> float:
        """Q(a) = ½(min R_a + mean R_a); 0 while no reward could be read."""
        if not self.rewards:
            return 0.0
        return (min(self.rewards) + sum(self.rewards) / len(self.rewards)) / 2

    def walk(self) -> Iterator["RewardNode[S]"]:
        yield self
        for child in self.children:
            yield from child.walk()


class MCTSr(Generic[S]):
    """Monte Carlo Tree Self-refine's search: Zhang et al., 2024, "Accessing GPT-4 level
    Mathematical Olympiad Solutions via Monte Carlo Tree Self-refine with LLaMa-3 8B"
    (arXiv:2406.07394) and its reference code (github.com/trotsky1997/MathBlackBox).

    - Rewards: every visit samples rewards R_a for the node's state. Full-score
      suppression: a reward >= ``full_score`` counts as ``full_score_value`` (the paper's
      95 -> 50 on its [-100, 100] scale, i.e. 0.975 -> 0.75 on [0, 1]).
    - Value: Q(a) = ½(min R_a + mean R_a).
    - Backpropagation, from the expanded node up to the root:
      Q'(a) = ½(Q(a) + max over children c of Q'(c)); a leaf's Q' is its Q.
    - Selection: among the nodes not fully expanded (not terminal, above ``max_depth``,
      and with fewer than ``max_children`` children or every child's Q below the
      node's Q), the one with the highest
      UCT(a) = Q'(a) + c·sqrt(ln(N(parent(a)) + 1) / (N(a) + ε)), N = rewards sampled,
      ε = 1e-5 (the root has N(parent) = 0). The selected node is rewarded again while
      it is expanded (its N grows with its visits).
    - Answer: the node with the highest Q' (ties: more rewards, then the earlier node).

    ``parallel`` > 1 expands the ``parallel`` highest-UCT candidates concurrently.
    """

    EPSILON = 1e-5

    def __init__(self, problem: RewardProblem[S], *, exploration: float = 1.0, max_depth: int = 8,
                 max_children: int = 1, parallel: int = 1, full_score: float = 0.975,
                 full_score_value: float = 0.75,
                 on_expand: Callable[[RewardNode[S]], None] | None = None) -> None:
        if parallel < 1 or max_children < 1:
            raise ValueError(f"parallel and max_children must be at least 1, got {parallel}, {max_children}")
        self.problem = problem
        self.exploration = exploration
        self.max_depth = max_depth
        self.max_children = max_children
        self.parallel = parallel
        self.full_score, self.full_score_value = full_score, full_score_value
        self.on_expand = on_expand
        self._count = 0

    def suppress(self, rewards: Sequence[float]) -> list[float]:
        """Full-score suppression of sampled rewards."""
        return [self.full_score_value if r >= self.full_score else r for r in rewards]

    def new_root(self, state: S, rewards: Sequence[float]) -> RewardNode[S]:
        root = RewardNode(state, rewards=self.suppress(rewards), terminal=self.problem.is_terminal(state))
        root.value = root.q
        return root

    def uct(self, node: RewardNode[S]) -> float:
        parent_visits = node.parent.visits if node.parent is not None else 0
        return node.value + self.exploration * math.sqrt(math.log(parent_visits + 1) / (node.visits + self.EPSILON))

    def expandable(self, node: RewardNode[S]) -> bool:
        if node.terminal or node.depth >= self.max_depth:
            return False
        return len(node.children) < self.max_children or all(c.q < node.q for c in node.children)

    def select_many(self, root: RewardNode[S], count: int) -> list[RewardNode[S]]:
        """The ``count`` candidates with the highest UCT (ties: the earlier node)."""
        candidates = [node for node in root.walk() if self.expandable(node)]
        return sorted(candidates, key=lambda n: (-self.uct(n), n.index))[:count]

    async def search(self, root: RewardNode[S], simulations: int,
                     after_simulation: Callable[[RewardNode[S]], None] | None = None) -> RewardNode[S]:
        """Run ``simulations`` expansions (fewer once no node can be expanded), up to
        ``parallel`` at a time; ``after_simulation(root)`` follows each expansion."""
        done = 0
        while done < simulations:
            nodes = self.select_many(root, min(self.parallel, simulations - done))
            if not nodes:
                break
            await gather_or_cancel(*(self._simulate(root, node, after_simulation) for node in nodes))
            done += len(nodes)
        return root

    async def _simulate(self, root: RewardNode[S], node: RewardNode[S],
                        after_simulation: Callable[[RewardNode[S]], None] | None) -> None:
        (revisit,), states = await gather_or_cancel(self.problem.rewards([node.state]),
                                                    self.problem.expand(node.state))
        node.rewards.extend(self.suppress(revisit or ()))
        children = list(zip(states, await self.problem.rewards(states))) if states else []
        children = [(state, rewards) for state, rewards in children if rewards is not None]
        if not children:  # a dead end (no children, or none could be rewarded)
            node.terminal = True
        else:
            for state, rewards in children:
                self._count += 1
                child = RewardNode(state, parent=node, depth=node.depth + 1, rewards=self.suppress(rewards),
                                   terminal=self.problem.is_terminal(state), index=self._count)
                child.value = child.q
                node.children.append(child)
            if self.on_expand is not None:
                self.on_expand(node)
        self.backpropagate(node)
        if after_simulation is not None:
            after_simulation(root)

    @staticmethod
    def backpropagate(node: RewardNode[S]) -> None:
        """Q'(a) = ½(Q(a) + max Q'(child)) from ``node`` up to the root."""
        current: RewardNode[S] | None = node
        while current is not None:
            if current.children:
                current.value = (current.q + max(c.value for c in current.children)) / 2
            else:
                current.value = current.q
            current = current.parent

    @staticmethod
    def best(root: RewardNode[S]) -> RewardNode[S]:
        """The answer: the highest Q' (ties: more rewards, then the earlier node)."""
        return max(root.walk(), key=lambda n: (n.value, n.visits, -n.index))


def tree_trace(root: Node[Any] | RewardNode[Any], describe: Callable[[Any], Any]) -> dict[str, Any]:
    """The tree as nested dicts for the run trace (MCTSr nodes add their ``rewards``)."""
    trace = {
        "id": root.index,
        "state": describe(root.state),
        "visits": root.visits,
        "q": round(root.q, 4),
        "value": None if root.value is None else round(root.value, 4),
        "terminal": root.terminal,
    }
    if isinstance(root, RewardNode):
        trace["rewards"] = [round(r, 4) for r in root.rewards]
    trace["children"] = [tree_trace(child, describe) for child in root.children]
    return trace
