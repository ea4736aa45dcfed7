"""Candidate trees: several drafts' proposals merged into one trie and verified in one pass.

Node 0 is the root, the last committed token. Every proposal becomes a path
from the root; proposals that share a prefix share its nodes, so identical
prefixes are verified once. With one proposal (or identical ones) the tree is a
chain and the verifier needs no special attention mask; otherwise each node sees
the cache, its ancestors and itself (`ancestor_matrix`).

Walking the tree decides what is accepted:
- greedy: follow the child whose token is the verifier's argmax, as far as it goes;
- sampling: SpecInfer's multi-step speculative sampling. At each node the drafts
  that reach it offer their next token in turn; each is accepted with probability
  min(1, p(x) / q(x)) against the current residual p, and on rejection p becomes
  norm(max(0, p - q)). If none is accepted a token is drawn from the residual.
  With one draft this is exactly Leviathan et al.'s speculative sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specbench.engine.sampling import TokenChooser, accepts, residual_distribution


@dataclass
class DraftTree:
    """A trie of proposals. Parents always come before their children."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]
    children: list[dict[int, int]]
    # branches[d] = the nodes (root excluded) along draft d's proposal
    branches: list[list[int]] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Number of nodes, root included."""
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        """True when no node has two children: plain causal attention verifies it."""
        return all(len(kids) <= 1 for kids in self.children)


def build_tree(root_token: int, proposals: list[list[int]]) -> DraftTree:
    """Merge the proposals (one list of token ids per draft) into a trie under `root_token`."""
    tree = DraftTree(tokens=[root_token], parents=[-1], depths=[0], children=[{}])
    for proposal in proposals:
        node, branch = 0, []
        for token in proposal:
            child = tree.children[node].get(token)
            if child is None:
                child = tree.size
                tree.tokens.append(token)
                tree.parents.append(node)
                tree.depths.append(tree.depths[node] + 1)
                tree.children.append({})
                tree.children[node][token] = child
            branch.append(child)
            node = child
        tree.branches.append(branch)
    return tree


def ancestor_matrix(parents: list[int]) -> torch.Tensor:
    """Bool [nodes, nodes]: entry (i, j) is True when node j is node i or one of its ancestors.

    `parents[i]` is node i's parent (-1 for the root); parents come before their children.
    """
    visible = torch.eye(len(parents), dtype=torch.bool)
    for node, parent in enumerate(parents):
        if parent >= 0:
            visible[node] |= visible[parent]
    return visible


def walk_greedy(tree: DraftTree, verifier_tokens: list[int]) -> tuple[list[int], int]:
    """Follow the verifier's argmax (`verifier_tokens[node]`) down the tree.

    Returns the accepted nodes and the verifier's own next token after them.
    """
    path, node = [], 0
    while (child := tree.children[node].get(verifier_tokens[node])) is not None:
        path.append(child)
        node = child
    return path, verifier_tokens[node]


def walk_sampling(
    tree: DraftTree,
    verifier_probs: torch.Tensor,
    draft_probs: list[torch.Tensor | None],
    chooser: TokenChooser,
) -> tuple[list[int], int]:
    """Multi-step speculative sampling over the tree (lossless for any number of drafts).

    `verifier_probs[node]` is the verifier's warped distribution after `node`;
    `draft_probs[d][i]` is the distribution draft d sampled its i-th token from,
    or None for a deterministic drafter (prompt lookup), whose q is one-hot.
    """
    path, node = [], 0
    while True:
        residual = verifier_probs[node]
        depth = tree.depths[node]
        accepted_child = None
        for draft, branch in enumerate(tree.branches):
            reaches_node = len(branch) > depth and (depth == 0 or branch[depth - 1] == node)
            if not reaches_node:
                continue
            child = branch[depth]
            token = tree.tokens[child]
            q = draft_probs[draft]
            if q is None:
                q_row = torch.zeros_like(residual)
                q_row[token] = 1.0
            else:
                q_row = q[depth]
            if accepts(residual[token], q_row[token], chooser.uniform(residual.device)):
                accepted_child = child
                break
            residual = residual_distribution(residual, q_row)
        if accepted_child is None:
            return path, int(chooser.sample(residual[None])[0])
        path.append(accepted_child)
        node = accepted_child
