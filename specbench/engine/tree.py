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

from specbench.engine.sampling import TokenChooser, accepts, residual_distribution, sample_by_uniforms


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
    """Multi-step speculative sampling over one row's tree (see `walk_sampling_batch`)."""
    return walk_sampling_batch([tree], verifier_probs[None], [draft_probs], [chooser])[0]


def walk_sampling_batch(
    trees: list[DraftTree | None],
    verifier_probs: torch.Tensor,
    draft_probs: list[list[torch.Tensor | None]],
    choosers: list[TokenChooser | None],
) -> list[tuple[list[int], int] | None]:
    """Multi-step speculative sampling over every row's tree, with one read from the device for the batch.

    `verifier_probs[r, node]` is the verifier's warped distribution after row r's `node`;
    `draft_probs[r][d][i]` is the distribution draft d sampled its i-th token from for row r, or None
    for a deterministic drafter (prompt lookup), whose q is one-hot. Rows whose tree is None are skipped.

    At a node, the drafts that reach it offer their next token in turn; the j-th is accepted when
    u_j q(x) < r_j(x), with r_0 = p and r_(j+1) = norm(max(0, r_j - q)) after a rejection; if none is
    accepted, a token is drawn from the last residual. Every acceptance test of every node, and a
    draw from every node's last residual, are computed on the device before the walk (their
    uniforms drawn on the host, in a fixed order per row, so a row's draws do not depend on its batch
    mates); the walk then follows the test results. Draws that the walk does not reach are unused;
    the ones it uses are fresh and independent, so the output law is exactly the verifier's.
    """
    pairs = []  # (row, node): every node of every tree
    candidates = []  # per pair: [(draft, child)] in draft order
    row_pairs: dict[int, list[int]] = {}  # row -> its pairs' indices
    for row, tree in enumerate(trees):
        if tree is None:
            continue
        for node in range(tree.size):
            row_pairs.setdefault(row, []).append(len(pairs))
            depth = tree.depths[node]
            offered = [
                (draft, branch[depth])
                for draft, branch in enumerate(tree.branches)
                if len(branch) > depth and (depth == 0 or branch[depth - 1] == node)
            ]
            pairs.append((row, node))
            candidates.append(offered)
    device = verifier_probs.device
    most = max((len(offered) for offered in candidates), default=0)
    # uniforms: per row, one per candidate then one per node (for its fallback draw), in pair order
    test_uniforms = torch.zeros(len(pairs), max(most, 1))
    draw_uniforms = torch.zeros(len(pairs))
    for row, indices in row_pairs.items():
        counts = [len(candidates[index]) for index in indices]
        drawn = choosers[row].uniforms(sum(counts) + len(indices))
        offset = 0
        for index, count in zip(indices, counts, strict=True):
            test_uniforms[index, :count] = drawn[offset : offset + count]
            offset += count
        draw_uniforms[indices] = drawn[offset:]
    rows_index = torch.tensor([row for row, _ in pairs], device=device)
    residual = verifier_probs[rows_index, torch.tensor([node for _, node in pairs], device=device)]
    accepted = []
    for j in range(most):
        tokens, qs, offers = [], [], []
        for (row, node), offered in zip(pairs, candidates, strict=True):
            if j >= len(offered):
                tokens.append(0)
                qs.append(None)
                offers.append(False)
                continue
            draft, child = offered[j]
            tokens.append(trees[row].tokens[child])
            q = draft_probs[row][draft]
            qs.append(None if q is None else q[trees[row].depths[node]])
            offers.append(True)
        token_index = torch.tensor(tokens, device=device)[:, None]
        q = torch.zeros_like(residual)
        sampled = [index for index, q_row in enumerate(qs) if q_row is not None]
        if sampled:
            q[torch.tensor(sampled, device=device)] = torch.stack([qs[index] for index in sampled]).to(q.dtype)
        one_hot = [index for index, q_row in enumerate(qs) if offers[index] and q_row is None]
        if one_hot:
            where = torch.tensor(one_hot, device=device)
            q[where, token_index[where, 0]] = 1.0
        uniform = test_uniforms[:, j].to(device)
        accepted.append(accepts(residual.gather(1, token_index)[:, 0], q.gather(1, token_index)[:, 0], uniform))
        offering = torch.tensor(offers, device=device)[:, None]
        residual = torch.where(offering, residual_distribution(residual, q), residual)
    fallback = sample_by_uniforms(residual, draw_uniforms)
    tests = torch.stack(accepted, dim=1) if accepted else torch.zeros(len(pairs), 0, dtype=torch.bool, device=device)
    tests, fallback = tests.tolist(), fallback.tolist()  # the one read from the device
    where = {pair: index for index, pair in enumerate(pairs)}
    outcomes: list[tuple[list[int], int] | None] = []
    for row, tree in enumerate(trees):
        if tree is None:
            outcomes.append(None)
            continue
        path, node = [], 0
        while True:
            index = where[row, node]
            child = next((child for j, (_, child) in enumerate(candidates[index]) if tests[index][j]), None)
            if child is None:
                outcomes.append((path, fallback[index]))
                break
            path.append(child)
            node = child
    return outcomes
