"""`paged-attn bench generate`'s concurrency figure: the block manager's own admission."""
from __future__ import annotations

from paged_attention.lab.generate import sequences_fitting

# One block of this config is 2 (K and V) x 16 tokens x 1 head x 1 dim x 1 byte x 1 layer.
CONFIG = dict(num_key_value_heads=1, head_dim=1, num_hidden_layers=1, vocab_size=1000)


def test_sequences_fitting_counts_shared_prefix_blocks_once():
    """64-token prompts with room for 8 new tokens need 5 blocks each; 20 blocks hold 4. With a
    32-token common prefix (2 full blocks), every request after the first reuses both: 3 new
    blocks each, so 1 + (20 - 5) // 3 = 6 fit."""
    budget = 20 * 2 * 16
    own = [[i * 100 + j for j in range(64)] for i in range(3)]
    assert sequences_fitting(own, 8, 16, budget, CONFIG, 1) == 4
    shared = [list(range(32)) + p[32:] for p in own]
    assert sequences_fitting(shared, 8, 16, budget, CONFIG, 1) == 6
