"""Reserved token ids shared by every dataset the system accepts.

Every dataset (the Essen builder or one imported from arrays) maps its own
events to ids >= NUM_SPECIAL. A sequence is right-padded: events, EOS, PAD...
The model never emits PAD or BOS (their log-probs are masked in the head).
"""

PAD = 0
BOS = 1
EOS = 2
NUM_SPECIAL = 3
